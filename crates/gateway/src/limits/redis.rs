//! Rate-limit buckets in Redis, shared by every gateway replica.
//!
//! One Lua script per check reads all of a request's buckets, refills them by Redis's own clock
//! (`TIME`: replicas' clocks never disagree), and charges them only if every one admits, so concurrent
//! checks from many replicas can never overspend a bucket. Keys expire when idle. A request's buckets
//! are the global one, its tenant's (`llmgw:rl:{tenant}:*`) and its model's (`llmgw:rlm:{model}:*`),
//! all in the one script call.

use crate::limits::quota::{Limit, Limits, Quota, Refusal, Verdict};
use crate::redis_conn::LazyRedis;
use std::sync::Arc;
use std::time::Duration;

/// Each bucket takes five arguments: kind (`tb` token bucket or `win` day counter), rate or window end,
/// burst or limit, tokens needed, tokens charged. Returns `{allowed, failing index, retry ms, then per
/// bucket remaining and ms until full}`.
const CHECK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local level = {}
for i = 1, n do
  local base = (i - 1) * 5
  local kind, a, b, need = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  if kind == 'tb' then
    local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
    local tokens = tonumber(v[1]) or b
    local ts = tonumber(v[2]) or now
    if now > ts then tokens = math.min(b, tokens + (now - ts) * a) end
    level[i] = tokens
    if tokens < need then
      local wait = 86400
      if a > 0 then wait = (need - tokens) / a end
      return {0, i, math.ceil(wait * 1000)}
    end
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    level[i] = used
    if used + need > b then return {0, i, math.ceil((a - now) * 1000)} end
  end
end
local out = {1, 0, 0}
for i = 1, n do
  local base = (i - 1) * 5
  local kind, a, b, charge = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 5])
  if kind == 'tb' then
    local left = level[i] - charge
    redis.call('HSET', KEYS[i], 'tokens', tostring(left), 'ts', tostring(now))
    local full_ms = 1000
    if a > 0 then full_ms = math.ceil((b - left) / a * 1000) + 1000 end
    redis.call('PEXPIRE', KEYS[i], math.max(full_ms, 1000))
    out[#out + 1] = math.max(0, math.floor(left))
    out[#out + 1] = math.max(0, full_ms - 1000)
  else
    local used = redis.call('INCRBY', KEYS[i], charge)
    redis.call('EXPIREAT', KEYS[i], math.ceil(a) + 60)
    out[#out + 1] = math.max(0, b - used)
    out[#out + 1] = math.max(0, math.ceil((a - now) * 1000))
  end
end
return out
"#;

/// Gives tokens back (or charges more), never above the burst.
const ADJUST: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if v then redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(tonumber(ARGV[2]), v + tonumber(ARGV[1])))) end
return 1
"#;

/// A lazily connected, self-reconnecting handle to the shared buckets.
#[derive(Clone)]
pub struct RedisBuckets {
    redis: LazyRedis,
    check: Arc<redis::Script>,
    adjust: Arc<redis::Script>,
}

impl RedisBuckets {
    /// A handle for `url`; nothing connects until the first check.
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self {
            redis: LazyRedis::open(url)?,
            check: Arc::new(redis::Script::new(CHECK)),
            adjust: Arc::new(redis::Script::new(ADJUST)),
        })
    }

    /// Checks and charges the buckets of one request with `limits` on UTC day number `day` (which names
    /// the day's counter). The outer `Result` is Redis's; the inner one the limits' verdict, as the
    /// local buckets give it.
    pub async fn check(
        &self,
        limits: &Limits,
        day: u64,
        tenant: Option<&str>,
        model: Option<&str>,
        tokens: u64,
    ) -> Result<Verdict, String> {
        let mut order: Vec<Limit> = Vec::new();
        let mut inv = self.check.prepare_invoke();
        if limits.rps > 0.0 {
            inv.key("llmgw:rl:global").arg("tb").arg(limits.rps).arg(limits.burst).arg(1).arg(1);
            order.push(Limit::GlobalRps);
        }
        if let Some(t) = tenant {
            let scope = [Limit::Rpd, Limit::Rpm, Limit::Tpm];
            add_scope(&mut inv, &mut order, limits, ("rl", t), scope, day, tokens);
        }
        // Model keys have their own prefix: no tenant name can collide with them.
        if let Some(m) = model.filter(|_| limits.per_model()) {
            let scope = [Limit::ModelRpd, Limit::ModelRpm, Limit::ModelTpm];
            add_scope(&mut inv, &mut order, limits, ("rlm", m), scope, day, tokens);
        }
        if order.is_empty() {
            return Ok(Ok(Quota::default()));
        }
        let mut conn = self.redis.conn().await?;
        let out: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
        let get = |i: usize| out.get(i).copied().unwrap_or(0).max(0) as u64;
        if get(0) == 0 {
            let limit = order.get((get(1) as usize).saturating_sub(1)).copied().unwrap_or(Limit::GlobalRps);
            return Ok(Err(Refusal { limit, retry_after: Duration::from_millis(get(2)) }));
        }
        let mut quota = Quota::default();
        for (i, limit) in order.into_iter().enumerate() {
            // The day counters are not among the headers' limits.
            if !matches!(limit, Limit::Rpd | Limit::ModelRpd) {
                quota.report(limits, limit, get(3 + 2 * i), Duration::from_millis(get(4 + 2 * i)));
            }
        }
        Ok(Ok(quota))
    }

    /// Gives back `delta` tokens (negative: charges more) to `tenant`'s token bucket.
    pub async fn adjust_tokens(&self, tenant: &str, delta: f64) -> Result<(), String> {
        self.adjust_key(format!("llmgw:rl:{tenant}:tpm"), delta).await
    }

    /// Gives back `delta` tokens (negative: charges more) to `model`'s token bucket.
    pub async fn adjust_model_tokens(&self, model: &str, delta: f64) -> Result<(), String> {
        self.adjust_key(format!("llmgw:rlm:{model}:tpm"), delta).await
    }

    async fn adjust_key(&self, key: String, delta: f64) -> Result<(), String> {
        let mut conn = self.redis.conn().await?;
        // The burst cap is applied by the next check's refill; here only the level moves.
        let _: i64 =
            self.adjust.key(key).arg(delta).arg(f64::MAX).invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Adds one scope's buckets (a tenant's or a model's: requests per day, requests per minute, tokens
/// per minute, the kinds in `[rpd, rpm, tpm]`) to `inv`, keyed `llmgw:{space}:{name}:..`, and their
/// kinds to `order` in the same order. A bucket whose size is 0 is off and left out (no key is built).
fn add_scope(
    inv: &mut redis::ScriptInvocation<'_>,
    order: &mut Vec<Limit>,
    limits: &Limits,
    (space, name): (&str, &str),
    [rpd, rpm, tpm]: [Limit; 3],
    day: u64,
    tokens: u64,
) {
    let per_day = limits.of(rpd);
    if per_day > 0 {
        let day_end = (day + 1) * 86_400;
        inv.key(format!("llmgw:{space}:{name}:rpd:{day}")).arg("win").arg(day_end).arg(per_day).arg(1).arg(1);
        order.push(rpd);
    }
    let per_minute = limits.of(rpm) as f64;
    if per_minute > 0.0 {
        inv.key(format!("llmgw:{space}:{name}:rpm")).arg("tb").arg(per_minute / 60.0).arg(per_minute).arg(1).arg(1);
        order.push(rpm);
    }
    let tokens_per_minute = limits.of(tpm) as f64;
    if tokens_per_minute > 0.0 {
        let need = (tokens as f64).min(tokens_per_minute);
        inv.key(format!("llmgw:{space}:{name}:tpm"))
            .arg("tb")
            .arg(tokens_per_minute / 60.0)
            .arg(tokens_per_minute)
            .arg(need)
            .arg(tokens);
        order.push(tpm);
    }
}
