//! The fleet: the workers in force, one immutable list swapped whole on change.

use crate::config::WorkerConfig;
use crate::worker::Worker;
use gateway_core::WorkerId;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The workers in force. Immutable: a change builds a new `Fleet` that carries kept workers (and their
/// live counters) over by `Arc`.
#[derive(Debug, Default)]
pub struct Fleet {
    /// In config order.
    pub workers: Vec<Arc<Worker>>,
}

impl Fleet {
    /// Builds a fleet for `specs`, reusing workers of `old` whose config entry is unchanged, minting ids
    /// for the rest with `next_id`.
    pub fn rebuild(old: &Fleet, specs: &[WorkerConfig], mut next_id: impl FnMut() -> WorkerId) -> Fleet {
        let workers = specs
            .iter()
            .map(|spec| match old.workers.iter().find(|w| &w.spec == spec) {
                Some(kept) => Arc::clone(kept),
                None => Arc::new(Worker::new(next_id(), spec.clone())),
            })
            .collect();
        Fleet { workers }
    }

    /// Applies `[circuit_breaker]` thresholds to every worker's breaker (keeps their state).
    pub fn configure_breakers(&self, cfg: &crate::config::CircuitBreakerConfig) {
        for w in &self.workers {
            w.breaker.lock().reconfigure(cfg.breaker());
        }
    }

    /// The worker named `key` (its name, or its id as a number).
    pub fn find(&self, key: &str) -> Option<&Arc<Worker>> {
        self.workers.iter().find(|w| w.name == key || w.id.to_string() == key)
    }

    /// Models served by healthy workers.
    pub fn healthy_models(&self) -> BTreeSet<String> {
        self.workers
            .iter()
            .filter(|w| w.stats.healthy.load(std::sync::atomic::Ordering::Relaxed))
            .flat_map(|w| w.models.load().iter().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Whether any worker, healthy or not, serves `model`.
    pub fn knows_model(&self, model: &str) -> bool {
        self.workers.iter().any(|w| w.serves(model))
    }

    /// Workers passing their probes.
    pub fn healthy_count(&self) -> usize {
        self.workers.iter().filter(|w| w.stats.healthy.load(std::sync::atomic::Ordering::Relaxed)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_keeps_unchanged_workers_and_their_state() {
        let mut id = 0;
        let specs = vec![WorkerConfig::from_url("http://a:1"), WorkerConfig::from_url("http://b:1")];
        let f1 = Fleet::rebuild(&Fleet::default(), &specs, || {
            id += 1;
            id
        });
        let _g = f1.workers[0].acquire(false, std::time::Instant::now());
        let specs2 = vec![WorkerConfig::from_url("http://a:1"), WorkerConfig::from_url("http://c:1")];
        let f2 = Fleet::rebuild(&f1, &specs2, || {
            id += 1;
            id
        });
        assert!(Arc::ptr_eq(&f1.workers[0], &f2.workers[0]));
        assert_eq!(f2.workers[0].view().in_flight, 1);
        assert_eq!(f2.workers[1].id, 3);
        assert_eq!(f2.find("c:1").map(|w| w.id), Some(3));
        assert_eq!(f2.find("1").map(|w| w.name.as_str()), Some("a:1"));
    }
}
