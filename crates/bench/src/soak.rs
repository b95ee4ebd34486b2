//! The soak: a long run (ten minutes by default) of mixed traffic through a real `llm-gateway` process over
//! real `vllm-sim` processes, with faults injected into the workers and the config hot-reloaded under
//! load, watching the gateway's memory and file descriptors as it goes.
//!
//! The gateway runs as its own process, started from a config file written to a temp dir, so its RSS
//! (`VmRSS` in `/proc/<pid>/status`) and open fds (`/proc/<pid>/fd`) are its own and nothing else's.
//!
//! - **Traffic**: Poisson arrivals (open loop, seeded) at `--rate`, at most `--max-outstanding` at once
//!   (arrivals beyond are counted as skipped); `--stream-share` of them stream, and `--drop-share` of the
//!   streams are dropped by the client after 1-8 events (a real disconnect: the connection is closed).
//! - **Faults**, one every `--fault-every` seconds, in a cycle of six steps, each lifting the one before
//!   through `POST /sim/faults`: sim-1 answers half its requests with 500; sim-2's answers die after 4
//!   tokens (connection aborted); sim-3 hangs (accepts requests, never answers); sim-0 is killed with
//!   SIGKILL; sim-0 is started again on its port; a quiet step. `--faults` picks which of them happen.
//! - **Reloads**, one every `--reload-every` seconds through the admin API, in a cycle of three: the routing
//!   strategy changes (`PATCH /api/config`, through all seven), the breaker's thresholds change, a spare
//!   sim is added (`POST /api/workers`) or removed again (`DELETE /api/workers/sim-spare`).
//!
//! Every request is judged from the client's side ([`classify`]): a complete answer (JSON with `choices`,
//! or a stream of JSON events ending with `[DONE]`); a clean error (a 4xx/5xx with an OpenAI error body,
//! or a stream whose error event is followed by `[DONE]`); dropped by the client on purpose; or **lost**:
//! no answer within `--client-timeout` (hung), a connection or body cut short or a stream without
//! `[DONE]` (cut), anything else (garbled). The verdict: nothing lost; the gateway alive throughout, no
//! panic in its log, back to zero active requests once the load stops, exiting 0 on SIGTERM; its RSS and
//! fd count flat: the mean of the last third of the samples (after the first row's warm-up) at most
//! `--flat-bound` above the first third's.

use crate::faults::{self, HttpClient};
use crate::load;
use crate::procs::{binaries, fd_count, rss_kb, Proc};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Sims in the gateway's config from the start; sim-0 is the one killed and restarted.
const SIMS: usize = 4;
/// Largest answer the client reads before calling it garbled.
const MAX_BODY: usize = 4 << 20;
/// Lost requests whose detail is kept for the report.
const LOST_EXAMPLES: u64 = 40;
/// Clean errors of each kind whose detail is kept, to show what they looked like.
const ERROR_EXAMPLES: u64 = 3;
/// Every strategy, in the order the reloads switch to them.
const STRATEGIES: [&str; 7] =
    ["least_queue", "p2c_kv", "adaptive", "consistent_hash", "least_connections", "weighted", "round_robin"];

/// Options of `bench soak`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Mean arrivals per second (Poisson, open loop).
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Share of requests that stream (0..=1).
    #[arg(long, default_value_t = 0.6)]
    stream_share: f64,
    /// Share of streams the client drops after 1-8 events (0..=1).
    #[arg(long, default_value_t = 0.1)]
    drop_share: f64,
    /// Most requests outstanding at once; arrivals beyond are skipped (and counted).
    #[arg(long, default_value_t = 256)]
    max_outstanding: usize,
    /// Seconds a client waits for a whole answer before counting the request as hung.
    #[arg(long, default_value_t = 30)]
    client_timeout: u64,
    /// Seconds between two steps of the fault cycle.
    #[arg(long, default_value_t = 10)]
    fault_every: u64,
    /// Faults of the cycle to inject, comma-separated; the steps of the others stay quiet.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "errors,die,hang,kill")]
    faults: Vec<Fault>,
    /// Seconds between two reloads.
    #[arg(long, default_value_t = 20)]
    reload_every: u64,
    /// Seconds between two samples of RSS, fds and active requests.
    #[arg(long, default_value_t = 5)]
    sample_every: u64,
    /// Seconds between two rows of the table (a multiple of --sample-every).
    #[arg(long, default_value_t = 30)]
    report_every: u64,
    /// Largest allowed rise of the last third's mean RSS and fd count over the first third's (0.25 = 25%).
    #[arg(long, default_value_t = 0.25)]
    flat_bound: f64,
    /// Seed of arrivals, request mix and the sims.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// How one request ended, from the client's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// A complete answer.
    Ok,
    /// A 5xx with an OpenAI error body.
    Http5xx,
    /// A 4xx with an OpenAI error body.
    Http4xx,
    /// A stream that ended with an error event and `[DONE]`.
    StreamError,
    /// A stream the client closed on purpose.
    Dropped,
    /// No whole answer within the client timeout.
    Hung,
    /// No response, a body cut short, or a stream without `[DONE]`.
    Cut,
    /// Anything else: an unexpected body, an event that is not JSON, data after `[DONE]`.
    Garbled,
}

impl Cause {
    const ALL: [Cause; 8] = [
        Cause::Ok,
        Cause::Http5xx,
        Cause::Http4xx,
        Cause::StreamError,
        Cause::Dropped,
        Cause::Hung,
        Cause::Cut,
        Cause::Garbled,
    ];

    fn is_lost(self) -> bool {
        matches!(self, Cause::Hung | Cause::Cut | Cause::Garbled)
    }
}

/// Request counts so far, shared by the request tasks and the sampler.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    skipped: AtomicU64,
    ended: [AtomicU64; 8],
    /// Hung requests sent during a step in which sim-3 hung.
    hung_while_sim3_hung: AtomicU64,
    /// `(seconds since start, stream?, cause, detail)` of the first few of each failure cause.
    examples: Mutex<Vec<(f64, bool, Cause, String)>>,
}

impl Tally {
    async fn record(&self, t: Duration, stream: bool, cause: Cause, detail: String) {
        let n = self.ended[cause as usize].fetch_add(1, Ordering::Relaxed);
        let keep = if cause.is_lost() { LOST_EXAMPLES } else { ERROR_EXAMPLES };
        if cause != Cause::Ok && cause != Cause::Dropped && n < keep {
            self.examples.lock().await.push((t.as_secs_f64(), stream, cause, detail));
        }
    }

    fn counts(&self) -> [u64; 8] {
        Cause::ALL.map(|c| self.ended[c as usize].load(Ordering::Relaxed))
    }
}

/// The gateway seen at one instant.
#[derive(Clone)]
struct Sample {
    t: Duration,
    /// `None` once the process is gone.
    rss_kb: Option<u64>,
    fds: Option<u64>,
    /// `llm_gateway_active_requests`, `None` when `/metrics` did not answer.
    active: Option<f64>,
    sent: u64,
    counts: [u64; 8],
}

/// Scripted events that went as planned or not, for the summary.
#[derive(Default)]
struct Events {
    faults: AtomicU64,
    kills: AtomicU64,
    restarts: AtomicU64,
    reloads: AtomicU64,
    failed: AtomicU64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.duration >= 10, "--duration must be at least 10 seconds");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number");
    anyhow::ensure!((0.0..=1.0).contains(&args.stream_share), "--stream-share must be within 0..=1");
    anyhow::ensure!((0.0..=1.0).contains(&args.drop_share), "--drop-share must be within 0..=1");
    anyhow::ensure!(args.max_outstanding > 0, "--max-outstanding must be at least 1");
    anyhow::ensure!(
        args.fault_every > 0 && args.reload_every > 0 && args.sample_every > 0 && args.client_timeout > 0,
        "--fault-every, --reload-every, --sample-every and --client-timeout must be at least 1"
    );
    anyhow::ensure!(
        args.report_every >= args.sample_every && args.report_every.is_multiple_of(args.sample_every),
        "--report-every must be a multiple of --sample-every"
    );
    anyhow::ensure!(args.flat_bound >= 0.0, "--flat-bound must not be negative");
    let (gw_bin, sim_bin) = binaries()?;
    let dir = std::env::temp_dir().join(format!("llm-gateway-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut sims = Vec::new();
    for i in 0..SIMS {
        sims.push(Sim::start(&sim_bin, &dir, format!("sim-{i}"), 0, args.seed.wrapping_add(i as u64)).await?);
    }
    let spare = Sim::start(&sim_bin, &dir, "sim-spare".into(), 0, args.seed.wrapping_add(SIMS as u64)).await?;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, gateway_config(&sims))?;
    let config_arg = config.to_string_lossy().into_owned();
    let mut gw = Proc::spawn(&gw_bin, &["--config", config_arg.as_str()], &dir.join("gateway.out"), true)?;
    let base = gw.listening().await?;
    let pid = gw.pid();
    let client = load::client();
    faults::wait_healthy(&client, &base, SIMS).await?;

    println!(
        "soak: {}s through a real llm-gateway process (pid {pid}) over {SIMS} vllm-sim processes and a spare; \
         Poisson {} req/s, {:.0}% streamed, {:.0}% of the streams dropped by the client after 1-8 events, at \
         most {} outstanding, client timeout {}s, seed {}",
        args.duration,
        args.rate,
        100.0 * args.stream_share,
        100.0 * args.drop_share,
        args.max_outstanding,
        args.client_timeout,
        args.seed,
    );
    let faults: Vec<String> = args.faults.iter().map(|f| format!("{f:?}").to_lowercase()).collect();
    println!(
        "sims: ttft 20 ms, itl 6 ms, 16-48 output tokens, max_num_seqs 64; a fault step every {}s in a cycle of \
         six (sim-1 50% 500s, sim-2 dies after 4 tokens, sim-3 hangs, sim-0 SIGKILL, sim-0 restarted, quiet), \
         faults on: {}",
        args.fault_every,
        faults.join(",")
    );
    println!(
        "reloads every {}s in a cycle: strategy (PATCH /api/config), breaker thresholds (PATCH), sim-spare \
         added/removed (POST/DELETE /api/workers); gateway: defaults but health.interval_ms 500, log.level \
         warn; files in {}",
        args.reload_every,
        dir.display()
    );
    println!();
    println!(
        "| elapsed | sent | ok | 5xx | 4xx | stream error | dropped by client | lost (hung/cut/garbled) | in flight \
         | RSS MB | fds | gateway active |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");

    let start = Instant::now();
    let duration = Duration::from_secs(args.duration);
    let tally = Arc::new(Tally::default());
    let events = Arc::new(Events::default());
    let stop = Arc::new(AtomicBool::new(false));
    let fault_task = tokio::spawn(fault_script(
        sims,
        args.faults.clone(),
        sim_bin,
        dir.clone(),
        client.clone(),
        start,
        duration,
        Duration::from_secs(args.fault_every),
        Arc::clone(&events),
    ));
    let reload_task = tokio::spawn(reload_script(
        client.clone(),
        base.clone(),
        spare.url.clone(),
        start,
        duration,
        Duration::from_secs(args.reload_every),
        Arc::clone(&events),
    ));
    let sampler = tokio::spawn(sample_loop(
        client.clone(),
        base.clone(),
        pid,
        Arc::clone(&tally),
        start,
        Duration::from_secs(args.sample_every),
        args.report_every / args.sample_every,
        Arc::clone(&stop),
    ));

    offer_load(&client, &base, &args, start, duration, &tally).await?;
    let sims = fault_task.await?;
    reload_task.await?;
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampler.await?;

    // Once the clients are gone every guard must have been released.
    let drain_start = Instant::now();
    let mut active = metric(&client, &base, "llm_gateway_active_requests").await;
    while active != Some(0.0) && drain_start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        active = metric(&client, &base, "llm_gateway_active_requests").await;
    }
    let drained_in = drain_start.elapsed();
    let in_flight: Option<u64> = faults::get_json(&client, &format!("{base}/api/workers"))
        .await
        .ok()
        .map(|w| w.as_array().into_iter().flatten().filter_map(|w| w["in_flight"].as_u64()).sum());
    let retries = metric(&client, &base, "llm_gateway_retries_total").await;
    let counted = metric(&client, &base, "llm_gateway_requests_total").await;
    let last = sample(&client, &base, pid, &tally, start).await;
    print_row(&last);
    samples.push(last);

    let alive_at_end = gw.alive();
    let exit = terminate(&mut gw, Duration::from_secs(10)).await;
    drop(sims);
    drop(spare);
    let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
    let panics = log.lines().filter(|l| l.contains("panicked")).count();

    let counts = tally.counts();
    let count = |c: Cause| counts[c as usize];
    let lost: u64 = Cause::ALL.iter().filter(|c| c.is_lost()).map(|&c| count(c)).sum();
    let sent = tally.sent.load(Ordering::Relaxed);
    println!();
    println!(
        "requests: {sent} sent ({} arrivals skipped at the outstanding cap), {} ok ({:.2}%); clean errors: {} 5xx, \
         {} 4xx, {} streams ended by an error event and [DONE]; {} streams dropped by the client on purpose; \
         lost: {lost} ({} hung, {} of them sent while sim-3 hung; {} cut, {} garbled); the gateway counted {} \
         requests (llm_gateway_requests_total) and {} retries",
        tally.skipped.load(Ordering::Relaxed),
        count(Cause::Ok),
        100.0 * count(Cause::Ok) as f64 / sent.max(1) as f64,
        count(Cause::Http5xx),
        count(Cause::Http4xx),
        count(Cause::StreamError),
        count(Cause::Dropped),
        count(Cause::Hung),
        tally.hung_while_sim3_hung.load(Ordering::Relaxed),
        count(Cause::Cut),
        count(Cause::Garbled),
        counted.map_or("?".into(), |r| format!("{r:.0}")),
        retries.map_or("?".into(), |r| format!("{r:.0}")),
    );
    println!(
        "events: {} faults set, {} SIGKILLs, {} restarts, {} reloads accepted, {} scripted steps failed",
        events.faults.load(Ordering::Relaxed),
        events.kills.load(Ordering::Relaxed),
        events.restarts.load(Ordering::Relaxed),
        events.reloads.load(Ordering::Relaxed),
        events.failed.load(Ordering::Relaxed),
    );
    let examples = tally.examples.lock().await;
    for (t, stream, cause, detail) in examples.iter() {
        eprintln!("  {t:6.1}s  {:<10} {cause:?}: {detail}", if *stream { "stream" } else { "non-stream" });
    }
    drop(examples);

    // The first row's interval is warm-up (pools and buffers growing to the load); the last sample, after
    // the drain, is not under load.
    let warmup = Duration::from_secs(args.report_every);
    let periodic: Vec<&Sample> = samples.iter().filter(|s| s.t >= warmup && s.t <= duration).collect();
    let rss = flatness(&periodic, |s| s.rss_kb.map(|kb| kb as f64 / 1024.0));
    let fds = flatness(&periodic, |s| s.fds.map(|n| n as f64));
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} requests lost"));
    }
    if !alive_at_end || periodic.iter().any(|s| s.rss_kb.is_none()) {
        failures.push("the gateway process died".to_owned());
    }
    if panics > 0 {
        failures.push(format!("{panics} panics in the gateway's log"));
    }
    match active {
        Some(0.0) => {
            println!("after the load: gateway active requests 0 within {:.1}s", drained_in.as_secs_f64());
        }
        other => failures.push(format!("gateway active requests {other:?} 10 s after the load stopped")),
    }
    if in_flight != Some(0) {
        failures.push(format!("workers' in_flight sum {in_flight:?} after the load"));
    }
    for (what, unit, f) in [("RSS", "MB", &rss), ("fds", "", &fds)] {
        match f {
            Some(f) => {
                println!(
                    "{what} ({} samples from {}s to {}s): first third mean {:.1}{unit}, last third mean {:.1}{unit} \
                     ({:+.1}%, bound +{:.0}%); lowest {:.1}{unit} and {:.1}{unit}; highest {:.1}{unit}",
                    periodic.len(),
                    warmup.as_secs(),
                    args.duration,
                    f.first,
                    f.last,
                    100.0 * f.rise(),
                    100.0 * args.flat_bound,
                    f.first_min,
                    f.last_min,
                    f.max,
                );
                if f.rise() > args.flat_bound {
                    failures.push(format!("{what} rose {:+.1}%", 100.0 * f.rise()));
                }
            }
            None => failures.push(format!("too few {what} samples")),
        }
    }
    match exit {
        Some(0) => println!("gateway: alive throughout, {panics} panics in its log, exited 0 on SIGTERM"),
        other => failures.push(format!("gateway exit code on SIGTERM: {other:?}")),
    }
    if failures.is_empty() {
        println!("verdict: PASS (nothing lost, RSS and fds flat)");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    } else {
        println!("verdict: FAIL: {}", failures.join("; "));
        Err(anyhow::anyhow!("soak failed ({}); logs kept in {}", failures.join("; "), dir.display()))
    }
}

/// The gateway's config file: defaults, but loopback on an ephemeral port, faster probes, quieter logs.
fn gateway_config(sims: &[Sim]) -> String {
    let mut s = String::from(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\nshutdown_grace_secs = 5\n\n[health]\ninterval_ms = 500\n\n\
         [log]\nlevel = \"warn\"\n",
    );
    for sim in sims {
        s.push_str(&format!("\n[[workers]]\nurl = \"{}\"\nname = \"{}\"\n", sim.url, sim.name));
    }
    s
}

/// Sends SIGTERM and waits up to `within` for the exit code; SIGKILL after that.
async fn terminate(p: &mut Proc, within: Duration) -> Option<i32> {
    let sent = Command::new("kill").args(["-TERM", &p.pid().to_string()]).status().is_ok_and(|s| s.success());
    let deadline = Instant::now() + within;
    while sent && Instant::now() < deadline {
        match p.child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => break,
        }
    }
    p.kill();
    None
}

/// One `vllm-sim` process.
struct Sim {
    name: String,
    url: String,
    port: u16,
    seed: u64,
    proc: Proc,
}

impl Sim {
    /// Starts a sim on `port` (0: ephemeral) and waits until it listens.
    async fn start(bin: &Path, dir: &Path, name: String, port: u16, seed: u64) -> anyhow::Result<Sim> {
        let (port_arg, seed_arg) = (port.to_string(), seed.to_string());
        #[rustfmt::skip]
        let args = [
            "--host", "127.0.0.1", "--port", port_arg.as_str(), "--seed", seed_arg.as_str(),
            "--ttft-ms", "20", "--itl-ms", "6", "--output-tokens", "16-48", "--max-num-seqs", "64",
        ];
        let mut proc = Proc::spawn(bin, &args, &dir.join(format!("{name}.out")), false)?;
        let url = proc.listening().await?;
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).context("a port in the sim's URL")?;
        Ok(Sim { name, url, port, seed, proc })
    }

    /// Starts this sim again on its port, retrying for a few seconds while the port is released.
    async fn restart(&mut self, bin: &Path, dir: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Sim::start(bin, dir, self.name.clone(), self.port, self.seed).await {
                Ok(fresh) => {
                    *self = fresh;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// A fault of the cycle, for `--faults`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Fault {
    /// sim-1 answers half its requests with 500.
    Errors,
    /// sim-2's answers die after 4 tokens (connection aborted).
    Die,
    /// sim-3 accepts requests and never answers.
    Hang,
    /// sim-0 is killed with SIGKILL, and started again on its port one step later.
    Kill,
}

/// Faults, one step every `every` until `duration`, in the cycle of the module doc. Returns the sims
/// (dropping them kills them).
#[allow(clippy::too_many_arguments)]
async fn fault_script(
    mut sims: Vec<Sim>,
    enabled: Vec<Fault>,
    bin: PathBuf,
    dir: PathBuf,
    client: HttpClient,
    start: Instant,
    duration: Duration,
    every: Duration,
    events: Arc<Events>,
) -> Vec<Sim> {
    for step in 1u32.. {
        let at = every * step;
        if at >= duration {
            break;
        }
        tokio::time::sleep_until(start + at).await;
        let result = fault_step(step % 6, &mut sims, &enabled, &bin, &dir, &client, &events).await;
        let t = start.elapsed().as_secs_f64();
        match result {
            Ok(what) => eprintln!("  {t:6.1}s  fault: {what}"),
            Err(e) => {
                events.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("  {t:6.1}s  fault step failed: {e}");
            }
        }
    }
    sims
}

/// Step `phase` (0..6) of the fault cycle; a fault not in `enabled` is skipped. Answers what it did.
async fn fault_step(
    phase: u32,
    sims: &mut [Sim],
    enabled: &[Fault],
    bin: &Path,
    dir: &Path,
    client: &HttpClient,
    events: &Events,
) -> anyhow::Result<String> {
    let mut did = Vec::new();
    // Steps 2-4 first lift the fault of the step before (harmless when it was skipped).
    if (2..=4).contains(&phase) {
        let prev = &sims[phase as usize - 1];
        set_faults(client, prev, json!({})).await?;
        did.push(format!("{} healthy", prev.name));
    }
    let fault = match phase {
        1 => Some((Fault::Errors, json!({"error_rate": 0.5}))),
        2 => Some((Fault::Die, json!({"die_after_tokens": 4}))),
        3 => Some((Fault::Hang, json!({"hang": true}))),
        _ => None,
    };
    match fault {
        Some((f, body)) if enabled.contains(&f) => {
            // sim-1 errs, sim-2 dies, sim-3 hangs.
            let sim = &sims[phase as usize];
            set_faults(client, sim, body.clone()).await?;
            events.faults.fetch_add(1, Ordering::Relaxed);
            did.push(format!("{} {body}", sim.name));
        }
        Some(_) => {}
        None if phase == 4 && enabled.contains(&Fault::Kill) => {
            sims[0].proc.kill();
            events.kills.fetch_add(1, Ordering::Relaxed);
            did.push(format!("{} killed with SIGKILL", sims[0].name));
        }
        None if phase == 5 && !sims[0].proc.alive() => {
            sims[0].restart(bin, dir).await.with_context(|| format!("restarting {}", sims[0].name))?;
            events.restarts.fetch_add(1, Ordering::Relaxed);
            did.push(format!("{} restarted on port {}", sims[0].name, sims[0].port));
        }
        None => {}
    }
    Ok(if did.is_empty() { "quiet".to_owned() } else { did.join(", ") })
}

/// Replaces a sim's faults (`{}` lifts them all).
async fn set_faults(client: &HttpClient, sim: &Sim, faults: Value) -> anyhow::Result<()> {
    let (status, text) = send(client, http::Method::POST, &format!("{}/sim/faults", sim.url), Some(&faults)).await?;
    anyhow::ensure!(status.is_success(), "{} /sim/faults: {status} {text}", sim.name);
    Ok(())
}

/// Reloads through the admin API, one every `every` (offset by three quarters of it from the start so they
/// fall between faults), until `duration`.
async fn reload_script(
    client: HttpClient,
    base: String,
    spare_url: String,
    start: Instant,
    duration: Duration,
    every: Duration,
    events: Arc<Events>,
) {
    let mut spare_in = false;
    for step in 0u32.. {
        let at = every * step + every * 3 / 4;
        if at >= duration {
            return;
        }
        tokio::time::sleep_until(start + at).await;
        let round = (step / 3) as usize;
        let (what, method, url, body) = match step % 3 {
            0 => {
                let s = STRATEGIES[round % STRATEGIES.len()];
                (
                    format!("strategy {s}"),
                    http::Method::PATCH,
                    "/api/config".to_owned(),
                    json!({"routing": {"strategy": s}}),
                )
            }
            1 => {
                let (failures, slow_ms) = if round.is_multiple_of(2) { (3, 2000) } else { (5, 5000) };
                (
                    format!("breaker failure_threshold {failures}, slow_call_threshold_ms {slow_ms}"),
                    http::Method::PATCH,
                    "/api/config".to_owned(),
                    json!({"circuit_breaker": {"failure_threshold": failures, "slow_call_threshold_ms": slow_ms}}),
                )
            }
            _ if !spare_in => (
                "sim-spare added".to_owned(),
                http::Method::POST,
                "/api/workers".to_owned(),
                json!({"url": spare_url, "name": "sim-spare"}),
            ),
            _ => ("sim-spare removed".to_owned(), http::Method::DELETE, "/api/workers/sim-spare".to_owned(), json!({})),
        };
        // Every admin change, DELETE included, is sent as JSON: the gateway refuses others (cross-site).
        let result = send(&client, method.clone(), &format!("{base}{url}"), Some(&body)).await;
        let t = start.elapsed().as_secs_f64();
        match result {
            Ok((status, _)) if status.is_success() => {
                events.reloads.fetch_add(1, Ordering::Relaxed);
                if step % 3 == 2 {
                    spare_in = !spare_in;
                }
                eprintln!("  {t:6.1}s  reload: {what} ({status})");
            }
            Ok((status, text)) => {
                events.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "  {t:6.1}s  reload refused: {what}: {status} {}",
                    text.chars().take(200).collect::<String>()
                );
            }
            Err(e) => {
                events.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("  {t:6.1}s  reload failed: {what}: {e}");
            }
        }
    }
}

/// One JSON request with a 10 s limit; answers the status and body text.
async fn send(
    client: &HttpClient,
    method: http::Method,
    url: &str,
    body: Option<&Value>,
) -> anyhow::Result<(http::StatusCode, String)> {
    let mut req = http::Request::builder().method(method).uri(url.parse::<http::Uri>()?);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()))))?;
    let exchange = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.context("no answer within 10 s")?
}

/// The open loop: Poisson arrivals until `duration`, then waits for every request to end.
async fn offer_load(
    client: &HttpClient,
    base: &str,
    args: &Args,
    start: Instant,
    duration: Duration,
    tally: &Arc<Tally>,
) -> anyhow::Result<()> {
    let uri: http::Uri = format!("{base}/v1/chat/completions").parse()?;
    let timeout = Duration::from_secs(args.client_timeout);
    let (hang_on, fault_every) = (args.faults.contains(&Fault::Hang), args.fault_every);
    let slots = Arc::new(Semaphore::new(args.max_outstanding));
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut requests = JoinSet::new();
    let mut next = Duration::ZERO;
    loop {
        // Exponential inter-arrival times: a Poisson process at `rate`.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        next += Duration::from_secs_f64(-u.ln() / args.rate);
        if next >= duration {
            break;
        }
        tokio::time::sleep_until(start + next).await;
        while requests.try_join_next().is_some() {}
        let (stream, body) = faults::body(&mut rng, args.stream_share);
        let drop_after = (stream && rng.random_bool(args.drop_share)).then(|| rng.random_range(1..=8usize));
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tally.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let (client, uri, tally) = (client.clone(), uri.clone(), Arc::clone(tally));
        requests.spawn(async move {
            let sent_at = start.elapsed();
            let (cause, detail) = tokio::time::timeout(timeout, exchange(&client, uri, body, drop_after))
                .await
                .unwrap_or_else(|_| (Cause::Hung, format!("no whole answer within {timeout:?}")));
            if cause == Cause::Hung && hang_on && (sent_at.as_secs() / fault_every) % 6 == 3 {
                tally.hung_while_sim3_hung.fetch_add(1, Ordering::Relaxed);
            }
            tally.record(sent_at, stream, cause, detail).await;
            drop(permit);
        });
    }
    while let Some(r) = requests.join_next().await {
        r?;
    }
    Ok(())
}

/// Sends one request and reads the answer frame by frame; with `drop_after`, a stream is closed by the
/// client once that many events arrived.
async fn exchange(client: &HttpClient, uri: http::Uri, body: Bytes, drop_after: Option<usize>) -> (Cause, String) {
    let req = match http::Request::post(uri).header("content-type", "application/json").body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return (Cause::Garbled, format!("building the request: {e}")),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return (Cause::Cut, format!("no response: {e}")),
    };
    let status = resp.status();
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return (Cause::Cut, format!("{status}: body cut after {} bytes: {e}", buf.len())),
        };
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        if buf.len() > MAX_BODY {
            return (Cause::Garbled, format!("{status}: answer longer than {MAX_BODY} bytes"));
        }
        if let Some(k) = drop_after {
            if sse && events_in(&buf) >= k && !buf.windows(6).any(|w| w == b"[DONE]") {
                return (Cause::Dropped, String::new());
            }
        }
    }
    classify(status, sse, &buf)
}

/// SSE `data:` lines in `buf`.
fn events_in(buf: &[u8]) -> usize {
    buf.windows(5).filter(|w| *w == b"data:").count()
}

/// Judges a whole answer: complete, clean error, cut or garbled (see the module doc).
fn classify(status: http::StatusCode, sse: bool, body: &[u8]) -> (Cause, String) {
    let text = String::from_utf8_lossy(body);
    let snippet = |s: &str| s.chars().take(200).collect::<String>();
    if !status.is_success() {
        let clean = serde_json::from_slice::<Value>(body)
            .is_ok_and(|v| v["error"]["message"].is_string() && v["error"]["type"].is_string());
        let cause = match (clean, status.is_server_error(), status.is_client_error()) {
            (true, true, _) => Cause::Http5xx,
            (true, _, true) => Cause::Http4xx,
            _ => Cause::Garbled,
        };
        return (cause, format!("{status} {}", snippet(&text)));
    }
    if !sse {
        return match serde_json::from_slice::<Value>(body) {
            Ok(v) if v["choices"].is_array() => (Cause::Ok, String::new()),
            _ => (Cause::Garbled, format!("{status} without choices: {}", snippet(&text))),
        };
    }
    let (mut done, mut error) = (false, None);
    for line in text.lines() {
        let Some(payload) = line.strip_prefix("data:").map(str::trim) else { continue };
        if done {
            return (Cause::Garbled, format!("an event after [DONE]: {}", snippet(payload)));
        }
        if payload == "[DONE]" {
            done = true;
            continue;
        }
        match serde_json::from_str::<Value>(payload) {
            Ok(_) if error.is_some() => {
                return (Cause::Garbled, format!("an event after the error event: {}", snippet(payload)))
            }
            Ok(v) if v.get("error").is_some() => error = Some(snippet(payload)),
            Ok(_) => {}
            Err(_) => return (Cause::Garbled, format!("an event that is not JSON: {}", snippet(payload))),
        }
    }
    match (done, error) {
        (false, e) => {
            (Cause::Cut, format!("stream ended without [DONE]{}", e.map_or(String::new(), |e| format!(" after {e}"))))
        }
        (true, Some(e)) => (Cause::StreamError, e),
        (true, None) => (Cause::Ok, String::new()),
    }
}

/// Samples every `every` until `stop`, printing a row every `row_every` samples.
#[allow(clippy::too_many_arguments)]
async fn sample_loop(
    client: HttpClient,
    base: String,
    pid: u32,
    tally: Arc<Tally>,
    start: Instant,
    every: Duration,
    row_every: u64,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = vec![sample(&client, &base, pid, &tally, start).await];
    print_row(&samples[0]);
    for k in 1u32.. {
        tokio::time::sleep_until(start + every * k).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let s = sample(&client, &base, pid, &tally, start).await;
        if u64::from(k) % row_every == 0 {
            print_row(&s);
        }
        samples.push(s);
    }
    samples
}

async fn sample(client: &HttpClient, base: &str, pid: u32, tally: &Tally, start: Instant) -> Sample {
    let t = start.elapsed();
    let (rss_kb, fds) = (rss_kb(pid), fd_count(pid));
    let active = metric(client, base, "llm_gateway_active_requests").await;
    Sample { t, rss_kb, fds, active, sent: tally.sent.load(Ordering::Relaxed), counts: tally.counts() }
}

/// The sum of the series of `name` in the gateway's `/metrics`.
async fn metric(client: &HttpClient, base: &str, name: &str) -> Option<f64> {
    let (status, text) = send(client, http::Method::GET, &format!("{base}/metrics"), None).await.ok()?;
    if !status.is_success() {
        return None;
    }
    series_sum(&text, name)
}

/// The sum of every series of `name` in a Prometheus text (the one series when unlabelled).
fn series_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value = match rest.strip_prefix(' ') {
            Some(v) => v,
            None if rest.starts_with('{') => match rest.rsplit_once("} ") {
                Some((_, v)) => v,
                None => continue,
            },
            None => continue,
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

fn print_row(s: &Sample) {
    let c = |cause: Cause| s.counts[cause as usize];
    let ended: u64 = s.counts.iter().sum();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    println!(
        "| {:.0}s | {} | {} | {} | {} | {} | {} | {} ({}/{}/{}) | {} | {} | {} | {} |",
        s.t.as_secs_f64(),
        s.sent,
        c(Cause::Ok),
        c(Cause::Http5xx),
        c(Cause::Http4xx),
        c(Cause::StreamError),
        c(Cause::Dropped),
        c(Cause::Hung) + c(Cause::Cut) + c(Cause::Garbled),
        c(Cause::Hung),
        c(Cause::Cut),
        c(Cause::Garbled),
        s.sent.saturating_sub(ended),
        opt(s.rss_kb.map(|kb| format!("{:.1}", kb as f64 / 1024.0))),
        opt(s.fds.map(|n| n.to_string())),
        opt(s.active.map(|a| format!("{a:.0}"))),
    );
}

/// First-third and last-third means and minima of a sampled value, and its maximum.
struct Flatness {
    first: f64,
    last: f64,
    first_min: f64,
    last_min: f64,
    max: f64,
}

impl Flatness {
    /// Relative rise of the last third's mean over the first third's.
    fn rise(&self) -> f64 {
        self.last / self.first.max(f64::MIN_POSITIVE) - 1.0
    }
}

fn flatness(samples: &[&Sample], value: impl Fn(&Sample) -> Option<f64>) -> Option<Flatness> {
    let values: Vec<f64> = samples.iter().filter_map(|s| value(s)).collect();
    let third = values.len() / 3;
    if third == 0 {
        return None;
    }
    let (head, tail) = (&values[..third], &values[values.len() - third..]);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    Some(Flatness {
        first: mean(head),
        last: mean(tail),
        first_min: min(head),
        last_min: min(tail),
        max: values.iter().copied().fold(f64::MIN, f64::max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    const CHUNK: &str = r#"{"choices":[{"delta":{"content":"hi"}}]}"#;
    const ERROR: &str = r#"{"error":{"message":"upstream died","type":"upstream_error","param":null,"code":null}}"#;

    fn stream(events: &[&str]) -> Vec<u8> {
        events.iter().map(|e| format!("data: {e}\n\n")).collect::<String>().into_bytes()
    }

    #[test]
    fn complete_answers_are_ok() {
        assert_eq!(classify(StatusCode::OK, false, br#"{"choices":[]}"#).0, Cause::Ok);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[CHUNK, CHUNK, "[DONE]"])).0, Cause::Ok);
    }

    #[test]
    fn clean_errors_need_an_openai_body_or_an_error_event_then_done() {
        assert_eq!(classify(StatusCode::BAD_GATEWAY, false, ERROR.as_bytes()).0, Cause::Http5xx);
        assert_eq!(classify(StatusCode::TOO_MANY_REQUESTS, false, ERROR.as_bytes()).0, Cause::Http4xx);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[CHUNK, ERROR, "[DONE]"])).0, Cause::StreamError);
    }

    #[test]
    fn anything_else_is_lost() {
        assert_eq!(classify(StatusCode::BAD_GATEWAY, false, b"upstream connect error").0, Cause::Garbled);
        assert_eq!(classify(StatusCode::OK, false, b"{\"id\":1}").0, Cause::Garbled);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[CHUNK, CHUNK])).0, Cause::Cut);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[CHUNK, ERROR])).0, Cause::Cut);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[CHUNK, "{\"choi", "[DONE]"])).0, Cause::Garbled);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[CHUNK, "[DONE]", CHUNK])).0, Cause::Garbled);
        assert_eq!(classify(StatusCode::OK, true, &stream(&[ERROR, CHUNK, "[DONE]"])).0, Cause::Garbled);
        assert!(Cause::ALL.iter().filter(|c| c.is_lost()).eq([Cause::Hung, Cause::Cut, Cause::Garbled].iter()));
    }

    #[test]
    fn series_sum_adds_labelled_series() {
        let text = "# HELP x\nllm_a_total{s=\"200\"} 3\nllm_a_total{s=\"5}0\"} 2\nllm_a_totals 9\nllm_b 1.5\n";
        assert_eq!(series_sum(text, "llm_a_total"), Some(5.0));
        assert_eq!(series_sum(text, "llm_b"), Some(1.5));
        assert_eq!(series_sum(text, "llm_c"), None);
    }

    #[test]
    fn flatness_compares_thirds() {
        let at = |rss_kb| Sample {
            t: Duration::ZERO,
            rss_kb: Some(rss_kb),
            fds: None,
            active: None,
            sent: 0,
            counts: [0; 8],
        };
        let samples: Vec<Sample> = [10240, 10240, 20480, 20480, 15360, 15360].into_iter().map(at).collect();
        let refs: Vec<&Sample> = samples.iter().collect();
        let f = flatness(&refs, |s| s.rss_kb.map(|kb| kb as f64 / 1024.0)).unwrap();
        assert_eq!((f.first, f.last, f.first_min, f.last_min, f.max), (10.0, 15.0, 10.0, 15.0, 20.0));
        assert!((f.rise() - 0.5).abs() < 1e-9);
        assert!(flatness(&refs, |s| s.fds.map(|n| n as f64)).is_none());
    }
}
