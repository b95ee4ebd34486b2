//! Admin views of the circuit breakers: `GET /api/circuit-breaker/stats` and
//! `POST /api/circuit-breaker/{id}/reset` (a mutation: needs the admin token when one is set; with
//! `[cluster]` sharing through Redis, every replica closes that breaker).

use crate::admin::AdminAuth;
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway_core::{echo, ErrorKind, GatewayError};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::time::Instant;

/// Breaker routes, merged into the app by `server::app`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/api/circuit-breaker/stats", get(stats)).route("/api/circuit-breaker/{id}/reset", post(reset))
}

/// One worker's breaker as `/api/circuit-breaker/stats` lists it: the worker, whether breakers are on,
/// and the breaker ([`state_json`]).
pub fn breaker_json(w: &crate::fleet::worker::Worker, enabled: bool) -> Value {
    json!({"id": w.id, "worker": w.name, "url": w.spec.display_url(), "enabled": enabled, "breaker": state_json(w, enabled)})
}

/// One worker's breaker: state, counts, last transition, and `"enabled"` (whether breakers are on),
/// as the breaker list and the dashboard show it.
pub fn state_json(w: &crate::fleet::worker::Worker, enabled: bool) -> Value {
    let mut v = json!(w.breaker_snapshot(Instant::now()));
    if let Value::Object(m) = &mut v {
        m.insert("enabled".into(), Value::Bool(enabled));
    }
    v
}

async fn stats(State(app): State<Arc<AppState>>) -> Json<Value> {
    let snap = app.snapshot.load();
    let enabled = snap.config.circuit_breaker.enabled;
    Json(Value::Array(snap.fleet.workers.iter().map(|w| breaker_json(w, enabled)).collect()))
}

async fn reset(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let snap = app.snapshot.load();
    let w = snap
        .fleet
        .find(&id)
        .ok_or_else(|| ApiError(GatewayError::new(ErrorKind::NotFound, format!("no worker {:?}", echo(&id)))))?;
    let t = w.reset_breaker(Instant::now());
    app.metrics.count_transition(&w.name, t);
    tracing::info!(worker = %w.name, "circuit breaker reset by admin");
    // The other replicas close theirs too (`[cluster]` with Redis), and the opening they may still learn ends.
    app.cluster.breaker_reset(w).await;
    Ok(Json(breaker_json(w, snap.config.circuit_breaker.enabled)))
}
