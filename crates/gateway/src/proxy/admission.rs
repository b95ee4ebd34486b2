//! The admission queue: when every worker for a model is at capacity, requests wait here instead of
//! piling onto a worker's own queue, and leave in priority, aging and fairness order (the ordering is
//! the pure `guard::AdmissionQueue`).
//!
//! Dispatch is event-driven. When a load slot frees ([`crate::fleet::slot::LoadGuard`] drops and tells
//! the queue through [`SlotFreed`]), the best waiter that worker can serve is handed a [`Reservation`] on
//! it through a oneshot channel: the slot is its, so a request arriving at that moment cannot take it,
//! and nothing polls. A reservation that is never used (the waiter left) releases itself when dropped,
//! which frees the slot for the next one. The slot counts themselves are only moved by those guards
//! ([`crate::fleet::slot`]); this module decides who gets a slot, never counts one by hand.
//! A slow sweep ([`Admission::run_sweeper`]) only covers capacity that appears without a slot freeing
//! (a worker added, recovered or learned larger, or load of other replicas gone at the last scrape).
//!
//! Capacity is what [`Admission::capacity_of`] says: the worker's, less the load it reported at its last
//! scrape that this gateway did not send (`guard::share`), so replicas that share workers without a
//! shared count overshoot by at most what arrives between two scrapes. A lone gateway sees none.
//!
//! Batch API lines ([`Priority::Batch`]) take only spare capacity. They wait in a FIFO of their own per
//! model, apart from the live queue (so they never take a live request's place in `max_size`), and never
//! age. A batch line takes a slot only while the worker's in-flight plus reserved count is below
//! `batch.max_share` of its capacity ([`Admission::has_batch_room`]), and a freed slot goes to a batch
//! line only when no live request waits for that worker. With the queue disabled (no capacity model)
//! only the batch runner's own `batch.max_concurrency` bounds batch lines.

use crate::config::QueueConfig;
use crate::fleet::slot::{Notify, Reservation, SlotFreed};
use crate::fleet::worker::Worker;
use crate::fleet::Fleet;
use arc_swap::ArcSwap;
use gateway_core::{ErrorKind, GatewayError, Priority, WorkerId};
use guard::{AdmissionQueue, AvgWait, RateEstimator, Ticket};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Every model's queue, and the queue settings in force.
pub struct Admission {
    cfg: ArcSwap<QueueConfig>,
    /// `llm_gateway_queue_rejected_total{model,reason}`.
    rejected: prometheus::IntCounterVec,
    queues: Mutex<HashMap<Arc<str>, Arc<ModelQueue>>>,
    /// `batch.max_share` as `f64` bits: the share of a worker's slots batch lines may fill.
    batch_share: AtomicU64,
    /// Discount the load a worker reports that is not ours from its capacity (no shared count in force).
    discount_foreign: AtomicBool,
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
            discount_foreign: AtomicBool::new(true),
            me: me.clone(),
        })
    }

    /// Sets the share of each worker's slots batch lines may fill (`batch.max_share`, 0..=1).
    pub fn set_batch_share(&self, share: f64) {
        self.batch_share.store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Whether a worker's capacity is discounted by the load it reports that this gateway did not send
    /// (`guard::share`): on, unless the slots are counted across replicas in Redis.
    pub fn set_discount_foreign(&self, on: bool) {
        self.discount_foreign.store(on, Ordering::Relaxed);
    }

    /// The slots of `worker` this gateway may fill: its capacity, less the load others put on it when
    /// that is discounted, or none while the shared count (`[cluster]`) is full there. The one capacity
    /// every room test of the queue uses.
    pub fn capacity_of(&self, worker: &Worker) -> u32 {
        // The shared count refused a slot here and none freed since: wait for one.
        if worker.stats.share.is_full() {
            return 0;
        }
        let cap = worker.capacity(self.cfg.load().default_worker_concurrency);
        if !self.discount_foreign.load(Ordering::Relaxed) {
            return cap;
        }
        guard::room_for_us(cap, worker.stats.foreign_load.load(Ordering::Relaxed))
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

    /// Whom a load guard or reservation tells when its slot frees: this queue.
    pub fn notify(&self) -> Notify {
        let me: Weak<dyn SlotFreed> = self.me.clone();
        Some(me)
    }

    /// Whether `worker` can take one more request (in flight plus reserved below its capacity).
    pub fn has_room(&self, worker: &Worker) -> bool {
        worker.stats.slots.has_room(self.capacity_of(worker))
    }

    /// Slots of `worker` a request of `class` may fill: all of them for live classes, `batch.max_share`
    /// of them (rounded down) for batch lines. Unlimited stays unlimited.
    pub fn slots_for(&self, worker: &Worker, class: Priority) -> u32 {
        let cap = self.capacity_of(worker);
        if class != Priority::Batch || cap == u32::MAX {
            return cap;
        }
        batch_slots(cap, f64::from_bits(self.batch_share.load(Ordering::Relaxed)))
    }

    /// Whether a batch line may take a slot on `worker` now (in flight plus reserved below
    /// [`Admission::slots_for`] the batch class).
    pub fn has_batch_room(&self, worker: &Worker) -> bool {
        worker.stats.slots.has_room(self.slots_for(worker, Priority::Batch))
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
            match waiting.push(Waiter { tx, affinity: affinity() }, class, tenant, now.into_std()) {
                Ok(ticket) => (ticket, waiting.position(ticket, now.into_std()).unwrap_or(waiting.len())),
                Err(_) => {
                    drop(waiting);
                    self.rejected.with_label_values(&[model, "queue_full"]).inc();
                    let wait = queue.dispatches.lock().estimated_wait(1, now.into_std());
                    return Err(GatewayError::new(
                        ErrorKind::QueueFull,
                        format!("the queue for model `{model}` is full ({} waiting); retry later", cfg.max_size),
                    )
                    .with_retry_after(wait.as_secs_f64().ceil().max(1.0) as u64));
                }
            }
        };
        let estimated_wait = queue.dispatches.lock().estimated_wait(position, now.into_std());
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
    /// standing, the one whose wait plus the prefill the worker's cache saves it is longest. The slot
    /// is reserved (a compare-and-swap against capacity) before a waiter is taken from the queue.
    fn dispatch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) {
        if !worker.is_available() {
            return;
        }
        let cap = self.capacity_of(worker);
        let mut waiting = queue.waiting.lock();
        let held = |w: &Waiter| w.affinity.as_ref().map_or(Duration::ZERO, |f| f(worker.id));
        while !waiting.is_empty() {
            let Some(slot) = Reservation::try_take(worker, cap, self.notify()) else { return };
            let Some((_, waiter)) = waiting.pop_preferring(Instant::now().into_std(), |_| true, held) else {
                slot.return_quietly();
                return;
            };
            hand_over(waiter, slot);
        }
    }

    /// Hands `worker`'s spare slots (within the batch share) to `queue`'s oldest batch lines.
    fn dispatch_batch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) {
        if !worker.is_available() {
            return;
        }
        let cap = self.slots_for(worker, Priority::Batch);
        let mut batch = queue.batch.lock();
        while !batch.is_empty() {
            let Some(slot) = Reservation::try_take(worker, cap, self.notify()) else { return };
            let Some(waiter) = batch.pop_front() else {
                slot.return_quietly();
                return;
            };
            hand_over(waiter, slot);
        }
    }

    /// Counts a dispatch of a request for `model` (the rate behind wait estimates and `Retry-After`),
    /// and how long it waited.
    pub fn record_dispatch(&self, model: &Arc<str>, waited: Duration) {
        let q = self.queue(model);
        let now = Instant::now().into_std();
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

    /// Runs [`Admission::sweep`] every `period` over the workers `fleet` returns (the fleet in force;
    /// `None` once the gateway is gone) until `stop` is cancelled.
    pub async fn run_sweeper(
        self: Arc<Self>,
        period: Duration,
        stop: CancellationToken,
        fleet: impl Fn() -> Option<Arc<Fleet>>,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let Some(fleet) = fleet() else { return };
            self.sweep(&fleet);
        }
    }

    /// Sets the queue-length gauges (when `/metrics` is scraped).
    pub fn export(&self, metrics: &crate::metrics::Metrics) {
        for (model, q) in self.queues.lock().iter() {
            metrics.queue_length.with_label_values(&[model]).set(q.waiting.lock().len() as i64);
        }
    }

    /// Each model's queue as of now (the models queued so far), for the admin API.
    pub fn stats(&self) -> Vec<QueueStats> {
        let now = Instant::now().into_std();
        self.queues
            .lock()
            .iter()
            .map(|(model, q)| {
                let waiting = q.waiting.lock();
                QueueStats {
                    model: Arc::clone(model),
                    length: waiting.len(),
                    by_class: waiting.counts_by_class(),
                    batch_waiting: q.batch.lock().len(),
                    oldest_wait: waiting.oldest_wait(now),
                    avg_wait_1h: q.waits.lock().average(now),
                    dispatch_rate: q.dispatches.lock().per_sec(now),
                }
            })
            .collect()
    }
}

impl SlotFreed for Admission {
    fn slot_freed(&self, worker: &Arc<Worker>) {
        Admission::slot_freed(self, worker);
    }
}

/// Sends `slot` to `waiter`; a waiter that has left gets nothing, and the slot goes back without a
/// notification (the caller holds the queue lock a notification would take again).
fn hand_over(waiter: Waiter, slot: Reservation) {
    if let Err(unsent) = waiter.tx.send(slot) {
        unsent.return_quietly();
    }
}

/// One model's queue at a moment.
#[derive(Debug, Clone)]
pub struct QueueStats {
    /// The model.
    pub model: Arc<str>,
    /// Live requests waiting.
    pub length: usize,
    /// Of those, per class: urgent, high, normal, low.
    pub by_class: [usize; 4],
    /// Batch lines waiting for spare capacity.
    pub batch_waiting: usize,
    /// How long the oldest live waiter has waited.
    pub oldest_wait: Option<Duration>,
    /// Average wait of the requests dispatched in the last hour.
    pub avg_wait_1h: Option<Duration>,
    /// Dispatches per second, recently.
    pub dispatch_rate: f64,
}

/// `share` of `cap` slots, rounded down: the most a batch may fill on a worker of capacity `cap`.
fn batch_slots(cap: u32, share: f64) -> u32 {
    (f64::from(cap) * share).floor() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;
    use crate::fleet::slot::LoadGuard;

    fn worker(cap: u32) -> Arc<Worker> {
        let mut spec = WorkerConfig::from_url("http://127.0.0.1:1");
        spec.max_concurrency = cap;
        let w = Arc::new(Worker::new(1, spec));
        w.stats.healthy.store(true, Ordering::Relaxed);
        w.models.store(Arc::new(vec!["m".to_string()]));
        w
    }

    fn admission_with(cfg: QueueConfig) -> Arc<Admission> {
        let rejected =
            prometheus::IntCounterVec::new(prometheus::Opts::new("r", "r"), &["model", "reason"]).expect("metric");
        Admission::new(&cfg, rejected)
    }

    fn admission() -> Arc<Admission> {
        admission_with(QueueConfig::default())
    }

    /// A request for model `m` of `class` from `tenant`, admitted in the background: whether it got a
    /// reserved slot, held until the task's result is dropped.
    fn spawn_admit(
        a: &Arc<Admission>,
        w: &Arc<Worker>,
        class: Priority,
        tenant: u64,
    ) -> tokio::task::JoinHandle<Result<Option<Reservation>, GatewayError>> {
        let (a, w) = (Arc::clone(a), Arc::clone(w));
        tokio::spawn(async move { a.admit(&Arc::from("m"), &[&w], class, tenant, || None).await.map(|(_, r)| r) })
    }

    /// Yields until `n` live requests wait for model `m`.
    async fn until_waiting(a: &Admission, n: usize) {
        while a.queue(&Arc::from("m")).waiting.lock().len() != n {
            tokio::task::yield_now().await;
        }
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
        let _held: Vec<_> = (0..2).map(|_| LoadGuard::try_take(&w, 4, None).expect("room")).collect();
        assert!(!a.has_batch_room(&w), "the batch share is full");
        assert!(a.has_room_for(&w, Priority::Normal), "live traffic still has room");
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_a_live_waiter_before_a_batch_line() {
        let a = admission();
        a.set_batch_share(1.0);
        let w = worker(1);
        let busy = LoadGuard::try_take(&w, 1, a.notify()).expect("room");
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
        drop(busy);
        let (_, reservation) = live.await.expect("admitted");
        let reservation = reservation.expect("a reservation");
        assert_eq!(w.stats.slots.reserved(), 1);
        assert!(!batch.is_finished(), "the batch line still waits");
        // The live request ends: now the batch line gets the slot.
        drop(reservation);
        assert!(batch.await.expect("joins").expect("admitted"), "reserved for the batch line");
        assert_eq!(w.stats.slots.taken(), 0, "the batch line's reservation was dropped with its task");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_504_exactly_at_the_queue_timeout() {
        let a = admission_with(QueueConfig { timeout_secs: 5, ..QueueConfig::default() });
        let w = worker(1);
        let _busy = LoadGuard::try_take(&w, 1, a.notify()).expect("room");
        let started = Instant::now();
        let model: Arc<str> = Arc::from("m");
        let cands = [&w];
        let wait = a.admit(&model, &cands, Priority::Normal, 1, || None);
        tokio::pin!(wait);
        assert!(futures_util::poll!(&mut wait).is_pending(), "queued");
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(futures_util::poll!(&mut wait).is_pending(), "still waiting just before the timeout");
        tokio::time::advance(Duration::from_millis(1)).await;
        let Err(err) = wait.await else { panic!("admitted without a free slot") };
        assert_eq!((err.kind, err.status()), (ErrorKind::QueueTimeout, 504));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(a.queue(&model).waiting.lock().len(), 0, "the waiter left the queue");
        assert_eq!(a.rejected.with_label_values(&["m", "queue_timeout"]).get(), 1);
        assert_eq!(w.stats.slots.taken(), 1, "only the busy request holds a slot");
    }

    #[tokio::test(start_paused = true)]
    async fn an_aged_low_request_leaves_before_a_newer_normal_one() {
        for (waited_ms, first) in [(999, Priority::Normal), (1_000, Priority::Low)] {
            let a = admission_with(QueueConfig { aging_secs: 1, ..QueueConfig::default() });
            let w = worker(1);
            let busy = LoadGuard::try_take(&w, 1, a.notify()).expect("room");
            let low = spawn_admit(&a, &w, Priority::Low, 1);
            until_waiting(&a, 1).await;
            tokio::time::advance(Duration::from_millis(waited_ms)).await;
            let normal = spawn_admit(&a, &w, Priority::Normal, 2);
            until_waiting(&a, 2).await;
            drop(busy);
            let (winner, loser) = if first == Priority::Low { (low, normal) } else { (normal, low) };
            let slot = winner.await.expect("joins").expect("admitted").expect("a reserved slot");
            assert_eq!(a.queue(&Arc::from("m")).waiting.lock().len(), 1, "after {waited_ms} ms: {first:?} left first");
            drop(slot);
            assert!(loser.await.expect("joins").expect("admitted").is_some(), "the other one follows");
        }
    }
}
