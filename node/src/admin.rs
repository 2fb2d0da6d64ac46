//! Admin HTTP on port 7421: `/healthz` (the process runs), `/readyz` (keyspaces loaded, membership known, not
//! stopping), `/metrics` (Prometheus text), `/admin/peers` and `/admin/keyspaces` (JSON).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

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
    /// Set when the node starts stopping (it then reports not ready so traffic drains).
    pub stopping: AtomicBool,
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
    match s.not_ready_reason() {
        // Ready with the last known members even when discovery has lost its source: taking every node out of
        // service because the API server or NATS blinked would be worse than a membership that lags.
        None => match s.discovery_status.current() {
            None => (StatusCode::OK, "ready\n").into_response(),
            Some(problem) => (
                StatusCode::OK,
                format!(
                    "ready (warning: discovery {}: {problem}; serving the last known members)\n",
                    s.discovery
                ),
            )
                .into_response(),
        },
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response(),
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

async fn peers(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let membership = s.engine.membership();
    let local = membership.local();
    let members: Vec<_> = membership
        .ring()
        .members()
        .iter()
        .map(|m| json!({ "name": m.name, "address": m.address, "local": m.name == local.name }))
        .collect();
    Json(json!({
        "local": { "name": local.name, "address": local.address },
        "discovery": s.discovery,
        "discoveryProblem": s.discovery_status.current(),
        "known": membership.is_known(),
        "members": members,
    }))
}

async fn keyspaces(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let ks = s.engine.keyspaces();
    let stats = s.engine.stats(None).unwrap_or_default();
    let list: Vec<_> = ks
        .all()
        .iter()
        .map(|rt| {
            let c = &rt.config;
            json!({
                "name": c.name,
                "maxBytes": c.max_bytes,
                "ttlMs": c.ttl.map(|d| d.as_millis()),
                "negativeTtlMs": c.negative_ttl.map(|d| d.as_millis()),
                "fetchTimeoutMs": c.fetch_timeout.as_millis(),
                "maxValueBytes": c.max_value_bytes,
                "readThrough": rt.source.is_some(),
                "hook": rt.source.as_ref().map(|s| s.describe()),
                "spec": c.spec,
                "stats": stats.iter().find(|st| st.name == c.name),
            })
        })
        .collect();
    let reload = ks.status();
    Json(json!({
        "file": reload.file,
        "appliedAt": reload.applied_at,
        "lastError": reload.last_error,
        "reloadsApplied": s.engine.metrics().reloads("applied"),
        "reloadsRefused": s.engine.metrics().reloads("refused"),
        "keyspaces": list,
    }))
}
