//! Costs of the guards on the request path: one token-bucket take, one breaker acquire + report,
//! one queue push + pop with 100 items waiting.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gateway_core::Priority;
use guard::{AdmissionQueue, CircuitBreaker, QueueConfig, TokenBucket};
use std::time::{Duration, Instant};

fn token_bucket(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut bucket = TokenBucket::new(1e9, 1e9, t0);
    let mut i = 0u64;
    c.bench_function("token_bucket/try_take", |b| {
        b.iter(|| {
            i += 1;
            black_box(bucket.try_take(black_box(1.0), t0 + Duration::from_nanos(i)))
        })
    });
}

fn breaker(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut breaker = CircuitBreaker::default();
    c.bench_function("breaker/try_acquire+on_success", |b| {
        b.iter(|| {
            if let Ok(permit) = breaker.try_acquire(black_box(t0)) {
                black_box(breaker.on_success(permit, t0));
            }
        })
    });
}

fn queue(c: &mut Criterion) {
    let t0 = Instant::now();
    for fairness in [true, false] {
        let mut q = AdmissionQueue::new(QueueConfig {
            max_size: 1_000,
            aging: Duration::from_secs(10),
            fairness,
            ..QueueConfig::default()
        });
        for i in 0..100u64 {
            q.push(i, Priority::ALL[(i % 4) as usize], i % 10, t0).ok();
        }
        let mut i = 100u64;
        let name = if fairness { "queue/push+pop_100_queued_fair" } else { "queue/push+pop_100_queued_fifo" };
        c.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                let now = t0 + Duration::from_micros(i);
                q.push(i, Priority::ALL[(i % 4) as usize], i % 10, now).ok();
                black_box(q.pop(now))
            })
        });
    }
}

criterion_group!(benches, token_bucket, breaker, queue);
criterion_main!(benches);
