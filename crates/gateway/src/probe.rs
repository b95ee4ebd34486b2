//! Active health probes: one task per worker polls `/health`, scrapes `/metrics` for load, and learns the
//! served models from `/v1/models` when the config names none.

use crate::config::HealthConfig;
use crate::scrape::parse_vllm_metrics;
use crate::upstream::{self, Client};
use crate::worker::Worker;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest probe answer read.
const MAX_PROBE_BYTES: usize = 4 * 1024 * 1024;
/// Probes between two refreshes of the learned model list.
const MODEL_REFRESH_EVERY: u32 = 30;

/// Runs probes of `worker` until `stop` is cancelled, reading `[health]` from `app`'s snapshot as it
/// goes, so a reload that changes the interval or thresholds reaches running probes within a second.
pub async fn run(app: std::sync::Weak<crate::state::AppState>, worker: Arc<Worker>, stop: CancellationToken) {
    let mut round: u32 = 0;
    let mut last = tokio::time::Instant::now();
    loop {
        let Some((client, cfg)) = app.upgrade().map(|a| (a.client.clone(), a.snapshot.load().config.health.clone()))
        else {
            return;
        };
        let due = last + Duration::from_millis(cfg.interval_ms);
        if tokio::time::Instant::now() < due {
            // Wake at least once a second to pick up a changed interval.
            let wake = due.min(tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
            continue;
        }
        last = tokio::time::Instant::now();
        round = round.wrapping_add(1);
        probe_once(&client, &worker, &cfg, round.is_multiple_of(MODEL_REFRESH_EVERY)).await;
    }
}

/// One probe round: health, load, and (when due or unknown) the model list. Updates the worker's stats
/// and its health by the configured thresholds. The very first probe decides health at once.
pub async fn probe_once(client: &Client, worker: &Worker, cfg: &HealthConfig, refresh_models: bool) {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let auth = worker.auth_header.as_ref();
    let health = upstream::get(client, &format!("{}/health", worker.base_url), auth, timeout, MAX_PROBE_BYTES).await;
    let mut ok = matches!(&health, Ok((status, _)) if status.is_success());
    if ok {
        if let Ok((status, body)) =
            upstream::get(client, &format!("{}/metrics", worker.base_url), auth, timeout, MAX_PROBE_BYTES).await
        {
            if status.is_success() {
                let load = parse_vllm_metrics(&String::from_utf8_lossy(&body));
                let s = &worker.stats;
                s.scraped_running.store(load.running as u32, Ordering::Relaxed);
                s.scraped_waiting.store(load.waiting as u32, Ordering::Relaxed);
                s.kv_usage.set(load.kv_usage);
                // Tokens generated since the last scrape: the worker is working, however long its
                // answers take (the stall rule's evidence for long non-streamed generations).
                let generated = load.generated as u64;
                if s.scraped_generated.swap(generated, Ordering::Relaxed) < generated {
                    worker.mark_alive(tokio::time::Instant::now());
                }
                // Requests waiting inside the worker mean it runs all it can: that is its capacity.
                if load.waiting > 0.0 && load.running > 0.0 {
                    s.learned_capacity.fetch_max(load.running as u32, Ordering::Relaxed);
                }
                s.sent_since_scrape.store(0, Ordering::Relaxed);
            }
        }
        if worker.spec.models.is_empty() && (refresh_models || worker.models.load().is_empty()) {
            match learn_models(client, worker, timeout).await {
                Ok(models) if !models.is_empty() => worker.models.store(Arc::new(models)),
                // A worker that cannot say what it serves cannot be routed to.
                _ => ok = false,
            }
        }
    }
    update_health(worker, cfg, ok, &health);
    worker.refresh_error_rate(std::time::Instant::now());
}

fn update_health(
    worker: &Worker,
    cfg: &HealthConfig,
    ok: bool,
    health: &Result<(http::StatusCode, bytes::Bytes), String>,
) {
    let s = &worker.stats;
    let first = s.probe_successes.load(Ordering::Relaxed) == 0 && s.probe_failures.load(Ordering::Relaxed) == 0;
    let was_healthy = s.healthy.load(Ordering::Relaxed);
    if ok {
        s.probe_failures.store(0, Ordering::Relaxed);
        let n = s.probe_successes.fetch_add(1, Ordering::Relaxed) + 1;
        if !was_healthy && (first || n >= cfg.healthy_threshold) {
            s.healthy.store(true, Ordering::Relaxed);
            tracing::info!(worker = %worker.name, "worker healthy");
        }
    } else {
        s.probe_successes.store(0, Ordering::Relaxed);
        let n = s.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if was_healthy && n >= cfg.unhealthy_threshold {
            s.healthy.store(false, Ordering::Relaxed);
            let reason = match health {
                Ok((status, _)) => format!("status {status}"),
                Err(e) => e.clone(),
            };
            tracing::warn!(worker = %worker.name, %reason, "worker unhealthy");
        } else if first {
            tracing::warn!(worker = %worker.name, "worker not reachable at start");
        }
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
