//! A single node: the only member is itself.

use async_trait::async_trait;

use super::{Discovery, DiscoveryContext};

/// Discovery for a one-node deployment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Standalone;

#[async_trait]
impl Discovery for Standalone {
    fn name(&self) -> &'static str {
        "standalone"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        // The receiver only disappears when the node stops.
        let _ = ctx.updates.send(Vec::new()).await;
        ctx.shutdown.cancelled().await;
    }
}
