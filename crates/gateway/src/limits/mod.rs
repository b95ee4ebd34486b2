//! Token-bucket rate limits: global requests per second, per tenant and per model (`[[models]]`)
//! requests per minute, tokens per minute and requests per day, and per worker requests per second.
//!
//! A tenant is an API key's name, or the request's `user` when auth is off. Tokens are charged before
//! dispatch with an estimate (prompt characters / 4 + `max_tokens`) and reconciled with the real
//! `usage` when the response ends ([`TokenCharge`]).
//!
//! Buckets live in this process ([`guard::TokenBucket`]) or, with `backend = "redis"`, in Redis, where
//! one Lua script checks and charges all of a request's buckets atomically using Redis's own clock, so
//! any number of gateway replicas enforce one shared limit. When Redis cannot answer within
//! `redis_timeout_ms`, the local buckets decide (`redis_failure = "local"`) or the request is refused
//! (`"deny"`); either way `llm_rate_limiter_fallback_total` counts it. Limits changed by a reload apply
//! to existing buckets at their next use, keeping their level; unchanged buckets are untouched.
//!
//! # Layout
//! [`quota`] holds what both stores speak ([`Limit`], [`Quota`], the refusal); [`local`] the buckets of
//! this process; [`redis`] the shared ones; [`headers`] the `x-ratelimit-*` headers. This facade picks
//! the store, counts, and turns a refusal into a 429.

pub mod headers;
pub mod local;
pub mod quota;
pub mod redis;

pub use headers::set_headers;
pub use quota::{Limit, Limits, Quota, Refusal};

use crate::auth::Tenant;
use crate::config::{ModelConfig, RateLimitBackend, RateLimitConfig, RedisFailure};
use crate::limits::local::LocalBuckets;
use crate::limits::redis::RedisBuckets;
use crate::metrics::Metrics;
use gateway_core::{ErrorKind, GatewayError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Tokens charged up front for a request, to reconcile with its real usage.
pub struct TokenCharge {
    limiter: Arc<RateLimiter>,
    /// The tenant whose token bucket was charged, if it has one.
    tenant: Option<Arc<str>>,
    /// The model whose token bucket was charged, if it has one.
    model: Option<Arc<str>>,
    estimated: u64,
}

impl std::fmt::Debug for TokenCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCharge")
            .field("tenant", &self.tenant)
            .field("model", &self.model)
            .field("estimated", &self.estimated)
            .finish()
    }
}

impl TokenCharge {
    /// Settles the charge with the tokens really used (prompt + completion).
    pub fn reconcile(self, used: u64) {
        let delta = self.estimated as f64 - used as f64;
        if let Some(tenant) = &self.tenant {
            self.limiter.adjust_tokens(tenant, false, delta);
        }
        if let Some(model) = &self.model {
            self.limiter.adjust_tokens(model, true, delta);
        }
    }
}

/// Where shared buckets live when `backend = "redis"`.
enum Shared {
    /// The local backend: nothing shared.
    Off,
    /// A lazily connected Redis.
    Redis(RedisBuckets),
    /// The Redis client could not be made (validation refuses such a URL, so only a bug gets here):
    /// every check is a Redis failure, counted as a fallback, never a silent switch to local buckets.
    Broken,
}

/// Every bucket of this process, and the Redis connection when shared.
pub struct RateLimiter {
    local: LocalBuckets,
    shared: Shared,
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl RateLimiter {
    /// A limiter for `cfg`; connects to Redis lazily when the backend is Redis. A Redis URL the client
    /// refuses is logged once here, and each check then counts a fallback.
    pub fn new(cfg: &RateLimitConfig) -> Arc<Self> {
        let shared = match cfg.backend {
            RateLimitBackend::Local => Shared::Off,
            RateLimitBackend::Redis => match RedisBuckets::new(&cfg.redis_url) {
                Ok(r) => Shared::Redis(r),
                Err(e) => {
                    tracing::error!(error = %e, "rate_limit.redis_url: no Redis client; every check counts as a Redis failure");
                    Shared::Broken
                }
            },
        };
        Arc::new(Self { local: LocalBuckets::default(), shared })
    }

    fn limits(cfg: &RateLimitConfig, tenant: Option<&Tenant>, model: Option<&ModelConfig>) -> Limits {
        Limits {
            rps: cfg.requests_per_second,
            burst: cfg.burst_size.max(1.0),
            rpm: tenant.and_then(|t| t.rpm).unwrap_or(cfg.per_user_rpm),
            tpm: tenant.and_then(|t| t.tpm).unwrap_or(cfg.per_user_tpm),
            rpd: tenant.and_then(|t| t.rpd).unwrap_or(cfg.per_user_rpd),
            model_rpm: model.map_or(0, |m| m.requests_per_minute),
            model_tpm: model.map_or(0, |m| m.tokens_per_minute),
            model_rpd: model.map_or(0, |m| m.requests_per_day),
        }
    }

    /// Checks and charges one request of `tenant_name` to `model` costing `tokens` (estimated). On
    /// success, returns the quota to report and the token charge to reconcile; on refusal, a 429
    /// naming the limit.
    pub async fn check(
        self: &Arc<Self>,
        cfg: &RateLimitConfig,
        metrics: &Metrics,
        tenant: Option<&Tenant>,
        tenant_name: Option<&str>,
        model: Option<&ModelConfig>,
        tokens: u64,
    ) -> Result<(Quota, Option<TokenCharge>), GatewayError> {
        match self.try_check(cfg, metrics, tenant, tenant_name, model, tokens).await? {
            Ok(admitted) => Ok(admitted),
            Err(refused) => Err(refused.into_error(metrics)),
        }
    }

    /// [`RateLimiter::check`], with a refusal handed back as such (to wait for budget, or to turn into
    /// a 429 with [`Refused::into_error`]). `Err` only when Redis fails and `redis_failure = "deny"`.
    pub async fn try_check(
        self: &Arc<Self>,
        cfg: &RateLimitConfig,
        metrics: &Metrics,
        tenant: Option<&Tenant>,
        tenant_name: Option<&str>,
        model: Option<&ModelConfig>,
        tokens: u64,
    ) -> Result<Result<(Quota, Option<TokenCharge>), Refused>, GatewayError> {
        metrics.rate_limiter_requests.inc();
        let limits = Self::limits(cfg, tenant, model);
        let name: Option<Arc<str>> = tenant.map(|t| Arc::clone(&t.name)).or_else(|| tenant_name.map(Arc::from));
        let model_name = model.map(|m| m.name.as_str());
        let local = || {
            let (now, unix) = (Instant::now(), unix_secs());
            self.local.check(&limits, name.as_deref(), model_name, tokens, cfg.max_tracked_users, now, unix)
        };
        let verdict = match (&self.shared, cfg.backend) {
            (Shared::Off, _) | (_, RateLimitBackend::Local) => local(),
            (Shared::Redis(redis), RateLimitBackend::Redis) => {
                let timeout = Duration::from_millis(cfg.redis_timeout_ms.max(1));
                let day = unix_secs() / 86_400;
                // Boxed: Redis's futures take kilobytes, which every request's future would carry inline.
                let checked = Box::pin(redis.check(&limits, day, name.as_deref(), model_name, tokens));
                match tokio::time::timeout(timeout, checked).await {
                    Ok(Ok(verdict)) => verdict,
                    failure => {
                        let why = match failure {
                            Ok(Err(e)) => e,
                            _ => format!("no answer within {timeout:?}"),
                        };
                        tracing::warn!(error = %why, "rate limiter: Redis unavailable");
                        self.redis_failed(cfg, metrics)?;
                        local()
                    }
                }
            }
            (Shared::Broken, RateLimitBackend::Redis) => {
                self.redis_failed(cfg, metrics)?;
                local()
            }
        };
        Ok(match verdict {
            Ok(quota) => {
                let tenant = name.filter(|_| limits.tpm > 0);
                let model = model.filter(|_| limits.model_tpm > 0).map(|m| Arc::from(m.name.as_str()));
                let charge = (tenant.is_some() || model.is_some()).then(|| TokenCharge {
                    limiter: Arc::clone(self),
                    tenant,
                    model,
                    estimated: tokens,
                });
                Ok((quota, charge))
            }
            Err(refusal) => Err(Refused { refusal, limits }),
        })
    }

    /// Counts a Redis failure; `Err` (a 503-style 429) when `redis_failure = "deny"`, else the caller
    /// falls back to the local buckets.
    fn redis_failed(&self, cfg: &RateLimitConfig, metrics: &Metrics) -> Result<(), GatewayError> {
        metrics.rate_limiter_fallback.inc();
        if cfg.redis_failure == RedisFailure::Deny {
            metrics.rate_limiter_rejected.with_label_values(&[Limit::Unavailable.as_str()]).inc();
            return Err(GatewayError::new(
                ErrorKind::RateLimited,
                "the shared rate limiter is unavailable; retry shortly",
            )
            .with_code("rate_limiter_unavailable")
            .with_retry_after(1));
        }
        Ok(())
    }

    /// Gives back (positive) or charges (negative) tokens after the real usage is known, to the token
    /// bucket of `owner`: a tenant's, or with `per_model` a model's.
    fn adjust_tokens(self: &Arc<Self>, owner: &Arc<str>, per_model: bool, delta: f64) {
        if delta == 0.0 {
            return;
        }
        if let Shared::Redis(redis) = &self.shared {
            let (redis, owner) = (redis.clone(), Arc::clone(owner));
            tokio::spawn(async move {
                let adjusted = if per_model {
                    redis.adjust_model_tokens(&owner, delta).await
                } else {
                    redis.adjust_tokens(&owner, delta).await
                };
                if let Err(e) = adjusted {
                    tracing::debug!(error = %e, per_model, "rate limiter: token reconcile in Redis failed");
                }
            });
        }
        if per_model {
            self.local.adjust_model_tokens(owner, delta, Instant::now());
        } else {
            self.local.adjust_tokens(owner, delta, Instant::now());
        }
    }

    /// Whether `worker` is below `qps` now (routing skips workers at their rate).
    pub fn worker_has_budget(&self, worker: u64, qps: f64) -> bool {
        qps <= 0.0 || self.local.worker_has_budget(worker, qps, Instant::now())
    }

    /// Charges one request to `worker`'s rate.
    pub fn charge_worker(&self, worker: u64, qps: f64) {
        if qps > 0.0 {
            self.local.charge_worker(worker, Instant::now());
        }
    }

    /// Tenants tracked by the local buckets (bounded by `max_tracked_users`).
    pub fn tracked_tenants(&self) -> usize {
        self.local.tracked_tenants()
    }
}

/// A request over one of its limits, with the limits it was checked against.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    /// Which limit refused, and when it has room.
    pub refusal: Refusal,
    /// The request's limits.
    pub limits: Limits,
}

impl Refused {
    /// The 429 of this refusal (counted).
    pub fn into_error(self, metrics: &Metrics) -> GatewayError {
        refused(metrics, &self.refusal, &self.limits)
    }
}

/// The 429 of a refusal: counted by limit, naming it, with `Retry-After` and `x-ratelimit-*` headers.
fn refused(metrics: &Metrics, r: &Refusal, limits: &Limits) -> GatewayError {
    metrics.rate_limiter_rejected.with_label_values(&[r.limit.as_str()]).inc();
    let secs = r.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut err = GatewayError::new(
        ErrorKind::RateLimited,
        format!("Rate limit reached: {}. Retry in {secs}s.", r.limit.describe()),
    )
    .with_code(r.limit.as_str())
    .with_retry_after(secs);
    err.headers = headers::refusal_headers(r, limits);
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RateLimitConfig {
        RateLimitConfig { enabled: true, requests_per_second: 0.0, per_user_rpm: 2, ..RateLimitConfig::default() }
    }

    #[tokio::test]
    async fn per_user_rpm_names_the_limit_and_tenants_are_apart() {
        let m = Metrics::new().unwrap();
        let rl = RateLimiter::new(&cfg());
        for _ in 0..2 {
            rl.check(&cfg(), &m, None, Some("alice"), None, 10).await.expect("within the limit");
        }
        let err = rl.check(&cfg(), &m, None, Some("alice"), None, 10).await.unwrap_err();
        assert_eq!(err.status(), 429);
        assert_eq!(err.body()["error"]["code"], "per_user_rpm");
        assert_eq!(err.body()["error"]["type"], "rate_limit_exceeded");
        assert!(err.retry_after_secs.is_some_and(|s| s >= 1));
        let header = |name: &str| err.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
        assert_eq!(header("x-ratelimit-limit-requests").as_deref(), Some("2"), "the 429 reports its limit");
        assert_eq!(header("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        assert!(header("x-ratelimit-reset-requests").is_some());
        assert!(rl.check(&cfg(), &m, None, Some("bob"), None, 10).await.is_ok(), "bob has his own bucket");
    }

    #[tokio::test]
    async fn tokens_are_reconciled_with_real_usage() {
        let m = Metrics::new().unwrap();
        let c = RateLimitConfig { per_user_rpm: 0, per_user_tpm: 1000, ..cfg() };
        let rl = RateLimiter::new(&c);
        let (q, charge) = rl.check(&c, &m, None, Some("t"), None, 900).await.unwrap();
        assert_eq!(q.limit_tokens, Some(1000));
        assert!(q.remaining_tokens <= 100);
        assert!(rl.check(&c, &m, None, Some("t"), None, 900).await.is_err(), "the estimate used the budget");
        charge.expect("tpm is limited").reconcile(100);
        let (q, _) = rl.check(&c, &m, None, Some("t"), None, 700).await.expect("800 given back");
        assert!(q.remaining_tokens < 300);
    }

    #[tokio::test]
    async fn global_limit_and_bounded_tenants() {
        let m = Metrics::new().unwrap();
        let c = RateLimitConfig {
            requests_per_second: 1.0,
            burst_size: 3.0,
            per_user_rpm: 100,
            max_tracked_users: 4,
            ..cfg()
        };
        let rl = RateLimiter::new(&c);
        for i in 0..3 {
            rl.check(&c, &m, None, Some(&format!("u{i}")), None, 1).await.unwrap();
        }
        let err = rl.check(&c, &m, None, Some("u9"), None, 1).await.unwrap_err();
        assert_eq!(err.body()["error"]["code"], "global_rps");
        let c2 = RateLimitConfig { requests_per_second: 0.0, ..c };
        for i in 0..50 {
            rl.check(&c2, &m, None, Some(&format!("many{i}")), None, 1).await.unwrap();
        }
        assert!(rl.tracked_tenants() <= 5, "bounded: {}", rl.tracked_tenants());
        assert!(m.render().contains("llm_rate_limiter_rejected_total{limit=\"global_rps\"} 1"));
    }

    #[tokio::test]
    async fn a_bad_redis_client_counts_every_check_as_a_fallback() {
        let m = Metrics::new().unwrap();
        let c = RateLimitConfig {
            backend: RateLimitBackend::Redis,
            redis_url: "redis://127.0.0.1:1/not-a-db".into(),
            per_user_rpm: 1,
            ..cfg()
        };
        let rl = RateLimiter::new(&c);
        assert!(matches!(rl.shared, Shared::Broken), "the client error is kept, not dropped");
        rl.check(&c, &m, None, Some("a"), None, 1).await.expect("local buckets decide");
        assert_eq!(
            rl.check(&c, &m, None, Some("a"), None, 1).await.unwrap_err().body()["error"]["code"],
            "per_user_rpm"
        );
        assert_eq!(m.rate_limiter_fallback.get(), 2);
        let deny = RateLimitConfig { redis_failure: RedisFailure::Deny, ..c };
        let err = rl.check(&deny, &m, None, Some("b"), None, 1).await.unwrap_err();
        assert_eq!(err.body()["error"]["code"], "rate_limiter_unavailable");
        assert_eq!(m.rate_limiter_fallback.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn offered_twice_the_limit_admits_the_limit_on_the_paused_clock() {
        let m = Metrics::new().unwrap();
        let c = RateLimitConfig { requests_per_second: 100.0, burst_size: 5.0, per_user_rpm: 0, ..cfg() };
        let rl = RateLimiter::new(&c);
        let mut admitted = 0;
        for i in 0..800 {
            if i > 0 {
                tokio::time::advance(Duration::from_millis(5)).await; // offered at 200/s
            }
            admitted += usize::from(rl.check(&c, &m, None, None, None, 1).await.is_ok());
        }
        // The burst, then one per 10 ms over the 3.995 s of offers.
        assert_eq!(admitted, 5 + 399);
        assert_eq!(m.rate_limiter_rejected.with_label_values(&[Limit::GlobalRps.as_str()]).get(), 800 - 404);
    }
}
