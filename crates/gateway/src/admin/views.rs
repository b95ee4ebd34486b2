//! The admin API's read-only JSON views, shared by `/api/*`, the dashboard's snapshot and the CLI
//! (which reads them over HTTP): status, workers, routing stats.

use crate::error::ApiError;
use crate::fleet::worker::Worker;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) async fn status(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(status_json(&app))
}

/// The body of `GET /api/status`. `qps` is over the last [`crate::dashboard::series::QPS_WINDOW`], from
/// the gateway's one sampler (started here if the server did not).
pub fn status_json(app: &Arc<AppState>) -> Value {
    crate::dashboard::ensure_sampler(app);
    let snap = app.snapshot.load();
    let workers = &snap.fleet.workers;
    let draining = workers.iter().filter(|w| w.stats.draining.load(Ordering::Relaxed)).count();
    let total = app.metrics.requests_total();
    let qps = app.sampler.qps(tokio::time::Instant::now(), total, app.started);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": app.started.elapsed().as_secs(),
        "strategy": snap.policy.name(),
        "workers": {"total": workers.len(), "healthy": snap.fleet.healthy_count(), "draining": draining},
        "requests": {"total": total, "active": app.metrics.active_requests.get()},
        "qps": round2(qps),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One worker as the admin API, the CLI and the dashboard show it; `default_concurrency` is
/// `queue.default_worker_concurrency`, the last tier of its capacity.
pub fn worker_json(w: &Worker, default_concurrency: u32) -> Value {
    let s = &w.stats;
    let (capacity, source) = w.capacity_tier(default_concurrency);
    json!({
        "id": w.id,
        "name": w.name,
        "url": w.spec.display_url(),
        "weight": w.spec.weight,
        "models": w.models.load().as_slice(),
        "max_concurrency": w.spec.max_concurrency,
        "healthy": s.healthy.load(Ordering::Relaxed),
        "draining": s.draining.load(Ordering::Relaxed),
        "in_flight": s.slots.in_flight(),
        "running": s.scraped_running.load(Ordering::Relaxed),
        "waiting": s.scraped_waiting.load(Ordering::Relaxed),
        "foreign_load": s.foreign_load.load(Ordering::Relaxed),
        "kv_usage": s.kv_usage.get(),
        "ttft_ms": round2(s.ttft_ms.get()),
        "tpot_ms": round2(s.tpot_ms.get()),
        "error_rate": s.error_rate.get(),
        "requests_total": s.requests_total.load(Ordering::Relaxed),
        "probe_path": w.probe_path.load().describe(),
        "metrics_dialect": w.dialect().as_str(),
        // Unlimited is shown as null: no number is true of it.
        "capacity": (capacity != u32::MAX).then_some(capacity),
        "capacity_source": source.as_str(),
    })
}

pub(super) async fn list_workers(State(app): State<Arc<AppState>>) -> Json<Value> {
    let snap = app.snapshot.load();
    let default = snap.config.queue.default_worker_concurrency;
    Json(Value::Array(snap.fleet.workers.iter().map(|w| worker_json(w, default)).collect()))
}

pub(super) async fn one_worker(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let default = app.snapshot.load().config.queue.default_worker_concurrency;
    Ok(Json(worker_json(&*super::find(&app, &id)?, default)))
}

pub(super) async fn routing_stats(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(routing_stats_json(&app))
}

/// The body of `GET /api/routing/stats`: decisions per strategy and worker (from the routing-decisions
/// counter) and each worker's share under the strategy in force.
pub fn routing_stats_json(app: &AppState) -> Value {
    let snap = app.snapshot.load();
    let current = snap.policy.name();
    let decisions = app.metrics.routing_decisions_by_strategy();
    let mine = decisions.get(current).cloned().unwrap_or_default();
    let total: u64 = mine.values().sum();
    let mut names: Vec<String> = snap.fleet.workers.iter().map(|w| w.name.clone()).collect();
    names.extend(mine.keys().filter(|k| !snap.fleet.workers.iter().any(|w| &w.name == *k)).cloned());
    let workers: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let n = mine.get(&name).copied().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { n as f64 / total as f64 };
            json!({"name": name, "decisions": n, "share": (share * 1000.0).round() / 1000.0})
        })
        .collect();
    json!({"strategy": current, "decisions": decisions, "workers": workers})
}
