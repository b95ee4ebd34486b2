//! The `vllm-sim` command line, named after vLLM's own flags where one exists, turned into a [`SimConfig`].

use clap::Parser;

use crate::config::{Faults, MetricsDialect, SimConfig};

/// Flags of the `vllm-sim` binary.
#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version, about = "A simulated vLLM OpenAI-compatible server")]
pub struct Cli {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name.
    #[arg(long, default_value = "demo-model")]
    pub model: String,
    /// Most sequences in the running batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Fixed time to first token, ms.
    #[arg(long, default_value_t = 20.0)]
    pub ttft_ms: f64,
    /// Prefill cost per 1000 uncached prompt tokens, ms.
    #[arg(long, default_value_t = 10.0)]
    pub prefill_ms_per_1k_tokens: f64,
    /// Base inter-token latency, ms.
    #[arg(long, default_value_t = 10.0)]
    pub itl_ms: f64,
    /// KV-cache blocks.
    #[arg(long, default_value_t = 4096)]
    pub kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Most waiting requests before answering 503.
    #[arg(long, default_value_t = 1024)]
    pub max_num_queued: usize,
    /// Output length in tokens: `N` or `MIN-MAX` (inclusive).
    #[arg(long, default_value = "16-64", value_parser = parse_range)]
    pub output_tokens: (u32, u32),
    /// Seed for lengths, text and error draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Context window in tokens.
    #[arg(long, default_value_t = 8192)]
    pub max_model_len: u32,
    /// Fault: share of requests answered with 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fault: extra ms before the first token.
    #[arg(long, default_value_t = 0)]
    pub extra_latency_ms: u64,
    /// Fault: accept requests and never answer.
    #[arg(long)]
    pub hang: bool,
    /// Fault: abort the connection after this many tokens.
    #[arg(long)]
    pub die_after_tokens: Option<u32>,
    /// Fault: `/health` answers 503.
    #[arg(long)]
    pub refuse_health: bool,
    /// Metric names `/metrics` uses, as that engine does (`none`: no `/metrics`).
    #[arg(long, value_enum, default_value = "vllm")]
    pub metrics_dialect: MetricsDialect,
    /// Serve no `/health` (404), like llama-cpp-python's or Ollama's server.
    #[arg(long)]
    pub no_health_endpoint: bool,
    /// Send no usage chunk in streams even when `stream_options.include_usage` asks for one.
    #[arg(long)]
    pub ignore_include_usage: bool,
}

/// Parse `N` or `MIN-MAX`.
pub fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let num = |t: &str| t.trim().parse::<u32>().map_err(|e| format!("`{t}`: {e}"));
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let n = num(s)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("min {lo} is above max {hi}"));
    }
    Ok((lo, hi))
}

impl Cli {
    /// Check values and build the config; an error names the bad flag.
    pub fn into_config(self) -> Result<SimConfig, String> {
        if self.max_num_seqs == 0 || self.block_size == 0 || self.kv_blocks == 0 {
            return Err("--max-num-seqs, --block-size and --kv-blocks must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!("--error-rate must be within 0..=1, got {}", self.error_rate));
        }
        for (name, v) in [
            ("--ttft-ms", self.ttft_ms),
            ("--prefill-ms-per-1k-tokens", self.prefill_ms_per_1k_tokens),
            ("--itl-ms", self.itl_ms),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a non-negative number, got {v}"));
            }
        }
        Ok(SimConfig {
            model: self.model,
            max_num_seqs: self.max_num_seqs,
            ttft_ms: self.ttft_ms,
            prefill_ms_per_1k_tokens: self.prefill_ms_per_1k_tokens,
            itl_ms: self.itl_ms,
            kv_blocks: self.kv_blocks,
            block_size: self.block_size,
            max_num_queued: self.max_num_queued,
            output_tokens: self.output_tokens,
            seed: self.seed,
            max_model_len: self.max_model_len,
            faults: Faults {
                error_rate: self.error_rate,
                extra_latency_ms: self.extra_latency_ms,
                hang: self.hang,
                die_after_tokens: self.die_after_tokens,
                refuse_health: self.refuse_health,
            },
            metrics_dialect: self.metrics_dialect,
            health_endpoint: !self.no_health_endpoint,
            ignore_include_usage: self.ignore_include_usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_defaults() {
        assert_eq!(parse_range("5"), Ok((5, 5)));
        assert_eq!(parse_range("3-9"), Ok((3, 9)));
        assert!(parse_range("9-3").is_err());
        let cfg = Cli::parse_from(["vllm-sim"]).into_config().unwrap();
        let d = SimConfig::default();
        assert_eq!((cfg.model, cfg.max_num_seqs, cfg.output_tokens), (d.model, d.max_num_seqs, d.output_tokens));
        let cfg = Cli::parse_from(["vllm-sim", "--output-tokens", "4", "--hang"]).into_config().unwrap();
        assert_eq!(cfg.output_tokens, (4, 4));
        assert!(cfg.faults.hang);
    }
}
