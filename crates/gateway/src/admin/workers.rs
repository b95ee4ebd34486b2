//! Worker changes through the admin API: add, remove, drain, undrain. Adding and removing go through
//! [`crate::reload::update`] (validated, swapped whole); draining flips a flag on the live worker.

use super::{bad_request, find, parse_json, AdminAuth};
use crate::config::WorkerConfig;
use crate::error::ApiError;
use crate::reload;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use gateway_core::echo;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::views::worker_json;

pub(super) async fn add(_: AdminAuth, State(app): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let spec: WorkerConfig = serde_json::from_value(parse_json(&body)?)
        .map_err(|e| bad_request(format!("worker: {} (a worker needs at least \"url\")", echo(&e.to_string()))))?;
    let name = spec.display_name();
    let added = spec.clone();
    reload::update(&app, move |cur| {
        let mut next = cur.clone();
        next.workers.push(added);
        Ok(next)
    })
    .await
    .map_err(bad_request)?;
    let w = find(&app, &name)?;
    tracing::info!(worker = %w.name, url = %w.spec.display_url(), "worker added through the admin API");
    Ok((http::StatusCode::CREATED, Json(worker_json(&w, app.snapshot.load().config.queue.default_worker_concurrency)))
        .into_response())
}

pub(super) async fn remove(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let w = find(&app, &id)?;
    let spec = w.spec.clone();
    reload::update(&app, move |cur| {
        if !cur.workers.contains(&spec) {
            // Removing it here would not last: the next file read or DNS answer brings it back.
            return Err(format!(
                "worker {:?} was discovered (discovery.workers_file or a dns+http:// worker): change its source, or drain it",
                echo(&spec.display_name())
            ));
        }
        let mut next = cur.clone();
        next.workers.retain(|s| *s != spec);
        Ok(next)
    })
    .await
    .map_err(bad_request)?;
    tracing::info!(worker = %w.name, url = %w.spec.display_url(), "worker removed through the admin API");
    Ok(Json(worker_json(&w, app.snapshot.load().config.queue.default_worker_concurrency)))
}

pub(super) async fn drain(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&app, &id, true)
}

pub(super) async fn undrain(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&app, &id, false)
}

fn set_draining(app: &AppState, id: &str, on: bool) -> Result<Json<Value>, ApiError> {
    let w = find(app, id)?;
    let was = w.stats.draining.swap(on, Ordering::Relaxed);
    if was != on {
        let in_flight = w.stats.slots.in_flight();
        if on {
            tracing::info!(worker = %w.name, in_flight, "worker draining: no new requests");
        } else {
            tracing::info!(worker = %w.name, "worker undrained: takes new requests again");
        }
    }
    Ok(Json(worker_json(&w, app.snapshot.load().config.queue.default_worker_concurrency)))
}
