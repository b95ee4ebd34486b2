//! Sending a request to a worker: pick one ([`pick`]), send and wait for its answer ([`send`]), and
//! on a failure before the client saw a byte record it and try another worker ([`on_failure`]).
//!
//! Re-selecting on retry (rather than an ordered fallback list) lets the policy see load as it is after
//! the failure.

use crate::cluster::Take;
use crate::error::error_chain;
use crate::fleet::slot::{LoadGuard, Reservation};
use crate::fleet::worker::Worker;
use crate::metrics::Active;
use crate::proxy::accounting::{report_transition, RequestInfo, RequestRecord};
use crate::proxy::classify::{classify, AttemptEnd, Meaning};
use crate::proxy::relay::relayed_response;
use crate::proxy::request::{content_length, RequestId, X_REQUEST_ID};
use crate::proxy::usage::strip_usage_event;
use crate::state::{AppState, Snapshot};
use crate::upstream::{self, is_hop_by_hop};
use axum::response::Response;
use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError, RequestFeatures, WorkerId};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH};
use http::HeaderMap;
use http_body_util::Full;
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How many times its usual answer time a worker may stay silent before it counts as stalled.
const STALL_FACTOR: f64 = 4.0;

/// The request as dispatch needs it; what the answering attempt takes over is moved out of it.
pub struct Outbound<'a> {
    /// The client's request head (method, path, headers to forward).
    pub parts: &'a http::request::Parts,
    /// The body to forward (the client's bytes, or with `include_usage` set).
    pub bytes: &'a Bytes,
    /// What routing reads.
    pub features: &'a RequestFeatures,
    /// What every attempt's record shares (one allocation shared, rather than its handles cloned, each
    /// a count other threads touch too, per attempt).
    pub info: Arc<RequestInfo>,
    /// Tokens charged up front, handed to the response that answers.
    pub charge: Option<crate::limits::TokenCharge>,
    /// Drop the usage event the gateway asked for on the client's behalf.
    pub strip_usage: bool,
    /// The request's count in the active-requests gauge, handed to the response that answers.
    pub active: Option<Active>,
    /// Its model's `max_concurrency` permit, handed to the response that answers.
    pub model_permit: Option<crate::proxy::admission::ModelPermit>,
    /// Time spent in the admission queue so far.
    pub queue_wait: Duration,
    /// The worker a Responses follow-up belongs on (it holds the response continued), if known.
    pub pinned: Option<WorkerId>,
}

/// Workers that may take a request, on the stack for a fleet of up to eight: these lists were three of
/// a request's allocations (callgrind, stop 36).
pub type Eligible<'a> = SmallVec<[&'a Arc<Worker>; 8]>;

/// What the attempts of one request have done so far (kept across trips back to the queue).
#[derive(Default)]
pub struct Attempts {
    /// Workers tried, plus those whose half-open trial another request took (not attempts).
    pub tried: SmallVec<[WorkerId; 4]>,
    /// Requests actually sent, so `count` can be below `tried.len()`.
    count: u32,
    last_error: Option<GatewayError>,
}

/// Why `dispatch` gave up.
pub enum Failed {
    /// Every eligible worker is at capacity: back to the admission queue.
    NoRoom,
    /// A final error for the client.
    Error(GatewayError),
}

impl From<GatewayError> for Failed {
    fn from(e: GatewayError) -> Self {
        Failed::Error(e)
    }
}

/// Sends the request (to the reserved worker first, if the queue handed one out) and retries on another
/// worker while nothing has reached the client. `fresh` is the eligible list admission just judged, when
/// no time passed since (the first pick uses it instead of filtering the fleet again).
pub async fn dispatch<'s>(
    app: &Arc<AppState>,
    snap: &'s Snapshot,
    out: &mut Outbound<'_>,
    mut reservation: Option<Reservation>,
    attempts: &mut Attempts,
    mut fresh: Option<Eligible<'s>>,
) -> Result<Response, Failed> {
    let cfg = &snap.config;
    let deadline = out.info.received + Duration::from_millis(cfg.upstream.total_timeout_ms);
    loop {
        let picked = pick(app, snap, out, &mut reservation, attempts, fresh.take()).await?;
        let worker = Arc::clone(picked.load.worker());
        let predicted = snap.policy.on_dispatch(out.features, worker.id);
        app.cluster.share_dispatch(&worker.base_url, out.features);
        if cfg.rate_limit.enabled {
            app.limiter.load().charge_worker(worker.id, cfg.rate_limit.per_worker_qps);
        }
        attempts.count += 1;
        // Retry only where another worker could take it; otherwise the worker's own answer stands.
        let may_retry = attempts.count < cfg.retry.max_attempts && picked.others;
        let dispatched = Instant::now();
        let record = |load, status: u16| {
            RequestRecord::new(Arc::clone(&out.info), load, status, dispatched, attempts.count - 1, predicted)
        };
        let (end, error) = match send(app, snap, out, &worker, dispatched, deadline).await? {
            Answer::Headers(Ok(resp)) => {
                let status = resp.status().as_u16();
                let Meaning { retryable, .. } = classify(AttemptEnd::Status(status));
                if !(retryable && may_retry) {
                    let mut record = record(picked.load, status);
                    record.charge = out.charge.take();
                    record.active = out.active.take();
                    record.model_permit = out.model_permit.take();
                    record.queue_wait = out.queue_wait;
                    let idle = Duration::from_millis(cfg.upstream.idle_timeout_ms);
                    let relayed = relayed_response(resp, record, idle, deadline);
                    return Ok(if out.strip_usage { strip_usage_event(relayed) } else { relayed });
                }
                let message = format!("worker {} answered {status}", worker.name);
                (AttemptEnd::Status(status), GatewayError::new(ErrorKind::UpstreamUnavailable, message))
            }
            Answer::Headers(Err(e)) => {
                let end = if e.is_connect() { AttemptEnd::ConnectFailed } else { AttemptEnd::Broken };
                let message = format!("worker {} failed: {}", worker.name, error_chain(&e));
                (end, GatewayError::new(ErrorKind::UpstreamUnavailable, message))
            }
            Answer::TimedOut => {
                let message = format!("worker {} did not answer in time", worker.name);
                (AttemptEnd::TimedOut, GatewayError::new(ErrorKind::UpstreamTimeout, message))
            }
            Answer::Stalled { silent } => {
                on_stall(app, snap, &worker, silent);
                let message = format!("worker {} stalled: no sign of life for {} ms", worker.name, silent.as_millis());
                (AttemptEnd::Stalled, GatewayError::new(ErrorKind::UpstreamTimeout, message))
            }
        };
        let status = if let AttemptEnd::Status(s) = end { s } else { error.status() };
        record(picked.load, status).finish_attempt(classify(end).kind);
        on_failure(app, snap, attempts, error, may_retry, deadline).await?;
    }
}

/// A worker chosen for the next attempt, its slot and breaker permit taken.
struct Picked {
    load: LoadGuard,
    /// Another eligible worker exists, so a failure may be retried.
    others: bool,
}

/// The reserved worker, else the policy's choice among eligible workers with room; its local slot, then
/// its slot in the count shared with other replicas (`[cluster]`), then the breaker's permit. A shared
/// count at capacity sends the request back to the queue, which holds it until a slot frees anywhere.
async fn pick<'s>(
    app: &Arc<AppState>,
    snap: &'s Snapshot,
    out: &Outbound<'_>,
    reservation: &mut Option<Reservation>,
    attempts: &mut Attempts,
    mut fresh: Option<Eligible<'s>>,
) -> Result<Picked, Failed> {
    let cfg = &snap.config;
    let (breakers, queueing) = (cfg.circuit_breaker.enabled, cfg.queue.enabled);
    let model = &out.info.model;
    loop {
        let all = match fresh.take() {
            Some(all) => all,
            None => narrow(eligible(app, snap, model, &attempts.tried, Instant::now()), out.pinned),
        };
        let reserved = reservation.is_some();
        let load = match reservation.take() {
            Some(r) => LoadGuard::from(r),
            None => {
                let class = out.features.priority;
                let candidates: Eligible<'_> =
                    all.iter().copied().filter(|w| !queueing || app.admission.has_room_for(w, class)).collect();
                if candidates.is_empty() && !all.is_empty() {
                    return Err(Failed::NoRoom);
                }
                let views: SmallVec<[_; 8]> = candidates.iter().map(|w| w.view()).collect();
                let Some(choice) = snap.policy.select(out.features, &views, &mut rand::rng()) else {
                    return Err(Failed::Error(attempts.last_error.take().unwrap_or_else(|| no_worker(snap, model))));
                };
                let worker = candidates[choice];
                let cap = if queueing { app.admission.slots_for(worker, class) } else { u32::MAX };
                LoadGuard::try_take(worker, cap, app.admission.notify()).ok_or(Failed::NoRoom)?
            }
        };
        let mut load = load;
        let worker = Arc::clone(load.worker());
        // The shared count holds the worker's whole capacity (not this replica's discounted share).
        let cap = if queueing { worker.capacity(cfg.queue.default_worker_concurrency) } else { u32::MAX };
        match app.cluster.take(&worker, cap).await? {
            Take::Local => {}
            Take::Shared(slot) => load.hold_shared(slot),
            // The local slot frees with the guard; the queue will not hand it out while marked full.
            Take::Full => return Err(Failed::NoRoom),
        }
        let mut load = match load.admit(breakers, Instant::now()) {
            Ok(load) => load,
            // The reserved worker's breaker opened meanwhile: choose again.
            Err(_) if reserved => continue,
            // Another request took the last half-open trial: not an attempt, pick again.
            Err(_) => {
                attempts.tried.push(worker.id);
                continue;
            }
        };
        let transition = load.take_transition();
        attempts.tried.push(worker.id);
        report_transition(&app.metrics, &app.cluster, &worker, transition);
        snap.count_decision(&app.metrics, &worker);
        let others = all.iter().any(|w| w.id != worker.id);
        return Ok(Picked { load, others });
    }
}

/// Workers that may take a request for `model` now: healthy, not draining, serving it, not tried
/// yet, breaker admitting, below their per-worker rate.
pub fn eligible<'a>(app: &AppState, snap: &'a Snapshot, model: &str, tried: &[WorkerId], now: Instant) -> Eligible<'a> {
    let breakers = snap.config.circuit_breaker.enabled;
    let rl = &snap.config.rate_limit;
    let qps = if rl.enabled { rl.per_worker_qps } else { 0.0 };
    let limiter = app.limiter.load();
    snap.fleet
        .workers
        .iter()
        .filter(|w| w.is_available() && w.serves(model) && !tried.contains(&w.id))
        .filter(|w| !breakers || w.breaker_admits(now))
        .filter(|w| limiter.worker_has_budget(w.id, qps))
        .collect()
}

/// Only `pinned` when it is among `all` (eligible and not tried yet), else `all`: a follow-up goes to the
/// worker holding its response while it can take it, and is routed like any request otherwise.
pub fn narrow(all: Eligible<'_>, pinned: Option<WorkerId>) -> Eligible<'_> {
    match pinned.and_then(|id| all.iter().find(|w| w.id == id).copied()) {
        Some(home) => smallvec::smallvec![home],
        None => all,
    }
}

/// Sends the request to `worker` and waits for its response head, within the first-byte timeout and
/// the request's deadline, giving up early on a stalled worker.
async fn send(
    app: &AppState,
    snap: &Snapshot,
    out: &Outbound<'_>,
    worker: &Worker,
    dispatched: Instant,
    deadline: Instant,
) -> Result<
    Answer<Result<http::Response<upstream::connections::WorkerBody>, upstream::connections::SendError>>,
    GatewayError,
> {
    let cfg = &snap.config.upstream;
    let request =
        build_upstream_request(worker, out.parts, out.bytes.clone(), &out.info.request_id, snap.auth.enabled())?;
    let first_byte_ms = if out.features.stream {
        cfg.stream_first_byte_timeout_ms.min(cfg.first_byte_timeout_ms)
    } else {
        cfg.first_byte_timeout_ms
    };
    let first_byte_by = (dispatched + Duration::from_millis(first_byte_ms)).min(deadline);
    let stall = guard::StallRule { floor: Duration::from_millis(cfg.stall_timeout_ms), factor: STALL_FACTOR };
    // Pinned here, not moved into `await_answer`: an argument would be stored in its future twice.
    let sending = std::pin::pin!(worker.connections.send(&app.connector, request));
    let answer = await_answer(worker, sending, dispatched, first_byte_by, stall).await;
    if let Answer::Headers(Ok(resp)) = &answer {
        let now = Instant::now();
        worker.mark_alive(now);
        if !out.features.stream && resp.status().is_success() {
            worker.record_answer_time(now.duration_since(dispatched));
        }
    }
    Ok(answer)
}

/// A stalled worker is cut off: its breaker opens at once (when breakers are on) and it is logged.
fn on_stall(app: &AppState, snap: &Snapshot, worker: &Worker, silent: Duration) {
    if snap.config.circuit_breaker.enabled {
        report_transition(&app.metrics, &app.cluster, worker, worker.trip_breaker(Instant::now()));
    }
    tracing::warn!(
        worker = %worker.name,
        silent_ms = silent.as_millis() as u64,
        in_flight = worker.view().in_flight,
        "worker stalled: no answer, bytes or tokens while holding requests; cut off"
    );
}

/// After a failed attempt: the final error when no retry may follow, else a jittered pause before the
/// next attempt (unless the pause would pass the request's deadline).
async fn on_failure(
    app: &AppState,
    snap: &Snapshot,
    attempts: &mut Attempts,
    error: GatewayError,
    may_retry: bool,
    deadline: Instant,
) -> Result<(), Failed> {
    if !may_retry {
        return Err(Failed::Error(error));
    }
    let pause = backoff(&snap.config.retry, attempts.count);
    if Instant::now() + pause >= deadline {
        return Err(Failed::Error(error));
    }
    attempts.last_error = Some(error);
    app.metrics.retries.inc();
    tokio::time::sleep(pause).await;
    Ok(())
}

/// How the wait for a worker's response head ended.
enum Answer<T> {
    /// The worker answered (or the connection failed).
    Headers(T),
    /// `first_byte_by` passed.
    TimedOut,
    /// The worker showed no sign of life past the stall threshold (see [`guard::stall`]).
    Stalled { silent: Duration },
}

/// Waits for `send` (the request to `worker`, sent at `sent`) until `by`, giving up early when the
/// worker is stalled: silent since the request was sent for longer than `rule`'s threshold.
async fn await_answer<F: std::future::Future>(
    worker: &Worker,
    mut send: std::pin::Pin<&mut F>,
    sent: Instant,
    by: Instant,
    rule: guard::StallRule,
) -> Answer<F::Output> {
    let threshold = rule.threshold(worker.usual_answer_time());
    loop {
        let recheck = match guard::StallRule::check(
            threshold,
            Instant::now().into_std(),
            sent.into_std(),
            worker.last_alive().into_std(),
        ) {
            guard::StallCheck::Stalled { silent } => return Answer::Stalled { silent },
            guard::StallCheck::RecheckAt(at) => Instant::from_std(at),
        };
        tokio::select! {
            biased;
            answer = &mut send => return Answer::Headers(answer),
            _ = tokio::time::sleep_until(recheck.min(by)) => {
                if Instant::now() >= by {
                    return Answer::TimedOut;
                }
            }
        }
    }
}

/// Full-jitter exponential backoff before retry number `retry` (1-based): uniform in
/// `0..=min(max_ms, base_ms * 2^(retry-1))`. Jitter spreads retries of many clients hit by the same failure.
fn backoff(cfg: &crate::config::RetryConfig, retry: u32) -> Duration {
    let cap = cfg.base_ms.saturating_mul(1u64 << retry.saturating_sub(1).min(20)).min(cfg.max_ms);
    Duration::from_millis(rand::random_range(0..=cap))
}

/// 503 when no worker can take a request for `model`, saying why.
fn no_worker(snap: &Snapshot, model: &str) -> GatewayError {
    let serving: Vec<_> = snap.fleet.workers.iter().filter(|w| w.serves(model)).collect();
    let healthy = serving.iter().filter(|w| w.is_available()).count();
    let message = if healthy == 0 {
        format!("no healthy worker serves model `{model}`")
    } else {
        format!("every healthy worker serving model `{model}` has its circuit breaker open; retry later")
    };
    GatewayError::new(ErrorKind::NoHealthyWorker, message)
}

/// The request for `worker`: the client's method, path (after the worker's base path, in origin form:
/// `Host` is set where it is sent) and end-to-end headers, the worker's own key, the request id and the
/// body's length.
fn build_upstream_request(
    worker: &Worker,
    parts: &http::request::Parts,
    body: Bytes,
    request_id: &RequestId,
    gateway_auth: bool,
) -> Result<http::Request<Full<Bytes>>, GatewayError> {
    let uri = worker
        .connections
        .request_uri(parts.uri.path_and_query())
        .map_err(|e| GatewayError::new(ErrorKind::Internal, format!("bad upstream URI: {e}")))?;
    // A new map with room for what the gateway adds (the client's map is kept for retries): a copy of
    // the client's grew three times as `Host`, the id and hyper's `Content-Length` went in (callgrind,
    // about 900 instructions per request).
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 4);
    let mut length = None;
    for (name, value) in &parts.headers {
        if *name == CONTENT_LENGTH {
            length = Some(value);
        } else if !(is_hop_by_hop(name) || *name == X_REQUEST_ID || (gateway_auth && *name == AUTHORIZATION)) {
            // The client's key is for the gateway when the gateway checks keys: never forwarded then.
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(auth) = &worker.auth_header {
        headers.insert(AUTHORIZATION, auth.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.header());
    // The client's value when it still holds (the body was not rewritten): no number to format.
    let length = match length {
        Some(v) if content_length(v) == Some(body.len() as u64) => v.clone(),
        _ => HeaderValue::from(body.len()),
    };
    headers.insert(CONTENT_LENGTH, length);
    let mut req = http::Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_path_is_the_workers_base_path_then_the_clients() {
        let client = http::Request::post("/v1/chat/completions?x=1").body(()).expect("request").into_parts().0;
        for (base, want) in [
            ("http://w:8000", "/v1/chat/completions?x=1"),
            ("http://w:8000/", "/v1/chat/completions?x=1"),
            ("http://key@w:8000/api/", "/api/v1/chat/completions?x=1"),
        ] {
            let worker = Worker::new(1, crate::config::WorkerConfig::from_url(base));
            let id = RequestId::new(Some(&HeaderValue::from_static("id-1")));
            let req = build_upstream_request(&worker, &client, Bytes::new(), &id, false).expect("builds");
            assert_eq!(req.uri(), want, "{base}");
            assert_eq!(req.headers()[&X_REQUEST_ID], "id-1");
        }
    }

    #[test]
    fn the_upstream_head_carries_end_to_end_headers_the_id_and_the_bodys_length() {
        let mut client = http::Request::post("/v1/chat/completions").body(()).expect("request").into_parts().0;
        let h = &mut client.headers;
        for (name, value) in [
            ("host", "gateway"),
            ("connection", "keep-alive, x-drop"),
            ("transfer-encoding", "identity"),
            ("content-type", "application/json"),
            ("content-length", "7"),
            ("authorization", "Bearer client"),
            ("x-request-id", "from-client"),
            ("accept", "a"),
        ] {
            h.append(http::HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        h.append(http::header::ACCEPT, HeaderValue::from_static("b"));
        let worker = Worker::new(1, crate::config::WorkerConfig::from_url("http://w:8000"));
        let id = RequestId::new(None);
        for (body, gateway_auth, length) in [(&b"{\"a\":1}"[..], false, "7"), (&b"{}"[..], true, "2")] {
            let req =
                build_upstream_request(&worker, &client, Bytes::from_static(body), &id, gateway_auth).expect("builds");
            let h = req.headers();
            let names: std::collections::BTreeSet<_> = h.keys().map(|n| n.as_str()).collect();
            let mut want = vec!["accept", "content-length", "content-type", "x-request-id"];
            if !gateway_auth {
                want.push("authorization");
            }
            assert_eq!(
                names,
                want.into_iter().collect(),
                "hop-by-hop headers dropped, the client's key kept unless it was the gateway's"
            );
            assert_eq!(h.get_all(http::header::ACCEPT).iter().count(), 2, "repeated headers kept");
            assert_eq!(h[CONTENT_LENGTH], length, "the body's own length");
            assert_eq!(h.get_all(&X_REQUEST_ID).iter().collect::<Vec<_>>(), [id.as_str()], "the gateway's id only");
        }
    }

    #[test]
    fn backoff_is_capped_full_jitter() {
        let cfg = crate::config::RetryConfig { max_attempts: 5, base_ms: 25, max_ms: 60 };
        for retry in 1..=10 {
            let cap = [25, 50, 60][(retry as usize - 1).min(2)];
            for _ in 0..50 {
                assert!(backoff(&cfg, retry) <= Duration::from_millis(cap), "retry {retry}");
            }
        }
        let draws: std::collections::HashSet<_> = (0..100).map(|_| backoff(&cfg, 3)).collect();
        assert!(draws.len() > 10, "jittered, not fixed");
    }
}
