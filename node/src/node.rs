//! Assembles a node: keyspaces, membership, engine, discovery, TLS, the client gRPC server (Cache, health,
//! reflection), the peer gRPC server (Peer, on its own port) and the admin HTTP server, and stops them in order.
//!
//! Listeners can be passed in already bound (tests bind port 0 and learn the address before configuring peers);
//! the node runs until its [`RunningNode::shutdown`] token is cancelled.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use distcache_proto::v1::{cache_server::CacheServer, peer_server::PeerServer};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    config::{DiscoveryConfig, DiscoveryError, NodeConfig},
    discovery::{
        Discovery, DiscoveryContext, DiscoveryStatus, Dns, DnsSettings, Kubernetes, KubernetesSettings, Nats,
        NatsSettings, Standalone, StaticList, StaticListSettings,
    },
    engine::Engine,
    hooks::{HookRuntime, HookSettings},
    keyspace::{Keyspaces, watch_file},
    membership::Membership,
    metrics::Metrics,
    peer::{PeerTransport, grpc::GrpcPeers},
    ring::Member,
    server::{CacheService, PeerService},
    source::{Layered, SourceFactory},
};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("failed to bind {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initial keyspaces are invalid (a running node refuses bad reloads instead).
    #[error(transparent)]
    Keyspaces(#[from] crate::keyspace::LoadError),
    /// The hook runtime could not be created.
    #[error(transparent)]
    Hooks(#[from] crate::hooks::runtime::BuildError),
    /// The configured discovery backend is unusable (a config built in code skips the checks of loading).
    #[error("invalid discovery configuration: {0}")]
    Discovery(#[from] DiscoveryError),
    /// The reflection service could not be built.
    #[error("failed to build the gRPC reflection service: {0}")]
    Reflection(String),
    /// The TLS material is unusable.
    #[error("tls: {0}")]
    Tls(#[from] distcache_tls::LoadError),
    /// The RESP front end's settings are unusable (an unreadable password file).
    #[error("{0}")]
    Resp(String),
}

/// How to start a node.
pub struct NodeOptions {
    /// Configuration.
    pub config: NodeConfig,
    /// Data sources consulted before the hook runtime: a keyspace it builds a source for uses that source,
    /// every other keyspace gets its hook (or none). For tests and embedders.
    pub sources: Option<Arc<dyn SourceFactory>>,
    /// A bound gRPC listener to use instead of binding `config.listen`.
    pub grpc_listener: Option<TcpListener>,
    /// A bound peer listener to use instead of binding `config.peer_listen`.
    pub peer_listener: Option<TcpListener>,
    /// A bound admin listener to use instead of binding `config.admin`.
    pub admin_listener: Option<TcpListener>,
    /// A discovery backend to use instead of the configured one.
    pub discovery: Option<Box<dyn Discovery>>,
}

impl NodeOptions {
    /// Options with the configured listeners and discovery, and no hook runtime.
    pub fn new(config: NodeConfig) -> Self {
        Self {
            config,
            sources: None,
            grpc_listener: None,
            peer_listener: None,
            admin_listener: None,
            discovery: None,
        }
    }
}

/// A started node.
pub struct RunningNode {
    /// Member name.
    pub name: String,
    /// Bound client gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound peer gRPC address.
    pub peer_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound RESP address, when the front end is on.
    pub resp_addr: Option<SocketAddr>,
    /// Address peers dial.
    pub advertise: String,
    engine: Arc<Engine>,
    admin: Arc<AdminState>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
    grace: Duration,
    delay: Duration,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(
    given: Option<TcpListener>,
    addr: SocketAddr,
    what: &'static str,
) -> Result<TcpListener, StartError> {
    match given {
        Some(l) => Ok(l),
        None => TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source }),
    }
}

/// The node's three listeners, bound.
struct Listeners {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    peer: TcpListener,
    peer_addr: SocketAddr,
    admin: TcpListener,
    admin_addr: SocketAddr,
}

impl Listeners {
    async fn bind(
        config: &NodeConfig,
        grpc: Option<TcpListener>,
        peer: Option<TcpListener>,
        admin: Option<TcpListener>,
    ) -> Result<Self, StartError> {
        let grpc = bind(grpc, config.listen, "client gRPC").await?;
        let peer = bind(peer, config.peer_listen, "peer gRPC").await?;
        let admin = bind(admin, config.admin.listen, "admin HTTP").await?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr().map_err(|source| StartError::Bind { what, addr, source })
        };
        Ok(Self {
            grpc_addr: local(&grpc, "client gRPC", config.listen)?,
            peer_addr: local(&peer, "peer gRPC", config.peer_listen)?,
            admin_addr: local(&admin, "admin HTTP", config.admin.listen)?,
            grpc,
            peer,
            admin,
        })
    }
}

/// The configured backend; an invalid setting is an error, never a fallback to standalone (a node that silently
/// runs alone serves its own copy of every key).
fn discovery_from(config: &DiscoveryConfig) -> Result<Box<dyn Discovery>, DiscoveryError> {
    config.validate()?;
    Ok(match config.clone() {
        DiscoveryConfig::Static(s) => Box::new(StaticList::new(
            s.peers,
            StaticListSettings {
                interval: s.probe_interval.get(),
                timeout: s.probe_interval.get().mul_f64(0.8),
                failure_threshold: s.failure_threshold.max(1),
            },
        )),
        DiscoveryConfig::Standalone => Box::new(Standalone),
        DiscoveryConfig::Kubernetes(k) => Box::new(Kubernetes::new(KubernetesSettings {
            namespace: k.namespace,
            label_selector: k.label_selector,
            port_name: k.port_name,
        })),
        DiscoveryConfig::Dns(d) => Box::new(Dns::new(DnsSettings {
            name: d.name,
            port: d.port,
            interval: d.interval.get(),
            nameservers: d.nameservers,
            probes: StaticListSettings {
                interval: d.probe_interval.get(),
                timeout: d.probe_interval.get().mul_f64(0.8),
                failure_threshold: d.failure_threshold.max(1),
            },
        })),
        DiscoveryConfig::Nats(n) => Box::new(Nats::new(NatsSettings {
            url: n.url,
            subject: n.subject,
            heartbeat: n.heartbeat.get(),
            missed_heartbeats: n.missed_heartbeats.max(1),
        })),
    })
}

/// Starts a node.
#[allow(
    clippy::too_many_lines,
    reason = "the start sequence reads top to bottom; its steps are functions already"
)]
pub async fn start(opts: NodeOptions) -> Result<RunningNode, StartError> {
    let NodeOptions { config, sources, grpc_listener, peer_listener, admin_listener, discovery } = opts;
    // Before anything is bound or loaded: a bad setting is a start error, not a node that runs alone.
    let discovery = match discovery {
        Some(given) => given,
        None => discovery_from(&config.discovery)?,
    };
    // Bad TLS material is a start error; once running, bad material is refused and the last good one serves.
    let tls = match config.tls.clone() {
        Some(settings) => Some(Arc::new(distcache_tls::Tls::load(settings)?)),
        None => None,
    };
    let Listeners { grpc, grpc_addr, peer, peer_addr, admin: admin_l, admin_addr } =
        Listeners::bind(&config, grpc_listener, peer_listener, admin_listener).await?;
    let resp = match &config.resp {
        Some(settings) => {
            let server = crate::resp::RespServer::bind(settings, None).await?;
            let addr = server.local_addr().map_err(|source| StartError::Bind {
                what: "RESP",
                addr: settings.listen,
                source,
            })?;
            Some((server, addr))
        }
        None => None,
    };
    let name = config.member_name();
    let advertise = config.advertise_address(peer_addr);
    let max_message = usize::try_from(config.max_message_bytes.bytes()).unwrap_or(usize::MAX);

    let metrics = Arc::new(Metrics::with_tls(tls.is_some()));
    let hooks: Arc<dyn SourceFactory> =
        HookRuntime::new(HookSettings::from_config(&config.hooks), Arc::clone(&metrics))?;
    let sources = match sources {
        Some(first) => Arc::new(Layered { first, then: hooks }),
        None => hooks,
    };
    let keyspaces = Arc::new(Keyspaces::new(sources, Arc::clone(&metrics)));
    let retry_pending = load_initial_keyspaces(&keyspaces, &config, &metrics).await?;
    let membership = Arc::new(Membership::new(Member::new(name.clone(), advertise.clone())));
    let peers = GrpcPeers::with_tls(membership.local(), config.peer_timeout.get(), max_message, tls.clone());
    let transport: Arc<dyn PeerTransport> = Arc::new(peers);
    let handoff = crate::engine::HandoffSettings {
        timeout: config.handoff.timeout.get(),
        grace: config.handoff.grace.get(),
        // Well under the largest message a peer accepts.
        batch_bytes: (max_message / 4).clamp(64 << 10, 4 << 20),
    };
    let engine = Engine::with_handoff(
        Arc::clone(&keyspaces),
        Arc::clone(&membership),
        Arc::clone(&transport),
        Arc::clone(&metrics),
        handoff,
    );
    metrics.members.set(1);

    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    {
        // Every keyspaces set applied (a reload) starts the warm-ups again (a no-op before the node settled).
        let (engine, stop) = (Arc::clone(&engine), shutdown.clone());
        let mut applied = keyspaces.subscribe_applied();
        tasks.push(tokio::spawn(async move {
            applied.borrow_and_update();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = applied.changed() => if changed.is_err() { return },
                }
                engine.warm_up_all();
            }
        }));
    }
    let discovery_status = Arc::new(DiscoveryStatus::new(metrics.discovery_errors.clone()));
    let admin_state = Arc::new(AdminState {
        engine: Arc::clone(&engine),
        discovery: discovery.name(),
        discovery_status: Arc::clone(&discovery_status),
        keyspaces_loaded: true.into(),
        settled: false.into(),
        stopping: false.into(),
        tls: tls.clone(),
    });

    // Discovery → engine.
    let (updates_tx, updates_rx) = tokio::sync::mpsc::channel::<Vec<Member>>(16);
    let ctx = DiscoveryContext {
        local: membership.local().clone(),
        updates: updates_tx,
        shutdown: shutdown.clone(),
        transport: Arc::clone(&transport),
        status: discovery_status,
    };
    tracing::info!(name = %name, discovery = discovery.name(), "starting discovery");
    tasks.push(tokio::spawn(discovery.run(ctx)));
    // NOT_SERVING until the first member set arrives; set before the task that flips it starts.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<CacheServer<CacheService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    tasks.push(spawn_membership(Arc::clone(&engine), Arc::clone(&admin_state), health.clone(), updates_rx));
    if let Some(file) = config.keyspaces_file.clone() {
        tasks.push(tokio::spawn(watch_file(
            Arc::clone(&keyspaces),
            Arc::clone(&metrics),
            file,
            config.keyspaces_poll_interval.get(),
            retry_pending,
            shutdown.clone(),
        )));
    }

    let poll = config.keyspaces_poll_interval.get();
    tasks.extend(
        tls.clone().map(|t| tokio::spawn(watch_tls(t, Arc::clone(&metrics), poll, shutdown.clone()))),
    );

    tasks.push(spawn_client_grpc(grpc, health_service, &engine, max_message, tls.clone(), shutdown.clone())?);
    tasks.push(spawn_peer_grpc(peer, &engine, advertise.clone(), max_message, tls.clone(), shutdown.clone()));

    let (admin_tls, router) =
        (tls.clone().filter(|_| config.admin.tls), admin::router(Arc::clone(&admin_state)));
    tasks.push(spawn_admin(admin_l, admin_addr, router, admin_tls, shutdown.clone()));
    let resp_addr = match resp {
        Some((server, addr)) => {
            tasks.push(tokio::spawn(server.run(Arc::clone(&engine), shutdown.clone())));
            Some(addr)
        }
        None => None,
    };
    tracing::info!(name = %name, grpc = %grpc_addr, peer = %peer_addr, advertise = %advertise, admin = %admin_addr,
        resp = ?resp_addr, tls = tls.is_some(), "node started");
    Ok(RunningNode {
        name,
        grpc_addr,
        peer_addr,
        admin_addr,
        resp_addr,
        advertise,
        engine,
        admin: admin_state,
        health,
        shutdown,
        grace: config.shutdown_grace.get(),
        delay: config.shutdown_delay.get(),
        tasks,
    })
}

/// The first load of the keyspaces file. An invalid file stops the start; a keyspace whose hook module is not
/// there yet is left out (and retried: the result says so) so the node still serves every other keyspace.
async fn load_initial_keyspaces(
    keyspaces: &Keyspaces,
    config: &NodeConfig,
    metrics: &Metrics,
) -> Result<bool, StartError> {
    let Some(file) = &config.keyspaces_file else {
        return Ok(false);
    };
    match keyspaces.load_file_initial(file).await? {
        None => {
            metrics.reload("applied");
            Ok(false)
        }
        Some(e) => {
            tracing::warn!(error = %e, "started without the keyspaces whose data source cannot be built yet; retrying");
            Ok(true)
        }
    }
}

/// How long a node that knows its members waits for all of them to answer before it reports ready anyway.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(10);

/// Applies each member set from discovery to the engine. The node becomes ready (gRPC health SERVING,
/// `/readyz` 200) once the first set is applied and every member in it answered a ping, or after
/// [`SETTLE_WINDOW`]: nodes started together take traffic only with the ring they share, not each alone.
fn spawn_membership(
    engine: Arc<Engine>,
    admin: Arc<AdminState>,
    health: tonic_health::server::HealthReporter,
    mut updates: tokio::sync::mpsc::Receiver<Vec<Member>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut expiry = tokio::time::interval(Duration::from_secs(5));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut settling: Option<JoinHandle<()>> = None;
        loop {
            let members = tokio::select! {
                m = updates.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = expiry.tick() => {
                    engine.expire_departed().await;
                    continue;
                }
            };
            let first = !engine.membership().is_known();
            engine.set_members(&members).await;
            if first {
                let (engine, admin, health) = (Arc::clone(&engine), Arc::clone(&admin), health.clone());
                settling = Some(tokio::spawn(async move {
                    settle(&engine).await;
                    admin.settled.store(true, Ordering::Release);
                    engine.start_warm_ups();
                    health.set_serving::<CacheServer<CacheService>>().await;
                    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
                    tracing::info!(
                        members = engine.membership().ring().len(),
                        "membership known; node is ready"
                    );
                }));
            }
        }
        if let Some(s) = settling {
            s.abort();
        }
    })
}

/// Waits until every other member answers a ping, or [`SETTLE_WINDOW`].
async fn settle(engine: &Engine) {
    let deadline = tokio::time::Instant::now() + SETTLE_WINDOW;
    loop {
        let ring = engine.membership().ring();
        let local = engine.membership().local().name.clone();
        let pings = ring
            .members()
            .iter()
            .filter(|m| m.name != local)
            .map(|m| async move { engine.transport().ping(&m.address).await.is_ok() });
        let silent = futures::future::join_all(pings).await.into_iter().filter(|ok| !ok).count();
        if silent == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(silent, window = ?SETTLE_WINDOW, "members still silent after the settle window; ready anyway");
            return;
        }
        tracing::debug!(silent, "waiting for the members to answer before reporting ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Re-reads the TLS files every `interval` (as the keyspaces file is watched): new material that passes the
/// checks is used for new connections, anything else is refused and reported; the expiry gauge follows the
/// material in use.
async fn watch_tls(
    tls: Arc<distcache_tls::Tls>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    metrics.tls_cert_expiry_seconds.set(tls.current().material.seconds_left());
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let check = Arc::clone(&tls);
        let outcome = match tokio::task::spawn_blocking(move || check.reload()).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "TLS reload check failed");
                continue;
            }
        };
        match outcome {
            distcache_tls::Reload::Unchanged => {}
            distcache_tls::Reload::Applied => {
                let id = &tls.current().material.identity;
                metrics.tls_reload("applied");
                tracing::info!(serial = %id.serial, sans = ?id.sans, "TLS material reloaded; new connections use it");
            }
            distcache_tls::Reload::Refused(error) => {
                metrics.tls_reload("refused");
                tracing::warn!(%error, "TLS material refused; the previous certificate keeps serving");
            }
        }
        metrics.tls_cert_expiry_seconds.set(tls.current().material.seconds_left());
    }
}

/// Which server config of the current material a listener uses.
type PickConfig = fn(&distcache_tls::Configs) -> Arc<rustls::ServerConfig>;

/// Serves a gRPC router on `listener` until `shutdown`: plain, or TLS with the config `pick` takes from the
/// current material (so reloaded material applies to new connections).
fn serve_grpc(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<(Arc<distcache_tls::Tls>, PickConfig)>,
    port: &'static str,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let signal = async move { shutdown.cancelled().await };
        let served = match tls {
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            Some((tls, pick)) => {
                let accepted = distcache_tls::accept_loop(listener, move || pick(&tls.current()), port);
                router.serve_with_incoming_shutdown(distcache_tls::incoming(accepted), signal).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, port, "gRPC server failed");
        }
    })
}

/// Serves Cache, health and reflection on the client port until `shutdown`. A Peer call there gets
/// UNIMPLEMENTED: the Peer service exists only on the peer port.
fn spawn_client_grpc(
    grpc: TcpListener,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    engine: &Arc<Engine>,
    max_message: usize,
    tls: Option<Arc<distcache_tls::Tls>>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, StartError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distcache_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // Only what this port serves: the descriptor set also holds the Peer service, which lives on the peer port.
        .with_service_name("distcache.v1.Cache")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let cache = CacheServer::new(CacheService::new(Arc::clone(engine)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(cache);
    let tls = tls.map(|t| (t, (|c: &distcache_tls::Configs| Arc::clone(&c.client_port)) as PickConfig));
    Ok(serve_grpc(router, grpc, tls, "client", shutdown))
}

/// Serves the Peer service on the peer port until `shutdown` (mutual TLS with peer identities when `tls`).
fn spawn_peer_grpc(
    peer: TcpListener,
    engine: &Arc<Engine>,
    advertise: String,
    max_message: usize,
    tls: Option<Arc<distcache_tls::Tls>>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let service = PeerServer::new(PeerService::new(Arc::clone(engine), advertise))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service);
    let tls = tls.map(|t| (t, (|c: &distcache_tls::Configs| Arc::clone(&c.peer_server)) as PickConfig));
    serve_grpc(router, peer, tls, "peer", shutdown)
}

/// Accepted TLS connections as an axum listener.
struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<distcache_tls::TlsConn>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = distcache_tls::TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(conn) => {
                let remote = conn.info().remote.unwrap_or(self.local);
                (conn, remote)
            }
            // The accept loop ends only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves the admin router (plain, or HTTPS with the node's certificate) until `shutdown`.
fn spawn_admin(
    listener: TcpListener,
    local: SocketAddr,
    router: axum::Router,
    tls: Option<Arc<distcache_tls::Tls>>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let signal = async move { shutdown.cancelled().await };
        let served = match tls {
            None => axum::serve(listener, router).with_graceful_shutdown(signal).await,
            Some(tls) => {
                let accepted = distcache_tls::accept_loop(
                    listener,
                    move || Arc::clone(&tls.current().admin_port),
                    "admin",
                );
                axum::serve(TlsListener { accepted, local }, router).with_graceful_shutdown(signal).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    })
}

impl RunningNode {
    /// The engine (for in-process tests and embedding).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// True when `/readyz` would answer 200.
    pub fn is_ready(&self) -> bool {
        self.admin.not_ready_reason().is_none()
    }

    /// A token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The admin state (readiness flags).
    pub fn admin(&self) -> &Arc<AdminState> {
        &self.admin
    }

    /// Waits until the node stopped (its token was cancelled and the servers drained).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Stops the node: reports not ready, leaves the cluster (its entries go to their next owners, within the
    /// handoff budget) while it keeps serving for the configured shutdown delay, then stops discovery and the
    /// servers and lets in-flight requests finish for at most the configured grace period.
    pub async fn stop(self) {
        self.admin.stopping.store(true, Ordering::Release);
        // Clients and load balancers that watch gRPC health stop sending before the listener closes.
        self.health.set_not_serving::<CacheServer<CacheService>>().await;
        self.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let leave = async {
            let started = std::time::Instant::now();
            let moved = self.engine.leave().await;
            tracing::info!(entries = moved, took = ?started.elapsed(), "handoff done");
        };
        // Lame duck: keep serving while peers and load balancers notice (a pod watch, endpoint updates).
        let delay = async {
            if !self.delay.is_zero() {
                tracing::info!(delay = ?self.delay, "not ready; still serving during the shutdown delay");
                tokio::time::sleep(self.delay).await;
            }
        };
        futures::future::join(leave, delay).await;
        self.shutdown.cancel();
        let grace = self.grace;
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "in-flight requests did not finish within the shutdown grace period");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NatsDiscovery;

    /// A config built in code skips `NodeConfig::load`'s checks; before the discovery setting was one enum, an
    /// unusable one (two backends, an empty NATS url) started a node that silently ran alone.
    #[tokio::test]
    async fn an_invalid_discovery_built_in_code_does_not_start_standalone() {
        let config = NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)).into(),
            discovery: DiscoveryConfig::Nats(NatsDiscovery {
                url: String::new(),
                subject: "distcache.test".into(),
                heartbeat: distcache_api::DurationString(Duration::from_secs(1)),
                missed_heartbeats: 3,
            }),
            ..NodeConfig::default()
        };
        match start(NodeOptions::new(config)).await {
            Err(StartError::Discovery(DiscoveryError::Invalid(message))) => {
                assert!(message.contains("discovery.nats"), "{message}");
            }
            Err(other) => panic!("failed for another reason: {other}"),
            Ok(node) => {
                let backend = node.admin.discovery;
                node.stop().await;
                panic!("started with discovery {backend}");
            }
        }
    }
}
