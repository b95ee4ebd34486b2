//! How many requests the gateway keeps in flight on a worker, and which evidence decided it.
//!
//! Five tiers, the first that knows wins ([`tier`]):
//!
//! | tier | source | why it ranks there |
//! |---|---|---|
//! | `configured` | the worker's `max_concurrency` | the operator knows best |
//! | `engine` | what the engine says it runs at once: llama.cpp's `/props` `total_slots`, TGI's `/info` `max_batch_size` (else `max_concurrent_requests`), SGLang's `/get_server_info` `max_running_requests` or `sglang:max_running_requests_under_SLO` | a stated limit, true from the first request |
//! | `learned` | the most requests seen running while others waited inside the worker | true, but only after the worker was once full |
//! | `default` | `queue.default_worker_concurrency` when set | a guess |
//! | `ramp` | a worker whose metrics report its load, never seen full, while another worker serving one of its models has a known capacity: twice the larger of that capacity and the most it was seen running ([`ramp`], at least [`RAMP_FLOOR`]) | a bound that grows as the worker shows it copes |
//!
//! Without the ramp, a worker whose capacity is not learned yet is unlimited, and in a burst it takes
//! every request its learned peers have no room for: measured in the routing bench's `bursts`, a sim not
//! yet seen full took 62 requests in under a second while its peers held 8 each, and their TTFT reached
//! 5 s. On the ramp it takes twice what its peers hold, then shows it is full (its capacity is learned
//! at the next scrape) or not (the bound doubles at each scrape, as a TCP window opens). A fleet where
//! no capacity is known yet stays unlimited, so a gateway starting in front of large engines does not
//! throttle them while it learns; a worker without load metrics can never be seen full and stays
//! unlimited too (or `default`).
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
    /// `queue.default_worker_concurrency`, or unlimited when that is 0 and the ramp does not apply.
    Default,
    /// Twice its peers' known capacity or the most it was seen running, until learned ([`ramp`]).
    Ramp,
}

impl CapacitySource {
    /// Every source, for exporting and forgetting metric series.
    pub const ALL: [CapacitySource; 5] = [Self::Configured, Self::Engine, Self::Learned, Self::Default, Self::Ramp];

    /// The name shown in `/api/workers` and the `source` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configured => "configured",
            Self::Engine => "engine",
            Self::Learned => "learned",
            Self::Default => "default",
            Self::Ramp => "ramp",
        }
    }
}

/// The least a worker on the ramp may hold: room for a small engine's whole batch and its next one.
pub const RAMP_FLOOR: u32 = 16;

/// The ramp's bound for a worker seen running at most `seen` requests at once whose peers' largest
/// known capacity is `peers`: twice the larger, at least [`RAMP_FLOOR`]; 0 (no ramp) when no peer's
/// capacity is known.
pub fn ramp(peers: u32, seen: u32) -> u32 {
    if peers == 0 {
        return 0;
    }
    peers.max(seen).saturating_mul(2).max(RAMP_FLOOR)
}

/// The capacity in force and its source; 0 means "unknown" for each input (`ramp` is 0 for a worker
/// without load metrics or without a peer of known capacity), and the result is `u32::MAX` (unlimited)
/// when every tier is 0.
pub fn tier(configured: u32, engine: u32, learned: u32, default: u32, ramp: u32) -> (u32, CapacitySource) {
    [
        (configured, CapacitySource::Configured),
        (engine, CapacitySource::Engine),
        (learned, CapacitySource::Learned),
        (default, CapacitySource::Default),
        (ramp, CapacitySource::Ramp),
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
        assert_eq!(tier(8, 4, 2, 1, 16), (8, CapacitySource::Configured));
        assert_eq!(tier(0, 4, 2, 1, 16), (4, CapacitySource::Engine));
        assert_eq!(tier(0, 0, 2, 1, 16), (2, CapacitySource::Learned));
        assert_eq!(tier(0, 0, 0, 1, 16), (1, CapacitySource::Default));
        assert_eq!(tier(0, 0, 0, 0, 16), (16, CapacitySource::Ramp));
        assert_eq!(tier(0, 0, 0, 0, 0), (u32::MAX, CapacitySource::Default), "nothing known: unlimited");
        assert_eq!(tier(0, 1, 64, 32, 16), (1, CapacitySource::Engine), "one slot said is one slot held");
    }

    #[test]
    fn the_ramp_starts_at_twice_the_peers_and_doubles_what_was_seen() {
        assert_eq!(ramp(0, 0), 0, "no peer known: no ramp (unlimited)");
        assert_eq!(ramp(0, 100), 0);
        assert_eq!(ramp(1, 0), RAMP_FLOOR, "a one-slot peer: the floor");
        assert_eq!(ramp(32, 0), 64);
        assert_eq!(ramp(32, 40), 80, "seen running beyond its peers: twice that");
        // Scrape after scrape, a worker that fills each bound without a queue of its own opens the next.
        let mut bound = ramp(8, 0);
        for _ in 0..10 {
            bound = ramp(8, bound);
        }
        assert_eq!(bound, RAMP_FLOOR << 10, "ten scrapes from 16 to 16384");
        assert_eq!(ramp(8, u32::MAX), u32::MAX, "saturates");
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
        assert_eq!(names, ["configured", "engine", "learned", "default", "ramp"]);
    }
}
