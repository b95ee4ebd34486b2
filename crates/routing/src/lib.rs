//! Routing policies: given the eligible workers' load snapshots and a request's features, pick one.
//!
//! # Layout
//! - [`policy`]: the [`Policy`] trait every strategy implements.
//! - [`config`]: [`Strategy`] names and [`RoutingConfig`], the `[routing]` section of the config.
//! - one module per strategy: [`round_robin`], and the others as they land.
//! - [`build`]: the factory from config to a policy.
//!
//! Policies are pure: no IO, no clocks they read themselves, randomness passed in. Eligibility
//! (healthy, not draining, breaker closed, serves the model, has capacity) is filtered by the caller
//! before any policy runs, so a policy only ever sees legal choices.

pub mod config;
pub mod policy;
pub mod round_robin;

pub use config::{RoutingConfig, Strategy};
pub use policy::Policy;

use std::sync::Arc;

/// Builds the policy named by `cfg.strategy`.
pub fn build(cfg: &RoutingConfig) -> Arc<dyn Policy> {
    match cfg.strategy {
        Strategy::RoundRobin => Arc::new(round_robin::RoundRobin::default()),
    }
}
