//! The command line of `llm-gateway`: with no subcommand it serves; subcommands talk to a running gateway
//! through its admin API ([`remote`]) or put load on it ([`loadtest`]).
//!
//! Every subcommand prints human-readable text and exits non-zero with one line on stderr when it fails.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

pub mod batch;
pub mod loadtest;
pub mod remote;

/// OpenAI-compatible load-balancing gateway for self-hosted LLM inference.
#[derive(Debug, Parser)]
#[command(name = "llm-gateway", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A subcommand; without one the gateway serves.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving options.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Options of the server (the default mode).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (default: config/gateway.toml when present; also LLM_CONFIG).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address to listen on (server.host).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (server.port).
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
    /// Worker base URLs, comma-separated (replaces `[[workers]]`).
    #[arg(long, value_delimiter = ',')]
    pub workers: Option<Vec<String>>,
    /// Routing strategy (routing.strategy).
    #[arg(long)]
    pub strategy: Option<String>,
    /// Start N simulated vLLM workers in-process and route to them (default 3).
    #[arg(long, num_args = 0..=1, default_missing_value = "3", value_name = "N")]
    pub demo: Option<usize>,
}

impl ServeArgs {
    /// The flags that outrank config file and environment.
    pub fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides {
            host: self.host.clone(),
            port: self.port,
            workers: self.workers.clone(),
            strategy: self.strategy.clone(),
        }
    }
}

/// Subcommands that talk to a running gateway.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Whether the gateway at --url is healthy.
    Health(Remote),
    /// Version, uptime, strategy, worker and request counts.
    Status(Remote),
    /// The workers and their live load, as a table.
    Workers(Remote),
    /// Status and workers, refreshed every --interval seconds until Ctrl-C.
    Watch(WatchArgs),
    /// Stop sending new requests to a worker (in-flight ones finish).
    Drain(WorkerArgs),
    /// Send new requests to a drained worker again.
    Undrain(WorkerArgs),
    /// Show the running config (secrets redacted), or change it with --set KEY=VALUE.
    Config(ConfigArgs),
    /// Closed-loop load on a gateway's /v1/chat/completions, then a latency and throughput report.
    Loadtest(loadtest::LoadtestArgs),
    /// The Batch API: submit a JSONL file, list, status, cancel, results.
    #[command(subcommand)]
    Batch(batch::BatchCommand),
}

/// Where the running gateway is.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://localhost:9000", env = "LLM_GATEWAY_URL")]
    pub url: String,
    /// Admin token for mutations (admin.token).
    #[arg(long, env = "LLM_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
}

/// `watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// The gateway.
    #[command(flatten)]
    pub remote: Remote,
    /// Seconds between refreshes.
    #[arg(long, short = 'n', default_value_t = 1.0)]
    pub interval: f64,
}

/// `drain` and `undrain`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The worker: its name or numeric id (see `llm-gateway workers`).
    #[arg(value_name = "ID")]
    pub id: String,
    /// The gateway.
    #[command(flatten)]
    pub remote: Remote,
}

/// `config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Change a key: dotted path = value, the value read as JSON when it parses, else as a string
    /// (`--set routing.strategy=p2c_kv --set health.interval_ms=500`). Repeatable; applied together.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The gateway.
    #[command(flatten)]
    pub remote: Remote,
}

/// Runs a subcommand; the exit code says whether it succeeded.
pub async fn run(cmd: Command) -> ExitCode {
    let result = match cmd {
        Command::Health(r) => remote::health(&r).await,
        Command::Status(r) => remote::status(&r).await,
        Command::Workers(r) => remote::workers(&r).await,
        Command::Watch(a) => remote::watch(&a.remote, a.interval).await,
        Command::Drain(a) => remote::drain(&a.remote, &a.id, true).await,
        Command::Undrain(a) => remote::drain(&a.remote, &a.id, false).await,
        Command::Config(a) => remote::config(&a.remote, &a.set).await,
        Command::Loadtest(a) => loadtest::run(a).await,
        Command::Batch(c) => batch::run(c).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-gateway: {}", e.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
