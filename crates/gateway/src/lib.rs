//! llm-gateway: an OpenAI-compatible load-balancing gateway for self-hosted vLLM workers.
//!
//! # Layout
//! - [`config`]: figment layering and validation.
//! - [`state`]: the [`state::Snapshot`] behind `ArcSwap` and the shared [`state::AppState`].
//! - [`fleet`], [`worker`]: the workers in force and their live counters; [`worker::LoadGuard`].
//! - [`probe`], [`scrape`]: active health probes and vLLM `/metrics` parsing.
//! - [`upstream`]: the pooled client towards workers.
//! - [`proxy`]: the inference endpoints (parse, pick, forward, retry).
//! - [`admission`]: the admission queue in front of workers at capacity.
//! - [`auth`], [`ratelimit`], [`ratelimit_redis`]: API keys and token-bucket limits, local or in Redis.
//! - [`relay`], [`usage`]: the relayed response body that releases load when it ends.
//! - [`sse`]: pure scanning of relayed event streams (`[DONE]` at the end, usage events).
//! - [`metrics`]: every metric name.
//! - [`server`]: the router (`app`) and the server lifecycle ([`server::Gateway`]).
//! - [`connections`]: the accept loop and per-connection limits (timeouts, `max_connections`, out of
//!   file descriptors); [`budget`]: the shared byte budget of buffered request bodies.
//! - [`admin`], [`breaker_api`], [`dashboard`]: the admin API and the live dashboard; [`cross_site`]:
//!   what keeps other sites' pages from using them.
//! - [`reload`]: hot reload of the config (admin API, file change, `SIGHUP`).
//! - [`demo`], [`cli`]: `--demo` workers and the command line (server flags and subcommands).
//! - [`batch`]: the Batch API (`/v1/files`, `/v1/batches`), its SQLite store and its runner.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod batch;
pub mod breaker_api;
pub mod budget;
pub mod cli;
pub mod config;
pub mod connections;
pub mod cross_site;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod fleet;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod ratelimit;
pub mod ratelimit_redis;
pub mod relay;
pub mod reload;
pub mod scrape;
pub mod server;
pub mod sse;
pub mod state;
pub mod upstream;
pub mod usage;
pub mod worker;

pub use config::Config;
pub use server::{app, Gateway};

/// Installs the tracing subscriber: human-readable or JSON, filtered by `RUST_LOG` or `log.level`.
pub fn init_logging(cfg: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = builder.with_ansi(ansi);
    let _ = if cfg.format == "json" { builder.json().try_init() } else { builder.try_init() };
}
