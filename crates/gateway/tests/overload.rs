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
