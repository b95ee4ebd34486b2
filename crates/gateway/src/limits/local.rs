//! The buckets of this process: global, per tenant, per model and per worker ([`guard::TokenBucket`],
//! [`guard::WindowCounter`] for days).
//!
//! A check reads every bucket a request needs and charges them only if all admit, as the Redis script
//! does: a refusal leaves every bucket as it was (no charge-then-refund). Time is tokio's clock
//! (paused in tests), converted at the `guard` boundary.

use crate::config::MAX_MODELS;
use crate::limits::quota::{Limit, Limits, Quota, Refusal, Verdict};
use guard::{TokenBucket, WindowCounter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Tenant name used when too many distinct `user`s are tracked: they share one bucket set.
pub const OVERFLOW_TENANT: &str = "(overflow)";

/// Idle tenants are dropped after this long once `max_tracked_users` is reached.
const TENANT_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct TenantBuckets {
    rpm: Option<TokenBucket>,
    tpm: Option<TokenBucket>,
    rpd: Option<WindowCounter>,
    last_used: Instant,
}

/// Every bucket of this process.
#[derive(Debug, Default)]
pub struct LocalBuckets {
    global: Mutex<Option<TokenBucket>>,
    tenants: Mutex<HashMap<Arc<str>, TenantBuckets>>,
    /// Per-model buckets, by served name (only models with limits; bounded by [`MAX_MODELS`]).
    models: Mutex<HashMap<Arc<str>, TenantBuckets>>,
    workers: Mutex<HashMap<u64, TokenBucket>>,
}

/// The sizes and names of one bucket set (a tenant's or a model's).
struct SetLimits {
    rpm: u64,
    tpm: u64,
    rpd: u64,
    names: [Limit; 3],
}

/// A bucket with `rate`/`burst`, re-configured in place (keeping its level) when they changed.
fn bucket(slot: &mut Option<TokenBucket>, rate: f64, burst: f64, now: Instant) -> &mut TokenBucket {
    let b = slot.get_or_insert_with(|| TokenBucket::new(rate, burst, now.into_std()));
    if b.rate_per_sec() != rate || b.burst() != burst {
        b.reconfigure(rate, burst, now.into_std());
    }
    b
}

/// `Ok` when `b` holds `need` now, else the refusal of `limit` (nothing is taken either way).
fn admits(b: &mut TokenBucket, need: f64, limit: Limit, now: Instant) -> Result<(), Refusal> {
    b.check(need, now.into_std()).map_err(|d| Refusal { limit, retry_after: d.retry_after })
}

/// The set's record for `name` in `map`, bounded to `max` names (idle ones dropped, then overflow).
fn record<'a>(
    map: &'a mut HashMap<Arc<str>, TenantBuckets>,
    name: &str,
    max: usize,
    now: Instant,
) -> &'a mut TenantBuckets {
    let key = tenant_key(map, name, max, now);
    let t = map.entry(key).or_insert_with(|| TenantBuckets { rpm: None, tpm: None, rpd: None, last_used: now });
    t.last_used = now;
    t
}

impl TenantBuckets {
    /// Whether every bucket of this set admits one request of `tokens`; takes nothing.
    fn check(&mut self, l: &SetLimits, tokens: u64, now: Instant, unix: u64) -> Result<(), Refusal> {
        let [rpm_name, tpm_name, rpd_name] = l.names;
        if l.rpd > 0 {
            let c = self.rpd.get_or_insert_with(|| WindowCounter::per_day(l.rpd));
            if c.limit() != l.rpd {
                c.set_limit(l.rpd);
            }
            if c.remaining(unix) < 1 {
                return Err(Refusal { limit: rpd_name, retry_after: c.reset_after(unix) });
            }
        }
        if l.rpm > 0 {
            let rpm = l.rpm as f64;
            admits(bucket(&mut self.rpm, rpm / 60.0, rpm, now), 1.0, rpm_name, now)?;
        }
        if l.tpm > 0 {
            let tpm = l.tpm as f64;
            // A request larger than the whole minute's budget is admitted against a full bucket (it
            // goes into debt) rather than refused forever.
            admits(bucket(&mut self.tpm, tpm / 60.0, tpm, now), (tokens as f64).min(tpm), tpm_name, now)?;
        }
        Ok(())
    }

    /// Charges one request of `tokens` to every bucket of this set and reports their levels.
    fn charge(&mut self, l: &SetLimits, all: &Limits, tokens: u64, quota: &mut Quota, now: Instant, unix: u64) {
        let at = now.into_std();
        let [rpm_name, tpm_name, _] = l.names;
        if let Some(c) = self.rpd.as_mut().filter(|_| l.rpd > 0) {
            let _ = c.try_take(1, unix);
        }
        if let Some(b) = self.rpm.as_mut().filter(|_| l.rpm > 0) {
            b.take_debt(1.0, at);
            quota.report(all, rpm_name, b.remaining(at) as u64, b.reset_after(at));
        }
        if let Some(b) = self.tpm.as_mut().filter(|_| l.tpm > 0) {
            b.take_debt(tokens as f64, at);
            quota.report(all, tpm_name, b.remaining(at) as u64, b.reset_after(at));
        }
    }
}

impl LocalBuckets {
    /// Checks every bucket of one request of `tenant` to `model` costing `tokens` (estimated) at `now`
    /// (`unix` seconds for the day counters), then charges them all, or none. Tracks at most
    /// `max_tenants` tenants (client-chosen `user`s must not grow memory).
    #[allow(clippy::too_many_arguments)] // the request's identity, its cost and the two clocks
    pub fn check(
        &self,
        l: &Limits,
        tenant: Option<&str>,
        model: Option<&str>,
        tokens: u64,
        max_tenants: usize,
        now: Instant,
        unix: u64,
    ) -> Verdict {
        let mut quota = Quota::default();
        let at = now.into_std();
        let tenant_limits =
            SetLimits { rpm: l.rpm, tpm: l.tpm, rpd: l.rpd, names: [Limit::Rpm, Limit::Tpm, Limit::Rpd] };
        let model_limits = SetLimits {
            rpm: l.model_rpm,
            tpm: l.model_tpm,
            rpd: l.model_rpd,
            names: [Limit::ModelRpm, Limit::ModelTpm, Limit::ModelRpd],
        };
        // Lock order: global, tenants, models.
        let mut global_slot = self.global.lock();
        let mut global = if l.rps > 0.0 { Some(bucket(&mut global_slot, l.rps, l.burst, now)) } else { None };
        let mut tenants = self.tenants.lock();
        let mut t = tenant.filter(|_| l.per_tenant()).map(|name| record(&mut tenants, name, max_tenants, now));
        let mut models = self.models.lock();
        let mut m = model.filter(|_| l.per_model()).map(|name| record(&mut models, name, MAX_MODELS, now));

        // Check everything first.
        if let Some(g) = global.as_deref_mut() {
            admits(g, 1.0, Limit::GlobalRps, now)?;
        }
        if let Some(t) = t.as_deref_mut() {
            t.check(&tenant_limits, tokens, now, unix)?;
        }
        if let Some(m) = m.as_deref_mut() {
            m.check(&model_limits, tokens, now, unix)?;
        }

        // Every bucket admits: charge them all.
        if let Some(g) = global {
            g.take_debt(1.0, at);
            quota.report(l, Limit::GlobalRps, g.remaining(at) as u64, g.reset_after(at));
        }
        if let Some(t) = t {
            t.charge(&tenant_limits, l, tokens, &mut quota, now, unix);
        }
        if let Some(m) = m {
            m.charge(&model_limits, l, tokens, &mut quota, now, unix);
        }
        Ok(quota)
    }

    /// Gives back (positive) or charges (negative) `model`'s tokens once the real usage is known.
    pub fn adjust_model_tokens(&self, model: &str, delta: f64, now: Instant) {
        if let Some(b) = self.models.lock().get_mut(model).and_then(|t| t.tpm.as_mut()) {
            adjust(b, delta, now);
        }
    }

    /// Gives back (positive) or charges (negative) `tenant`'s tokens once the real usage is known.
    pub fn adjust_tokens(&self, tenant: &str, delta: f64, now: Instant) {
        if let Some(b) = self.tenants.lock().get_mut(tenant).and_then(|t| t.tpm.as_mut()) {
            adjust(b, delta, now);
        }
    }

    /// Whether `worker` is below `qps` now (routing skips workers at their rate).
    pub fn worker_has_budget(&self, worker: u64, qps: f64, now: Instant) -> bool {
        let now = now.into_std();
        let mut workers = self.workers.lock();
        let b = workers.entry(worker).or_insert_with(|| TokenBucket::new(qps, qps.max(1.0), now));
        if b.rate_per_sec() != qps {
            b.reconfigure(qps, qps.max(1.0), now);
        }
        b.check(1.0, now).is_ok()
    }

    /// Charges one request to `worker`'s rate.
    pub fn charge_worker(&self, worker: u64, now: Instant) {
        if let Some(b) = self.workers.lock().get_mut(&worker) {
            let _ = b.try_take(1.0, now.into_std());
        }
    }

    /// Tenants tracked (bounded by `max_tracked_users`).
    pub fn tracked_tenants(&self) -> usize {
        self.tenants.lock().len()
    }
}

fn adjust(b: &mut TokenBucket, delta: f64, now: Instant) {
    if delta > 0.0 {
        b.give_back(delta);
    } else {
        b.take_debt(-delta, now.into_std());
    }
}

/// The bucket key for `tenant`, bounded: past `max` tenants, idle ones are dropped, and if still full
/// the newcomer shares the overflow bucket.
fn tenant_key(tenants: &mut HashMap<Arc<str>, TenantBuckets>, tenant: &str, max: usize, now: Instant) -> Arc<str> {
    if let Some((k, _)) = tenants.get_key_value(tenant) {
        return Arc::clone(k);
    }
    if tenants.len() >= max.max(1) {
        tenants.retain(|_, t| now.duration_since(t.last_used) < TENANT_IDLE);
    }
    if tenants.len() >= max.max(1) {
        return Arc::from(OVERFLOW_TENANT);
    }
    Arc::from(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: f64, burst: f64, rpm: u64, tpm: u64) -> Limits {
        Limits { rps, burst, rpm, tpm, ..Limits::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_refill_on_the_paused_clock() {
        let b = LocalBuckets::default();
        let l = limits(2.0, 2.0, 0, 0);
        let check = || b.check(&l, None, None, 1, 10, Instant::now(), 0);
        assert!(check().is_ok() && check().is_ok(), "the burst");
        let refused = check().expect_err("the burst is spent");
        assert_eq!(refused.limit, Limit::GlobalRps);
        assert!(refused.retry_after > Duration::from_millis(499) && refused.retry_after <= Duration::from_millis(501));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(check().is_err(), "not yet a whole token");
        tokio::time::advance(Duration::from_millis(2)).await;
        let q = check().expect("one token refilled at 2/s");
        assert_eq!((q.limit_requests, q.remaining_requests), (2, 0));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(check().map(|q| q.remaining_requests), Ok(1), "refilled to the burst, not beyond");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_charges_no_bucket() {
        let b = LocalBuckets::default();
        // The global bucket admits, the tenant's tokens do not: the global token must stay.
        let l = limits(1.0, 1.0, 0, 100);
        let now = Instant::now();
        b.check(&l, Some("t"), None, 100, 10, now, 0).expect("the whole minute's tokens");
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        let refused = b.check(&l, Some("t"), None, 50, 10, now, 0).expect_err("tokens spent");
        assert_eq!(refused.limit, Limit::Tpm);
        let q =
            b.check(&limits(1.0, 1.0, 0, 0), Some("t"), None, 1, 10, now, 0).expect("the global token is still there");
        assert_eq!(q.remaining_requests, 0);
        // A day counter refusing leaves the minute's requests untouched.
        let l = Limits { rps: 0.0, burst: 1.0, rpm: 5, rpd: 1, ..Limits::default() };
        b.check(&l, Some("d"), None, 1, 10, now, 0).expect("first of the day");
        assert_eq!(b.check(&l, Some("d"), None, 1, 10, now, 0).map_err(|r| r.limit), Err(Limit::Rpd));
        let q = b.check(&Limits { rpd: 0, ..l }, Some("d"), None, 1, 10, now, 0).expect("rpm still has room");
        assert_eq!(q.remaining_requests, 3, "5 - the first - this one: the refusal took nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tenants_make_room_and_the_rest_overflow() {
        let b = LocalBuckets::default();
        let l = limits(0.0, 1.0, 100, 0);
        for i in 0..4 {
            b.check(&l, Some(&format!("u{i}")), None, 1, 4, Instant::now(), 0).expect("room");
        }
        b.check(&l, Some("late"), None, 1, 4, Instant::now(), 0).expect("overflow shares a bucket");
        assert_eq!(b.tracked_tenants(), 5, "four and the overflow");
        tokio::time::advance(TENANT_IDLE).await;
        b.check(&l, Some("fresh"), None, 1, 4, Instant::now(), 0).expect("idle tenants dropped");
        assert_eq!(b.tracked_tenants(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn model_buckets_are_shared_by_tenants_and_refuse_without_charging() {
        let b = LocalBuckets::default();
        let l = Limits { burst: 1.0, rpm: 10, model_rpm: 2, model_tpm: 1000, ..Limits::default() };
        let now = Instant::now();
        let q = b.check(&l, Some("a"), Some("m"), 100, 10, now, 0).expect("first");
        assert_eq!((q.limit_requests, q.remaining_requests), (2, 1), "the model's is the tighter limit");
        assert_eq!((q.limit_tokens, q.remaining_tokens), (Some(1000), 900));
        b.check(&l, Some("b"), Some("m"), 100, 10, now, 0).expect("another tenant, same model");
        let refused = b.check(&l, Some("c"), Some("m"), 1, 10, now, 0).expect_err("the model's minute is spent");
        assert_eq!((refused.limit, refused.limit.as_str()), (Limit::ModelRpm, "per_model_rpm"));
        let unlimited = Limits { model_rpm: 0, model_tpm: 0, ..l };
        let q = b.check(&unlimited, Some("c"), Some("other"), 1, 10, now, 0).expect("other models are apart");
        assert_eq!(q.remaining_requests, 9, "10 - this one: the refusal took nothing from tenant c");
        let tpm = Limits { model_rpm: 0, model_tpm: 1000, ..l };
        assert_eq!(b.check(&tpm, Some("d"), Some("m"), 900, 10, now, 0).map_err(|r| r.limit), Err(Limit::ModelTpm));
        b.adjust_model_tokens("m", 200.0, now);
        b.check(&tpm, Some("d"), Some("m"), 900, 10, now, 0).expect("200 tokens given back");
    }
}
