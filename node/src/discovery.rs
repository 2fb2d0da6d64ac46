//! Peer discovery: one trait, one file per backend. A backend reports the complete set of *other* live members
//! each time it changes; the engine never knows which backend runs.

mod standalone;
mod static_list;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use standalone::Standalone;
pub use static_list::{StaticList, StaticListSettings};

use crate::{peer::PeerTransport, ring::Member};

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
}

/// A membership source.
#[async_trait]
pub trait Discovery: Send + 'static {
    /// Short backend name for logs and `/admin/peers`.
    fn name(&self) -> &'static str;

    /// Runs until `ctx.shutdown`, sending the member set once it is known and after every change.
    async fn run(self: Box<Self>, ctx: DiscoveryContext);
}
