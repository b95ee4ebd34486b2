//! What one attempt at a worker meant: the one table that dispatch (before the client saw a byte) and
//! the relay (after) both read, so a status or failure is never judged two ways.
//!
//! The outcome kind feeds the worker's estimates, the policy and the breaker; `retryable` says whether
//! another worker may be tried, which dispatch does only while nothing has reached the client.

use gateway_core::OutcomeKind;

/// How an attempt at a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The worker answered this status (and, past dispatch, delivered its body whole).
    Status(u16),
    /// The connection to the worker could not be made.
    ConnectFailed,
    /// The connection broke, or the worker sent something that is not HTTP.
    Broken,
    /// No answer within the first-byte, idle or total timeout.
    TimedOut,
    /// The worker showed no sign of life while holding requests ([`guard::StallRule`]).
    Stalled,
    /// The client went away before the answer ended.
    ClientLeft,
}

/// The meaning of an [`AttemptEnd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meaning {
    /// The outcome recorded for the worker.
    pub kind: OutcomeKind,
    /// Whether another worker may be tried (only ever done before the client saw a byte).
    pub retryable: bool,
}

/// The one classification of an attempt's end.
pub const fn classify(end: AttemptEnd) -> Meaning {
    use OutcomeKind::*;
    let (kind, retryable) = match end {
        AttemptEnd::Status(200..=399) => (Success, false),
        // Full, not broken: another worker may have room.
        AttemptEnd::Status(429 | 503) => (Overloaded, true),
        // The request itself is wrong: another worker would say the same.
        AttemptEnd::Status(400..=499) => (ClientError, false),
        AttemptEnd::Status(_) => (ServerError, true),
        AttemptEnd::ConnectFailed => (ConnectError, true),
        AttemptEnd::Broken => (ServerError, true),
        AttemptEnd::TimedOut | AttemptEnd::Stalled => (Timeout, true),
        AttemptEnd::ClientLeft => (Cancelled, false),
    };
    Meaning { kind, retryable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_failures() {
        let table = [
            (AttemptEnd::Status(200), OutcomeKind::Success, false),
            (AttemptEnd::Status(304), OutcomeKind::Success, false),
            (AttemptEnd::Status(400), OutcomeKind::ClientError, false),
            (AttemptEnd::Status(404), OutcomeKind::ClientError, false),
            (AttemptEnd::Status(429), OutcomeKind::Overloaded, true),
            (AttemptEnd::Status(503), OutcomeKind::Overloaded, true),
            (AttemptEnd::Status(500), OutcomeKind::ServerError, true),
            (AttemptEnd::Status(502), OutcomeKind::ServerError, true),
            (AttemptEnd::Status(99), OutcomeKind::ServerError, true),
            (AttemptEnd::ConnectFailed, OutcomeKind::ConnectError, true),
            (AttemptEnd::Broken, OutcomeKind::ServerError, true),
            (AttemptEnd::TimedOut, OutcomeKind::Timeout, true),
            (AttemptEnd::Stalled, OutcomeKind::Timeout, true),
            (AttemptEnd::ClientLeft, OutcomeKind::Cancelled, false),
        ];
        for (end, kind, retryable) in table {
            assert_eq!(classify(end), Meaning { kind, retryable }, "{end:?}");
        }
    }
}
