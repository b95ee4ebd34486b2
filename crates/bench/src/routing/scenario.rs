//! The routing bench's scenarios: each a fleet of vllm-sim workers, a workload and a load, chosen so no
//! one router setting wins them all. `tight` reproduces issue 13's measurement (caches that hold a third
//! of the prompts in play, a saturated fleet, misses that cost hundreds of milliseconds); the others pull
//! the other way: `roomy` (affinity buys little), `skewed` (affinity alone melts the worker holding a hot
//! prompt), `hetero` (a slow worker and a small-cache one: load and capacity must be read), `bursts`
//! (open-loop surges: queues, not caches, decide).

use crate::workload::{Popularity, Rate, Shape};
use std::time::Duration;

/// Every scenario, in the order they run by default.
pub const NAMES: &[&str] = &["tight", "roomy", "skewed", "hetero", "bursts"];

/// One simulated worker: its `vllm-sim` flags.
#[derive(Clone, Debug)]
pub struct SimSpec {
    /// `--ttft-ms`.
    pub ttft_ms: f64,
    /// `--prefill-ms-per-1k-tokens`: what a cache miss costs.
    pub prefill_ms_per_1k: f64,
    /// `--itl-ms`.
    pub itl_ms: f64,
    /// `--max-num-seqs`.
    pub max_num_seqs: usize,
    /// `--kv-blocks` (16 tokens each): running requests and the prefix cache share them.
    pub kv_blocks: usize,
    /// `--output-tokens MIN-MAX`.
    pub output_tokens: (u32, u32),
}

/// Block size every sim runs with (vLLM's default).
pub const BLOCK_SIZE: usize = 16;

impl SimSpec {
    /// The `vllm-sim` arguments (without host and port).
    pub fn args(&self, seed: u64) -> Vec<String> {
        vec![
            "--ttft-ms".into(),
            self.ttft_ms.to_string(),
            "--prefill-ms-per-1k-tokens".into(),
            self.prefill_ms_per_1k.to_string(),
            "--itl-ms".into(),
            self.itl_ms.to_string(),
            "--max-num-seqs".into(),
            self.max_num_seqs.to_string(),
            "--kv-blocks".into(),
            self.kv_blocks.to_string(),
            "--block-size".into(),
            BLOCK_SIZE.to_string(),
            "--output-tokens".into(),
            format!("{}-{}", self.output_tokens.0, self.output_tokens.1),
            "--max-model-len".into(),
            "32768".into(),
            "--seed".into(),
            seed.to_string(),
        ]
    }

    /// One line for the header.
    pub fn describe(&self) -> String {
        format!(
            "ttft {} ms + {} ms/1k uncached tokens, itl {} ms, max_num_seqs {}, {} KV blocks ({} tokens), \
             output {}-{} tokens",
            self.ttft_ms,
            self.prefill_ms_per_1k,
            self.itl_ms,
            self.max_num_seqs,
            self.kv_blocks,
            self.kv_blocks * BLOCK_SIZE,
            self.output_tokens.0,
            self.output_tokens.1
        )
    }
}

/// How requests are sent.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// `clients` concurrent conversations, each sending its next request when the last one ended.
    Closed {
        /// Concurrent clients.
        clients: usize,
    },
    /// Arrivals on a schedule fixed in advance, whatever the answers; each arrival is the next request of
    /// one of `streams` client streams.
    Open {
        /// Arrival rate, with its bursts.
        rate: Rate,
        /// Client streams the arrivals are spread over.
        streams: usize,
    },
}

/// A fleet, a workload and a load.
pub struct Scenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// What it tests, for the header.
    pub about: &'static str,
    /// The workers, `sim-0..`.
    pub fleet: Vec<SimSpec>,
    /// The workload.
    pub shape: Shape,
    /// The load.
    pub load: Load,
}

/// A normal worker of every scenario: a miss on a ~1.7k-token system prompt costs ~420 ms of prefill, a
/// hit ~20 ms; decoding 8-24 tokens costs ~100-300 ms.
fn normal(kv_blocks: usize) -> SimSpec {
    SimSpec { ttft_ms: 20.0, prefill_ms_per_1k: 250.0, itl_ms: 8.0, max_num_seqs: 8, kv_blocks, output_tokens: (8, 24) }
}

/// KV blocks of a worker whose cache (running batch included) holds about 30% of the tight workload's
/// system-prompt tokens (24 prompts of ~1.7k tokens, ~42k tokens in play), as in issue 13.
const TIGHT_KV: usize = 800;
/// KV blocks of a worker that holds about 60% of a 16-prompt workload's system prompts (~28k tokens).
const HALF_KV: usize = 1100;
/// KV blocks of a worker that holds every prompt of every scenario and its running batch.
const ROOMY_KV: usize = 8192;

/// The chat workload of the tight, roomy and hetero scenarios.
fn chat(seed: u64, popularity: Popularity, system_prompts: usize) -> Shape {
    Shape {
        seed,
        model: "demo-model".to_owned(),
        system_prompts,
        system_chars: (6000, 8000),
        popularity,
        turns: (2, 6),
        user_chars: (200, 600),
        reply_chars: (100, 300),
        oneoff_share: 0.0,
        oneoff_chars: (2000, 6000),
        max_tokens: 32,
    }
}

/// Closed-loop clients of the saturated scenarios: twice the fleet's 32 batch slots.
const CLIENTS: usize = 64;

/// The scenario called `name`, or `None`.
pub fn by_name(name: &str, seed: u64) -> Option<Scenario> {
    let four = |spec: SimSpec| vec![spec; 4];
    Some(match name {
        "tight" => Scenario {
            name: "tight",
            about: "tight caches at saturation: each worker's KV (running batch included) holds about 30% of the \
                    system-prompt tokens in play; closed loop, twice the fleet's batch slots",
            fleet: four(normal(TIGHT_KV)),
            shape: chat(seed, Popularity::Uniform, 24),
            load: Load::Closed { clients: CLIENTS },
        },
        "roomy" => Scenario {
            name: "roomy",
            about: "roomy caches: each worker can hold every system prompt; same workload and load as tight",
            fleet: four(normal(ROOMY_KV)),
            shape: chat(seed, Popularity::Uniform, 24),
            load: Load::Closed { clients: CLIENTS },
        },
        "skewed" => Scenario {
            name: "skewed",
            about: "skewed popularity: 32 system prompts, Zipf s=1.2 (the hottest carries ~32% of conversations, \
                    the top 4 ~61%); tight caches; closed loop. Sending each hot prompt to one worker melts it",
            fleet: four(normal(TIGHT_KV)),
            shape: Shape { oneoff_share: 0.1, ..chat(seed, Popularity::Zipf(1.2), 32) },
            load: Load::Closed { clients: CLIENTS },
        },
        "hetero" => Scenario {
            name: "hetero",
            about: "heterogeneous workers: sim-2 twice as slow (ttft, prefill, itl), sim-3 with a quarter of the \
                    others' KV cache (room for one or two requests with distinct prompts); 16 system prompts; \
                    closed loop",
            fleet: vec![
                normal(HALF_KV),
                normal(HALF_KV),
                SimSpec { ttft_ms: 40.0, prefill_ms_per_1k: 500.0, itl_ms: 16.0, ..normal(HALF_KV) },
                normal(HALF_KV / 4),
            ],
            shape: chat(seed, Popularity::Uniform, 16),
            load: Load::Closed { clients: 48 },
        },
        "bursts" => Scenario {
            name: "bursts",
            about: "bursts: open loop, 20 req/s with 3 s surges to 120 req/s every 10 s; each worker's KV holds \
                    about 60% of the prompts; 10% one-offs",
            fleet: four(normal(HALF_KV)),
            shape: Shape { oneoff_share: 0.1, ..chat(seed, Popularity::Uniform, 16) },
            load: Load::Open {
                rate: Rate {
                    base: 20.0,
                    burst: 120.0,
                    period: Duration::from_secs(10),
                    burst_len: Duration::from_secs(3),
                },
                streams: 256,
            },
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Corpus;
    use vllm_sim::tokenizer::count_tokens;

    /// Tokens of every distinct system prompt of a scenario.
    fn prompt_tokens(s: &Scenario) -> usize {
        Corpus::new(s.shape.clone()).systems().iter().map(|p| count_tokens(p.as_bytes()) as usize).sum()
    }

    #[test]
    fn tight_holds_a_quarter_to_a_third_and_roomy_holds_all() {
        let tight = by_name("tight", 42).unwrap();
        let roomy = by_name("roomy", 42).unwrap();
        let in_play = prompt_tokens(&tight);
        let share = (tight.fleet[0].kv_blocks * BLOCK_SIZE) as f64 / in_play as f64;
        assert!((0.25..=0.34).contains(&share), "{share}");
        // Every prompt beside a running batch of 8 requests of ~40 blocks of their own each.
        assert!((roomy.fleet[0].kv_blocks - 8 * 40) * BLOCK_SIZE > in_play);
        for name in NAMES {
            let s = by_name(name, 1).unwrap();
            assert_eq!(s.name, *name);
            assert_eq!(s.fleet.len(), 4);
        }
        assert!(by_name("nope", 1).is_none());
    }
}
