//! Routing strategies compared on one heterogeneous fleet and one workload.
//!
//! For each strategy: four fresh vllm-sim workers (cold prefix caches, zeroed counters), a fresh gateway
//! with that strategy, then the same seeded open-loop schedule ([`crate::workload`]) replayed against it.
//! Per request we time the first SSE `data:` event carrying a role or content (TTFT) and the end of the
//! stream (e2e), and note the worker from `X-Gateway-Worker`; per worker we read the sim's own prefix
//! cache counters. One markdown table, a row per strategy.
//!
//! The fleet is heterogeneous on purpose, so strategies that read load can differ from those that do
//! not: two normal workers, one slower (higher TTFT, prefill and ITL), one with a small KV cache (its
//! prefix cache evicts soon and its batch is limited by blocks).

use crate::load;
use crate::workload::{self, WorkloadConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use llm_gateway::config::{Config, WorkerConfig};
use llm_gateway::Gateway;
use routing::Strategy;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_sim::{SimConfig, SimHandle};

/// Arrivals per second when `--rate` is not given: round_robin is loaded near the fleet's capacity on
/// this workload but does not collapse (measured on the 2-core machine of BENCHMARKS.md).
const DEFAULT_RATE: f64 = 28.0;

/// Options of `bench routing`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds of arrivals per strategy.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Mean arrivals per second (Poisson); default calibrated near the fleet's capacity.
    #[arg(long)]
    rate: Option<f64>,
    /// Strategies to run, comma-separated (default: all seven).
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// Seed of the workload and the sims.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Most requests outstanding at once; arrivals beyond it are dropped and counted as errors.
    #[arg(long, default_value_t = 2000)]
    max_outstanding: usize,
    /// Turn the gateway's admission queue off (workers get requests beyond their capacity, as behind a
    /// router without one).
    #[arg(long)]
    no_queue: bool,
}

/// The fleet: `(name, config, weight for the weighted strategy)`.
fn fleet(seed: u64) -> Vec<(String, SimConfig, u32)> {
    let normal = SimConfig {
        ttft_ms: 25.0,
        prefill_ms_per_1k_tokens: 50.0,
        itl_ms: 10.0,
        max_num_seqs: 8,
        kv_blocks: 8192,
        block_size: 16,
        output_tokens: (16, 48),
        ..SimConfig::default()
    };
    let slow = SimConfig { ttft_ms: 40.0, prefill_ms_per_1k_tokens: 80.0, itl_ms: 15.0, ..normal.clone() };
    let small_kv = SimConfig { kv_blocks: 1024, ..normal.clone() };
    [(normal.clone(), 3), (normal, 3), (slow, 2), (small_kv, 2)]
        .into_iter()
        .enumerate()
        .map(|(i, (cfg, weight))| (format!("sim-{i}"), SimConfig { seed: seed.wrapping_add(i as u64), ..cfg }, weight))
        .collect()
}

fn describe_fleet(fleet: &[(String, SimConfig, u32)]) -> String {
    fleet
        .iter()
        .map(|(name, c, w)| {
            format!(
                "{name}: ttft {} ms + {} ms/1k uncached tokens, itl {} ms, max_num_seqs {}, kv_blocks {}, weight {w}",
                c.ttft_ms, c.prefill_ms_per_1k_tokens, c.itl_ms, c.max_num_seqs, c.kv_blocks
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Ok { ttft: Duration, e2e: Duration, worker: Option<String> },
    Err(&'static str),
}

/// What one strategy's run measured.
struct RunReport {
    strategy: Strategy,
    elapsed: Duration,
    ttfts: Vec<Duration>,
    e2es: Vec<Duration>,
    share: Vec<u64>,
    errors: HashMap<&'static str, u64>,
    cache_hits: f64,
    cache_queries: f64,
    /// Per worker `(hits, queries)` deltas, for the per-worker hit rates printed beside the table.
    per_worker_cache: Vec<(f64, f64)>,
    /// Per worker, the longest sim queue (`waiting`) seen by a 50 ms sampler during the run.
    max_waiting: Vec<usize>,
    /// Turns after the first of a conversation, and how many went to the previous turn's worker.
    follow_ups: u64,
    same_worker: u64,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let strategies: Vec<Strategy> = if args.strategies.is_empty() {
        Strategy::ALL.to_vec()
    } else {
        args.strategies
            .iter()
            .map(|s| s.trim().parse::<Strategy>().map_err(anyhow::Error::msg))
            .collect::<Result<_, _>>()?
    };
    let rate = args.rate.unwrap_or(DEFAULT_RATE);
    anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be a positive number");
    let wl = WorkloadConfig::new(args.seed, rate, Duration::from_secs(args.duration));
    let schedule = Arc::new(workload::generate(&wl));
    let sum = workload::summary(&schedule);
    let fleet = fleet(args.seed);
    println!(
        "routing: {} strategies, {} req/s offered (Poisson, open loop), {}s each, admission queue {}",
        strategies.len(),
        rate,
        args.duration,
        if args.no_queue { "off" } else { "on" }
    );
    println!("fleet: {}", describe_fleet(&fleet));
    println!("workload: {}", wl.describe());
    println!(
        "schedule: {} requests ({} one-offs, {} conversations), mean body {} bytes",
        sum.requests, sum.oneoffs, sum.conversations, sum.mean_body_bytes
    );
    println!(
        "ceiling: {:.1}% prefix-cache hits if every request met one cache that never evicts",
        100.0 * workload::oracle_hit_rate(&schedule, &wl.model, fleet[0].1.block_size)
    );
    println!();
    let mut reports = Vec::new();
    for &strategy in &strategies {
        let r = run_one(strategy, &fleet, Arc::clone(&schedule), args.max_outstanding, !args.no_queue).await?;
        let per_worker: Vec<String> =
            r.per_worker_cache.iter().map(|(h, q)| format!("{:.0}%", 100.0 * h / q.max(1.0))).collect();
        eprintln!(
            "  {strategy}: {} ok, {} errors in {:.1}s; prefix-cache hit per worker {}; longest queue per worker {:?}",
            r.ttfts.len(),
            r.errors.values().sum::<u64>(),
            r.elapsed.as_secs_f64(),
            per_worker.join("/"),
            r.max_waiting,
        );
        reports.push(r);
    }
    println!();
    let names: Vec<&str> = fleet.iter().map(|(n, _, _)| n.as_str()).collect();
    println!(
        "| strategy | completed req/s | TTFT p50 | TTFT p99 | e2e p99 | prefix-cache hit | same worker as previous turn \
         | share {} (%) | errors |",
        names.join("/")
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    for r in &reports {
        let total: u64 = r.share.iter().sum();
        let share: Vec<String> =
            r.share.iter().map(|&n| format!("{:.0}", 100.0 * n as f64 / total.max(1) as f64)).collect();
        let mut errs: Vec<_> = r.errors.iter().map(|(k, v)| format!("{v} {k}")).collect();
        errs.sort();
        println!(
            "| {} | {:.1} | {} | {} | {} | {:.1}% | {:.0}% | {} | {} |",
            r.strategy,
            r.ttfts.len() as f64 / r.elapsed.as_secs_f64().max(1e-9),
            ms(quantile(&r.ttfts, 0.5)),
            ms(quantile(&r.ttfts, 0.99)),
            ms(quantile(&r.e2es, 0.99)),
            100.0 * r.cache_hits / r.cache_queries.max(1.0),
            100.0 * r.same_worker as f64 / r.follow_ups.max(1) as f64,
            share.join("/"),
            if errs.is_empty() { "0".to_owned() } else { errs.join(", ") },
        );
    }
    Ok(())
}

/// `(hits, queries)` of the sim's prefix cache, in tokens.
fn cache_counters(sim: &SimHandle) -> (f64, f64) {
    let text = sim.state().metrics_text();
    let mut hits = 0.0;
    let mut queries = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let name = name.split('{').next().unwrap_or("");
        let Ok(v) = value.parse::<f64>() else { continue };
        match name {
            "vllm:prefix_cache_hits_total" => hits += v,
            "vllm:prefix_cache_queries_total" => queries += v,
            _ => {}
        }
    }
    (hits, queries)
}

async fn run_one(
    strategy: Strategy,
    fleet: &[(String, SimConfig, u32)],
    schedule: Arc<Vec<workload::Request>>,
    max_outstanding: usize,
    queue: bool,
) -> anyhow::Result<RunReport> {
    let mut sims = Vec::new();
    for (_, cfg, _) in fleet {
        sims.push(vllm_sim::start(cfg.clone()).await?);
    }
    let mut cfg = Config::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.health.interval_ms = 200;
    cfg.health.timeout_ms = 1000;
    cfg.routing.strategy = strategy;
    cfg.queue.enabled = queue;
    cfg.workers = fleet
        .iter()
        .zip(&sims)
        .map(|((name, _, weight), sim)| {
            let mut w = WorkerConfig::from_url(sim.url());
            w.name = Some(name.clone());
            w.weight = *weight;
            w
        })
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::serve(listener, cfg).await?;
    let client = load::client();
    wait_healthy(&client, &gw.url(), fleet.len()).await?;

    let before: Vec<(f64, f64)> = sims.iter().map(cache_counters).collect();
    let uri: http::Uri = format!("{}/v1/chat/completions", gw.url()).parse()?;
    let outstanding = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    // Sample the sims' own queues: herding shows as one long queue at a time even when shares even out.
    let states: Vec<vllm_sim::SimState> = sims.iter().map(|s| s.state().clone()).collect();
    let sampling = stop_flag();
    let sampler = {
        let stop = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut max = vec![0usize; states.len()];
            while !stop.load(Ordering::Relaxed) {
                for (m, s) in max.iter_mut().zip(&states) {
                    *m = (*m).max(s.waiting());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        })
    };
    let mut tasks = Vec::with_capacity(schedule.len());
    let mut dropped = 0u64;
    for i in 0..schedule.len() {
        let req = &schedule[i];
        tokio::time::sleep_until(start + req.at).await;
        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
            dropped += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let (client, uri, outstanding, schedule) =
            (client.clone(), uri.clone(), Arc::clone(&outstanding), Arc::clone(&schedule));
        tasks.push(tokio::spawn(async move {
            let r = &schedule[i];
            let out =
                match tokio::time::timeout(Duration::from_secs(120), one(&client, uri, &r.session, r.body.clone()))
                    .await
                {
                    Ok(o) => o,
                    Err(_) => Outcome::Err("timeout"),
                };
            outstanding.fetch_sub(1, Ordering::Relaxed);
            (i, out)
        }));
    }
    let mut ttfts = Vec::new();
    let mut e2es = Vec::new();
    let mut share = vec![0u64; fleet.len()];
    let mut errors: HashMap<&'static str, u64> = HashMap::new();
    if dropped > 0 {
        errors.insert("dropped", dropped);
    }
    // Worker of each conversation's latest completed turn, to measure how often a follow-up sticks.
    let mut last_worker: HashMap<u64, (u32, usize)> = HashMap::new();
    let (mut follow_ups, mut same_worker) = (0u64, 0u64);
    for t in tasks {
        let (i, out) = t.await?;
        match out {
            Outcome::Ok { ttft, e2e, worker } => {
                ttfts.push(ttft);
                e2es.push(e2e);
                let Some(w) = worker.and_then(|w| fleet.iter().position(|(n, _, _)| *n == w)) else { continue };
                share[w] += 1;
                if let workload::Kind::Turn { conversation, turn } = schedule[i].kind {
                    if let Some(&(prev_turn, prev_w)) = last_worker.get(&conversation) {
                        if prev_turn + 1 == turn {
                            follow_ups += 1;
                            same_worker += u64::from(prev_w == w);
                        }
                    }
                    last_worker.insert(conversation, (turn, w));
                }
            }
            Outcome::Err(kind) => *errors.entry(kind).or_default() += 1,
        }
    }
    let elapsed = start.elapsed();
    sampling.store(true, Ordering::Relaxed);
    let max_waiting = sampler.await?;
    let after: Vec<(f64, f64)> = sims.iter().map(cache_counters).collect();
    let per_worker_cache: Vec<(f64, f64)> = before.iter().zip(&after).map(|(b, a)| (a.0 - b.0, a.1 - b.1)).collect();
    let cache_hits = per_worker_cache.iter().map(|c| c.0).sum();
    let cache_queries = per_worker_cache.iter().map(|c| c.1).sum();
    gw.shutdown(Duration::from_secs(5)).await;
    for s in sims {
        s.shutdown();
    }
    ttfts.sort_unstable();
    e2es.sort_unstable();
    Ok(RunReport {
        strategy,
        elapsed,
        ttfts,
        e2es,
        share,
        errors,
        cache_hits,
        cache_queries,
        per_worker_cache,
        max_waiting,
        follow_ups,
        same_worker,
    })
}

/// A stop flag for the queue sampler.
fn stop_flag() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}

/// Waits until the gateway reports `n` healthy workers.
async fn wait_healthy(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let uri: http::Uri = format!("{base}/health").parse()?;
    while Instant::now() < deadline {
        let req = http::Request::get(uri.clone()).body(Full::new(Bytes::new()))?;
        if let Ok(resp) = client.request(req).await {
            if let Ok(body) = resp.into_body().collect().await {
                let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
                if v["healthy_workers"].as_u64() == Some(n as u64) {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the gateway did not see {n} healthy workers within 10 s")
}

/// Sends one streamed chat request and times it.
async fn one(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    session: &str,
    body: Bytes,
) -> Outcome {
    let t0 = Instant::now();
    let Ok(req) = http::Request::post(uri)
        .header("content-type", "application/json")
        .header("x-session-id", session)
        .body(Full::new(body))
    else {
        return Outcome::Err("bad_request");
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(_) => return Outcome::Err("transport"),
    };
    let status = resp.status();
    if status.is_server_error() {
        return Outcome::Err(if status == http::StatusCode::SERVICE_UNAVAILABLE { "503" } else { "5xx" });
    }
    if !status.is_success() {
        return Outcome::Err(if status == http::StatusCode::TOO_MANY_REQUESTS { "429" } else { "4xx" });
    }
    let worker = resp.headers().get("x-gateway-worker").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut ttft: Option<Duration> = None;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Outcome::Err("stream_cut") };
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        // Consume complete lines.
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Some(payload) = line.strip_prefix(b"data:") else { continue };
            let payload = payload.trim_ascii();
            if payload == b"[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { continue };
            if v.get("error").is_some() {
                return Outcome::Err("stream_error");
            }
            if ttft.is_none() {
                let delta = &v["choices"][0]["delta"];
                if delta.get("role").is_some_and(|r| !r.is_null()) || delta.get("content").is_some_and(|c| !c.is_null())
                {
                    ttft = Some(t0.elapsed());
                }
            }
        }
    }
    match (ttft, done) {
        (Some(ttft), true) => Outcome::Ok { ttft, e2e: t0.elapsed(), worker },
        _ => Outcome::Err("incomplete"),
    }
}
