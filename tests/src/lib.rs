//! Test harness: real DistCache nodes in-process (each on its own tokio runtime, so a test can kill one
//! abruptly: every socket of a killed node closes at once, like a `kill -9`), counting data sources, clients,
//! and helpers to run the built binaries as real processes.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub mod cluster_dns;
pub mod dns;
pub mod kubelet;
pub mod nats;
pub mod netns;
pub mod operator;
pub mod origin;
pub mod otlp;
pub mod procs;
pub mod testbed;
pub mod tls;

use async_trait::async_trait;
use bytes::Bytes;
use distcache_api::ValidKeyspace;
use distcache_node::{
    NodeConfig, NodeOptions, RunningNode,
    config::{DiscoveryConfig, StaticDiscovery},
    engine::Engine,
    source::{BuildSourceError, DataSource, FetchError, Fetched, SourceFactory},
};
use distcache_proto::v1::cache_client::CacheClient;
use tonic::transport::Channel;

pub use nats::{NatsServer, nats_config};

/// A data source that answers `value-of-{key}` for every key except those starting with `missing`, after an
/// optional delay, and counts its fetches per key.
pub struct CountingSource {
    /// Node name (for messages).
    pub node: String,
    /// Fetch count per key.
    pub fetches: Mutex<HashMap<String, u64>>,
    /// `fetch_many` calls and their sizes.
    pub batches: Mutex<Vec<usize>>,
    /// Delay of every fetch.
    pub delay: Duration,
    /// TTL returned with every value (`None` = keyspace default).
    pub ttl: Option<Duration>,
}

impl CountingSource {
    /// A source for node `node`.
    pub fn new(node: &str, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            node: node.to_owned(),
            fetches: Mutex::default(),
            batches: Mutex::default(),
            delay,
            ttl: None,
        })
    }

    /// Total fetches.
    pub fn total(&self) -> u64 {
        self.fetches.lock().map_or(0, |m| m.values().sum())
    }

    /// Fetches of one key.
    pub fn of(&self, key: &str) -> u64 {
        self.fetches.lock().map_or(0, |m| m.get(key).copied().unwrap_or(0))
    }

    fn count(&self, key: &str) {
        if let Ok(mut m) = self.fetches.lock() {
            *m.entry(key.to_owned()).or_default() += 1;
        }
    }
}

/// The value a [`CountingSource`] returns for `key`.
pub fn source_value(key: &str) -> Bytes {
    Bytes::from(format!("value-of-{key}"))
}

#[async_trait]
impl DataSource for CountingSource {
    async fn fetch(&self, key: &str) -> Result<Fetched, FetchError> {
        self.count(key);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if key.starts_with("missing") {
            return Err(FetchError::NotFound { negative_ttl: None });
        }
        Ok(Fetched { value: source_value(key), ttl: self.ttl })
    }

    async fn fetch_many(&self, keys: &[String]) -> Vec<Result<Fetched, FetchError>> {
        if let Ok(mut b) = self.batches.lock() {
            b.push(keys.len());
        }
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.fetch(k).await);
        }
        out
    }
}

/// Gives keyspaces whose name starts with `rt` (read-through) this node's counting source; the others get
/// their hook from the node's hook runtime, or are cache-aside.
pub struct TestSources(pub Arc<CountingSource>);

#[async_trait::async_trait]
impl SourceFactory for TestSources {
    async fn build(
        &self,
        keyspace: &ValidKeyspace,
        _base: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
        if keyspace.name.starts_with("rt") {
            Ok(Some(self.0.clone() as Arc<dyn DataSource>))
        } else {
            Ok(None)
        }
    }
}

/// The keyspaces most tests use: `rt` (read-through, negative TTL 300 ms), `kv` (cache-aside), `small`
/// (cache-aside, 256 KiB, values up to 1 KiB).
pub const KEYSPACES: &str = "keyspaces:
  - { name: rt, maxBytes: 16Mi, ttl: 5m, negativeTtl: 300ms, fetchTimeout: 2s }
  - { name: kv, maxBytes: 16Mi }
  - { name: small, maxBytes: 256Ki, maxValueBytes: 1Ki }
";

/// One in-process node on its own runtime.
pub struct TestNode {
    /// Member name.
    pub name: String,
    /// Client gRPC address.
    pub grpc: SocketAddr,
    /// Peer gRPC address (what other members dial).
    pub peer: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Its counting source.
    pub source: Arc<CountingSource>,
    runtime: Option<tokio::runtime::Runtime>,
    node: Option<RunningNode>,
}

impl TestNode {
    /// The node's engine.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.node.as_ref().map(RunningNode::engine)
    }

    /// Kills the node abruptly: every task and socket of its runtime is dropped at once.
    pub fn kill(&mut self) {
        self.node = None;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Stops the node gracefully (as on SIGTERM: discovery says goodbye, servers drain), then drops its runtime.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let stopped = match (self.node.take(), self.runtime.as_ref()) {
            (Some(node), Some(rt)) => rt.spawn(node.stop()).await.map_err(anyhow::Error::from),
            _ => Ok(()),
        };
        self.kill();
        stopped
    }

    /// True while the node runs.
    pub fn is_alive(&self) -> bool {
        self.runtime.is_some()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a node's listeners are, chosen before any node starts so static peer lists can name them.
pub struct Slot {
    /// Client gRPC listener.
    pub grpc: std::net::TcpListener,
    /// Peer gRPC listener.
    pub peer: std::net::TcpListener,
    /// Admin listener.
    pub admin: std::net::TcpListener,
}

impl Slot {
    /// Binds the three listeners on 127.0.0.1, port 0.
    pub fn bind() -> anyhow::Result<Self> {
        Self::bind_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// Binds the three listeners on `ip`, port 0.
    pub fn bind_on(ip: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        Ok(Self {
            grpc: std::net::TcpListener::bind((ip, 0))?,
            peer: std::net::TcpListener::bind((ip, 0))?,
            admin: std::net::TcpListener::bind((ip, 0))?,
        })
    }

    /// Binds the listeners on given addresses (to restart a node where it was).
    pub fn bind_at(grpc: SocketAddr, peer: SocketAddr, admin: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            grpc: std::net::TcpListener::bind(grpc)?,
            peer: std::net::TcpListener::bind(peer)?,
            admin: std::net::TcpListener::bind(admin)?,
        })
    }

    /// The client gRPC address.
    pub fn grpc_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.grpc.local_addr()?)
    }

    /// The peer gRPC address (what static peer lists and discovery name).
    pub fn peer_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.peer.local_addr()?)
    }
}

/// Starts one node on its own runtime with the given config (listen/advertise/admin are taken from `slot`).
pub async fn start_node(
    name: &str,
    slot: Slot,
    mut config: NodeConfig,
    source: Arc<CountingSource>,
) -> anyhow::Result<TestNode> {
    let grpc = slot.grpc.local_addr()?;
    let peer = slot.peer.local_addr()?;
    let admin = slot.admin.local_addr()?;
    config.name = Some(name.to_owned());
    config.listen = grpc;
    config.peer_listen = peer;
    config.admin.listen = admin;
    config.advertise = Some(peer.to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    for l in [&slot.grpc, &slot.peer, &slot.admin] {
        l.set_nonblocking(true)?;
    }
    let sources = Arc::new(TestSources(source.clone()));
    let node = runtime
        .spawn(async move {
            let opts = NodeOptions {
                config,
                sources: Some(sources),
                grpc_listener: Some(tokio::net::TcpListener::from_std(slot.grpc)?),
                peer_listener: Some(tokio::net::TcpListener::from_std(slot.peer)?),
                admin_listener: Some(tokio::net::TcpListener::from_std(slot.admin)?),
                discovery: None,
            };
            anyhow::Ok(distcache_node::start(opts).await?)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|started| started);
    let node = match node {
        Ok(node) => node,
        Err(e) => {
            // Dropping a runtime inside the test's async context would panic.
            runtime.shutdown_background();
            return Err(e);
        }
    };
    Ok(TestNode {
        name: name.to_owned(),
        grpc,
        peer,
        admin,
        source,
        runtime: Some(runtime),
        node: Some(node),
    })
}

/// A cluster of in-process nodes with static discovery over each other.
pub struct Cluster {
    /// The nodes, `node-1` first.
    pub nodes: Vec<TestNode>,
    /// Holds the keyspaces file.
    pub dir: tempfile::TempDir,
    /// The keyspaces file all nodes watch.
    pub keyspaces_file: PathBuf,
}

/// A node config with static discovery over `peers`, fast probes, and the keyspaces file.
pub fn static_config(peers: &[SocketAddr], keyspaces_file: &Path) -> NodeConfig {
    NodeConfig {
        discovery: DiscoveryConfig::Static(StaticDiscovery {
            peers: peers.iter().map(ToString::to_string).collect(),
            probe_interval: distcache_api::DurationString(Duration::from_millis(250)),
            failure_threshold: 3,
        }),
        keyspaces_file: Some(keyspaces_file.to_owned()),
        keyspaces_poll_interval: distcache_api::DurationString(Duration::from_millis(100)),
        peer_timeout: distcache_api::DurationString(Duration::from_secs(1)),
        ..NodeConfig::default()
    }
}

impl Cluster {
    /// Starts `n` nodes that list each other, each with a counting source of `delay`, and waits until every
    /// node sees all `n` members.
    pub async fn start(n: usize, keyspaces: &str, delay: Duration) -> anyhow::Result<Self> {
        Self::start_with(n, keyspaces, delay, |_| {}).await
    }

    /// As [`Cluster::start`], with a hook to adjust each node's config.
    pub async fn start_with(
        n: usize,
        keyspaces: &str,
        delay: Duration,
        tweak: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let keyspaces_file = dir.path().join("keyspaces.yaml");
        std::fs::write(&keyspaces_file, keyspaces)?;
        let slots: Vec<Slot> = (0..n).map(|_| Slot::bind()).collect::<anyhow::Result<_>>()?;
        let peers: Vec<SocketAddr> = slots.iter().map(Slot::peer_addr).collect::<anyhow::Result<_>>()?;
        let mut nodes = Vec::with_capacity(n);
        for (i, slot) in slots.into_iter().enumerate() {
            let name = format!("node-{}", i + 1);
            let mut config = static_config(&peers, &keyspaces_file);
            tweak(&mut config);
            nodes.push(start_node(&name, slot, config, CountingSource::new(&name, delay)).await?);
        }
        let cluster = Self { nodes, dir, keyspaces_file };
        cluster.wait_members(n, Duration::from_secs(10)).await?;
        Ok(cluster)
    }

    /// Waits until every live node sees `n` members.
    pub async fn wait_members(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let nodes: Vec<&TestNode> = self.nodes.iter().filter(|t| t.is_alive()).collect();
        wait_until(within, || {
            nodes.iter().all(|t| t.engine().is_some_and(|e| e.membership().ring().len() == n))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: not every node sees {n} members"))
    }

    /// A gRPC client of node `i`.
    pub async fn client(&self, i: usize) -> anyhow::Result<CacheClient<Channel>> {
        client(self.nodes[i].grpc).await
    }

    /// The live node that owns `key` (by node 0's ring).
    pub fn owner_of(&self, key: &str) -> Option<usize> {
        let ring = self.nodes.iter().find_map(TestNode::engine)?.membership().ring();
        let owner = ring.owner(distcache_node::ring::key_hash(key))?;
        self.nodes.iter().position(|t| t.name == owner.name)
    }
}

/// A gRPC client of a node.
pub async fn client(addr: SocketAddr) -> anyhow::Result<CacheClient<Channel>> {
    Ok(CacheClient::connect(format!("http://{addr}")).await?)
}

/// Polls `cond` every 20 ms until it holds or `within` elapses.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    wait_for(within, "condition", || std::future::ready(Ok(cond()))).await
}

/// Polls an async condition every 20 ms until it returns `Ok(true)` or `within` elapses; an `Err` from the
/// condition ends the wait at once. The one place where tests pause between polls: every wait has a deadline
/// and an error that says what did not happen.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    loop {
        ticker.tick().await;
        if cond().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
    }
}

/// `n` loopback addresses for servers a test starts as separate processes, which bind them some time after this
/// returns. Each is a random `127.0.0.x` (x in 2..=254) with a port the kernel had free there, all held open until
/// every one is chosen, so no two are the same. Not `127.0.0.1`: the kernel gives clients connecting over loopback
/// their ephemeral ports on `127.0.0.1` (the source address of the `127/8` route), and such a client of another
/// test could take a port released here before the process binds it (a node then exits with "address in use").
pub fn spare_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    use std::hash::BuildHasher as _;
    static DRAWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let held = (0..n)
        .map(|_| {
            let draw = DRAWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let seed = std::hash::RandomState::new().hash_one((std::process::id(), draw));
            let host = u8::try_from(seed % 253 + 2)?;
            Ok(std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0))?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?)).collect()
}

/// One address as [`spare_addrs`] chooses them.
pub fn spare_addr() -> anyhow::Result<SocketAddr> {
    spare_addrs(1)?.pop().ok_or_else(|| anyhow::anyhow!("no address chosen"))
}

/// Path of a binary built from this workspace (`cargo build --workspace --bins` in `make test`), next to the
/// test executable's `deps/` directory.
pub fn built_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`, done by `make test`)",
        path.display()
    );
    Ok(path)
}

/// HTTP GET of `http://{addr}{path}` (the admin server, the origin, probes): status code and body (lossy
/// UTF-8). Gives up after 5 s, so a server that hangs fails the test with its address instead of hanging it.
/// Like the hand-written GET it replaces: redirects are not followed (the status is returned as is), and every
/// call opens its own connection and closes it after the answer (`Connection: close`, no pool), so nothing
/// outlives the call, whichever of the tests' many runtimes it ran on.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    let url = format!("http://{addr}{path}");
    let exchange = async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()?;
        let response = client.get(&url).header(reqwest::header::CONNECTION, "close").send().await?;
        let status = response.status().as_u16();
        let body = response.bytes().await?;
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("GET {url}: no answer within 5 s"))?
        .with_context(|| format!("GET {url}"))
}

/// The repository root (the tests crate's parent directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_owned)
}

/// Where the hooks workspace is built: `$CARGO_TARGET_DIR/hooks` (or `target/hooks`), the same place as
/// `make hooks`.
pub fn hooks_target_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
    target.join("hooks")
}

static HOOKS_BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();

/// Builds the WebAssembly hooks of `hooks/` from source (once per test process; a no-op when they are up to
/// date, as after `make hooks`) and returns the path of `<name>.wasm` (`http_json`, `distcache_test_hook`).
pub fn hook_module(name: &str) -> anyhow::Result<PathBuf> {
    let dir = HOOKS_BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let target = hooks_target_dir();
            let output = std::process::Command::new(cargo)
                .current_dir(repo_root())
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip2",
                    "--manifest-path",
                    "hooks/Cargo.toml",
                ])
                .arg("--target-dir")
                .arg(&target)
                .output()
                .map_err(|e| format!("cannot run cargo to build the hooks: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "building the hooks failed (is the wasm32-wasip2 target installed? `rustup target add \
                     wasm32-wasip2`):\n{}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            Ok(target.join("wasm32-wasip2").join("release"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))?;
    let path = dir.join(format!("{name}.wasm"));
    anyhow::ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}
