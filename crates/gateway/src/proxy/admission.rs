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
//! A slow sweep ([`Admission::sweep`], every 500 ms) only covers capacity that appears without a slot freeing
//! (a worker added, recovered or learned larger, or load of other replicas gone at the last scrape).
//!
//! Capacity is what [`Admission::capacity_of`] says: the worker's, less the load it reported at its last
//! scrape that this gateway did not send (`guard::share`), so replicas that share workers without a
//! shared count overshoot by at most what arrives between two scrapes. A lone gateway sees none.
//!
//! **Deadlines**: every live waiter has one ([`WaitSpec::deadline`]: arrival plus the model's queue
//! timeout, or less with `X-Request-Timeout`); within a level earlier deadlines leave first, and a
//! waiter still queued at its deadline leaves at once with 504.
//!
//! **Waiting for budget** (`rate_limit.on_limit = "queue"`, [`Admission::wait_for_budget`]): a request
//! over a per-key or per-model rate limit waits in the same queue (it counts in the length and in
//! `X-Queue-Position`) but never takes a worker slot while it waits, so nobody else's live requests
//! are held up by it. Waiters for the same budget (a tenant's, or the model's) get it in queue order
//! with `fits` = "its budget has refilled for it": the best of them checks when its refill instant
//! comes (a timer at that instant, no polling); if it is not the best it sleeps until woken by a
//! waiter of its budget leaving, its own refill instant or its next aging step. The best waiter that
//! does not fit yet holds the budget for itself, so small requests fit first (`token_fit`) but cannot
//! starve a large one once aging has lifted it to the top.
//!
//! **Model concurrency** (`[[models]] max_concurrency`): a [`ModelPermit`] per request in flight to
//! the model, held in the response body like the load guard; a request finding none waits (FIFO,
//! woken by a permit's release) until its deadline.
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
use guard::{AdmissionQueue, AvgWait, Better, Fit, Meta, RateEstimator, Ticket};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::sync::Notify as Wake;
use tokio::time::Instant;

/// Every model's queue, and the queue settings in force.
pub struct Admission {
    cfg: ArcSwap<QueueConfig>,
    /// `llm_gateway_queue_rejected_total{model,reason}`.
    rejected: prometheus::IntCounterVec,
    queues: Mutex<crate::config::ModelMap<Arc<ModelQueue>>>,
    /// `batch.max_share` as `f64` bits: the share of a worker's slots batch lines may fill.
    batch_share: AtomicU64,
    /// In-flight counts of the models with `max_concurrency` (bounded by [`crate::config::MAX_MODELS`]).
    model_slots: Mutex<crate::config::ModelMap<Arc<ModelSlots>>>,
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
    /// Woken when a budget waiter leaves (the next of its budget may check).
    budget_left: Wake,
}

struct Waiter {
    /// Where its reservation goes; `None` for a budget waiter, which no worker slot is handed to.
    tx: Option<oneshot::Sender<Reservation>>,
    /// Waiting for rate-limit budget rather than a worker slot.
    budget: Option<BudgetWait>,
    /// The time each worker would spend before this request's first token (its prefill of the part of
    /// the prompt the worker does not hold), as the routing policy predicts it.
    affinity: Option<Affinity>,
    /// The workers it may run on (eligible when it queued): where a better fit than the freed one is looked for.
    workers: Vec<Arc<Worker>>,
}

/// A waiter for budget: which budget, and when it will have refilled for it.
#[derive(Debug, Clone, Copy)]
struct BudgetWait {
    key: u64,
    ready_at: Instant,
}

impl Waiter {
    fn budget_key(&self) -> Option<u64> {
        self.budget.map(|b| b.key)
    }

    fn fits(&self, now: Instant) -> bool {
        self.budget.is_none_or(|b| b.ready_at <= now)
    }

    /// How this waiter fits `worker`, whose slot freed: its time to first token there, and the
    /// available worker among its own that would take less, with that worker's slot interval (its own
    /// measured pace; until one is measured, `per_worker` (the model's recent dispatch interval) times
    /// the workers sharing it); see `guard::AdmissionQueue::pop_preferring`.
    fn fit(&self, worker: &Worker, per_worker: Duration) -> Fit {
        let Some(prefill) = &self.affinity else { return Fit::default() };
        let here = prefill(worker.id);
        let better = self
            .workers
            .iter()
            .filter(|w| w.id != worker.id && w.is_available())
            .map(|w| (w, prefill(w.id)))
            .min_by_key(|&(_, t)| t)
            .filter(|&(_, t)| t + FIT_TIE < here)
            .map(|(w, there)| {
                let shared = per_worker.saturating_mul(u32::try_from(self.workers.len()).unwrap_or(u32::MAX));
                Better { worker: w.id, there, interval: w.slot_interval().unwrap_or(shared) }
            });
        Fit { here, better }
    }
}

/// How one request waits: class, tenant, deadline, returns to the queue, and its model's queue bound.
#[derive(Debug, Clone, Copy)]
pub struct WaitSpec {
    /// Priority class.
    pub class: Priority,
    /// Fairness key of its tenant.
    pub tenant: u64,
    /// When it must have left the queue: a waiter still queued then gets 504 at once.
    pub deadline: Instant,
    /// Times it came back to the queue (a failed attempt with no room, a budget still short).
    pub retries: u32,
    /// `queue.max_size`, or its model's `queue_max_size`.
    pub max_size: usize,
}

impl WaitSpec {
    fn meta(&self) -> Meta {
        Meta { class: self.class, tenant: self.tenant, deadline: Some(self.deadline.into_std()), retries: self.retries }
    }
}

/// A model's requests in flight, against its `max_concurrency`.
#[derive(Debug, Default)]
struct ModelSlots {
    in_flight: AtomicU32,
    freed: Wake,
}

/// One request in flight to a model with `max_concurrency`; released (and the next waiter woken) when
/// dropped, which the response body does when it ends, however it ends.
#[derive(Debug)]
pub struct ModelPermit(Arc<ModelSlots>);

impl Drop for ModelPermit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

impl ModelSlots {
    fn try_take(self: &Arc<Self>, limit: u32) -> Option<ModelPermit> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| ModelPermit(Arc::clone(self)))
    }
}

/// The 504 of a request whose queue deadline passed.
fn queue_timeout(model: &str, allowed: Duration) -> GatewayError {
    GatewayError::new(
        ErrorKind::QueueTimeout,
        format!(
            "waited {:.1}s in the queue for model `{model}` (its deadline) without being admitted",
            allowed.as_secs_f64()
        ),
    )
}

/// The time the worker with this id would spend before a waiting request's first token (the prefill of
/// the part of its prompt the worker's cache does not hold), as predicted by the routing policy (called
/// under the queue's lock: the policy's lock is only ever taken inside it).
pub type Affinity = Box<dyn Fn(WorkerId) -> Duration + Send + Sync>;

/// Fits closer than this are equal: a better worker must save more than this to be waited for.
const FIT_TIE: Duration = Duration::from_millis(5);

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
            let removed = self.queue.waiting.lock().remove(ticket);
            if let Some(w) = removed {
                self.rejected.with_label_values(&[self.model, self.reason]).inc();
                if w.budget.is_some() {
                    self.queue.budget_left.notify_waiters();
                }
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
            model_slots: Mutex::default(),
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
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(model) {
            return Arc::clone(q);
        }
        let cfg = self.cfg.load();
        Arc::clone(queues.entry(Arc::clone(model)).or_insert_with(|| {
            Arc::new(ModelQueue {
                waiting: Mutex::new(AdmissionQueue::new(cfg.ordering())),
                dispatches: Mutex::new(RateEstimator::default()),
                waits: Mutex::new(AvgWait::default()),
                batch: Mutex::default(),
                budget_left: Wake::new(),
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

    /// A wait for `model` with the queue settings in force: `class`, `tenant`, the deadline `now` plus
    /// the model's queue timeout (capped by `cap`, the client's `X-Request-Timeout`).
    pub fn wait_spec(
        &self,
        config: &crate::config::Config,
        model: &str,
        class: Priority,
        tenant: u64,
        cap: Option<Duration>,
        now: Instant,
    ) -> WaitSpec {
        let allowed = config.queue_timeout(model);
        let allowed = cap.map_or(allowed, |c| c.min(allowed));
        let max_size = config.model(model).and_then(|m| m.queue_max_size).unwrap_or(config.queue.max_size);
        WaitSpec { class, tenant, deadline: now + allowed, retries: 0, max_size }
    }

    /// The queue of `model`, its bound set to `max_size` (the model's own `queue_max_size` is applied
    /// at each push, so a reload changing it needs nothing more).
    fn queue_sized(&self, model: &Arc<str>, max_size: usize) -> Arc<ModelQueue> {
        let queue = self.queue(model);
        {
            let mut waiting = queue.waiting.lock();
            if waiting.config().max_size != max_size {
                let cfg = guard::QueueConfig { max_size, ..waiting.config() };
                waiting.set_config(cfg);
            }
        }
        queue
    }

    /// Lets a request for `model` through at once when a candidate has room and no request waits for
    /// a slot, unless the candidate that would take least for its prompt (per `affinity`) is full: then,
    /// and when every candidate is full, it queues until a slot is reserved for it (the hand-off holds
    /// it out for that worker only while its line is shorter than the prefill saved), its deadline
    /// passes (504), or the queue is full (429). `candidates` are the eligible workers for the model;
    /// `affinity` is asked for only when some candidate is full.
    pub async fn admit(
        &self,
        model: &Arc<str>,
        candidates: &[&Arc<Worker>],
        spec: &WaitSpec,
        affinity: impl FnOnce() -> Option<Affinity>,
    ) -> Result<(QueueTicket, Option<Reservation>), GatewayError> {
        let enabled = self.cfg.load().enabled;
        let queue = self.queue_sized(model, spec.max_size);
        let now = Instant::now();
        if !enabled || candidates.is_empty() {
            return Ok((QueueTicket::default(), None));
        }
        if spec.class == Priority::Batch {
            return self.admit_batch(&queue, candidates).await;
        }
        // Budget waiters take no slot: they do not make a newcomer queue.
        let slot_waiters = queue.waiting.lock().items().any(|w| w.tx.is_some());
        let mut affinity = Some(affinity);
        let mut asked = None;
        let with_room = if slot_waiters { 0 } else { candidates.iter().filter(|w| self.has_room(w)).count() };
        if with_room == candidates.len() {
            return Ok((QueueTicket::default(), None));
        }
        if with_room > 0 {
            // A full worker holding more of the prompt than any with room: the request waits, and the
            // hand-off decides at once whether that worker's line is worth the prefill it saves.
            let prefill = affinity.take().and_then(|a| a());
            if !prefill.as_ref().is_some_and(|p| self.prefers_a_full_worker(p, candidates)) {
                return Ok((QueueTicket::default(), None));
            }
            asked = Some(prefill);
        }
        if now >= spec.deadline {
            return Err(queue_timeout(model, Duration::ZERO));
        }
        let (tx, rx) = oneshot::channel();
        let (ticket, position) = {
            let mut waiting = queue.waiting.lock();
            let workers = candidates.iter().map(|w| Arc::clone(w)).collect();
            let affinity = asked.unwrap_or_else(|| affinity.take().and_then(|a| a()));
            let waiter = Waiter { tx: Some(tx), budget: None, affinity, workers };
            match waiting.push_with(waiter, spec.meta(), now.into_std()) {
                Ok(ticket) => (ticket, waiting.position(ticket, now.into_std()).unwrap_or(waiting.len())),
                Err(_) => {
                    drop(waiting);
                    self.rejected.with_label_values(&[model, "queue_full"]).inc();
                    let wait = queue.dispatches.lock().estimated_wait(1, now.into_std());
                    return Err(GatewayError::new(
                        ErrorKind::QueueFull,
                        format!("the queue for model `{model}` is full ({} waiting); retry later", spec.max_size),
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
        match tokio::time::timeout_at(spec.deadline, rx).await {
            Ok(Ok(reservation)) => {
                leave.ticket = None;
                let waited = now.elapsed();
                Ok((QueueTicket { position, estimated_wait, waited }, Some(reservation)))
            }
            // The sender is dropped only with the queue entry (a reconfigure never drops entries).
            Ok(Err(_)) => Err(GatewayError::new(ErrorKind::Internal, "the admission queue dropped a waiting request")),
            Err(_) => Err({
                leave.reason = "queue_timeout";
                queue_timeout(model, spec.deadline.saturating_duration_since(now))
            }),
        }
    }

    /// Whether the worker with the shortest prefill of this request (per `prefill`) is full while
    /// another has room: then its prompt is held where it cannot start now.
    fn prefers_a_full_worker(&self, prefill: &Affinity, candidates: &[&Arc<Worker>]) -> bool {
        let (mut full, mut free) = (Duration::MAX, Duration::MAX);
        for w in candidates {
            let t = prefill(w.id);
            let best = if self.has_room(w) { &mut free } else { &mut full };
            *best = (*best).min(t);
        }
        full.saturating_add(FIT_TIE) < free
    }

    /// Whether requests for `model` wait for the budget named `key` (a newcomer of that budget then
    /// queues behind them rather than taking budget first).
    pub fn has_budget_waiters(&self, model: &Arc<str>, key: u64) -> bool {
        let queues = self.queues.lock();
        queues.get(model).is_some_and(|q| q.waiting.lock().items().any(|w| w.budget_key() == Some(key)))
    }

    /// Waits in `model`'s queue for the budget named `key`, which has refilled for this request at
    /// `ready_at`; see "Waiting for budget" in the module docs. When it is this waiter's turn and its
    /// budget should be there, `check` charges it: `Ok(Ok(t))` admits (returns `t`, the position on
    /// entry and the time waited), `Ok(Err((at, why)))` means refill again until `at`. Leaves with 504
    /// at the deadline, 429 when the queue is full, `check`'s error, or `give_up(why)` when the budget
    /// cannot refill before the deadline.
    pub async fn wait_for_budget<T, E, F, Fut>(
        &self,
        model: &Arc<str>,
        spec: &WaitSpec,
        key: u64,
        ready_at: Instant,
        mut check: F,
        give_up: impl Fn(E) -> GatewayError,
    ) -> Result<(T, QueueTicket), GatewayError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Result<T, (Instant, E)>, GatewayError>>,
    {
        let cfg = self.cfg.load_full();
        let queue = self.queue_sized(model, spec.max_size);
        let entered = Instant::now();
        let (ticket, position) = {
            let mut waiting = queue.waiting.lock();
            let waiter =
                Waiter { tx: None, budget: Some(BudgetWait { key, ready_at }), affinity: None, workers: Vec::new() };
            match waiting.push_with(waiter, spec.meta(), entered.into_std()) {
                Ok(ticket) => (ticket, waiting.position(ticket, entered.into_std()).unwrap_or(waiting.len())),
                Err(_) => {
                    drop(waiting);
                    self.rejected.with_label_values(&[model, "queue_full"]).inc();
                    return Err(GatewayError::new(
                        ErrorKind::QueueFull,
                        format!("the queue for model `{model}` is full ({} waiting); retry later", spec.max_size),
                    )
                    .with_retry_after(1));
                }
            }
        };
        let mut leave =
            Leave { queue: &queue, ticket: Some(ticket), rejected: &self.rejected, model, reason: "cancelled" };
        let aging = Duration::from_secs(cfg.aging_secs);
        loop {
            // Registered before looking, so a leave between the look and the wait is not missed.
            let left = queue.budget_left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let now = Instant::now();
            if now >= spec.deadline {
                leave.reason = "queue_timeout";
                return Err(queue_timeout(model, spec.deadline.saturating_duration_since(entered)));
            }
            let (head, my_ready) = {
                let mut waiting = queue.waiting.lock();
                let head = waiting.peek_scored(now.into_std(), |w| w.budget_key() == Some(key), |w| w.fits(now));
                (head, waiting.get_mut(ticket).and_then(|w| w.budget.map(|b| b.ready_at)))
            };
            let Some(my_ready) = my_ready else {
                return Err(GatewayError::new(ErrorKind::Internal, "the admission queue dropped a budget waiter"));
            };
            if head == Some(ticket) && my_ready <= now {
                match check().await? {
                    Ok(admitted) => {
                        leave.ticket = None;
                        if queue.waiting.lock().remove(ticket).is_some() {
                            queue.budget_left.notify_waiters();
                        }
                        let waited = entered.elapsed();
                        return Ok((admitted, QueueTicket { position, estimated_wait: Duration::ZERO, waited }));
                    }
                    Err((at, why)) => {
                        if at > spec.deadline {
                            leave.reason = "rate_limited";
                            return Err(give_up(why));
                        }
                        // Never a busy loop: the next look is at least a millisecond away.
                        let at = at.max(Instant::now() + Duration::from_millis(1));
                        let mut waiting = queue.waiting.lock();
                        if let Some(w) = waiting.get_mut(ticket) {
                            w.budget = Some(BudgetWait { key, ready_at: at });
                        }
                        waiting.note_retry(ticket);
                        continue;
                    }
                }
            }
            // Sleep until something can change this waiter's turn: its refill instant, its next aging
            // step, its deadline, or another waiter of its budget leaving.
            let mut wake = spec.deadline;
            if my_ready > now {
                wake = wake.min(my_ready);
            }
            if !aging.is_zero() {
                let steps = now.saturating_duration_since(entered).as_nanos() / aging.as_nanos() + 1;
                let next_step = entered + aging * u32::try_from(steps).unwrap_or(u32::MAX);
                wake = wake.min(next_step);
            }
            tokio::select! {
                _ = &mut left => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// A permit for one more request in flight to `model`, whose `max_concurrency` is `limit` (0 =
    /// unlimited: `None`). Waits for one to be released until `deadline` (504).
    pub async fn model_permit(
        &self,
        model: &Arc<str>,
        limit: u32,
        deadline: Instant,
    ) -> Result<Option<ModelPermit>, GatewayError> {
        if limit == 0 {
            return Ok(None);
        }
        let slots = {
            let mut all = self.model_slots.lock();
            if all.len() >= crate::config::MAX_MODELS && !all.contains_key(model) {
                // Models removed by reloads: forget the idle ones.
                all.retain(|_, s| s.in_flight.load(Ordering::Acquire) > 0);
            }
            Arc::clone(all.entry(Arc::clone(model)).or_default())
        };
        let entered = Instant::now();
        loop {
            let freed = slots.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(permit) = slots.try_take(limit) {
                return Ok(Some(permit));
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    self.rejected.with_label_values(&[model, "queue_timeout"]).inc();
                    return Err(queue_timeout(model, deadline.saturating_duration_since(entered)));
                }
            }
        }
    }

    /// Requests in flight to `model` holding a [`ModelPermit`].
    pub fn model_in_flight(&self, model: &str) -> u32 {
        self.model_slots.lock().get(model).map_or(0, |s| s.in_flight.load(Ordering::Acquire))
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
            batch.retain(|w| w.tx.as_ref().is_some_and(|tx| !tx.is_closed()));
            batch.push_back(Waiter { tx: Some(tx), budget: None, affinity: None, workers: Vec::new() });
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
        // The queues looked up once, under one lock, into a list on the stack (a worker serves a model
        // or a few): live waiters first, then batch lines only when no live request waits.
        let models = worker.models.load();
        let queues: smallvec::SmallVec<[Arc<ModelQueue>; 2]> = {
            let all = self.queues.lock();
            models.iter().filter_map(|m| all.get(m.as_str()).cloned()).collect()
        };
        let mut slot_waiters = false;
        for q in &queues {
            slot_waiters |= self.dispatch_to(q, worker);
        }
        if !slot_waiters {
            for q in &queues {
                self.dispatch_batch_to(q, worker);
            }
        }
    }

    /// Hands `worker`'s free slots to `queue`'s best waiters while it has room: among waiters of equal
    /// standing, a waiter whose prompt another worker holds may hold out for it, and of the others the
    /// one whose wait, less `queue.prefill_weight` times this worker's time to its first token, is
    /// longest goes first
    /// (`guard::AdmissionQueue::pop_preferring`).
    /// The slot is reserved (a compare-and-swap against capacity) before a waiter is taken from the queue.
    /// Returns whether requests still wait for a slot in `queue` (batch lines wait behind them).
    fn dispatch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) -> bool {
        // Budget waiters take no slot.
        let wants_slot = |w: &Waiter| w.tx.is_some();
        // Most slots free with nobody waiting: that look is all they cost.
        if !queue.waiting.lock().items().any(wants_slot) {
            return false;
        }
        if !worker.is_available() {
            return true;
        }
        let cap = self.capacity_of(worker);
        let per_worker = queue.dispatches.lock().estimated_wait(1, Instant::now().into_std());
        let mut waiting = queue.waiting.lock();
        while waiting.items().any(wants_slot) {
            let Some(slot) = Reservation::try_take(worker, cap, self.notify()) else { return true };
            let fit = |w: &Waiter| w.fit(worker, per_worker);
            let Some((_, waiter)) = waiting.pop_preferring(Instant::now().into_std(), wants_slot, fit) else {
                slot.return_quietly();
                return true;
            };
            hand_over(waiter, slot);
        }
        false
    }

    /// Hands `worker`'s spare slots (within the batch share) to `queue`'s oldest batch lines.
    fn dispatch_batch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) {
        let mut batch = queue.batch.lock();
        // Most slots free with no batch line waiting: that look is all they cost.
        if batch.is_empty() || !worker.is_available() {
            return;
        }
        let cap = self.slots_for(worker, Priority::Batch);
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
    match waiter.tx {
        Some(tx) => {
            if let Err(unsent) = tx.send(slot) {
                unsent.return_quietly();
            }
        }
        None => slot.return_quietly(),
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
        worker_numbered(1, cap)
    }

    fn admission_with(cfg: QueueConfig) -> Arc<Admission> {
        let rejected =
            prometheus::IntCounterVec::new(prometheus::Opts::new("r", "r"), &["model", "reason"]).expect("metric");
        Admission::new(&cfg, rejected)
    }

    fn admission() -> Arc<Admission> {
        admission_with(QueueConfig::default())
    }

    /// The wait of a request of `class` from `tenant` with `a`'s settings, entering now.
    fn spec(a: &Admission, class: Priority, tenant: u64) -> WaitSpec {
        let cfg = a.config();
        let deadline = Instant::now() + Duration::from_secs(cfg.timeout_secs);
        WaitSpec { class, tenant, deadline, retries: 0, max_size: cfg.max_size }
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
        tokio::spawn(
            async move { a.admit(&Arc::from("m"), &[&w], &spec(&a, class, tenant), || None).await.map(|(_, r)| r) },
        )
    }

    /// Yields until `n` live requests wait for model `m`.
    async fn until_waiting(a: &Admission, n: usize) {
        while a.queue(&Arc::from("m")).waiting.lock().len() != n {
            tokio::task::yield_now().await;
        }
    }

    /// A worker with this id and capacity.
    fn worker_numbered(id: WorkerId, cap: u32) -> Arc<Worker> {
        let mut spec = WorkerConfig::from_url(format!("http://127.0.0.1:{id}"));
        spec.max_concurrency = cap;
        let w = Arc::new(Worker::new(id, spec));
        w.stats.healthy.store(true, Ordering::Relaxed);
        w.models.store(Arc::new(vec!["m".to_string()]));
        w
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_holds_out_for_the_worker_holding_its_prompt_while_its_line_is_short() {
        let model: Arc<str> = Arc::from("m");
        // Worker 1 holds the prompt (20 ms to a first token), worker 2 does not (1 s of prefill).
        let prefill = || -> Option<Affinity> {
            Some(Box::new(|id| if id == 1 { Duration::from_millis(20) } else { Duration::from_secs(1) }))
        };
        // (the model's dispatches in the last second, worker 1's own measured dispatch rate, where it runs)
        for (dispatches_per_sec, warm_rate, expect) in [(40, 0.0, 1), (0, 0.0, 2), (40, 0.5, 2), (0, 40.0, 1)] {
            let a = admission();
            let (warm, cold) = (worker_numbered(1, 1), worker_numbered(2, 1));
            // Worker 1's own pace, once measured, prices its line: a slot each 2 s is longer than the
            // 980 ms it saves (spill), one each 25 ms is shorter (hold out), whatever the model's rate.
            warm.stats.dispatch_rate.set(warm_rate);
            let busy_warm = LoadGuard::try_take(&warm, 1, a.notify()).expect("room");
            let busy_cold = LoadGuard::try_take(&cold, 1, a.notify()).expect("room");
            // The model's slot interval: 2 workers at 40 dispatches/s free one each 50 ms; with no
            // dispatch seen yet the estimate is a second per position.
            for _ in 0..dispatches_per_sec {
                a.record_dispatch(&model, Duration::ZERO);
            }
            let (cands, wait) = ([&warm, &cold], spec(&a, Priority::Normal, 1));
            let waiter = a.admit(&model, &cands, &wait, prefill);
            tokio::pin!(waiter);
            assert!(futures_util::poll!(&mut waiter).is_pending(), "both full");
            drop(busy_cold);
            if expect == 1 {
                // 980 ms to save against a 50 ms line: it holds out, and worker 2's slot stays free.
                assert!(futures_util::poll!(&mut waiter).is_pending(), "holds out for worker 1");
                assert_eq!(cold.stats.slots.taken(), 0);
                drop(busy_warm);
            }
            let (_, reservation) = waiter.await.expect("admitted");
            let reservation = reservation.expect("a reservation");
            let (on_warm, on_cold) = (warm.stats.slots.reserved(), cold.stats.slots.reserved());
            assert_eq!(
                if expect == 1 { (on_warm, on_cold) } else { (on_cold, on_warm) },
                (1, 0),
                "model rate {dispatches_per_sec}, worker 1's rate {warm_rate}"
            );
            drop(reservation);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_whose_prompt_a_full_worker_holds_waits_for_it_when_its_line_is_short() {
        let model: Arc<str> = Arc::from("m");
        // (whether worker 1 holds its prompt, the model's dispatches in the last second, where it runs)
        for (held_on_1, dispatches_per_sec, expect) in [(true, 40, 1), (true, 0, 2), (false, 40, 2)] {
            let affinity =
                move || -> Option<Affinity> {
                    Some(Box::new(move |id| {
                        if held_on_1 && id == 1 {
                            Duration::from_millis(20)
                        } else {
                            Duration::from_secs(1)
                        }
                    }))
                };
            let a = admission();
            let (warm, cold) = (worker_numbered(1, 1), worker_numbered(2, 1));
            for _ in 0..dispatches_per_sec {
                a.record_dispatch(&model, Duration::ZERO);
            }
            // Worker 1 (holding the prompt) is full, worker 2 has room.
            let busy_warm = LoadGuard::try_take(&warm, 1, a.notify()).expect("room");
            let (cands, wait) = ([&warm, &cold], spec(&a, Priority::Normal, 1));
            let newcomer = a.admit(&model, &cands, &wait, affinity);
            tokio::pin!(newcomer);
            if expect == 1 {
                // 980 ms to save against a 50 ms line: it waits, and worker 2's slot stays free.
                assert!(futures_util::poll!(&mut newcomer).is_pending(), "waits for worker 1");
                assert_eq!(cold.stats.slots.taken(), 0);
                drop(busy_warm);
                let (ticket, reservation) = newcomer.await.expect("admitted");
                assert!(ticket.position > 0, "it waited in the queue");
                assert_eq!((warm.stats.slots.reserved(), cold.stats.slots.reserved()), (1, 0));
                drop(reservation);
            } else {
                let (ticket, reservation) = newcomer.await.expect("admitted");
                if dispatches_per_sec == 0 {
                    // A line priced at a second per position, more than the 980 ms it saves: the
                    // hand-off gives it worker 2's slot at once.
                    assert_eq!(reservation.map(|r| r.worker().id), Some(2));
                } else {
                    // Nothing to save anywhere: straight through, as when every worker has room.
                    assert_eq!((ticket.position, reservation.is_none()), (0, true));
                }
                drop(busy_warm);
            }
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
            tokio::spawn(async move {
                a.admit(&model, &[&w], &spec(&a, Priority::Batch, 1), || None).await.map(|(_, r)| r.is_some())
            })
        };
        // Let the batch line queue first, then a live request arrives behind it.
        while a.queue(&model).batch.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        let live_spec = spec(&a, Priority::Low, 2);
        let live = a.admit(&model, &cands, &live_spec, || None);
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
        let wait_spec = spec(&a, Priority::Normal, 1);
        let wait = a.admit(&model, &cands, &wait_spec, || None);
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
