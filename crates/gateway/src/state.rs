//! The gateway's shared state: one immutable [`Snapshot`] of config, fleet and policy behind `ArcSwap`,
//! loaded once per request, plus the long-lived parts (client, metrics, probe tasks).

use crate::config::Config;
use crate::fleet::probe::ProbeSet;
use crate::fleet::worker::Worker;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::upstream::{self, Client};
use arc_swap::ArcSwap;
use gateway_core::WorkerId;
use routing::Policy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What one request sees, consistent with itself: config, workers and policy from the same moment.
pub struct Snapshot {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The workers in force.
    pub fleet: Arc<Fleet>,
    /// The routing policy in force.
    pub policy: Arc<dyn Policy>,
    /// The API keys in force.
    pub auth: Arc<crate::auth::Auth>,
    /// Each worker's counters (fleet order), resolved the first time they count.
    counters: Vec<WorkerCounters>,
}

/// Outcome kinds, one counter each ([`gateway_core::OutcomeKind`] from `Success` to `Cancelled`).
const OUTCOME_KINDS: usize = gateway_core::OutcomeKind::Cancelled as usize + 1;

/// A worker's per-request counters, each resolved once (a label lookup per request cost ~700
/// instructions) and only when it first counts (a series exists once something happened).
#[derive(Default)]
struct WorkerCounters {
    /// `llm_gateway_routing_decisions_total{strategy,worker}`.
    decisions: OnceLock<prometheus::IntCounter>,
    /// `llm_gateway_upstream_outcomes_total{worker,outcome}`, by [`gateway_core::OutcomeKind`].
    outcomes: [OnceLock<prometheus::IntCounter>; OUTCOME_KINDS],
}

impl Snapshot {
    /// A snapshot of what is in force.
    pub fn new(config: Config, fleet: Fleet, policy: Arc<dyn Policy>, auth: crate::auth::Auth) -> Self {
        let counters = fleet.workers.iter().map(|_| WorkerCounters::default()).collect();
        Self { config: Arc::new(config), fleet: Arc::new(fleet), policy, auth: Arc::new(auth), counters }
    }

    /// The counters of `worker`, a worker of this snapshot's fleet.
    fn counters(&self, worker: &Worker) -> Option<&WorkerCounters> {
        let i = self.fleet.workers.iter().position(|w| w.id == worker.id)?;
        self.counters.get(i)
    }

    /// Counts a routing decision for `worker`.
    pub fn count_decision(&self, metrics: &Metrics, worker: &Worker) {
        let resolve = || metrics.routing_decisions.with_label_values(&[self.policy.name(), &worker.name]);
        count(self.counters(worker).map(|c| &c.decisions), resolve);
    }

    /// Counts an outcome of `worker`'s.
    pub fn count_outcome(&self, metrics: &Metrics, worker: &Worker, kind: gateway_core::OutcomeKind) {
        let resolve = || metrics.upstream_outcomes.with_label_values(&[&worker.name, kind.as_str()]);
        count(self.counters(worker).map(|c| &c.outcomes[kind as usize]), resolve);
    }
}

/// Adds one to the counter in `slot`, resolved the first time; a worker outside the snapshot (no slot)
/// is counted through a lookup.
fn count(slot: Option<&OnceLock<prometheus::IntCounter>>, resolve: impl FnOnce() -> prometheus::IntCounter) {
    match slot {
        Some(slot) => slot.get_or_init(resolve).inc(),
        None => resolve().inc(),
    }
}

/// State shared by every request and background task.
pub struct AppState {
    /// The snapshot in force; swapped whole on change.
    pub snapshot: ArcSwap<Snapshot>,
    /// The control plane's pooled client towards workers (probes, scrapes, model discovery).
    pub client: Client,
    /// Opens the connections requests take to workers ([`crate::fleet::worker::Worker::connections`]).
    pub connector: upstream::Connector,
    /// Every exported metric.
    pub metrics: Arc<Metrics>,
    /// When the gateway started.
    pub started: Instant,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// The admission queues.
    pub admission: Arc<crate::proxy::admission::Admission>,
    /// This replica's side of the slot counts shared with other replicas (`[cluster]`, read at start).
    pub cluster: Arc<crate::cluster::Cluster>,
    /// The rate limiter (replaced when its backend changes).
    pub limiter: ArcSwap<crate::limits::RateLimiter>,
    /// Bytes of request bodies held now, bounded by `server.max_buffered_bytes`.
    pub body_budget: Arc<crate::server::budget::ByteBudget>,
    /// Open client connections, bounded by `server.max_connections`.
    pub connections: Arc<crate::server::connections::Connections>,
    /// The Batch API's store and runner figures (`batch.data_dir` is read once, here).
    pub batch: Arc<crate::batch::Batches>,
    /// Serializes this gateway's reloads ([`crate::reload::update`]); async, as it is held across probes.
    pub reload: tokio::sync::Mutex<()>,
    /// The per-second sampler of the dashboard's series and `/api/status`'s qps.
    pub sampler: Arc<crate::dashboard::series::Sampler>,
    /// Which worker holds which `/v1/responses` response (bounded by `responses.max_remembered`).
    pub response_homes: Arc<crate::proxy::response_homes::ResponseHomes>,
    /// What DNS answered last for the `dns+http://` workers' names ([`crate::discovery`]).
    pub resolved: ArcSwap<crate::discovery::expand::Resolved>,
    next_worker_id: AtomicU64,
    /// One health probe task per worker of the fleet in force.
    probes: ProbeSet,
}

impl AppState {
    /// State for `config`, with no probes started yet.
    pub fn new(config: Config) -> anyhow::Result<Arc<Self>> {
        let next_worker_id = AtomicU64::new(1);
        // No DNS answer yet: `dns+` workers join when `discovery::start` has resolved them.
        let resolved = crate::discovery::expand::Resolved::new();
        let specs = crate::discovery::specs::fleet_specs(&config, &resolved).map_err(anyhow::Error::msg)?;
        let fleet = Fleet::rebuild(&Fleet::default(), &specs, &config.circuit_breaker, || {
            next_worker_id.fetch_add(1, Ordering::Relaxed)
        });
        let policy = routing::build(&config.routing);
        let metrics = Arc::new(Metrics::new()?);
        let admission = crate::proxy::admission::Admission::new(&config.queue, metrics.queue_rejected.clone());
        admission.set_batch_share(config.batch.max_share);
        let connector = upstream::connector(&config.upstream);
        let client = upstream::client(connector.tcp.clone());
        let shutdown = CancellationToken::new();
        let probes = ProbeSet::new(client.clone(), config.health.clone(), shutdown.clone());
        let cluster = crate::cluster::Cluster::new(&config.cluster, Arc::clone(&metrics));
        admission.set_discount_foreign(!cluster.shares_slots());
        let auth = crate::auth::Auth::from_config(&config.auth).map_err(anyhow::Error::msg)?;
        Ok(Arc::new(Self {
            cluster,
            batch: crate::batch::Batches::new(config.batch.data_dir.clone()),
            admission,
            client,
            connector,
            limiter: ArcSwap::new(crate::limits::RateLimiter::new(&config.rate_limit)),
            body_budget: crate::server::budget::ByteBudget::new(),
            reload: tokio::sync::Mutex::new(()),
            sampler: crate::dashboard::series::Sampler::new(),
            response_homes: Arc::new(crate::proxy::response_homes::ResponseHomes::new(config.responses.max_remembered)),
            connections: crate::server::connections::Connections::new(),
            snapshot: ArcSwap::from_pointee(Snapshot::new(config, fleet, policy, auth)),
            metrics,
            resolved: ArcSwap::from_pointee(resolved),
            started: Instant::now(),
            shutdown,
            next_worker_id,
            probes,
        }))
    }

    /// Probes every worker once (so health and models are known before serving), then starts one probe
    /// task per worker that has none; running tasks follow the snapshot's `[health]` from now on.
    pub async fn start_probes(&self) {
        let snap = self.snapshot.load_full();
        self.probes.start(&snap.fleet, &snap.config.health).await;
    }

    /// Stops the probes of workers that left the fleet.
    pub fn stop_stale_probes(&self) {
        self.probes.retain(&self.snapshot.load().fleet);
    }

    /// Mints an id for a new worker.
    pub fn next_worker_id(&self) -> WorkerId {
        self.next_worker_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Refreshes the gauges that mirror live state (called when `/metrics` is scraped, so they are
    /// always consistent with the atomics they mirror).
    pub fn refresh_gauges(&self) {
        let snap = self.snapshot.load();
        let m = &self.metrics;
        m.healthy_workers.set(snap.fleet.healthy_count() as i64);
        m.uptime.set(self.started.elapsed().as_secs_f64());
        m.prefix_index_entries.set(snap.policy.memory_entries() as i64);
        self.admission.export(m);
        self.batch.export(m);
        for w in &snap.fleet.workers {
            let name = w.name.as_str();
            let s = &w.stats;
            m.worker_in_flight.with_label_values(&[name]).set(i64::from(s.slots.in_flight()));
            m.worker_running.with_label_values(&[name]).set(i64::from(s.scraped_running.load(Ordering::Relaxed)));
            m.worker_waiting.with_label_values(&[name]).set(i64::from(s.scraped_waiting.load(Ordering::Relaxed)));
            m.worker_kv_usage.with_label_values(&[name]).set(s.kv_usage.get());
            m.worker_healthy.with_label_values(&[name]).set(i64::from(s.healthy.load(Ordering::Relaxed)));
            let (capacity, source) = w.capacity_tier(snap.config.queue.default_worker_concurrency);
            m.set_worker_capacity(name, capacity, source);
            let state = match w.breaker_state(Instant::now()) {
                guard::StateName::Closed => 0,
                guard::StateName::Open => 1,
                guard::StateName::HalfOpen => 2,
            };
            m.breaker_state.with_label_values(&[name]).set(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;
    use gateway_core::OutcomeKind;

    /// A worker's counters count into the series its labels name, appear only once they count, and
    /// a worker outside the snapshot is still counted.
    #[test]
    fn a_workers_counters_count_into_its_series() {
        let metrics = Metrics::new().expect("metrics");
        let fleet = Fleet {
            workers: vec![
                Arc::new(Worker::new(1, WorkerConfig::from_url("http://a:8000"))),
                Arc::new(Worker::new(2, WorkerConfig::from_url("http://b:8000"))),
            ],
        };
        let config = Config::default();
        let policy = routing::build(&config.routing);
        let snap = Snapshot::new(config, fleet, Arc::clone(&policy), crate::auth::Auth::new(false, &[]));
        let (a, b) = (Arc::clone(&snap.fleet.workers[0]), Arc::clone(&snap.fleet.workers[1]));
        let outside = Worker::new(3, WorkerConfig::from_url("http://c:8000"));
        assert!(!metrics.render().contains("llm_gateway_routing_decisions_total{"), "no series before a decision");
        for _ in 0..3 {
            snap.count_decision(&metrics, &a);
        }
        snap.count_decision(&metrics, &outside);
        snap.count_outcome(&metrics, &a, OutcomeKind::Success);
        snap.count_outcome(&metrics, &a, OutcomeKind::Timeout);
        snap.count_outcome(&metrics, &a, OutcomeKind::Success);
        let decisions = |w: &Worker| metrics.routing_decisions.with_label_values(&[policy.name(), &w.name]).get();
        let outcomes =
            |w: &Worker, k: OutcomeKind| metrics.upstream_outcomes.with_label_values(&[&w.name, k.as_str()]).get();
        assert_eq!((decisions(&a), decisions(&outside)), (3, 1));
        assert_eq!((outcomes(&a, OutcomeKind::Success), outcomes(&a, OutcomeKind::Timeout)), (2, 1));
        let text = metrics.render();
        assert!(!text.contains(&format!("worker=\"{}\"", b.name)), "no series for a worker that did nothing:\n{text}");
    }
}
