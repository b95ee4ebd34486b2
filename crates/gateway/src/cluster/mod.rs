//! Several gateway replicas in front of the same workers (`[cluster]`).
//!
//! With `backend = "local"` each replica counts only its own slots; the admission queue discounts from a
//! worker's capacity the load the worker reports that this replica did not send (`guard::share`), so
//! independent replicas overshoot by at most what arrives between two scrapes.
//!
//! With `backend = "redis"` a worker's slots are also one count in Redis ([`redis`]) that every replica
//! takes from. The local slot word stays the fast path and the guard of this process
//! ([`crate::fleet::slot`]); once a request holds it, [`Cluster::take`] takes a slot in Redis as well,
//! held by a [`SharedSlot`] that rides in the request's `LoadGuard` and is given back when it drops
//! (through a bounded channel to a background task: a drop never blocks). Each slot is leased: a task
//! renews the leases of the slots this replica holds, so those of a replica that dies expire within
//! `lease_secs`.
//!
//! A refusal marks the worker full on this replica ([`crate::fleet::share::WorkerShare`]): the queue holds its requests
//! instead of asking Redis for each. A release that frees a slot someone was refused publishes it; every
//! replica hears it, clears the mark and hands the slot to its best waiter (event-driven, no polling).
//! A slow re-check (every second) asks Redis whether a worker marked full has room again, for messages
//! lost and leases that expired (a dead replica's slots free without a release).
//!
//! When Redis cannot answer within `redis_timeout_ms`, `redis_failure = "local"` serves on local slots
//! (with the discount of foreign load) and `"deny"` answers 503; either is counted in
//! `llm_gateway_cluster_fallback_total`, the state is `llm_gateway_cluster_shared`, and each change of
//! state is logged once. A ping every second notices Redis back; sharing then resumes by itself.
//!
//! Every second the replicas also agree on each worker's learned capacity (the highest any learned), so
//! a count in Redis is compared with the same capacity whichever replica asks.
//!
//! Two kinds of news travel on the same subscription, never on the request path's clock:
//! - breaker openings ([`breakers`]): a replica whose breaker for a worker opens tells the others, who
//!   open theirs for the time left without counting a failure (and never tell it again); a key with the
//!   opening's time lets a replica that starts meanwhile learn it at its re-check. Trials and closing
//!   stay local.
//! - dispatch records ([`affinity`]): where each prompt was sent (its prefix hashes), batched, fed to
//!   every other replica's policy, so a conversation finds the worker holding it from any replica.
//!
//! Both are queued through bounded channels that drop rather than block, and both stop while Redis is
//! down (each replica then judges and routes on what it sees itself).

pub mod affinity;
pub mod breakers;
pub mod redis;

use crate::config::{ClusterBackend, ClusterConfig, RedisFailure};
use crate::fleet::worker::Worker;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::proxy::admission::Admission;
use gateway_core::{ErrorKind, GatewayError};
use parking_lot::Mutex;
use routing::Policy;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Releases waiting for the background task at most; past it, a slot is left to its lease.
const RELEASE_QUEUE: usize = 4096;
/// How often marks are cleared, Redis is pinged when down, and leases are renewed when due.
const RECHECK: Duration = Duration::from_secs(1);

/// A slot of a worker's shared count held by this replica; given back when dropped.
pub struct SharedSlot {
    cluster: Arc<Cluster>,
    worker: Arc<Worker>,
    member: u64,
}

impl crate::fleet::slot::ExternalSlot for SharedSlot {}

impl std::fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlot").field("worker", &self.worker.name).field("member", &self.member).finish()
    }
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        self.cluster.held.lock().remove(&self.member);
        let share = &self.worker.stats.share;
        share.releasing.fetch_add(1, Ordering::AcqRel);
        let release = Release { worker: Arc::clone(&self.worker), member: self.cluster.member(self.member) };
        if self.cluster.releases.try_send(release).is_err() {
            // No longer renewed: the slot comes back when its lease ends.
            share.releasing.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(worker = %self.worker.name, "cluster: release queue full; the slot returns with its lease");
        }
    }
}

struct Release {
    worker: Arc<Worker>,
    member: String,
}

/// What [`Cluster::take`] got.
#[derive(Debug)]
pub enum Take {
    /// Nothing shared (local backend, or Redis down with `redis_failure = "local"`): the local slot is all.
    Local,
    /// A slot of the shared count.
    Shared(SharedSlot),
    /// The shared count is at capacity: the worker is marked full here.
    Full,
}

/// This replica's side of the shared slot counts.
pub struct Cluster {
    cfg: ClusterConfig,
    redis: Option<redis::RedisSlots>,
    /// This process's name in member ids: unique per start, so a restarted replica never renews its
    /// predecessor's slots.
    replica: String,
    next_member: AtomicU64,
    /// Slots held, member to worker URL: what the renewal extends.
    held: Mutex<HashMap<u64, Arc<str>>>,
    releases: mpsc::Sender<Release>,
    release_rx: Mutex<Option<mpsc::Receiver<Release>>>,
    /// This replica's breaker openings on their way to the others.
    openings: mpsc::Sender<breakers::Opening>,
    opening_rx: Mutex<Option<mpsc::Receiver<breakers::Opening>>>,
    /// The opening last applied per worker URL (workers of the fleet only): each is applied once.
    heard_openings: Mutex<HashMap<String, String>>,
    /// Dispatch records on their way to the others.
    dispatches: mpsc::Sender<affinity::DispatchRecord>,
    dispatch_rx: Mutex<Option<mpsc::Receiver<affinity::DispatchRecord>>>,
    /// Redis answered last time it was asked.
    up: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// The cluster side for `cfg`. A Redis URL the client refuses (validation refuses such URLs first)
    /// leaves Redis down for good: every request then takes the failure path.
    pub fn new(cfg: &ClusterConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let redis = match cfg.backend {
            ClusterBackend::Local => None,
            ClusterBackend::Redis => match redis::RedisSlots::new(&cfg.redis_url) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "cluster.redis_url: no Redis client; slots are not shared");
                    None
                }
            },
        };
        let (releases, rx) = mpsc::channel(RELEASE_QUEUE);
        let (openings, opening_rx) = mpsc::channel(breakers::OPENING_QUEUE);
        let (dispatches, dispatch_rx) = mpsc::channel(affinity::DISPATCH_QUEUE);
        let up = cfg.backend == ClusterBackend::Redis && redis.is_some();
        metrics.cluster_shared.set(i64::from(up));
        Arc::new(Self {
            cfg: cfg.clone(),
            redis,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            next_member: AtomicU64::new(1),
            held: Mutex::default(),
            releases,
            release_rx: Mutex::new(Some(rx)),
            openings,
            opening_rx: Mutex::new(Some(opening_rx)),
            heard_openings: Mutex::default(),
            dispatches,
            dispatch_rx: Mutex::new(Some(dispatch_rx)),
            up: AtomicBool::new(up),
            metrics,
        })
    }

    /// Whether slots are counted in Redis now (so the queue need not discount others' load).
    pub fn shares_slots(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.cfg.lease_secs)
    }

    fn member(&self, n: u64) -> String {
        format!("{}:{n}", self.replica)
    }

    /// Notes whether Redis answered; logs and publishes a change of state once.
    fn set_up(&self, up: bool, admission: Option<&Admission>, why: &str) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.metrics.cluster_shared.set(i64::from(up));
            if let Some(a) = admission {
                a.set_discount_foreign(!up);
            }
            if up {
                tracing::info!("cluster: Redis reachable again; worker slots are shared with the other replicas");
            } else {
                tracing::warn!(error = %why, failure = ?self.cfg.redis_failure, "cluster: Redis unreachable; worker slots are counted by this replica alone");
            }
        }
    }

    /// With `backend = "redis"`, takes one of `worker`'s `cap` slots in the shared count for a request
    /// that holds a local slot there. Unlimited workers (`cap == u32::MAX`) need none. `Err` is the 503
    /// of `redis_failure = "deny"` while Redis is unreachable.
    pub async fn take(self: &Arc<Self>, worker: &Arc<Worker>, cap: u32) -> Result<Take, GatewayError> {
        let Some(redis) = self.redis.as_ref().filter(|_| self.cfg.backend == ClusterBackend::Redis) else {
            return Ok(Take::Local);
        };
        if cap == u32::MAX {
            return Ok(Take::Local);
        }
        if !self.shares_slots() {
            return self.fallback();
        }
        // Boxed: Redis's futures take kilobytes, which every request's future would carry (and copy) inline.
        Box::pin(self.take_shared(redis, worker, cap)).await
    }

    /// [`Self::take`] once Redis holds the shared count.
    async fn take_shared(
        self: &Arc<Self>,
        redis: &redis::RedisSlots,
        worker: &Arc<Worker>,
        cap: u32,
    ) -> Result<Take, GatewayError> {
        let share = &worker.stats.share;
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let member = self.member(n);
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
        let url = worker.base_url.as_str();
        let freed_before = share.freed.load(Ordering::Acquire);
        for attempt in 0..2 {
            // Registered before the check, so a release landing in between still wakes it.
            let released = share.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match tokio::time::timeout(timeout, redis.take(url, cap, &member, self.lease())).await {
                Ok(Ok(true)) => {
                    self.held.lock().insert(n, Arc::from(url));
                    return Ok(Take::Shared(SharedSlot {
                        cluster: Arc::clone(self),
                        worker: Arc::clone(worker),
                        member: n,
                    }));
                }
                Ok(Ok(false)) => {
                    // A slot this replica just gave back may not have reached Redis yet: wait for it once.
                    if attempt == 0 && share.releasing.load(Ordering::Acquire) > 0 {
                        let _ = tokio::time::timeout(timeout, released).await;
                        continue;
                    }
                    share.full.store(true, Ordering::Release);
                    // A slot freed while Redis refused: the mark must not outlive it.
                    if share.freed.load(Ordering::Acquire) != freed_before {
                        share.full.store(false, Ordering::Release);
                    }
                    return Ok(Take::Full);
                }
                failure => {
                    let why = match failure {
                        Ok(Err(e)) => e,
                        _ => format!("no answer within {timeout:?}"),
                    };
                    self.set_up(false, None, &why);
                    return self.fallback();
                }
            }
        }
        Ok(Take::Full)
    }

    /// A request while Redis is down: counted; refused under `redis_failure = "deny"`.
    fn fallback(&self) -> Result<Take, GatewayError> {
        self.metrics.cluster_fallback.inc();
        match self.cfg.redis_failure {
            RedisFailure::Local => Ok(Take::Local),
            RedisFailure::Deny => Err(GatewayError::new(
                ErrorKind::ServerBusy,
                "the shared slot count (Redis) is unreachable and cluster.redis_failure is deny; retry shortly",
            )
            .with_code("cluster_unavailable")
            .with_retry_after(1)),
        }
    }

    /// Runs the background side until `stop`: releases, breaker openings and dispatch records sent, the
    /// subscription (freed slots, openings and dispatch records heard), and the re-check (marks cleared,
    /// leases renewed, openings read, Redis pinged while down). `fleet` and `policy` are those in force
    /// (`None` once the gateway is gone). Returns at once with the local backend.
    pub async fn run(
        self: Arc<Self>,
        admission: Arc<Admission>,
        stop: CancellationToken,
        fleet: impl Fn() -> Option<Arc<Fleet>> + Send + Sync + 'static,
        policy: impl Fn() -> Option<Arc<dyn Policy>> + Send + Sync + 'static,
    ) {
        let Some(redis) = self.redis.clone() else { return };
        admission.set_discount_foreign(!self.shares_slots());
        let Some(rx) = self.release_rx.lock().take() else { return };
        let (Some(opening_rx), Some(dispatch_rx)) = (self.opening_rx.lock().take(), self.dispatch_rx.lock().take())
        else {
            return;
        };
        let fleet = Arc::new(fleet);
        tokio::spawn(release_loop(redis.clone(), rx, stop.clone()));
        tokio::spawn(breakers::opening_loop(redis.clone(), opening_rx, stop.clone()));
        tokio::spawn(affinity::dispatch_loop(redis.clone(), self.replica.clone(), dispatch_rx, stop.clone()));
        let (cluster, policy) = (Arc::clone(&self), Box::new(policy));
        tokio::spawn(subscribe_loop(
            redis.clone(),
            cluster,
            Arc::clone(&admission),
            Arc::clone(&fleet),
            policy,
            stop.clone(),
        ));
        tokio::spawn(Arc::clone(&self).renew_loop(redis.clone(), Arc::clone(&admission), stop.clone()));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RECHECK) => {}
            }
            let Some(current) = fleet() else { return };
            if !self.shares_slots() {
                let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
                if let Ok(Ok(())) = tokio::time::timeout(timeout, redis.ping()).await {
                    self.set_up(true, Some(&admission), "");
                }
            }
            // A failure seen on the request path switches the discount here, within a second.
            admission.set_discount_foreign(!self.shares_slots());
            if self.shares_slots() {
                self.agree_capacity(&redis, &current).await;
                self.recheck_openings(&redis, &current).await;
            }
            // Freed slots whose message was lost, and slots of dead replicas whose lease ended: asked
            // of Redis first, so a worker still full does not bounce its waiters through the queue.
            let default = admission.config().default_worker_concurrency;
            for w in current.workers.iter().filter(|w| w.stats.share.is_full()) {
                let asked = tokio::time::timeout(RECHECK, redis.has_room(&w.base_url, w.capacity(default))).await;
                if !matches!(asked, Ok(Ok(false))) {
                    w.stats.share.freed();
                    admission.slot_freed(w);
                }
            }
        }
    }

    /// Extends the leases of the slots this replica holds, three times per lease.
    async fn renew_loop(self: Arc<Self>, redis: redis::RedisSlots, admission: Arc<Admission>, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.lease() / 3);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let held = self.held_by_worker();
            match tokio::time::timeout(self.lease() / 3, redis.renew(&held, self.lease())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.set_up(false, Some(&admission), &e),
                Err(_) => self.set_up(false, Some(&admission), "renewal timed out"),
            }
        }
    }

    /// Raises each worker's learned capacity to the highest any replica learned (learned capacity only
    /// ever rises, here as in the probe), and tells the others what this one learned.
    async fn agree_capacity(&self, redis: &redis::RedisSlots, fleet: &Fleet) {
        let learned: Vec<(String, u32)> = fleet
            .workers
            .iter()
            .map(|w| (w.base_url.clone(), w.stats.learned_capacity.load(Ordering::Relaxed)))
            .collect();
        if let Ok(Ok(agreed)) = tokio::time::timeout(RECHECK, redis.agree_capacity(&learned)).await {
            for (w, cap) in fleet.workers.iter().zip(agreed) {
                w.stats.learned_capacity.fetch_max(cap, Ordering::Relaxed);
            }
        }
    }

    /// The members this replica holds, per worker URL.
    fn held_by_worker(&self) -> Vec<(Arc<str>, Vec<String>)> {
        let mut by: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (n, url) in self.held.lock().iter() {
            by.entry(Arc::clone(url)).or_default().push(self.member(*n));
        }
        by.into_iter().collect()
    }
}

/// Most releases sent to Redis together.
const RELEASE_BATCH: usize = 64;

/// Gives released slots back in Redis. The releases waiting when one is sent go with it, concurrently on
/// the one multiplexed connection (pipelined: one round trip for all), so the count in Redis keeps up with
/// the replica's own at any rate; one at a time, releases fell behind under load and takes were refused
/// for slots already given back.
async fn release_loop(redis: redis::RedisSlots, mut rx: mpsc::Receiver<Release>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(RELEASE_BATCH);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut batch, RELEASE_BATCH) => if n == 0 { return },
        }
        let sent = batch.iter().map(|r| tokio::time::timeout(RECHECK, redis.release(&r.worker.base_url, &r.member)));
        let done = futures_util::future::join_all(sent).await;
        for (release, done) in batch.drain(..).zip(done) {
            let share = &release.worker.stats.share;
            if !matches!(done, Ok(Ok(()))) {
                tracing::debug!(worker = %release.worker.name, "cluster: release not confirmed; the slot returns with its lease");
            }
            share.releasing.fetch_sub(1, Ordering::AcqRel);
            share.released.notify_waiters();
        }
    }
}

/// The policy in force, for heard dispatch records.
type PolicyNow = Box<dyn Fn() -> Option<Arc<dyn Policy>> + Send + Sync>;

/// Listens on the cluster's channels: a freed slot ([`redis::FREED_CHANNEL`]) goes to this replica's
/// best waiter for that worker, a breaker opening ([`redis::OPENED_CHANNEL`]) opens this replica's
/// breaker and an operator's reset ([`redis::RESET_CHANNEL`]) closes it, dispatch records
/// ([`redis::DISPATCH_CHANNEL`]) feed the policy. Reconnects (after a pause) when the subscription
/// breaks, clearing every full mark then, as messages may have been missed.
async fn subscribe_loop<F>(
    redis: redis::RedisSlots,
    cluster: Arc<Cluster>,
    admission: Arc<Admission>,
    fleet: Arc<F>,
    policy: PolicyNow,
    stop: CancellationToken,
) where
    F: Fn() -> Option<Arc<Fleet>> + Send + Sync + 'static,
{
    use futures_util::StreamExt;
    let channels = [redis::FREED_CHANNEL, redis::OPENED_CHANNEL, redis::RESET_CHANNEL, redis::DISPATCH_CHANNEL];
    loop {
        let subscribed = async {
            let mut pubsub = redis.client().get_async_pubsub().await.map_err(|e| e.to_string())?;
            pubsub.subscribe(&channels).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            p = tokio::time::timeout(RECHECK, subscribed) => p,
        };
        if let Ok(Ok(pubsub)) = pubsub {
            let mut messages = pubsub.into_on_message();
            let Some(current) = fleet() else { return };
            for w in &current.workers {
                w.stats.share.freed();
                admission.slot_freed(w);
            }
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = messages.next() => match m { Some(m) => m, None => break },
                };
                let Some(current) = fleet() else { return };
                match msg.get_channel_name() {
                    redis::FREED_CHANNEL => {
                        let Ok(url) = msg.get_payload::<String>() else { continue };
                        for w in current.workers.iter().filter(|w| w.base_url == url) {
                            w.stats.share.freed();
                            admission.slot_freed(w);
                        }
                    }
                    redis::OPENED_CHANNEL => {
                        let Ok(text) = msg.get_payload::<String>() else { continue };
                        cluster.hear_opening_message(&text, &current);
                    }
                    redis::RESET_CHANNEL => {
                        let Ok(text) = msg.get_payload::<String>() else { continue };
                        cluster.hear_reset_message(&text, &current);
                    }
                    redis::DISPATCH_CHANNEL => {
                        let Some(policy) = policy() else { return };
                        cluster.hear_dispatches(msg.get_payload_bytes(), &current, policy.as_ref());
                    }
                    _ => {}
                }
            }
            tracing::debug!("cluster: subscription ended; reconnecting");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}
