//! Hot reload: a new [`Config`] becomes a new [`Snapshot`] swapped in one store, without dropping a
//! request.
//!
//! A reload has two halves, in the manner of pingora's `Backends::update`:
//! 1. **Build** ([`prepare`], fallible, changes nothing shared): validate the config, read the keys
//!    file once and build the key table from what was checked, rebuild the fleet carrying live workers
//!    and their counters over ([`Fleet::rebuild`]: kept workers are not touched), keep the routing
//!    policy (and its learned state) when `[routing]` did not change, and build a rate limiter when its
//!    backend changed. Any error returns here: the running gateway is exactly as it was.
//! 2. **Commit** ([`commit`], infallible): reconfigure the admission queue, apply the breaker
//!    thresholds, forget the removed workers in the old policy, and store the snapshot.
//!
//! Requests in flight hold their own snapshot and load guards, so they finish on the workers they
//! started on even when those workers leave the fleet.
//!
//! Reloads are serialized by one async lock per gateway ([`AppState::reload`]), so read-modify-write
//! changes (the admin API adding a worker, a JSON merge patch) never lose each other's updates: see
//! [`update`].
//!
//! [`spawn_watchers`] reloads from the config file on `SIGHUP` and when the file changes on disk
//! (polled once a second: no watcher crate, and it works on every filesystem).

use crate::auth::Auth;
use crate::config::{Config, Overrides, WorkerConfig};
use crate::fleet::worker::Worker;
use crate::fleet::Fleet;
use crate::limits::RateLimiter;
use crate::state::{AppState, Snapshot};
use routing::Policy;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Replaces the running config with `new`. On error (validation, the keys file) the old config keeps
/// serving and the reason, naming the key, is returned.
pub async fn apply(app: &Arc<AppState>, new: Config) -> Result<(), String> {
    update(app, move |_| Ok(new)).await.map(|_| ())
}

/// Derives a new config from the running one with `change` and applies it, atomically with respect to
/// other reloads. Returns the config now in force. On error nothing has changed.
pub async fn update(
    app: &Arc<AppState>,
    change: impl FnOnce(&Config) -> Result<Config, String>,
) -> Result<Arc<Config>, String> {
    // A tokio mutex: held across the probe `.await` below on purpose, so reloads never interleave.
    let _serial = app.reload.lock().await;
    let old = app.snapshot.load_full();
    let new = change(&old.config)?;
    let Some(next) = prepare(app, &old, new)? else { return Ok(Arc::clone(&old.config)) };
    let config = Arc::clone(&next.snapshot.config);
    let (added, removed) = commit(app, &old, next);

    for w in &added {
        tracing::info!(worker = %w.name, url = %w.spec.display_url(), "worker added");
    }
    for w in &removed {
        tracing::info!(worker = %w.name, url = %w.spec.display_url(), in_flight = w.view().in_flight, "worker removed");
    }
    app.start_probes().await;
    app.stop_stale_probes();
    let now = app.snapshot.load();
    for w in &removed {
        // A worker whose entry changed is replaced by one of the same name: keep its series then.
        if !now.fleet.workers.iter().any(|n| n.name == w.name) {
            app.metrics.forget_worker(&w.name);
        }
    }
    tracing::info!(workers = now.fleet.workers.len(), strategy = now.policy.name(), "config reloaded");
    Ok(config)
}

/// What the build half of a reload made, for the commit half to put in force.
pub struct Prepared {
    /// The snapshot to store.
    snapshot: Snapshot,
    /// A limiter for a changed backend; `None` keeps the one in force (and its buckets).
    limiter: Option<Arc<RateLimiter>>,
}

/// The fallible half: validates `new`, reads the keys file and the workers file once, builds the key
/// table, fleet (discovered workers included, [`crate::discovery::specs::fleet_specs`]), policy and (when its
/// backend changed) the limiter. Touches nothing shared: on `Err` the gateway is as it
/// was. `Ok(None)` when neither the config nor the keys changed.
pub fn prepare(app: &AppState, old: &Snapshot, new: Config) -> Result<Option<Prepared>, String> {
    let keys = new.validate_reading_keys()?;
    let auth = Auth::new(new.auth.enabled, &keys);
    // The workers file is read here, once, and the DNS answers in force expand the list.
    let specs = crate::discovery::specs::fleet_specs(&new, &app.resolved.load())?;
    let same_workers =
        specs.len() == old.fleet.workers.len() && specs.iter().zip(&old.fleet.workers).all(|(s, w)| *s == w.spec);
    if new == *old.config && auth == *old.auth && same_workers {
        return Ok(None);
    }
    warn_restart_only(&old.config, &new);
    let fleet = Fleet::rebuild(&old.fleet, &specs, &new.circuit_breaker, || app.next_worker_id());
    let policy: Arc<dyn Policy> =
        if new.routing == old.config.routing { Arc::clone(&old.policy) } else { routing::build(&new.routing) };
    let limiter = ((new.rate_limit.backend, &new.rate_limit.redis_url)
        != (old.config.rate_limit.backend, &old.config.rate_limit.redis_url))
        // A new backend starts with fresh buckets; limits merely changed keep theirs.
        .then(|| RateLimiter::new(&new.rate_limit));
    let snapshot = Snapshot::new(new, fleet, policy, auth);
    Ok(Some(Prepared { snapshot, limiter }))
}

/// The infallible half: puts `next` in force over `old`. Returns the workers added and removed.
pub fn commit(app: &AppState, old: &Snapshot, next: Prepared) -> (Vec<Arc<Worker>>, Vec<Arc<Worker>>) {
    let Prepared { snapshot, limiter } = next;
    let config = &snapshot.config;
    app.admission.reconfigure(&config.queue);
    app.admission.set_batch_share(config.batch.max_share);
    app.response_homes.set_capacity(config.responses.max_remembered);
    snapshot.fleet.configure_breakers(&config.circuit_breaker);
    let (fleet, policy) = (&snapshot.fleet, &snapshot.policy);
    let removed: Vec<_> =
        old.fleet.workers.iter().filter(|w| !fleet.workers.iter().any(|n| Arc::ptr_eq(n, w))).cloned().collect();
    let added: Vec<_> =
        fleet.workers.iter().filter(|n| !old.fleet.workers.iter().any(|w| Arc::ptr_eq(n, w))).cloned().collect();
    for w in &removed {
        old.policy.forget(w.id);
    }
    if old.policy.name() != policy.name() {
        tracing::info!(from = old.policy.name(), to = policy.name(), "routing strategy switched");
    } else if !Arc::ptr_eq(&old.policy, policy) {
        tracing::info!(strategy = policy.name(), "routing settings changed");
    }
    if let Some(limiter) = limiter {
        app.limiter.store(limiter);
    }
    app.snapshot.store(Arc::new(snapshot));
    (added, removed)
}

/// Logs the changes a reload cannot apply to a running process.
fn warn_restart_only(old: &Config, new: &Config) {
    if old.server.host != new.server.host || old.server.port != new.server.port {
        tracing::warn!(
            old = %format!("{}:{}", old.server.host, old.server.port),
            new = %format!("{}:{}", new.server.host, new.server.port),
            "server.host/server.port changed: takes effect after a restart"
        );
    }
    if old.server.threads != new.server.threads {
        tracing::warn!("server.threads changed: takes effect after a restart");
    }
    if old.upstream.connect_timeout_ms != new.upstream.connect_timeout_ms {
        tracing::warn!("upstream.connect_timeout_ms changed: takes effect after a restart");
    }
    if old.upstream.read_buffer_bytes != new.upstream.read_buffer_bytes {
        tracing::warn!("upstream.read_buffer_bytes changed: takes effect after a restart");
    }
    if old.cluster != new.cluster {
        tracing::warn!("[cluster] changed: takes effect after a restart");
    }
    if old.batch.data_dir != new.batch.data_dir {
        tracing::warn!("batch.data_dir changed: takes effect after a restart");
    }
}

/// Where a reload reads the config from: the same layers as at start-up.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `--config`; when `None`, `LLM_CONFIG` or `config/gateway.toml` as at start-up.
    pub file: Option<PathBuf>,
    /// Command-line flags, which outrank the file on every reload too.
    pub overrides: Overrides,
    /// Workers that replace whatever the file says (`--demo`'s in-process workers).
    pub fixed_workers: Option<Vec<WorkerConfig>>,
}

impl ConfigSource {
    /// Loads the config from its layers, as at start-up.
    pub fn load(&self) -> Result<Config, String> {
        let mut config = Config::load(self.file.as_deref(), &self.overrides)?;
        if let Some(workers) = &self.fixed_workers {
            config.workers = workers.clone();
        }
        Ok(config)
    }

    /// The file a reload reads, if any: `--config`, else `LLM_CONFIG`, else `config/gateway.toml` when
    /// present (the same rule as [`Config::load`]).
    pub fn watched_file(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| std::env::var_os("LLM_CONFIG").map(PathBuf::from)).or_else(|| {
            let default = PathBuf::from("config/gateway.toml");
            default.exists().then_some(default)
        })
    }
}

/// Loads the config from `source` and applies it; logs the outcome (a bad config keeps the old one).
pub async fn reload_from(app: &Arc<AppState>, source: &ConfigSource, why: &str) -> Result<(), String> {
    let result = match source.load() {
        Ok(config) => apply(app, config).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(()) => tracing::info!(trigger = why, "config reload done"),
        Err(e) => tracing::error!(trigger = why, error = %e, "config reload rejected; the old config keeps serving"),
    }
    result
}

/// How often the config file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads the config from `source` on `SIGHUP` and whenever its file changes on disk, until the gateway
/// shuts down. Errors are logged; the old config keeps serving.
pub fn spawn_watchers(app: Arc<AppState>, source: ConfigSource) {
    #[cfg(unix)]
    {
        let app = Arc::clone(&app);
        let source = source.clone();
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on signal disabled");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = app.shutdown.cancelled() => return,
                    got = hup.recv() => {
                        if got.is_none() { return; }
                        let _ = reload_from(&app, &source, "SIGHUP").await;
                    }
                }
            }
        });
    }
    if let Some(path) = source.watched_file() {
        // The baseline is read now, not when the task first runs: a change made right after this call
        // must count as a change.
        let baseline = file_state(&path);
        tokio::spawn(watch_file(app, source, path, baseline, POLL_INTERVAL));
    }
}

/// Polls `path` every `every`; a change of modification time or content triggers a reload.
async fn watch_file(app: Arc<AppState>, source: ConfigSource, path: PathBuf, baseline: FileState, every: Duration) {
    let mut last = baseline;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || file_state(&path)).await.ok().flatten()
        };
        if now == last {
            continue;
        }
        match &now {
            None => tracing::warn!(file = %path.display(), "config file is gone; keeping the running config"),
            Some(_) => {
                tracing::info!(file = %path.display(), "config file changed");
                let _ = reload_from(&app, &source, "file change").await;
            }
        }
        last = now;
    }
}

/// Modification time and content of a file, `None` when it cannot be read.
pub(crate) type FileState = Option<(Option<std::time::SystemTime>, Vec<u8>)>;

/// The file's [`FileState`] (content too: some editors and filesystems keep the mtime on a rewrite).
pub(crate) fn file_state(path: &Path) -> FileState {
    let modified = std::fs::metadata(path).ok()?.modified().ok();
    let content = std::fs::read(path).ok()?;
    Some((modified, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{QueueConfig, RateLimitBackend};
    use gateway_core::RequestFeatures;

    /// Two workers, p2c_kv routing (it learns per worker), a queue and breakers off their defaults.
    fn base() -> Config {
        let workers = vec![WorkerConfig::from_url("http://127.0.0.1:9"), WorkerConfig::from_url("http://127.0.0.1:10")];
        let mut c = Config { workers, ..Config::default() };
        c.routing.strategy = routing::Strategy::P2cKv;
        c.queue.max_size = 7;
        c.circuit_breaker.failure_threshold = 3;
        c
    }

    /// Everything a refused reload must leave as it was.
    #[derive(Debug, PartialEq)]
    struct Seen {
        config: Arc<Config>,
        queue: QueueConfig,
        thresholds: Vec<guard::BreakerConfig>,
        policy_entries: usize,
        workers: Vec<*const Worker>,
        limiter: *const RateLimiter,
        auth: *const Auth,
    }

    fn seen(app: &AppState) -> Seen {
        let snap = app.snapshot.load();
        Seen {
            config: Arc::clone(&snap.config),
            queue: (*app.admission.config()).clone(),
            thresholds: snap.fleet.workers.iter().map(|w| w.breaker.lock().config()).collect(),
            policy_entries: snap.policy.memory_entries(),
            workers: snap.fleet.workers.iter().map(Arc::as_ptr).collect(),
            limiter: Arc::as_ptr(&app.limiter.load_full()),
            auth: Arc::as_ptr(&snap.auth),
        }
    }

    /// A change of every part a reload commits: one worker fewer (the policy forgets it), another queue
    /// size and breaker threshold, another limiter backend.
    fn changed() -> Config {
        let mut c = base();
        c.workers.pop();
        c.queue.max_size = 99;
        c.circuit_breaker.failure_threshold = 9;
        c.rate_limit.backend = RateLimitBackend::Redis;
        c.rate_limit.redis_url = "redis://127.0.0.1:1/0".into();
        c
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("llmgw-reload-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        path
    }

    #[tokio::test]
    async fn a_refused_reload_changes_nothing_and_a_good_one_changes_everything() {
        let app = AppState::new(base()).expect("state");
        let snap = app.snapshot.load_full();
        let features = RequestFeatures { prefix_hashes: (0..8).collect(), chunk_bytes: 128, ..Default::default() };
        for w in &snap.fleet.workers {
            let _ = snap.policy.on_dispatch(&features, w.id);
        }
        assert_eq!(snap.policy.memory_entries(), 16, "the policy learned both workers");
        let before = seen(&app);

        let bad_keys = temp_file("bad-keys.toml", "[[keys]]\nkey = 1\n");
        let twice = temp_file("twice.toml", "[[keys]]\nkey = \"sk-a\"\nname = \"b\"\n");
        type Break = Box<dyn Fn(&mut Config)>;
        let refusals: Vec<(&str, Break, &str)> = vec![
            ("bad config", Box::new(|c| c.health.interval_ms = 0), "health.interval_ms"),
            (
                "unreadable keys file",
                Box::new(|c| c.auth.keys_file = Some("/nonexistent/llmgw-keys.toml".into())),
                "auth.keys_file",
            ),
            ("invalid keys file", Box::new(move |c| c.auth.keys_file = Some(bad_keys.clone())), "auth.keys_file"),
            (
                "a key in the file and the config",
                Box::new(move |c| {
                    c.auth.keys = vec![crate::config::ApiKeyConfig {
                        key: "sk-a".into(),
                        name: "a".into(),
                        priority: Default::default(),
                        requests_per_minute: None,
                        tokens_per_minute: None,
                        requests_per_day: None,
                    }];
                    c.auth.keys_file = Some(twice.clone());
                }),
                "listed twice",
            ),
            ("bad policy config", Box::new(|c| c.routing.p2c.kv_knee = 1.5), "routing.p2c.kv_knee"),
            (
                "bad limiter config",
                Box::new(|c| c.rate_limit.redis_url = "redis://127.0.0.1:1/not-a-db".into()),
                "rate_limit.redis_url",
            ),
        ];
        for (what, break_it, named) in refusals {
            let mut c = changed();
            break_it(&mut c);
            let err = apply(&app, c).await.expect_err(what);
            assert!(err.contains(named), "{what}: {err}");
            assert_eq!(seen(&app), before, "{what}: the running gateway changed");
        }
        let err = update(&app, |_| Err("no".to_string())).await.expect_err("a refused change");
        assert_eq!(err, "no");
        assert_eq!(seen(&app), before);

        apply(&app, changed()).await.expect("a good reload");
        let after = seen(&app);
        assert_eq!(after.queue.max_size, 99);
        assert_eq!(after.thresholds, vec![changed().circuit_breaker.breaker()]);
        assert_eq!(after.policy_entries, 8, "the removed worker is forgotten");
        assert_eq!(after.workers, before.workers[..1], "the kept worker is carried over");
        assert_ne!(after.limiter, before.limiter, "a new backend, a new limiter");
        app.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_changed_keys_file_alone_is_reloaded() {
        let keys = temp_file("keys.toml", "[[keys]]\nkey = \"sk-1\"\nname = \"one\"\n");
        let mut c = Config::default();
        c.auth.enabled = true;
        c.auth.keys_file = Some(keys.clone());
        let app = AppState::new(c.clone()).expect("state");
        assert!(app.snapshot.load().auth.tenant_named("one").is_some());
        std::fs::write(&keys, "[[keys]]\nkey = \"sk-2\"\nname = \"two\"\n").expect("rewrite");
        apply(&app, c).await.expect("same config, new keys");
        let auth = Arc::clone(&app.snapshot.load().auth);
        assert!(auth.tenant_named("two").is_some() && auth.tenant_named("one").is_none());
        let _ = std::fs::remove_file(keys);
    }

    #[tokio::test]
    async fn two_gateways_in_one_process_share_no_reload_lock_and_no_sampler() {
        let a = AppState::new(Config::default()).expect("state a");
        let b = AppState::new(Config::default()).expect("state b");
        let _a_reloading = a.reload.lock().await;
        let mut c = Config::default();
        c.queue.max_size = 3;
        tokio::time::timeout(Duration::from_secs(10), apply(&b, c))
            .await
            .expect("b's reload does not wait for a's")
            .expect("b reloads");
        assert_eq!(b.admission.config().max_size, 3);
        assert_ne!(a.admission.config().max_size, 3);
        assert!(!Arc::ptr_eq(&a.sampler, &b.sampler));
    }
}
