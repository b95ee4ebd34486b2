//! Configuration: figment layering of defaults < TOML file < `LLM_*` environment < command-line flags,
//! then validation that names the bad key.
//!
//! Environment keys: `LLM_HOST`, `LLM_PORT`, `LLM_WORKER_URLS` (comma-separated), and `LLM_<SECTION>_<KEY>`
//! for any key of a section (`LLM_ROUTING_STRATEGY`, `LLM_HEALTH_INTERVAL_MS`, ...); `__` nests deeper
//! (`LLM_ROUTING__P2C__KV_KNEE`). `LLM_CONFIG` names the config file.

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use routing::RoutingConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listening address, body limit, shutdown.
    pub server: ServerConfig,
    /// Timeouts towards workers.
    pub upstream: UpstreamConfig,
    /// The fleet (a `dns+http://` URL stands for every address its name resolves to).
    pub workers: Vec<WorkerConfig>,
    /// Per-model settings (`[[models]]`): aliases, limits, queue overrides, default class.
    pub models: Vec<ModelConfig>,
    /// Workers found beyond the static list: a workers file and DNS names.
    pub discovery: DiscoveryConfig,
    /// Which strategy picks a worker, and its knobs.
    pub routing: RoutingConfig,
    /// Active health probes.
    pub health: HealthConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// Admin API protection.
    pub admin: AdminConfig,
    /// Per-worker circuit breakers.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Retries on another worker before the first byte.
    pub retry: RetryConfig,
    /// The admission queue in front of workers at capacity.
    pub queue: QueueConfig,
    /// API keys.
    pub auth: AuthConfig,
    /// Token-bucket rate limits.
    pub rate_limit: RateLimitConfig,
    /// The Batch API: its store, bounds and share of the fleet.
    pub batch: BatchConfig,
    /// The Responses API: where follow-ups go.
    pub responses: ResponsesConfig,
    /// Several gateway replicas in front of the same workers.
    pub cluster: ClusterConfig,
}

/// `[responses]`: `/v1/responses` follow-ups (`previous_response_id`) go to the worker that created the
/// response they name, since a worker's response store is its own (vLLM's is per process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponsesConfig {
    /// Response ids remembered with their worker, least recently used forgotten first (0 = none:
    /// follow-ups are routed like any request).
    pub max_remembered: usize,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self { max_remembered: 100_000 }
    }
}

/// One `[[models]]` table: a served model's client-facing aliases, its own limits (0 = unlimited) and
/// queue overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The served name (what workers list and receive).
    pub name: String,
    /// Names clients may use instead; the body's `model` is rewritten to `name` before forwarding.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Requests per minute to this model over all tenants.
    #[serde(default)]
    pub requests_per_minute: u64,
    /// Tokens per minute to this model (estimated up front, reconciled with real usage).
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Requests per UTC day to this model.
    #[serde(default)]
    pub requests_per_day: u64,
    /// Requests in flight at once to this model over all workers; more wait (bounded by the queue
    /// timeout).
    #[serde(default)]
    pub max_concurrency: u32,
    /// Overrides `queue.max_size` for this model.
    #[serde(default)]
    pub queue_max_size: Option<usize>,
    /// Overrides `queue.timeout_secs` for this model.
    #[serde(default)]
    pub queue_timeout_secs: Option<u64>,
    /// Default class of its requests when neither `X-Priority` nor the API key sets one.
    #[serde(default)]
    pub priority: Option<gateway_core::Priority>,
}

/// Most `[[models]]` tables (each is a set of buckets and a queue).
pub const MAX_MODELS: usize = 1024;

/// A map keyed by served model name (queues, model slots, metric series), hashed with foldhash: looked
/// up several times per request, where SipHash cost ~190 instructions a lookup (model names are served
/// names, not client-chosen keys).
pub type ModelMap<V> = std::collections::HashMap<std::sync::Arc<str>, V, foldhash::fast::RandomState>;

impl Config {
    /// The `[[models]]` table of the served model `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The served name a client's `model` stands for: the model whose alias it is, else itself.
    pub fn served_name<'a>(&'a self, requested: &'a str) -> &'a str {
        self.models.iter().find(|m| m.aliases.iter().any(|a| a == requested)).map_or(requested, |m| m.name.as_str())
    }

    /// The queue wait a request for `model` is allowed (its `queue_timeout_secs`, else `queue.timeout_secs`).
    pub fn queue_timeout(&self, model: &str) -> std::time::Duration {
        let secs = self.model(model).and_then(|m| m.queue_timeout_secs).unwrap_or(self.queue.timeout_secs);
        std::time::Duration::from_secs(secs)
    }
}

/// Where a worker's slots are counted when several gateways share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterBackend {
    /// In this process; the load a worker reports that others sent is discounted from its capacity.
    #[default]
    Local,
    /// In Redis: every replica takes a worker's slots from one count.
    Redis,
}

/// `[cluster]`: replicas that share their workers. Read once at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `local` or `redis`.
    pub backend: ClusterBackend,
    /// Redis URL for `backend = "redis"`.
    pub redis_url: String,
    /// Seconds a replica's slots outlive it: each slot it holds is leased and renewed while in use.
    pub lease_secs: u64,
    /// `local` (count slots in this process, discounting others' load) or `deny` when Redis is unreachable.
    pub redis_failure: RedisFailure,
    /// Timeout of one Redis call taking a slot.
    pub redis_timeout_ms: u64,
    /// With `backend = "redis"`: tell the other replicas where each prompt was sent (its prefix hashes),
    /// so prefix affinity is the same from any replica (one batched publish, fed to every other replica's
    /// policy). Only for a policy that reads prefix hashes (`p2c_kv`).
    pub share_dispatches: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            backend: ClusterBackend::Local,
            redis_url: "redis://127.0.0.1:6379".into(),
            lease_secs: 10,
            redis_failure: RedisFailure::Local,
            redis_timeout_ms: 100,
            share_dispatches: true,
        }
    }
}

/// `[discovery]`: workers found beyond `[[workers]]` ([`crate::discovery`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A TOML (`[[workers]]` tables) or JSON (a list of worker tables) file whose workers join the
    /// fleet; re-read when it changes.
    pub workers_file: Option<PathBuf>,
    /// How often `dns+http://NAME:PORT` workers' names are resolved again.
    pub interval_ms: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self { workers_file: None, interval_ms: 5000 }
    }
}

/// `[batch]`: the Batch API (`/v1/files`, `/v1/batches`), run in the fleet's spare capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Directory of the SQLite store and the files (`LLM_BATCH_DATA_DIR`); read once at start.
    pub data_dir: PathBuf,
    /// Share of each worker's slots batch lines may fill, 0..=1; the rest is kept for live traffic.
    pub max_share: f64,
    /// Batch lines out at once, all batches together (the only bound when the queue is off).
    pub max_concurrency: usize,
    /// Hours an uploaded or output file is kept.
    pub file_ttl_hours: u64,
    /// Largest file accepted by `POST /v1/files`, bytes (counted while it streams in).
    pub max_file_bytes: u64,
    /// Most lines in one batch's input file.
    pub max_lines: usize,
    /// Attempts for a line that meets 5xx or a connection error (429 waits for budget, uncounted).
    pub max_attempts: u32,
    /// First retry backoff of a line, ms; doubles per attempt up to `retry_max_ms`.
    pub retry_base_ms: u64,
    /// Longest retry backoff of a line, ms.
    pub retry_max_ms: u64,
    /// Largest response body kept for one line, bytes; larger answers are recorded as errors.
    pub max_response_bytes: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            max_share: 0.8,
            max_concurrency: 64,
            file_ttl_hours: 720,
            max_file_bytes: 200_000_000,
            max_lines: 50_000,
            max_attempts: 5,
            retry_base_ms: 500,
            retry_max_ms: 30_000,
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

/// `[auth]`: API keys required on `/v1/*` when enabled.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require `Authorization: Bearer <key>` on `/v1/*`.
    pub enabled: bool,
    /// The keys, as `[[auth.keys]]` tables.
    pub keys: Vec<ApiKeyConfig>,
    /// A TOML file with more `[[keys]]` tables (same fields), read at load and on every reload.
    pub keys_file: Option<PathBuf>,
}

/// One API key: its tenant name, default priority and optional limits overriding `[rate_limit]`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The secret clients send as `Bearer`.
    pub key: String,
    /// The tenant (shown in logs and metrics instead of the key).
    pub name: String,
    /// Default priority class of its requests (`X-Priority` still overrides).
    #[serde(default)]
    pub priority: gateway_core::Priority,
    /// Requests per minute (overrides `rate_limit.per_user_rpm`; 0 = unlimited).
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute (overrides `rate_limit.per_user_tpm`; 0 = unlimited).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Requests per day (overrides `rate_limit.per_user_rpd`; 0 = unlimited).
    #[serde(default)]
    pub requests_per_day: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<ApiKeyConfig>,
}

impl AuthConfig {
    /// The configured keys plus those of `keys_file`.
    pub fn all_keys(&self) -> Result<Vec<ApiKeyConfig>, String> {
        let mut keys = self.keys.clone();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("auth.keys_file: {}: {e}", path.display()))?;
            let file: KeysFile =
                toml::from_str(&text).map_err(|e| format!("auth.keys_file: {}: {}", path.display(), e.message()))?;
            keys.extend(file.keys);
        }
        Ok(keys)
    }
}

/// Where rate-limit buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    /// In this process.
    #[default]
    Local,
    /// In Redis, shared by every replica.
    Redis,
}

/// What a request over a per-key or per-model budget gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// 429 `rate_limit_exceeded` at once.
    #[default]
    Reject,
    /// Wait in the admission queue until the budget allows it (at most the queue timeout).
    Queue,
}

/// What to do when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Keep serving with this process's own buckets.
    #[default]
    Local,
    /// Reject requests until Redis is back.
    Deny,
}

/// `[rate_limit]`: token buckets; every limit 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Limits on or off (`LLM_RATE_LIMIT_ENABLED`).
    pub enabled: bool,
    /// Global requests per second.
    pub requests_per_second: f64,
    /// Global burst.
    pub burst_size: f64,
    /// Requests per minute per key (or per `user` when auth is off).
    pub per_user_rpm: u64,
    /// Tokens per minute per key (prompt chars / 4 + max_tokens before, real usage after).
    pub per_user_tpm: u64,
    /// Requests per day per key (UTC days).
    pub per_user_rpd: u64,
    /// Requests per second one worker is sent at most; a worker at its rate is skipped.
    pub per_worker_qps: f64,
    /// `max_tokens` assumed for token estimates when a request sets none.
    pub default_max_tokens: u64,
    /// `local` or `redis`.
    pub backend: RateLimitBackend,
    /// Redis URL for `backend = "redis"`.
    pub redis_url: String,
    /// `local` (keep serving with local buckets) or `deny` when Redis is unreachable.
    pub redis_failure: RedisFailure,
    /// Timeout of one Redis check.
    pub redis_timeout_ms: u64,
    /// Per-user buckets kept at most (users are client-chosen when auth is off).
    pub max_tracked_users: usize,
    /// `reject` (429) or `queue` (wait for budget) when a per-key or per-model limit is reached.
    pub on_limit: OnLimit,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            requests_per_second: 100.0,
            burst_size: 200.0,
            per_user_rpm: 60,
            per_user_tpm: 0,
            per_user_rpd: 0,
            per_worker_qps: 50.0,
            default_max_tokens: 256,
            backend: RateLimitBackend::Local,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_failure: RedisFailure::Local,
            redis_timeout_ms: 100,
            max_tracked_users: 100_000,
            on_limit: OnLimit::Reject,
        }
    }
}

/// `[queue]`: requests wait here when every worker for their model is at capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue at all; off, requests go to workers whatever their load.
    pub enabled: bool,
    /// Requests waiting per model at most; more get 429 `queue_full`.
    pub max_size: usize,
    /// Longest wait; longer gets 504 `queue_timeout`.
    pub timeout_secs: u64,
    /// A request waiting this long rises one priority class (so low cannot starve); 0 = never.
    pub aging_secs: u64,
    /// Serve tenants of the same class round-robin.
    pub enable_fairness: bool,
    /// Capacity of a worker with `max_concurrency = 0` until one is learned from its metrics (0 = unlimited).
    pub default_worker_concurrency: u32,
    /// Cache-aware hand-off: a freed worker may serve a waiter whose prompt it holds before older ones
    /// of equal standing, each of which may be overtaken this many times; 0 = strict order.
    pub max_overtaken: u32,
    /// Cache-aware hand-off: seconds of waiting that each second of the freed worker's predicted time
    /// to first token counts against (0 = wait alone; higher = prompts stay where they are cached more).
    pub prefill_weight: f64,
    /// Weights of the order waiting requests leave in.
    pub scoring: ScoringConfig,
}

/// `[queue.scoring]`: a waiter's level is `priority * class points (urgent 3 .. low 0) + aging steps +
/// wait * seconds waited + token_fit * (fits its budget left) + retries * returns to the queue`;
/// higher leaves first. The defaults give the plain class-with-aging order. Whatever the weights, a
/// request that has waited `3 * aging_secs` scores the top level (aging still bounds every wait).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// Weight of the class.
    pub priority: f64,
    /// Weight of each second waited.
    pub wait: f64,
    /// Weight of fitting the budget left (among requests waiting for their rate-limit budget).
    pub token_fit: f64,
    /// Weight of each return to the queue (at most 3 count).
    pub retries: f64,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        let d = guard::Scoring::default();
        Self { priority: d.priority, wait: d.wait, token_fit: d.token_fit, retries: d.retries }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_size: 1000,
            timeout_secs: 60,
            aging_secs: 10,
            enable_fairness: true,
            default_worker_concurrency: 0,
            max_overtaken: guard::DEFAULT_MAX_OVERTAKEN,
            prefill_weight: guard::DEFAULT_PREFILL_WEIGHT,
            scoring: ScoringConfig::default(),
        }
    }
}

impl QueueConfig {
    /// The ordering settings of the pure queue.
    pub fn ordering(&self) -> guard::QueueConfig {
        guard::QueueConfig {
            max_size: self.max_size,
            aging: std::time::Duration::from_secs(self.aging_secs),
            fairness: self.enable_fairness,
            max_overtaken: self.max_overtaken,
            prefill_weight: self.prefill_weight,
            scoring: guard::Scoring {
                priority: self.scoring.priority,
                wait: self.scoring.wait,
                token_fit: self.scoring.token_fit,
                retries: self.scoring.retries,
            },
        }
    }
}

/// `[circuit_breaker]`: Hystrix-style, per worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Breakers on or off.
    pub enabled: bool,
    /// Consecutive failures that open a breaker.
    pub failure_threshold: u32,
    /// Trial successes in half-open that close it.
    pub success_threshold: u32,
    /// Seconds a breaker stays open before trials.
    pub timeout_seconds: u64,
    /// Trial requests allowed at once in half-open.
    pub half_open_requests: u32,
    /// A stream whose first token takes longer than this counts as a failure.
    pub slow_call_threshold_ms: u64,
    /// Also open when at least this share of the worker's outcomes in the last 30 s failed (0 = off)...
    pub error_rate_threshold: f64,
    /// ... counted only once the window holds this many outcomes.
    pub min_requests: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 5,
            success_threshold: 3,
            timeout_seconds: 30,
            half_open_requests: 3,
            slow_call_threshold_ms: 5000,
            error_rate_threshold: 0.5,
            min_requests: 20,
        }
    }
}

impl CircuitBreakerConfig {
    /// The breaker state machine's thresholds.
    pub fn breaker(&self) -> guard::BreakerConfig {
        guard::BreakerConfig {
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold,
            timeout: std::time::Duration::from_secs(self.timeout_seconds),
            half_open_requests: self.half_open_requests,
        }
    }
}

/// `[retry]`: exponential backoff with full jitter between attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the first retry is drawn from `0..base_ms`, doubling per retry.
    pub base_ms: u64,
    /// Cap of the backoff range.
    pub max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: 2, base_ms: 25, max_ms: 1000 }
    }
}

/// `[admin]`.
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// When set, admin mutations need `Authorization: Bearer <token>` (or `X-Admin-Token`).
    pub token: Option<String>,
    /// Refuse to start (and refuse a reload) without `token`: for deployments where an open admin API
    /// must never happen by accident.
    pub require_token: bool,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("require_token", &self.require_token)
            .finish()
    }
}

/// What a secret reads as once redacted (in `Debug`, `GET /api/config`, URLs shown or logged).
pub const REDACTED: &str = "***";

/// Where the userinfo of `url` lies (`user:pass` in `http://user:pass@host/`), as a byte range without
/// the `@`. The authority ends at the first `/`, `?`, `#` or `\\` after `://`, and the userinfo is what
/// precedes its last `@`, as WHATWG URL parsing has it; works on strings that do not parse, too.
fn userinfo_span(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    let at = rest[..end].rfind('@')?;
    Some(start..start + at)
}

/// `url` fit to show, log or use as a label: a password becomes `***` (`http://user:***@host:8000/v1`),
/// a lone user name too (it is often a token: `http://***@host`). Borrows when there is no userinfo.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(span) = userinfo_span(url) else { return std::borrow::Cow::Borrowed(url) };
    let userinfo = &url[span.clone()];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{REDACTED}"),
        None => REDACTED.to_string(),
    };
    std::borrow::Cow::Owned(format!("{}{shown}{}", &url[..span.start], &url[span.end..]))
}

/// `url` without its userinfo and the `@` after it (what the gateway connects to: HTTP clients do not
/// send URL credentials, and the connection pool would log them).
pub fn strip_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    match userinfo_span(url) {
        Some(span) => std::borrow::Cow::Owned(format!("{}{}", &url[..span.start], &url[span.end + 1..])),
        None => std::borrow::Cow::Borrowed(url),
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on.
    pub port: u16,
    /// Largest request body accepted; larger is 413.
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Longest a client may take to send a request's head (line and headers), counted from its first
    /// byte; then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest a client may take to send a whole request body to `/v1/*`; then 408 `request_timeout`.
    pub body_read_timeout_ms: u64,
    /// Longest a connection may stay open with no request on it (keep-alive) before it is closed.
    pub idle_timeout_ms: u64,
    /// Most client connections open at once. Beyond it the connection idle the longest is closed to
    /// make room, or, when none is idle, the new one gets 503 `server_busy` and is closed.
    pub max_connections: usize,
    /// Most request-body bytes held at once, over all requests being read or waiting to be forwarded;
    /// beyond it, 503 `server_busy` with `Retry-After`.
    pub max_buffered_bytes: usize,
    /// Answer a client that shuts down its sending side after its request (HTTP/1). Off: an end of
    /// input is the client leaving, noticed at once (its queue place and its generation are freed), as
    /// nginx does by default. On: such a client gets its answer, and one that really left is noticed only
    /// when its answer is written.
    pub half_close: bool,
    /// Threads serving client connections, each a single-threaded runtime that keeps a connection, the
    /// worker connections its requests use and its timers from accept to close (nginx's worker per
    /// core); 0 = one per core. Read at start.
    pub threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 9000,
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace_secs: 30,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_buffered_bytes: 256 * 1024 * 1024,
            half_close: false,
            threads: 0,
        }
    }
}

/// The sizes `upstream.read_buffer_bytes` may take: room for any engine's response head, and no more
/// than hyper's own buffer grows to.
pub const READ_BUFFER_BYTES: std::ops::RangeInclusive<usize> = 1024..=400 * 1024;

/// `[upstream]`: how the gateway talks to workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// TCP connect timeout.
    pub connect_timeout_ms: u64,
    /// Time until the worker's response headers arrive (a non-streaming answer arrives whole).
    pub first_byte_timeout_ms: u64,
    /// Time until a streamed request's response headers arrive: engines send them at once, even while
    /// the request waits in their queue, so a stream without headers is stuck; it is retried elsewhere.
    pub stream_first_byte_timeout_ms: u64,
    /// A worker holding requests that shows no sign of life (no answer, no bytes, no generated tokens)
    /// for this long, or 4x its usual answer time if longer, is stalled: its breaker opens and requests
    /// that sent nothing to their client yet are retried elsewhere.
    pub stall_timeout_ms: u64,
    /// Longest silence between two chunks of a streamed answer.
    pub idle_timeout_ms: u64,
    /// Longest a whole request may take, streams included.
    pub total_timeout_ms: u64,
    /// Fixed size of each worker connection's read buffer, in bytes; a worker's response head must fit
    /// in it (nginx's `proxy_buffer_size`, one page by default as here). Engines send heads of 100-500
    /// bytes. One page rather than hyper's own 8 KB (growing to 400 KB for large reads) keeps 10,000
    /// open streams under 200 MB; a larger one takes fewer reads for large answers.
    pub read_buffer_bytes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 3_000,
            first_byte_timeout_ms: 300_000,
            stream_first_byte_timeout_ms: 10_000,
            stall_timeout_ms: 5_000,
            idle_timeout_ms: 120_000,
            total_timeout_ms: 600_000,
            read_buffer_bytes: 4096,
        }
    }
}

/// One `[[workers]]` entry. Its `Debug` redacts the URL's credentials and the API key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Base URL, `http://host:port`.
    pub url: String,
    /// Display name (default: `host:port`).
    #[serde(default)]
    pub name: Option<String>,
    /// Relative weight for `weighted` routing.
    #[serde(default = "one")]
    pub weight: u32,
    /// Models served; empty means learn them from the worker's `/v1/models`.
    #[serde(default)]
    pub models: Vec<String>,
    /// Most requests in flight at once; 0 means unlimited (or learned, once the queue exists).
    #[serde(default)]
    pub max_concurrency: u32,
    /// Sent upstream as `Authorization: Bearer`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// This worker's health probe: overrides `health.path` (`auto`, `none`, or a path such as `/ping`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
}

/// Longest configured worker name accepted (names are metric labels and log fields).
pub const MAX_WORKER_NAME: usize = 128;

fn one() -> u32 {
    1
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("url", &self.display_url())
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("models", &self.models)
            .field("max_concurrency", &self.max_concurrency)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("health_path", &self.health_path)
            .finish()
    }
}

impl WorkerConfig {
    /// A worker with defaults for everything but the URL.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: None,
            weight: 1,
            models: Vec::new(),
            max_concurrency: 0,
            api_key: None,
            health_path: None,
        }
    }

    /// The configured name, else `host:port` of the URL (never its credentials). This one name is the
    /// worker's identity in the admin API, logs and every metric label.
    pub fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match url::Url::parse(&self.url) {
            Ok(u) => format!("{}:{}", u.host_str().unwrap_or("?"), u.port_or_known_default().unwrap_or(80)),
            Err(_) => strip_userinfo(&self.url).into_owned(),
        }
    }

    /// The URL as it may be shown or logged: credentials redacted ([`redact_url`]).
    pub fn display_url(&self) -> String {
        redact_url(&self.url).into_owned()
    }
}

/// `[health]`: active probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between probes of one worker.
    pub interval_ms: u64,
    /// Timeout of one probe request.
    pub timeout_ms: u64,
    /// Consecutive failed probes that mark a worker unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive good probes that bring it back.
    pub healthy_threshold: u32,
    /// What the probe asks: `auto` (`/health` when it answers 2xx, else `/v1/models`, else passive),
    /// a path such as `/health`, or `none` (passive: healthy until real requests fail).
    pub path: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { interval_ms: 1000, timeout_ms: 1000, unhealthy_threshold: 2, healthy_threshold: 1, path: "auto".into() }
    }
}

/// Whether `path` is a valid `health.path` / `health_path` value.
fn valid_health_path(path: &str) -> bool {
    path == "auto" || path == "none" || (path.starts_with('/') && path.parse::<http::uri::PathAndQuery>().is_ok())
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub format: String,
    /// A tracing filter such as `info` or `llm_gateway=debug` (`RUST_LOG` overrides it).
    pub level: String,
    /// Lines below `warn` are written together at least this often (ms), or sooner when 64 KiB are
    /// waiting; `warn` and `error` lines at once. 0 writes every line at once. Read at start.
    pub flush_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: "text".into(), level: "info".into(), flush_ms: 100 }
    }
}

/// Sections whose keys `LLM_<SECTION>_<KEY>` reaches.
/// The config's sections (`LLM_<SECTION>_<KEY>` reaches their keys), read off [`Config`] itself so the
/// environment can never miss a section added later; longest first, so `rate_limit_x` never matches `rate`.
fn sections() -> Vec<String> {
    let mut names: Vec<String> = match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(map)) => {
            map.into_iter().map(|(k, _)| k).filter(|k| k != "workers" && k != "models").collect()
        }
        _ => Vec::new(),
    };
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    names
}

/// Command-line values that outrank every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--host`.
    pub host: Option<String>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--workers`.
    pub workers: Option<Vec<String>>,
    /// `--strategy`.
    pub strategy: Option<String>,
}

impl Config {
    /// Loads defaults < `file` (or `LLM_CONFIG`, or `config/gateway.toml` when present) < env < `overrides`,
    /// and validates the result. The error is one line naming the key and the reason.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
        Self::load_from(file, overrides, std::env::vars())
    }

    /// [`Config::load`] with the environment given (tests pass their own).
    pub fn load_from(
        file: Option<&Path>,
        overrides: &Overrides,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, String> {
        let env: Vec<(String, String)> = env.filter(|(k, _)| k.starts_with("LLM_")).collect();
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let path: Option<PathBuf> =
            file.map(Path::to_path_buf).or_else(|| var("LLM_CONFIG").map(PathBuf::from)).or_else(|| {
                let default = PathBuf::from("config/gateway.toml");
                default.exists().then_some(default)
            });
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &path {
            if !path.exists() {
                return Err(format!("config file {}: not found", path.display()));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(env_provider(&env));
        if let Some(urls) = var("LLM_WORKER_URLS") {
            fig = fig.merge(Serialized::default("workers", split_urls(&urls)));
        }
        if let Some(host) = &overrides.host {
            fig = fig.merge(Serialized::default("server.host", host));
        }
        if let Some(port) = overrides.port {
            fig = fig.merge(Serialized::default("server.port", port));
        }
        if let Some(urls) = &overrides.workers {
            let workers: Vec<WorkerConfig> = urls.iter().map(WorkerConfig::from_url).collect();
            fig = fig.merge(Serialized::default("workers", workers));
        }
        if let Some(strategy) = &overrides.strategy {
            fig = fig.merge(Serialized::default("routing.strategy", strategy));
        }
        let config: Config = fig.extract().map_err(|e| one_line_error(&e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: URLs, ranges, cross-field rules. Names the bad key. Reads
    /// `auth.keys_file` (see [`Config::validate_reading_keys`]).
    pub fn validate(&self) -> Result<(), String> {
        self.validate_reading_keys().map(|_| ())
    }

    /// [`Config::validate`], returning the API keys it read (`auth.keys` plus `auth.keys_file`), so a
    /// reload reads the keys file once and builds its key table from exactly what was checked.
    pub fn validate_reading_keys(&self) -> Result<Vec<ApiKeyConfig>, String> {
        validate_workers(&self.workers, "workers")?;
        if self.admin.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err("admin.token: must not be empty (unset it to leave the admin API open)".into());
        }
        if self.admin.require_token && self.admin.token.is_none() {
            return Err("admin.require_token: true, but admin.token is not set".into());
        }
        if !valid_health_path(&self.health.path) {
            return Err(format!("health.path: {:?}: must be auto, none or a path starting with /", self.health.path));
        }
        if self.server.max_body_bytes == 0 {
            return Err("server.max_body_bytes: must be at least 1".into());
        }
        if self.server.max_connections == 0 {
            return Err("server.max_connections: must be at least 1".into());
        }
        if self.server.max_buffered_bytes < self.server.max_body_bytes {
            return Err(format!(
                "server.max_buffered_bytes: {} is below server.max_body_bytes ({}): a body of the largest allowed size could never be read",
                self.server.max_buffered_bytes, self.server.max_body_bytes
            ));
        }
        for (key, v) in [
            ("server.header_read_timeout_ms", self.server.header_read_timeout_ms),
            ("server.body_read_timeout_ms", self.server.body_read_timeout_ms),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms),
            ("upstream.first_byte_timeout_ms", self.upstream.first_byte_timeout_ms),
            ("upstream.stream_first_byte_timeout_ms", self.upstream.stream_first_byte_timeout_ms),
            ("upstream.stall_timeout_ms", self.upstream.stall_timeout_ms),
            ("upstream.idle_timeout_ms", self.upstream.idle_timeout_ms),
            ("upstream.total_timeout_ms", self.upstream.total_timeout_ms),
            ("health.interval_ms", self.health.interval_ms),
            ("health.timeout_ms", self.health.timeout_ms),
            ("discovery.interval_ms", self.discovery.interval_ms),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be greater than 0"));
            }
        }
        if !READ_BUFFER_BYTES.contains(&self.upstream.read_buffer_bytes) {
            return Err(format!(
                "upstream.read_buffer_bytes: {} is outside {}..={} (a worker's response head must fit in it)",
                self.upstream.read_buffer_bytes,
                READ_BUFFER_BYTES.start(),
                READ_BUFFER_BYTES.end()
            ));
        }
        if self.health.unhealthy_threshold == 0 || self.health.healthy_threshold == 0 {
            return Err("health.unhealthy_threshold and health.healthy_threshold: must be at least 1".into());
        }
        let keys = self.auth.all_keys()?;
        let mut seen = std::collections::HashSet::new();
        for (i, k) in keys.iter().enumerate() {
            if k.key.is_empty() || k.name.is_empty() {
                return Err(format!("auth.keys[{i}]: key and name must not be empty"));
            }
            if !seen.insert(&k.key) {
                return Err(format!("auth.keys[{i}] ({}): the same key is listed twice", k.name));
            }
        }
        if self.auth.enabled && keys.is_empty() {
            return Err("auth.enabled: no keys configured (auth.keys or auth.keys_file)".into());
        }
        let rl = &self.rate_limit;
        for (key, v) in [
            ("rate_limit.requests_per_second", rl.requests_per_second),
            ("rate_limit.burst_size", rl.burst_size),
            ("rate_limit.per_worker_qps", rl.per_worker_qps),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{key}: {v} must be a finite number >= 0"));
            }
        }
        if rl.backend == RateLimitBackend::Redis {
            let u = url::Url::parse(&rl.redis_url).map_err(|e| format!("rate_limit.redis_url: {e}"))?;
            if !matches!(u.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
                return Err(format!("rate_limit.redis_url: scheme {:?} is not a Redis URL", u.scheme()));
            }
            // Opening a client only parses the URL (it connects on first use): what it refuses, refuse here.
            redis::Client::open(rl.redis_url.as_str()).map_err(|e| format!("rate_limit.redis_url: {e}"))?;
        }
        self.validate_models()?;
        let sc = &self.queue.scoring;
        for (key, v) in [
            ("queue.scoring.priority", sc.priority),
            ("queue.scoring.wait", sc.wait),
            ("queue.scoring.token_fit", sc.token_fit),
            ("queue.scoring.retries", sc.retries),
            ("queue.prefill_weight", self.queue.prefill_weight),
        ] {
            if !v.is_finite() || !(0.0..=1_000.0).contains(&v) {
                return Err(format!("{key}: {v} must be a number from 0 to 1000"));
            }
        }
        let cl = &self.cluster;
        if cl.lease_secs == 0 || cl.redis_timeout_ms == 0 {
            return Err("cluster.lease_secs and cluster.redis_timeout_ms: must be at least 1".into());
        }
        if cl.backend == ClusterBackend::Redis {
            let u = url::Url::parse(&cl.redis_url).map_err(|e| format!("cluster.redis_url: {e}"))?;
            if !matches!(u.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
                return Err(format!("cluster.redis_url: scheme {:?} is not a Redis URL", u.scheme()));
            }
            redis::Client::open(cl.redis_url.as_str()).map_err(|e| format!("cluster.redis_url: {e}"))?;
        }
        if self.queue.timeout_secs == 0 {
            return Err("queue.timeout_secs: must be greater than 0".into());
        }
        if self.retry.max_attempts == 0 {
            return Err("retry.max_attempts: must be at least 1 (1 means no retry)".into());
        }
        if self.retry.base_ms > self.retry.max_ms {
            return Err("retry.base_ms: must not exceed retry.max_ms".into());
        }
        let cb = &self.circuit_breaker;
        for (key, v) in [
            ("circuit_breaker.failure_threshold", cb.failure_threshold),
            ("circuit_breaker.success_threshold", cb.success_threshold),
            ("circuit_breaker.half_open_requests", cb.half_open_requests),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if !(0.0..=1.0).contains(&cb.error_rate_threshold) {
            return Err(format!("circuit_breaker.error_rate_threshold: {} is not in 0..=1", cb.error_rate_threshold));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(format!("log.format: {:?}: expected \"text\" or \"json\"", self.log.format));
        }
        self.routing.validate()?;
        let b = &self.batch;
        if !(0.0..=1.0).contains(&b.max_share) {
            return Err(format!("batch.max_share: {} is not in 0..=1", b.max_share));
        }
        for (key, v) in [
            ("batch.max_concurrency", b.max_concurrency as u64),
            ("batch.max_file_bytes", b.max_file_bytes),
            ("batch.max_lines", b.max_lines as u64),
            ("batch.max_attempts", u64::from(b.max_attempts)),
            ("batch.max_response_bytes", b.max_response_bytes as u64),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if b.retry_base_ms > b.retry_max_ms {
            return Err("batch.retry_base_ms: must not exceed batch.retry_max_ms".into());
        }
        Ok(keys)
    }
}

impl Config {
    /// `[[models]]`: names and aliases non-empty, printable and used once; overrides in range.
    fn validate_models(&self) -> Result<(), String> {
        if self.models.len() > MAX_MODELS {
            return Err(format!("models: {} tables, at most {MAX_MODELS}", self.models.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            for (what, name) in std::iter::once(("name", &m.name)).chain(m.aliases.iter().map(|a| ("aliases", a))) {
                if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                    return Err(format!(
                        "models[{i}].{what}: {:?} must be 1 to 256 bytes without control characters",
                        gateway_core::echo(name)
                    ));
                }
                if !seen.insert(name.as_str()) {
                    return Err(format!("models[{i}].{what}: {:?} is named twice", gateway_core::echo(name)));
                }
            }
            if m.queue_timeout_secs == Some(0) {
                return Err(format!("models[{i}].queue_timeout_secs: must be greater than 0"));
            }
            if m.priority == Some(gateway_core::Priority::Batch) {
                return Err(format!("models[{i}].priority: batch is not a class a model can default to"));
            }
        }
        Ok(())
    }
}

/// Checks a list of worker tables (`[[workers]]`, or a workers file's): URLs, weights, health paths,
/// names (printable, bounded, unique within the list). Errors name the entry as `{what}[i]`.
pub fn validate_workers(workers: &[WorkerConfig], what: &str) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, w) in workers.iter().enumerate() {
        // Error messages are logged and answered: the URL in them is redacted and bounded.
        let shown = gateway_core::echo(&w.display_url()).into_owned();
        let url = url::Url::parse(&w.url).map_err(|e| format!("{what}[{i}].url: {shown:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "dns+http") {
            return Err(format!("{what}[{i}].url: {shown:?}: only http:// (or dns+http://) workers are supported"));
        }
        if url.host_str().is_none() {
            return Err(format!("{what}[{i}].url: {shown:?} has no host"));
        }
        if w.weight == 0 {
            return Err(format!("{what}[{i}].weight: must be at least 1"));
        }
        if let Some(path) = w.health_path.as_deref().filter(|p| !valid_health_path(p)) {
            return Err(format!(
                "{what}[{i}].health_path: {:?}: must be auto, none or a path starting with /",
                gateway_core::echo(path)
            ));
        }
        let name = w.display_name();
        // The name is a metric label, a log field and a response header: short and printable.
        let too_long = w.name.is_some() && name.chars().count() > MAX_WORKER_NAME;
        if name.is_empty() || too_long || name.chars().any(char::is_control) {
            let shown = gateway_core::echo(&name);
            return Err(format!(
                "{what}[{i}].name: {shown:?} must be 1 to {MAX_WORKER_NAME} characters without control characters"
            ));
        }
        if !names.insert(name) {
            return Err(format!("{what}[{i}].name: {:?} is used twice", gateway_core::echo(&w.display_name())));
        }
    }
    Ok(())
}

/// Worker URLs from a comma-separated list.
pub fn split_urls(list: &str) -> Vec<WorkerConfig> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(WorkerConfig::from_url).collect()
}

/// `LLM_<SECTION>_<KEY>` to `section.key`; `__` nests deeper; `LLM_HOST`/`LLM_PORT` are shortcuts.
fn env_provider(env: &[(String, String)]) -> figment::providers::Serialized<serde_json::Value> {
    let mut root = serde_json::Map::new();
    let sections = sections();
    for (key, value) in env {
        let Some(rest) = key.strip_prefix("LLM_") else { continue };
        let rest = rest.to_ascii_lowercase();
        let path: Vec<String> = match rest.as_str() {
            "host" => vec!["server".into(), "host".into()],
            "port" => vec!["server".into(), "port".into()],
            _ => {
                let Some(section) = sections.iter().find(|s| rest.starts_with(&format!("{s}_"))) else { continue };
                let tail = rest[section.len() + 1..].trim_start_matches('_');
                std::iter::once(section.to_string()).chain(tail.split("__").map(str::to_string)).collect()
            }
        };
        insert(&mut root, &path, parse_env_value(value));
    }
    Serialized::defaults(serde_json::Value::Object(root))
}

fn insert(map: &mut serde_json::Map<String, serde_json::Value>, path: &[String], value: serde_json::Value) {
    match path {
        [] => {}
        [last] => {
            map.insert(last.clone(), value);
        }
        [head, rest @ ..] => {
            let child = map.entry(head.clone()).or_insert_with(|| serde_json::Value::Object(Default::default()));
            if let serde_json::Value::Object(m) = child {
                insert(m, rest, value);
            }
        }
    }
}

/// Env values are strings; numbers and booleans are read as such so typed keys accept them.
fn parse_env_value(v: &str) -> serde_json::Value {
    match v.trim() {
        "true" => serde_json::Value::Bool(true),
        "false" => serde_json::Value::Bool(false),
        t => t
            .parse::<i64>()
            .map(Into::into)
            .or_else(|_| t.parse::<f64>().map(Into::into))
            .unwrap_or_else(|_| serde_json::Value::String(v.to_string())),
    }
}

/// A figment error as one line naming the key and, for a file, the layer it came from:
/// `routing.strategy: unknown variant ... (from TOML file)`. Values set in code (env, flags, the admin
/// API's merge patch) have no useful layer name: only the key is given.
pub fn one_line_error(e: &figment::Error) -> String {
    let first = e.clone().into_iter().next().unwrap_or_else(|| e.clone());
    let key = if first.path.is_empty() { String::new() } else { format!("{}: ", first.path.join(".")) };
    let source = match &first.metadata {
        Some(md) if !matches!(md.source, Some(figment::Source::Code(_))) => format!(" (from {})", md.name),
        _ => String::new(),
    };
    format!("{key}{}{source}", first.kind).replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], o: &Overrides) -> Result<Config, String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        Config::load_from(None, o, env.into_iter())
    }

    #[test]
    fn defaults_then_env_then_flags() {
        let c = load(&[], &Overrides::default()).expect("defaults load");
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.host, "0.0.0.0");
        let env =
            [("LLM_PORT", "9100"), ("LLM_WORKER_URLS", "http://a:1, http://b:2"), ("LLM_HEALTH_INTERVAL_MS", "250")];
        let c = load(&env, &Overrides::default()).expect("env loads");
        assert_eq!(c.server.port, 9100);
        assert_eq!(c.workers.len(), 2);
        assert_eq!(c.workers[1].display_name(), "b:2");
        assert_eq!(c.health.interval_ms, 250);
        let o = Overrides { port: Some(9200), workers: Some(vec!["http://c:3".into()]), ..Default::default() };
        let c = load(&env, &o).expect("flags load");
        assert_eq!(c.server.port, 9200);
        assert_eq!(c.workers.len(), 1);
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(&[("LLM_ROUTING_STRATEGY", "fastest")], &Overrides::default()).unwrap_err();
        assert!(e.contains("routing.strategy") && e.contains("fastest"), "{e}");
        let e = load(&[("LLM_WORKER_URLS", "not a url")], &Overrides::default()).unwrap_err();
        assert!(e.starts_with("workers[0].url"), "{e}");
        let e = load(&[("LLM_PORT", "http")], &Overrides::default()).unwrap_err();
        assert!(e.contains("server.port"), "{e}");
        let e = load(&[("LLM_HEALTH_INTERVAL_MS", "0")], &Overrides::default()).unwrap_err();
        assert!(e.contains("health.interval_ms"), "{e}");
        assert!(!e.contains('\n'));
        let e = load(&[("LLM_UPSTREAM_READ_BUFFER_BYTES", "512")], &Overrides::default()).unwrap_err();
        assert!(e.starts_with("upstream.read_buffer_bytes: 512 is outside 1024..=409600"), "{e}");
        let c = load(&[("LLM_UPSTREAM_READ_BUFFER_BYTES", "2048")], &Overrides::default()).expect("loads");
        assert_eq!(c.upstream.read_buffer_bytes, 2048);
    }

    #[test]
    fn section_keys_from_the_environment() {
        let env = [
            ("LLM_AUTH_ENABLED", "false"),
            ("LLM_QUEUE_MAX_SIZE", "7"),
            ("LLM_QUEUE_TIMEOUT_SECS", "3"),
            ("LLM_CIRCUIT_BREAKER_ENABLED", "false"),
            ("LLM_RATE_LIMIT_ENABLED", "true"),
            ("LLM_ROUTING_STRATEGY", "p2c_kv"),
            ("LLM_ROUTING__P2C__KV_KNEE", "0.8"),
        ];
        let c = load(&env, &Overrides::default()).expect("loads");
        assert_eq!((c.queue.max_size, c.queue.timeout_secs), (7, 3));
        assert!(!c.circuit_breaker.enabled);
        assert!(c.rate_limit.enabled);
        assert_eq!(c.routing.strategy, routing::Strategy::P2cKv);
        assert_eq!(c.routing.p2c.kv_knee, 0.8);
    }

    #[test]
    fn url_credentials_are_redacted_or_stripped() {
        assert_eq!(redact_url("http://user:pw@h:8000/v1"), "http://user:***@h:8000/v1");
        assert_eq!(redact_url("http://tok3n@h:8000"), "http://***@h:8000");
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("http://u:p@ss@h/"), "http://u:***@h/", "the last @ ends the userinfo");
        assert_eq!(redact_url("http://h:1/path@x"), "http://h:1/path@x", "an @ in the path is no userinfo");
        assert!(matches!(redact_url("http://h:1"), std::borrow::Cow::Borrowed("http://h:1")));
        assert_eq!(redact_url("not a url u:p@h"), "not a url u:p@h");
        assert_eq!(strip_userinfo("http://user:pw@h:8000/v1"), "http://h:8000/v1");
        assert_eq!(strip_userinfo("http://h:8000"), "http://h:8000");
        assert_eq!(strip_userinfo("ftp://u:p@h"), "ftp://h");
    }

    #[test]
    fn debug_and_names_never_show_credentials() {
        let mut w = WorkerConfig::from_url("http://user:s3cret-pw@gpu-a:8000/");
        w.api_key = Some("sk-s3cret".into());
        assert_eq!(w.display_name(), "gpu-a:8000");
        assert_eq!(w.display_url(), "http://user:***@gpu-a:8000/");
        let mut c = Config { workers: vec![w], ..Config::default() };
        c.admin.token = Some("adm-s3cret".into());
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("user:***@gpu-a:8000") && debug.contains("require_token"), "{debug}");
        // A URL that does not parse is named without its userinfo, and refused without showing it.
        let broken = WorkerConfig::from_url("http://user:s3cret-pw@[bad/x");
        assert!(!broken.display_name().contains("s3cret"));
        let c = Config { workers: vec![broken], ..Config::default() };
        let e = c.validate().unwrap_err();
        assert!(e.starts_with("workers[0].url") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn admin_token_rules() {
        let mut c = Config::default();
        c.admin.require_token = true;
        assert!(c.validate().unwrap_err().starts_with("admin.require_token"));
        c.admin.token = Some(" ".into());
        assert!(c.validate().unwrap_err().starts_with("admin.token"));
        c.admin.token = Some("t".into());
        assert!(c.validate().is_ok());
        let e = load(&[("LLM_ADMIN_REQUIRE_TOKEN", "true")], &Overrides::default()).unwrap_err();
        assert!(e.starts_with("admin.require_token"), "{e}");
    }

    #[test]
    fn worker_names_are_short_and_printable() {
        let named = |n: &str| {
            let mut w = WorkerConfig::from_url("http://h:1");
            w.name = Some(n.into());
            Config { workers: vec![w], ..Config::default() }.validate()
        };
        assert!(named("gpu-a").is_ok());
        for bad in ["", "a\nb", "\u{1b}[31m", &"n".repeat(MAX_WORKER_NAME + 1)] {
            let e = named(bad).unwrap_err();
            assert!(e.starts_with("workers[0].name") && !e.contains('\n') && e.len() < 400, "{e}");
        }
    }

    #[test]
    fn unrelated_llm_variables_are_ignored() {
        let c = load(&[("LLM_API_KEY", "x"), ("LLM_CONFIG_DIR", "y")], &Overrides::default()).expect("loads");
        assert_eq!(c, Config::default());
    }
}

#[cfg(test)]
mod reference_file {
    use super::*;

    /// `config/gateway.toml` documents every key with its default: it must load to exactly the defaults.
    #[test]
    fn reference_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/gateway.toml");
        let c = Config::load_from(Some(&path), &Overrides::default(), std::iter::empty()).expect("reference loads");
        assert_eq!(c, Config::default());
    }
}
