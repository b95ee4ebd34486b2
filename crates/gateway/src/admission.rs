//! The admission queue: when every worker for a model is at capacity, requests wait here instead of
//! piling onto a worker's own queue, and leave in priority, aging and fairness order (the ordering is
//! the pure `guard::AdmissionQueue`).
//!
//! Dispatch is event-driven. When a load slot frees ([`crate::worker::LoadGuard`] drops), the best
//! waiter that worker can serve is handed a [`Reservation`] on it through a oneshot channel: the slot
//! is its, so a request arriving at that moment cannot take it, and nothing polls. A reservation that is
//! never used (the waiter left) releases itself when dropped, which frees the slot for the next one.
//! A slow sweep ([`Admission::run_sweeper`]) only covers capacity that appears without a slot freeing
//! (a worker added, recovered or learned larger).

use crate::config::QueueConfig;
use crate::fleet::Fleet;
use crate::state::AppState;
use crate::worker::Worker;
use arc_swap::ArcSwap;
use gateway_core::{ErrorKind, GatewayError, Priority};
use guard::{AdmissionQueue, AvgWait, RateEstimator, Ticket};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Every model's queue, and the queue settings in force.
pub struct Admission {
    cfg: ArcSwap<QueueConfig>,
    /// `llm_gateway_queue_rejected_total{model,reason}`.
    rejected: prometheus::IntCounterVec,
    queues: Mutex<HashMap<Arc<str>, Arc<ModelQueue>>>,
    me: Weak<Admission>,
}

/// One model's waiting requests and its observed dispatch rate.
pub struct ModelQueue {
    waiting: Mutex<AdmissionQueue<Waiter>>,
    dispatches: Mutex<RateEstimator>,
    waits: Mutex<AvgWait>,
}

struct Waiter {
    tx: oneshot::Sender<Reservation>,
}

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
            me: me.clone(),
        })
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
            })
        }))
    }

    /// Whether `worker` can take one more request (in flight plus reserved below its capacity).
    pub fn has_room(&self, worker: &Worker) -> bool {
        let cap = worker.capacity(self.cfg.load().default_worker_concurrency);
        let s = &worker.stats;
        s.in_flight.load(Ordering::Relaxed) + s.reserved.load(Ordering::Relaxed) < cap
    }

    /// Lets a request for `model` through at once when a candidate has room and nobody waits; else
    /// queues it until a slot is reserved for it, the queue timeout passes (504), or the queue is
    /// full (429). `candidates` are the eligible workers for the model.
    pub async fn admit(
        &self,
        model: &Arc<str>,
        candidates: &[&Arc<Worker>],
        class: Priority,
        tenant: u64,
    ) -> Result<(QueueTicket, Option<Reservation>), GatewayError> {
        let cfg = self.cfg.load_full();
        let queue = self.queue(model);
        let now = Instant::now();
        if !cfg.enabled || candidates.is_empty() {
            return Ok((QueueTicket::default(), None));
        }
        if queue.waiting.lock().is_empty() && candidates.iter().any(|w| self.has_room(w)) {
            return Ok((QueueTicket::default(), None));
        }
        let (tx, rx) = oneshot::channel();
        let (ticket, position) = {
            let mut waiting = queue.waiting.lock();
            match waiting.push(Waiter { tx }, class, tenant, now) {
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

    /// A slot freed on `worker`: the best waiter of a model it serves gets it.
    pub fn slot_freed(&self, worker: &Arc<Worker>) {
        let queues: Vec<Arc<ModelQueue>> = {
            let all = self.queues.lock();
            worker.models.load().iter().filter_map(|m| all.get(m.as_str()).cloned()).collect()
        };
        for q in queues {
            self.dispatch_to(&q, worker);
        }
    }

    /// Hands `worker`'s free slots to `queue`'s best waiters while it has room.
    fn dispatch_to(&self, queue: &ModelQueue, worker: &Arc<Worker>) {
        if !worker.is_available() {
            return;
        }
        let mut waiting = queue.waiting.lock();
        while self.has_room(worker) {
            let Some((_, waiter)) = waiting.pop(Instant::now()) else { return };
            worker.stats.reserved.fetch_add(1, Ordering::Relaxed);
            let reservation = Reservation { worker: Arc::clone(worker), admission: self.me.clone(), live: true };
            if let Err(mut unsent) = waiter.tx.send(reservation) {
                // The waiter is gone: take the slot back here (no re-entry while the queue is locked).
                unsent.live = false;
                worker.stats.reserved.fetch_sub(1, Ordering::Relaxed);
            }
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
            if q.waiting.lock().is_empty() {
                continue;
            }
            for w in fleet.workers.iter().filter(|w| w.serves(&model)) {
                self.dispatch_to(&q, w);
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
                    "oldest_wait_ms": waiting.oldest_wait(now).map(|d| d.as_millis() as u64),
                    "avg_wait_ms_1h": q.waits.lock().average(now).map(|d| d.as_millis() as u64),
                    "dispatch_rate": q.dispatches.lock().per_sec(now),
                });
                (model.to_string(), v)
            })
            .collect()
    }
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
