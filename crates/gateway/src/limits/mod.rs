//! Token-bucket rate limits: global requests per second, per tenant requests per minute, tokens per
//! minute and requests per day, and per worker requests per second.
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

pub mod redis;

use crate::auth::Tenant;
use crate::config::{RateLimitBackend, RateLimitConfig, RedisFailure};
use crate::metrics::Metrics;
use gateway_core::{ErrorKind, GatewayError};
use guard::{TokenBucket, WindowCounter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The limits that apply to one request, resolved from config and its tenant.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    rps: f64,
    burst: f64,
    rpm: u64,
    tpm: u64,
    rpd: u64,
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

/// Tokens charged up front for a request, to reconcile with its real usage.
pub struct TokenCharge {
    limiter: Arc<RateLimiter>,
    tenant: Arc<str>,
    estimated: u64,
}

impl std::fmt::Debug for TokenCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCharge").field("tenant", &self.tenant).field("estimated", &self.estimated).finish()
    }
}

impl TokenCharge {
    /// Settles the charge with the tokens really used (prompt + completion).
    pub fn reconcile(self, used: u64) {
        self.limiter.adjust_tokens(&self.tenant, self.estimated as f64 - used as f64);
    }
}

#[derive(Debug)]
struct TenantBuckets {
    rpm: Option<TokenBucket>,
    tpm: Option<TokenBucket>,
    rpd: Option<WindowCounter>,
    last_used: Instant,
}

/// Every bucket of this process, and the Redis connection when shared.
pub struct RateLimiter {
    global: Mutex<Option<TokenBucket>>,
    tenants: Mutex<HashMap<Arc<str>, TenantBuckets>>,
    workers: Mutex<HashMap<u64, TokenBucket>>,
    redis: Option<crate::limits::redis::RedisBuckets>,
}

/// Tenant name used when too many distinct `user`s are tracked: they share one bucket set.
const OVERFLOW_TENANT: &str = "(overflow)";

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A bucket with `rate`/`burst`, re-configured in place (keeping its level) when they changed.
fn bucket(slot: &mut Option<TokenBucket>, rate: f64, burst: f64, now: Instant) -> &mut TokenBucket {
    let b = slot.get_or_insert_with(|| TokenBucket::new(rate, burst, now));
    if b.rate_per_sec() != rate || b.burst() != burst {
        b.reconfigure(rate, burst, now);
    }
    b
}

impl RateLimiter {
    /// A limiter for `cfg`; connects to Redis lazily when the backend is Redis.
    pub fn new(cfg: &RateLimitConfig) -> Arc<Self> {
        let redis = (cfg.backend == RateLimitBackend::Redis)
            .then(|| crate::limits::redis::RedisBuckets::new(&cfg.redis_url))
            .and_then(Result::ok);
        Arc::new(Self {
            global: Mutex::new(None),
            tenants: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            redis,
        })
    }

    fn limits(cfg: &RateLimitConfig, tenant: Option<&Tenant>) -> Limits {
        Limits {
            rps: cfg.requests_per_second,
            burst: cfg.burst_size.max(1.0),
            rpm: tenant.and_then(|t| t.rpm).unwrap_or(cfg.per_user_rpm),
            tpm: tenant.and_then(|t| t.tpm).unwrap_or(cfg.per_user_tpm),
            rpd: tenant.and_then(|t| t.rpd).unwrap_or(cfg.per_user_rpd),
        }
    }

    /// Checks and charges one request of `tenant_name` costing `tokens` (estimated). On success, returns
    /// the quota to report and the token charge to reconcile; on refusal, a 429 naming the limit.
    pub async fn check(
        self: &Arc<Self>,
        cfg: &RateLimitConfig,
        metrics: &Metrics,
        tenant: Option<&Tenant>,
        tenant_name: Option<&str>,
        tokens: u64,
    ) -> Result<(Quota, Option<TokenCharge>), GatewayError> {
        metrics.rate_limiter_requests.inc();
        let limits = Self::limits(cfg, tenant);
        let name: Option<Arc<str>> = tenant.map(|t| Arc::clone(&t.name)).or_else(|| tenant_name.map(Arc::from));
        let outcome = match (&self.redis, cfg.backend) {
            (Some(redis), RateLimitBackend::Redis) => {
                let timeout = Duration::from_millis(cfg.redis_timeout_ms.max(1));
                match tokio::time::timeout(timeout, redis.check(&limits_spec(&limits), name.as_deref(), tokens)).await {
                    Ok(Ok(outcome)) => outcome,
                    failure => {
                        metrics.rate_limiter_fallback.inc();
                        let why = match failure {
                            Ok(Err(e)) => e,
                            _ => format!("no answer within {timeout:?}"),
                        };
                        tracing::warn!(error = %why, "rate limiter: Redis unavailable");
                        if cfg.redis_failure == RedisFailure::Deny {
                            metrics.rate_limiter_rejected.with_label_values(&["redis_unavailable"]).inc();
                            return Err(GatewayError::new(
                                ErrorKind::RateLimited,
                                "the shared rate limiter is unavailable; retry shortly",
                            )
                            .with_code("rate_limiter_unavailable")
                            .with_retry_after(1));
                        }
                        self.check_local(cfg, &limits, name.as_deref(), tokens)
                    }
                }
            }
            _ => self.check_local(cfg, &limits, name.as_deref(), tokens),
        };
        match outcome {
            Ok(quota) => {
                let charge = (limits.tpm > 0).then(|| name.clone()).flatten().map(|tenant| TokenCharge {
                    limiter: Arc::clone(self),
                    tenant,
                    estimated: tokens,
                });
                Ok((quota, charge))
            }
            Err((code, retry_after)) => {
                metrics.rate_limiter_rejected.with_label_values(&[code]).inc();
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let mut err = GatewayError::new(
                    ErrorKind::RateLimited,
                    format!("Rate limit reached: {}. Retry in {secs}s.", describe(code)),
                )
                .with_code(code)
                .with_retry_after(secs);
                err.headers = refusal_headers(code, &limits, retry_after);
                Err(err)
            }
        }
    }

    /// The local decision: every applicable bucket must admit, then all are charged.
    fn check_local(
        &self,
        cfg: &RateLimitConfig,
        l: &Limits,
        tenant: Option<&str>,
        tokens: u64,
    ) -> Result<Quota, (&'static str, Duration)> {
        let now = Instant::now();
        let mut global = self.global.lock();
        let mut quota = Quota::default();
        if l.rps > 0.0 {
            let g = bucket(&mut global, l.rps, l.burst, now);
            if let Err(d) = g.try_take(1.0, now) {
                return Err(("global_rps", d.retry_after));
            }
            quota.limit_requests = l.burst as u64;
            quota.remaining_requests = g.remaining(now) as u64;
            quota.reset_requests = g.reset_after(now);
        }
        let Some(tenant) = tenant else { return Ok(quota) };
        if l.rpm == 0 && l.tpm == 0 && l.rpd == 0 {
            return Ok(quota);
        }
        let mut tenants = self.tenants.lock();
        let key = self.tenant_key(&mut tenants, tenant, cfg.max_tracked_users, now);
        let t = tenants.entry(key).or_insert_with(|| TenantBuckets { rpm: None, tpm: None, rpd: None, last_used: now });
        t.last_used = now;
        let undo_global = |global: &mut Option<TokenBucket>| {
            if let Some(g) = global.as_mut() {
                g.give_back(1.0);
            }
        };
        let day = unix_secs();
        if l.rpd > 0 {
            let c = t.rpd.get_or_insert_with(|| WindowCounter::per_day(l.rpd));
            if c.limit() != l.rpd {
                c.set_limit(l.rpd);
            }
            if c.remaining(day) < 1 {
                undo_global(&mut global);
                return Err(("per_user_rpd", c.reset_after(day)));
            }
        }
        if l.rpm > 0 {
            let rpm = l.rpm as f64;
            let b = bucket(&mut t.rpm, rpm / 60.0, rpm, now);
            if b.remaining(now) < 1.0 {
                undo_global(&mut global);
                return Err(("per_user_rpm", b.try_take(1.0, now).err().map_or(Duration::ZERO, |d| d.retry_after)));
            }
        }
        if l.tpm > 0 {
            let tpm = l.tpm as f64;
            let b = bucket(&mut t.tpm, tpm / 60.0, tpm, now);
            // A request larger than the whole minute's budget is admitted against a full bucket (it
            // goes into debt) rather than refused forever.
            let need = (tokens as f64).min(tpm);
            if b.remaining(now) < need {
                undo_global(&mut global);
                return Err(("per_user_tpm", b.try_take(need, now).err().map_or(Duration::ZERO, |d| d.retry_after)));
            }
        }
        // Every bucket admits: charge them all.
        if let Some(c) = t.rpd.as_mut() {
            let _ = c.try_take(1, day);
        }
        if let Some(b) = t.rpm.as_mut() {
            let _ = b.try_take(1.0, now);
            quota.limit_requests = l.rpm;
            quota.remaining_requests = b.remaining(now) as u64;
            quota.reset_requests = b.reset_after(now);
        }
        if let Some(b) = t.tpm.as_mut() {
            b.take_debt(tokens as f64, now);
            quota.limit_tokens = Some(l.tpm);
            quota.remaining_tokens = b.remaining(now) as u64;
            quota.reset_tokens = b.reset_after(now);
        }
        Ok(quota)
    }

    /// The bucket key for `tenant`, bounded: past `max` tenants, idle ones are dropped, and if still
    /// full the newcomer shares the overflow bucket (client-chosen `user`s must not grow memory).
    fn tenant_key(
        &self,
        tenants: &mut HashMap<Arc<str>, TenantBuckets>,
        tenant: &str,
        max: usize,
        now: Instant,
    ) -> Arc<str> {
        if let Some((k, _)) = tenants.get_key_value(tenant) {
            return Arc::clone(k);
        }
        if tenants.len() >= max.max(1) {
            tenants.retain(|_, t| now.duration_since(t.last_used) < Duration::from_secs(60));
        }
        if tenants.len() >= max.max(1) {
            return Arc::from(OVERFLOW_TENANT);
        }
        Arc::from(tenant)
    }

    /// Gives back (positive) or charges (negative) tokens after the real usage is known.
    fn adjust_tokens(self: &Arc<Self>, tenant: &Arc<str>, delta: f64) {
        if delta == 0.0 {
            return;
        }
        if let Some(redis) = &self.redis {
            let (redis, tenant) = (redis.clone(), Arc::clone(tenant));
            tokio::spawn(async move {
                if let Err(e) = redis.adjust_tokens(&tenant, delta).await {
                    tracing::debug!(error = %e, "rate limiter: token reconcile in Redis failed");
                }
            });
        }
        let now = Instant::now();
        if let Some(b) = self.tenants.lock().get_mut(tenant).and_then(|t| t.tpm.as_mut()) {
            if delta > 0.0 {
                b.give_back(delta);
            } else {
                b.take_debt(-delta, now);
            }
        }
    }

    /// Whether `worker` is below `qps` now (routing skips workers at their rate).
    pub fn worker_has_budget(&self, worker: u64, qps: f64) -> bool {
        if qps <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut workers = self.workers.lock();
        let b = workers.entry(worker).or_insert_with(|| TokenBucket::new(qps, qps.max(1.0), now));
        if b.rate_per_sec() != qps {
            b.reconfigure(qps, qps.max(1.0), now);
        }
        b.remaining(now) >= 1.0
    }

    /// Charges one request to `worker`'s rate.
    pub fn charge_worker(&self, worker: u64, qps: f64) {
        if qps <= 0.0 {
            return;
        }
        let now = Instant::now();
        if let Some(b) = self.workers.lock().get_mut(&worker) {
            let _ = b.try_take(1.0, now);
        }
    }

    /// Tenants tracked by the local buckets (bounded by `max_tracked_users`).
    pub fn tracked_tenants(&self) -> usize {
        self.tenants.lock().len()
    }
}

fn limits_spec(l: &Limits) -> crate::limits::redis::Spec {
    crate::limits::redis::Spec {
        rps: l.rps,
        burst: l.burst,
        rpm: l.rpm,
        tpm: l.tpm,
        rpd: l.rpd,
        day: unix_secs() / 86_400,
    }
}

fn describe(code: &str) -> &'static str {
    match code {
        "global_rps" => "the gateway's global requests per second",
        "per_user_rpm" => "requests per minute for this key",
        "per_user_tpm" => "tokens per minute for this key",
        "per_user_rpd" => "requests per day for this key",
        _ => "a limit",
    }
}

/// OpenAI's `x-ratelimit-*` headers on a refusal: the limit that refused, nothing left of it, and when
/// it has room again (the same moment as `Retry-After`).
fn refusal_headers(code: &str, l: &Limits, retry_after: Duration) -> Vec<(&'static str, String)> {
    let reset = format_duration(retry_after);
    let (kind, limit) = match code {
        "per_user_tpm" => ("tokens", l.tpm),
        "per_user_rpm" => ("requests", l.rpm),
        "per_user_rpd" => ("requests", l.rpd),
        _ => ("requests", l.burst as u64),
    };
    if kind == "tokens" {
        vec![
            ("x-ratelimit-limit-tokens", limit.to_string()),
            ("x-ratelimit-remaining-tokens", "0".into()),
            ("x-ratelimit-reset-tokens", reset),
        ]
    } else {
        vec![
            ("x-ratelimit-limit-requests", limit.to_string()),
            ("x-ratelimit-remaining-requests", "0".into()),
            ("x-ratelimit-reset-requests", reset),
        ]
    }
}

/// Sets OpenAI's `x-ratelimit-*` headers from a quota.
pub fn set_headers(headers: &mut http::HeaderMap, q: &Quota) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(http::HeaderName::from_static(name), v);
        }
    };
    put("x-ratelimit-limit-requests", q.limit_requests.to_string());
    put("x-ratelimit-remaining-requests", q.remaining_requests.to_string());
    put("x-ratelimit-reset-requests", format_duration(q.reset_requests));
    if let Some(limit) = q.limit_tokens {
        put("x-ratelimit-limit-tokens", limit.to_string());
        put("x-ratelimit-remaining-tokens", q.remaining_tokens.to_string());
        put("x-ratelimit-reset-tokens", format_duration(q.reset_tokens));
    }
}

/// OpenAI's duration format: `20ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64().ceil() as u64;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
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
            rl.check(&cfg(), &m, None, Some("alice"), 10).await.expect("within the limit");
        }
        let err = rl.check(&cfg(), &m, None, Some("alice"), 10).await.unwrap_err();
        assert_eq!(err.status(), 429);
        assert_eq!(err.body()["error"]["code"], "per_user_rpm");
        assert_eq!(err.body()["error"]["type"], "rate_limit_exceeded");
        assert!(err.retry_after_secs.is_some_and(|s| s >= 1));
        let header = |name: &str| err.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
        assert_eq!(header("x-ratelimit-limit-requests").as_deref(), Some("2"), "the 429 reports its limit");
        assert_eq!(header("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        assert!(header("x-ratelimit-reset-requests").is_some());
        assert!(rl.check(&cfg(), &m, None, Some("bob"), 10).await.is_ok(), "bob has his own bucket");
    }

    #[tokio::test]
    async fn tokens_are_reconciled_with_real_usage() {
        let m = Metrics::new().unwrap();
        let c = RateLimitConfig { per_user_rpm: 0, per_user_tpm: 1000, ..cfg() };
        let rl = RateLimiter::new(&c);
        let (q, charge) = rl.check(&c, &m, None, Some("t"), 900).await.unwrap();
        assert_eq!(q.limit_tokens, Some(1000));
        assert!(q.remaining_tokens <= 100);
        assert!(rl.check(&c, &m, None, Some("t"), 900).await.is_err(), "the estimate used the budget");
        charge.expect("tpm is limited").reconcile(100);
        let (q, _) = rl.check(&c, &m, None, Some("t"), 700).await.expect("800 given back");
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
            rl.check(&c, &m, None, Some(&format!("u{i}")), 1).await.unwrap();
        }
        let err = rl.check(&c, &m, None, Some("u9"), 1).await.unwrap_err();
        assert_eq!(err.body()["error"]["code"], "global_rps");
        let c2 = RateLimitConfig { requests_per_second: 0.0, ..c };
        for i in 0..50 {
            rl.check(&c2, &m, None, Some(&format!("many{i}")), 1).await.unwrap();
        }
        assert!(rl.tracked_tenants() <= 5, "bounded: {}", rl.tracked_tenants());
        assert!(m.render().contains("llm_rate_limiter_rejected_total{limit=\"global_rps\"} 1"));
    }

    #[test]
    fn openai_duration_format() {
        assert_eq!(format_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(format_duration(Duration::from_secs(1)), "1s");
        assert_eq!(format_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
