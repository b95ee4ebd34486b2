//! The batch benchmark: does a large batch slow live users down, and how much of the fleet's spare
//! capacity does it use?
//!
//! Fleet: `--sims` vllm-sim workers of `--slots` batch slots each (`max_num_seqs`), declared to the
//! gateway with the same `max_concurrency`, so the gateway's admission knows each worker's capacity.
//! Three phases, each `--duration` seconds:
//! 1. *capacity*: closed loops on every slot at once (non-streamed, through the gateway): the fleet's
//!    throughput when full, req/s.
//! 2. *live only*: open-loop Poisson arrivals of streamed chat requests at `--rate`: TTFT (time to the
//!    first SSE chunk, client side) p50/p99.
//! 3. *live + batch*: the same arrivals (same seed) while a batch of `--lines` lines runs; the batch's
//!    lines per second is the change in its `request_counts` over the phase. The batch is cancelled at
//!    the end.

use crate::load;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use llm_gateway::config::{Config, WorkerConfig};
use llm_gateway::Gateway;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;
use vllm_sim::SimConfig;

/// Options of `bench batch`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Live arrivals per second (Poisson, open loop, streamed).
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Workers.
    #[arg(long, default_value_t = 4)]
    sims: usize,
    /// Batch slots per worker (its `max_num_seqs`, and its `max_concurrency` in the gateway).
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Output tokens of every request (live and batch).
    #[arg(long, default_value_t = 32)]
    tokens: u32,
    /// Lines in the batch (more than the phase can finish, so it runs throughout).
    #[arg(long, default_value_t = 20_000)]
    lines: usize,
    /// Seed of the arrivals.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn sim_config(args: &Args, seed: u64) -> SimConfig {
    SimConfig {
        model: "bench-model".into(),
        max_num_seqs: args.slots as usize,
        ttft_ms: 20.0,
        itl_ms: 10.0,
        prefill_ms_per_1k_tokens: 0.0,
        output_tokens: (args.tokens, args.tokens),
        seed,
        ..SimConfig::default()
    }
}

fn chat(tokens: u32, stream: bool, text: &str) -> Value {
    json!({"model": "bench-model", "max_tokens": tokens, "stream": stream,
        "messages": [{"role": "user", "content": text}]})
}

/// Live TTFTs of one phase.
struct Live {
    ttfts: Vec<Duration>,
    errors: usize,
    sent: usize,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Poisson arrivals at `rate` for `duration`; each request streams and records its TTFT.
async fn live(base: &str, args: &Args, duration: Duration) -> anyhow::Result<Live> {
    let client = load::client();
    let uri: http::Uri = format!("{base}/v1/chat/completions").parse()?;
    let body = Bytes::from(chat(args.tokens, true, "a live question").to_string());
    let mut rng = StdRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let mut next = start;
    let mut tasks = Vec::new();
    while next < start + duration {
        tokio::time::sleep_until(next).await;
        let (client, uri, body) = (client.clone(), uri.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let req = http::Request::post(uri)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("static request parts are valid");
            let resp = client.request(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let mut body = resp.into_body();
            let mut ttft = None;
            while let Some(frame) = body.frame().await {
                let frame = frame.ok()?;
                if ttft.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    ttft = Some(t0.elapsed());
                }
            }
            ttft
        }));
        let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / args.rate;
        next += Duration::from_secs_f64(gap);
    }
    let sent = tasks.len();
    let mut ttfts = Vec::new();
    for t in tasks {
        if let Some(d) = t.await? {
            ttfts.push(d);
        }
    }
    ttfts.sort_unstable();
    Ok(Live { errors: sent - ttfts.len(), sent, ttfts })
}

async fn json_call(req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = req.send().await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}: {body}");
    Ok(body)
}

/// Uploads and starts the batch; returns its id.
async fn start_batch(http: &reqwest::Client, base: &str, args: &Args) -> anyhow::Result<String> {
    let text: String = (0..args.lines)
        .map(|i| {
            let line = json!({"custom_id": format!("b-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": chat(args.tokens, false, &format!("batch question {i}"))});
            format!("{line}\n")
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", reqwest::multipart::Part::text(text).file_name("bench.jsonl"));
    let file = json_call(http.post(format!("{base}/v1/files")).multipart(form)).await?;
    let body = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let batch = json_call(http.post(format!("{base}/v1/batches")).json(&body)).await?;
    Ok(batch["id"].as_str().unwrap_or_default().to_string())
}

async fn done_lines(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<(String, u64)> {
    let b = json_call(http.get(format!("{base}/v1/batches/{id}"))).await?;
    let c = &b["request_counts"];
    let done = c["completed"].as_u64().unwrap_or(0) + c["failed"].as_u64().unwrap_or(0);
    Ok((b["status"].as_str().unwrap_or("?").to_string(), done))
}

/// Runs the three phases and prints the table.
pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.duration >= 5, "--duration must be at least 5 seconds");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number");
    let mut sims = Vec::new();
    for i in 0..args.sims {
        sims.push(vllm_sim::start(sim_config(&args, args.seed + i as u64)).await?);
    }
    let data_dir = std::env::temp_dir().join(format!("bench-batch-{}", std::process::id()));
    let mut cfg = Config::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.batch.data_dir = data_dir.clone();
    cfg.batch.max_concurrency = (args.sims as u32 * args.slots) as usize;
    cfg.workers = sims
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = WorkerConfig::from_url(s.url());
            w.name = Some(format!("sim-{i}"));
            w.max_concurrency = args.slots;
            w
        })
        .collect();
    let share = cfg.batch.max_share;
    let gw = Gateway::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?, cfg).await?;
    let base = gw.url();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let duration = Duration::from_secs(args.duration);
    let slots = args.sims as u32 * args.slots;
    println!(
        "batch: {} vllm-sim x {} slots (max_concurrency {}), ttft 20 ms, itl 10 ms x (1 + batch fill), {} output \
         tokens; batch.max_share {share}; {} s per phase",
        args.sims, args.slots, args.slots, args.tokens, args.duration
    );

    // 1. Capacity: every slot busy.
    let body = Bytes::from(chat(args.tokens, false, "capacity").to_string());
    let cap = load::run(&format!("{base}/v1/chat/completions"), body, slots as usize, duration).await?;
    let capacity = cap.rps();

    // 2. Live only.
    let alone = live(&base, &args, duration).await?;

    // 3. Live + batch: the batch starts first and fills the spare capacity.
    let id = start_batch(&http, &base, &args).await?;
    let warm = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, done) = done_lines(&http, &base, &id).await?;
        if status == "in_progress" && done > u64::from(slots) {
            break;
        }
        anyhow::ensure!(Instant::now() < warm, "the batch did not start (status {status})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, before) = done_lines(&http, &base, &id).await?;
    let t0 = Instant::now();
    let mixed = live(&base, &args, duration).await?;
    let (_, after) = done_lines(&http, &base, &id).await?;
    let batch_rate = (after - before) as f64 / t0.elapsed().as_secs_f64();
    json_call(http.post(format!("{base}/v1/batches/{id}/cancel"))).await?;

    println!();
    println!("| phase | live req/s | live errors | TTFT p50 | TTFT p99 | batch lines/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    for (name, l, rate) in [("live only", &alone, None), ("live + batch", &mixed, Some(batch_rate))] {
        println!(
            "| {name} | {:.1} | {} | {} | {} | {} |",
            l.sent as f64 / args.duration as f64,
            l.errors,
            ms(quantile(&l.ttfts, 0.5)),
            ms(quantile(&l.ttfts, 0.99)),
            rate.map_or("-".into(), |r| format!("{r:.1}")),
        );
    }
    let p = |a: Duration, b: Duration| 100.0 * (b.as_secs_f64() / a.as_secs_f64().max(1e-9) - 1.0);
    println!();
    println!(
        "TTFT change with the batch running: p50 {:+.1}%, p99 {:+.1}%",
        p(quantile(&alone.ttfts, 0.5), quantile(&mixed.ttfts, 0.5)),
        p(quantile(&alone.ttfts, 0.99), quantile(&mixed.ttfts, 0.99)),
    );
    let live_rate = mixed.sent as f64 / args.duration as f64;
    println!(
        "fleet capacity (all {slots} slots busy): {capacity:.1} req/s; spare beside {live_rate:.1} live req/s: \
         {:.1} req/s; the batch ran {batch_rate:.1} lines/s = {:.0}% of capacity, {:.0}% of the spare",
        (capacity - live_rate).max(0.0),
        100.0 * batch_rate / capacity.max(1e-9),
        100.0 * batch_rate / (capacity - live_rate).max(1e-9),
    );
    gw.shutdown(Duration::from_secs(5)).await;
    for s in sims {
        s.shutdown();
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}
