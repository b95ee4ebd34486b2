//! The fault benchmark: steady load through the gateway over three vllm-sim workers while a script kills
//! one worker, restarts it on the same port, and makes another one slow and then healthy again.
//!
//! Script, as shares of `--duration`: at 20% sim-0 is killed ([`SimHandle::shutdown`]: listener closed,
//! in-flight connections aborted); at 30% sim-1 gains [`SLOW_EXTRA_MS`] before its first token; at 50% a
//! new sim is served on sim-0's port; at 80% sim-1 is healthy again. The five windows between those
//! events are the rows of the table.
//!
//! Load is open loop (Poisson arrivals at `--rate`, seeded) so a slow or failing worker cannot slow the
//! arrivals down and hide itself; `--concurrency N` switches to N closed loops instead. Half the requests
//! stream by default (`--stream-share`). Each request is classified from the client's side: ok, HTTP 5xx
//! or 4xx, a stream that ended with an SSE error event, a transport error (connect, reset, body cut short,
//! stream without `[DONE]`), or a client timeout. Requests are placed in a window by the time they were
//! sent. Retries and breaker opens are the gateway's own counters (`/metrics`,
//! `/api/circuit-breaker/stats`) read at each window's end, so they are attributed by wall time.

use crate::load;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use llm_gateway::config::{Config, WorkerConfig};
use llm_gateway::Gateway;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use routing::Strategy;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use vllm_sim::{Faults, SimConfig, SimHandle};

/// Extra delay before sim-1's first token while it is slow.
const SLOW_EXTRA_MS: u64 = 1500;
/// The gateway's slow-call threshold in this bench (the default is 5000 ms): a stream from the slow
/// worker (~1.5 s to first token) counts as a breaker failure, a normal one (~20-40 ms) does not.
const SLOW_CALL_THRESHOLD_MS: u64 = 1000;
/// Longest a client waits for one request before counting it as a timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Number of sims.
const SIMS: usize = 3;

/// Options of `bench faults`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds of load; the script's event times scale with it.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Mean arrivals per second (Poisson, open loop).
    #[arg(long, default_value_t = 25.0)]
    rate: f64,
    /// Run this many closed loops (each sends its next request when the last one ends) instead of the
    /// open loop.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Share of requests that stream (0..=1).
    #[arg(long, default_value_t = 0.5)]
    stream_share: f64,
    /// Seed of arrivals, request mix and the sims.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How one request ended, from the client's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    Ok,
    Status5xx,
    Status4xx,
    StreamErrorEvent,
    Transport,
    Timeout,
}

/// The failure columns, in table order.
const FAILURES: [Cause; 5] =
    [Cause::Status5xx, Cause::Status4xx, Cause::StreamErrorEvent, Cause::Transport, Cause::Timeout];

/// One finished request.
struct Record {
    /// When it was sent, from the start of the load.
    sent_at: Duration,
    stream: bool,
    cause: Cause,
    latency: Duration,
    /// `X-Gateway-Worker`, when the gateway answered with headers.
    worker: Option<String>,
    /// For failures: the status or error text, for the evidence printed beside the table.
    detail: String,
}

/// The script's windows: label and start as a share of the duration.
const PHASES: [(&str, f64); 5] = [
    ("before kill", 0.0),
    ("sim-0 killed", 0.2),
    ("sim-0 killed, sim-1 slow", 0.3),
    ("sim-0 restarted, sim-1 slow", 0.5),
    ("all healthy again", 0.8),
];

/// Gateway counters read at one instant.
#[derive(Clone, Default)]
struct Counters {
    retries: u64,
    /// `opens` per worker name.
    opens: BTreeMap<String, u64>,
}

fn sim_config(seed: u64) -> SimConfig {
    SimConfig { ttft_ms: 20.0, itl_ms: 7.0, output_tokens: (16, 48), max_num_seqs: 64, seed, ..SimConfig::default() }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.duration >= 5, "--duration must be at least 5 seconds");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number");
    anyhow::ensure!((0.0..=1.0).contains(&args.stream_share), "--stream-share must be within 0..=1");
    let mut sims: Vec<SimHandle> = Vec::new();
    for i in 0..SIMS {
        sims.push(vllm_sim::start(sim_config(args.seed.wrapping_add(i as u64))).await?);
    }
    let sim0_addr = sims[0].addr();
    let mut cfg = Config::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.routing.strategy = Strategy::RoundRobin;
    cfg.circuit_breaker.slow_call_threshold_ms = SLOW_CALL_THRESHOLD_MS;
    cfg.workers = sims
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = WorkerConfig::from_url(s.url());
            w.name = Some(format!("sim-{i}"));
            w
        })
        .collect();
    let (cb, retry, health) = (cfg.circuit_breaker.clone(), cfg.retry.clone(), cfg.health.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::serve(listener, cfg).await?;
    let client = load::client();
    let base = gw.url();
    wait_healthy(&client, &base, SIMS).await?;

    let duration = Duration::from_secs(args.duration);
    let at = |share: f64| duration.mul_f64(share);
    let load_desc = match args.concurrency {
        Some(c) => format!("{c} closed loops"),
        None => format!("open loop, Poisson arrivals at {} req/s", args.rate),
    };
    println!(
        "faults: {}s of load through the gateway ({load_desc}), {:.0}% of the requests streamed",
        args.duration,
        100.0 * args.stream_share
    );
    println!(
        "fleet: 3 vllm-sim, ttft 20 ms, itl 7 ms, 16-48 output tokens; gateway: round_robin, breakers on \
         (failure_threshold {}, timeout {} s, slow_call_threshold {} ms), retry.max_attempts {}, \
         health.interval_ms {}",
        cb.failure_threshold, cb.timeout_seconds, cb.slow_call_threshold_ms, retry.max_attempts, health.interval_ms
    );
    println!(
        "script: sim-0 killed at {:.0}s, sim-1 +{SLOW_EXTRA_MS} ms to first token at {:.0}s, sim-0 restarted on \
         port {} at {:.0}s, sim-1 healthy at {:.0}s",
        at(0.2).as_secs_f64(),
        at(0.3).as_secs_f64(),
        sim0_addr.port(),
        at(0.5).as_secs_f64(),
        at(0.8).as_secs_f64(),
    );

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let timeline = tokio::spawn(watch_breakers(client.clone(), base.clone(), start, Arc::clone(&stop)));
    let script = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move { run_script(sims, sim0_addr, start, duration, &client, &base).await })
    };
    let uri: http::Uri = format!("{base}/v1/chat/completions").parse()?;
    let mut records = match args.concurrency {
        Some(c) => closed_loop(&client, &uri, c, start, duration, args.seed, args.stream_share).await?,
        None => open_loop(&client, &uri, args.rate, start, duration, args.seed, args.stream_share).await?,
    };
    let (sims, mut marks) = script.await??;
    marks.push(read_counters(&client, &base).await?);
    stop.store(true, Ordering::Relaxed);
    timeline.await?;
    gw.shutdown(Duration::from_secs(5)).await;
    for s in sims {
        s.shutdown();
    }
    records.sort_by_key(|r| r.sent_at);
    print_evidence(&records);
    print_table(&records, &marks, duration);
    Ok(())
}

/// Runs the script; returns the sims (to shut down) and the counters read at each window's start plus
/// the very start.
async fn run_script(
    mut sims: Vec<SimHandle>,
    sim0_addr: std::net::SocketAddr,
    start: Instant,
    duration: Duration,
    client: &HttpClient,
    base: &str,
) -> anyhow::Result<(Vec<SimHandle>, Vec<Counters>)> {
    let mut marks = vec![read_counters(client, base).await?];
    for (i, &(_, share)) in PHASES.iter().enumerate().skip(1) {
        tokio::time::sleep_until(start + duration.mul_f64(share)).await;
        marks.push(read_counters(client, base).await?);
        let t = start.elapsed().as_secs_f64();
        match i {
            1 => {
                let dead = sims.remove(0);
                dead.shutdown();
                eprintln!("  {t:6.1}s  script: sim-0 killed");
            }
            2 => {
                sims[0].set_faults(Faults { extra_latency_ms: SLOW_EXTRA_MS, ..Faults::default() });
                eprintln!("  {t:6.1}s  script: sim-1 slow");
            }
            3 => {
                let listener = bind_again(sim0_addr).await?;
                let fresh = vllm_sim::spawn(listener, sim_config(0xfeed)).await?;
                sims.insert(0, fresh);
                eprintln!("  {t:6.1}s  script: sim-0 restarted on {sim0_addr}");
            }
            _ => {
                sims[1].set_faults(Faults::default());
                eprintln!("  {t:6.1}s  script: sim-1 healthy");
            }
        }
    }
    Ok((sims, marks))
}

/// Binds the killed sim's address again, retrying briefly while the old socket is released.
async fn bind_again(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() >= deadline => return Err(anyhow::anyhow!("rebinding {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A request body: a short chat, streamed or not.
pub(crate) fn body(rng: &mut StdRng, stream_share: f64) -> (bool, Bytes) {
    let stream = rng.random_bool(stream_share);
    let n: u32 = rng.random_range(0..1_000_000);
    let body = serde_json::json!({
        "model": "demo-model",
        "stream": stream,
        "max_tokens": 48,
        "messages": [{"role": "user", "content": format!("Request {n}: tell me about circuit breakers.")}],
    });
    (stream, Bytes::from(body.to_string()))
}

async fn open_loop(
    client: &HttpClient,
    uri: &http::Uri,
    rate: f64,
    start: Instant,
    duration: Duration,
    seed: u64,
    stream_share: f64,
) -> anyhow::Result<Vec<Record>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tasks = Vec::new();
    let mut next = Duration::ZERO;
    loop {
        // Exponential inter-arrival times: a Poisson process at `rate`.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        next += Duration::from_secs_f64(-u.ln() / rate);
        if next >= duration {
            break;
        }
        tokio::time::sleep_until(start + next).await;
        let (stream, body) = body(&mut rng, stream_share);
        let (client, uri) = (client.clone(), uri.clone());
        tasks.push(tokio::spawn(async move { one(&client, uri, stream, body, start).await }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await?);
    }
    Ok(records)
}

async fn closed_loop(
    client: &HttpClient,
    uri: &http::Uri,
    concurrency: usize,
    start: Instant,
    duration: Duration,
    seed: u64,
    stream_share: f64,
) -> anyhow::Result<Vec<Record>> {
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (client, uri) = (client.clone(), uri.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while start.elapsed() < duration {
                let (stream, body) = body(&mut rng, stream_share);
                out.push(one(&client, uri.clone(), stream, body, start).await);
            }
            out
        }));
    }
    let mut records = Vec::new();
    for t in tasks {
        records.extend(t.await?);
    }
    Ok(records)
}

/// Sends one request and classifies how it ended.
async fn one(client: &HttpClient, uri: http::Uri, stream: bool, body: Bytes, start: Instant) -> Record {
    let sent = Instant::now();
    let (cause, worker, detail) = match tokio::time::timeout(CLIENT_TIMEOUT, exchange(client, uri, body)).await {
        Ok(r) => r,
        Err(_) => (Cause::Timeout, None, format!("no answer within {CLIENT_TIMEOUT:?}")),
    };
    Record { sent_at: sent.duration_since(start), stream, cause, latency: sent.elapsed(), worker, detail }
}

async fn exchange(client: &HttpClient, uri: http::Uri, body: Bytes) -> (Cause, Option<String>, String) {
    let req = match http::Request::post(uri).header("content-type", "application/json").body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return (Cause::Transport, None, format!("building the request: {e}")),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return (Cause::Transport, None, format!("request: {e}")),
    };
    let status = resp.status();
    let worker = resp.headers().get("x-gateway-worker").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let bytes = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return (Cause::Transport, worker, format!("{status} body cut: {e}")),
    };
    let text = String::from_utf8_lossy(&bytes);
    if status.is_server_error() || status.is_client_error() {
        let cause = if status.is_server_error() { Cause::Status5xx } else { Cause::Status4xx };
        return (cause, worker, format!("{status} {}", text.chars().take(200).collect::<String>()));
    }
    if !sse {
        return match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) if v.get("choices").is_some() => (Cause::Ok, worker, String::new()),
            _ => (Cause::Transport, worker, format!("{status} unexpected body")),
        };
    }
    let mut done = false;
    for line in text.lines() {
        let Some(payload) = line.strip_prefix("data:").map(str::trim) else { continue };
        if payload == "[DONE]" {
            done = true;
        } else if payload.contains("\"error\"") {
            return (Cause::StreamErrorEvent, worker, payload.chars().take(200).collect());
        }
    }
    if done {
        (Cause::Ok, worker, String::new())
    } else {
        (Cause::Transport, worker, "stream ended without [DONE]".into())
    }
}

pub(crate) async fn get_json(client: &HttpClient, url: &str) -> anyhow::Result<serde_json::Value> {
    let req = http::Request::get(url.parse::<http::Uri>()?).body(Full::new(Bytes::new()))?;
    let body = client.request(req).await?.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

async fn read_counters(client: &HttpClient, base: &str) -> anyhow::Result<Counters> {
    let req = http::Request::get(format!("{base}/metrics").parse::<http::Uri>()?).body(Full::new(Bytes::new()))?;
    let text = client.request(req).await?.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&text);
    let retries = text
        .lines()
        .find_map(|l| l.strip_prefix("llm_gateway_retries_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    let stats = get_json(client, &format!("{base}/api/circuit-breaker/stats")).await?;
    let mut opens = BTreeMap::new();
    for w in stats.as_array().into_iter().flatten() {
        let name = w["worker"].as_str().unwrap_or("?").to_owned();
        opens.insert(name, w["breaker"]["counters"]["opens"].as_u64().unwrap_or(0));
    }
    Ok(Counters { retries, opens })
}

/// Prints each worker's breaker state and health changes with their time, to stderr, until `stop`.
async fn watch_breakers(client: HttpClient, base: String, start: Instant, stop: Arc<AtomicBool>) {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let breakers = get_json(&client, &format!("{base}/api/circuit-breaker/stats")).await;
        let workers = get_json(&client, &format!("{base}/api/workers")).await;
        let t = start.elapsed().as_secs_f64();
        if let (Ok(b), Ok(w)) = (breakers, workers) {
            let mut now: Vec<(String, String)> = Vec::new();
            for x in b.as_array().into_iter().flatten() {
                let name = x["worker"].as_str().unwrap_or("?");
                now.push((format!("{name} breaker"), x["breaker"]["state"].as_str().unwrap_or("?").to_owned()));
            }
            for x in w.as_array().into_iter().flatten() {
                let name = x["name"].as_str().unwrap_or("?");
                let healthy = if x["healthy"].as_bool().unwrap_or(false) { "healthy" } else { "unhealthy" };
                now.push((format!("{name} probe"), healthy.to_owned()));
            }
            for (k, v) in now {
                if last.get(&k) != Some(&v) {
                    if last.contains_key(&k) {
                        eprintln!("  {t:6.1}s  {k}: {v}");
                    }
                    last.insert(k, v);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every failure's time, kind, worker and text, so causes can be checked against the script.
fn print_evidence(records: &[Record]) {
    let failures: Vec<&Record> = records.iter().filter(|r| r.cause != Cause::Ok).collect();
    if failures.is_empty() {
        return;
    }
    eprintln!("failures ({}):", failures.len());
    for r in failures.iter().take(40) {
        eprintln!(
            "  {:6.2}s  {:<10} {:?} via {}: {}",
            r.sent_at.as_secs_f64(),
            if r.stream { "stream" } else { "non-stream" },
            r.cause,
            r.worker.as_deref().unwrap_or("-"),
            r.detail
        );
    }
    if failures.len() > 40 {
        eprintln!("  ... {} more", failures.len() - 40);
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn print_table(records: &[Record], marks: &[Counters], duration: Duration) {
    println!();
    println!(
        "| window | sent | ok | success | 5xx | 4xx | stream error event | transport | timeout | retries \
         | breaker opens sim-0/1/2 | served by sim-0/1/2 | p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let bounds: Vec<Duration> =
        PHASES.iter().map(|&(_, s)| duration.mul_f64(s)).chain(std::iter::once(Duration::MAX)).collect();
    for (i, &(label, _)) in PHASES.iter().enumerate() {
        let (lo, hi) = (bounds[i], bounds[i + 1]);
        let rows: Vec<&Record> = records.iter().filter(|r| r.sent_at >= lo && r.sent_at < hi).collect();
        let window = format!(
            "{:.0}-{}s",
            lo.as_secs_f64(),
            if hi == Duration::MAX {
                format!("{:.0}", duration.as_secs_f64())
            } else {
                format!("{:.0}", hi.as_secs_f64())
            }
        );
        let (a, b) = (marks.get(i), marks.get(i + 1));
        print_row(&format!("{label} ({window})"), &rows, a, b);
    }
    let all: Vec<&Record> = records.iter().collect();
    print_row("**all**", &all, marks.first(), marks.last());
}

fn print_row(label: &str, rows: &[&Record], from: Option<&Counters>, to: Option<&Counters>) {
    let count = |c: Cause| rows.iter().filter(|r| r.cause == c).count();
    let ok = count(Cause::Ok);
    let mut lat: Vec<Duration> = rows.iter().filter(|r| r.cause == Cause::Ok).map(|r| r.latency).collect();
    lat.sort_unstable();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let (retries, opens) = match (from, to) {
        (Some(a), Some(b)) => {
            let opens: Vec<String> = (0..SIMS)
                .map(|i| {
                    let name = format!("sim-{i}");
                    let d = b
                        .opens
                        .get(&name)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(a.opens.get(&name).copied().unwrap_or(0));
                    d.to_string()
                })
                .collect();
            (b.retries.saturating_sub(a.retries).to_string(), opens.join("/"))
        }
        _ => ("?".into(), "?".into()),
    };
    let served: Vec<String> = (0..SIMS)
        .map(|i| {
            let name = format!("sim-{i}");
            rows.iter()
                .filter(|r| r.cause == Cause::Ok && r.worker.as_deref() == Some(name.as_str()))
                .count()
                .to_string()
        })
        .collect();
    let failures: Vec<String> = FAILURES.iter().map(|&c| count(c).to_string()).collect();
    println!(
        "| {label} | {} | {ok} | {:.2}% | {} | {retries} | {opens} | {} | {} | {} |",
        rows.len(),
        100.0 * ok as f64 / rows.len().max(1) as f64,
        failures.join(" | "),
        served.join("/"),
        ms(quantile(&lat, 0.5)),
        ms(quantile(&lat, 0.99)),
    );
}

/// Waits until the gateway reports `n` healthy workers.
pub(crate) async fn wait_healthy(client: &HttpClient, base: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(v) = get_json(client, &format!("{base}/health")).await {
            if v["healthy_workers"].as_u64() == Some(n as u64) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the gateway did not see {n} healthy workers within 10 s")
}
