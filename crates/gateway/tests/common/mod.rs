//! Test harness: real vllm-sim workers and a real gateway on ephemeral loopback ports.
#![allow(dead_code)]

use llm_gateway::config::{Config, WorkerConfig};
use llm_gateway::Gateway;
use std::future::Future;
use std::time::Duration;
use vllm_sim::{SimConfig, SimHandle};

/// A fast sim: small latencies so tests run quickly.
pub fn fast_sim() -> SimConfig {
    SimConfig {
        ttft_ms: 1.0,
        itl_ms: 1.0,
        prefill_ms_per_1k_tokens: 0.0,
        output_tokens: (4, 8),
        ..SimConfig::default()
    }
}

pub async fn sims(n: usize, cfg: impl Fn(usize) -> SimConfig) -> Vec<SimHandle> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(vllm_sim::start(cfg(i)).await.expect("sim starts"));
    }
    out
}

pub fn worker_configs(sims: &[SimHandle]) -> Vec<WorkerConfig> {
    sims.iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = WorkerConfig::from_url(s.url());
            w.name = Some(format!("sim-{i}"));
            w
        })
        .collect()
}

pub fn test_config(workers: Vec<WorkerConfig>) -> Config {
    let mut cfg = Config::default();
    cfg.workers = workers;
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.health.interval_ms = 100;
    cfg.health.timeout_ms = 500;
    cfg
}

pub async fn gateway(cfg: Config) -> Gateway {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    Gateway::serve(listener, cfg).await.expect("gateway starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

pub fn chat(model: &str, content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
}

/// Waits until `cond` holds, polling, or panics after `deadline`.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// SSE `data:` payloads of a whole stream body.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_string())))
        .collect()
}
