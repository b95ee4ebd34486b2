//! The response body relayed from a worker to the client, chunk by chunk, without buffering.
//!
//! It owns the request's [`InFlight`] record, so the worker's load slot is released and the outcome
//! recorded exactly when the body ends: at the last chunk, on an upstream failure, or when the client
//! goes away and hyper drops the body (which also drops the upstream body and so cancels the worker's
//! request at once). A streamed (SSE) answer never ends silently: if the worker dies, stalls or closes
//! early, the client gets one `data: {"error":...}` event and `data: [DONE]`.

use crate::fleet::worker::LoadGuard;
use crate::proxy::sse::SseTail;
use crate::proxy::usage::UsageScanner;
use crate::state::AppState;
use bytes::Bytes;
use gateway_core::{breaker_verdict, ErrorKind, GatewayError, Outcome, OutcomeKind, WorkerCondition};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use routing::Policy;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Everything needed to account for one request once its response ends.
pub struct InFlight {
    /// Shared state (metrics).
    pub app: Arc<AppState>,
    /// The policy that picked the worker, told of the outcome.
    pub policy: Arc<dyn Policy>,
    /// The worker's load slot.
    pub load: LoadGuard,
    /// Model label (a served model name).
    pub model: Arc<str>,
    /// The request id, for the log line.
    pub request_id: Arc<str>,
    /// Status the worker answered.
    pub status: u16,
    /// When the client's request arrived.
    pub received: Instant,
    /// When it was sent to this worker.
    pub dispatched: Instant,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Attempts before this one that failed over.
    pub retries: u32,
    /// Token counts seen in the body.
    pub usage: UsageScanner,
    /// Tokens charged up front by the rate limiter, settled with the real usage at the end.
    pub charge: Option<crate::limits::TokenCharge>,
    /// The request's count in `llm_gateway_active_requests`, released with the body.
    pub active: Option<crate::proxy::Active>,
    /// The API key's tenant, for the log line.
    pub tenant: Option<Arc<str>>,
    /// Time spent in the admission queue.
    pub queue_wait: Duration,
    first_byte: Option<Instant>,
    finished: bool,
}

impl InFlight {
    /// A record for a request just answered by `load`'s worker.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: Arc<AppState>,
        policy: Arc<dyn Policy>,
        load: LoadGuard,
        model: Arc<str>,
        request_id: Arc<str>,
        status: u16,
        received: Instant,
        dispatched: Instant,
        stream: bool,
        retries: u32,
    ) -> Self {
        Self {
            app,
            policy,
            load,
            model,
            request_id,
            status,
            received,
            dispatched,
            stream,
            retries,
            usage: UsageScanner::default(),
            charge: None,
            active: None,
            tenant: None,
            queue_wait: Duration::ZERO,
            first_byte: None,
            finished: false,
        }
    }

    fn on_data(&mut self, data: &[u8], now: Instant) {
        self.load.worker().mark_alive(now);
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(now);
            if self.stream {
                let ttft = now.duration_since(self.received).as_secs_f64();
                self.app.metrics.ttft.with_label_values(&[&self.model]).observe(ttft);
            }
        }
        self.usage.scan(data);
    }

    /// The outcome of a body that was delivered whole, by the worker's status.
    fn kind_by_status(&self) -> OutcomeKind {
        match self.status {
            200..=399 => OutcomeKind::Success,
            429 | 503 => OutcomeKind::Overloaded,
            400..=499 => OutcomeKind::ClientError,
            _ => OutcomeKind::ServerError,
        }
    }

    /// Records the outcome once: the worker's side ([`InFlight::record_attempt`]), then the request's
    /// metrics, token reconciliation and log line. For the answer the client receives.
    pub fn finish(&mut self, kind: OutcomeKind) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let now = Instant::now();
        let worker = self.record_attempt(kind, now);
        let m = &self.app.metrics;
        let latency = now.duration_since(self.received);
        let status = if kind == OutcomeKind::Cancelled { 499 } else { self.status };
        m.requests.with_label_values(&[&self.model, status_label(status)]).inc();
        m.latency.with_label_values(&[&self.model]).observe(latency.as_secs_f64());
        if let (Some(charge), Some(p), Some(c)) =
            (self.charge.take(), self.usage.prompt_tokens, self.usage.completion_tokens)
        {
            charge.reconcile(p + c);
        }
        if let Some(p) = self.usage.prompt_tokens {
            m.tokens.with_label_values(&[&self.model, "prompt"]).inc_by(p);
        }
        if let Some(c) = self.usage.completion_tokens {
            m.tokens.with_label_values(&[&self.model, "completion"]).inc_by(c);
        }
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            worker = %worker.name,
            status,
            outcome = kind.as_str(),
            stream = self.stream,
            retries = self.retries,
            tenant = self.tenant.as_deref(),
            queue_wait_ms = self.queue_wait.as_millis() as u64,
            ttft_ms = self.first_byte.filter(|_| self.stream).map(|t| t.duration_since(self.received).as_millis() as u64),
            latency_ms = latency.as_millis() as u64,
            prompt_tokens = self.usage.prompt_tokens,
            completion_tokens = self.usage.completion_tokens,
            "request"
        );
        self.active.take();
    }

    /// Records an attempt the client never sees (retried, or answered by the gateway's own error):
    /// only the worker's side, so the request itself is counted and logged once, by whoever answers it.
    pub fn finish_attempt(mut self, kind: OutcomeKind) {
        self.finished = true;
        let worker = self.record_attempt(kind, Instant::now());
        tracing::warn!(
            request_id = %self.request_id,
            worker = %worker.name,
            status = self.status,
            outcome = kind.as_str(),
            attempt = self.retries + 1,
            "upstream attempt failed"
        );
    }

    /// The worker's side of an outcome: its latency and error estimates, policy feedback, the breaker's
    /// verdict (a slow stream is a failure), and `llm_gateway_upstream_outcomes_total`.
    fn record_attempt(&mut self, kind: OutcomeKind, now: Instant) -> Arc<crate::fleet::worker::Worker> {
        let worker = Arc::clone(self.load.worker());
        let output_tokens = self.usage.completion_tokens.unwrap_or(self.usage.events.saturating_sub(1)) as u32;
        let outcome = Outcome {
            worker: worker.id,
            kind,
            ttft: self.first_byte.filter(|_| self.stream).map(|t| t.duration_since(self.dispatched)),
            latency: now.duration_since(self.dispatched),
            output_tokens,
            prompt_tokens: self.usage.prompt_tokens.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            cached_tokens: None,
            predicted_cached_tokens: None,
        };
        self.policy.observe(&outcome);
        let m = &self.app.metrics;
        // Slow calls are judged on streams only: a non-streamed answer arrives whole, so its time to
        // first byte measures the length of the generation, not the worker's health. A slow success is
        // a failure to the worker's health, in its breaker streak and its error window alike, unless the
        // worker was merely full or is the last one admitting the model (`breaker_verdict`).
        let snap = self.app.snapshot.load();
        let breaker_cfg = &snap.config.circuit_breaker;
        let slow = outcome.ttft.is_some_and(|t| t > Duration::from_millis(breaker_cfg.slow_call_threshold_ms));
        if kind == OutcomeKind::Success {
            worker.mark_success(now);
        }
        let condition = if slow && kind == OutcomeKind::Success {
            let std_now = now.into_std();
            let others_admit = snap.fleet.workers.iter().any(|w| {
                w.id != worker.id
                    && w.is_available()
                    && w.serves(&self.model)
                    && (!breaker_cfg.enabled || w.breaker_admits(std_now))
            });
            WorkerCondition {
                slow,
                full: worker.was_full(&self.load, snap.config.queue.default_worker_concurrency),
                last_admitting: !others_admit,
            }
        } else {
            WorkerCondition::default()
        };
        let verdict = breaker_verdict(kind, condition);
        worker.record(&Outcome { kind: verdict, ..outcome }, now.into_std());
        if verdict.is_failure() {
            m.breaker_failures.with_label_values(&[&worker.name]).inc();
        }
        let transition = self.load.settle(verdict, now.into_std(), breaker_cfg);
        m.count_transition(&worker.name, transition);
        m.upstream_outcomes.with_label_values(&[&worker.name, kind.as_str()]).inc();
        worker
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Dropped before the body ended: the client went away.
        self.finish(OutcomeKind::Cancelled);
    }
}

/// A bounded label for a status code.
pub fn status_label(status: u16) -> &'static str {
    const LABELS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        404 => "404",
        413 => "413",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s => LABELS[usize::from(s / 100).saturating_sub(1).min(5)],
    }
}

enum State {
    Relaying,
    Done,
}

/// Most bytes gathered into one relayed chunk.
const MAX_BATCH: usize = 64 * 1024;
/// Yields without a new frame before a gathered batch goes out. The upstream connection's task may run on
/// the other worker thread, so one empty yield can come too early; two cost well under a microsecond more.
const MAX_IDLE_YIELDS: u8 = 2;

/// The relayed response body.
pub struct RelayBody {
    upstream: Incoming,
    sse: bool,
    state: State,
    tail: SseTail,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    deadline: Pin<Box<Sleep>>,
    inflight: Option<InFlight>,
    /// Event-stream bytes received but not yet handed to hyper (see `poll_frame`).
    batch: bytes::BytesMut,
    /// Yields in a row that brought no new frame (the batch goes out after [`MAX_IDLE_YIELDS`]).
    idle_yields: u8,
    /// An upstream end or failure seen while a batch was pending; handled after the batch is sent.
    deferred: Option<Deferred>,
}

/// What the upstream did after a batch started.
enum Deferred {
    End,
    Failed(String),
}

impl RelayBody {
    /// Relays `upstream`; `sse` turns on the never-end-silently guarantees of event streams.
    pub fn new(upstream: Incoming, sse: bool, inflight: InFlight, idle_timeout: Duration, deadline: Instant) -> Self {
        Self {
            upstream,
            sse,
            state: State::Relaying,
            tail: SseTail::default(),
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            inflight: Some(inflight),
            batch: bytes::BytesMut::new(),
            idle_yields: 0,
            deferred: None,
        }
    }

    fn finish(&mut self, kind: OutcomeKind) {
        if let Some(mut inflight) = self.inflight.take() {
            inflight.finish(kind);
        }
    }

    /// Ends the body after a failure: an SSE error event and `[DONE]`, or an error that makes hyper abort
    /// the connection (a truncated JSON body must not look complete).
    fn fail(&mut self, kind: OutcomeKind, reason: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let worker = self.inflight.as_ref().map(|f| f.load.worker().name.clone()).unwrap_or_default();
        self.finish(kind);
        if !self.sse {
            self.state = State::Done;
            return Poll::Ready(Some(Err(format!("worker {worker}: {reason}").into())));
        }
        let error =
            GatewayError::new(ErrorKind::UpstreamUnavailable, format!("worker {worker} failed mid-stream: {reason}"))
                .with_code("upstream_stream_error");
        // Close any half-written event first so the error is an event of its own.
        let event = format!("{}data: {}\n\ndata: [DONE]\n\n", self.tail.separator(), error.body());
        self.state = State::Done;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    /// Hands the gathered event-stream bytes to hyper.
    fn flush_batch(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.idle_yields = 0;
        Poll::Ready(Some(Ok(Frame::data(self.batch.split().freeze()))))
    }

    /// The upstream body ended: an event stream must have carried `[DONE]`.
    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sse && !self.tail.saw_done() {
            return self.fail(OutcomeKind::ServerError, "the stream ended before [DONE]".into());
        }
        self.end_ok();
        Poll::Ready(None)
    }

    /// The body was delivered whole: the outcome follows the worker's status.
    fn end_ok(&mut self) {
        let kind = self.inflight.as_ref().map_or(OutcomeKind::Success, InFlight::kind_by_status);
        self.finish(kind);
        self.state = State::Done;
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    /// Relays frames as they come. For event streams, frames that are already available are gathered
    /// into one chunk, and the task yields once before handing them over: hyper's client delivers one
    /// frame per task hand-off, so without this every SSE event costs its own `writev` to the client
    /// (nginx, reading the socket itself, gets them in one read). The task yields while yields
    /// still bring frames, and sends the batch after [`MAX_IDLE_YIELDS`] that bring none: no waiting on
    /// the worker, only on frames already on their way.
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let State::Done = this.state {
            return Poll::Ready(None);
        }
        if this.batch.is_empty() {
            match this.deferred.take() {
                Some(Deferred::End) => return this.end(),
                Some(Deferred::Failed(reason)) => return this.fail(OutcomeKind::ServerError, reason),
                None => {}
            }
        }
        loop {
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(data) = frame.data_ref() else {
                        // Trailers: send what is gathered first; trailers of an LLM answer are rare.
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let now = Instant::now();
                    if let Some(inflight) = this.inflight.as_mut() {
                        inflight.on_data(data, now);
                    }
                    let next = now + this.idle_timeout;
                    this.idle.as_mut().reset(next);
                    if !this.sse {
                        // A body with a known length is complete at its last byte; hyper may not poll again.
                        if this.upstream.is_end_stream() {
                            this.end_ok();
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let data = data.clone();
                    this.tail.push(&data);
                    this.batch.extend_from_slice(&data);
                    // Progress since the last yield: another yield may bring more.
                    this.idle_yields = 0;
                    if this.batch.len() >= MAX_BATCH {
                        return this.flush_batch();
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let reason = format!("connection broke: {e}");
                    if this.batch.is_empty() {
                        return this.fail(OutcomeKind::ServerError, reason);
                    }
                    this.deferred = Some(Deferred::Failed(reason));
                    return this.flush_batch();
                }
                Poll::Ready(None) => {
                    if this.batch.is_empty() {
                        return this.end();
                    }
                    this.deferred = Some(Deferred::End);
                    return this.flush_batch();
                }
                Poll::Pending => {
                    if !this.batch.is_empty() {
                        if this.idle_yields < MAX_IDLE_YIELDS {
                            this.idle_yields += 1;
                            // `yield_now` defers the wake-up until other ready tasks (the upstream
                            // connection's) have run; a plain self-wake would run this task again first.
                            let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                            return Poll::Pending;
                        }
                        return this.flush_batch();
                    }
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        return this
                            .fail(OutcomeKind::Timeout, "the request exceeded upstream.total_timeout_ms".into());
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        return this.fail(OutcomeKind::Timeout, "no data within upstream.idle_timeout_ms".into());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            SizeHint::default()
        } else {
            self.upstream.size_hint()
        }
    }
}

/// Drops the usage event (`"choices":[]` with `"usage"`) from an event stream: the gateway asked the
/// worker for it to count tokens, and the client did not. Events are passed on whole; a partial event
/// waits for the rest of it.
pub struct StripUsage {
    inner: axum::body::Body,
    carry: bytes::BytesMut,
    done: bool,
}

impl StripUsage {
    /// Wraps a relayed event-stream body.
    pub fn new(inner: axum::body::Body) -> Self {
        Self { inner, carry: bytes::BytesMut::new(), done: false }
    }
}

impl Body for StripUsage {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = crate::proxy::sse::strip_usage_events(&mut this.carry, &data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.carry.split().freeze();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod strip_tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn usage_event_is_dropped_and_others_pass_whole() {
        let stream = "data: {\"choices\":[{\"delta\":{}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n";
        for split in [1usize, 5, 17, 1000] {
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                stream.as_bytes().chunks(split).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            let out = StripUsage::new(body).collect().await.expect("collects").to_bytes();
            let out = String::from_utf8(out.to_vec()).expect("utf-8");
            assert_eq!(out, "data: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n", "split {split}");
        }
    }
}
