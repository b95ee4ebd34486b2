//! The admission queue: when every worker for a model is at capacity, requests wait here instead of
//! piling onto a worker's own queue, and leave in priority, aging and fairness order (the ordering is
//! the pure `guard::AdmissionQueue`).
//!
//! Dispatch is event-driven. When a load slot frees ([`crate::fleet::worker::LoadGuard`] drops), the best
//! waiter that worker can serve is handed a [`Reservation`] on it through a oneshot channel: the slot
//! is its, so a request arriving at that moment cannot take it, and nothing polls. A reservation that is
//! never used (the waiter left) releases itself when dropped, which frees the slot for the next one.
//! A slow sweep ([`Admission::run_sweeper`]) only covers capacity that appears without a slot freeing
//! (a worker added, recovered or learned larger).
//!
//! Batch API lines ([`Priority::Batch`]) take only spare capacity. They wait in a FIFO of their own per
//! model, apart from the live queue (so they never take a live request's place in `max_size`), and never
//! age. A batch line takes a slot only while the worker's in-flight plus reserved count is below
//! `batch.max_share` of its capacity ([`Admission::has_batch_room`]), and a freed slot goes to a batch
//! line only when no live request waits for that worker. With the queue disabled (no capacity model)
//! only the batch runner's own `batch.max_concurrency` bounds batch lines.

use crate::config::QueueConfig;
use crate::fleet::worker::Worker;
use crate::fleet::Fleet;
use crate::state::AppState;
use arc_swap::ArcSwap;
use gateway_core::{ErrorKind, GatewayError, Priority, WorkerId};
use guard::{AdmissionQueue, AvgWait, RateEstimator, Ticket};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Every model's queue, and the queue settings in force.
pub struct Admission {
    cfg: ArcSwap<QueueConfig>,
    /// `llm_gateway_queue_rejected_total{model,reason}`.
    rejected: prometheus::IntCounterVec,
    queues: Mutex<HashMap<Arc<str>, Arc<ModelQueue>>>,
    /// `batch.max_share` as `f64` bits: the share of a worker's slots batch lines may fill.
    batch_share: AtomicU64,
    me: Weak<Admission>,
}

/// One model's waiting requests and its observed dispatch rate.
pub struct ModelQueue {
    waiting: Mutex<AdmissionQueue<Waiter>>,
    dispatches: Mutex<RateEstimator>,
    waits: Mutex<AvgWait>,
    /// Batch lines waiting for spare capacity, oldest first (bounded by `batch.max_concurrency`: the
    /// runner has at most that many lines out).
    batch: Mutex<VecDeque<Waiter>>,
}

struct Waiter {
    tx: oneshot::Sender<Reservation>,
    /// The prefill time each worker's cache would save this request: a freed worker counts it as time
    /// already waited among waiters of equal standing (see `guard::AdmissionQueue::pop_preferring`).
    affinity: Option<Affinity>,
}

/// The prefill time the prefix cache of the worker with this id would save a waiting request, as
/// predicted by the routing policy (called under the queue's lock: the policy's lock is only ever taken
/// inside it).
pub type Affinity = Box<dyn Fn(WorkerId) -> Duration + Send + Sync>;

/// A load slot held on a worker for one dequeued request; released when dropped unused.
pub struct Reservation {
    worker: Arc<Worker>,
    admission: Weak<Admission>,
    live: bool,
}

impl Reservation {
    /// The worker the slot is on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Gives the slot up to the request's load guard: the caller now counts it as in flight.
    pub fn consume(mut self) {
        self.live = false;
        self.worker.stats.reserved.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.live {
            self.worker.stats.reserved.fetch_sub(1, Ordering::Relaxed);
            if let Some(admission) = self.admission.upgrade() {
                admission.slot_freed(&self.worker);
            }
        }
    }
}

/// What a request learned from the queue: its position when it entered (0 = did not wait) and the
/// estimated wait then.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueTicket {
    /// 1-based position on entry, 0 when it went straight through.
    pub position: usize,
    /// Estimated wait on entry.
    pub estimated_wait: Duration,
    /// How long it actually waited.
    pub waited: Duration,
}

/// Removes a waiter that gave up (timeout or client disconnect) from its queue, and counts why.
struct Leave<'a> {
    queue: &'a ModelQueue,
    ticket: Option<Ticket>,
    rejected: &'a prometheus::IntCounterVec,
    model: &'a str,
    reason: &'static str,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            if self.queue.waiting.lock().remove(ticket).is_some() {
                self.rejected.with_label_values(&[self.model, self.reason]).inc();
            }
        }
    }
}

impl Admission {
    /// An admission controller with `cfg`, counting requests that leave without a worker in `rejected`
    /// (labels `model`, `reason`).
    pub fn new(cfg: &QueueConfig, rejected: prometheus::IntCounterVec) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            cfg: ArcSwap::from_pointee(cfg.clone()),
            rejected,
            queues: Mutex::default(),
            batch_share: AtomicU64::new(0.8f64.to_bits()),
            me: me.clone(),
        })
    }

    /// Sets the share of each worker's slots batch lines may fill (`batch.max_share`, 0..=1).
    pub fn set_batch_share(&self, share: f64) {
        self.batch_share.store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// The settings in force.
    pub fn config(&self) -> Arc<QueueConfig> {
        self.cfg.load_full()
    }

    /// Applies new settings; queued requests stay.
    pub fn reconfigure(&self, cfg: &QueueConfig) {
        self.cfg.store(Arc::new(cfg.clone()));
        for q in self.queues.lock().values() {
            q.waiting.lock().set_config(cfg.ordering());
        }
    }

    fn queue(&self, model: &Arc<str>) -> Arc<ModelQueue> {
        let cfg = self.cfg.load();
        Arc::clone(self.queues.lock().entry(Arc::clone(model)).or_insert_with(|| {
            Arc::new(ModelQueue {
                waiting: Mutex::new(AdmissionQueue::new(cfg.ordering())),
                dispatches: Mutex::new(RateEstimator::default()),
                waits: Mutex::new(AvgWait::default()),
                batch: Mutex::default(),
            })
        }))
    }

    /// Whether `worker` can take one more request (in flight plus reserved below its capacity).
    pub fn has_room(&self, worker: &Worker) -> bool {
        let cap = worker.capacity(self.cfg.load().default_worker_concurrency);
        let s = &worker.stats;
        s.in_flight.load(Ordering::Relaxed) + s.reserved.load(Ordering::Relaxed) < cap
    }

    /// Slots of `worker` a request of `class` may fill: all of them for live classes, `batch.max_share`
    /// of them (rounded down) for batch lines. Unlimited stays unlimited.
    pub fn slots_for(&self, worker: &Worker, class: Priority) -> u32 {
        let cap = worker.capacity(self.cfg.load().default_worker_concurrency);
        if class != Priority::Batch || cap == u32::MAX {
            return cap;
        }
        batch_slots(cap, f64::from_bits(self.batch_share.load(Ordering::Relaxed)))
    }

    /// Whether a batch line may take a slot on `worker` now (in flight plus reserved below
    /// [`Admission::slots_for`] the batch class).
    pub fn has_batch_room(&self, worker: &Worker) -> bool {
        let s = &worker.stats;
        s.in_flight.load(Ordering::Relaxed) + s.reserved.load(Ordering::Relaxed)
            < self.slots_for(worker, Priority::Batch)
    }

    /// [`Admission::has_room`] for a request of `class`.
    pub fn has_room_for(&self, worker: &Worker, class: Priority) -> bool {
        if class == Priority::Batch {
            self.has_batch_room(worker)
        } else {
            self.has_room(worker)
        }
    }

    /// Lets a request for `model` through at once when a candidate has room and nobody waits; else
    /// queues it until a slot is reserved for it, the queue timeout passes (504), or the queue is
    /// full (429). `candidates` are the eligible workers for the model; `affinity` is asked for only
    /// when the request waits.
    pub async fn admit(
        &self,
        model: &Arc<str>,
        candidates: &[&Arc<Worker>],
        class: Priority,
        tenant: u64,
        affinity: impl FnOnce() -> Option<Affinity>,
    ) -> Result<(QueueTicket, Option<Reservation>), GatewayError> {
        let cfg = self.cfg.load_full();
        let queue = self.queue(model);
        let now = Instant::now();
        if !cfg.enabled || candidates.is_empty() {
            return Ok((QueueTicket::default(), None));
        }
        if class == Priority::Batch {
            return self.admit_batch(&queue, candidates).await;
        }
        if queue.waiting.lock().is_empty() && candidates.iter().any(|w| self.has_room(w)) {
            return Ok((QueueTicket::default(), None));
        }
        let (tx, rx) = oneshot::channel();
        let (ticket, position) = {
            let mut waiting = queue.waiting.lock();
            match waiting.push(Waiter { tx, affinity: affinity() }, class, tenant, now) {
                Ok(ticket) => (ticket, waiting.position(ticket, now).unwrap_or(waiting.len())),
                Err(_) => {
                    drop(waiting);
                    self.rejected.with_label_values(&[model, "queue_full"]).inc();
                    let wait = queue.dispatches.lock().estimated_wait(1, now);
                    return Err(GatewayError::new(
                        ErrorKind::QueueFull,
                        format!("the queue for model `{model}` is full ({} waiting); retry later", cfg.max_size),
                    )
                    .with_retry_after(wait.as_secs_f64().ceil().max(1.0) as u64));
                }
            }
        };
        let estimated_wait = queue.dispatches.lock().estimated_wait(position, now);
        let mut leave =
            Leave { queue: &queue, ticket: Some(ticket), rejected: &self.rejected, model, reason: "cancelled" };
        // Room may exist already (the queue was not empty, or capacity grew): hand it out now.
        for w in candidates {
            self.dispatch_to(&queue, w);
        }
        let timeout = Duration::from_secs(cfg.timeout_secs);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reservation)) => {
                leave.ticket = None;
                let waited = now.elapsed();
                Ok((QueueTicket { position, estimated_wait, waited }, Some(reservation)))
            }
            // The sender is dropped only with the queue entry (a reconfigure never drops entries).
            Ok(Err(_)) => Err(GatewayError::new(ErrorKind::Internal, "the admission queue dropped a waiting request")),
            Err(_) => Err({
                leave.reason = "queue_timeout";
                GatewayError::new(
                    ErrorKind::QueueTimeout,
                    format!("waited {}s in the queue for model `{model}` without a free worker", cfg.timeout_secs),
                )
            }),
        }
    }

    /// A batch line: straight through when a candidate has batch room and nobody (live or batch) waits
    /// for the model; else it waits, without timeout (the runner gives up by dropping it), until a slot
    /// no live request wants is reserved for it.
    async fn admit_batch(
        &self,
        queue: &ModelQueue,
        candidates: &[&Arc<Worker>],
    ) -> Result<(QueueTicket, Option<Reservation>), GatewayError> {
        let idle = queue.waiting.lock().is_empty() && queue.batch.lock().is_empty();
        if idle && candidates.iter().any(|w| self.has_batch_room(w)) {
            return Ok((QueueTicket::default(), None));
        }
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let position = {
            let mut batch = queue.batch.lock();
            batch.retain(|w| !w.tx.is_closed());
            batch.push_back(Waiter { tx, affinity: None });
            batch.len()
        };
        for w in candidates {
            self.slot_freed(w);
        }
        match rx.await {
            Ok(reservation) => {
                Ok((QueueTicket { position, estimated_wait: Duration::ZERO, waited: now.elapsed() }, Some(reservation)))
            }
            Err(_) => Err(GatewayError::new(ErrorKind::Internal, "the admission queue dropped a waiting batch line")),
        }
    }

    /// A slot freed on `worker`: the best live waiter of a model it serves gets it; when no live request
    /// waits for the worker, the oldest batch line gets it (within the batch share).
    pub fn slot_freed(&self, worker: &Arc<Worker>) {
        let queues: Vec<Arc<ModelQueue>> = {
            let all = self.queues.lock();
            worker.models.load().iter().filter_map(|m| all.get(m.as_str()).cloned()).collect()
        };
        for q in &queues {
            self.dispatch_to(q, worker);
        }
        if queues.iter().all(|q| q.waiting.lock().is_empty()) {
            for q in &queues {
                self.dispatch_batch_to(q, worker);
            }
        }
    }

    /// Hands `worker`'s free slots to `queue`'s best waiters while it has room; among waiters of equal
    /// standing, the one whose wait plus the prefill the worker's cache saves it is longest.
    fn dispatch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) {
        if !worker.is_available() {
            return;
        }
        let mut waiting = queue.waiting.lock();
        let held = |w: &Waiter| w.affinity.as_ref().map_or(Duration::ZERO, |f| f(worker.id));
        while self.has_room(worker) {
            let Some((_, waiter)) = waiting.pop_preferring(Instant::now(), |_| true, held) else { return };
            self.hand_over(worker, waiter);
        }
    }

    /// Hands `worker`'s spare slots (within the batch share) to `queue`'s oldest batch lines.
    fn dispatch_batch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) {
        if !worker.is_available() {
            return;
        }
        let mut batch = queue.batch.lock();
        while self.has_batch_room(worker) {
            let Some(waiter) = batch.pop_front() else { return };
            self.hand_over(worker, waiter);
        }
    }

    /// Reserves a slot on `worker` for `waiter`.
    fn hand_over(&self, worker: &Arc<Worker>, waiter: Waiter) {
        worker.stats.reserved.fetch_add(1, Ordering::Relaxed);
        let reservation = Reservation { worker: Arc::clone(worker), admission: self.me.clone(), live: true };
        if let Err(mut unsent) = waiter.tx.send(reservation) {
            // The waiter is gone: take the slot back here (no re-entry while the queue is locked).
            unsent.live = false;
            worker.stats.reserved.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Counts a dispatch of a request for `model` (the rate behind wait estimates and `Retry-After`),
    /// and how long it waited.
    pub fn record_dispatch(&self, model: &Arc<str>, waited: Duration) {
        let q = self.queue(model);
        let now = Instant::now();
        q.dispatches.lock().record(now);
        q.waits.lock().record(now, waited);
    }

    /// Hands out room that appeared without a slot freeing (workers added, recovered, learned larger).
    pub fn sweep(&self, fleet: &Fleet) {
        let queues: Vec<(Arc<str>, Arc<ModelQueue>)> =
            self.queues.lock().iter().map(|(m, q)| (Arc::clone(m), Arc::clone(q))).collect();
        for (model, q) in queues {
            if q.waiting.lock().is_empty() && q.batch.lock().is_empty() {
                continue;
            }
            for w in fleet.workers.iter().filter(|w| w.serves(&model)) {
                self.slot_freed(w);
            }
        }
    }

    /// Runs [`Admission::sweep`] every `period` until `app` shuts down.
    pub async fn run_sweeper(app: Weak<AppState>, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            let Some(app) = app.upgrade() else { return };
            if app.shutdown.is_cancelled() {
                return;
            }
            app.admission.sweep(&app.snapshot.load().fleet);
        }
    }

    /// Sets the queue-length gauges (when `/metrics` is scraped).
    pub fn export(&self, metrics: &crate::metrics::Metrics) {
        for (model, q) in self.queues.lock().iter() {
            metrics.queue_length.with_label_values(&[model]).set(q.waiting.lock().len() as i64);
        }
    }

    /// The body of `GET /api/queue` for the models queued so far.
    pub fn models_json(&self) -> serde_json::Map<String, Value> {
        let now = Instant::now();
        self.queues
            .lock()
            .iter()
            .map(|(model, q)| {
                let waiting = q.waiting.lock();
                let c = waiting.counts_by_class();
                let v = json!({
                    "length": waiting.len(),
                    "by_class": {"urgent": c[0], "high": c[1], "normal": c[2], "low": c[3]},
                    "batch_waiting": q.batch.lock().len(),
                    "oldest_wait_ms": waiting.oldest_wait(now).map(|d| d.as_millis() as u64),
                    "avg_wait_ms_1h": q.waits.lock().average(now).map(|d| d.as_millis() as u64),
                    "dispatch_rate": q.dispatches.lock().per_sec(now),
                });
                (model.to_string(), v)
            })
            .collect()
    }
}

/// `share` of `cap` slots, rounded down: the most a batch may fill on a worker of capacity `cap`.
fn batch_slots(cap: u32, share: f64) -> u32 {
    (f64::from(cap) * share).floor() as u32
}

/// The body of `GET /api/queue`: per model `{"length","by_class":{"urgent","high","normal","low"},
/// "oldest_wait_ms","avg_wait_ms_1h","dispatch_rate"}`, and `"in_flight"` per worker name.
pub fn queue_json(app: &AppState) -> Value {
    let snap = app.snapshot.load();
    let in_flight: serde_json::Map<String, Value> =
        snap.fleet.workers.iter().map(|w| (w.name.clone(), json!(w.stats.in_flight.load(Ordering::Relaxed)))).collect();
    json!({"models": app.admission.models_json(), "in_flight": in_flight})
}

/// `GET /api/queue`.
pub async fn queue_endpoint(axum::extract::State(app): axum::extract::State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(queue_json(&app))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;

    fn worker(cap: u32) -> Arc<Worker> {
        let mut spec = WorkerConfig::from_url("http://127.0.0.1:1");
        spec.max_concurrency = cap;
        let w = Arc::new(Worker::new(1, spec));
        w.stats.healthy.store(true, Ordering::Relaxed);
        w.models.store(Arc::new(vec!["m".to_string()]));
        w
    }

    fn admission() -> Arc<Admission> {
        let rejected =
            prometheus::IntCounterVec::new(prometheus::Opts::new("r", "r"), &["model", "reason"]).expect("metric");
        Admission::new(&QueueConfig::default(), rejected)
    }

    #[test]
    fn batch_slots_round_down() {
        assert_eq!(batch_slots(10, 0.8), 8);
        assert_eq!(batch_slots(1, 0.8), 0);
        assert_eq!(batch_slots(5, 1.0), 5);
        assert_eq!(batch_slots(5, 0.0), 0);
    }

    #[test]
    fn batch_lines_fill_at_most_their_share_and_live_requests_find_room() {
        let a = admission();
        a.set_batch_share(0.5);
        let w = worker(4);
        assert_eq!(a.slots_for(&w, Priority::Batch), 2);
        assert_eq!(a.slots_for(&w, Priority::Low), 4);
        w.stats.in_flight.store(2, Ordering::Relaxed);
        assert!(!a.has_batch_room(&w), "the batch share is full");
        assert!(a.has_room_for(&w, Priority::Normal), "live traffic still has room");
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_a_live_waiter_before_a_batch_line() {
        let a = admission();
        a.set_batch_share(1.0);
        let w = worker(1);
        w.stats.in_flight.store(1, Ordering::Relaxed);
        let model: Arc<str> = Arc::from("m");
        let cands = [&w];
        let batch = {
            let (a, model) = (Arc::clone(&a), Arc::clone(&model));
            let w = Arc::clone(&w);
            tokio::spawn(
                async move { a.admit(&model, &[&w], Priority::Batch, 1, || None).await.map(|(_, r)| r.is_some()) },
            )
        };
        // Let the batch line queue first, then a live request arrives behind it.
        while a.queue(&model).batch.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        let live = a.admit(&model, &cands, Priority::Low, 2, || None);
        tokio::pin!(live);
        assert!(futures_util::poll!(&mut live).is_pending(), "no room yet");
        // The slot frees: the live waiter gets it although the batch line waited longer.
        w.stats.in_flight.store(0, Ordering::Relaxed);
        a.slot_freed(&w);
        let (_, reservation) = live.await.expect("admitted");
        let reservation = reservation.expect("a reservation");
        assert!(!batch.is_finished(), "the batch line still waits");
        // The live request ends: now the batch line gets the slot.
        drop(reservation);
        assert!(batch.await.expect("joins").expect("admitted"), "reserved for the batch line");
    }
}
