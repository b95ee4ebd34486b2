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
//! - `serve`: the accept loop, [`spawn`], [`start`], [`SimHandle`].
//! - `cli`: the `vllm-sim` binary's flags.

pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod openai;
pub mod serve;
pub mod server;
pub mod tokenizer;

pub use config::{Faults, SimConfig};
pub use serve::{spawn, start, ConnKiller, SimHandle};
pub use server::{app, SimState};
