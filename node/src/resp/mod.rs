//! The Redis-protocol front end: RESP2, and RESP3 after `HELLO 3`, on `resp.listen`, over the same engine as
//! the gRPC API. Any node answers any key; reads are read-through (a GET of a cold key runs the hook at its owner).
//!
//! The design follows Garnet's for a small machine: a connection's task reads what the client sent, parses
//! every complete command in the buffer ([`parse`]), answers hits synchronously from the store (no await, no
//! task switch, no allocation), appends the replies to one buffer ([`reply`]) and writes it once. Only a command
//! that needs other nodes or a data source awaits, in order, so replies keep the order of the commands.
//!
//! Keys: `keyspace:key` names a key of `keyspace` when a keyspace of that name exists (split at the first `:`);
//! any other key belongs to `resp.defaultKeyspace`.
//!
//! Back-pressure: replies a client does not read stay in its output buffer; past `resp.maxOutputBytes` the node
//! disconnects it (as Redis's client-output-buffer-limit does). Requests are bounded by `resp.maxRequestBytes`,
//! connections by `resp.maxConnections`, and idle connections by `resp.idleTimeout` when set.

mod commands;
mod conn;
pub mod parse;
pub mod reply;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{config::RespConfig, engine::Engine};

/// Passwords of the RESP users, read once at start.
#[derive(Clone, Default)]
pub struct Auth {
    /// The `default` user's password.
    default: Option<Vec<u8>>,
    /// Named users' passwords.
    users: HashMap<String, Vec<u8>>,
}

impl Auth {
    /// Reads the passwords of `config` (files included). An unreadable or empty password is an error.
    pub fn load(config: &RespConfig) -> Result<Self, String> {
        let read = |what: &str,
                    inline: Option<&String>,
                    file: Option<&std::path::PathBuf>|
         -> Result<Option<Vec<u8>>, String> {
            let secret = match (inline, file) {
                (Some(p), _) => p.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| format!("resp: cannot read {what}'s password file {}: {e}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
                (None, None) => return Ok(None),
            };
            if secret.is_empty() {
                return Err(format!("resp: {what}'s password is empty"));
            }
            Ok(Some(secret.into_bytes()))
        };
        let default = read("user default", config.password.as_ref(), config.password_file.as_ref())?;
        let mut users = HashMap::new();
        for user in &config.users {
            let what = format!("user {}", user.name);
            if let Some(secret) = read(&what, user.password.as_ref(), user.password_file.as_ref())? {
                users.insert(user.name.clone(), secret);
            }
        }
        Ok(Self { default, users })
    }

    /// Whether connections must authenticate.
    pub fn required(&self) -> bool {
        self.default.is_some() || !self.users.is_empty()
    }

    /// Checks a user and password; `Some(identities)` when they match.
    fn check(&self, user: &[u8], password: &[u8]) -> Option<Vec<String>> {
        let user = std::str::from_utf8(user).ok()?;
        let expected = if user == "default" { self.default.as_ref() } else { self.users.get(user) }?;
        constant_time_eq(expected, password)
            .then(|| if user == "default" { Vec::new() } else { vec![user.to_owned()] })
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// What every connection of the front end shares.
pub(crate) struct Shared {
    engine: Arc<Engine>,
    default_keyspace: Option<String>,
    auth: Auth,
    max_connections: usize,
    idle_timeout: Option<Duration>,
    max_output: usize,
    max_request: usize,
    port: u16,
    connections: AtomicUsize,
    next_id: AtomicU64,
    started: Instant,
}

/// The bound RESP listener.
pub struct RespServer {
    listener: TcpListener,
    config: RespConfig,
    auth: Auth,
}

impl RespServer {
    /// Binds `config.listen` (or uses `listener`) and reads the passwords: done before the node starts serving,
    /// so a bad setting stops the start.
    pub async fn bind(
        config: &RespConfig,
        listener: Option<TcpListener>,
    ) -> Result<Self, crate::node::StartError> {
        let auth = Auth::load(config).map_err(crate::node::StartError::Resp)?;
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.listen).await.map_err(|source| {
                crate::node::StartError::Bind { what: "RESP", addr: config.listen, source }
            })?,
        };
        Ok(Self { listener, config: config.clone(), auth })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown`; each connection runs in its own task and ends with the shutdown too.
    pub async fn run(self, engine: Arc<Engine>, shutdown: CancellationToken) {
        let Self { listener, config, auth } = self;
        let port = listener.local_addr().map_or(config.listen.port(), |a| a.port());
        let bytes = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
        let shared = Arc::new(Shared {
            engine,
            default_keyspace: config.default_keyspace.clone(),
            auth,
            max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
            idle_timeout: Some(config.idle_timeout.get()).filter(|d| !d.is_zero()),
            max_output: bytes(config.max_output_bytes.bytes()),
            max_request: bytes(config.max_request_bytes.bytes()),
            port,
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
        });
        if let Some(name) = &shared.default_keyspace
            && shared.engine.keyspaces().get(name).is_none()
        {
            tracing::warn!(keyspace = %name, "resp.defaultKeyspace names no keyspace (yet): keys without a keyspace prefix get an error until it exists");
        }
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "RESP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let open = shared.connections.fetch_add(1, Ordering::AcqRel);
            let guard = ConnectionGuard(Arc::clone(&shared));
            if open >= shared.max_connections {
                shared.engine.metrics().resp_disconnect("max_connections");
                // Redis's wording; best effort, the connection closes either way.
                let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
                drop(guard);
                continue;
            }
            shared.engine.metrics().resp_connections.inc();
            let (shared, stop) = (Arc::clone(&shared), shutdown.clone());
            tokio::spawn(async move {
                conn::serve(&shared, stream, peer, stop).await;
                shared.engine.metrics().resp_connections.dec();
                drop(guard);
            });
        }
    }
}

/// Counts an open connection until dropped.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> RespConfig {
        serde_yaml::from_str(yaml).expect("config")
    }

    #[test]
    fn passwords_come_from_the_config_or_files_and_name_identities() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").expect("write");
        let yaml = format!(
            "{{ listen: 127.0.0.1:1, password: top, users: [{{ name: ops, passwordFile: {} }}] }}",
            file.display()
        );
        let auth = Auth::load(&config(&yaml)).expect("loads");
        assert!(auth.required());
        assert_eq!(auth.check(b"default", b"top"), Some(Vec::new()), "the default user has no identity");
        assert_eq!(
            auth.check(b"ops", b"from-file"),
            Some(vec!["ops".to_owned()]),
            "trailing newline ignored"
        );
        assert_eq!(auth.check(b"ops", b"from-file\n"), None);
        assert_eq!(auth.check(b"ops", b"top"), None);
        assert_eq!(auth.check(b"nobody", b"top"), None);
        assert!(!Auth::load(&config("{ listen: 127.0.0.1:1 }")).expect("loads").required());
        let missing = format!("{{ listen: 127.0.0.1:1, passwordFile: {}/absent }}", dir.path().display());
        let err = Auth::load(&config(&missing)).err().unwrap_or_default();
        assert!(err.contains("absent") && err.contains("user default"), "{err}");
        std::fs::write(&file, "\n").expect("write");
        let empty = format!("{{ listen: 127.0.0.1:1, passwordFile: {} }}", file.display());
        assert!(Auth::load(&config(&empty)).err().unwrap_or_default().contains("empty"));
    }

    #[test]
    fn password_comparison_needs_every_byte() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
