//! Gateway overhead beside nginx: the same closed-loop load against the same vllm-sim, directly, through
//! nginx and through the gateway, in one run, with each proxy's CPU time per request read from its own
//! processes (`/proc/<pid>/stat`), so a ratio is what the gateway costs next to the proxy people would
//! otherwise use, on this machine, at this moment.
//!
//! Every piece is its own process: the sim (`vllm-sim`), the gateway (`llm-gateway` with a generated
//! config, round robin by default as nginx is), nginx (master and 2 workers), and this bench, the load
//! generator. Phases, each with fresh proxies in front of a sim made for it:
//! - **non-stream**: a 1 KB chat request, 16 output tokens, a sim with no latency, at each concurrency;
//!   `--rounds` alternations of the peers, each measured for `--duration` in `--slices` turns; each
//!   round starts with the next peer, so every peer takes every place in turn ([`turns`]).
//! - **stream**: `--streams` concurrent SSE streams of 64 events 5 ms apart: time to first byte.
//! - **memory**: the gateway's RSS idle (after start) and with `--open-streams` streams held open at once
//!   on a slow sim; the clients speak HTTP/2 (100 streams per connection), because this container's hard
//!   limit of open files per process (20000) cannot hold 10k client and 10k upstream sockets in one process.
//!
//! With nginx and the gateway among the peers, the run ends with the gateway's figures set against the
//! overhead goal ([`goal`]).

pub mod floor;
mod goal;
mod nginx;

use crate::load;
use crate::procs::{binaries, cpu_time, cpu_times, rss_kb, sched_wait, Proc};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Options of `bench overhead`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrency levels of the non-streamed runs, comma-separated (`0`: none, only the other phases).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    concurrency: Vec<usize>,
    /// Measured runs per peer and level, the peers alternating, each round starting one peer later
    /// (with 2 or 3 a median is one round's luck: the rounds' spread is as wide as the goal's margins).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Slices each non-streamed run is cut into, the peers taking turns slice by slice, so that a few
    /// seconds of a slower machine (this 2-core VM has them) fall on every peer of the round alike.
    #[arg(long, default_value_t = 5)]
    slices: u32,
    /// Concurrent streams of the time-to-first-byte run (0: skip it).
    #[arg(long, default_value_t = 50)]
    streams: usize,
    /// Streams held open at once for the memory figure (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    open_streams: usize,
    /// Which peers to run: `direct` (the sim alone), `nginx`, `hyper` (a bare hyper proxy, the stack's
    /// floor), `gateway`.
    #[arg(long, value_delimiter = ',', default_value = "direct,nginx,gateway")]
    peers: Vec<String>,
    /// The gateway's routing strategy (nginx's is round robin).
    #[arg(long, default_value = "round_robin")]
    strategy: String,
    /// Turn off the per-request log line of both proxies (the gateway's `request` line, nginx's access log).
    #[arg(long)]
    no_log: bool,
    /// The `llm-gateway` binary measured as the peer `gateway` (default: the one beside this bench; the
    /// shipped build is `scripts/build-pgo.sh`'s `target/pgo/llm-gateway`).
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Another `llm-gateway` binary (an older build, say) to run beside the gateway as the peer `baseline`.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Keep the gateway running after the non-streamed runs for this many seconds (to attach a profiler).
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

/// One proxy (or none) in front of the sim.
#[derive(Clone, Copy, PartialEq)]
enum PeerKind {
    Direct,
    Nginx,
    Hyper,
    Gateway,
    Baseline,
}

impl PeerKind {
    fn name(self) -> &'static str {
        match self {
            PeerKind::Direct => "direct",
            PeerKind::Nginx => "nginx",
            PeerKind::Hyper => "hyper",
            PeerKind::Gateway => "gateway",
            PeerKind::Baseline => "baseline",
        }
    }

    /// Whether its CPU and throughput are shown as ratios to nginx's: every proxy but nginx itself.
    fn beside_nginx(self) -> bool {
        matches!(self, PeerKind::Hyper | PeerKind::Gateway | PeerKind::Baseline)
    }
}

/// A running peer: its URL and the processes whose CPU time it costs (none for direct).
struct Peer {
    kind: PeerKind,
    url: String,
    h2_url: String,
    _proc: Option<Proc>,
    nginx: Option<nginx::Nginx>,
    pid: Option<u32>,
}

impl Peer {
    fn pids(&self) -> Vec<u32> {
        match (&self.nginx, self.pid) {
            (Some(n), _) => n.pids(),
            (None, Some(pid)) => vec![pid],
            (None, None) => Vec::new(),
        }
    }

    /// User and system CPU time of the peer's processes so far.
    fn cpu(&self) -> (Duration, Duration) {
        self.pids()
            .into_iter()
            .filter_map(cpu_times)
            .fold((Duration::ZERO, Duration::ZERO), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    fn rss_kb(&self) -> u64 {
        self.pids().into_iter().filter_map(rss_kb).sum()
    }

    /// The run-queue wait and timeslices of the peer's threads so far.
    fn sched(&self) -> Sched {
        self.pids().into_iter().map(Sched::of).fold(Sched::default(), Sched::plus)
    }
}

/// Time spent runnable but not running, over how many times a thread got a CPU (see `sched_wait`).
#[derive(Clone, Copy, Default)]
struct Sched {
    wait: Duration,
    slices: u64,
}

impl Sched {
    /// `pid`'s threads so far (nothing once it is gone).
    fn of(pid: u32) -> Sched {
        sched_wait(pid).map_or(Sched::default(), |(wait, slices)| Sched { wait, slices })
    }

    fn plus(self, other: Sched) -> Sched {
        Sched { wait: self.wait + other.wait, slices: self.slices + other.slices }
    }

    fn since(self, before: Sched) -> Sched {
        Sched { wait: self.wait.saturating_sub(before.wait), slices: self.slices.saturating_sub(before.slices) }
    }

    /// The mean wait from being woken to running, `µs`.
    fn per_slice(&self) -> String {
        format!("{:.0} µs", self.wait.as_secs_f64() * 1e6 / self.slices.max(1) as f64)
    }
}

/// Binaries and the temp dir every process of the run writes its files to.
struct Setup {
    gateway: PathBuf,
    sim: PathBuf,
    nginx: PathBuf,
    baseline: Option<PathBuf>,
    dir: PathBuf,
    strategy: String,
    log: bool,
}

impl Setup {
    /// A sim started with `args`, and its `http://host:port`.
    async fn sim(&self, name: &str, args: &[&str]) -> anyhow::Result<(Proc, String)> {
        let mut all = vec!["--host", "127.0.0.1", "--port", "0"];
        all.extend_from_slice(args);
        let mut proc = Proc::spawn(&self.sim, &all, &self.dir.join(format!("{name}.out")), false)?;
        let url = proc.listening().await?;
        Ok((proc, url))
    }

    async fn peer(&self, kind: PeerKind, sim_url: &str, tag: &str) -> anyhow::Result<Peer> {
        match kind {
            PeerKind::Direct => Ok(Peer {
                kind,
                url: sim_url.to_owned(),
                h2_url: sim_url.to_owned(),
                _proc: None,
                nginx: None,
                pid: None,
            }),
            PeerKind::Nginx => {
                let backend = sim_url.trim_start_matches("http://");
                let n =
                    nginx::Nginx::start(&self.nginx, &self.dir.join(format!("nginx-{tag}")), backend, self.log).await?;
                Ok(Peer { kind, url: n.url.clone(), h2_url: n.h2_url.clone(), _proc: None, nginx: Some(n), pid: None })
            }
            PeerKind::Hyper => {
                let out = self.dir.join(format!("hyper-{tag}.out"));
                let me = std::env::current_exe()?;
                let mut proc = Proc::spawn(&me, &["hyper-proxy", "--upstream", sim_url], &out, true)?;
                let url = proc.listening().await?;
                let pid = proc.pid();
                Ok(Peer { kind, h2_url: url.clone(), url, _proc: Some(proc), nginx: None, pid: Some(pid) })
            }
            PeerKind::Gateway | PeerKind::Baseline => {
                let bin = match (kind, &self.baseline) {
                    (PeerKind::Baseline, Some(b)) => b,
                    _ => &self.gateway,
                };
                let tag = format!("{}-{tag}", kind.name());
                let config = self.dir.join(format!("{tag}.toml"));
                std::fs::write(&config, self.gateway_config(sim_url))?;
                let config = config.to_string_lossy().into_owned();
                let out = self.dir.join(format!("{tag}.out"));
                let mut proc = Proc::spawn(bin, &["--config", &config], &out, true)?;
                let url = proc.listening().await?;
                let pid = proc.pid();
                Ok(Peer { kind, h2_url: url.clone(), url, _proc: Some(proc), nginx: None, pid: Some(pid) })
            }
        }
    }

    /// Defaults (breakers, queue, metrics, the request log line at `info` to its own file), but loopback
    /// on an ephemeral port, the bench's strategy, and room for the memory run's client connections.
    fn gateway_config(&self, sim_url: &str) -> String {
        let level = if self.log { "info" } else { "warn" };
        format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\nshutdown_grace_secs = 1\nmax_connections = 16384\n\n\
             [routing]\nstrategy = \"{}\"\n\n[log]\nlevel = \"{level}\"\n\n[[workers]]\nurl = \"{sim_url}\"\n",
            self.strategy
        )
    }
}

/// A chat request of about 1 KB.
fn chat_body(stream: bool, max_tokens: u32) -> Bytes {
    let content = "Tell me how a load balancer spreads requests over a fleet of inference servers. ".repeat(11);
    Bytes::from(
        serde_json::json!({
            "model": "demo-model",
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": content},
            ],
        })
        .to_string(),
    )
}

/// A level, a peer, and each round's (CPU per request, rps) ratios to nginx's.
type Ratios = (usize, PeerKind, Vec<(f64, f64)>);

/// One measured load run against a peer, with the CPU its processes and this bench used meanwhile.
struct Measured {
    report: load::Report,
    /// The peer's user and system CPU time during the run.
    peer_cpu: (Duration, Duration),
    bench_cpu: Duration,
    /// What the sim behind the peer used meanwhile: a proxy can make its backend work harder.
    sim_cpu: Duration,
    /// How long the peer's threads, the sim's and this bench's waited for a CPU once woken.
    peer_sched: Sched,
    sim_sched: Sched,
    bench_sched: Sched,
}

impl Measured {
    /// Two slices of one peer's run as one.
    fn merge(self, other: Measured) -> Measured {
        Measured {
            report: self.report.merge(other.report),
            peer_cpu: (self.peer_cpu.0 + other.peer_cpu.0, self.peer_cpu.1 + other.peer_cpu.1),
            bench_cpu: self.bench_cpu + other.bench_cpu,
            sim_cpu: self.sim_cpu + other.sim_cpu,
            peer_sched: self.peer_sched.plus(other.peer_sched),
            sim_sched: self.sim_sched.plus(other.sim_sched),
            bench_sched: self.bench_sched.plus(other.bench_sched),
        }
    }

    fn cpu_per_request(&self) -> Duration {
        (self.peer_cpu.0 + self.peer_cpu.1).div_f64(self.report.ok.max(1) as f64)
    }

    /// `total µs (user + system)` per request.
    fn cpu_split(&self) -> String {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / self.report.ok.max(1) as f64;
        format!(
            "{:.1} µs ({:.1} + {:.1})",
            per(self.peer_cpu.0 + self.peer_cpu.1),
            per(self.peer_cpu.0),
            per(self.peer_cpu.1)
        )
    }
}

async fn measure(peer: &Peer, sim: u32, body: &Bytes, conc: usize, duration: Duration) -> anyhow::Result<Measured> {
    let url = format!("{}/v1/chat/completions", peer.url);
    load::run(&url, body.clone(), conc, Duration::from_millis(500)).await?;
    let me = std::process::id();
    let (cpu0, own0, sim0) = (peer.cpu(), cpu_time(me).unwrap_or_default(), cpu_time(sim).unwrap_or_default());
    let (sched0, sim_sched0, own_sched0) = (peer.sched(), Sched::of(sim), Sched::of(me));
    let report = load::run(&url, body.clone(), conc, duration).await?;
    let (cpu1, own1, sim1) = (peer.cpu(), cpu_time(me).unwrap_or_default(), cpu_time(sim).unwrap_or_default());
    let (sched1, sim_sched1, own_sched1) = (peer.sched(), Sched::of(sim), Sched::of(me));
    let peer_cpu = (cpu1.0.saturating_sub(cpu0.0), cpu1.1.saturating_sub(cpu0.1));
    Ok(Measured {
        report,
        peer_cpu,
        bench_cpu: own1.saturating_sub(own0),
        sim_cpu: sim1.saturating_sub(sim0),
        peer_sched: sched1.since(sched0),
        sim_sched: sim_sched1.since(sim_sched0),
        bench_sched: own_sched1.since(own_sched0),
    })
}

/// The order peers are measured in at `round`: each round starts one peer later, so every peer takes
/// every place in the round in turn. In one fixed order, an A/A run (one build as two peers) found the
/// copy measured later 2-3% behind in CPU and throughput, in 6 rounds of 7; in turns the copies agreed.
fn turns(peers: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..peers).map(move |i| (i + round) % peers)
}

/// The median (the upper one of an even count), least and greatest of `values`: `None` when empty.
fn median_range<T: Copy>(mut values: Vec<T>, cmp: impl Fn(&T, &T) -> std::cmp::Ordering) -> Option<(T, T, T)> {
    values.sort_by(cmp);
    Some((*values.get(values.len() / 2)?, *values.first()?, *values.last()?))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (beside, sim) = binaries()?;
    let gateway = args.gateway.clone().unwrap_or(beside);
    let kinds: Vec<PeerKind> =
        [PeerKind::Direct, PeerKind::Nginx, PeerKind::Hyper, PeerKind::Baseline, PeerKind::Gateway]
            .into_iter()
            .filter(|k| {
                args.peers.iter().any(|p| p == k.name()) || (*k == PeerKind::Baseline && args.baseline.is_some())
            })
            .collect();
    let nginx_bin = if kinds.contains(&PeerKind::Nginx) { nginx::binary()? } else { PathBuf::from("nginx") };
    let dir = std::env::temp_dir().join(format!("llm-gateway-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let setup = Setup {
        gateway,
        sim,
        nginx: nginx_bin,
        baseline: args.baseline.clone(),
        dir,
        strategy: args.strategy.clone(),
        log: !args.no_log,
    };
    let duration = Duration::from_secs(args.duration);
    println!(
        "overhead: {} vs llm-gateway ({}; {}, request log {}), {} rounds of {}s, files in {}",
        nginx::version(&setup.nginx),
        setup.gateway.display(),
        args.strategy,
        if setup.log { "on, nginx access log on" } else { "off, nginx access log off" },
        args.rounds,
        args.duration,
        setup.dir.display()
    );

    // Non-streamed: a sim with no latency and 16 output tokens.
    let (sim, sim_url) = setup
        .sim(
            "sim-fast",
            &[
                "--ttft-ms",
                "0",
                "--itl-ms",
                "0",
                "--prefill-ms-per-1k-tokens",
                "0",
                "--output-tokens",
                "16-16",
                "--max-num-seqs",
                "1024",
            ],
        )
        .await?;
    let mut peers = Vec::new();
    for &k in &kinds {
        peers.push(setup.peer(k, &sim_url, "fast").await?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle: Vec<(PeerKind, u64)> =
        peers.iter().filter(|p| p.kind != PeerKind::Direct).map(|p| (p.kind, p.rss_kb())).collect();
    let levels: Vec<usize> = args.concurrency.iter().copied().filter(|&c| c > 0).collect();
    if !levels.is_empty() {
        println!("\nnon-streamed: 1 KB chat POST, 16 output tokens, sim with no latency; CPU per request from each peer's own processes");
        println!("| round | conc | peer | rps | p50 | p99 | errors | CPU/req (user + sys) | CPU/req vs nginx | rps vs nginx | bench CPU/req | sim CPU/req |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    let body = chat_body(false, 16);
    let mut goal = goal::Goal::default();
    // Per level and peer: each round's (CPU per request, rps) ratios to nginx's of the same round.
    let mut ratios: Vec<Ratios> = Vec::new();
    for &conc in &levels {
        for round in 1..=args.rounds {
            let slices = args.slices.max(1);
            let mut runs: Vec<Option<Measured>> = peers.iter().map(|_| None).collect();
            for _ in 0..slices {
                for i in turns(peers.len(), round) {
                    let (peer, run) = (&peers[i], &mut runs[i]);
                    let m = measure(peer, sim.pid(), &body, conc, duration / slices).await?;
                    *run = Some(match run.take() {
                        Some(before) => before.merge(m),
                        None => m,
                    });
                }
            }
            let mut nginx: Option<(f64, f64)> = None;
            for (peer, m) in peers.iter().zip(runs) {
                let Some(m) = m else { continue };
                let cpu = m.cpu_per_request().as_secs_f64();
                if peer.kind == PeerKind::Nginx {
                    nginx = Some((cpu, m.report.rps()));
                }
                if let Some(n) = nginx.as_ref().filter(|_| peer.kind.beside_nginx()) {
                    let ratio = (cpu / n.0.max(1e-12), m.report.rps() / n.1.max(1e-12));
                    match ratios.iter_mut().find(|r| r.0 == conc && r.1 == peer.kind) {
                        Some(r) => r.2.push(ratio),
                        None => ratios.push((conc, peer.kind, vec![ratio])),
                    }
                }
                let vs = |f: fn(&(f64, f64)) -> f64, x: f64| match nginx.as_ref().filter(|_| peer.kind.beside_nginx()) {
                    Some(n) => format!("{:.2}", x / f(n).max(1e-12)),
                    None => "".into(),
                };
                let direct = peer.kind == PeerKind::Direct;
                if peer.kind == PeerKind::Gateway {
                    goal.errors += m.report.errors;
                }
                println!(
                    "| {round} | {conc} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    peer.kind.name(),
                    m.report.rps(),
                    ms(m.report.quantile(0.5)),
                    ms(m.report.quantile(0.99)),
                    m.report.errors,
                    if direct { "-".into() } else { m.cpu_split() },
                    vs(|n| n.0, cpu),
                    vs(|n| n.1, m.report.rps()),
                    us(m.bench_cpu.div_f64(m.report.ok.max(1) as f64)),
                    us(m.sim_cpu.div_f64(m.report.ok.max(1) as f64)),
                );
            }
        }
    }
    if !ratios.is_empty() {
        println!("\nratios to nginx of the same round: median (min-max over {} rounds)", args.rounds);
        println!("| conc | peer | CPU/req vs nginx | rps vs nginx |");
        println!("|---|---|---|---|");
        for (conc, kind, rs) in &ratios {
            let column = |f: fn(&(f64, f64)) -> f64| median_range(rs.iter().map(f).collect(), f64::total_cmp);
            let (cpu, rps) = (column(|r| r.0), column(|r| r.1));
            if let (PeerKind::Gateway, Some(cpu), Some(rps)) = (kind, cpu, rps) {
                goal.levels.push((*conc, cpu.0, rps.0));
            }
            let spread = |m: Option<(f64, f64, f64)>| match m {
                Some((median, lo, hi)) => format!("{median:.2} ({lo:.2}-{hi:.2})"),
                None => "-".into(),
            };
            println!("| {conc} | {} | {} | {} |", kind.name(), spread(cpu), spread(rps));
        }
    }
    if args.hold > 0 {
        for p in &peers {
            println!("{} pids {:?} at {}", p.kind.name(), p.pids(), p.url);
        }
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    drop(peers);

    if args.streams > 0 {
        stream_run(&setup, &kinds, args.streams, args.rounds, duration, &mut goal).await?;
    }
    println!("\nmemory: RSS (all of a peer's processes)");
    println!("| peer | idle | with {} open streams | streams open |", args.open_streams);
    println!("|---|---|---|---|");
    for (kind, idle_kb) in idle {
        let (open_kb, open) =
            if args.open_streams > 0 { open_streams(&setup, kind, args.open_streams).await? } else { (0, 0) };
        println!(
            "| {} | {:.1} MB | {:.1} MB | {open} |",
            kind.name(),
            idle_kb as f64 / 1024.0,
            open_kb as f64 / 1024.0
        );
        if kind == PeerKind::Gateway {
            goal.idle_mb = Some(idle_kb as f64 / 1024.0);
            goal.open = (args.open_streams > 0).then(|| (open_kb as f64 / 1024.0, open, args.open_streams));
        }
    }
    if kinds.contains(&PeerKind::Nginx) && kinds.contains(&PeerKind::Gateway) {
        goal.print();
    }
    Ok(())
}

/// `streams` closed loops of SSE streams (64 events, 5 ms apart): time to first byte and CPU per stream.
async fn stream_run(
    setup: &Setup,
    kinds: &[PeerKind],
    streams: usize,
    rounds: usize,
    duration: Duration,
    goal: &mut goal::Goal,
) -> anyhow::Result<()> {
    let (sim, sim_url) = setup
        .sim(
            "sim-stream",
            &[
                "--ttft-ms",
                "0",
                "--itl-ms",
                "5",
                "--prefill-ms-per-1k-tokens",
                "0",
                "--output-tokens",
                "64-64",
                "--max-num-seqs",
                "1024",
            ],
        )
        .await?;
    let mut peers = Vec::new();
    for &k in kinds {
        peers.push(setup.peer(k, &sim_url, "stream").await?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = chat_body(true, 64);
    println!("\nstreamed: {streams} concurrent SSE streams of 64 events 5 ms apart (sim: no time to first token)");
    println!(
        "| round | peer | streams/s | TTFB p50 | TTFB p99 | stream p50 | errors | CPU/stream (user + sys) | \
         wait for a CPU once woken: peer / sim / bench |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // Per peer, each round's TTFB p50 and nginx's of the same round.
    let mut ttfb: Vec<Vec<(Duration, Option<Duration>)>> = peers.iter().map(|_| Vec::new()).collect();
    // Per peer, every round's streams as one report.
    let mut pooled: Vec<Option<load::Report>> = peers.iter().map(|_| None).collect();
    for round in 1..=rounds {
        let mut runs: Vec<Option<Measured>> = peers.iter().map(|_| None).collect();
        for i in turns(peers.len(), round) {
            runs[i] = Some(measure(&peers[i], sim.pid(), &body, streams, duration).await?);
        }
        let nginx = peers.iter().zip(&runs).find(|(p, _)| p.kind == PeerKind::Nginx);
        let nginx = nginx.and_then(|(_, m)| m.as_ref()).map(|m| m.report.first_byte_quantile(0.5));
        for (((peer, seen), all), m) in peers.iter().zip(ttfb.iter_mut()).zip(pooled.iter_mut()).zip(runs) {
            let Some(m) = m else { continue };
            let r = &m.report;
            let first_byte = r.first_byte_quantile(0.5);
            seen.push((first_byte, nginx.filter(|_| peer.kind.beside_nginx())));
            let direct = peer.kind == PeerKind::Direct;
            println!(
                "| {round} | {} | {:.0} | {} | {} | {} | {} | {} | {} / {} / {} |",
                peer.kind.name(),
                r.rps(),
                ms(first_byte),
                ms(r.first_byte_quantile(0.99)),
                ms(r.quantile(0.5)),
                r.errors,
                if direct { "-".into() } else { m.cpu_split() },
                if direct { "-".into() } else { m.peer_sched.per_slice() },
                m.sim_sched.per_slice(),
                m.bench_sched.per_slice(),
            );
            if peer.kind == PeerKind::Gateway {
                goal.errors += r.errors;
            }
            *all = Some(match all.take() {
                Some(before) => before.merge(m.report),
                None => m.report,
            });
        }
    }
    println!(
        "\nTTFB p50 over {rounds} rounds: median (min-max), the rounds at or below nginx's of the same round, \
         and quantiles of every round's streams together"
    );
    println!("| peer | TTFB p50 | at or below nginx's | all streams: p10 | p25 | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    // (median of the rounds, all streams) of the gateway and of nginx, for the goal.
    let (mut gateway_ttfb, mut nginx_ttfb) = (None, None);
    for ((peer, seen), all) in peers.iter().zip(&ttfb).zip(&pooled) {
        let compared: Vec<bool> = seen.iter().filter_map(|&(p50, nginx)| nginx.map(|n| p50 <= n)).collect();
        let below = if compared.is_empty() {
            String::new()
        } else {
            format!("{} of {}", compared.iter().filter(|&&b| b).count(), compared.len())
        };
        let rounds = median_range(seen.iter().map(|s| s.0).collect(), Duration::cmp);
        let spread = match rounds {
            Some((median, lo, hi)) => format!("{} ({}-{})", ms(median), ms(lo), ms(hi)),
            None => "-".into(),
        };
        let at = |q| all.as_ref().map_or(Duration::ZERO, |r| r.first_byte_quantile(q));
        let p50 = at(0.5);
        println!(
            "| {} | {spread} | {below} | {} | {} | {} | {} | {} |",
            peer.kind.name(),
            ms(at(0.1)),
            ms(at(0.25)),
            ms(p50),
            ms(at(0.9)),
            ms(at(0.99))
        );
        let figures = rounds.map(|r| (r.0, p50));
        match peer.kind {
            PeerKind::Gateway => gateway_ttfb = figures,
            PeerKind::Nginx => nginx_ttfb = figures,
            _ => {}
        }
    }
    if let (Some(g), Some(n)) = (gateway_ttfb, nginx_ttfb) {
        goal.ttfb = Some(goal::Ttfb { gateway_rounds: g.0, nginx_rounds: n.0, gateway_all: g.1, nginx_all: n.1 });
    }
    Ok(())
}

/// Opens `n` streams at once through a fresh `kind` peer in front of a slow sim (an event every 500 ms),
/// over HTTP/2 connections of 100 streams each, and returns the peer's RSS once they are all open (or
/// after 60 s) and how many opened.
async fn open_streams(setup: &Setup, kind: PeerKind, n: usize) -> anyhow::Result<(u64, usize)> {
    let seqs = (n + 1000).to_string();
    let blocks = (n * 64).to_string();
    let (_sim, sim_url) = setup
        .sim(
            "sim-slow",
            &[
                "--ttft-ms",
                "0",
                "--itl-ms",
                "500",
                "--prefill-ms-per-1k-tokens",
                "0",
                "--output-tokens",
                "200-200",
                "--max-num-seqs",
                &seqs,
                "--max-num-queued",
                &seqs,
                "--kv-blocks",
                &blocks,
            ],
        )
        .await?;
    let peer = setup.peer(kind, &sim_url, "open").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let uri: http::Uri = format!("{}/v1/chat/completions", peer.h2_url).parse()?;
    let body = chat_body(true, 200);
    let opened = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let opening = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..n.div_ceil(100) {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<Full<Bytes>>();
        for _ in 0..(n - c * 100).min(100) {
            let (client, uri, body) = (client.clone(), uri.clone(), body.clone());
            let (opened, release, opening) = (Arc::clone(&opened), Arc::clone(&release), Arc::clone(&opening));
            tasks.spawn(async move {
                let permit = opening.acquire_owned().await;
                let req = http::Request::post(uri)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .expect("static request parts are valid");
                let Ok(resp) = client.request(req).await else { return };
                if !resp.status().is_success() {
                    return;
                }
                let mut body = resp.into_body();
                // Open once the first event arrived.
                if !matches!(body.frame().await, Some(Ok(_))) {
                    return;
                }
                drop(permit);
                opened.fetch_add(1, Ordering::Relaxed);
                let notified = release.notified();
                tokio::pin!(notified);
                loop {
                    tokio::select! {
                        _ = &mut notified => return,
                        f = body.frame() => if !matches!(f, Some(Ok(_))) { return },
                    }
                }
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = peer.rss_kb();
    let open = opened.load(Ordering::Relaxed);
    release.notify_waiters();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(peer);
    Ok((rss, open))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_measure_every_peer_once_and_start_each_round_elsewhere() {
        let orders: Vec<Vec<usize>> = (1..=3).map(|round| turns(3, round).collect()).collect();
        assert_eq!(orders, [[1, 2, 0], [2, 0, 1], [0, 1, 2]]);
    }

    #[test]
    fn median_range_sorts_first() {
        assert_eq!(median_range(vec![3.0, 1.0, 2.0, 5.0, 4.0], f64::total_cmp), Some((3.0, 1.0, 5.0)));
        assert_eq!(median_range(vec![4, 1, 3, 2], u32::cmp), Some((3, 1, 4)), "the upper median of an even count");
        assert_eq!(median_range(Vec::<u32>::new(), u32::cmp), None);
    }
}
