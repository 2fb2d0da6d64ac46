//! A real `nats-server` process for the NATS discovery tests (Debian package `nats-server`), on a free
//! 127.0.0.1 port, killed by its PID when the guard drops (also when a test fails), and node configs that use it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use distcache_node::{
    NodeConfig,
    config::{DiscoveryConfig, NatsDiscovery},
};

/// A `nats-server` child process; killed on drop.
pub struct NatsServer {
    /// `nats://127.0.0.x:PORT`.
    pub url: String,
    /// The listen address.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        let addr = crate::spare_addr()?;
        let mut server = Self { url: format!("nats://{addr}"), addr, child: None };
        server.spawn()?;
        Ok(server)
    }

    /// Kills the server (like a crash: no lame-duck mode) and waits for the process to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`NatsServer::kill`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = nats_server_binary()?;
        let (host, port) = (self.addr.ip().to_string(), self.addr.port().to_string());
        // The port was free a moment ago (or held by the killed server, whose socket the new one can reuse); a
        // few attempts cover a process that exits at once because the port is briefly taken.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new(&binary)
                .args(["-a", &host, "-p", &port])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", binary.display()))?;
            loop {
                if let Some(status) = child.try_wait()? {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "nats-server on {} exited with {status} before accepting connections",
                        self.addr
                    );
                    break;
                }
                if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                    self.child = Some(child);
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    anyhow::bail!("nats-server on {} did not accept connections within 10 s", self.addr);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `nats-server` from `PATH`, or Debian's `/usr/sbin/nats-server` (not on a non-root `PATH`).
fn nats_server_binary() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/sbin/nats-server")]).find(|p| p.is_file()).ok_or_else(
        || {
            anyhow::anyhow!(
                "nats-server not found: install it (`apt-get install nats-server`, or `make setup` as root)"
            )
        },
    )
}

/// A node config with NATS discovery on `url` and `subject`, the given heartbeat, and the keyspaces file.
pub fn nats_config(
    url: &str,
    subject: &str,
    heartbeat: Duration,
    missed_heartbeats: u32,
    keyspaces_file: &Path,
) -> NodeConfig {
    NodeConfig {
        discovery: DiscoveryConfig::Nats(NatsDiscovery {
            url: url.to_owned(),
            subject: subject.to_owned(),
            heartbeat: distcache_api::DurationString(heartbeat),
            missed_heartbeats,
        }),
        keyspaces_file: Some(keyspaces_file.to_owned()),
        keyspaces_poll_interval: distcache_api::DurationString(Duration::from_millis(100)),
        peer_timeout: distcache_api::DurationString(Duration::from_secs(1)),
        shutdown_grace: distcache_api::DurationString(Duration::from_secs(2)),
        ..NodeConfig::default()
    }
}
