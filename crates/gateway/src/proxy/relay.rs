//! The response body relayed from a worker to the client, chunk by chunk, without buffering.
//!
//! It owns the attempt's [`RequestRecord`], so the worker's load slot is released and the outcome
//! recorded exactly when the body ends: at the last chunk, on an upstream failure, or when the client
//! goes away and hyper drops the body (which also drops the upstream body and so cancels the worker's
//! request at once). A streamed (SSE) answer never ends silently: if the worker dies, stalls or closes
//! early, the client gets one `data: {"error":...}` event and `data: [DONE]`.

use crate::proxy::accounting::RequestRecord;
use crate::proxy::classify::{classify, AttemptEnd};
use crate::proxy::request::X_GATEWAY_WORKER;
use crate::proxy::sse::SseTail;
use crate::upstream::connections::WorkerBody;
use crate::upstream::strip_hop_by_hop;
use axum::response::Response;
use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError, OutcomeKind};
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

enum State {
    Relaying,
    Done,
}

/// Most bytes gathered into one relayed chunk.
const MAX_BATCH: usize = 64 * 1024;

/// The relayed response body.
pub struct RelayBody {
    upstream: WorkerBody,
    sse: bool,
    state: State,
    tail: SseTail,
    idle_timeout: Duration,
    /// When the last data came (the idle timeout counts from it).
    last_data: Instant,
    /// `upstream.total_timeout_ms` from the request's arrival.
    deadline: Instant,
    /// Fires at the earlier of the idle and total timeouts; made the first time the worker makes the
    /// body wait (an answer that arrives whole never needs one). Data that comes meanwhile does not move
    /// it: it fires at the deadline it was set to, and is moved on then if data came since.
    timer: Option<Pin<Box<Sleep>>>,
    record: Option<RequestRecord>,
    /// Event-stream bytes received but not yet handed to hyper (see `poll_frame`).
    batch: bytes::BytesMut,
    /// Whether an event-stream chunk went out yet: the first is handed over at once (its time to first
    /// byte is the client's time to first token); only later ones are gathered.
    first_sent: bool,
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
    pub fn new(
        upstream: WorkerBody,
        sse: bool,
        record: RequestRecord,
        idle_timeout: Duration,
        deadline: Instant,
    ) -> Self {
        Self {
            upstream,
            sse,
            state: State::Relaying,
            tail: SseTail::default(),
            idle_timeout,
            last_data: Instant::now(),
            deadline,
            timer: None,
            record: Some(record),
            batch: bytes::BytesMut::new(),
            first_sent: false,
            deferred: None,
        }
    }

    fn finish(&mut self, kind: OutcomeKind) {
        if let Some(mut record) = self.record.take() {
            record.finish(kind);
        }
    }

    /// Ends the body after a failure: an SSE error event and `[DONE]`, or an error that makes hyper abort
    /// the connection (a truncated JSON body must not look complete).
    fn fail(&mut self, kind: OutcomeKind, reason: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let worker = self.record.as_ref().map(|r| r.worker().name.clone()).unwrap_or_default();
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
        self.first_sent = true;
        Poll::Ready(Some(Ok(Frame::data(self.batch.split().freeze()))))
    }

    /// The upstream body ended: an event stream must have carried `[DONE]`.
    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // A Responses stream ends with its `response.completed` event, not `[DONE]`.
        let done_required = self.record.as_ref().is_some_and(RequestRecord::stream_ends_with_done);
        if self.sse && done_required && !self.tail.saw_done() {
            return self.fail(classify(AttemptEnd::Broken).kind, "the stream ended before [DONE]".into());
        }
        self.end_ok();
        Poll::Ready(None)
    }

    /// The body was delivered whole: the outcome follows the worker's status.
    fn end_ok(&mut self) {
        let kind = self.record.as_ref().map_or(OutcomeKind::Success, RequestRecord::delivered);
        self.finish(kind);
        self.state = State::Done;
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // A client that leaves once `[DONE]` was handed over got the whole stream (the openai SDK stops
        // reading there, often before the worker closes its body): delivered, not cancelled.
        if self.record.is_some() && self.sse && self.tail.saw_done() && self.batch.is_empty() {
            self.end_ok();
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    /// Relays frames as they come. For event streams, the first frame goes out at once; after it, the
    /// frames already read from the worker's socket (this task drives the connection, so that is every
    /// frame available until the body is pending) are gathered into one chunk: events that arrived
    /// together cost one `writev` to the client, not one each, and nothing waits on the worker.
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let State::Done = this.state {
            return Poll::Ready(None);
        }
        if this.batch.is_empty() {
            match this.deferred.take() {
                Some(Deferred::End) => return this.end(),
                Some(Deferred::Failed(reason)) => return this.fail(classify(AttemptEnd::Broken).kind, reason),
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
                    if let Some(record) = this.record.as_mut() {
                        record.on_data(data, now, this.sse);
                    }
                    this.last_data = now;
                    if !this.sse {
                        // A body with a known length is complete at its last byte; hyper may not poll again.
                        if this.upstream.is_end_stream() {
                            this.end_ok();
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let data = data.clone();
                    this.tail.push(&data);
                    if !this.first_sent {
                        // The first chunk goes out as it came, without waiting for company.
                        this.first_sent = true;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // Copied, not held: a chunk still held when the worker's connection reads again
                    // would make hyper allocate a new read buffer (measured: two allocations per event).
                    this.batch.extend_from_slice(&data);
                    if this.batch.len() >= MAX_BATCH {
                        return this.flush_batch();
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let reason = format!("connection broke: {e}");
                    if this.batch.is_empty() {
                        return this.fail(classify(AttemptEnd::Broken).kind, reason);
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
                        return this.flush_batch();
                    }
                    let idle_at = this.last_data + this.idle_timeout;
                    let at = idle_at.min(this.deadline);
                    match &mut this.timer {
                        // Set no later than `at` (which only moves later) and polled when set: it wakes
                        // this task in time, and is not touched on every chunk.
                        Some(timer) if !timer.is_elapsed() => return Poll::Pending,
                        // It fired, but data came since: on to the new deadline.
                        Some(timer) if at > Instant::now() => timer.as_mut().reset(at),
                        Some(_) => {}
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    if this.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_pending()) {
                        return Poll::Pending;
                    }
                    let reason = if this.deadline <= idle_at {
                        "the request exceeded upstream.total_timeout_ms"
                    } else {
                        "no data within upstream.idle_timeout_ms"
                    };
                    return this.fail(classify(AttemptEnd::TimedOut).kind, reason.into());
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

/// The client's response for a worker's answer: status and end-to-end headers, `X-Gateway-Worker`, and
/// the relayed body owning `record`.
pub fn relayed_response(
    resp: http::Response<WorkerBody>,
    record: RequestRecord,
    idle_timeout: Duration,
    deadline: Instant,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    // The worker's own map, its hop-by-hop headers taken out. An event stream may gain a final error
    // event, so it must not keep a fixed length.
    strip_hop_by_hop(&mut parts.headers, !sse);
    if let Some(v) = &record.worker().name_header {
        parts.headers.insert(X_GATEWAY_WORKER.clone(), v.clone());
    }
    let mut out = Response::new(axum::body::Body::new(RelayBody::new(body, sse, record, idle_timeout, deadline)));
    *out.status_mut() = parts.status;
    *out.headers_mut() = parts.headers;
    out
}
