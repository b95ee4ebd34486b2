//! Load slots: the requests a worker holds (in flight) and the slots promised to requests the admission
//! queue has handed a worker (reserved), counted together against the worker's capacity.
//!
//! Both counts live in one atomic word ([`word::Slots`]: in flight in the low 32 bits, reserved in the high
//! 32), so "is there room below capacity?" and "take it" are one compare-and-swap, and a request taking
//! a slot directly can never race a hand-off from the queue past the last slot. Only guards move the
//! word, as tower's concurrency limit returns its permits only from the response future's drop:
//! - [`LoadGuard::try_take`] and [`Reservation::try_take`] create their guard in the same step as the
//!   compare-and-swap;
//! - a [`Reservation`] becomes a [`LoadGuard`] by move (`From`), which shifts one slot from reserved to
//!   in flight without ever leaving it free;
//! - dropping a guard gives its slot back and tells the admission queue ([`SlotFreed`]) so the best
//!   waiter gets it at once. A breaker refusal after the slot was taken is such a drop.
//!
//! The notification is a trait object so the fleet does not depend on the queue that implements it.

use crate::config::CircuitBreakerConfig;
use crate::fleet::worker::Worker;
use gateway_core::OutcomeKind;
use guard::{Permit, Rejected, Transition};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::time::Instant;
use word::{taken, IN_FLIGHT, RESERVED};

pub mod word;

/// Told when a slot on a worker frees (a [`LoadGuard`] or unused [`Reservation`] dropped), so a waiting
/// request can take it. The admission queue implements it.
pub trait SlotFreed: Send + Sync {
    /// A slot on `worker` was given back.
    fn slot_freed(&self, worker: &Arc<Worker>);
}

/// A slot of a count kept outside this process (the count replicas share, [`crate::cluster`]), held with
/// a load guard and given back when dropped. A trait so the fleet does not depend on the cluster.
pub trait ExternalSlot: Send + Sync + std::fmt::Debug {}

/// Whom a guard tells when its slot frees, if anyone (weak: a guard never keeps the queue alive).
pub type Notify = Option<Weak<dyn SlotFreed>>;

/// Why a worker refused a request.
#[derive(Debug)]
pub enum Refused {
    /// No slot free below its capacity.
    Full,
    /// Its circuit breaker refused.
    Breaker(Rejected),
}

/// A slot held on a worker for one dequeued request that has not been sent yet. Dropped unused (the
/// waiter left), it frees the slot and tells the queue; sent, it becomes a [`LoadGuard`] by `From`.
#[derive(Debug)]
pub struct Reservation {
    worker: Arc<Worker>,
    notify: Notify,
    /// Still holds its reserved slot (false once moved into a load guard or returned).
    live: bool,
}

impl Reservation {
    /// Reserves a slot on `worker` if in flight plus reserved is below `cap`; the check and the
    /// increment are one step.
    pub fn try_take(worker: &Arc<Worker>, cap: u32, notify: Notify) -> Option<Self> {
        worker.stats.slots.take(RESERVED, cap)?;
        Some(Self { worker: Arc::clone(worker), notify, live: true })
    }

    /// The worker the slot is on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Gives the slot back without telling anyone: for the queue itself, which holds the lock a
    /// notification would take again.
    pub fn return_quietly(mut self) {
        self.live = false;
        self.worker.stats.slots.release(RESERVED);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.live {
            self.worker.stats.slots.release(RESERVED);
            if let Some(to) = self.notify.as_ref().and_then(Weak::upgrade) {
                to.slot_freed(&self.worker);
            }
        }
    }
}

/// Holds one in-flight slot on a worker, and the breaker's permit for it. Dropped on every path
/// (success, error, client disconnect, stream end), so the count can never drift; a permit never settled
/// with a verdict is cancelled, which frees a half-open trial slot without judging the worker.
#[derive(Debug)]
pub struct LoadGuard {
    worker: Arc<Worker>,
    notify: Notify,
    permit: Option<Permit>,
    transition: Option<Transition>,
    /// Requests in flight or reserved on the worker, this one included, when the slot was taken.
    load_at_dispatch: u32,
    /// Its slot in the count shared with other replicas, if any (given back first when dropped).
    shared: Option<Box<dyn ExternalSlot>>,
}

impl From<Reservation> for LoadGuard {
    /// The reserved slot becomes in flight: the slot is never free in between.
    fn from(mut r: Reservation) -> Self {
        r.live = false;
        let word = r.worker.stats.slots.reserved_to_in_flight();
        Self::new(Arc::clone(&r.worker), r.notify.clone(), word)
    }
}

impl LoadGuard {
    /// Takes an in-flight slot on `worker` if in flight plus reserved is below `cap`; the check and the
    /// increment are one step. The guard holds no breaker permit yet (see [`LoadGuard::admit`]).
    pub fn try_take(worker: &Arc<Worker>, cap: u32, notify: Notify) -> Option<Self> {
        let word = worker.stats.slots.take(IN_FLIGHT, cap)?;
        Some(Self::new(Arc::clone(worker), notify, word))
    }

    fn new(worker: Arc<Worker>, notify: Notify, word: u64) -> Self {
        let load_at_dispatch = u32::try_from(taken(word)).unwrap_or(u32::MAX);
        Self { worker, notify, permit: None, transition: None, load_at_dispatch, shared: None }
    }

    /// Holds `slot` of the worker's shared count with this one, so both are given back together.
    pub fn hold_shared(&mut self, slot: impl ExternalSlot + 'static) {
        self.shared = Some(Box::new(slot));
    }

    /// Takes, when `breaker` is on, the worker's breaker permit, and counts the dispatch. On a breaker
    /// refusal the guard is dropped: the slot frees like any other.
    pub fn admit(mut self, breaker: bool, now: Instant) -> Result<Self, Refused> {
        if breaker {
            let mut permit = self.worker.breaker.lock().try_acquire(now.into_std()).map_err(Refused::Breaker)?;
            self.transition = permit.transition.take();
            self.permit = Some(permit);
        }
        self.worker.log_transition(self.transition);
        self.worker.count_dispatch();
        Ok(self)
    }

    /// The worker this slot is on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Requests in flight or reserved on the worker, this one included, when the slot was taken.
    pub fn load_at_dispatch(&self) -> u32 {
        self.load_at_dispatch
    }

    /// The breaker transition taking the permit made (open to half-open), once.
    pub fn take_transition(&mut self) -> Option<Transition> {
        self.transition.take()
    }

    /// Reports the request's verdict to the breaker (once). A failure also opens the breaker when the
    /// worker's recent failure rate reaches `error_rate_threshold` over at least `min_requests` outcomes
    /// (its window must be fed first).
    pub fn settle(&mut self, kind: OutcomeKind, now: Instant, cfg: &CircuitBreakerConfig) -> Option<Transition> {
        let permit = self.permit.take()?;
        let now = now.into_std();
        let mut breaker = self.worker.breaker.lock();
        let mut t = breaker.on_outcome(permit, kind, now);
        if t.is_none() && kind.is_failure() && cfg.error_rate_threshold > 0.0 {
            let (total, failures) = self.worker.stats.errors.lock().counts(now);
            if total >= cfg.min_requests.max(1) && failures as f64 >= cfg.error_rate_threshold * total as f64 {
                t = breaker.trip(now);
            }
        }
        drop(breaker);
        self.worker.log_transition(t)
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        // The shared slot first: its release is on its way before a local waiter asks Redis for one.
        drop(self.shared.take());
        if let Some(permit) = self.permit.take() {
            self.worker.breaker.lock().on_cancel(permit);
        }
        self.worker.stats.slots.release(IN_FLIGHT);
        if let Some(to) = self.notify.as_ref().and_then(Weak::upgrade) {
            to.slot_freed(&self.worker);
        }
    }
}

/// The worker's side of its guards, here beside them (a worker holds only its word, [`word::Slots`]).
impl Worker {
    /// Takes an in-flight slot if one is free below `cap` (reserved slots count as taken) and, when
    /// `breaker` is on, the breaker's permit. The capacity check and the increment are one atomic step
    /// that creates the guard, so concurrent requests never push the worker past its capacity; a
    /// breaker refusal drops the guard. `notify` is told when the slot frees.
    pub fn acquire(
        self: &Arc<Self>,
        breaker: bool,
        cap: u32,
        now: Instant,
        notify: Notify,
    ) -> Result<LoadGuard, Refused> {
        LoadGuard::try_take(self, cap, notify).ok_or(Refused::Full)?.admit(breaker, now)
    }

    /// Whether it is full: it reports requests waiting in its own queue, or the gateway held more than
    /// its capacity (`default` as in [`Worker::capacity`]) on it when `load` was taken.
    pub fn was_full(&self, load: &LoadGuard, default: u32) -> bool {
        self.stats.scraped_waiting.load(Ordering::Relaxed) > 0 || load.load_at_dispatch() > self.capacity(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    /// Counts the slots it was told about.
    #[derive(Default)]
    struct Counter(AtomicU64);

    impl SlotFreed for Counter {
        fn slot_freed(&self, _: &Arc<Worker>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn worker() -> Arc<Worker> {
        Arc::new(Worker::new(1, WorkerConfig::from_url("http://127.0.0.1:1")))
    }

    fn notify(counter: &Arc<Counter>) -> Notify {
        let weak: Weak<dyn SlotFreed> = Arc::downgrade(counter) as Weak<dyn SlotFreed>;
        Some(weak)
    }

    #[test]
    fn the_two_counts_share_one_word_and_capacity() {
        let w = worker();
        let s = &w.stats.slots;
        let r = Reservation::try_take(&w, 2, None).expect("room");
        let g = LoadGuard::try_take(&w, 2, None).expect("room");
        assert_eq!((s.in_flight(), s.reserved(), s.taken()), (1, 1, 2));
        assert!(!s.has_room(2));
        assert!(LoadGuard::try_take(&w, 2, None).is_none(), "a reserved slot counts as taken");
        assert_eq!(g.load_at_dispatch(), 2);
        let sent = LoadGuard::from(r);
        assert_eq!((s.in_flight(), s.reserved()), (2, 0), "the reservation moved into flight");
        assert_eq!(sent.load_at_dispatch(), 2);
        drop((g, sent));
        assert_eq!(s.taken(), 0);
        assert!(LoadGuard::try_take(&w, 0, None).is_none(), "capacity 0 admits nothing");
    }

    #[test]
    fn the_peak_covers_every_in_flight_count_since_it_started() {
        let w = worker();
        let s = &w.stats.slots;
        let a = LoadGuard::try_take(&w, 4, None).expect("room");
        s.start_peak();
        assert_eq!(s.peak(), 1, "starts at the count in flight");
        let r = Reservation::try_take(&w, 4, None).expect("room");
        assert_eq!(s.peak(), 1, "a reservation is not in flight");
        let b = LoadGuard::from(r);
        let c = LoadGuard::try_take(&w, 4, None).expect("room");
        drop((a, b, c));
        assert_eq!((s.in_flight(), s.peak()), (0, 3), "the peak outlives the requests");
        s.start_peak();
        assert_eq!(s.peak(), 0);
    }

    #[test]
    fn every_release_tells_the_queue_except_a_quiet_return() {
        let w = worker();
        let freed = Arc::new(Counter::default());
        drop(LoadGuard::try_take(&w, 1, notify(&freed)).expect("room"));
        drop(Reservation::try_take(&w, 1, notify(&freed)).expect("room"));
        let sent = LoadGuard::from(Reservation::try_take(&w, 1, notify(&freed)).expect("room"));
        assert_eq!(freed.0.load(Ordering::Relaxed), 2, "the hand-off itself frees nothing");
        drop(sent);
        Reservation::try_take(&w, 1, notify(&freed)).expect("room").return_quietly();
        assert_eq!(freed.0.load(Ordering::Relaxed), 3);
        assert_eq!(w.stats.slots.taken(), 0);
    }

    #[test]
    fn a_breaker_refusal_gives_the_slot_back_and_says_so() {
        let w = worker();
        let freed = Arc::new(Counter::default());
        w.trip_breaker(Instant::now());
        let refused = w.acquire(true, 1, Instant::now(), notify(&freed));
        assert!(matches!(refused, Err(Refused::Breaker(_))));
        assert_eq!(w.stats.slots.taken(), 0);
        assert_eq!(freed.0.load(Ordering::Relaxed), 1, "a waiter may want the slot the refusal freed");
        let r = Reservation::try_take(&w, 1, None).expect("room");
        assert!(matches!(LoadGuard::from(r).admit(true, Instant::now()), Err(Refused::Breaker(_))));
        assert_eq!(w.stats.slots.taken(), 0);
        assert_eq!(w.stats.requests_total.load(Ordering::Relaxed), 0, "nothing was dispatched");
    }

    /// Many threads take slots directly, reserve and hand reservations over, and release, against
    /// capacities 1 to 4: the slots held never exceed the capacity, the capacity is reached, every
    /// release is announced, and the word returns to 0.
    #[test]
    fn concurrent_takes_and_hand_offs_never_exceed_capacity() {
        const THREADS: usize = 8;
        const ROUNDS: usize = 4000;
        for cap in 1..=4u32 {
            let w = worker();
            let freed = Arc::new(Counter::default());
            // Held guards counted apart from the word, and the most seen at once.
            let held = AtomicU32::new(0);
            let high_water = AtomicU32::new(0);
            let word_high_water = AtomicU32::new(0);
            let releases = AtomicU64::new(0);
            std::thread::scope(|scope| {
                for t in 0..THREADS {
                    let (w, freed) = (&w, &freed);
                    let (held, high_water, word_high_water, releases) =
                        (&held, &high_water, &word_high_water, &releases);
                    scope.spawn(move || {
                        let note = || {
                            let now = held.fetch_add(1, Ordering::AcqRel) + 1;
                            high_water.fetch_max(now, Ordering::AcqRel);
                            word_high_water.fetch_max(w.stats.slots.taken(), Ordering::AcqRel);
                        };
                        let unnote = || {
                            held.fetch_sub(1, Ordering::AcqRel);
                            releases.fetch_add(1, Ordering::Relaxed);
                        };
                        for i in 0..ROUNDS {
                            match (t + i) % 3 {
                                0 => {
                                    if let Some(g) = LoadGuard::try_take(w, cap, notify(freed)) {
                                        note();
                                        std::thread::yield_now();
                                        unnote();
                                        drop(g);
                                    }
                                }
                                1 => {
                                    if let Some(r) = Reservation::try_take(w, cap, notify(freed)) {
                                        note();
                                        std::thread::yield_now();
                                        let g = LoadGuard::from(r);
                                        std::thread::yield_now();
                                        unnote();
                                        drop(g);
                                    }
                                }
                                _ => {
                                    if let Some(r) = Reservation::try_take(w, cap, notify(freed)) {
                                        note();
                                        std::thread::yield_now();
                                        unnote();
                                        drop(r);
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let hw = high_water.load(Ordering::Relaxed);
            assert!(hw <= cap, "capacity {cap}: {hw} slots held at once");
            assert_eq!(hw, cap, "capacity {cap}: the load reached it (the test had contention)");
            assert!(word_high_water.load(Ordering::Relaxed) <= cap, "capacity {cap}: the word went past it");
            assert_eq!(w.stats.slots.taken(), 0, "capacity {cap}: every slot came back");
            assert_eq!((w.stats.slots.in_flight(), w.stats.slots.reserved()), (0, 0));
            assert_eq!(freed.0.load(Ordering::Relaxed), releases.load(Ordering::Relaxed), "every release announced");
        }
    }
}
