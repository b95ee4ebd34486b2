//! vllm-sim: a faithful stand-in for a vLLM worker, used as the demo backend and as the test fleet of
//! llm-gateway. It speaks vLLM's OpenAI-compatible HTTP surface (including SSE framing, error objects and
//! Prometheus metric names) and simulates the engine behaviour that routing depends on: continuous
//! batching with `max_num_seqs`, a KV block pool with chained-hash prefix caching and LRU eviction, a
//! latency model driven by batch size and uncached prompt length, and scriptable faults.
//!
//! # Layout
//! - [`config`]: [`SimConfig`] and [`Faults`].
//! - `tokenizer`: 4-bytes-per-token stand-in and chained block hashes.
//! - `kv`: the block pool with prefix caching (pure).
//! - `engine`: FIFO scheduler over batch slots and KV blocks; the [`engine::Ticket`] drop guard.
//! - `generate`: one request's timeline (TTFT, ITL formulas live there).
//! - `openai`: request parsing, response bodies and SSE chunks (pure).
//! - `metrics`: vLLM metric names and the Prometheus text.
//! - `server`: the axum router ([`app`]) and its handlers, [`SimState`].
//! - `responses`: `/v1/responses` with its per-process store (follow-ups elsewhere are 404, as in vLLM).
//! - `stubs`: rerank, score, tokenize, detokenize, pooling, transcriptions, and the documents other
//!   engines state their concurrency in (`/props`, `/info`, `/get_server_info`).
//! - `serve`: the accept loop, [`spawn`], [`start`], [`SimHandle`].
//! - `cli`: the `vllm-sim` binary's flags.
//!
//! # Invariants
//! - **Architecture Invariant:** a request's engine membership (slot, queue place, KV blocks) is owned by
//!   one `Ticket`, held by whoever produces its response: the SSE body for streams, the handler future
//!   otherwise. Dropping it (client gone, connection cut, server shut down) releases everything at once.
//! - **Architecture Invariant:** the engine lock is never held across `.await`; waiting happens on a
//!   oneshot that the scheduler fills when the request is admitted.
//! - **Architecture Invariant:** `kv`, `tokenizer` and `openai` do no IO and keep no clock.
//! - With all latencies at zero no timer is armed, so the sim measures the gateway, not itself.

pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod openai;
pub mod responses;
pub mod serve;
pub mod server;
pub mod stubs;
pub mod tokenizer;

pub use config::{Faults, MetricsDialect, SimConfig};
pub use serve::{spawn, start, ConnKiller, SimHandle};
pub use server::{app, SimState};
