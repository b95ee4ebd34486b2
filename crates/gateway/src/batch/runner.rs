//! The background task that runs batches: validates new ones, sends their lines through the gateway's
//! own router, records each result durably, retries, and finalizes, expires or cancels.
//!
//! # Faithful path
//! A line becomes an `http::Request` for its endpoint with its body and a [`BatchOrigin`] extension
//! carrying the batch's tenant, and goes through [`crate::server::app`] in process: the same auth
//! identity, rate limits, admission queue (in the batch class: spare capacity only), routing, breakers,
//! retries and relay as a live request. Its answer is collected (bounded by `batch.max_response_bytes`).
//!
//! # Scheduling
//! At most `batch.max_concurrency` lines are out at once. The next line comes from the tenants in turn
//! (round robin over the tenants with runnable batches, each tenant's oldest batch first), and within a
//! batch in run order (model, then shared prefix: see [`super::jsonl`]). A line answered 429 waits and
//! retries without limit (rate-limit budget or a full fleet: it waits rather than fails), honouring
//! `Retry-After`; a 5xx or a broken answer retries with exponential backoff up to `batch.max_attempts`.
//!
//! # Crashes
//! Lines are read from the store, and a result is recorded in the transaction that marks its line done
//! ([`super::store::Store::finish_line`]). After a restart the runner starts over from the store: lines
//! in flight at the crash are still pending and run again, done lines never do.

use super::store::{status, unix_now, BatchRow, LineResult, PendingLine};
use super::{BatchOrigin, Batches};
use crate::state::AppState;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tower::ServiceExt;

/// Lines read from the store per batch at a time.
const BUFFER: usize = 64;
/// Seconds between passes deleting expired files.
const CLEANUP_SECS: u64 = 30;

/// One batch being run.
struct Running {
    owner: String,
    endpoint: String,
    status: String,
    expires_at: i64,
    /// Lines read from the store, not yet sent.
    buffer: VecDeque<PendingLine>,
    /// Run-order position of the last line read.
    cursor: i64,
    /// No line after `cursor` is pending.
    exhausted: bool,
    /// Lines sent and not yet back.
    in_flight: usize,
    /// Cancelling or expired: send nothing more; lines retrying give up.
    stop: Arc<AtomicBool>,
}

/// A line task's report.
struct Done {
    batch_id: String,
}

/// Runs batches until the gateway shuts down.
pub async fn run(app: Weak<AppState>) {
    let Some((batches, shutdown)) = app.upgrade().map(|a| (Arc::clone(&a.batch), a.shutdown.clone())) else {
        return;
    };
    // Resume at once when a store exists; else the first Batch API request opens it and wakes us.
    if batches.exists() {
        if let Err(e) = batches.db(|_| Ok(())).await {
            tracing::error!(error = %e, "cannot open the batch store; batches will not run");
        }
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut runner = Runner { running: BTreeMap::new(), last_owner: None, in_flight: 0, router: None };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_cleanup: Option<tokio::time::Instant> = None;
    loop {
        let refresh = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = batches.wake.notified() => true,
            _ = tick.tick() => true,
            Some(done) = done_rx.recv() => {
                runner.finished(&done);
                // A batch whose last line came back is finalized now, not at the next tick.
                runner.running.get(&done.batch_id).is_some_and(|r| r.in_flight == 0 && r.buffer.is_empty())
            }
        };
        let Some(app) = app.upgrade() else { return };
        if !batches.is_open() {
            continue;
        }
        if refresh {
            if let Err(e) = runner.refresh(&app, &batches).await {
                tracing::error!(error = %e, "batch runner");
                continue;
            }
        }
        if refresh {
            let cleanup = last_cleanup.is_none_or(|t| t.elapsed() >= Duration::from_secs(CLEANUP_SECS));
            if cleanup {
                last_cleanup = Some(tokio::time::Instant::now());
            }
            runner.housekeeping(&batches, cleanup).await;
        }
        runner.schedule(&app, &batches, &done_tx).await;
        batches.stats.in_flight.store(runner.in_flight as i64, Ordering::Relaxed);
    }
}

struct Runner {
    running: BTreeMap<String, Running>,
    last_owner: Option<String>,
    in_flight: usize,
    /// The gateway's router, built once (cloning it is cheap; building it per line is not).
    router: Option<axum::Router>,
}

impl Runner {
    fn finished(&mut self, done: &Done) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(r) = self.running.get_mut(&done.batch_id) {
            r.in_flight = r.in_flight.saturating_sub(1);
        }
    }

    /// Reads the open batches: validates new ones, notices cancels and expiry, finalizes the ones
    /// with nothing left to run.
    async fn refresh(&mut self, app: &Arc<AppState>, batches: &Arc<Batches>) -> Result<(), gateway_core::GatewayError> {
        let open = batches.db(|s| s.open_batches()).await?;
        let now = unix_now();
        self.running.retain(|id, _| open.iter().any(|b| &b.id == id));
        let mut pending = 0;
        for b in open {
            if b.status == status::VALIDATING {
                validate(app, batches, &b).await?;
                // Pick it up (running or failed) on the next pass at once.
                batches.wake.notify_one();
                continue;
            }
            pending += (b.total - b.completed - b.failed).max(0);
            let r = self.running.entry(b.id.clone()).or_insert_with(|| Running {
                owner: b.owner.clone(),
                endpoint: b.endpoint.clone(),
                status: b.status.clone(),
                expires_at: b.expires_at,
                buffer: VecDeque::new(),
                cursor: -1,
                exhausted: false,
                in_flight: 0,
                stop: Arc::new(AtomicBool::new(false)),
            });
            r.status = b.status.clone();
            let expired = now >= r.expires_at;
            if b.status == status::CANCELLING || expired {
                r.stop.store(true, Ordering::Relaxed);
                r.buffer.clear();
            }
            if r.in_flight > 0 {
                continue;
            }
            let ttl = ttl_secs(app);
            let id = b.id.clone();
            let finish = if b.status == status::CANCELLING {
                Some((status::CANCELLED, "batch_cancelled"))
            } else if expired {
                Some((status::EXPIRED, "batch_expired"))
            } else if b.status == status::FINALIZING {
                Some((status::COMPLETED, "batch_expired"))
            } else if r.buffer.is_empty() && r.exhausted {
                let check = id.clone();
                if batches.db(move |s| s.pending_lines(&check, -1, 1)).await?.is_empty() {
                    let mark = id.clone();
                    batches.db(move |s| s.mark_finalizing(&mark, unix_now())).await?;
                    Some((status::COMPLETED, "batch_expired"))
                } else {
                    // A line went back to pending (its result could not be stored): go round again.
                    r.cursor = -1;
                    r.exhausted = false;
                    None
                }
            } else {
                None
            };
            if let Some((final_status, unrun)) = finish {
                let done = batches.db(move |s| s.finalize(&id, final_status, unrun, ttl)).await?;
                tracing::info!(batch = %b.id, status = final_status, output = ?done.output_file_id,
                    errors = ?done.error_file_id, "batch finished");
                self.running.remove(&b.id);
            }
        }
        batches.stats.pending.store(pending, Ordering::Relaxed);
        Ok(())
    }

    /// Refreshes the status counts, and deletes expired files when `cleanup`.
    async fn housekeeping(&self, batches: &Arc<Batches>, cleanup: bool) {
        let work = move |s: &mut super::store::Store| {
            let deleted = if cleanup { s.delete_expired_files(unix_now())? } else { 0 };
            Ok((deleted, s.count_by_status()?))
        };
        match batches.db(work).await {
            Ok((deleted, counts)) => {
                if deleted > 0 {
                    tracing::info!(deleted, "expired batch files deleted");
                }
                *batches.stats.by_status.lock() = counts;
            }
            Err(e) => tracing::error!(error = %e, "batch housekeeping"),
        }
    }

    /// Sends lines while fewer than `batch.max_concurrency` are out, tenants taking turns.
    async fn schedule(&mut self, app: &Arc<AppState>, batches: &Arc<Batches>, done_tx: &mpsc::UnboundedSender<Done>) {
        let max = app.snapshot.load().config.batch.max_concurrency;
        while self.in_flight < max {
            let Some(id) = self.next_batch(batches).await else { return };
            let Some(r) = self.running.get_mut(&id) else { return };
            let Some(line) = r.buffer.pop_front() else { return };
            r.in_flight += 1;
            self.in_flight += 1;
            self.last_owner = Some(r.owner.clone());
            let job = Job {
                batch_id: id.clone(),
                owner: r.owner.clone(),
                endpoint: r.endpoint.clone(),
                line,
                stop: Arc::clone(&r.stop),
            };
            let router = self.router.get_or_insert_with(|| crate::server::app(Arc::clone(app))).clone();
            let (app, batches, done_tx) = (Arc::downgrade(app), Arc::clone(batches), done_tx.clone());
            tokio::spawn(async move {
                run_line(app, router, &batches, &job).await;
                let _ = done_tx.send(Done { batch_id: job.batch_id });
            });
        }
    }

    /// The batch to take the next line from: tenants in turn after the last one served, each tenant's
    /// oldest batch with a line to send. Refills buffers from the store as needed.
    async fn next_batch(&mut self, batches: &Arc<Batches>) -> Option<String> {
        let mut owners: Vec<String> = self
            .running
            .values()
            .filter(|r| r.status == status::IN_PROGRESS && !r.stop.load(Ordering::Relaxed))
            .map(|r| r.owner.clone())
            .collect();
        owners.sort();
        owners.dedup();
        let start = match &self.last_owner {
            Some(last) => owners.iter().position(|o| o > last).unwrap_or(0),
            None => 0,
        };
        for i in 0..owners.len() {
            let owner = &owners[(start + i) % owners.len()];
            // The map is keyed by id; batches of one tenant run oldest first by their creation time.
            let mut ids: Vec<(i64, String)> = self
                .running
                .iter()
                .filter(|(_, r)| {
                    &r.owner == owner && r.status == status::IN_PROGRESS && !r.stop.load(Ordering::Relaxed)
                })
                .map(|(id, r)| (r.expires_at, id.clone()))
                .collect();
            ids.sort();
            for (_, id) in ids {
                if self.fill(batches, &id).await {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Makes sure batch `id` has a buffered line, reading the next ones from the store; `false` when
    /// it has none left to send.
    async fn fill(&mut self, batches: &Arc<Batches>, id: &str) -> bool {
        let Some(r) = self.running.get_mut(id) else { return false };
        if !r.buffer.is_empty() {
            return true;
        }
        if r.exhausted {
            return false;
        }
        let (wanted, after) = (id.to_string(), r.cursor);
        match batches.db(move |s| s.pending_lines(&wanted, after, BUFFER)).await {
            Ok(lines) => {
                if let Some(last) = lines.last() {
                    r.cursor = last.ord;
                }
                r.exhausted = lines.len() < BUFFER;
                r.buffer.extend(lines);
                !r.buffer.is_empty()
            }
            Err(e) => {
                tracing::error!(batch = %id, error = %e, "reading batch lines");
                false
            }
        }
    }
}

fn ttl_secs(app: &AppState) -> i64 {
    let hours = app.snapshot.load().config.batch.file_ttl_hours;
    i64::try_from(hours.saturating_mul(3600)).unwrap_or(i64::MAX)
}

/// Reads the input file, validates it, and starts the batch (lines stored, `in_progress`) or fails it
/// with its errors.
async fn validate(app: &Arc<AppState>, batches: &Arc<Batches>, b: &BatchRow) -> Result<(), gateway_core::GatewayError> {
    let max_lines = app.snapshot.load().config.batch.max_lines;
    let (id, input, endpoint) = (b.id.clone(), b.input_file_id.clone(), b.endpoint.clone());
    let outcome = batches
        .db(move |s| {
            let now = unix_now();
            let text = match s.file(&input, None)? {
                Some(f) => std::fs::read(s.file_path(&f.id)).ok(),
                None => None,
            };
            let Some(text) = text else {
                let e = super::jsonl::LineError {
                    line: None,
                    code: "input_file_not_found",
                    message: format!("the input file {input} no longer exists"),
                    param: Some("input_file_id"),
                };
                s.fail_batch(&id, &super::jsonl::errors_json(&[e]), now)?;
                return Ok(Err(1));
            };
            match super::jsonl::validate(&text, &endpoint, max_lines) {
                Ok(lines) => {
                    s.start_batch(&id, &lines, now)?;
                    Ok(Ok(lines.len()))
                }
                Err(errors) => {
                    s.fail_batch(&id, &super::jsonl::errors_json(&errors), now)?;
                    Ok(Err(errors.len()))
                }
            }
        })
        .await?;
    match outcome {
        Ok(lines) => tracing::info!(batch = %b.id, lines, "batch validated"),
        Err(errors) => tracing::info!(batch = %b.id, errors, "batch failed validation"),
    }
    Ok(())
}

/// One line to run.
struct Job {
    batch_id: String,
    owner: String,
    endpoint: String,
    line: PendingLine,
    stop: Arc<AtomicBool>,
}

/// What one attempt got.
enum Attempt {
    /// A final answer to record.
    Final(LineResult),
    /// Try again after the delay, counting an attempt (5xx) or not (429).
    Retry { after: Option<Duration>, counts: bool, last: LineResult },
}

/// Runs one line to its final result and records it. Gives up without recording when the gateway shuts
/// down or the batch stops (the line stays pending or unrun).
async fn run_line(app: Weak<AppState>, router: axum::Router, batches: &Arc<Batches>, job: &Job) {
    let mut failures = 0u32;
    loop {
        let Some(state) = app.upgrade() else { return };
        if state.shutdown.is_cancelled() {
            return;
        }
        let cfg = state.snapshot.load().config.batch.clone();
        let attempt = send(&state, router.clone(), job, cfg.max_response_bytes).await;
        let metrics = &state.metrics;
        let result = match attempt {
            Attempt::Final(r) => r,
            Attempt::Retry { after, counts, last } => {
                if counts {
                    failures += 1;
                }
                if counts && failures >= cfg.max_attempts {
                    last
                } else {
                    if job.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    metrics.batch_lines.with_label_values(&["retried"]).inc();
                    let backoff = backoff(cfg.retry_base_ms, cfg.retry_max_ms, failures.max(1));
                    let pause = after.map_or(backoff, |a| a.min(Duration::from_millis(cfg.retry_max_ms)));
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
        };
        let outcome = if result.succeeded() { "completed" } else { "failed" };
        let (id, idx) = (job.batch_id.clone(), job.line.idx);
        match batches.db(move |s| s.finish_line(&id, idx, &result)).await {
            Ok(_) => {
                metrics.batch_lines.with_label_values(&[outcome]).inc();
                batches.stats.finished.lock().record(tokio::time::Instant::now().into_std());
            }
            Err(e) => tracing::error!(batch = %job.batch_id, line = idx, error = %e, "recording a batch line"),
        }
        return;
    }
}

/// Exponential backoff with full jitter before retry `n` (1-based).
fn backoff(base_ms: u64, max_ms: u64, n: u32) -> Duration {
    let cap = base_ms.saturating_mul(1u64 << n.saturating_sub(1).min(20)).min(max_ms);
    Duration::from_millis(rand::random_range(cap / 2..=cap.max(1)))
}

/// Sends the line once through the gateway's router and classifies the answer.
async fn send(app: &Arc<AppState>, router: axum::Router, job: &Job, max_bytes: usize) -> Attempt {
    let snap = app.snapshot.load_full();
    let tenant = if snap.auth.enabled() {
        match snap.auth.tenant_named(&job.owner) {
            Some(t) => Some(t),
            None => {
                let err = gateway_core::GatewayError::new(
                    gateway_core::ErrorKind::InvalidApiKey,
                    format!("the batch's tenant {:?} has no API key any more", job.owner),
                );
                return Attempt::Final(LineResult {
                    status_code: err.status(),
                    request_id: String::new(),
                    body: Some(err.body().to_string()),
                    error: None,
                });
            }
        }
    } else {
        None
    };
    drop(snap);
    let mut req = http::Request::new(Body::from(Bytes::from(job.line.body.clone())));
    *req.method_mut() = http::Method::POST;
    match job.endpoint.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return Attempt::Final(error_result("invalid_url", "the batch's endpoint is not a path")),
    }
    req.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    req.extensions_mut().insert(BatchOrigin { tenant });
    let resp = match router.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    let status = resp.status();
    let request_id = resp
        .headers()
        .get(&crate::proxy::request::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = match Limited::new(resp.into_body(), max_bytes).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Attempt::Final(error_result(
                "response_too_large",
                &format!("the answer is larger than batch.max_response_bytes = {max_bytes}"),
            ));
        }
        Err(e) => {
            let last = error_result("upstream_error", &format!("the answer broke off: {e}"));
            return Attempt::Retry { after: None, counts: true, last };
        }
    };
    let result = LineResult {
        status_code: status.as_u16(),
        request_id,
        body: Some(String::from_utf8_lossy(&body).into_owned()),
        error: None,
    };
    if status == http::StatusCode::TOO_MANY_REQUESTS {
        Attempt::Retry { after: retry_after, counts: false, last: result }
    } else if status.is_server_error() {
        Attempt::Retry { after: retry_after, counts: true, last: result }
    } else {
        Attempt::Final(result)
    }
}

fn error_result(code: &str, message: &str) -> LineResult {
    LineResult {
        status_code: 0,
        request_id: String::new(),
        body: None,
        error: Some(serde_json::json!({"code": code, "message": message})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        for _ in 0..50 {
            let b1 = backoff(100, 1000, 1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b5 = backoff(100, 1000, 5);
            assert!(b5 >= Duration::from_millis(500) && b5 <= Duration::from_millis(1000));
        }
    }
}
