//! `/v1/batches`: create, retrieve, list, cancel, with OpenAI's batch object; and the operators' view
//! `GET /api/batches` (every tenant's batches and the runner's pace).

use super::jsonl::ENDPOINTS;
use super::store::{status, unix_now, BatchRow};
use super::{bad_request, not_found, owner, page};
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The only completion window (as OpenAI).
pub const COMPLETION_WINDOW: &str = "24h";
/// Its length in seconds.
pub const WINDOW_SECS: i64 = 24 * 3600;
/// Metadata bounds (OpenAI's): pairs, key length, value length.
const MAX_METADATA: (usize, usize, usize) = (16, 64, 512);

/// The batches routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/batches", get(list).post(create))
        .route("/v1/batches/{id}", get(retrieve))
        .route("/v1/batches/{id}/cancel", post(cancel))
        .route("/api/batches", get(admin_list))
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    input_file_id: Option<Value>,
    endpoint: Option<Value>,
    completion_window: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
}

/// Checks OpenAI's metadata rules: null, or an object of at most 16 string pairs.
fn check_metadata(m: Option<Value>) -> Result<Value, ApiError> {
    let (pairs, key_len, value_len) = MAX_METADATA;
    match m {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::Object(map)) => {
            if map.len() > pairs {
                return Err(bad_request("metadata", format!("metadata has more than {pairs} keys")));
            }
            for (k, v) in &map {
                let ok = k.chars().count() <= key_len && v.as_str().is_some_and(|s| s.chars().count() <= value_len);
                if !ok {
                    return Err(bad_request(
                        "metadata",
                        format!("metadata keys must be at most {key_len} characters and values strings of at most {value_len}"),
                    ));
                }
            }
            Ok(Value::Object(map))
        }
        Some(_) => Err(bad_request("metadata", "metadata must be an object of strings")),
    }
}

/// `POST /v1/batches`.
async fn create(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let body: CreateBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError(GatewayError::new(ErrorKind::InvalidJson, format!("invalid JSON body: {e}"))))?;
    let Some(Value::String(input_file_id)) = body.input_file_id else {
        return Err(bad_request("input_file_id", "input_file_id is required"));
    };
    let endpoint = match body.endpoint {
        Some(Value::String(e)) if ENDPOINTS.contains(&e.as_str()) => e,
        _ => return Err(bad_request("endpoint", format!("endpoint must be one of {}", ENDPOINTS.join(", ")))),
    };
    match body.completion_window {
        Some(Value::String(w)) if w == COMPLETION_WINDOW => {}
        _ => return Err(bad_request("completion_window", "completion_window must be \"24h\"")),
    }
    let metadata = check_metadata(body.metadata)?;
    let wanted = input_file_id.clone();
    let who = owner.clone();
    let file = app
        .batch
        .db(move |s| s.file(&wanted, who.as_deref()))
        .await?
        .ok_or_else(|| not_found("file", &input_file_id))?;
    if file.purpose != "batch" {
        return Err(bad_request(
            "input_file_id",
            format!("file {} has purpose {:?}, not \"batch\"", file.id, file.purpose),
        ));
    }
    let now = unix_now();
    let row = BatchRow {
        id: format!("batch_{}", uuid::Uuid::new_v4().simple()),
        owner: owner.unwrap_or_default(),
        input_file_id,
        endpoint,
        completion_window: COMPLETION_WINDOW.into(),
        metadata,
        status: status::VALIDATING.into(),
        created_at: now,
        expires_at: now + WINDOW_SECS,
        ..BatchRow::default()
    };
    let stored = row.clone();
    app.batch.db(move |s| s.insert_batch(&stored)).await?;
    app.batch.wake.notify_one();
    tracing::info!(batch = %row.id, tenant = %row.owner, endpoint = %row.endpoint, "batch created");
    Ok(Json(row.to_json()))
}

/// `GET /v1/batches/{id}`.
async fn retrieve(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let wanted = id.clone();
    let row =
        app.batch.db(move |s| s.batch(&wanted, owner.as_deref())).await?.ok_or_else(|| not_found("batch", &id))?;
    Ok(Json(row.to_json()))
}

/// `?after=&limit=`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Cursor: the last id of the previous page.
    pub after: Option<String>,
    /// Page size, 1..=100 (default 20).
    pub limit: Option<usize>,
}

/// `GET /v1/batches`, newest first.
async fn list(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let after = q.after.clone();
    let rows = app.batch.db(move |s| s.list_batches(owner.as_deref(), after.as_deref(), limit + 1)).await?;
    Ok(Json(page(rows, limit, |r| &r.id, BatchRow::to_json)))
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` until the lines in flight finish, then `cancelled`
/// with the finished lines' outputs. A batch already cancelling or cancelled is returned as it is; a
/// finished one is a 400.
async fn cancel(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let wanted = id.clone();
    let row = app
        .batch
        .db(move |s| s.cancel_batch(&wanted, owner.as_deref(), unix_now()))
        .await?
        .ok_or_else(|| not_found("batch", &id))?;
    if ![status::CANCELLING, status::CANCELLED].contains(&row.status.as_str()) {
        return Err(ApiError(
            GatewayError::new(ErrorKind::InvalidJson, format!("cannot cancel a batch with status {:?}", row.status))
                .with_code("batch_not_cancellable"),
        ));
    }
    app.batch.wake.notify_one();
    tracing::info!(batch = %row.id, "batch cancelling");
    Ok(Json(row.to_json()))
}

/// The body of `GET /api/batches`: the latest 100 batches of every tenant with their progress, and
/// the runner's lines in flight, pending, and lines per second.
pub async fn admin_json(app: &Arc<AppState>) -> Result<Value, ApiError> {
    let rows = if app.batch.is_open() || app.batch.exists() {
        app.batch.db(|s| s.list_batches(None, None, 100)).await?
    } else {
        Vec::new()
    };
    let batches: Vec<Value> = rows
        .iter()
        .map(|b| {
            let mut v = b.to_json();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("tenant".into(), json!(b.owner));
                let done = b.completed + b.failed;
                let progress = if b.total > 0 { done as f64 / b.total as f64 } else { 0.0 };
                obj.insert("progress".into(), json!(progress));
            }
            v
        })
        .collect();
    let stats = &app.batch.stats;
    let mut out = Map::new();
    out.insert("batches".into(), Value::Array(batches));
    out.insert("lines_in_flight".into(), json!(stats.in_flight.load(Ordering::Relaxed)));
    out.insert("lines_pending".into(), json!(stats.pending.load(Ordering::Relaxed)));
    out.insert("lines_per_second".into(), json!(app.batch.lines_per_second()));
    Ok(Value::Object(out))
}

/// `GET /api/batches`.
async fn admin_list(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin_json(&app).await?))
}
