//! A worker's slots in Redis, one sorted set per worker shared by every replica.
//!
//! Each slot taken is one member (`<replica>:<n>`) scored with its lease's end in Redis's own clock
//! (`TIME`), so the count of a worker is the members not yet expired, and the slots of a replica that
//! died leave the count by themselves within a lease. Taking is one Lua script (drop expired members,
//! count, add only below capacity), so two replicas can never both take the last slot. A refusal leaves a
//! marker; the release that finds it publishes the worker on [`FREED_CHANNEL`], so replicas with waiters
//! learn of the freed slot without polling. Renewing only extends members that still exist (`XX`): a
//! slot released (or expired) is never brought back by a late renewal. Learned capacities meet in one
//! hash (`llmgw:capacity`, the highest per worker), so every replica holds a worker to the same count.
//! A breaker opening is a key per worker (`llmgw:breaker:<url>`) that expires with the opening, told on
//! [`OPENED_CHANNEL`]; an operator's reset deletes it and is told on [`RESET_CHANNEL`]. Dispatch records
//! go out on [`DISPATCH_CHANNEL`] and are kept nowhere.

use crate::redis_conn::LazyRedis;
use std::sync::Arc;
use std::time::Duration;

/// Where a release that frees a slot someone was refused says so; the message is the worker's URL.
pub const FREED_CHANNEL: &str = "llmgw:slots:freed";

/// KEYS: the worker's set, its refusal marker. ARGV: capacity, member, lease ms. Returns 1 when taken.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', lease)
return 0
"#;

/// KEYS: the worker's set. ARGV: capacity. Returns 1 when a slot is free (expired ones dropped first).
const HAS_ROOM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then return 1 end
return 0
"#;

/// KEYS: the worker's set, its refusal marker. ARGV: member, channel, worker URL. Publishes when
/// someone was refused since the last release.
const RELEASE: &str = r#"
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return removed
"#;

/// KEYS: workers' sets. ARGV: lease ms, then per key a member count and the members. Extends the
/// leases of members that still exist.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[k], 'XX', now + lease, ARGV[i])
    i = i + 1
  end
  redis.call('PEXPIRE', KEYS[k], lease * 2)
end
return 1
"#;

/// KEYS: the learned-capacity hash. ARGV: pairs of worker URL and the capacity this replica learned.
/// Keeps the highest per worker and returns it, in order: replicas agree on what a worker runs at once.
const CAPACITY: &str = r#"
local out = {}
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local mine = tonumber(ARGV[i + 1])
  if mine > cur then
    redis.call('HSET', KEYS[1], ARGV[i], mine)
    cur = mine
  end
  out[#out + 1] = cur
end
redis.call('PEXPIRE', KEYS[1], 86400000)
return out
"#;

/// Where a breaker opening is told: `<opening id> <open ms> <worker URL>`.
pub const OPENED_CHANNEL: &str = "llmgw:breaker:opened";

/// Where an operator's breaker reset is told: `<replica> <worker url>`.
pub const RESET_CHANNEL: &str = "llmgw:breaker:reset";

/// KEYS: the worker's opening key. ARGV: channel, message. Ends the opening for replicas yet to learn
/// it, and tells the others to close their breakers now.
const RESET: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"#;

/// Where dispatch records are told, batched ([`super::affinity`] encodes them).
pub const DISPATCH_CHANNEL: &str = "llmgw:affinity:dispatched";

/// KEYS: the worker's opening key. ARGV: opening id, open ms, channel, message. Remembers the opening
/// for its open time (for replicas that start or reconnect meanwhile) and tells the others now.
const OPENED: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#;

/// KEYS: workers' opening keys. Returns per key its opening id and the ms it has left ('' and 0: none).
const OPENINGS: &str = r#"
local out = {}
for k = 1, #KEYS do
  local id = redis.call('GET', KEYS[k])
  local left = redis.call('PTTL', KEYS[k])
  if id and left > 0 then
    out[#out + 1] = id
    out[#out + 1] = left
  else
    out[#out + 1] = ''
    out[#out + 1] = 0
  end
end
return out
"#;

/// The key of a worker's slot set (its URL, the one name every replica gives it the same way).
pub fn slots_key(worker_url: &str) -> String {
    format!("llmgw:slots:{worker_url}")
}

fn marker_key(worker_url: &str) -> String {
    format!("llmgw:slots-refused:{worker_url}")
}

/// The key holding a worker's breaker opening while it lasts.
pub fn opening_key(worker_url: &str) -> String {
    format!("llmgw:breaker:{worker_url}")
}

/// A lazily connected, self-reconnecting handle to the shared slot counts.
#[derive(Clone)]
pub struct RedisSlots {
    redis: LazyRedis,
    take: Arc<redis::Script>,
    release: Arc<redis::Script>,
    renew: Arc<redis::Script>,
    has_room: Arc<redis::Script>,
    capacity: Arc<redis::Script>,
    opened: Arc<redis::Script>,
    openings: Arc<redis::Script>,
    reset: Arc<redis::Script>,
}

impl RedisSlots {
    /// A handle for `url`; nothing connects until the first call.
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self {
            redis: LazyRedis::open(url)?,
            take: Arc::new(redis::Script::new(TAKE)),
            release: Arc::new(redis::Script::new(RELEASE)),
            renew: Arc::new(redis::Script::new(RENEW)),
            has_room: Arc::new(redis::Script::new(HAS_ROOM)),
            capacity: Arc::new(redis::Script::new(CAPACITY)),
            opened: Arc::new(redis::Script::new(OPENED)),
            openings: Arc::new(redis::Script::new(OPENINGS)),
            reset: Arc::new(redis::Script::new(RESET)),
        })
    }

    /// The client, for the pub/sub connection.
    pub fn client(&self) -> &redis::Client {
        self.redis.client()
    }

    /// Takes one slot of the worker at `url` as `member` if fewer than `cap` are held; whether it did.
    pub async fn take(&self, url: &str, cap: u32, member: &str, lease: Duration) -> Result<bool, String> {
        let mut conn = self.redis.conn().await?;
        let taken: i64 = self
            .take
            .key(slots_key(url))
            .key(marker_key(url))
            .arg(cap)
            .arg(member)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(taken == 1)
    }

    /// Gives `member`'s slot on the worker at `url` back, telling waiting replicas when one was refused.
    pub async fn release(&self, url: &str, member: &str) -> Result<(), String> {
        let mut conn = self.redis.conn().await?;
        let _: i64 = self
            .release
            .key(slots_key(url))
            .key(marker_key(url))
            .arg(member)
            .arg(FREED_CHANNEL)
            .arg(url)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Extends the leases of `held` (per worker URL, the members this replica holds there).
    pub async fn renew(&self, held: &[(Arc<str>, Vec<String>)], lease: Duration) -> Result<(), String> {
        if held.is_empty() {
            return Ok(());
        }
        let mut inv = self.renew.prepare_invoke();
        inv.arg(lease.as_millis() as u64);
        for (url, members) in held {
            inv.key(slots_key(url)).arg(members.len());
            for m in members {
                inv.arg(m);
            }
        }
        let mut conn = self.redis.conn().await?;
        let _: i64 = inv.invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Whether fewer than `cap` slots of the worker at `url` are held (expired ones do not count).
    pub async fn has_room(&self, url: &str, cap: u32) -> Result<bool, String> {
        let mut conn = self.redis.conn().await?;
        let room: i64 =
            self.has_room.key(slots_key(url)).arg(cap).invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
        Ok(room == 1)
    }

    /// Shares learned capacities: `learned` pairs a worker URL with what this replica learned (0:
    /// nothing yet); returns the highest any replica learned, in the same order.
    pub async fn agree_capacity(&self, learned: &[(String, u32)]) -> Result<Vec<u32>, String> {
        if learned.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.capacity.prepare_invoke();
        inv.key("llmgw:capacity");
        for (url, cap) in learned {
            inv.arg(url).arg(*cap);
        }
        let mut conn = self.redis.conn().await?;
        let out: Vec<u32> = inv.invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// Remembers the opening `id` of the breaker of the worker at `url` for `open`, and tells the others.
    pub async fn opened(&self, url: &str, id: &str, open: Duration) -> Result<(), String> {
        let open_ms = (open.as_millis() as u64).max(1);
        let message = format!("{id} {open_ms} {url}");
        let mut conn = self.redis.conn().await?;
        let _: i64 = self
            .opened
            .key(opening_key(url))
            .arg(id)
            .arg(open_ms)
            .arg(OPENED_CHANNEL)
            .arg(message)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Ends the breaker opening of the worker at `url` and tells the other replicas, as `replica`, that an
    /// operator reset it.
    pub async fn reset(&self, url: &str, replica: &str) -> Result<(), String> {
        let mut conn = self.redis.conn().await?;
        let _: i64 = self
            .reset
            .key(opening_key(url))
            .arg(RESET_CHANNEL)
            .arg(format!("{replica} {url}"))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The breaker openings in force for the workers at `urls`, in order: the opening id and the time
    /// it has left, or `None`.
    pub async fn openings(&self, urls: &[&str]) -> Result<Vec<Option<(String, Duration)>>, String> {
        if urls.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.openings.prepare_invoke();
        for url in urls {
            inv.key(opening_key(url));
        }
        let mut conn = self.redis.conn().await?;
        let flat: Vec<redis::Value> = inv.invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(urls.len());
        for pair in flat.chunks(2) {
            let id: String = pair.first().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or_default();
            let left: u64 = pair.get(1).and_then(|v| redis::from_redis_value(v).ok()).unwrap_or(0);
            out.push((!id.is_empty() && left > 0).then(|| (id, Duration::from_millis(left))));
        }
        Ok(out)
    }

    /// Publishes `message` on `channel`.
    pub async fn publish(&self, channel: &str, message: &[u8]) -> Result<(), String> {
        let mut conn = self.redis.conn().await?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.redis.conn().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(|e| e.to_string())
    }
}
