//! Active health probes: one task per worker asks its health path (`health.path`: `auto` finds `/health`,
//! else `/v1/models`, else relies on real traffic alone), scrapes `/metrics` for load in its engine's
//! dialect, and learns the served models from `/v1/models` when the config names none. A failed probe
//! does not mark unhealthy a worker whose real requests keep succeeding.
//!
//! [`ProbeSet`] owns the tasks (one per worker id) and the `[health]` settings they read, so a task
//! holds only its client, its worker, its stop token and a receiver of those settings: never the
//! gateway's whole state.

use crate::config::HealthConfig;
use crate::fleet::scrape::{parse_metrics, WorkerLoad};
use crate::fleet::worker::{ProbePath, Worker};
use crate::fleet::Fleet;
use crate::upstream::{self, Client};
use gateway_core::WorkerId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest probe answer read.
const MAX_PROBE_BYTES: usize = 4 * 1024 * 1024;
/// Probes between two refreshes of the learned model list.
const MODEL_REFRESH_EVERY: u32 = 30;

/// The probe tasks of the fleet in force, one per worker, and the `[health]` settings they follow.
pub struct ProbeSet {
    client: Client,
    health: watch::Sender<HealthConfig>,
    /// Parent of every task's stop token (the gateway's shutdown).
    shutdown: CancellationToken,
    tasks: Mutex<HashMap<WorkerId, CancellationToken>>,
}

impl ProbeSet {
    /// No probes yet; tasks will probe with `client`, follow `health`, and stop with `shutdown`.
    pub fn new(client: Client, health: HealthConfig, shutdown: CancellationToken) -> Self {
        Self { client, health: watch::Sender::new(health), shutdown, tasks: Mutex::default() }
    }

    /// Hands `health` to the running tasks, probes every worker of `fleet` that has no task once (so
    /// its health and models are known before it is routed to), then starts a task for each.
    pub async fn start(&self, fleet: &Fleet, health: &HealthConfig) {
        self.health.send_if_modified(|cur| {
            let changed = cur != health;
            if changed {
                *cur = health.clone();
            }
            changed
        });
        let fresh: Vec<Arc<Worker>> = {
            let tasks = self.tasks.lock();
            fleet.workers.iter().filter(|w| !tasks.contains_key(&w.id)).cloned().collect()
        };
        futures_util::future::join_all(fresh.iter().map(|w| probe_once(&self.client, w, health, true))).await;
        let mut tasks = self.tasks.lock();
        for w in fresh {
            if tasks.contains_key(&w.id) {
                continue;
            }
            let stop = self.shutdown.child_token();
            tasks.insert(w.id, stop.clone());
            tokio::spawn(run(self.client.clone(), w, self.health.subscribe(), stop));
        }
    }

    /// Stops the tasks of workers not in `fleet`.
    pub fn retain(&self, fleet: &Fleet) {
        self.tasks.lock().retain(|id, stop| {
            let keep = fleet.workers.iter().any(|w| w.id == *id);
            if !keep {
                stop.cancel();
            }
            keep
        });
    }

    /// Workers with a running probe task.
    pub fn len(&self) -> usize {
        self.tasks.lock().len()
    }

    /// Whether no probe task runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Probes `worker` with `client` every `health.interval_ms` until `stop` is cancelled or the settings'
/// sender is gone. A changed `[health]` (a reload) takes effect at once: the wait is recomputed.
pub async fn run(
    client: Client,
    worker: Arc<Worker>,
    mut health: watch::Receiver<HealthConfig>,
    stop: CancellationToken,
) {
    let mut round: u32 = 0;
    let mut last = Instant::now();
    loop {
        let cfg = health.borrow_and_update().clone();
        let due = last + Duration::from_millis(cfg.interval_ms);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = health.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep_until(due) => {}
        }
        last = Instant::now();
        round = round.wrapping_add(1);
        probe_once(&client, &worker, &cfg, round.is_multiple_of(MODEL_REFRESH_EVERY)).await;
    }
}

/// One probe round: health, load, and (when due or unknown) the model list. Updates the worker's stats
/// and its health by the configured thresholds. The very first probe decides health at once.
pub async fn probe_once(client: &Client, worker: &Worker, cfg: &HealthConfig, refresh_models: bool) {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let configured = ProbePath::from_config(worker.spec.health_path.as_deref().unwrap_or(&cfg.path));
    let current = worker.probe_path.load_full();
    // A changed setting replaces what `auto` resolved earlier.
    let keep = match (&*current, &configured) {
        (ProbePath::Path { auto: true, .. } | ProbePath::Passive { auto: true }, ProbePath::Auto) => true,
        (c, want) => c == want,
    };
    if !keep {
        worker.probe_path.store(Arc::new(configured));
    }
    // A healthy worker holding requests (or a slot reserved for the next) is judged by them (stall rule, timeouts, breaker), not asked:
    // a server that runs one request at a time answers a probe only after its generation, and
    // llama-cpp-python by default ends a running stream early when any other request (a probe of
    // `/v1/models` included) arrives.
    let busy = worker.stats.healthy.load(Ordering::Relaxed) && worker.stats.slots.taken() > 0;
    let (mut ok, evidence) = if busy {
        (true, "requests in flight (not probed)".to_string())
    } else {
        check_health(client, worker, timeout).await
    };
    if ok {
        let stated = scrape_load(client, worker, timeout).await;
        // What an engine says of its concurrency is static: asked with the model list, not every round
        // (and not of a busy worker, which a one-at-a-time server would answer only after its generation).
        if refresh_models && !busy {
            let asked = ask_engine_capacity(client, worker, timeout).await;
            worker.stats.engine_capacity.store(asked.max(stated), Ordering::Relaxed);
        } else if stated > 0 {
            worker.stats.engine_capacity.store(stated, Ordering::Relaxed);
        }
        let unknown = worker.models.load().is_empty();
        if worker.spec.models.is_empty() && (unknown || (refresh_models && !busy)) {
            match learn_models(client, worker, timeout).await {
                Ok(models) if !models.is_empty() => worker.models.store(Arc::new(models)),
                // A worker that cannot say what it serves cannot be routed to.
                _ => ok = false,
            }
        }
    }
    update_health(worker, cfg, ok, &evidence);
    worker.refresh_error_rate(Instant::now());
}

/// Asks the worker's health path (resolving `auto` on the way): whether it is healthy, and why.
async fn check_health(client: &Client, worker: &Worker, timeout: Duration) -> (bool, String) {
    let auth = worker.auth_header.as_ref();
    let get = |path: String| async move {
        upstream::get(client, &format!("{}{path}", worker.base_url), auth, timeout, MAX_PROBE_BYTES).await
    };
    let missing = |status: http::StatusCode| matches!(status.as_u16(), 404 | 405 | 501);
    match &*worker.probe_path.load_full() {
        ProbePath::Passive { .. } => (true, "passive (no health probe)".into()),
        ProbePath::Path { path, auto } => match get(path.clone()).await {
            Ok((status, _)) if status.is_success() => (true, format!("GET {path} answered {status}")),
            Ok((status, _)) if *auto && missing(status) => {
                // The path `auto` found went away (the engine was replaced): find it again next round.
                worker.probe_path.store(Arc::new(ProbePath::Auto));
                (false, format!("GET {path} answered {status}"))
            }
            Ok((status, _)) => (false, format!("GET {path} answered {status}")),
            Err(e) => (false, format!("GET {path}: {e}")),
        },
        ProbePath::Auto => {
            let mut tried = Vec::new();
            for path in ["/health", "/v1/models"] {
                match get(path.to_string()).await {
                    Ok((status, _)) if status.is_success() => {
                        worker.probe_path.store(Arc::new(ProbePath::Path { path: path.into(), auto: true }));
                        tracing::info!(worker = %worker.name, path, "health probe path found");
                        return (true, format!("GET {path} answered {status}"));
                    }
                    Ok((status, _)) if missing(status) => tried.push(format!("GET {path} answered {status}")),
                    Ok((status, _)) => return (false, format!("GET {path} answered {status}")),
                    // Unreachable: not a question of which path, so nothing is resolved.
                    Err(e) => return (false, format!("GET {path}: {e}")),
                }
            }
            worker.probe_path.store(Arc::new(ProbePath::Passive { auto: true }));
            tracing::info!(worker = %worker.name, tried = %tried.join(", "), "no health endpoint; health is passive");
            (true, "passive (no health endpoint)".into())
        }
    }
}

/// The concurrency the worker's engine states in the JSON its dialect serves it in (0: none stated).
async fn ask_engine_capacity(client: &Client, worker: &Worker, timeout: Duration) -> u32 {
    let Some((path, keys)) = crate::fleet::capacity::engine_capacity_path(worker.dialect()) else { return 0 };
    let url = format!("{}{path}", worker.base_url);
    match upstream::get(client, &url, worker.auth_header.as_ref(), timeout, MAX_PROBE_BYTES).await {
        Ok((status, body)) if status.is_success() => crate::fleet::capacity::engine_capacity_from_json(&body, keys),
        _ => 0,
    }
}

/// Reads the worker's load from `/metrics` in its engine's dialect; without metrics, the gateway's own
/// counts stand for its load. Returns the concurrency the metrics state, 0 when they state none.
async fn scrape_load(client: &Client, worker: &Worker, timeout: Duration) -> u32 {
    let s = &worker.stats;
    let url = format!("{}/metrics", worker.base_url);
    // The most this gateway had in flight there since the last scrape began (the ramp's evidence), then
    // a fresh peak: whatever the engine counts as ours was in flight at some instant of this scrape.
    let peak_since_last = s.slots.peak();
    s.slots.start_peak();
    let load = match upstream::get(client, &url, worker.auth_header.as_ref(), timeout, MAX_PROBE_BYTES).await {
        Ok((status, body)) if status.is_success() => parse_metrics(&String::from_utf8_lossy(&body)),
        _ => WorkerLoad::default(),
    };
    s.dialect.store(load.dialect.as_u8(), Ordering::Relaxed);
    s.scraped_running.store(load.running as u32, Ordering::Relaxed);
    s.scraped_waiting.store(load.waiting as u32, Ordering::Relaxed);
    let foreign = guard::foreign_load(load.running as u32, load.waiting as u32, s.slots.peak());
    s.foreign_load.store(foreign, Ordering::Relaxed);
    s.kv_usage.set(load.kv_usage);
    s.cache_tokens.store(load.cache_tokens as u64, Ordering::Relaxed);
    // Requests waiting inside the worker mean it runs all it can: that is its capacity.
    if load.waiting > 0.0 && load.running > 0.0 {
        s.learned_capacity.fetch_max(load.running as u32, Ordering::Relaxed);
    }
    s.seen_running.fetch_max((load.running as u32).max(peak_since_last), Ordering::Relaxed);
    // Tokens generated since the last scrape: the worker is working, however long its answers take
    // (the stall rule's evidence for long non-streamed generations).
    let generated = load.generated as u64;
    if s.scraped_generated.swap(generated, Ordering::Relaxed) < generated {
        worker.mark_alive(Instant::now());
    }
    s.sent_since_scrape.store(0, Ordering::Relaxed);
    worker.update_dispatch_rate(Instant::now());
    load.max_running.max(0.0) as u32
}

/// How recently a real request must have succeeded for a failed probe to be outweighed.
fn passive_window(cfg: &HealthConfig) -> Duration {
    Duration::from_millis(cfg.interval_ms.saturating_mul(u64::from(cfg.unhealthy_threshold.max(1))) + cfg.timeout_ms)
}

fn update_health(worker: &Worker, cfg: &HealthConfig, ok: bool, evidence: &str) {
    let s = &worker.stats;
    let first = s.probe_successes.load(Ordering::Relaxed) == 0 && s.probe_failures.load(Ordering::Relaxed) == 0;
    let was_healthy = s.healthy.load(Ordering::Relaxed);
    if ok {
        s.probe_failures.store(0, Ordering::Relaxed);
        let n = s.probe_successes.fetch_add(1, Ordering::Relaxed) + 1;
        if !was_healthy && (first || n >= cfg.healthy_threshold) {
            s.healthy.store(true, Ordering::Relaxed);
            tracing::info!(worker = %worker.name, evidence, "worker healthy");
        }
        return;
    }
    // Real traffic is the stronger evidence: a busy worker that answers its probe late (one request at a
    // time, say) but completes real requests is healthy.
    let now = Instant::now();
    if was_healthy && worker.last_success().is_some_and(|t| now.saturating_duration_since(t) <= passive_window(cfg)) {
        tracing::debug!(worker = %worker.name, evidence, "probe failed, but real requests succeed: kept healthy");
        return;
    }
    // Nor does a probe judge a worker holding requests: those are judged by the stall rule and their
    // timeouts, which end them if it hangs (then the next failed probe counts). A one-at-a-time server
    // answers nothing else during a long first generation, before any request of it has succeeded.
    if was_healthy && s.slots.in_flight() > 0 {
        tracing::debug!(worker = %worker.name, evidence, "probe failed while requests are in flight: kept healthy");
        return;
    }
    s.probe_successes.store(0, Ordering::Relaxed);
    let n = s.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if was_healthy && n >= cfg.unhealthy_threshold {
        s.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(worker = %worker.name, evidence, "worker unhealthy");
    } else if first {
        tracing::warn!(worker = %worker.name, evidence, "worker not reachable at start");
    }
}

async fn learn_models(client: &Client, worker: &Worker, timeout: Duration) -> Result<Vec<String>, String> {
    let url = format!("{}/v1/models", worker.base_url);
    let (status, body) = upstream::get(client, &url, worker.auth_header.as_ref(), timeout, MAX_PROBE_BYTES).await?;
    if !status.is_success() {
        return Err(format!("/v1/models answered {status}"));
    }
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        id: String,
    }
    let list: List = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(list.data.into_iter().map(|m| m.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{UpstreamConfig, WorkerConfig};

    /// A worker on a port nothing listens on: its probes fail at once.
    fn unreachable(id: WorkerId) -> Arc<Worker> {
        Arc::new(Worker::new(id, WorkerConfig::from_url(format!("http://127.0.0.1:1/{id}"))))
    }

    #[tokio::test]
    async fn the_set_probes_new_workers_once_and_stops_those_that_left() {
        let shutdown = CancellationToken::new();
        let set = ProbeSet::new(
            upstream::client(upstream::connector(&UpstreamConfig::default()).tcp),
            HealthConfig::default(),
            shutdown.clone(),
        );
        let fleet = Fleet { workers: vec![unreachable(1), unreachable(2)] };
        set.start(&fleet, &HealthConfig::default()).await;
        assert_eq!(set.len(), 2);
        assert_eq!(fleet.workers[0].stats.probe_failures.load(Ordering::Relaxed), 1, "probed once before serving");
        set.start(&fleet, &HealthConfig::default()).await;
        assert_eq!(fleet.workers[0].stats.probe_failures.load(Ordering::Relaxed), 1, "a running task is not doubled");
        let stop = set.tasks.lock()[&1].clone();
        set.retain(&Fleet { workers: vec![Arc::clone(&fleet.workers[1])] });
        assert_eq!(set.len(), 1);
        assert!(stop.is_cancelled(), "the removed worker's task was told to stop");
        shutdown.cancel();
        assert!(set.tasks.lock()[&2].is_cancelled(), "shutdown stops every task");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_task_ends_with_its_stop_token_or_its_settings() {
        let client = upstream::client(upstream::connector(&UpstreamConfig::default()).tcp);
        let (tx, rx) = watch::channel(HealthConfig::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(client.clone(), unreachable(1), rx, stop.clone()));
        stop.cancel();
        task.await.expect("ends when stopped");
        let task = tokio::spawn(run(client, unreachable(2), tx.subscribe(), CancellationToken::new()));
        drop(tx);
        task.await.expect("ends when the settings' sender is gone");
    }
}
