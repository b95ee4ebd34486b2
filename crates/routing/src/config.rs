//! The `[routing]` section: which strategy, and each strategy's knobs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The routing strategies, by their config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Rotate over the candidates.
    #[default]
    RoundRobin,
}

impl Strategy {
    /// Every strategy, in documentation order.
    pub const ALL: &'static [Strategy] = &[Strategy::RoundRobin];

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
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
}
