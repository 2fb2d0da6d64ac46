//! NATS discovery (being implemented).

use std::time::Duration;

use async_trait::async_trait;

use super::{Discovery, DiscoveryContext};

/// NATS discovery settings.
#[derive(Clone, Debug)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Subject prefix shared by the cluster.
    pub subject: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Missed heartbeats before a member leaves.
    pub missed_heartbeats: u32,
}

/// NATS discovery.
pub struct Nats {
    settings: NatsSettings,
}

impl Nats {
    /// A backend with these settings.
    pub fn new(settings: NatsSettings) -> Self {
        Self { settings }
    }
}

#[async_trait]
impl Discovery for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        ctx.status.problem(format!("NATS discovery ({}) is not implemented yet", self.settings.url));
        ctx.shutdown.cancelled().await;
    }
}
