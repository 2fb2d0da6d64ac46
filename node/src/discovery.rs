//! Peer discovery: one trait, one file per backend. A backend reports the complete set of *other* live members
//! each time it changes; the engine never knows which backend runs.

mod dns;
mod kubernetes;
mod nats;
mod standalone;
mod static_list;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use dns::{Dns, DnsSettings};
pub use kubernetes::{Kubernetes, KubernetesSettings};
pub use nats::{Nats, NatsSettings};
pub use standalone::Standalone;
pub use static_list::{StaticList, StaticListSettings};

use crate::{peer::PeerTransport, ring::Member};

/// What a backend reports about its own health, for `/readyz`, `/admin/peers`, logs and
/// `distcache_discovery_errors_total`: a backend that cannot reach its source (the API server, NATS, DNS) says
/// so here instead of failing silently; the last known members keep serving meanwhile.
#[derive(Debug)]
pub struct DiscoveryStatus {
    problem: parking_lot::Mutex<Option<String>>,
    errors: prometheus_client::metrics::counter::Counter,
}

impl DiscoveryStatus {
    /// A status counting errors on `errors`.
    pub fn new(errors: prometheus_client::metrics::counter::Counter) -> Self {
        Self { problem: parking_lot::Mutex::new(None), errors }
    }

    /// Records a problem (logged once per distinct message, counted every time).
    pub fn problem(&self, message: impl Into<String>) {
        let message = message.into();
        self.errors.inc();
        let mut current = self.problem.lock();
        if current.as_deref() != Some(message.as_str()) {
            tracing::warn!(problem = %message, "discovery problem; the last known members keep serving");
            *current = Some(message);
        }
    }

    /// The source is reachable again.
    pub fn healthy(&self) {
        if let Some(was) = self.problem.lock().take() {
            tracing::info!(was = %was, "discovery recovered");
        }
    }

    /// The current problem, if any.
    pub fn current(&self) -> Option<String> {
        self.problem.lock().clone()
    }
}

/// What a backend needs to run.
pub struct DiscoveryContext {
    /// This node.
    pub local: Member,
    /// Where to send each new member set (the other members only).
    pub updates: mpsc::Sender<Vec<Member>>,
    /// Cancelled when the node stops.
    pub shutdown: CancellationToken,
    /// Calls on peers (health checks).
    pub transport: Arc<dyn PeerTransport>,
    /// Where the backend reports problems with its source.
    pub status: Arc<DiscoveryStatus>,
}

/// A membership source.
#[async_trait]
pub trait Discovery: Send + 'static {
    /// Short backend name for logs and `/admin/peers`.
    fn name(&self) -> &'static str;

    /// Runs until `ctx.shutdown`, sending the member set once it is known and after every change.
    async fn run(self: Box<Self>, ctx: DiscoveryContext);
}
