//! The simulator's knobs: engine shape and latency model ([`SimConfig`]) and the faults a test can script
//! ([`Faults`]). Kept apart so the CLI, the engine and the HTTP layer agree on one spelling.

use serde::{Deserialize, Serialize};

/// Everything a simulated vLLM worker needs to know: what it serves, how big its engine is and how slow it is.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Model name served (`--served-model-name` in vLLM); requests naming another model get 404.
    pub model: String,
    /// Most sequences running in one batch at once (vLLM `--max-num-seqs`); the rest wait FIFO.
    pub max_num_seqs: usize,
    /// Fixed part of the time to first token, in milliseconds.
    pub ttft_ms: f64,
    /// Prefill cost per 1000 *uncached* prompt tokens, in milliseconds (prefix-cache hits are free).
    pub prefill_ms_per_1k_tokens: f64,
    /// Base inter-token latency in milliseconds at an empty batch; see the engine's ITL formula.
    pub itl_ms: f64,
    /// Number of KV-cache blocks (vLLM `num_gpu_blocks`).
    pub kv_blocks: usize,
    /// Tokens per KV block (vLLM `--block-size`).
    pub block_size: usize,
    /// Most requests allowed to wait; one more is refused with 503 at once.
    pub max_num_queued: usize,
    /// Output length drawn uniformly from `min..=max` tokens, then capped by `max_tokens`.
    pub output_tokens: (u32, u32),
    /// Seed for output lengths, text and error draws (request `i` uses a stream derived from `seed` and `i`).
    pub seed: u64,
    /// Context window: prompt plus `max_tokens` beyond this is a 400, as in vLLM.
    pub max_model_len: u32,
    /// Faults active at start; replaceable at run time through `POST /sim/faults` or `SimHandle::set_faults`.
    pub faults: Faults,
    /// Which engine's metric names `/metrics` speaks; `none` serves no `/metrics` at all (404).
    pub metrics_dialect: MetricsDialect,
    /// Whether `/health` exists; servers such as llama-cpp-python's or Ollama's have none (404).
    pub health_endpoint: bool,
    /// Never send the usage chunk of a stream, even when `stream_options.include_usage` asks for it, as
    /// servers that ignore the option do.
    pub ignore_include_usage: bool,
}

/// The metrics dialects of the engines the gateway reads, so gateway tests run offline against each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsDialect {
    /// vLLM's `vllm:*` names (the default).
    #[default]
    Vllm,
    /// SGLang's `sglang:*` names.
    Sglang,
    /// llama.cpp server's `llamacpp:*` names.
    Llamacpp,
    /// Hugging Face TGI's `tgi_*` names.
    Tgi,
    /// No `/metrics` endpoint.
    None,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "demo-model".to_owned(),
            max_num_seqs: 256,
            ttft_ms: 20.0,
            prefill_ms_per_1k_tokens: 10.0,
            itl_ms: 10.0,
            kv_blocks: 4096,
            block_size: 16,
            max_num_queued: 1024,
            output_tokens: (16, 64),
            seed: 0,
            max_model_len: 8192,
            faults: Faults::default(),
            metrics_dialect: MetricsDialect::Vllm,
            health_endpoint: true,
            ignore_include_usage: false,
        }
    }
}

/// Scripted misbehaviour. Every field defaults to "healthy", so a JSON body may name only the faults it wants.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Share of generation requests (0..=1) answered with a vLLM-style 500 error.
    pub error_rate: f64,
    /// Extra delay before the first token, in milliseconds.
    pub extra_latency_ms: u64,
    /// Accept requests and never answer them (until the client leaves).
    pub hang: bool,
    /// After this many tokens the connection is aborted without a proper end, like a crashed process.
    pub die_after_tokens: Option<u32>,
    /// `GET /health` answers 503.
    pub refuse_health: bool,
}
