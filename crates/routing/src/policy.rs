//! The one trait every routing strategy implements.

use gateway_core::{Outcome, RequestFeatures, WorkerId, WorkerView};
use rand::RngCore;

/// A routing strategy.
///
/// `select` must be cheap (it runs once per request and again per retry) and must not do IO.
/// Retries call `select` again over the candidates that remain, so a retry sees fresh load rather
/// than an order fixed before the first attempt failed.
pub trait Policy: Send + Sync {
    /// The strategy's config name, for metrics and `/api/routing/stats`.
    fn name(&self) -> &'static str;

    /// Whether `select` and the feedback methods read the request's prompt-prefix hashes
    /// (`RequestFeatures::prefix_hashes`); the gateway computes them only for a policy that does.
    /// True unless a policy says otherwise, so a new policy gets them.
    fn uses_prefix_hashes(&self) -> bool {
        true
    }

    /// Whether `select` reads `RequestFeatures::session_key` when the request names no session (the
    /// gateway then derives one from the first system and user messages, copying them). True unless a
    /// policy says otherwise.
    fn uses_session_key(&self) -> bool {
        true
    }

    /// Picks one of `candidates` (index into the slice) for `req`; `None` only when it is empty.
    fn select(&self, req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize>;

    /// Told once the request was sent to `worker` (feeds prefix indexes and similar memories).
    ///
    /// Returns the prompt tokens the policy predicts `worker` holds in its prefix cache for this
    /// request (before this dispatch), when it models caches: the gateway hands it back in
    /// [`Outcome::predicted_cached_tokens`] so the policy can compare it with what the worker reported.
    fn on_dispatch(&self, _req: &RequestFeatures, _worker: WorkerId) -> Option<u32> {
        None
    }

    /// The predicted prefill time of the part of `req`'s prompt `worker` does not hold in its prefix cache
    /// (zero for policies that model no cache): the admission queue's hand-off lets a waiter hold out for
    /// the worker that would take least, and counts what the freed worker's cache saves a waiter as time
    /// it already waited (`guard::AdmissionQueue::pop_preferring`).
    fn prefill_time(&self, _req: &RequestFeatures, _worker: WorkerId) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Told when a request finished on a worker (feeds learned estimates).
    fn observe(&self, _outcome: &Outcome) {}

    /// Told when a worker left the fleet, so per-worker state can be dropped.
    fn forget(&self, _worker: WorkerId) {}

    /// Entries of per-request memory the policy keeps (p2c_kv: its prefix index), for metrics.
    /// Such memory is always bounded; 0 for policies without any.
    fn memory_entries(&self) -> usize {
        0
    }
}
