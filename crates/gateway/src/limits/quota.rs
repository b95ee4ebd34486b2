//! What both bucket stores (local and Redis) speak: the [`Limit`]s, the limits of one request
//! ([`Limits`]), what an admitted request reports ([`Quota`]) and why one was refused ([`Refusal`]).
//! Apart from the stores so neither imports the other.

use std::time::Duration;

/// A rate limit, by name: the label of `llm_rate_limiter_rejected_total` and the `code` of a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The gateway's global requests per second (`rate_limit.requests_per_second`, `burst_size`).
    GlobalRps,
    /// A tenant's requests per minute.
    Rpm,
    /// A tenant's tokens per minute.
    Tpm,
    /// A tenant's requests per day.
    Rpd,
    /// A model's requests per minute, over all tenants (`[[models]] requests_per_minute`).
    ModelRpm,
    /// A model's tokens per minute.
    ModelTpm,
    /// A model's requests per day.
    ModelRpd,
    /// Not a bucket: the shared (Redis) limiter could not answer and `redis_failure = "deny"`.
    Unavailable,
}

/// Whether a limit counts requests or tokens (which `x-ratelimit-*` headers report it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `x-ratelimit-*-requests`.
    Requests,
    /// `x-ratelimit-*-tokens`.
    Tokens,
}

impl Limit {
    /// Its name in metrics and error codes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::GlobalRps => "global_rps",
            Limit::Rpm => "per_user_rpm",
            Limit::Tpm => "per_user_tpm",
            Limit::Rpd => "per_user_rpd",
            Limit::ModelRpm => "per_model_rpm",
            Limit::ModelTpm => "per_model_tpm",
            Limit::ModelRpd => "per_model_rpd",
            Limit::Unavailable => "redis_unavailable",
        }
    }

    /// What it limits, for the message of a 429.
    pub const fn describe(self) -> &'static str {
        match self {
            Limit::GlobalRps => "the gateway's global requests per second",
            Limit::Rpm => "requests per minute for this key",
            Limit::Tpm => "tokens per minute for this key",
            Limit::Rpd => "requests per day for this key",
            Limit::ModelRpm => "requests per minute for this model",
            Limit::ModelTpm => "tokens per minute for this model",
            Limit::ModelRpd => "requests per day for this model",
            Limit::Unavailable => "the shared rate limiter is unavailable",
        }
    }

    /// Whether a request over it may wait for budget (`rate_limit.on_limit = "queue"`): the per-key
    /// and per-model limits, not the global rate nor an unreachable Redis.
    pub const fn waitable(self) -> bool {
        !matches!(self, Limit::GlobalRps | Limit::Unavailable)
    }

    /// Whether it is one of a model's limits (shared by all tenants) rather than a tenant's.
    pub const fn per_model(self) -> bool {
        matches!(self, Limit::ModelRpm | Limit::ModelTpm | Limit::ModelRpd)
    }

    /// What it counts.
    pub const fn unit(self) -> Unit {
        match self {
            Limit::Tpm | Limit::ModelTpm => Unit::Tokens,
            _ => Unit::Requests,
        }
    }
}

/// The limits that apply to one request, resolved from config, its tenant and its model (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Global requests per second.
    pub rps: f64,
    /// Global burst.
    pub burst: f64,
    /// Tenant requests per minute.
    pub rpm: u64,
    /// Tenant tokens per minute.
    pub tpm: u64,
    /// Tenant requests per day.
    pub rpd: u64,
    /// Model requests per minute.
    pub model_rpm: u64,
    /// Model tokens per minute.
    pub model_tpm: u64,
    /// Model requests per day.
    pub model_rpd: u64,
}

impl Limits {
    /// The size of `limit` here (the global one reports its burst).
    pub fn of(&self, limit: Limit) -> u64 {
        match limit {
            Limit::GlobalRps | Limit::Unavailable => self.burst as u64,
            Limit::Rpm => self.rpm,
            Limit::Tpm => self.tpm,
            Limit::Rpd => self.rpd,
            Limit::ModelRpm => self.model_rpm,
            Limit::ModelTpm => self.model_tpm,
            Limit::ModelRpd => self.model_rpd,
        }
    }

    /// Whether any tenant limit applies.
    pub fn per_tenant(&self) -> bool {
        self.rpm > 0 || self.tpm > 0 || self.rpd > 0
    }

    /// Whether any model limit applies.
    pub fn per_model(&self) -> bool {
        self.model_rpm > 0 || self.model_tpm > 0 || self.model_rpd > 0
    }
}

/// What the OpenAI-style `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quota {
    /// The request limit reported (per-tenant RPM, else the global burst).
    pub limit_requests: u64,
    /// Requests left in it.
    pub remaining_requests: u64,
    /// Until it is full again.
    pub reset_requests: Duration,
    /// The tenant's tokens per minute, when limited.
    pub limit_tokens: Option<u64>,
    /// Tokens left.
    pub remaining_tokens: u64,
    /// Until the token bucket is full again.
    pub reset_tokens: Duration,
}

impl Quota {
    /// Records the level of `limit` after a charge: `remaining` left, full again in `reset`. A model's
    /// limit replaces what is reported only when less of it is left (the headers show the tighter).
    pub fn report(&mut self, limits: &Limits, limit: Limit, remaining: u64, reset: Duration) {
        if limit.per_model() {
            let tighter = match limit.unit() {
                Unit::Tokens => self.limit_tokens.is_none() || remaining < self.remaining_tokens,
                Unit::Requests => self.limit_requests == 0 || remaining < self.remaining_requests,
            };
            if !tighter {
                return;
            }
        }
        match limit.unit() {
            Unit::Tokens => {
                self.limit_tokens = Some(limits.of(limit));
                self.remaining_tokens = remaining;
                self.reset_tokens = reset;
            }
            Unit::Requests => {
                self.limit_requests = limits.of(limit);
                self.remaining_requests = remaining;
                self.reset_requests = reset;
            }
        }
    }
}

/// A request refused: by which limit, and when it would be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit that refused.
    pub limit: Limit,
    /// Until it has room.
    pub retry_after: Duration,
}

/// A bucket store's answer for one request.
pub type Verdict = Result<Quota, Refusal>;
