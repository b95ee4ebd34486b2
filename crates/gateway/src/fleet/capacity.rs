//! How many requests the gateway keeps in flight on a worker, and which evidence decided it.
//!
//! Four tiers, the first that knows wins ([`tier`]):
//!
//! | tier | source | why it ranks there |
//! |---|---|---|
//! | `configured` | the worker's `max_concurrency` | the operator knows best |
//! | `engine` | what the engine says it runs at once: llama.cpp's `/props` `total_slots`, TGI's `/info` `max_batch_size` (else `max_concurrent_requests`), SGLang's `/get_server_info` `max_running_requests` or `sglang:max_running_requests_under_SLO` | a stated limit, true from the first request |
//! | `learned` | the most requests seen running while others waited inside the worker | true, but only after the worker was once full |
//! | `default` | `queue.default_worker_concurrency` (0 = unlimited) | a guess |
//!
//! vLLM exports no metric with its `max_num_seqs` (its `vllm:cache_config_info` describes the KV cache,
//! not the batch), so a vLLM worker's capacity is learned. A worker that says it runs one request at a
//! time (llama.cpp with one slot) is held at 1, so the admission queue orders what waits for it.

/// Which tier set a worker's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacitySource {
    /// The worker's `max_concurrency`.
    Configured,
    /// What the engine reports.
    Engine,
    /// Learned from running and waiting counts.
    Learned,
    /// `queue.default_worker_concurrency`, or unlimited when that is 0.
    Default,
}

impl CapacitySource {
    /// Every source, for exporting and forgetting metric series.
    pub const ALL: [CapacitySource; 4] = [Self::Configured, Self::Engine, Self::Learned, Self::Default];

    /// The name shown in `/api/workers` and the `source` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configured => "configured",
            Self::Engine => "engine",
            Self::Learned => "learned",
            Self::Default => "default",
        }
    }
}

/// The capacity in force and its source; 0 means "unknown" for each input, and the result is `u32::MAX`
/// (unlimited) when every tier is 0.
pub fn tier(configured: u32, engine: u32, learned: u32, default: u32) -> (u32, CapacitySource) {
    [
        (configured, CapacitySource::Configured),
        (engine, CapacitySource::Engine),
        (learned, CapacitySource::Learned),
        (default, CapacitySource::Default),
    ]
    .into_iter()
    .find(|(c, _)| *c > 0)
    .unwrap_or((u32::MAX, CapacitySource::Default))
}

/// The capacity an engine states in a JSON document it serves, read by the probe from the path its
/// dialect names ([`engine_capacity_path`]): the first positive integer among `keys`.
pub fn engine_capacity_from_json(body: &[u8], keys: &[&str]) -> u32 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return 0 };
    keys.iter()
        .filter_map(|k| v.get(*k).and_then(serde_json::Value::as_u64))
        .find(|n| *n > 0)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Where an engine of `dialect` states its concurrency, and the JSON keys to read there, in order.
/// `None` when it states none (vLLM). A worker without `/metrics` may still be llama.cpp's server (it
/// serves `/metrics` only with `--metrics`), so `/props` is asked then too.
pub fn engine_capacity_path(dialect: crate::fleet::scrape::Dialect) -> Option<(&'static str, &'static [&'static str])> {
    use crate::fleet::scrape::Dialect;
    match dialect {
        Dialect::LlamaCpp | Dialect::None => Some(("/props", &["total_slots"])),
        Dialect::Tgi => Some(("/info", &["max_batch_size", "max_concurrent_requests"])),
        Dialect::Sglang => Some(("/get_server_info", &["max_running_requests"])),
        Dialect::Vllm => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::scrape::Dialect;

    #[test]
    fn the_first_known_tier_wins() {
        assert_eq!(tier(8, 4, 2, 1), (8, CapacitySource::Configured));
        assert_eq!(tier(0, 4, 2, 1), (4, CapacitySource::Engine));
        assert_eq!(tier(0, 0, 2, 1), (2, CapacitySource::Learned));
        assert_eq!(tier(0, 0, 0, 1), (1, CapacitySource::Default));
        assert_eq!(tier(0, 0, 0, 0), (u32::MAX, CapacitySource::Default), "nothing known: unlimited");
        assert_eq!(tier(0, 1, 64, 32), (1, CapacitySource::Engine), "one slot said is one slot held");
    }

    #[test]
    fn reads_what_engines_state() {
        let props = br#"{"total_slots":1,"model_path":"m.gguf","default_generation_settings":{"n_ctx":2048}}"#;
        assert_eq!(engine_capacity_from_json(props, &["total_slots"]), 1);
        let keys = engine_capacity_path(Dialect::Tgi).expect("tgi states it").1;
        let info = br#"{"max_concurrent_requests":128,"max_batch_size":null}"#;
        assert_eq!(engine_capacity_from_json(info, keys), 128, "no batch size: the router's bound");
        let info = br#"{"max_concurrent_requests":128,"max_batch_size":16}"#;
        assert_eq!(engine_capacity_from_json(info, keys), 16);
        let sglang = br#"{"max_running_requests":null}"#;
        assert_eq!(engine_capacity_from_json(sglang, &["max_running_requests"]), 0, "unset: unknown");
        assert_eq!(engine_capacity_from_json(b"not json", &["total_slots"]), 0);
        assert_eq!(engine_capacity_from_json(br#"{"total_slots":-1}"#, &["total_slots"]), 0);
        assert_eq!(engine_capacity_from_json(br#"[1]"#, &["total_slots"]), 0);
        assert!(engine_capacity_path(Dialect::Vllm).is_none(), "vLLM exports no max_num_seqs");
    }

    #[test]
    fn names_are_stable() {
        let names: Vec<_> = CapacitySource::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["configured", "engine", "learned", "default"]);
    }
}
