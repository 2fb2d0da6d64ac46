//! Operator metrics (Prometheus text on `/metrics`) and the HTTP endpoint that serves them with `/healthz` and
//! `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ResultLabel, Counter>,
    errors: Family<ReasonLabel, Counter>,
    duration: Histogram,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciliations = Family::<ResultLabel, Counter>::default();
        let errors = Family::<ReasonLabel, Counter>::default();
        let duration = Histogram::new((0..14).map(|i| 0.001 * f64::from(1u32 << i)));
        registry.register(
            "distcache_operator_reconciliations",
            "Reconciliations of DistCache resources by result (ok, invalid, error)",
            reconciliations.clone(),
        );
        registry.register(
            "distcache_operator_reconcile_errors",
            "Failed reconciliations by reason (ApplyFailed, StatusFailed, ...)",
            errors.clone(),
        );
        registry.register(
            "distcache_operator_reconcile_duration_seconds",
            "Duration of successful and invalid-spec reconciliations",
            duration.clone(),
        );
        Self { registry, reconciliations, errors, duration, ready: AtomicBool::new(false) }
    }
}

/// Observes a reconcile's duration when dropped.
pub struct Timer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a finished reconcile.
    pub fn reconciled(&self, result: &str) {
        self.reconciliations.get_or_create(&ResultLabel { result: result.to_owned() }).inc();
    }

    /// Counts a failed reconcile by reason.
    pub fn error(&self, reason: &str) {
        self.errors.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Starts timing a reconcile.
    pub fn reconcile_timer(&self) -> Timer<'_> {
        Timer { metrics: self, start: Instant::now() }
    }

    /// Marks the operator ready (`/readyz` 200): the CRD is served and the controller runs.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render())
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for the DistCache CRD to be served\n")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds the metrics address (a clear error names the address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
