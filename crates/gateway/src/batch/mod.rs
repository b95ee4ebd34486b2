//! The Batch API: OpenAI-compatible `/v1/files` and `/v1/batches`, run inside the gateway in the
//! fleet's spare capacity.
//!
//! # Layout
//! - [`store`]: SQLite (files, batches, every line's result) under `batch.data_dir`; durable across
//!   crashes, a line's result recorded in the transaction that marks it done.
//! - [`jsonl`]: input validation (pure) and run order (model, then shared prompt prefix).
//! - [`files`], [`batches`]: the HTTP handlers, with OpenAI's object shapes.
//! - [`runner`]: the background task that validates, runs lines through the gateway's own router
//!   (auth identity, rate limits, admission, routing, breakers, relay: the live path), retries,
//!   finalizes, expires.
//!
//! Batch lines run in [`gateway_core::Priority::Batch`]: below every live class, only in spare
//! capacity (see [`crate::proxy::admission`]). Ownership: with `[auth]` on, files and batches belong to the API
//! key's tenant and are invisible (404) to other tenants; with auth off there is one owner.

pub mod batches;
pub mod files;
pub mod jsonl;
pub mod runner;
pub mod store;

use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use gateway_core::{ErrorKind, GatewayError};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use store::Store;

/// Marks a request as a batch line sent by the runner, and carries its batch's tenant. Only the
/// in-process runner can set a request extension: clients cannot claim to be a batch line.
#[derive(Debug, Clone)]
pub struct BatchOrigin {
    /// The batch's tenant (`None` when auth is off).
    pub tenant: Option<Arc<crate::auth::Tenant>>,
}

/// Who is asking: `Some(tenant)` with auth on (sees only its own), `None` with auth off (sees all).
pub type Owner = Option<String>;

/// The Batch API's shared part: the lazily opened store, the runner's wake-up, and live figures.
pub struct Batches {
    data_dir: PathBuf,
    store: OnceLock<Arc<Mutex<Store>>>,
    opening: Mutex<()>,
    /// Wakes the runner (a batch was created or cancelled).
    pub wake: tokio::sync::Notify,
    /// Live figures for metrics, `/api/batches` and the dashboard.
    pub stats: RunnerStats,
}

/// What the runner is doing, for metrics and the dashboard.
#[derive(Debug)]
pub struct RunnerStats {
    /// Lines sent and not yet recorded.
    pub in_flight: AtomicI64,
    /// Lines of open batches not yet done.
    pub pending: AtomicI64,
    /// Batches per status (refreshed by the runner).
    pub by_status: Mutex<Vec<(String, i64)>>,
    /// Lines finished recently, for a per-second rate.
    pub finished: Mutex<guard::RateEstimator>,
}

impl Default for RunnerStats {
    fn default() -> Self {
        Self {
            in_flight: AtomicI64::new(0),
            pending: AtomicI64::new(0),
            by_status: Mutex::default(),
            // A 10 s window: the dashboard shows the current pace, not the last minute's.
            finished: Mutex::new(guard::RateEstimator::new(std::time::Duration::from_secs(10), 10)),
        }
    }
}

impl Batches {
    /// The Batch API over `data_dir` (nothing is opened until a request or the runner needs it).
    pub fn new(data_dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            data_dir,
            store: OnceLock::new(),
            opening: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            stats: RunnerStats::default(),
        })
    }

    /// Whether a store exists on disk already (the runner resumes only then).
    pub fn exists(&self) -> bool {
        self.data_dir.join("batch.sqlite3").exists()
    }

    /// Whether the store is open.
    pub fn is_open(&self) -> bool {
        self.store.get().is_some()
    }

    fn open(&self) -> Result<Arc<Mutex<Store>>, String> {
        if let Some(s) = self.store.get() {
            return Ok(Arc::clone(s));
        }
        let _one_at_a_time = self.opening.lock();
        if let Some(s) = self.store.get() {
            return Ok(Arc::clone(s));
        }
        let store = Arc::new(Mutex::new(Store::open(&self.data_dir)?));
        tracing::info!(data_dir = %self.data_dir.display(), "batch store open");
        Ok(Arc::clone(self.store.get_or_init(|| store)))
    }

    /// Runs `f` on the store on a blocking thread (opening the store first if needed).
    pub async fn db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> store::StoreResult<T> + Send + 'static,
    ) -> Result<T, GatewayError> {
        let me = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            let store = me.open()?;
            let mut guard = store.lock();
            f(&mut guard)
        })
        .await;
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "batch store");
                Err(GatewayError::new(ErrorKind::Internal, e))
            }
            Err(e) => Err(GatewayError::new(ErrorKind::Internal, format!("batch store task failed: {e}"))),
        }
    }

    /// Sets the batch gauges (when `/metrics` is scraped).
    pub fn export(&self, m: &crate::metrics::Metrics) {
        m.batch_lines_in_flight.set(self.stats.in_flight.load(Ordering::Relaxed));
        m.batch_lines_pending.set(self.stats.pending.load(Ordering::Relaxed));
        m.batch_lines_per_second.set(self.lines_per_second());
        for (status, n) in self.stats.by_status.lock().iter() {
            m.batches.with_label_values(&[status.as_str()]).set(*n);
        }
    }

    /// Lines finished per second, recently.
    pub fn lines_per_second(&self) -> f64 {
        self.stats.finished.lock().per_sec(tokio::time::Instant::now().into_std())
    }
}

/// Who is asking, from the request's API key: 401 for a bad key.
pub fn owner(app: &AppState, headers: &http::HeaderMap) -> Result<Owner, ApiError> {
    let snap = app.snapshot.load();
    Ok(snap.auth.authenticate(headers)?.map(|t| t.name.to_string()))
}

/// 404 for a file or batch the caller cannot see (another tenant's is indistinguishable from none).
pub fn not_found(what: &str, id: &str) -> ApiError {
    ApiError(GatewayError::new(ErrorKind::NotFound, format!("No such {what}: '{id}'")))
}

/// 400 `invalid_request_error` naming `param`.
pub fn bad_request(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError(GatewayError::new(ErrorKind::InvalidJson, message).with_code("invalid_request").with_param(param))
}

/// One page of an OpenAI list (`object: "list"`, `first_id`, `last_id`, `has_more`) from `rows` read
/// with one row more than `limit`: that extra row, dropped here, is what says there are more.
pub fn page<R>(mut rows: Vec<R>, limit: usize, id: impl Fn(&R) -> &str, to_json: impl Fn(&R) -> Value) -> Value {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    json!({
        "object": "list",
        "data": rows.iter().map(to_json).collect::<Vec<_>>(),
        "first_id": rows.first().map(&id),
        "last_id": rows.last().map(&id),
        "has_more": has_more,
    })
}

/// The Batch API's routes (`/v1/files*`, `/v1/batches*`, `GET /api/batches`).
pub fn routes() -> Router<Arc<AppState>> {
    files::routes().merge(batches::routes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("id-{i}")).collect()
    }

    #[test]
    fn a_page_drops_the_extra_row_and_says_there_is_more() {
        let p = page(ids(3), 2, |r| r.as_str(), |r| json!({ "id": r }));
        assert_eq!(p["object"], "list");
        assert_eq!(p["data"], json!([{ "id": "id-0" }, { "id": "id-1" }]));
        assert_eq!((&p["first_id"], &p["last_id"], &p["has_more"]), (&json!("id-0"), &json!("id-1"), &json!(true)));
        let last = page(ids(2), 2, |r| r.as_str(), |r| json!({ "id": r }));
        assert_eq!((&last["last_id"], &last["has_more"]), (&json!("id-1"), &json!(false)));
        let empty = page(ids(0), 2, |r| r.as_str(), |r| json!({ "id": r }));
        assert_eq!((&empty["data"], &empty["first_id"], &empty["last_id"]), (&json!([]), &Value::Null, &Value::Null));
        assert_eq!(empty["has_more"], false);
    }
}
