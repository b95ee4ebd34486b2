//! One `select` per strategy over 4, 16 and 64 candidates.
//!
//! Run: `cargo bench -p routing --bench pick -- --warm-up-time 1 --measurement-time 2`.
//! `p2c_kv` runs against a warmed prefix index and learned rates (2 000 dispatched and observed requests,
//! half the workers with an engine-reported cache size) with a 32-hash request whose first 16 hashes are a
//! system prompt some workers hold; `adaptive` has an estimate for every worker;
//! `consistent_hash` rotates over 1 024 session keys on a cached ring.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gateway_core::{Outcome, OutcomeKind, RequestFeatures, WorkerView};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use routing::{build, RoutingConfig, Strategy};
use std::time::Duration;

fn workers(n: u64, rng: &mut SmallRng) -> Vec<WorkerView> {
    (0..n)
        .map(|id| WorkerView {
            id,
            weight: rng.random_range(1..4),
            in_flight: rng.random_range(0..8),
            running: rng.random_range(0..8),
            waiting: rng.random_range(0..4),
            kv_usage: rng.random_range(0.0..1.0),
            ttft_ms: rng.random_range(50.0..400.0),
            tpot_ms: rng.random_range(5.0..30.0),
            error_rate: 0.0,
            max_running: 8,
            cache_tokens: if id % 2 == 0 { 40_000 } else { 0 },
        })
        .collect()
}

fn request(system: u64, tail: u64) -> RequestFeatures {
    let mut prefix_hashes: Vec<u64> = (0..16).map(|i| (system << 32) | i).collect();
    prefix_hashes.extend((0..16).map(|i| (tail << 40) ^ (i + 1_000_000)));
    RequestFeatures {
        prompt_chars: prefix_hashes.len() * 128,
        prefix_hashes,
        chunk_bytes: 128,
        session_key: Some(tail.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        ..Default::default()
    }
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for &strategy in Strategy::ALL {
        for n in [4u64, 16, 64] {
            let mut rng = SmallRng::seed_from_u64(n);
            let ws = workers(n, &mut rng);
            let policy = build(&RoutingConfig { strategy, ..Default::default() });
            // Warm the learned state: prefixes dispatched to workers, outcomes observed.
            for t in 0..2000u64 {
                let worker = ws[rng.random_range(0..ws.len())].id;
                let predicted = policy.on_dispatch(&request(t % 8, t), worker);
                let ttft = Duration::from_millis(rng.random_range(50..400));
                policy.observe(&Outcome {
                    output_tokens: 50,
                    prompt_tokens: 1024,
                    cached_tokens: Some(rng.random_range(0..1024)),
                    predicted_cached_tokens: predicted,
                    ..Outcome::new(worker, OutcomeKind::Success, Some(ttft), Duration::from_millis(1000))
                });
            }
            let reqs: Vec<RequestFeatures> = (0..1024).map(|t| request(t % 8, 10_000 + t)).collect();
            let mut k = 0usize;
            group.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &ws, |b, ws| {
                b.iter(|| {
                    k = (k + 1) & 1023;
                    black_box(policy.select(&reqs[k], black_box(ws), &mut rng))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
