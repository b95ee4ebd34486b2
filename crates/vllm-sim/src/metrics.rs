//! vLLM's Prometheus metrics, every name spelled here once. vLLM exposes them through Python's
//! `prometheus_client`, so the text mirrors its shape: `# HELP`/`# TYPE` lines, counters typed under their
//! base name with a `_total` sample, float values, labels `engine="0"` and `model_name`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Gauge: requests in the running batch.
pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
/// Gauge: requests waiting to be scheduled.
pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
/// Gauge: share of KV blocks held by running requests (0..=1).
pub const KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
/// Gauge: the pre-v1 name of [`KV_CACHE_USAGE_PERC`], same value (older scrapers read it).
pub const GPU_CACHE_USAGE_PERC: &str = "vllm:gpu_cache_usage_perc";
/// Counter (tokens): prompt tokens looked up in the prefix cache.
pub const PREFIX_CACHE_QUERIES: &str = "vllm:prefix_cache_queries";
/// Counter (tokens): prompt tokens found in the prefix cache.
pub const PREFIX_CACHE_HITS: &str = "vllm:prefix_cache_hits";
/// Counter: finished requests by `finished_reason` (stop, length, abort).
pub const REQUEST_SUCCESS: &str = "vllm:request_success";
/// Counter: prompt tokens prefilled.
pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens";
/// Counter: tokens generated.
pub const GENERATION_TOKENS: &str = "vllm:generation_tokens";
/// Histogram (seconds): arrival to first token.
pub const TIME_TO_FIRST_TOKEN: &str = "vllm:time_to_first_token_seconds";
/// Histogram (seconds): arrival to last token.
pub const E2E_REQUEST_LATENCY: &str = "vllm:e2e_request_latency_seconds";
/// Info gauge (always 1) whose labels describe the KV cache, as vLLM's `cache_config_info`.
pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";

/// vLLM's TTFT bucket bounds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's end-to-end latency bucket bounds.
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// Why a request left the engine, as vLLM labels `finished_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model chose to stop (EOS).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The client left or the request was cut short.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// A cumulative histogram with fixed bounds.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    fn observe(&self, v: f64) {
        let mut s = self.state.lock();
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            s.0[i] += 1;
        }
        s.1 += v;
        s.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let (counts, sum, count) = self.state.lock().clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {:?}", cum as f64);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {:?}", count as f64);
        let _ = writeln!(out, "{name}_count{{{labels}}} {:?}", count as f64);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum:?}");
    }
}

/// Live counters and histograms of one simulated engine.
#[derive(Debug)]
pub struct Metrics {
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished: [AtomicU64; 3],
    ttft: Histogram,
    e2e: Histogram,
}

/// Instantaneous engine gauges, read under the engine lock at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// KV usage, 0..=1.
    pub kv_usage: f64,
    /// KV-cache blocks (`num_gpu_blocks`).
    pub kv_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

impl Metrics {
    /// A request was scheduled: its prompt was looked up in the prefix cache and prefilled.
    pub fn on_scheduled(&self, prompt_tokens: u32, hit_tokens: u32) {
        self.prefix_queries.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        self.prefix_hits.fetch_add(u64::from(hit_tokens), Ordering::Relaxed);
        self.prompt_tokens.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
    }

    /// One token generated.
    pub fn on_token(&self) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// First token produced `secs` after arrival.
    pub fn on_first_token(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// A request left the engine `secs` after arrival for `reason`.
    pub fn on_finished(&self, reason: FinishReason, secs: f64) {
        self.finished[reason as usize].fetch_add(1, Ordering::Relaxed);
        if reason != FinishReason::Abort {
            self.e2e.observe(secs);
        }
    }

    /// Prefix-cache hit tokens so far (for tests and the handle).
    pub fn prefix_hits(&self) -> u64 {
        self.prefix_hits.load(Ordering::Relaxed)
    }

    /// The load facts under another engine's names (`dialect` other than vLLM), for gateway tests.
    pub fn render_dialect(&self, dialect: crate::MetricsDialect, g: Gauges) -> String {
        use crate::MetricsDialect::*;
        let generated = self.generation_tokens.load(Ordering::Relaxed) as f64;
        let names: [Option<&str>; 4] = match dialect {
            Sglang => [
                Some("sglang:num_running_reqs"),
                Some("sglang:num_queue_reqs"),
                Some("sglang:token_usage"),
                Some("sglang:generation_tokens_total"),
            ],
            Llamacpp => [
                Some("llamacpp:requests_processing"),
                Some("llamacpp:requests_deferred"),
                Some("llamacpp:kv_cache_usage_ratio"),
                Some("llamacpp:tokens_predicted_total"),
            ],
            Tgi => [Some("tgi_batch_current_size"), Some("tgi_queue_size"), Option::None, Option::None],
            Vllm | None => [Option::None; 4],
        };
        let values = [g.running as f64, g.waiting as f64, g.kv_usage, generated];
        let mut out = String::new();
        for (name, v) in names.iter().zip(values) {
            if let Some(name) = name {
                let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
                let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v:?}");
            }
        }
        out
    }

    /// The Prometheus text exposition.
    pub fn render(&self, model: &str, g: Gauges) -> String {
        let model = model.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let labels = format!("engine=\"0\",model_name=\"{model}\"");
        let mut out = String::with_capacity(8 * 1024);
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v:?}");
        };
        gauge(&mut out, NUM_REQUESTS_RUNNING, "Number of requests in model execution batches.", g.running as f64);
        gauge(&mut out, NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.", g.waiting as f64);
        gauge(&mut out, KV_CACHE_USAGE_PERC, "KV-cache usage. 1 means 100 percent usage.", g.kv_usage);
        gauge(&mut out, GPU_CACHE_USAGE_PERC, "GPU KV-cache usage. 1 means 100 percent usage.", g.kv_usage);
        let _ = writeln!(
            out,
            "# HELP {CACHE_CONFIG_INFO} Information of the LLMEngine CacheConfig\n# TYPE {CACHE_CONFIG_INFO} gauge\n\
             {CACHE_CONFIG_INFO}{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",\
             num_cpu_blocks=\"None\",num_gpu_blocks=\"{}\"}} 1.0",
            g.block_size, g.kv_blocks
        );
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let v = v.load(Ordering::Relaxed) as f64;
            let _ = writeln!(out, "# HELP {name}_total {help}\n# TYPE {name} counter\n{name}_total{{{labels}}} {v:?}");
        };
        counter(
            &mut out,
            PREFIX_CACHE_QUERIES,
            "Prefix cache queries, in terms of number of queried tokens.",
            &self.prefix_queries,
        );
        counter(
            &mut out,
            PREFIX_CACHE_HITS,
            "Prefix cache hits, in terms of number of cached tokens.",
            &self.prefix_hits,
        );
        counter(&mut out, PROMPT_TOKENS, "Number of prefill tokens processed.", &self.prompt_tokens);
        counter(&mut out, GENERATION_TOKENS, "Number of generation tokens processed.", &self.generation_tokens);
        let name = REQUEST_SUCCESS;
        let _ = writeln!(out, "# HELP {name}_total Count of successfully processed requests.\n# TYPE {name} counter");
        for r in [FinishReason::Stop, FinishReason::Length, FinishReason::Abort] {
            let v = self.finished[r as usize].load(Ordering::Relaxed) as f64;
            let _ = writeln!(out, "{name}_total{{{labels},finished_reason=\"{}\"}} {v:?}", r.as_str());
        }
        self.ttft.render(&mut out, TIME_TO_FIRST_TOKEN, "Histogram of time to first token in seconds.", &labels);
        self.e2e.render(&mut out, E2E_REQUEST_LATENCY, "Histogram of e2e request latency in seconds.", &labels);
        out
    }
}
