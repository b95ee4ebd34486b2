//! A full worker is not a failing one, and a hung worker is cut off within seconds (issue 11, defects 2
//! and 5): real sims and a real gateway on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use vllm_sim::{Faults, SimConfig};

/// Streams that take about half a second each, on a worker that runs `seqs` at a time.
fn small_sim(seqs: usize) -> SimConfig {
    SimConfig { ttft_ms: 5.0, itl_ms: 20.0, output_tokens: (16, 24), max_num_seqs: seqs, ..fast_sim() }
}

/// Sends `n` streams at once; returns their statuses, each checked to end with `[DONE]` when 200.
async fn wave(gw: &str, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let gw = gw.to_string();
            tokio::spawn(async move {
                let resp = post_chat(&gw, true).await;
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap();
                if status == 200 {
                    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
                    assert!(!body.contains("\"error\""), "{body}");
                }
                status
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(tokio::time::timeout(Duration::from_secs(60), t).await.expect("no hang").unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_full_worker_keeps_serving_instead_of_tripping_its_breaker() {
    // 40 streams against --max-num-seqs 8 before the gateway has learned the capacity: most of them wait
    // inside the worker far beyond the slow-call threshold.
    let sims = sims(1, |_| small_sim(8)).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.circuit_breaker.slow_call_threshold_ms = 200;
    let gw = gateway(cfg).await;
    for round in 0..2 {
        let statuses = wave(&gw.url(), 40).await;
        assert!(statuses.iter().all(|s| *s == 200), "round {round}: {statuses:?}");
        assert_eq!(breaker_state(&gw.url(), 0).await, "closed", "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_seen_full_takes_the_ramp_not_the_whole_burst() {
    // Two vLLM-like workers with 4 slots; the gateway was told sim-0's, not sim-1's. Before the ramp
    // sim-1 was unlimited and took every stream of a burst that sim-0 had no room for.
    let sims = sims(2, |_| small_sim(4)).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.workers[0].max_concurrency = 4;
    let gw = gateway(cfg).await;
    let url = gw.url();
    let shown = || async {
        let ws: Vec<serde_json::Value> =
            client().get(format!("{url}/api/workers")).send().await.unwrap().json().await.unwrap();
        (ws[1]["capacity"].clone(), ws[1]["capacity_source"].as_str().unwrap_or("").to_string())
    };
    wait_for("sim-1 on its ramp", Duration::from_secs(5), || async { shown().await.1 == "ramp" }).await;
    assert_eq!(shown().await.0, serde_json::json!(16), "twice its peer's 4, at least the floor of 16");
    let sims: Vec<_> = sims.into_iter().map(Arc::new).collect();
    let most_waiting_inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (sim, most) = (Arc::clone(&sims[1]), Arc::clone(&most_waiting_inside));
        tokio::spawn(async move {
            loop {
                most.fetch_max(sim.waiting(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let sends: Vec<_> = (0..40)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = post_chat(&url, true).await;
                let status = resp.status().as_u16();
                let queued = resp.headers().get("x-queue-position").and_then(|v| v.to_str().ok()) != Some("0");
                assert!(resp.text().await.unwrap().trim_end().ends_with("data: [DONE]"));
                (status, queued)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for s in sends {
        answers.push(tokio::time::timeout(Duration::from_secs(60), s).await.expect("no hang").unwrap());
    }
    sampler.abort();
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    let queued = answers.iter().filter(|(_, q)| *q).count();
    assert!(queued >= 40 - 4 - 16, "all but sim-0's 4 and sim-1's ramp of 16 waited in the gateway: {queued}");
    let most = most_waiting_inside.load(std::sync::atomic::Ordering::Relaxed);
    assert!(most <= 16 - 4, "at most the ramp less its 4 slots waited inside sim-1: {most}");
    // The burst showed it full: its capacity is learned.
    wait_for("sim-1's capacity learned from the burst", Duration::from_secs(5), || async {
        shown().await == (serde_json::json!(4), "learned".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_workers_are_overloaded_not_failing() {
    // Two workers, both full: neither is the last admitting one, yet time queued inside them is not a
    // slow call against their health.
    let sims = sims(2, |_| small_sim(4)).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.circuit_breaker.slow_call_threshold_ms = 200;
    let gw = gateway(cfg).await;
    for round in 0..2 {
        let statuses = wave(&gw.url(), 40).await;
        assert!(statuses.iter().all(|s| *s == 200), "round {round}: {statuses:?}");
    }
    assert_eq!(breaker_state(&gw.url(), 0).await, "closed");
    assert_eq!(breaker_state(&gw.url(), 1).await, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_cut_off_and_throughput_recovers_within_seconds_under_defaults() {
    // Defaults for every timeout; the worker accepts requests and never answers, its /health still 200.
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let url = gw.url();
    let start = tokio::time::Instant::now();
    let hang_at = Duration::from_secs(1);
    let run_for = Duration::from_secs(14);
    // (sent, finished, status, stream) of every request.
    let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let (url, log) = (url.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                let stream = i % 2 == 0;
                while start.elapsed() < run_for {
                    let sent = start.elapsed();
                    let resp = post_chat(&url, stream).await;
                    let status = resp.status().as_u16();
                    let body = resp.text().await.unwrap();
                    if stream && status == 200 {
                        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
                        assert!(!body.contains("\"error\""), "nothing was sent before the retry: {body}");
                    }
                    log.lock().push((sent, start.elapsed(), status, stream));
                }
            })
        })
        .collect();
    tokio::time::sleep(hang_at).await;
    sims[1].set_faults(Faults { hang: true, ..Faults::default() });
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c).await.expect("clients finish").unwrap();
    }
    let log = log.lock().clone();
    let failed: Vec<_> = log.iter().filter(|r| r.2 != 200).collect();
    assert!(failed.is_empty(), "requests on the hung worker were retried elsewhere: {failed:?}");
    // Recovered: requests sent from 10 s after the hang on are served promptly, and there are many.
    let late: Vec<_> = log.iter().filter(|r| r.0 >= hang_at + Duration::from_secs(10)).collect();
    assert!(late.len() >= 20, "throughput recovered: {} requests sent after hang+10s", late.len());
    let slowest = late.iter().map(|r| r.1 - r.0).max().unwrap();
    assert!(slowest < Duration::from_secs(2), "late requests do not wait on the hung worker: {slowest:?}");
    assert_eq!(breaker_state(&url, 1).await, "open", "the hung worker is cut off");
}
