//! Admin HTTP on port 7421: `/healthz` (the process runs), `/readyz` (keyspaces loaded, membership known, not
//! stopping), `/metrics` (Prometheus text), `/admin/peers` and `/admin/keyspaces` (JSON: the report types of
//! `distcache-api`, which the operator reads with the same types).

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use distcache_api::{KeyspaceReport, KeyspacesReport, LocalNode, PeerReport, PeersReport};
use serde::Serialize;

use crate::engine::Engine;

/// What the admin endpoints read.
pub struct AdminState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Discovery backend name.
    pub discovery: &'static str,
    /// Problems of the discovery backend with its source.
    pub discovery_status: Arc<crate::discovery::DiscoveryStatus>,
    /// Set when the initial keyspaces were loaded.
    pub keyspaces_loaded: AtomicBool,
    /// Set once the members of the first view answered (or the settle window passed).
    pub settled: AtomicBool,
    /// Set when the node starts stopping (it then reports not ready so traffic drains).
    pub stopping: AtomicBool,
    /// The TLS material, when configured (its state and last reload are reported on `/readyz`).
    pub tls: Option<Arc<distcache_tls::Tls>>,
}

impl AdminState {
    /// One line on the TLS material in use and its last reload, for `/readyz`.
    pub fn tls_report(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let current = tls.current();
        let id = &current.material.identity;
        let days = current.material.expires_in() / 86_400.0;
        let mut line = format!(
            "tls: certificate serial {} ({}), expires in {days:.1} days",
            id.serial,
            id.sans.join(", ")
        );
        if let Some(r) = tls.last_reload() {
            let ago = r.at.elapsed().map_or(0, |d| d.as_secs());
            match r.error {
                None => {
                    let _ = write!(line, "; last reload applied {ago} s ago");
                }
                Some(e) => {
                    let _ = write!(
                        line,
                        "; last reload refused {ago} s ago, the certificate above keeps serving: {e}"
                    );
                }
            }
        }
        Some(line)
    }
}

impl AdminState {
    /// Why the node is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.stopping.load(Ordering::Acquire) {
            Some("node is shutting down".into())
        } else if !self.keyspaces_loaded.load(Ordering::Acquire) {
            Some("keyspaces not loaded yet".into())
        } else if !self.engine.membership().is_known() {
            Some(match self.discovery_status.current() {
                Some(problem) => format!("membership not known yet: discovery {}: {problem}", self.discovery),
                None => format!("membership not known yet (discovery {} has not reported)", self.discovery),
            })
        } else if !self.settled.load(Ordering::Acquire) {
            Some("waiting for the members it sees to answer before taking traffic (settle window)".into())
        } else {
            None
        }
    }
}

/// The admin router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/peers", get(peers))
        .route("/admin/keyspaces", get(keyspaces))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let (status, mut text) = readiness(&s);
    if let Some(tls) = s.tls_report() {
        text.push_str(&tls);
        text.push('\n');
    }
    (status, text).into_response()
}

fn readiness(s: &AdminState) -> (StatusCode, String) {
    match s.not_ready_reason() {
        // Ready with the last known members even when discovery has lost its source: taking every node out of
        // service because the API server or NATS blinked would be worse than a membership that lags.
        None => match s.discovery_status.current() {
            None => (StatusCode::OK, "ready\n".to_owned()),
            Some(problem) => (
                StatusCode::OK,
                format!(
                    "ready (warning: discovery {}: {problem}; serving the last known members)\n",
                    s.discovery
                ),
            ),
        },
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    s.engine.refresh_gauges();
    match s.engine.metrics().encode() {
        Ok(body) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
        }
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to encode metrics: {e}\n")).into_response()
        }
    }
}

/// Answers with a report as JSON. Through a `serde_json::Value`, whose objects keep their keys sorted: the bytes
/// these endpoints have always sent, whatever the order of the report's fields.
fn json_report(report: &impl Serialize) -> Response {
    match serde_json::to_value(report) {
        Ok(value) => Json(value).into_response(),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to encode the report: {e}\n")).into_response()
        }
    }
}

async fn peers(State(s): State<Arc<AdminState>>) -> Response {
    let membership = s.engine.membership();
    let local = membership.local();
    let members = membership
        .ring()
        .members()
        .iter()
        .map(|m| PeerReport { name: m.name.clone(), address: m.address.clone(), local: m.name == local.name })
        .collect();
    json_report(&PeersReport {
        local: LocalNode { name: local.name.clone(), address: local.address.clone() },
        discovery: s.discovery.to_owned(),
        discovery_problem: s.discovery_status.current(),
        known: membership.is_known(),
        members,
    })
}

/// Milliseconds of a duration, saturating (a keyspace's durations are far below 2^64 ms).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn keyspaces(State(s): State<Arc<AdminState>>) -> Response {
    let ks = s.engine.keyspaces();
    let stats = s.engine.stats(None).unwrap_or_default();
    let keyspaces = ks
        .all()
        .iter()
        .map(|rt| {
            let c = &rt.config;
            KeyspaceReport {
                name: c.name.clone(),
                max_bytes: c.max_bytes,
                ttl_ms: c.ttl.map(millis),
                negative_ttl_ms: c.negative_ttl.map(millis),
                fetch_timeout_ms: millis(c.fetch_timeout),
                max_value_bytes: c.max_value_bytes,
                read_through: rt.source.is_some(),
                // A source with nothing to say describes itself as null, which the report writes as null too.
                hook: rt.source.as_ref().map(|s| s.describe()).filter(|d| !d.is_null()),
                spec: c.spec.clone(),
                stats: stats.iter().find(|st| st.name == c.name).cloned(),
            }
        })
        .collect();
    let reload = ks.status();
    json_report(&KeyspacesReport {
        file: reload.file.map(|f| f.display().to_string()),
        applied_at: reload.applied_at,
        last_error: reload.last_error,
        reloads_applied: s.engine.metrics().reloads("applied"),
        reloads_refused: s.engine.metrics().reloads("refused"),
        keyspaces,
    })
}
