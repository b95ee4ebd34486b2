//! The inference endpoints: read and parse the body, pick a worker, forward the original bytes, relay
//! the answer. Failures before the first byte reaches the client are retried on another worker.

pub mod admission;
pub mod relay;
pub mod sse;
pub mod upstream;
pub mod usage;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::fleet::worker::{Refused, Worker};
use crate::proxy::admission::Reservation;
use crate::proxy::relay::{status_label, InFlight, RelayBody};
use crate::server::budget::{ByteBudget, Held};
use crate::state::{AppState, Snapshot};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gateway_core::request::PrefixOptions;
use gateway_core::{ErrorKind, GatewayError, OutcomeKind, Priority, RequestFeatures};
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Gateway-Worker`: the worker that served the request.
pub static X_GATEWAY_WORKER: HeaderName = HeaderName::from_static("x-gateway-worker");
/// `X-Priority`: the client's priority class.
pub static X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");
/// `X-Session-Id`: the session key for consistent hashing.
pub static X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");

/// Longest client-supplied request id accepted; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
pub async fn forward(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let received = Instant::now();
    let request_id = request_id(req.headers());
    let active = Active::new(&app.metrics.active_requests);
    let mut resp = match handle(&app, req, &request_id, received, active).await {
        Ok(resp) => resp,
        Err((err, model)) => {
            let status = err.status();
            app.metrics
                .requests
                .with_label_values(&[model.as_deref().unwrap_or("unknown"), status_label(status)])
                .inc();
            tracing::info!(request_id = %request_id, model = model.as_deref().unwrap_or("-"), status, error = %err, "request");
            ApiError(err).into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

/// One count in `llm_gateway_active_requests`, held from arrival until the response body ends (the
/// relayed body takes it over) or the handler answers an error.
pub struct Active(prometheus::IntGauge);

impl Active {
    /// Counts one active request.
    pub fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The client's `X-Request-Id` when it is a sane header value (short, nothing [`gateway_core::echo`]
/// would escape, so it is logged as sent), else a new UUID.
fn request_id(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= MAX_REQUEST_ID && gateway_core::echo(s) == *s)
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(uuid::Uuid::new_v4().to_string()))
}

type Failure = (GatewayError, Option<Arc<str>>);

/// `X-Queue-Position`: the request's position when it entered the admission queue (0: it did not wait).
pub static X_QUEUE_POSITION: HeaderName = HeaderName::from_static("x-queue-position");
/// `X-Estimated-Wait`: seconds it was expected to wait when it entered the queue.
pub static X_ESTIMATED_WAIT: HeaderName = HeaderName::from_static("x-estimated-wait");

async fn handle(
    app: &Arc<AppState>,
    req: Request,
    request_id: &Arc<str>,
    received: Instant,
    active: Active,
) -> Result<Response, Failure> {
    let snap = app.snapshot.load_full();
    let client_addr = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let (parts, body) = req.into_parts();
    // Unknown callers are turned away before their body is read. A batch line carries its batch's
    // tenant in an extension only the in-process runner can set.
    let batch_line = parts.extensions.get::<crate::batch::BatchOrigin>().cloned();
    let tenant = match &batch_line {
        Some(origin) => origin.tenant.clone(),
        None => snap.auth.authenticate(&parts.headers).map_err(|e| (e, None))?,
    };
    check_content_type(&parts.headers).map_err(|e| (e, None))?;
    // The body's bytes stay counted in `server.max_buffered_bytes` until this request is answered.
    let (mut bytes, _buffered) =
        read_body(body, &parts.headers, &snap.config.server, &app.body_budget).await.map_err(|e| (e, None))?;
    let mut features = RequestFeatures::parse(&bytes, PrefixOptions::default()).map_err(|e| {
        let why = gateway_core::echo(&e.to_string()).into_owned();
        (GatewayError::new(ErrorKind::InvalidJson, format!("invalid JSON body: {why}")), None)
    })?;
    if let Some(t) = &tenant {
        features.priority = t.priority;
    }
    apply_headers(&mut features, &parts.headers);
    if batch_line.is_some() {
        features.priority = Priority::Batch;
    }
    let model = resolve_model(&snap, &features).map_err(|e| (e, None))?;
    let fail = |e| (e, Some(Arc::clone(&model)));
    let rl = &snap.config.rate_limit;
    let (quota, charge) = if rl.enabled {
        let tokens = features.estimated_tokens(rl.default_max_tokens);
        let limiter = app.limiter.load_full();
        let who = features.user.as_deref();
        let (quota, charge) = limiter.check(rl, &app.metrics, tenant.as_deref(), who, tokens).await.map_err(fail)?;
        (Some(quota), charge)
    } else {
        (None, None)
    };
    // Token limits need the real usage of streams too: ask the worker for it, and strip it again when
    // the client did not ask.
    let strip_usage = charge.is_some() && features.stream && !features.include_usage;
    if strip_usage {
        bytes = with_include_usage(&bytes).map_err(fail)?;
    }
    let tenant_key = tenant_key(tenant.as_deref().map(|t| &*t.name).or(features.user.as_deref()), client_addr);
    let mut ctx = Ctx {
        parts: &parts,
        bytes: &bytes,
        features: &features,
        model: &model,
        request_id,
        received,
        charge,
        strip_usage,
        active: Some(active),
        tenant: tenant.as_ref().map(|t| Arc::clone(&t.name)),
        queue_wait: Duration::ZERO,
    };
    let mut attempt = Attempts::default();
    // A request that finds no worker with room (another took the last slot) goes back to the queue.
    loop {
        let eligible = eligible(app, &snap, &model, &attempt.tried, std::time::Instant::now());
        let (ticket, reservation) =
            app.admission.admit(&model, &eligible, features.priority, tenant_key).await.map_err(fail)?;
        if ticket.position > 0 {
            app.metrics.queue_wait.with_label_values(&[&model]).observe(ticket.waited.as_secs_f64());
        }
        ctx.queue_wait += ticket.waited;
        match dispatch(app, &snap, &mut ctx, reservation, &mut attempt).await {
            Err(Failed::NoRoom) => continue,
            Err(Failed::Error(e)) => {
                // Nothing was generated: the tokens charged up front go back.
                if let Some(charge) = ctx.charge.take() {
                    charge.reconcile(0);
                }
                return Err(fail(e));
            }
            Ok(mut resp) => {
                app.admission.record_dispatch(&model, ctx.queue_wait);
                let h = resp.headers_mut();
                h.insert(X_QUEUE_POSITION.clone(), HeaderValue::from(ticket.position));
                if let Ok(v) = HeaderValue::from_str(&format!("{:.1}", ticket.estimated_wait.as_secs_f64())) {
                    h.insert(X_ESTIMATED_WAIT.clone(), v);
                }
                if let Some(q) = &quota {
                    crate::limits::set_headers(h, q);
                }
                return Ok(resp);
            }
        }
    }
}

/// The request as `dispatch` needs it.
struct Ctx<'a> {
    parts: &'a http::request::Parts,
    bytes: &'a Bytes,
    features: &'a RequestFeatures,
    model: &'a Arc<str>,
    request_id: &'a Arc<str>,
    received: Instant,
    /// Tokens charged up front, handed to the response that answers.
    charge: Option<crate::limits::TokenCharge>,
    /// Drop the usage chunk the gateway asked for on the client's behalf.
    strip_usage: bool,
    /// The request's count in the active-requests gauge, handed to the response that answers.
    active: Option<Active>,
    /// The API key's tenant, for the log line.
    tenant: Option<Arc<str>>,
    /// Time spent in the admission queue so far.
    queue_wait: Duration,
}

/// The body with `stream_options.include_usage` set (the only case where the gateway rewrites a body).
fn with_include_usage(body: &[u8]) -> Result<Bytes, GatewayError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::new(ErrorKind::InvalidJson, format!("invalid JSON body: {e}")))?;
    if let Some(obj) = v.as_object_mut() {
        let opts = obj.entry("stream_options").or_insert_with(|| serde_json::json!({}));
        if let Some(opts) = opts.as_object_mut() {
            opts.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| GatewayError::new(ErrorKind::Internal, format!("re-encoding the body failed: {e}")))
}

/// The tenant a request is queued under for fairness: its `user`, else its client address.
fn tenant_key(user: Option<&str>, addr: Option<std::net::IpAddr>) -> u64 {
    use gateway_core::prefix::hash_bytes;
    match (user, addr) {
        (Some(u), _) => hash_bytes(3, u.as_bytes()),
        (None, Some(ip)) => hash_bytes(4, ip.to_string().as_bytes()),
        (None, None) => 0,
    }
}

/// Workers that may take a request for `model` now: healthy, not draining, serving it, not tried
/// yet, breaker admitting, below their per-worker rate.
fn eligible<'a>(
    app: &AppState,
    snap: &'a Snapshot,
    model: &str,
    tried: &[u64],
    now: std::time::Instant,
) -> Vec<&'a Arc<Worker>> {
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

fn check_content_type(headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(ct) = headers.get(CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") || essence.to_ascii_lowercase().ends_with("+json") {
        Ok(())
    } else {
        Err(GatewayError::new(
            ErrorKind::UnsupportedContentType,
            format!("Content-Type must be application/json, got {:?}", gateway_core::echo(ct)),
        ))
    }
}

/// Reads the whole body, bounded three ways: `server.max_body_bytes` (413), `server.body_read_timeout_ms`
/// (408: a client trickling its body cannot hold the request forever) and the bytes all bodies hold at
/// once, `server.max_buffered_bytes` (503 `server_busy`). The bytes stay counted until the guard drops.
async fn read_body(
    mut body: Body,
    headers: &HeaderMap,
    server: &ServerConfig,
    budget: &Arc<ByteBudget>,
) -> Result<(Bytes, Held), GatewayError> {
    let limit = server.max_body_bytes;
    let too_large = || {
        GatewayError::new(ErrorKind::BodyTooLarge, format!("request body is larger than the limit of {limit} bytes"))
    };
    let busy = || {
        GatewayError::new(
            ErrorKind::ServerBusy,
            "the gateway is reading too many request bodies at once; retry shortly",
        )
        .with_retry_after(1)
    };
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // A declared length is taken up front: refused at once rather than after most of it arrived.
    let declared = declared.map_or(0, |n| n as usize);
    let mut held = budget.take(declared, server.max_buffered_bytes).ok_or_else(busy)?;
    let timeout = Duration::from_millis(server.body_read_timeout_ms);
    let deadline = Instant::now() + timeout;
    let mut buf = bytes::BytesMut::with_capacity(declared);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::RequestTimeout,
                    format!("the request body did not arrive within {} ms", timeout.as_millis()),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(GatewayError::new(ErrorKind::InvalidJson, format!("could not read the request body: {e}")))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        let total = buf.len() + data.len();
        if total > limit {
            return Err(too_large());
        }
        if !held.grow_to(total, server.max_buffered_bytes) {
            return Err(busy());
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), held))
}

fn apply_headers(features: &mut RequestFeatures, headers: &HeaderMap) {
    if let Some(p) = headers.get(&X_PRIORITY).and_then(|v| v.to_str().ok()).and_then(Priority::parse) {
        features.priority = p;
    }
    if let Some(s) = headers.get(&X_SESSION_ID).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()) {
        features.set_session_header(s);
    }
}

/// The model to route by: the one named, or the one served when none is named.
fn resolve_model(snap: &Snapshot, features: &RequestFeatures) -> Result<Arc<str>, GatewayError> {
    match features.model.as_deref() {
        Some(model) if snap.fleet.knows_model(model) => Ok(Arc::from(model)),
        // The name is the client's: bounded and escaped before it reaches the answer and the log line.
        Some(model) => Err(GatewayError::new(
            ErrorKind::ModelNotFound,
            format!("The model `{}` does not exist.", gateway_core::echo(model)),
        )
        .with_param("model")),
        None => {
            let models = snap.fleet.healthy_models();
            let mut it = models.into_iter();
            match (it.next(), it.next()) {
                (Some(only), None) => Ok(Arc::from(only)),
                (None, _) => Err(GatewayError::new(ErrorKind::NoHealthyWorker, "no healthy worker is available")),
                (Some(_), Some(_)) => Err(GatewayError::new(
                    ErrorKind::ModelRequired,
                    "`model` is required: this gateway serves several models",
                )
                .with_param("model")),
            }
        }
    }
}

/// What the attempts of one request have done so far (kept across trips back to the queue).
#[derive(Default)]
struct Attempts {
    tried: Vec<u64>,
    count: u32,
    last_error: Option<GatewayError>,
}

/// Why `dispatch` gave up.
enum Failed {
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

/// Picks a worker (the reserved one first, if the queue handed one out), sends, and retries on another
/// worker while nothing has reached the client.
async fn dispatch(
    app: &Arc<AppState>,
    snap: &Arc<Snapshot>,
    ctx: &mut Ctx<'_>,
    mut reservation: Option<Reservation>,
    attempts: &mut Attempts,
) -> Result<Response, Failed> {
    let (parts, bytes, features, model, request_id, received) =
        (ctx.parts, ctx.bytes, ctx.features, ctx.model, ctx.request_id, ctx.received);
    let cfg = &snap.config;
    let deadline = received + Duration::from_millis(cfg.upstream.total_timeout_ms);
    let breakers = cfg.circuit_breaker.enabled;
    let queueing = cfg.queue.enabled;
    loop {
        let now = std::time::Instant::now();
        let all = eligible(app, snap, model, &attempts.tried, now);
        let (worker, load) = match reservation.take() {
            Some(r) => {
                let worker = Arc::clone(r.worker());
                match Worker::acquire_reserved(r, breakers, now) {
                    Ok(load) => (worker, load),
                    Err(_) => continue,
                }
            }
            None => {
                let class = features.priority;
                let candidates: Vec<&Arc<Worker>> =
                    all.iter().copied().filter(|w| !queueing || app.admission.has_room_for(w, class)).collect();
                if candidates.is_empty() && !all.is_empty() {
                    return Err(Failed::NoRoom);
                }
                let views: Vec<_> = candidates.iter().map(|w| w.view()).collect();
                let Some(pick) = snap.policy.select(features, &views, &mut rand::rng()) else {
                    return Err(Failed::Error(attempts.last_error.take().unwrap_or_else(|| no_worker(snap, model))));
                };
                let worker = Arc::clone(candidates[pick]);
                let cap = if queueing { app.admission.slots_for(&worker, class) } else { u32::MAX };
                match worker.acquire(breakers, cap, now) {
                    Ok(load) => (worker, load),
                    Err(Refused::Full) => return Err(Failed::NoRoom),
                    // Another request took the last half-open trial: not an attempt, pick again.
                    Err(Refused::Breaker(_)) => {
                        attempts.tried.push(worker.id);
                        continue;
                    }
                }
            }
        };
        let mut load = load.notify(&app.admission);
        attempts.tried.push(worker.id);
        app.metrics.count_transition(&worker.name, load.take_transition());
        app.metrics.routing_decisions.with_label_values(&[snap.policy.name(), &worker.name]).inc();
        snap.policy.on_dispatch(features, worker.id);
        if cfg.rate_limit.enabled {
            app.limiter.load().charge_worker(worker.id, cfg.rate_limit.per_worker_qps);
        }
        attempts.count += 1;
        let attempt = attempts.count;
        // Retry only where another worker could take it; otherwise the worker's own answer stands.
        let may_retry = attempt < cfg.retry.max_attempts && all.iter().any(|w| w.id != worker.id);
        let dispatched = Instant::now();
        let upstream_req = build_upstream_request(&worker, parts, bytes.clone(), request_id, snap.auth.enabled())?;
        let first_byte_ms = if features.stream {
            cfg.upstream.stream_first_byte_timeout_ms.min(cfg.upstream.first_byte_timeout_ms)
        } else {
            cfg.upstream.first_byte_timeout_ms
        };
        let first_byte_by = (dispatched + Duration::from_millis(first_byte_ms)).min(deadline);
        let inflight = |load, status: u16| {
            InFlight::new(
                Arc::clone(app),
                Arc::clone(&snap.policy),
                load,
                Arc::clone(model),
                Arc::clone(request_id),
                status,
                received,
                dispatched,
                features.stream,
                attempt - 1,
            )
        };
        let stall =
            guard::StallRule { floor: Duration::from_millis(cfg.upstream.stall_timeout_ms), factor: STALL_FACTOR };
        let answer = await_answer(&worker, app.client.request(upstream_req), dispatched, first_byte_by, stall).await;
        let failure = match answer {
            Answer::Headers(Ok(resp)) => {
                let status = resp.status();
                let now = Instant::now();
                worker.mark_alive(now);
                if !features.stream && status.is_success() {
                    worker.record_answer_time(now.duration_since(dispatched));
                }
                let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                if !(retryable && may_retry) {
                    let mut inflight = inflight(load, status.as_u16());
                    inflight.charge = ctx.charge.take();
                    inflight.active = ctx.active.take();
                    inflight.tenant = ctx.tenant.clone();
                    inflight.queue_wait = ctx.queue_wait;
                    let relayed = relay(resp, inflight, cfg.upstream.idle_timeout_ms, deadline, &worker.name);
                    return Ok(if ctx.strip_usage { strip_usage_chunk(relayed) } else { relayed });
                }
                let kind = if matches!(status.as_u16(), 429 | 503) {
                    OutcomeKind::Overloaded
                } else {
                    OutcomeKind::ServerError
                };
                inflight(load, status.as_u16()).finish_attempt(kind);
                GatewayError::new(ErrorKind::UpstreamUnavailable, format!("worker {} answered {status}", worker.name))
            }
            Answer::Headers(Err(e)) => {
                let kind = if e.is_connect() { OutcomeKind::ConnectError } else { OutcomeKind::ServerError };
                inflight(load, 502).finish_attempt(kind);
                GatewayError::new(
                    ErrorKind::UpstreamUnavailable,
                    format!("worker {} failed: {}", worker.name, error_chain(&e)),
                )
            }
            Answer::TimedOut => {
                inflight(load, 504).finish_attempt(OutcomeKind::Timeout);
                GatewayError::new(ErrorKind::UpstreamTimeout, format!("worker {} did not answer in time", worker.name))
            }
            Answer::Stalled { silent } => {
                if breakers {
                    let transition = worker.trip_breaker(std::time::Instant::now());
                    app.metrics.count_transition(&worker.name, transition);
                }
                tracing::warn!(
                    worker = %worker.name,
                    silent_ms = silent.as_millis() as u64,
                    in_flight = worker.view().in_flight,
                    "worker stalled: no answer, bytes or tokens while holding requests; cut off"
                );
                inflight(load, 504).finish_attempt(OutcomeKind::Timeout);
                GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("worker {} stalled: no sign of life for {} ms", worker.name, silent.as_millis()),
                )
            }
        };
        if !may_retry {
            return Err(Failed::Error(failure));
        }
        attempts.last_error = Some(failure);
        let pause = backoff(&cfg.retry, attempt);
        if Instant::now() + pause >= deadline {
            return Err(Failed::Error(attempts.last_error.take().unwrap_or_else(|| no_worker(snap, model))));
        }
        app.metrics.retries.inc();
        tokio::time::sleep(pause).await;
    }
}

/// How many times its usual answer time a worker may stay silent before it counts as stalled.
const STALL_FACTOR: f64 = 4.0;

/// How the wait for a worker's response headers ended.
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
    send: F,
    sent: Instant,
    by: Instant,
    rule: guard::StallRule,
) -> Answer<F::Output> {
    let threshold = rule.threshold(worker.usual_answer_time());
    let mut send = std::pin::pin!(send);
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Headers that describe one connection, not the message; never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn build_upstream_request(
    worker: &Worker,
    parts: &http::request::Parts,
    body: Bytes,
    request_id: &str,
    gateway_auth: bool,
) -> Result<http::Request<Full<Bytes>>, GatewayError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: http::Uri = format!("{}{}", worker.base_url, path)
        .parse()
        .map_err(|e| GatewayError::new(ErrorKind::Internal, format!("bad upstream URI: {e}")))?;
    let mut req = http::Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    for (name, value) in &parts.headers {
        // The client's key is for the gateway when the gateway checks keys: never forward it.
        let gateway_secret = gateway_auth && name == AUTHORIZATION;
        if !is_hop_by_hop(name) && name != X_REQUEST_ID && !gateway_secret {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(auth) = &worker.auth_header {
        headers.insert(AUTHORIZATION, auth.clone());
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    Ok(req)
}

/// Makes a relayed stream drop the usage chunk the gateway asked for on the client's behalf.
fn strip_usage_chunk(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(crate::proxy::relay::StripUsage::new(body)))
}

fn relay(
    resp: http::Response<hyper::body::Incoming>,
    inflight: InFlight,
    idle_timeout_ms: u64,
    deadline: Instant,
    worker_name: &str,
) -> Response {
    let (parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let mut out =
        Response::new(Body::new(RelayBody::new(body, sse, inflight, Duration::from_millis(idle_timeout_ms), deadline)));
    *out.status_mut() = parts.status;
    let headers = out.headers_mut();
    for (name, value) in &parts.headers {
        // An event stream may gain a final error event, so it must not keep a fixed length.
        if !is_hop_by_hop(name) || (name == CONTENT_LENGTH && !sse) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(worker_name) {
        headers.insert(X_GATEWAY_WORKER.clone(), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_rules() {
        let mut h = HeaderMap::new();
        assert!(check_content_type(&h).is_ok(), "absent is accepted");
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert!(check_content_type(&h).is_ok());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        assert_eq!(check_content_type(&h).unwrap_err().status(), 400);
    }

    fn server(max_body_bytes: usize, max_buffered_bytes: usize) -> ServerConfig {
        ServerConfig { max_body_bytes, max_buffered_bytes, ..ServerConfig::default() }
    }

    fn chunks(parts: Vec<&'static [u8]>, then_stall: bool) -> Body {
        let sent =
            futures_util::stream::iter(parts.into_iter().map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p))));
        if then_stall {
            Body::from_stream(futures_util::StreamExt::chain(sent, futures_util::stream::pending()))
        } else {
            Body::from_stream(sent)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_not_whole_within_the_body_timeout_is_408() {
        let budget = ByteBudget::new();
        let started = Instant::now();
        let err = read_body(chunks(vec![b"{\"model\"", b":"], true), &HeaderMap::new(), &server(1024, 4096), &budget)
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(ServerConfig::default().body_read_timeout_ms));
        assert_eq!(err.status(), 408);
        assert_eq!(err.body()["error"]["code"], "request_timeout");
        assert_eq!(budget.used(), 0, "a failed read gives its bytes back");
    }

    #[tokio::test]
    async fn bodies_share_one_byte_budget() {
        let budget = ByteBudget::new();
        let cfg = server(100, 150);
        let mut declared = HeaderMap::new();
        declared.insert(CONTENT_LENGTH, HeaderValue::from(100));
        let (bytes, held) = read_body(Body::from(vec![b'x'; 100]), &declared, &cfg, &budget).await.unwrap();
        assert_eq!((bytes.len(), budget.used()), (100, 100), "held until the request is answered");
        // A declared length that does not fit is refused before a byte is read.
        let err = read_body(chunks(vec![], true), &declared, &cfg, &budget).await.unwrap_err();
        assert_eq!((err.status(), err.retry_after_secs), (503, Some(1)));
        assert_eq!(err.body()["error"]["code"], "server_busy");
        // Without a length, chunks are counted as they arrive.
        let err = read_body(chunks(vec![&[b'y'; 30], &[b'y'; 30]], false), &HeaderMap::new(), &cfg, &budget)
            .await
            .unwrap_err();
        assert_eq!(err.body()["error"]["code"], "server_busy");
        assert_eq!(budget.used(), 100, "the refused bodies hold nothing");
        drop(held);
        let (bytes, _held) =
            read_body(chunks(vec![&[b'y'; 30], &[b'y'; 30]], false), &HeaderMap::new(), &cfg, &budget).await.unwrap();
        assert_eq!((bytes.len(), budget.used()), (60, 60));
        let err =
            read_body(Body::from(vec![b'x'; 101]), &HeaderMap::new(), &cfg, &ByteBudget::new()).await.unwrap_err();
        assert_eq!(err.status(), 413, "max_body_bytes still applies");
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

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let generated = request_id(&h);
        assert!(uuid::Uuid::parse_str(&generated).is_ok());
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-1"));
        assert_eq!(&*request_id(&h), "abc-1");
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(&"x".repeat(500)).unwrap());
        assert_ne!(request_id(&h).len(), 500);
        for forged in ["a\tb", "a\\nb"] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(forged).unwrap());
            assert!(uuid::Uuid::parse_str(&request_id(&h)).is_ok(), "{forged:?} is replaced");
        }
    }
}
