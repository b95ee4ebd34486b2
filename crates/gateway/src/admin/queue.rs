//! `GET /api/queue`: the admission queues as JSON. The queue itself ([`crate::proxy::admission`]) knows
//! no HTTP; this view renders its [`QueueStats`] and each worker's in-flight count.

use crate::proxy::admission::QueueStats;
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// One model's queue as JSON: `{"length","by_class":{"urgent","high","normal","low"},"batch_waiting",
/// "oldest_wait_ms","avg_wait_ms_1h","dispatch_rate"}`.
fn model_json(q: &QueueStats) -> Value {
    let [urgent, high, normal, low] = q.by_class;
    json!({
        "length": q.length,
        "by_class": {"urgent": urgent, "high": high, "normal": normal, "low": low},
        "batch_waiting": q.batch_waiting,
        "oldest_wait_ms": q.oldest_wait.map(|d| d.as_millis() as u64),
        "avg_wait_ms_1h": q.avg_wait_1h.map(|d| d.as_millis() as u64),
        "dispatch_rate": q.dispatch_rate,
    })
}

/// The body of `GET /api/queue`: `{"models": {model: ...}}` for the models queued so far, and
/// `"in_flight"` per worker name.
pub fn queue_json(app: &AppState) -> Value {
    let snap = app.snapshot.load();
    let in_flight: Map<String, Value> =
        snap.fleet.workers.iter().map(|w| (w.name.clone(), json!(w.stats.slots.in_flight()))).collect();
    let models: Map<String, Value> =
        app.admission.stats().iter().map(|q| (q.model.to_string(), model_json(q))).collect();
    json!({"models": models, "in_flight": in_flight})
}

/// `GET /api/queue`.
pub async fn endpoint(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(queue_json(&app))
}
