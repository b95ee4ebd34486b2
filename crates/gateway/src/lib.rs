//! llm-gateway: an OpenAI-compatible load-balancing gateway for self-hosted vLLM workers.
//!
//! # Layout (folders follow the request's path)
//! - [`server`]: the router ([`server::app`]), the lifecycle ([`server::Gateway`]), the accept loop
//!   and per-connection limits ([`server::connections`]), the byte budget of buffered bodies
//!   ([`server::budget`]).
//! - [`proxy`]: the inference endpoints in the order a request meets them: parse, admit
//!   ([`proxy::admission`]), pick and forward ([`proxy::dispatch`]), relay the answer
//!   ([`proxy::relay`], [`proxy::sse`], [`proxy::usage`]).
//! - [`upstream`]: HTTP/1.1 to workers, beneath both the proxy and the fleet: each worker's keep-alive
//!   connections ([`upstream::connections`], owned by the request using one), the control plane's
//!   pooled client, hop-by-hop headers.
//! - [`fleet`]: the workers in force ([`fleet::worker`]), their load slots and guards ([`fleet::slot`]),
//!   active health probes ([`fleet::probe`]) and engine `/metrics` scraping ([`fleet::scrape`]).
//! - [`cluster`]: replicas sharing workers: a worker's slots counted in Redis ([`cluster::redis`]),
//!   leased, freed slots announced by pub/sub.
//! - [`limits`]: token-bucket limits ([`limits::quota`] names them), local ([`limits::local`]) or
//!   shared in Redis ([`limits::redis`]), reported in [`limits::headers`]; [`auth`]: API keys;
//!   [`redis_conn`]: the one lazily opened Redis connection the limits and the cluster share.
//! - [`admin`]: the admin API, a file per job ([`admin::views`], [`admin::workers`], [`admin::config`],
//!   [`admin::breakers`], [`admin::queue`]; [`admin::cross_site`] keeps other sites' pages from using
//!   it); [`dashboard`]: the live page and its per-second [`dashboard::series`].
//! - [`config`]: figment layering and validation; [`reload`]: hot reload (admin API, file, `SIGHUP`),
//!   a fallible build, then an infallible commit; [`discovery`]: workers from a watched file and from
//!   DNS (`dns+http://`), applied through [`reload`].
//! - [`state`]: the composition root, [`state::Snapshot`] behind `ArcSwap` and [`state::AppState`].
//! - [`metrics`]: every metric name; [`error`]: the one error response; [`logging`]: log lines to
//!   stderr through a buffer.
//! - [`batch`]: the Batch API (`/v1/files`, `/v1/batches`), its SQLite store and its runner.
//! - [`demo`], [`cli`]: `--demo` workers and the command line (server flags and subcommands).

pub mod admin;
pub mod auth;
pub mod batch;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod discovery;
pub mod error;
pub mod fleet;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod periodic;
pub mod proxy;
pub mod redis_conn;
pub mod reload;
pub mod runtimes;
pub mod server;
pub mod state;
pub mod upstream;
pub mod wakes;

pub use config::Config;
pub use server::{app, Gateway};
