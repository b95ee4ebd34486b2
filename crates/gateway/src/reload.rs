//! Hot reload: a new [`Config`] becomes a new [`Snapshot`] swapped in one store, without dropping a
//! request.
//!
//! A reload validates the new config first (a bad one is rejected with its reason and the old one keeps
//! serving), rebuilds the fleet carrying live workers and their counters over ([`Fleet::rebuild`]),
//! keeps the routing policy (and its learned state) when `[routing]` did not change, and swaps the
//! snapshot. Requests in flight hold their own snapshot and load guards, so they finish on the workers
//! they started on even when those workers leave the fleet.
//!
//! Reloads are serialized by one async lock, so read-modify-write changes (the admin API adding a
//! worker, a JSON merge patch) never lose each other's updates: see [`update`].
//!
//! [`spawn_watchers`] reloads from the config file on `SIGHUP` and when the file changes on disk
//! (polled once a second: no watcher crate, and it works on every filesystem).

use crate::config::{Config, Overrides, WorkerConfig};
use crate::fleet::Fleet;
use crate::state::{AppState, Snapshot};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Serializes reloads: one read-modify-write of the config at a time.
static RELOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Replaces the running config with `new`. On error (validation) the old config keeps serving and the
/// reason, naming the key, is returned.
pub async fn apply(app: &Arc<AppState>, new: Config) -> Result<(), String> {
    update(app, move |_| Ok(new)).await.map(|_| ())
}

/// Derives a new config from the running one with `change` and applies it, atomically with respect to
/// other reloads. Returns the config now in force.
pub async fn update(
    app: &Arc<AppState>,
    change: impl FnOnce(&Config) -> Result<Config, String>,
) -> Result<Arc<Config>, String> {
    // A tokio mutex: held across the probe `.await` below on purpose, so reloads never interleave.
    let _serial = RELOAD.lock().await;
    let old = app.snapshot.load_full();
    let new = change(&old.config)?;
    new.validate()?;
    if new == *old.config {
        return Ok(Arc::clone(&old.config));
    }
    warn_restart_only(&old.config, &new);

    app.admission.reconfigure(&new.queue);
    app.admission.set_batch_share(new.batch.max_share);
    let fleet = Fleet::rebuild(&old.fleet, &new.workers, &new.circuit_breaker, || app.next_worker_id());
    let policy = if new.routing == old.config.routing { Arc::clone(&old.policy) } else { routing::build(&new.routing) };
    let removed: Vec<_> =
        old.fleet.workers.iter().filter(|w| !fleet.workers.iter().any(|n| Arc::ptr_eq(n, w))).cloned().collect();
    let added: Vec<_> =
        fleet.workers.iter().filter(|n| !old.fleet.workers.iter().any(|w| Arc::ptr_eq(n, w))).cloned().collect();
    for w in &removed {
        old.policy.forget(w.id);
    }
    if old.policy.name() != policy.name() {
        tracing::info!(from = old.policy.name(), to = policy.name(), "routing strategy switched");
    } else if !Arc::ptr_eq(&old.policy, &policy) {
        tracing::info!(strategy = policy.name(), "routing settings changed");
    }
    let config = Arc::new(new);
    let auth = Arc::new(crate::auth::Auth::from_config(&config.auth)?);
    if (config.rate_limit.backend, &config.rate_limit.redis_url)
        != (old.config.rate_limit.backend, &old.config.rate_limit.redis_url)
    {
        // A new backend starts with fresh buckets; limits merely changed keep theirs.
        app.limiter.store(crate::limits::RateLimiter::new(&config.rate_limit));
    }
    app.snapshot.store(Arc::new(Snapshot { config: Arc::clone(&config), fleet: Arc::new(fleet), policy, auth }));

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

/// Logs the changes a reload cannot apply to a running process.
fn warn_restart_only(old: &Config, new: &Config) {
    if old.server.host != new.server.host || old.server.port != new.server.port {
        tracing::warn!(
            old = %format!("{}:{}", old.server.host, old.server.port),
            new = %format!("{}:{}", new.server.host, new.server.port),
            "server.host/server.port changed: takes effect after a restart"
        );
    }
    if old.upstream.connect_timeout_ms != new.upstream.connect_timeout_ms {
        tracing::warn!("upstream.connect_timeout_ms changed: takes effect after a restart");
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
type FileState = Option<(Option<std::time::SystemTime>, Vec<u8>)>;

/// The file's [`FileState`] (content too: some editors and filesystems keep the mtime on a rewrite).
fn file_state(path: &Path) -> FileState {
    let modified = std::fs::metadata(path).ok()?.modified().ok();
    let content = std::fs::read(path).ok()?;
    Some((modified, content))
}
