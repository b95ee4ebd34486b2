//! Routing policies: given the eligible workers' load snapshots and a request's features, pick one.
//!
//! # Layout
//! - [`policy`]: the [`Policy`] trait every strategy implements.
//! - [`config`]: [`Strategy`] names and [`RoutingConfig`], the `[routing]` section of the config.
//! - one module per strategy: [`round_robin`], [`weighted`], [`least_queue`], [`least_connections`],
//!   [`p2c_kv`], [`consistent_hash`], [`adaptive`].
//! - [`prefix_index`]: the bounded model of which prompt prefixes each worker's cache holds (`p2c_kv`).
//! - [`ttft_model`]: the predicted time to first token `p2c_kv` ranks by, with its learned rates.
//! - [`build`]: the factory from config to a policy.
//!
//! Policies are pure: no IO, no clocks they read themselves, randomness passed in. Eligibility
//! (healthy, not draining, breaker closed, serves the model, has capacity) is filtered by the caller
//! before any policy runs, so a policy only ever sees legal choices.

#![warn(missing_docs)]

pub mod adaptive;
pub mod config;
pub mod consistent_hash;
pub mod least_connections;
pub mod least_queue;
pub mod p2c_kv;
pub mod policy;
pub mod prefix_index;
pub mod round_robin;
pub mod ttft_model;
mod util;
pub mod weighted;

pub use config::{RoutingConfig, Strategy};
pub use policy::Policy;

use std::sync::Arc;

/// Builds the policy named by `cfg.strategy`.
///
/// Infallible: call [`RoutingConfig::validate`] first; out-of-range knobs are not re-checked here.
pub fn build(cfg: &RoutingConfig) -> Arc<dyn Policy> {
    match cfg.strategy {
        Strategy::RoundRobin => Arc::new(round_robin::RoundRobin::default()),
        Strategy::Weighted => Arc::new(weighted::Weighted::default()),
        Strategy::LeastQueue => Arc::new(least_queue::LeastQueue),
        Strategy::LeastConnections => Arc::new(least_connections::LeastConnections),
        Strategy::P2cKv => Arc::new(p2c_kv::P2cKv::new(cfg.p2c.clone(), &cfg.prefix)),
        Strategy::ConsistentHash => Arc::new(consistent_hash::ConsistentHash::new(cfg.consistent_hash.clone())),
        Strategy::Adaptive => Arc::new(adaptive::Adaptive::new(cfg.adaptive.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_names_match_config_names() {
        for &strategy in Strategy::ALL {
            let policy = build(&RoutingConfig { strategy, ..Default::default() });
            assert_eq!(policy.name(), strategy.as_str());
        }
    }
}
