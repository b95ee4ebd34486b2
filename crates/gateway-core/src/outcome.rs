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
}

impl Outcome {
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
