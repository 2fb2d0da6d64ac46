//! Logs and traces of the node: [`distcache_telemetry`] set up from the node config's `log` and `tracing`.

pub use distcache_telemetry::*;

use crate::config::{LogConfig, LogFormat, TracingConfig};

/// Installs the node's subscriber and, with a collector, its trace exporter (see [`distcache_telemetry::init`]).
pub fn init_node(log: &LogConfig, tracing: &TracingConfig) -> anyhow::Result<Telemetry> {
    distcache_telemetry::init(&Settings {
        json: log.format == LogFormat::Json,
        level: log.level.clone(),
        otlp_endpoint: tracing.otlp_endpoint.clone(),
        sample_ratio: tracing.sample_ratio,
        record_keys: tracing.record_keys,
        service: "distcache-node".to_owned(),
    })
}
