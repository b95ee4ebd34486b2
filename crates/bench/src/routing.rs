//! `bench routing`: our routing strategies against the peer routers (sglang-router and vllm-router with
//! `--policy cache_aware`), per scenario, on the same vllm-sim workers and the same workload bytes.
//!
//! vllm-sim is ours, so a bench we design can flatter us: the scenarios ([`scenario`]) are chosen to break
//! our design, each in another way, and the peers run in the same run under the same conditions. Every
//! router run gets fresh worker processes (`target/release/vllm-sim`, so caches and counters start cold)
//! and a fresh router process: `target/release/llm-gateway --strategy S` with its default config (the
//! bench's environment passes through, so `LLM_QUEUE_ENABLED=false` and the like reach it), or a peer from
//! the bench's own virtualenv ([`peers`]). The client ([`drive`]) replays the scenario's workload; the
//! cache hit rate and the share per worker come from the sims' own counters, read before and after.
//!
//! One markdown table per scenario: router, TTFT p50/p99, completed req/s, prefix-cache hit rate, share
//! per worker, errors. `--repeat N` runs every router N times and shows the median with the [min-max]
//! range, which is the run-to-run noise to read differences against.
//!
//! Layout: `scenario` (fleets, workloads, loads), `drive` (sending and timing, sim counters), `procs`
//! (child processes and their logs), `peers` (the peer routers' venv and command lines).

mod drive;
mod peers;
mod procs;
mod scenario;

use crate::workload::{self, Corpus, Kind};
use drive::{Counters, HttpClient, Outcome, Sample};
use peers::Peer;
use procs::Proc;
use scenario::{Load, Scenario};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Options of `bench routing`.
#[derive(clap::Args)]
pub struct Args {
    /// Scenarios to run, comma-separated: tight, roomy, skewed, hetero, bursts.
    #[arg(long, value_delimiter = ',', default_value = "tight,roomy,skewed,hetero,bursts")]
    scenario: Vec<String>,
    /// Our strategies to run, comma-separated (any of `routing.strategy`); `S+KEY=VALUE` runs S with that
    /// environment variable set for the gateway (e.g. `p2c_kv+LLM_QUEUE_ENABLED=false`), `+` repeatable.
    #[arg(long, value_delimiter = ',', default_value = "round_robin,p2c_kv")]
    strategies: Vec<String>,
    /// Peer routers to run, comma-separated: sglang, vllm, or none.
    #[arg(long, value_delimiter = ',', default_value = "sglang,vllm")]
    peers: Vec<String>,
    /// Seconds of load per router run.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Runs per router (fresh sims each); above 1 the table shows the median and the [min-max] range.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Seed of the workloads and the sims.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Closed-loop clients, replacing each closed-loop scenario's own number.
    #[arg(long)]
    clients: Option<usize>,
    /// The peers' virtualenv, created and filled with pip when missing.
    #[arg(long, default_value = ".venv-bench")]
    venv: PathBuf,
    /// Directory holding the `vllm-sim` and `llm-gateway` binaries (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for the child processes' logs and each run's per-request samples (`TAG-samples.csv`: end, conversation, system prompt, turn, worker, TTFT, tokens, queue position or error).
    #[arg(long, default_value = "target/bench-routing")]
    logs: PathBuf,
    /// Open loop: most requests in flight; arrivals beyond it are dropped and counted as errors.
    #[arg(long, default_value_t = 2000)]
    max_outstanding: usize,
}

/// A router under test.
#[derive(Clone, Debug)]
enum Router {
    /// llm-gateway with this `routing.strategy` and these extra environment variables.
    Ours(String, Vec<(String, String)>),
    /// A peer, with its version or why it cannot run.
    Peer(Peer, Result<String, String>),
}

impl Router {
    fn label(&self) -> String {
        match self {
            Router::Ours(s, env) if env.is_empty() => format!("ours {s}"),
            Router::Ours(s, env) => {
                let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("ours {s} ({})", env.join(", "))
            }
            Router::Peer(p, Ok(v)) => format!("{} {v} cache_aware", p.package()),
            Router::Peer(p, Err(_)) => format!("{} cache_aware", p.package()),
        }
    }

    fn slug(&self) -> String {
        match self {
            Router::Ours(s, env) => {
                let mut slug = format!("ours-{s}");
                for (k, v) in env {
                    slug.push_str(&format!("-{k}-{v}"));
                }
                slug.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
            }
            Router::Peer(p, _) => p.short().to_owned(),
        }
    }
}

/// What one router run measured.
struct RunResult {
    ttft_p50: Duration,
    ttft_p99: Duration,
    rps: f64,
    hit_rate: f64,
    /// Requests finished per worker (sims' counters).
    share: Vec<f64>,
    errors: BTreeMap<&'static str, u64>,
    /// Share of completed requests that were cold (the worker held less than half their prompt), and
    /// the TTFT p50 of those, against the p99 of the warm rest: where a tail comes from.
    cold: (f64, Duration, Duration),
}

/// Where the binaries and logs are.
struct Env {
    sim: PathBuf,
    gateway: PathBuf,
    logs: PathBuf,
    venv: PathBuf,
    client: HttpClient,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.duration > 0 && args.repeat > 0, "--duration and --repeat must be at least 1");
    let scenarios: Vec<Scenario> = args
        .scenario
        .iter()
        .map(|n| {
            scenario::by_name(n.trim(), args.seed).ok_or_else(|| {
                anyhow::anyhow!("unknown scenario {n:?}; expected one of {}", scenario::NAMES.join(", "))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut routers = Vec::new();
    for s in &args.strategies {
        routers.push(parse_ours(s)?);
    }
    let mut wanted_peers = Vec::new();
    for p in args.peers.iter().map(|p| p.trim()).filter(|p| !p.is_empty() && *p != "none") {
        let peer = Peer::ALL.iter().copied().find(|x| x.short() == p);
        wanted_peers.push(peer.ok_or_else(|| anyhow::anyhow!("unknown peer {p:?}; expected sglang, vllm or none"))?);
    }
    let env = environment(&args)?;

    for peer in wanted_peers {
        let version = peers::ensure(&env.venv, peer).await;
        match &version {
            Ok(v) => println!("peer: {} {v} (venv {})", peer.package(), env.venv.display()),
            Err(e) => println!("peer: {} unavailable: {e}", peer.package()),
        }
        routers.push(Router::Peer(peer, version));
    }
    println!(
        "routing: {} scenario(s), {} router(s), {} s per run, {} run(s) per router; seed {}; logs in {}",
        scenarios.len(),
        routers.len(),
        args.duration,
        args.repeat,
        args.seed,
        env.logs.display()
    );

    for sc in &scenarios {
        run_scenario(&env, &args, sc, &routers).await?;
    }
    if args.repeat == 1 {
        println!("Noise: these are single runs; `--repeat N` runs each router N times on fresh sims and shows the");
        println!("median with its [min-max] range. Read differences smaller than that range as noise.");
    }
    Ok(())
}

/// `strategy[+KEY=VALUE]...`.
fn parse_ours(spec: &str) -> anyhow::Result<Router> {
    let mut parts = spec.trim().split('+');
    let strategy = parts.next().unwrap_or("").trim();
    strategy.parse::<routing::Strategy>().map_err(anyhow::Error::msg)?;
    let mut env = Vec::new();
    for kv in parts {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("{kv:?} in --strategies is not KEY=VALUE"))?;
        env.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Router::Ours(strategy.to_owned(), env))
}

fn environment(args: &Args) -> anyhow::Result<Env> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("cannot locate the bench binary's directory"))?,
    };
    let (sim, gateway) = (bin_dir.join("vllm-sim"), bin_dir.join("llm-gateway"));
    for b in [&sim, &gateway] {
        anyhow::ensure!(
            b.exists(),
            "{} is missing: build the binaries first (cargo build --release --workspace --bins)",
            b.display()
        );
    }
    std::fs::create_dir_all(&args.logs)?;
    let logs = std::fs::canonicalize(&args.logs)?;
    let cwd = std::env::current_dir()?;
    Ok(Env { sim, gateway, logs, venv: cwd.join(&args.venv), client: crate::load::client() })
}

async fn run_scenario(env: &Env, args: &Args, sc: &Scenario, routers: &[Router]) -> anyhow::Result<()> {
    let corpus = Corpus::new(sc.shape.clone());
    let prompt_tokens: u64 =
        corpus.systems().iter().map(|p| u64::from(vllm_sim::tokenizer::count_tokens(p.as_bytes()))).sum();
    let load = match (sc.load, args.clients) {
        (Load::Closed { .. }, Some(c)) => Load::Closed { clients: c.max(1) },
        (l, _) => l,
    };
    println!();
    println!("### Scenario `{}`", sc.name);
    println!();
    println!("{}.", sc.about);
    println!();
    for (i, s) in sc.fleet.iter().enumerate() {
        println!("- sim-{i}: {}", s.describe());
    }
    println!("- workload: {}", sc.shape.describe());
    println!(
        "- distinct system-prompt tokens in play: {prompt_tokens} (sim-0's KV holds {} tokens)",
        sc.fleet[0].kv_blocks * scenario::BLOCK_SIZE
    );
    let arrivals = match load {
        Load::Closed { clients } => {
            println!("- load: closed loop, {clients} clients, {} s", args.duration);
            None
        }
        Load::Open { rate, streams } => {
            let a = workload::open_loop(&corpus, streams, rate, Duration::from_secs(args.duration));
            println!(
                "- load: open loop, {} req/s with {} s bursts of {} req/s every {} s over {streams} client streams; \
                 {} arrivals in {} s",
                rate.base,
                rate.burst_len.as_secs_f64(),
                rate.burst,
                rate.period.as_secs_f64(),
                a.len(),
                args.duration
            );
            Some(Arc::new(a))
        }
    };
    println!();

    let mut rows: Vec<(String, Result<Vec<RunResult>, String>)> = Vec::new();
    for router in routers {
        let mut runs = Vec::new();
        let mut failure = None;
        if let Router::Peer(_, Err(why)) = router {
            failure = Some(format!("not installed: {why}"));
        }
        for rep in 0..args.repeat {
            if failure.is_some() {
                break;
            }
            let tag = format!("{}-{}-{rep}", sc.name, router.slug());
            match run_once(env, args, sc, router, &corpus, load, arrivals.as_ref(), &tag).await {
                Ok(r) => {
                    eprintln!(
                        "  {} / {} run {}: {:.1} req/s, TTFT p50 {} p99 {}, hit {:.2}, errors {}; \
                         cold {:.0}% (TTFT p50 {}), warm p99 {}",
                        sc.name,
                        router.label(),
                        rep + 1,
                        r.rps,
                        ms(r.ttft_p50),
                        ms(r.ttft_p99),
                        r.hit_rate,
                        errors_cell(&r.errors),
                        r.cold.0 * 100.0,
                        ms(r.cold.1),
                        ms(r.cold.2),
                    );
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!("  {} / {} run {}: FAILED: {e:#}", sc.name, router.label(), rep + 1);
                    failure = Some(format!("{e:#}"));
                }
            }
        }
        rows.push((router.label(), failure.map_or(Ok(runs), Err)));
    }
    print_table(sc, &rows, args.repeat);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    env: &Env,
    args: &Args,
    sc: &Scenario,
    router: &Router,
    corpus: &Arc<Corpus>,
    load: Load,
    arrivals: Option<&Arc<Vec<workload::Arrival>>>,
    tag: &str,
) -> anyhow::Result<RunResult> {
    // Fresh workers: cold caches, zeroed counters.
    let mut sims = Vec::new();
    let mut urls = Vec::new();
    for (i, spec) in sc.fleet.iter().enumerate() {
        let mut a = vec!["--host".to_owned(), "127.0.0.1".to_owned(), "--port".to_owned(), "0".to_owned()];
        a.extend(spec.args(args.seed.wrapping_add(i as u64)));
        let log = env.logs.join(format!("{tag}-sim-{i}.log"));
        let mut p = Proc::spawn(&format!("sim-{i}"), &env.sim, &a, &[], &log, &env.logs)?;
        urls.push(p.announced_url("vllm-sim listening on", Duration::from_secs(10)).await?);
        sims.push(p);
    }
    let result = async {
        let (mut proc, url, ready_path) = start_router(env, router, &urls, tag).await?;
        let out = async {
            wait_ready(&env.client, &url, ready_path, urls.len(), &mut proc).await?;
            let samples_csv = env.logs.join(format!("{tag}-samples.csv"));
            measure(env, args, &urls, &url, corpus, load, arrivals, &samples_csv).await
        }
        .await;
        // A router that died mid-run says why (unless the error already did).
        let out = out.map_err(|e| match proc.ensure_running() {
            Err(exited) if !format!("{e:#}").contains(" exited (") => e.context(exited),
            _ => e,
        });
        proc.stop().await;
        out
    }
    .await;
    for s in sims {
        s.stop().await;
    }
    result
}

/// Starts the router process; returns it, its base URL and the path that reports its healthy workers.
async fn start_router(
    env: &Env,
    router: &Router,
    workers: &[String],
    tag: &str,
) -> anyhow::Result<(Proc, String, &'static str)> {
    let log = env.logs.join(format!("{tag}-router.log"));
    match router {
        Router::Ours(strategy, vars) => {
            let a = vec![
                "--host".to_owned(),
                "127.0.0.1".to_owned(),
                "--port".to_owned(),
                "0".to_owned(),
                "--workers".to_owned(),
                workers.join(","),
                "--strategy".to_owned(),
                strategy.clone(),
            ];
            let mut p = Proc::spawn("llm-gateway", &env.gateway, &a, vars, &log, &env.logs)?;
            let url = p.announced_url("llm-gateway listening on", Duration::from_secs(20)).await?;
            Ok((p, url, "/health"))
        }
        Router::Peer(peer, _) => {
            let (port, metrics_port) = (procs::free_port()?, procs::free_port()?);
            let (program, a) = peer.command(&env.venv, workers, port, metrics_port);
            let p = Proc::spawn(peer.package(), &program, &a, &[], &log, &env.logs)?;
            Ok((p, format!("http://127.0.0.1:{port}"), "/readiness"))
        }
    }
}

/// Polls `url + path` until its JSON says `healthy_workers` is `n` (our `/health`, the peers'
/// `/readiness`), failing early when the process exits.
async fn wait_ready(client: &HttpClient, url: &str, path: &str, n: usize, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        proc.ensure_running()?;
        if let Ok((_, body)) = drive::get(client, &format!("{url}{path}")).await {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["healthy_workers"].as_u64() == Some(n as u64) {
                return Ok(());
            }
            last = body.chars().take(200).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("not ready within 60 s (last {path}: {last:?}): {}", proc.log_tail(3))
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    env: &Env,
    args: &Args,
    sims: &[String],
    url: &str,
    corpus: &Arc<Corpus>,
    load: Load,
    arrivals: Option<&Arc<Vec<workload::Arrival>>>,
    samples_csv: &std::path::Path,
) -> anyhow::Result<RunResult> {
    let duration = Duration::from_secs(args.duration);
    let before = read_counters(&env.client, sims).await?;
    let (samples, dropped) = match (load, arrivals) {
        (Load::Closed { clients }, _) => (drive::closed_loop(&env.client, url, corpus, clients, duration).await?, 0),
        (Load::Open { .. }, Some(a)) => drive::open_loop(&env.client, url, a, duration, args.max_outstanding).await?,
        (Load::Open { .. }, None) => anyhow::bail!("open loop without a schedule"),
    };
    let after = read_counters(&env.client, sims).await?;
    write_samples(samples_csv, &samples)?;
    let delta: Vec<Counters> = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
    Ok(summarise(&samples, dropped, &delta, duration))
}

/// Every request's end and TTFT (or error), one CSV line each, so a tail can be placed in time.
fn write_samples(path: &std::path::Path, samples: &[Sample]) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut out = String::from(
        "done_ms,conversation,system,turn,worker_port,ttft_ms,prompt_tokens,cached_tokens,queue_position,error\n",
    );
    for s in samples {
        let done = s.done.as_millis();
        // One-offs have no conversation or system prompt: left empty.
        let (conversation, system, turn) = match s.kind {
            Kind::Turn { stream, conversation, system, turn } => {
                (format!("{stream}-{conversation}"), system.to_string(), turn.to_string())
            }
            Kind::OneOff => (String::new(), String::new(), String::new()),
        };
        let _ = match s.outcome {
            Outcome::Ok { ttft, tokens: (prompt, cached), queued, worker_port } => {
                writeln!(
                    out,
                    "{done},{conversation},{system},{turn},{worker_port},{},{prompt},{cached},{queued},",
                    ttft.as_millis()
                )
            }
            Outcome::Err(kind) => writeln!(out, "{done},{conversation},{system},{turn},,,,,,{kind}"),
        };
    }
    std::fs::write(path, out)?;
    Ok(())
}

async fn read_counters(client: &HttpClient, sims: &[String]) -> anyhow::Result<Vec<Counters>> {
    let mut out = Vec::with_capacity(sims.len());
    for s in sims {
        out.push(drive::counters(client, s).await?);
    }
    Ok(out)
}

/// Completed requests are those that reached `[DONE]` within the run; TTFT quantiles are over them.
fn summarise(samples: &[Sample], dropped: u64, delta: &[Counters], duration: Duration) -> RunResult {
    let mut ttfts: Vec<Duration> = samples
        .iter()
        .filter(|s| s.done <= duration)
        .filter_map(|s| match s.outcome {
            Outcome::Ok { ttft, .. } => Some(ttft),
            Outcome::Err(_) => None,
        })
        .collect();
    ttfts.sort_unstable();
    let (mut cold, mut warm): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for s in samples.iter().filter(|s| s.done <= duration) {
        if let Outcome::Ok { ttft, tokens: (prompt, cached), .. } = s.outcome {
            if cached.saturating_mul(2) < prompt {
                cold.push(ttft)
            } else {
                warm.push(ttft)
            }
        }
    }
    cold.sort_unstable();
    warm.sort_unstable();
    let mut errors = BTreeMap::new();
    for s in samples {
        if let Outcome::Err(kind) = s.outcome {
            *errors.entry(kind).or_insert(0) += 1;
        }
    }
    if dropped > 0 {
        errors.insert("dropped", dropped);
    }
    let hits: f64 = delta.iter().map(|c| c.hits).sum();
    let queries: f64 = delta.iter().map(|c| c.queries).sum();
    RunResult {
        ttft_p50: quantile(&ttfts, 0.5),
        ttft_p99: quantile(&ttfts, 0.99),
        rps: ttfts.len() as f64 / duration.as_secs_f64(),
        hit_rate: hits / queries.max(1.0),
        share: delta.iter().map(|c| c.requests).collect(),
        errors,
        cold: (cold.len() as f64 / ttfts.len().max(1) as f64, quantile(&cold, 0.5), quantile(&warm, 0.99)),
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn errors_cell(errors: &BTreeMap<&'static str, u64>) -> String {
    if errors.is_empty() {
        return "0".to_owned();
    }
    errors.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}

/// `median` alone for one run, `median [min-max]` for several.
fn spread(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let Some((&lo, &hi)) = v.first().zip(v.last()) else { return "-".to_owned() };
    let median = v[v.len() / 2];
    if v.len() == 1 {
        fmt(median)
    } else {
        format!("{} [{}-{}]", fmt(median), fmt(lo), fmt(hi))
    }
}

fn print_table(sc: &Scenario, rows: &[(String, Result<Vec<RunResult>, String>)], repeat: usize) {
    let names: Vec<String> = (0..sc.fleet.len()).map(|i| format!("sim-{i}")).collect();
    println!();
    if repeat > 1 {
        println!("Median of {repeat} runs per router, [min-max] beside it; shares and errors summed over the runs:");
        println!();
    }
    println!(
        "| router | TTFT p50 | TTFT p99 | completed req/s | prefix-cache hit | share {} (%) | errors |",
        names.join("/")
    );
    println!("|---|---|---|---|---|---|---|");
    let msf = |v: f64| format!("{v:.0}");
    for (label, result) in rows {
        let runs = match result {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => {
                println!("| {label} | - | - | - | - | - | no run |");
                continue;
            }
            Err(why) => {
                let why: String = why.replace('|', "/").chars().take(300).collect();
                println!("| {label} | - | - | - | - | - | did not run: {why} |");
                continue;
            }
        };
        let col = |f: &dyn Fn(&RunResult) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let mut share = vec![0.0; sc.fleet.len()];
        for r in runs {
            for (s, v) in share.iter_mut().zip(&r.share) {
                *s += v;
            }
        }
        let total: f64 = share.iter().sum();
        let share: Vec<String> = share.iter().map(|s| format!("{:.0}", 100.0 * s / total.max(1.0))).collect();
        let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
        for r in runs {
            for (k, v) in &r.errors {
                *errors.entry(k).or_insert(0) += v;
            }
        }
        println!(
            "| {label} | {} ms | {} ms | {} | {} | {} | {} |",
            spread(&col(&|r| r.ttft_p50.as_secs_f64() * 1000.0), msf),
            spread(&col(&|r| r.ttft_p99.as_secs_f64() * 1000.0), msf),
            spread(&col(&|r| r.rps), |v| format!("{v:.1}")),
            spread(&col(&|r| r.hit_rate), |v| format!("{v:.2}")),
            share.join("/"),
            errors_cell(&errors),
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_completed_within_the_run_and_reads_the_sims() {
        let ok = |ms: u64, done: u64| Sample {
            done: Duration::from_secs(done),
            kind: Kind::OneOff,
            outcome: Outcome::Ok { ttft: Duration::from_millis(ms), tokens: (0, 0), queued: 0, worker_port: 0 },
        };
        let samples = vec![
            ok(100, 1),
            ok(300, 2),
            ok(200, 3),
            ok(900, 11), // after the run's end: not completed within it
            Sample { done: Duration::from_secs(4), kind: Kind::OneOff, outcome: Outcome::Err("503") },
        ];
        let delta = vec![
            Counters { hits: 50.0, queries: 100.0, requests: 3.0 },
            Counters { hits: 0.0, queries: 100.0, requests: 1.0 },
        ];
        let mut samples = samples;
        // ok(300, 2) was served cold: the worker held 10 of its 100 prompt tokens.
        if let Outcome::Ok { tokens, .. } = &mut samples[1].outcome {
            *tokens = (100, 10);
        }
        let r = summarise(&samples, 2, &delta, Duration::from_secs(10));
        assert!((r.cold.0 - 1.0 / 3.0).abs() < 1e-9, "one of three completed was cold");
        assert_eq!((r.cold.1, r.cold.2), (Duration::from_millis(300), Duration::from_millis(200)));
        assert_eq!(r.ttft_p50, Duration::from_millis(200));
        assert_eq!(r.ttft_p99, Duration::from_millis(300));
        assert!((r.rps - 0.3).abs() < 1e-9);
        assert!((r.hit_rate - 0.25).abs() < 1e-9);
        assert_eq!(r.share, vec![3.0, 1.0]);
        assert_eq!(errors_cell(&r.errors), "1 503, 2 dropped");
    }

    #[test]
    fn strategies_take_environment_settings() {
        let r = parse_ours("p2c_kv+LLM_QUEUE_ENABLED=false").unwrap();
        assert_eq!(r.label(), "ours p2c_kv (LLM_QUEUE_ENABLED=false)");
        assert_eq!(r.slug(), "ours-p2c_kv-LLM_QUEUE_ENABLED-false");
        assert_eq!(parse_ours(" round_robin ").unwrap().label(), "ours round_robin");
        assert!(parse_ours("nope").is_err());
        assert!(parse_ours("p2c_kv+NOEQUALS").is_err());
    }

    #[test]
    fn spread_shows_the_range_only_for_several_runs() {
        let f = |v: f64| format!("{v:.0}");
        assert_eq!(spread(&[5.0], f), "5");
        assert_eq!(spread(&[7.0, 5.0, 6.0], f), "6 [5-7]");
        assert_eq!(spread(&[], f), "-");
    }
}
