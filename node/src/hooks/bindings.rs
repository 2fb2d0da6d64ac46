//! Host bindings of the WIT world `distcache:hook/data-source`, generated from `proto/wit`, and the host side
//! of its imports (`http`, `log`).

// The generated code is not ours to lint.
#![allow(clippy::pedantic, missing_docs, rust_2018_idioms)]

use super::instance::HostState;

wasmtime::component::bindgen!({
    path: "../proto/wit",
    world: "data-source",
    imports: { default: async },
    exports: { default: async },
});

pub use distcache::hook::http as wit_http;

impl distcache::hook::types::Host for HostState {}

impl distcache::hook::log::Host for HostState {
    async fn log(&mut self, level: distcache::hook::log::Level, message: String) {
        use distcache::hook::log::Level;
        // Bounded: a hook must not flood the node's log with megabyte lines.
        let message: String = message.chars().take(4096).collect();
        let keyspace = &*self.keyspace;
        match level {
            Level::Trace => tracing::trace!(target: "distcache::hook", keyspace, "{message}"),
            Level::Debug => tracing::debug!(target: "distcache::hook", keyspace, "{message}"),
            Level::Info => tracing::info!(target: "distcache::hook", keyspace, "{message}"),
            Level::Warn => tracing::warn!(target: "distcache::hook", keyspace, "{message}"),
            Level::Error => tracing::error!(target: "distcache::hook", keyspace, "{message}"),
        }
    }
}

impl distcache::hook::http::Host for HostState {
    async fn send(&mut self, request: wit_http::Request) -> Result<wit_http::Response, wit_http::Error> {
        let gate = std::sync::Arc::clone(&self.http);
        gate.send(request, self.deadline).await
    }
}
