//! What a routing policy may know of a worker: its stable id and a load snapshot.

/// Stable id of a worker for the lifetime of the gateway process; never reused after removal.
pub type WorkerId = u64;

/// One eligible worker's load as a policy sees it, copied out of live atomics once per pick.
///
/// Eligibility (healthy, not draining, breaker admits, serves the model, below capacity) is decided
/// before any policy runs, so every view a policy receives is a legal choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerView {
    /// Stable id, the key of any per-worker state a policy keeps.
    pub id: WorkerId,
    /// Relative weight from config (at least 1).
    pub weight: u32,
    /// Requests the gateway has in flight on this worker (exact, guard-counted).
    pub in_flight: u32,
    /// Requests running on the worker: last scrape, corrected by what the gateway sent since.
    pub running: u32,
    /// Requests waiting in the worker's own queue, from the last scrape.
    pub waiting: u32,
    /// KV-cache usage in `0.0..=1.0`, from the last scrape.
    pub kv_usage: f64,
    /// EWMA of time to first token, milliseconds (0 when unknown).
    pub ttft_ms: f64,
    /// EWMA of time per output token, milliseconds (0 when unknown).
    pub tpot_ms: f64,
    /// Share of recent requests that failed, `0.0..=1.0`.
    pub error_rate: f64,
    /// Requests the worker runs at once (its batch slots: `max_concurrency`, else the `max_num_seqs`
    /// learned from its metrics); 0 when unknown. A request beyond them waits for a slot to free.
    pub max_running: u32,
    /// Tokens its KV cache holds, when the engine reports it (vLLM's `cache_config_info`:
    /// `num_gpu_blocks * block_size`) or the operator configured it; 0 when unknown, in which case a
    /// cache-aware policy learns it from the cache hits the worker reports.
    pub cache_tokens: u64,
}
