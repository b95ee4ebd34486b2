//! The fleet: the workers in force, one immutable list swapped whole on change.

pub mod breaker;
pub mod capacity;
pub mod probe;
pub mod scrape;
pub mod share;
pub mod slot;
pub mod worker;

use crate::config::WorkerConfig;
use crate::fleet::worker::Worker;
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
    /// for the rest with `next_id`. A worker whose entry changed (same URL, new weight say) is rebuilt but
    /// keeps its health and drain flags, so a reload neither undrains it nor hides it until its next probe.
    ///
    /// Only the new workers' breakers get `breakers`' thresholds: the kept workers are shared with the
    /// fleet in force and are not touched, so a reload refused after this leaves them as they were. The
    /// reload applies the thresholds to every worker ([`Fleet::configure_breakers`]) when it commits.
    pub fn rebuild(
        old: &Fleet,
        specs: &[WorkerConfig],
        breakers: &crate::config::CircuitBreakerConfig,
        mut next_id: impl FnMut() -> WorkerId,
    ) -> Fleet {
        use std::sync::atomic::Ordering::Relaxed;
        let workers = specs
            .iter()
            .map(|spec| match old.workers.iter().find(|w| &w.spec == spec) {
                Some(kept) => Arc::clone(kept),
                None => {
                    let fresh = Worker::new(next_id(), spec.clone());
                    fresh.breaker.lock().reconfigure(breakers.breaker());
                    if let Some(prev) = old.workers.iter().find(|w| w.spec.url == spec.url) {
                        fresh.stats.healthy.store(prev.stats.healthy.load(Relaxed), Relaxed);
                        fresh.stats.draining.store(prev.stats.draining.load(Relaxed), Relaxed);
                    }
                    Arc::new(fresh)
                }
            })
            .collect();
        Fleet { workers }
    }

    /// Tells each worker the largest capacity known (configured, stated or learned) among the other
    /// workers serving one of its models: where its ramp starts ([`crate::fleet::capacity`]). A pass over
    /// the workers keeps each model's two largest, so a worker's own capacity is never its peers'; a
    /// second tells each worker.
    pub fn share_capacities(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let models: Vec<Arc<Vec<String>>> = self.workers.iter().map(|w| w.models.load_full()).collect();
        // Per model: the largest known capacity and whose it is, and the largest among the others.
        let mut top: std::collections::HashMap<&str, (u32, WorkerId, u32)> = std::collections::HashMap::new();
        for (w, served) in self.workers.iter().zip(&models) {
            let known = w.known_capacity();
            for m in served.iter() {
                let t = top.entry(m.as_str()).or_insert((0, w.id, 0));
                if known > t.0 {
                    *t = (known, w.id, t.0);
                } else if t.1 != w.id {
                    t.2 = t.2.max(known);
                }
            }
        }
        for (w, served) in self.workers.iter().zip(&models) {
            let peers = served.iter().filter_map(|m| top.get(m.as_str()));
            let known = peers.map(|&(best, id, second)| if id == w.id { second } else { best }).max();
            w.stats.peer_capacity.store(known.unwrap_or(0), Relaxed);
        }
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
    fn each_worker_hears_the_largest_known_capacity_of_the_others_serving_its_models() {
        let worker = |id, url: &str, cap: u32, models: &[&str]| {
            let w = Worker::new(id, WorkerConfig { max_concurrency: cap, ..WorkerConfig::from_url(url) });
            w.models.store(Arc::new(models.iter().map(|m| m.to_string()).collect()));
            Arc::new(w)
        };
        let fleet = Fleet {
            workers: vec![
                worker(1, "http://a:1", 8, &["m"]),
                worker(2, "http://b:1", 32, &["m", "n"]),
                worker(3, "http://c:1", 0, &["m"]),
                worker(4, "http://d:1", 0, &["n"]),
                worker(5, "http://e:1", 4, &["o"]),
            ],
        };
        fleet.share_capacities();
        let heard: Vec<u32> =
            fleet.workers.iter().map(|w| w.stats.peer_capacity.load(std::sync::atomic::Ordering::Relaxed)).collect();
        // b's own 32 is never its peers': it hears a's 8; a model no one else serves hears nothing.
        assert_eq!(heard, vec![32, 8, 32, 32, 0]);
    }

    #[test]
    fn rebuild_keeps_unchanged_workers_and_their_state() {
        let mut id = 0;
        let specs = vec![WorkerConfig::from_url("http://a:1"), WorkerConfig::from_url("http://b:1")];
        let cb = crate::config::CircuitBreakerConfig::default();
        let f1 = Fleet::rebuild(&Fleet::default(), &specs, &cb, || {
            id += 1;
            id
        });
        let _g = f1.workers[0].acquire(false, u32::MAX, tokio::time::Instant::now(), None);
        let specs2 = vec![WorkerConfig::from_url("http://a:1"), WorkerConfig::from_url("http://c:1")];
        f1.workers[1].stats.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut specs2 = specs2;
        specs2.push(WorkerConfig { weight: 5, ..WorkerConfig::from_url("http://b:1") });
        let f2 = Fleet::rebuild(&f1, &specs2, &cb, || {
            id += 1;
            id
        });
        assert!(Arc::ptr_eq(&f1.workers[0], &f2.workers[0]));
        assert_eq!(f2.workers[0].view().in_flight, 1);
        assert_eq!(f2.workers[1].id, 3);
        assert_eq!(f2.find("c:1").map(|w| w.id), Some(3));
        assert_eq!(f2.find("1").map(|w| w.name.as_str()), Some("a:1"));
        let b = f2.find("b:1").expect("b rebuilt with its new weight");
        assert_eq!(b.spec.weight, 5);
        assert!(b.stats.draining.load(std::sync::atomic::Ordering::Relaxed), "a drain survives the change");
    }
}
