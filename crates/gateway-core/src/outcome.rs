//! What a finished request tells the feedback loops (adaptive routing, breakers, error rates).

use crate::worker::WorkerId;
use std::time::Duration;

/// How a request to a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// A 2xx answer delivered in full.
    Success,
    /// The worker answered 4xx (other than 429): the client's fault, not the worker's.
    ClientError,
    /// The worker answered 429 or 503: it is full; try another, but it is not broken.
    Overloaded,
    /// The worker answered 5xx or broke the stream.
    ServerError,
    /// The connection could not be made or was reset before an answer.
    ConnectError,
    /// The worker did not answer within the timeout.
    Timeout,
    /// The client went away; says nothing about the worker.
    Cancelled,
}

impl OutcomeKind {
    /// Whether this outcome counts against the worker's health (breakers, error rate).
    pub fn is_failure(self) -> bool {
        matches!(self, Self::ServerError | Self::ConnectError | Self::Timeout)
    }

    /// A short stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::Overloaded => "overloaded",
            Self::ServerError => "server_error",
            Self::ConnectError => "connect_error",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One finished request on one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The worker that served it.
    pub worker: WorkerId,
    /// How it ended.
    pub kind: OutcomeKind,
    /// Time to the first byte of the response body, when one arrived.
    pub ttft: Option<Duration>,
    /// Time from dispatch to the end of the response.
    pub latency: Duration,
    /// Completion tokens produced, when known (usage), else an estimate from chunks.
    pub output_tokens: u32,
    /// Prompt tokens: the worker's `usage.prompt_tokens` when it reported usage, else the request's
    /// estimate ([`crate::RequestFeatures::prompt_tokens`]); 0 when neither is known.
    pub prompt_tokens: u32,
    /// Prompt tokens the worker served from its prefix cache, when it said so
    /// (`usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<u32>,
    /// Prompt tokens the routing policy predicted the worker held when the request was dispatched
    /// (what `Policy::on_dispatch` returned), when it made a prediction.
    pub predicted_cached_tokens: Option<u32>,
}

impl Outcome {
    /// An outcome with only the always-known fields set; token details unknown.
    pub fn new(worker: WorkerId, kind: OutcomeKind, ttft: Option<Duration>, latency: Duration) -> Self {
        Self {
            worker,
            kind,
            ttft,
            latency,
            output_tokens: 0,
            prompt_tokens: 0,
            cached_tokens: None,
            predicted_cached_tokens: None,
        }
    }

    /// Prompt tokens the worker had to prefill: what it reported cached, else what the policy
    /// predicted, taken off the prompt; `None` when neither is known or the prompt size is unknown.
    pub fn uncached_tokens(&self) -> Option<u32> {
        if self.prompt_tokens == 0 {
            return None;
        }
        let cached = self.cached_tokens.or(self.predicted_cached_tokens)?;
        Some(self.prompt_tokens.saturating_sub(cached))
    }

    /// Milliseconds per output token after the first, when it can be told.
    pub fn tpot_ms(&self) -> Option<f64> {
        let ttft = self.ttft?;
        if self.output_tokens < 2 {
            return None;
        }
        let decode = self.latency.saturating_sub(ttft).as_secs_f64() * 1000.0;
        Some(decode / f64::from(self.output_tokens - 1))
    }
}

/// What the worker was doing when a request on it ended, as far as the gateway can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerCondition {
    /// The answer took longer than the slow-call threshold.
    pub slow: bool,
    /// The worker was full: it reported requests waiting in its own queue, or the gateway held more
    /// requests on it than its capacity when this one was sent.
    pub full: bool,
    /// No other worker for the model would take a request now (healthy, not draining, breaker admitting).
    pub last_admitting: bool,
}

/// The verdict a worker's breaker and error window get for an attempt that ended as `kind`.
///
/// A slow success is a failure of the worker's health, except where slowness says nothing bad about it:
/// time spent queued inside a worker that is merely full is overload, not failure, and the last worker
/// still admitting a model's requests is never cut off by slow calls alone (Envoy's panic threshold:
/// cutting it off turns slowness into an outage). Both cases become [`OutcomeKind::Overloaded`], which
/// breakers and error rates ignore.
pub fn breaker_verdict(kind: OutcomeKind, worker: WorkerCondition) -> OutcomeKind {
    match kind {
        OutcomeKind::Success if worker.slow && (worker.full || worker.last_admitting) => OutcomeKind::Overloaded,
        OutcomeKind::Success if worker.slow => OutcomeKind::Timeout,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_calls_fail_only_a_worker_that_is_neither_full_nor_the_last() {
        let slow = WorkerCondition { slow: true, ..Default::default() };
        assert_eq!(breaker_verdict(OutcomeKind::Success, slow), OutcomeKind::Timeout);
        assert_eq!(breaker_verdict(OutcomeKind::Success, WorkerCondition::default()), OutcomeKind::Success);
        let full = WorkerCondition { full: true, ..slow };
        assert_eq!(breaker_verdict(OutcomeKind::Success, full), OutcomeKind::Overloaded);
        let last = WorkerCondition { last_admitting: true, ..slow };
        assert_eq!(breaker_verdict(OutcomeKind::Success, last), OutcomeKind::Overloaded);
        assert!(!breaker_verdict(OutcomeKind::Success, last).is_failure());
        // Real failures stay failures, on the last worker too.
        assert_eq!(breaker_verdict(OutcomeKind::ServerError, last), OutcomeKind::ServerError);
        assert_eq!(breaker_verdict(OutcomeKind::Timeout, full), OutcomeKind::Timeout);
    }
}
