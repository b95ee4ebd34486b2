//! Pure state machines of llm-gateway's admission path: rate limits, circuit breakers, queue ordering
//! and the rate estimators behind `Retry-After`.
//!
//! # Layout
//! - [`token_bucket`]: [`TokenBucket`] (requests and tokens per second/minute) and [`WindowCounter`]
//!   (requests per day).
//! - [`circuit_breaker`]: [`CircuitBreaker`], one per worker, Closed / Open / HalfOpen.
//! - [`queue`]: [`AdmissionQueue`], which waiting request a freed worker serves next (priority classes,
//!   aging, weighted scoring, deadlines, per-tenant round robin, and among equals the one whose prefix
//!   the worker holds).
//! - [`rate`]: [`RateEstimator`] (dispatches per second, estimated waits), [`SlidingErrorRate`] and
//!   [`AvgWait`], all fixed-memory ring buffers.
//! - [`stall`]: [`StallRule`], when a worker holding requests has stopped answering (hung, not busy).
//! - [`share`]: [`foreign_load`] and [`room_for_us`], a worker's capacity shared with load other
//!   gateways send (the uncoordinated fallback of several replicas).
//!
//! # Architecture Invariant
//! Nothing here reads a clock, sleeps, locks or does IO: every method takes `now` from the caller and
//! works on `&mut self`. The gateway decides how to share them (a `parking_lot::Mutex` per key or per
//! worker) and tests drive time by hand.

pub mod circuit_breaker;
pub mod queue;
pub mod rate;
pub mod share;
pub mod stall;
pub mod token_bucket;

pub use circuit_breaker::{
    BreakerConfig, BreakerCounters, BreakerSnapshot, BreakerState, CircuitBreaker, Permit, Rejected, StateName,
    Transition,
};
pub use queue::{
    AdmissionQueue, Better, Fit, Full, Meta, QueueConfig, Scoring, Ticket, DEFAULT_MAX_OVERTAKEN,
    DEFAULT_PREFILL_WEIGHT, HOLD_OUT_LIMIT, RETRY_CAP,
};
pub use rate::{AvgWait, RateEstimator, SlidingErrorRate};
pub use share::{foreign_load, room_for_us};
pub use stall::{StallCheck, StallRule};
pub use token_bucket::{Denied, TokenBucket, WindowCounter, MAX_RETRY_AFTER};
