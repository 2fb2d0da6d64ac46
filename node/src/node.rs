//! Assembles a node: keyspaces, membership, engine, discovery, the gRPC server (Cache, Peer, health,
//! reflection on one port) and the admin HTTP server, and stops them in order.
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
    /// A bound admin listener to use instead of binding `config.admin`.
    pub admin_listener: Option<TcpListener>,
    /// A discovery backend to use instead of the configured one.
    pub discovery: Option<Box<dyn Discovery>>,
}

impl NodeOptions {
    /// Options with the configured listeners and discovery, and no hook runtime.
    pub fn new(config: NodeConfig) -> Self {
        Self { config, sources: None, grpc_listener: None, admin_listener: None, discovery: None }
    }
}

/// A started node.
pub struct RunningNode {
    /// Member name.
    pub name: String,
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
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
pub async fn start(opts: NodeOptions) -> Result<RunningNode, StartError> {
    let NodeOptions { config, sources, grpc_listener, admin_listener, discovery } = opts;
    // Before anything is bound or loaded: a bad setting is a start error, not a node that runs alone.
    let discovery = match discovery {
        Some(given) => given,
        None => discovery_from(&config.discovery)?,
    };
    let grpc = bind(grpc_listener, config.listen, "gRPC").await?;
    let admin_l = bind(admin_listener, config.admin, "admin HTTP").await?;
    let grpc_addr =
        grpc.local_addr().map_err(|source| StartError::Bind { what: "gRPC", addr: config.listen, source })?;
    let admin_addr = admin_l.local_addr().map_err(|source| StartError::Bind {
        what: "admin HTTP",
        addr: config.admin,
        source,
    })?;
    let name = config.member_name();
    let advertise = config.advertise_address(grpc_addr);
    let max_message = usize::try_from(config.max_message_bytes.bytes()).unwrap_or(usize::MAX);

    let metrics = Arc::new(Metrics::new());
    let hooks: Arc<dyn SourceFactory> =
        HookRuntime::new(HookSettings::from_config(&config.hooks), Arc::clone(&metrics))?;
    let sources = match sources {
        Some(first) => Arc::new(Layered { first, then: hooks }),
        None => hooks,
    };
    let keyspaces = Arc::new(Keyspaces::new(sources, Arc::clone(&metrics)));
    let retry_pending = load_initial_keyspaces(&keyspaces, &config, &metrics).await?;
    let membership = Arc::new(Membership::new(Member::new(name.clone(), advertise.clone())));
    let transport: Arc<dyn PeerTransport> =
        Arc::new(GrpcPeers::new(membership.local(), config.peer_timeout.get(), max_message));
    let engine = Engine::new(
        Arc::clone(&keyspaces),
        Arc::clone(&membership),
        Arc::clone(&transport),
        Arc::clone(&metrics),
    );
    metrics.members.set(1);

    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let discovery_status = Arc::new(DiscoveryStatus::new(metrics.discovery_errors.clone()));
    let admin_state = Arc::new(AdminState {
        engine: Arc::clone(&engine),
        discovery: discovery.name(),
        discovery_status: Arc::clone(&discovery_status),
        keyspaces_loaded: true.into(),
        stopping: false.into(),
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
    tasks.push(spawn_membership(Arc::clone(&engine), health.clone(), updates_rx));
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

    tasks.push(spawn_grpc(grpc, health_service, &engine, advertise.clone(), max_message, shutdown.clone())?);

    let admin_shutdown = shutdown.clone();
    let router = admin::router(Arc::clone(&admin_state));
    tasks.push(tokio::spawn(async move {
        let serve = axum::serve(admin_l, router)
            .with_graceful_shutdown(async move { admin_shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin server failed");
        }
    }));
    tracing::info!(name = %name, grpc = %grpc_addr, advertise = %advertise, admin = %admin_addr, "node started");
    Ok(RunningNode {
        name,
        grpc_addr,
        admin_addr,
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

/// Applies each member set from discovery to the engine; the first one makes the node ready (gRPC health
/// SERVING, `/readyz` 200).
fn spawn_membership(
    engine: Arc<Engine>,
    health: tonic_health::server::HealthReporter,
    mut updates: tokio::sync::mpsc::Receiver<Vec<Member>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(members) = updates.recv().await {
            let first = !engine.membership().is_known();
            engine.set_members(&members);
            if first {
                health.set_serving::<CacheServer<CacheService>>().await;
                health.set_service_status("", tonic_health::ServingStatus::Serving).await;
                tracing::info!(members = engine.membership().ring().len(), "membership known; node is ready");
            }
        }
    })
}

/// Serves Cache, Peer, health and reflection on one port until `shutdown`.
fn spawn_grpc(
    grpc: TcpListener,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    engine: &Arc<Engine>,
    advertise: String,
    max_message: usize,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, StartError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distcache_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let cache = CacheServer::new(CacheService::new(Arc::clone(engine)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let peer = PeerServer::new(PeerService::new(Arc::clone(engine), advertise))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(cache)
        .add_service(peer)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await });
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }))
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

    /// Stops the node: reports not ready, keeps serving for the configured shutdown delay, stops discovery and
    /// the servers, lets in-flight requests finish for at most the configured grace period.
    pub async fn stop(self) {
        self.admin.stopping.store(true, Ordering::Release);
        // Clients and load balancers that watch gRPC health stop sending before the listener closes.
        self.health.set_not_serving::<CacheServer<CacheService>>().await;
        self.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        // Lame duck: keep serving while peers and load balancers notice (a pod watch, endpoint updates).
        if !self.delay.is_zero() {
            tracing::info!(delay = ?self.delay, "not ready; still serving during the shutdown delay");
            tokio::time::sleep(self.delay).await;
        }
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
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
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
