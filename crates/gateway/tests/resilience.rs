//! One bad worker must not hurt the apps: breakers, retries, timeouts, scripted faults on real sims.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vllm_sim::Faults;

/// Config for fault tests: passive health only (long probe interval) so the breakers do the work.
fn fault_config(workers: Vec<llm_gateway::config::WorkerConfig>) -> llm_gateway::Config {
    let mut cfg = test_config(workers);
    cfg.health.interval_ms = 60_000;
    cfg.circuit_breaker.timeout_seconds = 1;
    cfg.retry.base_ms = 1;
    cfg.retry.max_ms = 5;
    cfg
}

#[tokio::test]
async fn a_killed_worker_process_is_retried_around_and_comes_back_through_half_open() {
    let mut procs = [
        SimProcess::start(&["--itl-ms", "20", "--output-tokens", "30", "--ttft-ms", "1"]).await,
        SimProcess::start(&["--itl-ms", "20", "--output-tokens", "30", "--ttft-ms", "1"]).await,
    ];
    let workers: Vec<_> = procs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut w = llm_gateway::config::WorkerConfig::from_url(p.url());
            w.name = Some(format!("sim-{i}"));
            w
        })
        .collect();
    let gw = gateway(fault_config(workers)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    // Streams running on sim-1 when it dies.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let resp = client().post(&url).json(&chat("demo-model", "hi", true)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    procs[1].kill().await;
    let mut broken = 0;
    for resp in streams {
        let worker = resp.headers()["x-gateway-worker"].to_str().unwrap().to_string();
        let body = tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("no hang").unwrap();
        let events = sse_events(&body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
        if worker == "sim-1" {
            assert!(body.contains("upstream_stream_error"), "a stream cut by the kill ends with an error event");
            broken += 1;
        }
    }
    assert!(broken > 0, "round robin put some streams on sim-1");
    // Requests that had not started on it are retried elsewhere and succeed.
    for _ in 0..8 {
        let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-gateway-worker"], "sim-0");
    }
    let stats: serde_json::Value =
        client().get(format!("{}/api/circuit-breaker/stats", gw.url())).send().await.unwrap().json().await.unwrap();
    assert!(stats[1]["breaker"]["counters"]["opens"].as_u64() >= Some(1), "sim-1's breaker opened: {stats}");
    // A new sim on the same port: after the open timeout, trials close the breaker again.
    let port = procs[1].port;
    procs[1] = SimProcess::restart_on(port, &["--itl-ms", "1", "--output-tokens", "2"]).await;
    let (c, gw_url) = (client(), gw.url());
    wait_for("sim-1 to come back through half-open", Duration::from_secs(10), || {
        let (c, url, gw_url) = (c.clone(), url.clone(), gw_url.clone());
        async move {
            let resp = c.post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-gateway-worker"] == "sim-1" && breaker_state(&gw_url, 1).await == "closed"
        }
    })
    .await;
}

#[tokio::test]
async fn a_worker_failing_half_its_requests_is_cut_off_by_its_breaker() {
    let sims = sims(2, |_| fast_sim()).await;
    sims[1].set_faults(Faults { error_rate: 0.5, ..Faults::default() });
    let mut cfg = fault_config(worker_configs(&sims));
    cfg.retry.max_attempts = 1; // show what the breaker alone does: client-visible errors stop
    cfg.circuit_breaker.timeout_seconds = 600;
    let gw = gateway(cfg).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let mut errors_at = Vec::new();
    for i in 0..200 {
        let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
        if resp.status() != 200 {
            errors_at.push(i);
        }
    }
    assert!(!errors_at.is_empty(), "some 500s reached the client before the breaker opened");
    assert!(*errors_at.last().unwrap() < 100, "errors stop once the breaker opens: {errors_at:?}");
    assert_eq!(breaker_state(&gw.url(), 1).await, "open");
    let metrics = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("llm_circuit_breaker_state{worker=\"sim-1\"} 1"), "{metrics}");
}

#[tokio::test]
async fn with_retries_a_failing_worker_costs_the_client_nothing() {
    let sims = sims(2, |_| fast_sim()).await;
    sims[1].set_faults(Faults { error_rate: 0.5, ..Faults::default() });
    let gw = gateway(fault_config(worker_configs(&sims))).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    for _ in 0..60 {
        let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let metrics = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    let retries = metric_value(&metrics, "llm_gateway_retries_total") as u64;
    assert!(retries > 0, "the failures were retried, not hidden");
    // Each client request is counted once, by its answer; failed attempts count only as upstream outcomes.
    assert_eq!(metric_value(&metrics, "llm_gateway_requests_total{model=\"demo-model\",status=\"200\"}"), 60.0);
    assert!(!metrics.contains("llm_gateway_requests_total{model=\"demo-model\",status=\"500\"}"), "{metrics}");
    let failed =
        metric_value(&metrics, "llm_gateway_upstream_outcomes_total{outcome=\"server_error\",worker=\"sim-1\"}");
    assert_eq!(failed, retries as f64, "every retried attempt is a recorded upstream failure");
}

#[tokio::test]
async fn a_hanging_worker_times_out_and_opens_its_breaker() {
    let sims = sims(2, |_| fast_sim()).await;
    sims[1].set_faults(Faults { hang: true, ..Faults::default() });
    let mut cfg = fault_config(worker_configs(&sims));
    cfg.upstream.first_byte_timeout_ms = 200;
    let gw = gateway(cfg).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let started = tokio::time::Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (url, done) = (url.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
            assert_eq!(resp.status(), 200, "retried on the healthy worker after the timeout");
            done.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t).await.expect("nothing waits forever").unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 20);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(breaker_state(&gw.url(), 1).await, "open");
    wait_for("the hung requests to be released", Duration::from_secs(5), || async { sims[1].running() == 0 }).await;
}

#[tokio::test]
async fn slow_streams_open_the_slow_workers_breaker() {
    let sims = sims(2, |_| fast_sim()).await;
    sims[1].set_faults(Faults { extra_latency_ms: 300, ..Faults::default() });
    let mut cfg = fault_config(worker_configs(&sims));
    cfg.circuit_breaker.slow_call_threshold_ms = 100;
    cfg.circuit_breaker.timeout_seconds = 600;
    let gw = gateway(cfg).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let mut slow_served = 0;
    for _ in 0..30 {
        let resp = client().post(&url).json(&chat("demo-model", "hi", true)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        slow_served += usize::from(resp.headers()["x-gateway-worker"] == "sim-1");
        let body = resp.text().await.unwrap();
        assert!(body.trim_end().ends_with("data: [DONE]"));
    }
    assert_eq!(breaker_state(&gw.url(), 1).await, "open");
    assert!(slow_served <= 6, "after 5 slow calls it got no more traffic: {slow_served}");
}

#[tokio::test]
async fn an_open_breaker_can_be_reset_by_the_admin() {
    let sims = sims(1, |_| fast_sim()).await;
    sims[0].set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let mut cfg = fault_config(worker_configs(&sims));
    cfg.circuit_breaker.timeout_seconds = 600;
    cfg.admin.token = Some("secret".into());
    let gw = gateway(cfg).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    for _ in 0..5 {
        client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
    }
    let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
    assert_eq!(resp.status(), 503, "every worker's breaker is open");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("circuit breaker"), "{body}");
    let reset = format!("{}/api/circuit-breaker/sim-0/reset", gw.url());
    assert_eq!(client().post(&reset).send().await.unwrap().status(), 401);
    let resp =
        client().post(&reset).bearer_auth("secret").header("content-type", "application/json").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(breaker_state(&gw.url(), 0).await, "closed");
    sims[0].set_faults(Faults::default());
    let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_reload_of_health_settings_reaches_running_probes() {
    let sims = sims(1, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.health.interval_ms = 3_600_000; // effectively never, until the reload
    let gw = gateway(cfg).await;
    sims[0].set_faults(Faults { refuse_health: true, ..Faults::default() });
    let patch = serde_json::json!({"health": {"interval_ms": 100}});
    let resp = client().patch(format!("{}/api/config", gw.url())).json(&patch).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let w = gw.state.snapshot.load().fleet.workers[0].clone();
    wait_for("the running probe to use the new interval", Duration::from_secs(5), || async {
        !w.stats.healthy.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
}
