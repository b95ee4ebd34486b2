//! `/v1/files`: upload (multipart, `purpose=batch`), list, retrieve, content, delete, with OpenAI's
//! file object.
//!
//! An upload streams to a temporary file under `batch.data_dir`, counted chunk by chunk against
//! `batch.max_file_bytes` (413 as soon as it is passed; nothing is buffered whole), and becomes a file
//! only when complete. A dropped connection removes the partial file ([`TempFile`]). The gateway's
//! generic `server.max_body_bytes` does not apply here: it bounds inference bodies.

use super::store::{unix_now, FileRow};
use super::{bad_request, not_found, owner, page};
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gateway_core::{ErrorKind, GatewayError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Longest `filename` kept, characters.
const MAX_FILENAME: usize = 255;
/// Longest `purpose` field read, bytes.
const MAX_PURPOSE: usize = 64;

/// The files routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        // Uploads are bounded by `batch.max_file_bytes` while they stream, not by axum's default limit.
        .route("/v1/files", get(list).post(upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/files/{id}", get(retrieve).delete(delete))
        .route("/v1/files/{id}/content", get(content))
}

/// A temporary upload, removed when dropped unless kept.
struct TempFile(Option<std::path::PathBuf>);

impl TempFile {
    fn keep(mut self) -> std::path::PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn multipart_error(e: impl std::fmt::Display) -> ApiError {
    bad_request("file", format!("could not read the multipart upload: {e}"))
}

/// `POST /v1/files`.
async fn upload(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let mut multipart = multipart.map_err(|e| {
        ApiError(
            GatewayError::new(ErrorKind::UnsupportedContentType, format!("expected a multipart/form-data upload: {e}"))
                .with_param("file"),
        )
    })?;
    let cfg = app.snapshot.load().config.batch.clone();
    let temp_path = app.batch.db(|s| Ok(s.temp_path())).await?;
    let mut purpose: Option<String> = None;
    let mut file: Option<(TempFile, String, u64)> = None;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("purpose") => {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    if text.len() + chunk.len() > MAX_PURPOSE {
                        return Err(bad_request("purpose", "purpose is too long"));
                    }
                    text.extend_from_slice(&chunk);
                }
                purpose = Some(String::from_utf8_lossy(&text).trim().to_string());
            }
            Some("file") if file.is_none() => {
                let filename: String = field.file_name().unwrap_or("upload.jsonl").chars().take(MAX_FILENAME).collect();
                let temp = TempFile(Some(temp_path.clone()));
                let io = |e: std::io::Error| {
                    ApiError(GatewayError::new(ErrorKind::Internal, format!("storing the upload: {e}")))
                };
                let mut out = tokio::fs::File::create(&temp_path).await.map_err(io)?;
                let mut written: u64 = 0;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    written += chunk.len() as u64;
                    if written > cfg.max_file_bytes {
                        return Err(ApiError(
                            GatewayError::new(
                                ErrorKind::BodyTooLarge,
                                format!("the file is larger than batch.max_file_bytes = {} bytes", cfg.max_file_bytes),
                            )
                            .with_param("file"),
                        ));
                    }
                    out.write_all(&chunk).await.map_err(io)?;
                }
                out.sync_all().await.map_err(io)?;
                file = Some((temp, filename, written));
            }
            Some("file") => return Err(bad_request("file", "only one file per upload")),
            other => {
                return Err(bad_request("file", format!("unexpected form field {:?}", other.unwrap_or(""))));
            }
        }
    }
    match purpose.as_deref() {
        Some("batch") => {}
        Some(p) => {
            return Err(bad_request("purpose", format!("purpose {p:?} is not supported; this gateway takes \"batch\"")))
        }
        None => return Err(bad_request("purpose", "purpose is required (\"batch\")")),
    }
    let Some((temp, filename, bytes)) = file else {
        return Err(bad_request("file", "the upload has no `file` field"));
    };
    let now = unix_now();
    let row = FileRow {
        id: format!("file-{}", uuid::Uuid::new_v4().simple()),
        owner: owner.unwrap_or_default(),
        purpose: "batch".into(),
        filename,
        bytes: bytes as i64,
        created_at: now,
        expires_at: now.saturating_add((cfg.file_ttl_hours.saturating_mul(3600)).min(i64::MAX as u64) as i64),
    };
    let path = temp.keep();
    let stored = row.clone();
    let result = app.batch.db(move |s| s.insert_file(&path, &stored)).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&temp_path);
    }
    result?;
    Ok(Json(row.to_json()))
}

/// `?purpose=&after=&limit=`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Only files of this purpose.
    pub purpose: Option<String>,
    /// Cursor: the last id of the previous page.
    pub after: Option<String>,
    /// Page size, 1..=10000 (default 10000, as OpenAI).
    pub limit: Option<usize>,
}

/// `GET /v1/files`.
async fn list(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let limit = q.limit.unwrap_or(10_000).clamp(1, 10_000);
    let (purpose, after) = (q.purpose.clone(), q.after.clone());
    let rows =
        app.batch.db(move |s| s.list_files(owner.as_deref(), purpose.as_deref(), after.as_deref(), limit + 1)).await?;
    Ok(Json(page(rows, limit, |r| &r.id, FileRow::to_json)))
}

async fn find(app: &Arc<AppState>, headers: &http::HeaderMap, id: String) -> Result<FileRow, ApiError> {
    let owner = owner(app, headers)?;
    let wanted = id.clone();
    app.batch.db(move |s| s.file(&wanted, owner.as_deref())).await?.ok_or_else(|| not_found("file", &id))
}

/// `GET /v1/files/{id}`.
async fn retrieve(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(find(&app, &headers, id).await?.to_json()))
}

/// `GET /v1/files/{id}/content`: the bytes, streamed from disk.
async fn content(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = find(&app, &headers, id.clone()).await?;
    let path = app.batch.db(move |s| Ok(s.file_path(&row.id))).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|_| not_found("file", &id))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([(http::header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// `DELETE /v1/files/{id}`.
async fn delete(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&app, &headers)?;
    let wanted = id.clone();
    if app.batch.db(move |s| s.delete_file(&wanted, owner.as_deref())).await? {
        Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
    } else {
        Err(not_found("file", &id))
    }
}
