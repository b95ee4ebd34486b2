//! The command line of `llm-gateway`: with no subcommand it serves; subcommands talk to a running gateway.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    /// Worker base URLs, comma-separated (replaces [[workers]]).
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

/// Runs a subcommand; the exit code says whether it succeeded.
pub async fn run(cmd: Command) -> std::process::ExitCode {
    match cmd {
        Command::Health(remote) => {
            let url = format!("{}/health", remote.url.trim_end_matches('/'));
            match reqwest::get(&url).await {
                Ok(resp) => {
                    let ok = resp.status().is_success();
                    println!("{}", resp.text().await.unwrap_or_default());
                    if ok {
                        std::process::ExitCode::SUCCESS
                    } else {
                        std::process::ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("llm-gateway: cannot reach {url}: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
