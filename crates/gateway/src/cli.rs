//! The command line of `llm-gateway`.

use clap::Parser;
use std::path::PathBuf;

/// OpenAI-compatible load-balancing gateway for self-hosted LLM inference.
#[derive(Debug, Parser)]
#[command(name = "llm-gateway", version, about)]
pub struct Cli {
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

impl Cli {
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
