//! Criterion benches of the gateway's per-request work: the body parse and request id, the pick
//! (eligibility over the fleet and the policy's choice), the admission queue's enqueue + dispatch
//! hand-off, the local rate-limit check, the Redis round trip of a shared check, and the usage scan of
//! a relayed stream.
//!
//! `cargo bench -p llm-gateway --bench gateway` (the Redis bench runs when `redis-server` is installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use gateway_core::Priority;
use llm_gateway::config::{QueueConfig, RateLimitBackend, RateLimitConfig, WorkerConfig};
use llm_gateway::fleet::worker::Worker;
use llm_gateway::limits::RateLimiter;
use llm_gateway::metrics::Metrics;
use llm_gateway::proxy::admission::{Admission, WaitSpec};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn admission(c: &mut Criterion) {
    let rt = runtime();
    let adm = Admission::new(&QueueConfig::default(), Metrics::new().unwrap().queue_rejected.clone());
    let mut spec = WorkerConfig::from_url("http://127.0.0.1:1");
    spec.models = vec!["m".into()];
    spec.max_concurrency = 1;
    let worker = Arc::new(Worker::new(1, spec));
    worker.stats.healthy.store(true, Ordering::Relaxed);
    let model: Arc<str> = Arc::from("m");
    let wait = |adm: &Admission| {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        WaitSpec { class: Priority::Normal, tenant: 0, deadline, retries: 0, max_size: adm.config().max_size }
    };
    c.bench_function("admission/fast_path_admit", |b| {
        b.to_async(&rt).iter(|| async { adm.admit(&model, &[&worker], &wait(&adm), || None).await.unwrap() })
    });
    // The worker is full: the request is queued, a slot frees, the waiter gets the reservation.
    c.bench_function("admission/enqueue_and_dispatch", |b| {
        b.to_async(&rt).iter(|| async {
            let guard = worker.acquire(false, 1, tokio::time::Instant::now(), adm.notify()).unwrap();
            let candidates = [&worker];
            let spec = wait(&adm);
            let admit = adm.admit(&model, &candidates, &spec, || None);
            let release = async {
                tokio::task::yield_now().await;
                drop(guard);
            };
            let (got, ()) = tokio::join!(admit, release);
            let (ticket, reservation) = got.unwrap();
            assert_eq!(ticket.position, 1);
            drop(reservation.expect("the freed slot was reserved for it"));
        })
    });
}

fn rate_limits(c: &mut Criterion) {
    let rt = runtime();
    let metrics = Metrics::new().unwrap();
    let cfg = RateLimitConfig {
        enabled: true,
        requests_per_second: 1e12,
        burst_size: 1e12,
        per_user_rpm: 1_000_000_000,
        per_user_tpm: 1_000_000_000_000,
        ..RateLimitConfig::default()
    };
    let local = RateLimiter::new(&cfg);
    // A check and its reconciliation with the real usage, as one request does.
    c.bench_function("rate_limit/local_check", |b| {
        b.to_async(&rt).iter(|| async {
            let (_, charge) = local.check(&cfg, &metrics, None, Some("tenant-a"), None, 300).await.unwrap();
            charge.expect("tokens are limited").reconcile(300);
        })
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
    let Ok(mut redis) = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not installed: skipping rate_limit/redis_check");
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let redis_cfg = RateLimitConfig {
        backend: RateLimitBackend::Redis,
        redis_url: format!("redis://127.0.0.1:{port}"),
        redis_timeout_ms: 1000,
        ..cfg.clone()
    };
    let shared = RateLimiter::new(&redis_cfg);
    c.bench_function("rate_limit/redis_check", |b| {
        b.to_async(&rt)
            .iter(|| async { shared.check(&redis_cfg, &metrics, None, Some("tenant-a"), None, 300).await.unwrap() })
    });
    assert_eq!(
        metrics.render().lines().find(|l| l.starts_with("llm_rate_limiter_fallback_total ")),
        Some("llm_rate_limiter_fallback_total 0"),
        "every Redis check was answered by Redis"
    );
    let _ = redis.kill();
    let _ = redis.wait();
}

/// A chat request of about 1 KB, as `bench overhead` sends.
fn chat_body() -> Vec<u8> {
    let content = "Tell me how a load balancer spreads requests over a fleet of inference servers. ".repeat(11);
    serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "max_tokens": 16,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": content},
        ],
    }))
    .unwrap()
}

fn request(c: &mut Criterion) {
    use gateway_core::request::PrefixOptions;
    use gateway_core::RequestFeatures;
    let body = chat_body();
    c.bench_function("request/parse_1kb_chat_with_prefix_hashes", |b| {
        b.iter(|| RequestFeatures::parse(std::hint::black_box(&body), PrefixOptions::default()).unwrap())
    });
    let none = PrefixOptions { max_chunks: 0, ..PrefixOptions::default() };
    c.bench_function("request/parse_1kb_chat_without_prefix_hashes", |b| {
        b.iter(|| RequestFeatures::parse(std::hint::black_box(&body), none).unwrap())
    });
    c.bench_function("request/new_request_id", |b| b.iter(|| llm_gateway::proxy::request::RequestId::new(None)));
}

/// `eligible` over the fleet and the policy's `select` among the eligible workers' views: the pick of
/// `proxy::dispatch` before it takes the slot.
fn pick(c: &mut Criterion) {
    use llm_gateway::config::Config;
    use routing::Strategy;
    let rt = runtime();
    let _enter = rt.enter();
    let body = chat_body();
    for strategy in [Strategy::RoundRobin, Strategy::P2cKv] {
        for n in [1usize, 16] {
            let mut cfg = Config::default();
            cfg.routing.strategy = strategy;
            cfg.workers = (0..n)
                .map(|i| {
                    let mut w = WorkerConfig::from_url(format!("http://127.0.0.1:{}", 10_000 + i));
                    w.models = vec!["m".into()];
                    w
                })
                .collect();
            let app = llm_gateway::state::AppState::new(cfg).unwrap();
            let snap = app.snapshot.load_full();
            for w in &snap.fleet.workers {
                w.stats.healthy.store(true, Ordering::Relaxed);
            }
            let opts = gateway_core::request::PrefixOptions::default();
            let features = gateway_core::RequestFeatures::parse(&body, opts).unwrap();
            let name = format!("pick/{}_{n}_workers", snap.policy.name());
            c.bench_function(&name, |b| {
                b.iter(|| {
                    let now = tokio::time::Instant::now();
                    let all = llm_gateway::proxy::dispatch::eligible(&app, &snap, "m", &[], now);
                    let views: Vec<_> = all.iter().map(|w| w.view()).collect();
                    snap.policy.select(&features, &views, &mut rand::rng()).unwrap()
                })
            });
        }
    }
}

/// The usage scanner over a stream as `bench overhead` relays it: 64 chat-completion chunks, each read
/// on its own, then the usage event and `[DONE]`.
fn usage(c: &mut Criterion) {
    use llm_gateway::proxy::usage::UsageScanner;
    let chunk = |i: usize| {
        format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
             \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let mut chunks: Vec<Vec<u8>> = (0..64).map(|i| chunk(i).into_bytes()).collect();
    chunks.push(
        b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":64,\"total_tokens\":314}}\n\ndata: [DONE]\n\n".to_vec(),
    );
    c.bench_function("usage/scan_stream_of_64_chunks", |b| {
        b.iter(|| {
            let mut s = UsageScanner::default();
            for c in &chunks {
                s.scan(std::hint::black_box(c), true);
            }
            assert_eq!((s.completion_tokens, s.events), (Some(64), 66));
            s.prompt_tokens
        })
    });
}

criterion_group!(benches, request, pick, admission, rate_limits, usage);
criterion_main!(benches);
