//! The record of one attempt at a worker, settled exactly once when the attempt ends: the worker's
//! estimates, the policy's feedback, the breaker's verdict, token reconciliation, metrics, one log line.
//!
//! The record is judged by the snapshot the request loaded when it arrived (never a newer one a reload
//! stored meanwhile), so breaker thresholds and the fleet it is compared against are the ones it started with.

use crate::fleet::slot::LoadGuard;
use crate::fleet::worker::Worker;
use crate::logging::fields::FieldText;
use crate::metrics::{status_label, Active, Metrics};
use crate::proxy::classify::{classify, AttemptEnd};
use crate::proxy::usage::UsageScanner;
use crate::state::Snapshot;
use gateway_core::{breaker_verdict, Outcome, OutcomeKind, WorkerCondition};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What every attempt of one request shares: who asked, for what, and the snapshot it is judged by.
pub struct RequestInfo {
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// The snapshot the request loaded on arrival.
    pub snap: Arc<Snapshot>,
    /// Model label (a served model name).
    pub model: Arc<str>,
    /// The model's per-request series.
    pub series: Arc<crate::metrics::ModelSeries>,
    /// The request id, sent to the worker and logged.
    pub request_id: crate::proxy::request::RequestId,
    /// The API key's tenant, for the log line.
    pub tenant: Option<Arc<str>>,
    /// When the client's request arrived.
    pub received: Instant,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The request's own estimate of its prompt tokens, used when the worker reports no usage.
    pub prompt_estimate: u32,
    /// The endpoint it was sent to.
    pub endpoint: crate::proxy::endpoint::Endpoint,
    /// Where the response id of a `/v1/responses` answer is remembered (`None` for other endpoints,
    /// or when `responses.max_remembered` is 0).
    pub response_homes: Option<Arc<crate::proxy::response_homes::ResponseHomes>>,
    /// Where a breaker opening is told to the other replicas (`[cluster]`).
    pub cluster: Arc<crate::cluster::Cluster>,
}

/// Tokens an answer used, and where the numbers come from (`reported` by the worker, or `counted`).
struct TokensUsed {
    prompt: u64,
    completion: u64,
    source: &'static str,
}

/// The target of the request line, as tracing names this module.
const TARGET: &str = module_path!();

/// The `request` log line, one per request (README, Logging): its fields in one place, written
/// straight to the log buffer when lines are plain text, else through tracing (JSON, a terminal).
struct RequestLine<'a> {
    request_id: &'a str,
    model: &'a str,
    worker: &'a str,
    status: u16,
    outcome: &'static str,
    stream: bool,
    retries: u32,
    tenant: Option<&'a str>,
    queue_wait_ms: u64,
    ttft_ms: Option<u64>,
    latency_ms: u64,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    usage: &'static str,
}

impl RequestLine<'_> {
    /// Logs the line (the caller checked that `info` is on for this module).
    fn write(&self) {
        // The thread's buffer, reused: a new one per line was an allocation per request.
        thread_local!(static TEXT: std::cell::RefCell<FieldText> = std::cell::RefCell::new(FieldText::default()));
        let written = TEXT.with_borrow_mut(|text| {
            text.clear();
            self.fields(text);
            crate::logging::write_info(TARGET, text)
        });
        if !written {
            self.trace();
        }
    }

    /// Writes the fields to `f` as the plain-text formatter writes them for [`RequestLine::trace`]'s event.
    fn fields(&self, f: &mut FieldText) {
        f.message("request")
            .display("request_id", self.request_id)
            .display("model", self.model)
            .display("worker", self.worker)
            .int("status", self.status)
            .str("outcome", self.outcome)
            .bool("stream", self.stream)
            .int("retries", self.retries)
            .some_str("tenant", self.tenant)
            .int("queue_wait_ms", self.queue_wait_ms)
            .some_int("ttft_ms", self.ttft_ms)
            .int("latency_ms", self.latency_ms)
            .some_int("prompt_tokens", self.prompt_tokens)
            .some_int("cached_tokens", self.cached_tokens)
            .some_int("completion_tokens", self.completion_tokens)
            .str("usage", self.usage);
    }

    /// The same line as a tracing event.
    fn trace(&self) {
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            worker = %self.worker,
            status = self.status,
            outcome = self.outcome,
            stream = self.stream,
            retries = self.retries,
            tenant = self.tenant,
            queue_wait_ms = self.queue_wait_ms,
            ttft_ms = self.ttft_ms,
            latency_ms = self.latency_ms,
            prompt_tokens = self.prompt_tokens,
            cached_tokens = self.cached_tokens,
            completion_tokens = self.completion_tokens,
            usage = self.usage,
            "request"
        );
    }
}

/// One attempt at a worker, from dispatch until its answer ends.
pub struct RequestRecord {
    info: Arc<RequestInfo>,
    load: LoadGuard,
    status: u16,
    dispatched: Instant,
    retries: u32,
    predicted_cached_tokens: Option<u32>,
    /// Token counts seen in the body.
    pub usage: UsageScanner,
    /// Looks for the response id of a `/v1/responses` answer, to remember its worker.
    response_id: Option<crate::proxy::response_homes::IdScanner>,
    /// Tokens charged up front by the rate limiter, settled with the real usage at the end.
    pub charge: Option<crate::limits::TokenCharge>,
    /// The request's count in `llm_gateway_active_requests`, released with the body.
    pub active: Option<Active>,
    /// Its model's `max_concurrency` permit, released with the body.
    pub model_permit: Option<crate::proxy::admission::ModelPermit>,
    /// Time spent in the admission queue.
    pub queue_wait: Duration,
    first_byte: Option<Instant>,
    finished: bool,
}

impl RequestRecord {
    /// A record for an attempt `load`'s worker answered with `status`. `retries` is the number of
    /// attempts before this one; `predicted_cached_tokens` what the policy predicted the worker holds.
    pub fn new(
        info: Arc<RequestInfo>,
        load: LoadGuard,
        status: u16,
        dispatched: Instant,
        retries: u32,
        predicted_cached_tokens: Option<u32>,
    ) -> Self {
        // Only a successful answer names a response the worker keeps.
        let response_id = info
            .response_homes
            .as_ref()
            .filter(|_| (200..300).contains(&status))
            .map(|_| crate::proxy::response_homes::IdScanner::default());
        Self {
            info,
            load,
            status,
            dispatched,
            retries,
            predicted_cached_tokens,
            usage: UsageScanner::default(),
            response_id,
            charge: None,
            active: None,
            model_permit: None,
            queue_wait: Duration::ZERO,
            first_byte: None,
            finished: false,
        }
    }

    /// The worker this attempt went to.
    pub fn worker(&self) -> &Arc<Worker> {
        self.load.worker()
    }

    /// Notes relayed bytes: a sign of life, the first byte's time, token counts (and events, of an
    /// `event_stream`).
    pub fn on_data(&mut self, data: &[u8], now: Instant, event_stream: bool) {
        self.load.worker().mark_alive(now);
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(now);
            if self.info.stream {
                let ttft = now.duration_since(self.info.received).as_secs_f64();
                self.info.series.ttft.observe(ttft);
            }
        }
        self.usage.scan(data, event_stream);
        if let Some(id) = self.response_id.as_mut().and_then(|s| s.scan(data)) {
            if let Some(homes) = &self.info.response_homes {
                homes.remember(&id, &self.load.worker().base_url);
            }
        }
    }

    /// Whether a complete event stream of this endpoint ends with `data: [DONE]`.
    pub fn stream_ends_with_done(&self) -> bool {
        self.info.endpoint.stream_ends_with_done()
    }

    /// The outcome of a body delivered whole, by the worker's status.
    pub fn delivered(&self) -> OutcomeKind {
        classify(AttemptEnd::Status(self.status)).kind
    }

    /// Records the outcome once: the worker's side ([`RequestRecord::record_attempt`]), then the
    /// request's metrics, token reconciliation and log line. For the answer the client receives.
    pub fn finish(&mut self, kind: OutcomeKind) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let now = Instant::now();
        let worker = self.record_attempt(kind, now);
        let (m, model) = (&self.info.metrics, &self.info.model);
        let latency = now.duration_since(self.info.received);
        let status = if kind == OutcomeKind::Cancelled { 499 } else { self.status };
        let series = &self.info.series;
        if status == 200 {
            series.ok.inc();
        } else {
            m.requests.with_label_values(&[model, status_label(status)]).inc();
        }
        series.latency.observe(latency.as_secs_f64());
        let used = self.tokens_used();
        if let Some(charge) = self.charge.take() {
            // Without any count (a non-streamed answer with no usage) the estimate charged stands.
            if let Some(t) = &used {
                charge.reconcile(t.prompt + t.completion);
            }
        }
        if let Some(t) = &used {
            series.prompt_tokens.inc_by(t.prompt);
            series.completion_tokens.inc_by(t.completion);
        }
        if tracing::enabled!(tracing::Level::INFO) {
            RequestLine {
                request_id: self.info.request_id.as_str(),
                model,
                worker: &worker.name,
                status,
                outcome: kind.as_str(),
                stream: self.info.stream,
                retries: self.retries,
                tenant: self.info.tenant.as_deref(),
                queue_wait_ms: self.queue_wait.as_millis() as u64,
                ttft_ms: self
                    .first_byte
                    .filter(|_| self.info.stream)
                    .map(|t| t.duration_since(self.info.received).as_millis() as u64),
                latency_ms: latency.as_millis() as u64,
                prompt_tokens: self.usage.prompt_tokens,
                cached_tokens: self.usage.cached_tokens,
                completion_tokens: self.usage.completion_tokens,
                usage: used.as_ref().map_or("estimated", |t| t.source),
            }
            .write();
        }
        self.active.take();
        self.model_permit.take();
    }

    /// The tokens this answer used: the worker's usage when it reported one; else, for a stream, the
    /// deltas counted (one `data:` event per token, `[DONE]` aside) and the prompt estimate, since a
    /// worker may ignore `stream_options.include_usage`; `None` when nothing was counted.
    fn tokens_used(&self) -> Option<TokensUsed> {
        let u = &self.usage;
        let prompt = u.prompt_tokens.unwrap_or(u64::from(self.info.prompt_estimate));
        match u.completion_tokens {
            Some(completion) => Some(TokensUsed { prompt, completion, source: "reported" }),
            None if self.info.stream => {
                Some(TokensUsed { prompt, completion: u.events.saturating_sub(1), source: "counted" })
            }
            None => None,
        }
    }

    /// Records an attempt the client never sees (retried, or answered by the gateway's own error):
    /// only the worker's side, so the request itself is counted and logged once, by whoever answers it.
    pub fn finish_attempt(mut self, kind: OutcomeKind) {
        self.finished = true;
        let worker = self.record_attempt(kind, Instant::now());
        tracing::warn!(
            request_id = %self.info.request_id,
            worker = %worker.name,
            status = self.status,
            outcome = kind.as_str(),
            attempt = self.retries + 1,
            "upstream attempt failed"
        );
    }

    /// The worker's side of an outcome: its latency and error estimates, policy feedback, the breaker's
    /// verdict (a slow stream is a failure), and `llm_gateway_upstream_outcomes_total`.
    fn record_attempt(&mut self, kind: OutcomeKind, now: Instant) -> Arc<Worker> {
        let worker = Arc::clone(self.load.worker());
        let usage = &self.usage;
        let tokens = |t: Option<u64>| t.map(|t| u32::try_from(t).unwrap_or(u32::MAX));
        let outcome = Outcome {
            worker: worker.id,
            kind,
            ttft: self.first_byte.filter(|_| self.info.stream).map(|t| t.duration_since(self.dispatched)),
            latency: now.duration_since(self.dispatched),
            output_tokens: tokens(usage.completion_tokens).unwrap_or(usage.events.saturating_sub(1) as u32),
            prompt_tokens: tokens(usage.prompt_tokens).unwrap_or(self.info.prompt_estimate),
            cached_tokens: tokens(usage.cached_tokens),
            predicted_cached_tokens: self.predicted_cached_tokens,
        };
        let snap = &self.info.snap;
        snap.policy.observe(&outcome);
        // Slow calls are judged on streams only: a non-streamed answer arrives whole, so its time to
        // first byte measures the length of the generation, not the worker's health. A slow success is
        // a failure to the worker's health, in its breaker streak and its error window alike, unless the
        // worker was merely full or is the last one admitting the model (`breaker_verdict`).
        let breaker_cfg = &snap.config.circuit_breaker;
        let slow = outcome.ttft.is_some_and(|t| t > Duration::from_millis(breaker_cfg.slow_call_threshold_ms));
        if kind == OutcomeKind::Success {
            worker.mark_success(now);
        }
        let condition = if slow && kind == OutcomeKind::Success {
            let others_admit = snap.fleet.workers.iter().any(|w| {
                w.id != worker.id
                    && w.is_available()
                    && w.serves(&self.info.model)
                    && (!breaker_cfg.enabled || w.breaker_admits(now))
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
        worker.record(&Outcome { kind: verdict, ..outcome }, now);
        let m = &self.info.metrics;
        if verdict.is_failure() {
            m.breaker_failures.with_label_values(&[&worker.name]).inc();
        }
        let transition = self.load.settle(verdict, now, breaker_cfg);
        report_transition(m, &self.info.cluster, &worker, transition);
        self.info.snap.count_outcome(m, &worker, kind);
        worker
    }
}

/// Makes a breaker transition of `worker` known: counted in `llm_circuit_breaker_transitions_total`,
/// and an opening told to the other replicas ([`crate::cluster::Cluster::breaker_opened`]).
pub fn report_transition(
    metrics: &Metrics,
    cluster: &crate::cluster::Cluster,
    worker: &Worker,
    transition: Option<guard::Transition>,
) {
    metrics.count_transition(&worker.name, transition);
    cluster.breaker_opened(worker, transition);
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // Dropped before the body ended: the client went away.
        self.finish(classify(AttemptEnd::ClientLeft).kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `2026-12-04T15:20:01.123456Z`: what both lines start with, and all that may differ.
    const TIME: usize = 27;

    #[test]
    fn the_request_line_written_directly_is_the_traced_one() {
        let full = RequestLine {
            request_id: "96401316-e134-4ac1-9666-da13e661cf16",
            model: "demo-model",
            worker: "http://127.0.0.1:8001",
            status: 200,
            outcome: "success",
            stream: true,
            retries: 1,
            tenant: Some("team \"a\""),
            queue_wait_ms: 12,
            ttft_ms: Some(45),
            latency_ms: 300,
            prompt_tokens: Some(1785),
            cached_tokens: Some(1776),
            completion_tokens: Some(16),
            usage: "reported",
        };
        let sparse = RequestLine {
            tenant: None,
            ttft_ms: None,
            prompt_tokens: None,
            cached_tokens: None,
            completion_tokens: None,
            stream: false,
            usage: "estimated",
            ..full
        };
        let fields = |line: &RequestLine<'_>| {
            let mut f = FieldText::default();
            line.fields(&mut f);
            f
        };
        for line in [&full, &sparse] {
            let traced = crate::logging::traced_plain(|| line.trace());
            let direct = crate::logging::direct_line(TARGET, &fields(line));
            assert_eq!(traced.get(TIME..), direct.get(TIME..), "{traced}{direct}");
            assert!(direct.contains(" INFO llm_gateway::proxy::accounting: request request_id=96401316"), "{direct}");
            assert_eq!((&traced[..4], &traced[TIME - 1..TIME]), (&direct[..4], "Z"));
        }
        let sparse = crate::logging::direct_line(TARGET, &fields(&sparse));
        assert!(!sparse.contains("tenant") && !sparse.contains("ttft_ms"), "absent fields are not written: {sparse}");
        assert!(crate::logging::direct_line(TARGET, &fields(&full)).contains(r#"tenant="team \"a\"""#));
    }
}
