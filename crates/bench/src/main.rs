//! End-to-end benchmarks of llm-gateway against vllm-sim, each printing one table.
//!
//! `cargo run --release -p bench -- overhead`: the gateway's added latency and CPU cost per request,
//! measured as direct-to-worker versus through-the-gateway in one run.
//!
//! `cargo run --release -p bench -- routing`: our strategies against sglang-router and vllm-router on the
//! same vllm-sim processes and workload bytes, per scenario (tight caches at saturation, roomy, skewed,
//! heterogeneous, bursts): TTFT, completed req/s, prefix-cache hit rate, share per worker, errors.
//!
//! `cargo run --release -p bench -- faults`: steady load over three sims while one is killed and restarted
//! and another turns slow: requests sent, succeeded, failed by cause, retries, breaker opens, p50/p99.
//!
//! `cargo run --release -p bench -- soak`: ten minutes of mixed traffic through a real gateway process
//! while its workers fail and its config is reloaded: requests by outcome, RSS and fds over time, a verdict.
//!
//! `cargo run --release -p bench -- batch`: live TTFT p50/p99 on a busy fleet with and without a large
//! batch running, and the batch's lines per second against the fleet's capacity.

mod batch;
mod faults;
mod load;
mod overhead;
mod procs;
mod replicas;
mod routing;
mod soak;
mod workload;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "End-to-end benchmarks of llm-gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Direct vs through-the-gateway against a zero-latency vllm-sim: rps, p50, p99 and their ratio.
    Overhead(overhead::Args),
    /// Our strategies and the peer routers per scenario: TTFT p50/p99, req/s, cache hits, shares, errors.
    Routing(routing::Args),
    /// A worker killed and restarted, another slow, under steady load: failures by cause, retries, p99.
    Faults(faults::Args),
    /// Ten minutes of mixed traffic, worker faults and hot reloads: nothing lost, RSS and fds flat.
    Soak(soak::Args),
    /// Live TTFT with and without a large batch running; the batch's lines/s against fleet capacity.
    Batch(batch::Args),
    /// Shared worker slots (`[cluster]` in Redis): cost per request, and two replicas on a saturated fleet.
    Replicas(replicas::Args),
    /// A bare hyper reverse proxy to one worker: the floor `bench overhead --peers hyper` measures.
    #[command(hide = true)]
    HyperProxy(overhead::floor::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Overhead(args) => overhead::run(args).await,
            Cmd::Routing(args) => routing::run(args).await,
            Cmd::Faults(args) => faults::run(args).await,
            Cmd::Soak(args) => soak::run(args).await,
            Cmd::Batch(args) => batch::run(args).await,
            Cmd::Replicas(args) => replicas::run(args).await,
            Cmd::HyperProxy(args) => overhead::floor::run(args).await,
        }
    })
}
