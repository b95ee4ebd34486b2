//! Domain types of llm-gateway, free of IO.
//!
//! # Layout
//! - [`echo`]: client strings bounded and escaped before they reach an error message or a log line.
//! - [`error`]: the one [`GatewayError`] and its table of OpenAI `type`/`code` strings.
//! - [`json`]: a validating one-pass JSON reader for the few members of a body the gateway reads.
//! - [`request`]: [`RequestFeatures`], what routing and admission read from a request body.
//! - [`multipart`]: the `model` and `stream` form fields of a `multipart/form-data` body.
//! - [`prefix`]: chained hashes of a prompt's fixed-size chunks, for prefix affinity.
//! - [`worker`]: [`WorkerId`] and [`WorkerView`], the load snapshot a routing policy sees.
//! - [`outcome`]: [`Outcome`], what a finished request tells the policies and breakers.
//!
//! Everything here is pure so it can be unit-tested and shared by `routing`, `guard` and `gateway`.

pub mod echo;
pub mod error;
pub mod json;
pub mod multipart;
pub mod outcome;
pub mod prefix;
pub mod request;
pub mod worker;

pub use echo::echo;
pub use error::{ErrorKind, GatewayError, Side};
pub use outcome::{breaker_verdict, Outcome, OutcomeKind, WorkerCondition};
pub use request::{Priority, RequestFeatures};
pub use worker::{WorkerId, WorkerView};
