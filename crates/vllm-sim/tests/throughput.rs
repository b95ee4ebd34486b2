//! A throughput smoke check of the zero-latency sim (ignored by default; run it in release):
//! `cargo test --release -p vllm-sim --test throughput -- --ignored --nocapture`.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use vllm_sim::{start, SimConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check; run in release"]
async fn zero_latency_requests_per_second() {
    let cfg = SimConfig { ttft_ms: 0.0, prefill_ms_per_1k_tokens: 0.0, itl_ms: 0.0, ..SimConfig::default() };
    let sim = start(cfg).await.unwrap();
    for stream in [false, true] {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (url, done) = (sim.url(), done.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let body = json!({"messages": [{"role": "user", "content": "hello"}], "stream": stream});
                    while tokio::time::Instant::now() < deadline {
                        let resp = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
                        let mut s = resp.bytes_stream();
                        while let Some(c) = s.next().await {
                            c.unwrap();
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        println!("stream={stream}: {:.0} requests/s", done.load(Ordering::Relaxed) as f64 / 2.0);
    }
    assert_eq!(sim.running(), 0);
}
