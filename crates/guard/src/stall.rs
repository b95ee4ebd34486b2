//! Telling a hung worker from a busy one.
//!
//! A worker that accepts requests and never answers (its `/health` may still say 200) would hold every
//! request sent to it until the first-byte timeout, minutes by default. A worker that is merely busy
//! also keeps requests waiting, but it keeps showing signs of life: response headers, body bytes,
//! finished requests, generated tokens in its metrics. So a request waiting for its response headers
//! gives up on its worker only when the worker has shown no sign of life at all, since the request was
//! sent, for longer than [`StallRule::threshold`]: `factor` times the worker's usual time to answer,
//! and never less than `floor`. Each waiting request applies the rule on its own; the first to find the
//! worker stalled also cuts it off (the gateway opens its breaker), and the rest follow within one
//! threshold of their own sending.

use std::time::{Duration, Instant};

/// The stall rule's two knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallRule {
    /// The shortest silence that counts as a stall (`upstream.stall_timeout_ms`).
    pub floor: Duration,
    /// How many times its usual latency a worker may stay silent.
    pub factor: f64,
}

/// What a request waiting on a worker should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallCheck {
    /// The worker has been silent past the threshold since the request was sent: give up on it.
    Stalled {
        /// How long the worker has been silent.
        silent: Duration,
    },
    /// Keep waiting; check again at this instant unless the answer comes first.
    RecheckAt(Instant),
}

impl StallRule {
    /// How long a worker whose usual time to answer is `usual` (`None`: not known yet) may stay silent.
    pub fn threshold(&self, usual: Option<Duration>) -> Duration {
        let scaled = usual.map_or(Duration::ZERO, |u| u.mul_f64(self.factor.max(0.0)));
        scaled.max(self.floor)
    }

    /// The verdict at `now` for a request sent at `sent` to a worker last seen alive at `last_alive`.
    pub fn check(threshold: Duration, now: Instant, sent: Instant, last_alive: Instant) -> StallCheck {
        let quiet_since = sent.max(last_alive);
        let silent = now.saturating_duration_since(quiet_since);
        if silent >= threshold {
            StallCheck::Stalled { silent }
        } else {
            StallCheck::RecheckAt(quiet_since + threshold)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: StallRule = StallRule { floor: Duration::from_secs(5), factor: 4.0 };

    #[test]
    fn threshold_is_a_multiple_of_the_usual_latency_but_never_below_the_floor() {
        assert_eq!(RULE.threshold(None), Duration::from_secs(5));
        assert_eq!(RULE.threshold(Some(Duration::from_millis(100))), Duration::from_secs(5));
        assert_eq!(RULE.threshold(Some(Duration::from_secs(10))), Duration::from_secs(40));
    }

    #[test]
    fn a_silent_worker_is_stalled_after_the_threshold() {
        let t0 = Instant::now();
        let th = Duration::from_secs(5);
        // Never seen alive since long before the request was sent.
        let alive = t0;
        let sent = t0 + Duration::from_secs(100);
        assert_eq!(StallRule::check(th, sent + Duration::from_secs(1), sent, alive), StallCheck::RecheckAt(sent + th));
        assert_eq!(
            StallRule::check(th, sent + th, sent, alive),
            StallCheck::Stalled { silent: th },
            "silent for the whole threshold since it was sent"
        );
    }

    #[test]
    fn a_busy_worker_that_shows_life_is_not_stalled() {
        let t0 = Instant::now();
        let th = Duration::from_secs(5);
        // The request has waited 60 s, but the worker answered someone 2 s ago: busy, not hung.
        let now = t0 + Duration::from_secs(60);
        let alive = now - Duration::from_secs(2);
        assert_eq!(StallRule::check(th, now, t0, alive), StallCheck::RecheckAt(alive + th));
        // It goes silent from then on: stalled one threshold after its last sign of life.
        assert_eq!(StallRule::check(th, alive + th, t0, alive), StallCheck::Stalled { silent: th });
    }
}
