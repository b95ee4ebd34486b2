//! The `[routing]` section: which strategy, and each strategy's knobs.
//!
//! Every nested section has its own `Default` holding the documented defaults, so a config that names
//! only `strategy` gets a fully working policy. [`RoutingConfig::validate`] names the offending key in
//! its error, so the binary can exit with a message that points at the line to fix.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The routing strategies, by their config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Rotate over the candidates.
    RoundRobin,
    /// Smooth weighted round robin (nginx): proportional to weight, interleaved.
    Weighted,
    /// Join the shortest queue: fewest `waiting + running`, ties at random.
    LeastQueue,
    /// Fewest requests in flight from this gateway, ties at random.
    LeastConnections,
    /// Power of two choices ranked by predicted time to first token, plus the best prefix-cache match
    /// (the default: it serves the most requests in every saturated scenario of the routing bench, see
    /// BENCHMARKS.md).
    #[default]
    P2cKv,
    /// Consistent hashing of the session key with bounded loads.
    ConsistentHash,
    /// Epsilon-greedy over a learned latency reward.
    Adaptive,
}

impl Strategy {
    /// Every strategy, in documentation order.
    pub const ALL: &'static [Strategy] = &[
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::LeastQueue,
        Strategy::LeastConnections,
        Strategy::P2cKv,
        Strategy::ConsistentHash,
        Strategy::Adaptive,
    ];

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastQueue => "least_queue",
            Strategy::LeastConnections => "least_connections",
            Strategy::P2cKv => "p2c_kv",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::Adaptive => "adaptive",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.iter().copied().find(|st| st.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown strategy {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// The `[routing]` config section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// The strategy in force.
    pub strategy: Strategy,
    /// `[routing.p2c]`: the `p2c_kv` model's priors and imbalance guard.
    pub p2c: P2cConfig,
    /// `[routing.consistent_hash]`: ring size and load bound.
    pub consistent_hash: ConsistentHashConfig,
    /// `[routing.adaptive]`: exploration rate and learning rate.
    pub adaptive: AdaptiveConfig,
    /// `[routing.prefix]`: the prefix index's memory bound and default cache size.
    pub prefix: PrefixConfig,
}

/// `[routing.p2c]`: priors of the `p2c_kv` time-to-first-token model and its imbalance guard.
///
/// The rates are learned per worker from finished requests; these values are only where a worker
/// starts (see [`crate::ttft_model`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2cConfig {
    /// Fixed part of a worker's time to first token, ms, until learned (default 50).
    pub base_ttft_ms: f64,
    /// Prefill cost, ms per 1000 uncached prompt tokens, until learned (default 100: 10k tokens/s).
    pub prefill_ms_per_1k_tokens: f64,
    /// A request's latency, dispatch to end, ms, until learned: the time a batch slot stays busy
    /// (default 2000).
    pub service_ms: f64,
    /// KV-cache usage above which a worker's predicted time rises steeply (default 0.9; 1 disables).
    pub kv_knee: f64,
    /// Weight of each finished request in a worker's learned rates, `(0, 1]` (default 0.05).
    pub learning_rate: f64,
    /// Load gap (`waiting + running`) above which the imbalance guard may engage (default 32).
    pub imbalance_abs: u32,
    /// Ratio busiest/least busy above which the imbalance guard may engage (default 1.5).
    pub imbalance_rel: f64,
}

impl Default for P2cConfig {
    fn default() -> Self {
        Self {
            base_ttft_ms: 50.0,
            prefill_ms_per_1k_tokens: 100.0,
            service_ms: 2_000.0,
            kv_knee: 0.9,
            learning_rate: 0.05,
            imbalance_abs: 32,
            imbalance_rel: 1.5,
        }
    }
}

impl P2cConfig {
    /// The model's priors.
    pub fn priors(&self) -> crate::ttft_model::Priors {
        crate::ttft_model::Priors {
            base_ms: self.base_ttft_ms,
            prefill_ms_per_token: self.prefill_ms_per_1k_tokens / 1000.0,
            service_ms: self.service_ms,
            kv_knee: self.kv_knee,
            alpha: self.learning_rate,
        }
    }
}

/// `[routing.consistent_hash]`: the hash ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistentHashConfig {
    /// Virtual nodes per worker on the ring (default 150).
    pub replicas: u32,
    /// Bounded-load factor `c > 1`: no worker takes more than `ceil(c * (in_flight_total + 1) / n)`
    /// (default 1.25).
    pub load_factor: f64,
}

impl Default for ConsistentHashConfig {
    fn default() -> Self {
        Self { replicas: 150, load_factor: 1.25 }
    }
}

/// `[routing.adaptive]`: the epsilon-greedy learner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Share of picks made uniformly at random to keep estimates fresh (default 0.1).
    pub epsilon: f64,
    /// EWMA weight of each new outcome in a worker's reward estimate (default 0.1).
    pub learning_rate: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self { epsilon: 0.1, learning_rate: 0.1 }
    }
}

/// `[routing.prefix]`: the prefix index shared by prefix-aware strategies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixConfig {
    /// Prefix hashes remembered in total over all workers, least recently used evicted (default 100 000).
    pub max_entries: usize,
    /// KV-cache capacity in tokens a worker starts with when neither its engine nor its config says
    /// (default 0: unknown, learned from the cache hits workers report).
    pub cache_tokens: u64,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self { max_entries: 100_000, cache_tokens: 0 }
    }
}

fn non_negative(key: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("routing.{key} must be a finite number >= 0 (got {v})"))
    }
}

impl RoutingConfig {
    /// Checks every knob; the error names the bad key, e.g. `routing.adaptive.epsilon must be in 0..=1`.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.p2c;
        for (key, v) in [
            ("p2c.base_ttft_ms", p.base_ttft_ms),
            ("p2c.prefill_ms_per_1k_tokens", p.prefill_ms_per_1k_tokens),
            ("p2c.service_ms", p.service_ms),
        ] {
            non_negative(key, v)?;
        }
        if !(0.0..=1.0).contains(&p.kv_knee) {
            return Err(format!("routing.p2c.kv_knee must be in 0..=1 (got {})", p.kv_knee));
        }
        if !(p.learning_rate > 0.0 && p.learning_rate <= 1.0) {
            return Err(format!("routing.p2c.learning_rate must be in (0, 1] (got {})", p.learning_rate));
        }
        if !(p.imbalance_rel.is_finite() && p.imbalance_rel >= 1.0) {
            return Err(format!("routing.p2c.imbalance_rel must be a finite number >= 1 (got {})", p.imbalance_rel));
        }
        let ch = &self.consistent_hash;
        if !(1..=10_000).contains(&ch.replicas) {
            return Err(format!("routing.consistent_hash.replicas must be in 1..=10000 (got {})", ch.replicas));
        }
        if !(ch.load_factor.is_finite() && ch.load_factor > 1.0) {
            return Err(format!(
                "routing.consistent_hash.load_factor must be a finite number > 1.0 (got {})",
                ch.load_factor
            ));
        }
        let a = &self.adaptive;
        if !(0.0..=1.0).contains(&a.epsilon) {
            return Err(format!("routing.adaptive.epsilon must be in 0..=1 (got {})", a.epsilon));
        }
        if !(a.learning_rate > 0.0 && a.learning_rate <= 1.0) {
            return Err(format!("routing.adaptive.learning_rate must be in (0, 1] (got {})", a.learning_rate));
        }
        if self.prefix.max_entries == 0 {
            return Err("routing.prefix.max_entries must be >= 1".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(*s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(Strategy::ALL.len(), 7);
        let err = "fastest".parse::<Strategy>().unwrap_err();
        assert!(err.contains("p2c_kv") && err.contains("adaptive"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = RoutingConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.p2c.prefill_ms_per_1k_tokens, 100.0);
        assert_eq!(cfg.consistent_hash.replicas, 150);
        assert_eq!(cfg.prefix.max_entries, 100_000);
    }

    #[test]
    fn validate_names_the_bad_key() {
        type Mutate = Box<dyn Fn(&mut RoutingConfig)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|c| c.adaptive.epsilon = 1.5), "routing.adaptive.epsilon"),
            (Box::new(|c| c.adaptive.learning_rate = 0.0), "routing.adaptive.learning_rate"),
            (Box::new(|c| c.p2c.service_ms = -1.0), "routing.p2c.service_ms"),
            (Box::new(|c| c.p2c.prefill_ms_per_1k_tokens = f64::NAN), "routing.p2c.prefill_ms_per_1k_tokens"),
            (Box::new(|c| c.p2c.kv_knee = 1.5), "routing.p2c.kv_knee"),
            (Box::new(|c| c.p2c.learning_rate = 0.0), "routing.p2c.learning_rate"),
            (Box::new(|c| c.p2c.imbalance_rel = 0.5), "routing.p2c.imbalance_rel"),
            (Box::new(|c| c.consistent_hash.replicas = 0), "routing.consistent_hash.replicas"),
            (Box::new(|c| c.consistent_hash.load_factor = 1.0), "routing.consistent_hash.load_factor"),
            (Box::new(|c| c.prefix.max_entries = 0), "routing.prefix.max_entries"),
        ];
        for (mutate, key) in cases {
            let mut cfg = RoutingConfig::default();
            mutate(&mut cfg);
            let err = cfg.validate().unwrap_err();
            assert!(err.starts_with(key), "{err} should name {key}");
        }
    }
}
