//! Several gateways sharing workers (`[cluster]`): what the shared slot count in Redis costs per request,
//! and what it buys when two replicas saturate a small fleet.
//!
//! 1. Overhead: one gateway in front of a zero-latency vllm-sim, `cluster.backend = "local"` then
//!    `"redis"` (a real `redis-server` from `PATH` on loopback), the same closed loop; the added mean
//!    latency is the shared count's cost per request (one Lua call to take the slot on the request path,
//!    the release in the background). Redis is run twice, without and with `share_dispatches` (each
//!    request's prefix hashes published, batched, in the background), so the records' cost is the
//!    difference of two runs of the same binary.
//! 2. Saturated fleet: two replicas in front of two sims with few slots, a closed loop above their total
//!    capacity split over the replicas, local then redis: requests/s, latency, and the most requests the
//!    sims ever held waiting inside (sampled every millisecond).

use crate::load;
use bytes::Bytes;
use llm_gateway::config::{ClusterBackend, Config, WorkerConfig};
use llm_gateway::Gateway;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vllm_sim::SimConfig;

/// Options of `bench replicas`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Closed-loop concurrency of the overhead runs.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// `--max-num-seqs` of each sim of the saturated fleet.
    #[arg(long, default_value_t = 8)]
    seqs: usize,
    /// Characters of the overhead runs' prompt (0: one short sentence): a longer prompt has more prefix
    /// hashes to share (one per 128 bytes, at most 128).
    #[arg(long, default_value_t = 0)]
    prompt_chars: usize,
}

/// A `redis-server` on a free loopback port, killed when dropped.
struct Redis(std::process::Child, u16);

impl Redis {
    fn start() -> anyhow::Result<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("redis-server (apt-get install redis-server): {e}"))?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Redis(child, port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("redis-server did not come up")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(sims: &[&vllm_sim::SimHandle], cap: u32, redis: Option<u16>, share_dispatches: bool) -> Config {
    let mut cfg = Config::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.workers = sims
        .iter()
        .map(|s| {
            let mut w = WorkerConfig::from_url(s.url());
            w.max_concurrency = cap;
            w
        })
        .collect();
    cfg.queue.max_size = 10_000;
    if let Some(port) = redis {
        cfg.cluster.backend = ClusterBackend::Redis;
        cfg.cluster.redis_url = format!("redis://127.0.0.1:{port}");
        cfg.cluster.share_dispatches = share_dispatches;
    }
    cfg
}

async fn gateway(cfg: Config) -> anyhow::Result<Gateway> {
    Gateway::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?, cfg).await
}

fn body(tokens: u32, prompt_chars: usize) -> Bytes {
    let sentence = "Say something about load balancers.";
    let prompt =
        if prompt_chars == 0 { sentence.to_string() } else { sentence.chars().cycle().take(prompt_chars).collect() };
    Bytes::from(
        serde_json::json!({
            "model": "demo-model",
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": prompt}],
        })
        .to_string(),
    )
}

fn mean(r: &load::Report) -> Duration {
    r.latencies.iter().sum::<Duration>() / u32::try_from(r.latencies.len().max(1)).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let redis = Redis::start()?;
    let duration = Duration::from_secs(args.duration);

    // 1. Overhead of the shared count per request.
    let sim = vllm_sim::start(SimConfig {
        ttft_ms: 0.0,
        itl_ms: 0.0,
        prefill_ms_per_1k_tokens: 0.0,
        output_tokens: (16, 16),
        max_num_seqs: 1024,
        ..SimConfig::default()
    })
    .await?;
    println!(
        "shared slots overhead: one gateway (p2c_kv), one zero-latency vllm-sim, concurrency {}, {}s per run, prompt of {} chars",
        args.concurrency, args.duration, if args.prompt_chars == 0 { 35 } else { args.prompt_chars }
    );
    println!("| cluster.backend | rps | mean | p50 | p99 | errors |");
    println!("|---|---|---|---|---|---|");
    let mut means = Vec::new();
    let runs = [
        ("local", None, true),
        ("redis, share_dispatches = false", Some(redis.1), false),
        ("redis", Some(redis.1), true),
    ];
    let prompt = body(16, args.prompt_chars);
    for (label, backend, share) in runs {
        let gw = gateway(config(&[&sim], 1024, backend, share)).await?;
        let url = format!("{}/v1/chat/completions", gw.url());
        load::run(&url, prompt.clone(), args.concurrency, Duration::from_millis(500)).await?;
        let r = load::run(&url, prompt.clone(), args.concurrency, duration).await?;
        println!(
            "| {label} | {:.0} | {} | {} | {} | {} |",
            r.rps(),
            ms(mean(&r)),
            ms(r.quantile(0.5)),
            ms(r.quantile(0.99)),
            r.errors
        );
        means.push((mean(&r), r.rps()));
        gw.shutdown(Duration::from_secs(5)).await;
    }
    if let [(local, local_rps), (quiet, quiet_rps), (shared, shared_rps)] = means[..] {
        let cpu = |rps: f64| 2.0 / rps.max(1e-9) * 1e6;
        let us = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1e6;
        println!(
            "\nadded mean latency per request: redis {:.0} µs, of which dispatch records {:.0} µs; CPU per request (2 cores / rps): local {:.0} µs, redis without records {:.0} µs, redis {:.0} µs",
            us(shared, local),
            us(shared, quiet),
            cpu(local_rps),
            cpu(quiet_rps),
            cpu(shared_rps)
        );
    }

    // 2. Two replicas on a saturated fleet.
    let sims = Arc::new(vec![
        vllm_sim::start(SimConfig { max_num_seqs: args.seqs, output_tokens: (32, 32), ..SimConfig::default() }).await?,
        vllm_sim::start(SimConfig { max_num_seqs: args.seqs, output_tokens: (32, 32), ..SimConfig::default() }).await?,
    ]);
    let clients = 8 * args.seqs;
    println!(
        "\ntwo replicas, two vllm-sim with --max-num-seqs {} (default latencies, 32 tokens), {clients} clients split over the replicas, {}s per run",
        args.seqs, args.duration
    );
    println!(
        "| cluster.backend | rps | p50 | p99 | errors | most waiting inside a sim | mean waiting inside the sims |"
    );
    println!("|---|---|---|---|---|---|---|");
    for backend in [None, Some(redis.1)] {
        let refs: Vec<&vllm_sim::SimHandle> = sims.iter().collect();
        let a = gateway(config(&refs, args.seqs as u32, backend, true)).await?;
        let b = gateway(config(&refs, args.seqs as u32, backend, true)).await?;
        let (ua, ub) = (format!("{}/v1/chat/completions", a.url()), format!("{}/v1/chat/completions", b.url()));
        // Warm-up, then let the sims drain.
        let _ = tokio::join!(
            load::run(&ua, body(32, 0), clients / 2, Duration::from_millis(500)),
            load::run(&ub, body(32, 0), clients / 2, Duration::from_millis(500))
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (most, sum, n) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let watcher = {
            let (sims, stop, most, sum, n) = (sims.clone(), stop.clone(), most.clone(), sum.clone(), n.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let waiting: usize = sims.iter().map(|s| s.waiting()).sum();
                    most.fetch_max(sims.iter().map(|s| s.waiting()).max().unwrap_or(0), Ordering::Relaxed);
                    sum.fetch_add(waiting, Ordering::Relaxed);
                    n.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let (ra, rb) = tokio::join!(
            load::run(&ua, body(32, 0), clients / 2, duration),
            load::run(&ub, body(32, 0), clients / 2, duration)
        );
        stop.store(true, Ordering::Relaxed);
        let _ = watcher.await;
        let (ra, rb) = (ra?, rb?);
        let mut all = ra.latencies.clone();
        all.extend(rb.latencies.iter().copied());
        all.sort();
        let q = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or_default()
        };
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.2} |",
            if backend.is_some() { "redis" } else { "local" },
            ra.rps() + rb.rps(),
            ms(q(0.5)),
            ms(q(0.99)),
            ra.errors + rb.errors,
            most.load(Ordering::Relaxed),
            sum.load(Ordering::Relaxed) as f64 / n.load(Ordering::Relaxed).max(1) as f64
        );
        a.shutdown(Duration::from_secs(5)).await;
        b.shutdown(Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
