//! The admission queue's ordering: which waiting request a freed worker serves next.
//!
//! # Why
//! When every worker serving a model is at capacity, requests wait here instead of being refused.
//! The order must honour priority classes, yet never starve the low class, and must keep one tenant
//! flooding the queue from delaying everyone else by the length of its backlog.
//!
//! # Algorithm
//! Each item has a base class ([`Priority`]), a tenant (e.g. a hash of the API key), an arrival
//! time and optionally a deadline and a retry count ([`Meta`]). The next item is the minimum of the
//! key `(standing, deadline, arrival sequence)`, where standing is `(level, tenant's turn)`:
//! 1. *Level* (higher goes first): a weighted score ([`Scoring`]),
//!    `priority * class_points + aging_steps + wait * seconds_waited + token_fit * fits + retries * n`,
//!    where `class_points` is 3 for urgent down to 0 for low and `aging_steps` counts the full `aging`
//!    periods waited. It is capped at `top = 3 * priority + token_fit + retries * RETRY_CAP`, the
//!    most a fresh request can score, and an item that has waited `3 * aging` is *aged out*: it scores
//!    `top` whatever the weights. With the default weights (`priority = 1`, `token_fit = 1`, the rest
//!    0) and every item fitting, the level is `3 - effective class + 1`: the order is exactly the
//!    class-with-aging order of before (a low request waiting `3 * aging` competes as urgent).
//!    `aging = 0` disables aging (and aging out).
//! 2. *Fairness* (when on): among items of the best level, the tenant served least recently goes
//!    first. Every pop stamps its tenant with an increasing serve counter, so tenants with waiting
//!    work take turns (round robin) whatever their backlogs. With fairness off this component is
//!    constant: pure arrival order within the level.
//! 3. *Deadline*: within one standing, aged-out items first, then the earlier deadline, then items
//!    without one (a caller's `X-Request-Timeout` makes its deadline earlier).
//! 4. *Arrival order*: ties go to the older item.
//!
//! # Aging bounds every wait, whatever the weights
//! An aged-out item has the highest level any item can have, and among aged-out items of a tenant
//! arrival decides (their deadlines are ignored). So once an item has waited `3 * aging`, only items
//! that arrived before it (and, with fairness, one item per other tenant per round) can go first.
//! The property test `aging_bounds_every_wait_whatever_the_weights` checks it.
//!
//! # Examples of each weight
//! - `priority = 2`: class counts double, so it takes two aging steps (not one) to lift a normal
//!   request to high's level.
//! - `wait = 0.5`: every two seconds waited count as one class, on top of the aging steps (aging
//!   that is continuous rather than stepwise).
//! - `token_fit = 2`: a request whose token estimate fits its budget left (the caller's `fits`)
//!   scores two classes above one that does not: among budget waiters, the one that can go now goes
//!   before the one that must still wait for its budget, until the latter ages out.
//! - `retries = 1`: a request sent back to the queue (its worker failed before any byte, its budget
//!   check failed again) rises one class per return, at most [`RETRY_CAP`] times.
//!
//! Tenant records exist only while a tenant has something queued, so they never outnumber the items
//! (at most `max_size`). A tenant that arrives, or comes back after its queue emptied, is stamped with
//! the current serve counter: it joins the *back* of the round, behind every tenant that was served
//! before it, as a new flow joins the tail of the active list in deficit round robin. Emptying one's
//! queue and re-queueing therefore never jumps ahead of anyone, and forgetting the old stamp loses
//! nothing that the round robin needs.
//!
//! # Cache-aware hand-off
//! Under saturation every request waits here, and the worker whose slot frees first decides where it
//! runs: the hand-off *is* the routing. [`AdmissionQueue::pop_preferring`] keeps the order above for
//! everything it guarantees (levels, aging, the tenants' turns: it only chooses among waiters of the
//! head's *standing*) and decides inside that group with the caller's cache model, which tells for each
//! waiter how it [`Fit`]s the freed worker W: the time W would spend before its first token (the
//! prefill of the part of its prompt W does not hold), and a better worker if one holds more of it.
//! - **A waiter holds out for a better worker** while that worker is expected to free a slot for it
//!   sooner than W would cost it in extra prefill: its expected wait there is the number of waiters
//!   holding out for the same worker up to and including it, times that worker's slot interval. Under
//!   saturation this keeps each prompt where it is cached; when the better worker's line grows longer
//!   than a cold prefill, the prompt spills to W (a hot prompt then lives on two workers). A waiter
//!   never holds out once it has waited [`HOLD_OUT_LIMIT`] times the prefill it would save (a bound
//!   should the better worker stop freeing slots).
//! - **Of the others, the time W saves counts as time already waited, [`QueueConfig::prefill_weight`]
//!   times** (2 by default): they go in the order of their wait (or, with deadlines, their lateness)
//!   less that weight times the time W would spend before their first token. A waiter W holds goes
//!   before a cold one that has waited longer by less than twice the prefill W saves on it: the slot
//!   frees sooner, the prompt stays where it lives, and a cold prompt is placed on a worker when no
//!   waiter of that worker's own prompts is left, i.e. on the worker whose cache is in least demand.
//!   With equal fits (a policy without a cache model) this is exactly `pop`'s order.
//!
//! The weight trades throughput against the tail. Measured on the routing bench (BENCHMARKS.md, issue
//! 13): under tight caches at saturation, weight 1 served 77 req/s at hit rate 0.73 and TTFT p50/p99
//! 0.51/1.5 s; weight 2, 82 req/s at 0.78 and 0.41/1.76 s; weight 3, 86 req/s at 0.80 and 0.35/1.9 s
//! (each cold prompt placed later evicts less that is in demand; the cold requests wait longer). The
//! opposite direction (0: wait alone; or cold before warm) shortens the tail only by placing cold
//! prompts at once on whichever worker frees: hits fell to 0.67 and 0.35.
//!
//! As a backstop whatever the fits, the waiter `pop` would serve is passed over at most
//! [`QueueConfig::max_overtaken`] times unless it holds out itself (0: strict `pop` order).
//!
//! `pop` and [`AdmissionQueue::position`] scan the items: O(n) and O(n log n), with n at most
//! `max_size` (100 by default); items point at their tenant's record by index (a small slab reused
//! through a free list), so a scan hashes nothing and compares arrival instants against three aging
//! cutoffs computed once per scan. `remove` is O(log n). Arrival times are clamped to be non-decreasing,
//! so a caller's clock going backwards cannot make a new item look older than earlier ones.

use gateway_core::Priority;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Default of [`QueueConfig::max_overtaken`]: times the waiter next in line may be passed over by
/// [`AdmissionQueue::pop_preferring`] for another of equal standing the freed worker suits better:
/// about one round of hand-offs on a small fleet.
pub const DEFAULT_MAX_OVERTAKEN: u32 = 16;

/// Default of [`QueueConfig::prefill_weight`]: each second of prefill the freed worker would spend on a
/// waiter counts as two seconds less waited (measured on the routing bench, see the module docs).
pub const DEFAULT_PREFILL_WEIGHT: f64 = 2.0;

/// A waiter holds out for a better worker until it has waited this many times the prefill it would
/// save: a bound should that worker stop freeing slots.
pub const HOLD_OUT_LIMIT: u32 = 3;

/// How a waiter fits the worker whose slot freed, as the caller's cache model predicts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fit {
    /// Time the freed worker would spend before this waiter's first token: the prefill of the part of
    /// its prompt the worker does not hold.
    pub here: Duration,
    /// A worker that holds more of its prompt.
    pub better: Option<Better>,
}

/// The worker a waiter would rather wait for ([`Fit::better`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Better {
    /// The worker (the caller's key); waiters holding out for the same key share its line.
    pub worker: u64,
    /// Time it would spend before this waiter's first token.
    pub there: Duration,
    /// Expected time between two of its slots freeing: what a waiter holding out for it expects to
    /// wait per waiter ahead of it.
    pub interval: Duration,
}

/// Returns to the queue counted by [`Scoring::retries`] at most (so retries cannot outgrow the cap).
pub const RETRY_CAP: u32 = 3;

/// Aging steps after which an item is aged out (scores the top level whatever the weights).
const AGED_OUT_STEPS: usize = 3;

/// Weights of the level an item is ordered by (`[queue.scoring]`); see the module docs. The defaults
/// give the plain class-with-aging order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// Per class point (urgent 3, high 2, normal 1, low 0).
    pub priority: f64,
    /// Per second waited, on top of the aging steps.
    pub wait: f64,
    /// When the item's token estimate fits its budget left.
    pub token_fit: f64,
    /// Per return to the queue, at most [`RETRY_CAP`].
    pub retries: f64,
}

impl Default for Scoring {
    fn default() -> Self {
        Self { priority: 1.0, wait: 0.0, token_fit: 1.0, retries: 0.0 }
    }
}

impl Scoring {
    /// The most any item can score, which an aged-out item scores.
    fn top(&self) -> f64 {
        3.0 * self.priority + self.token_fit + self.retries * f64::from(RETRY_CAP)
    }
}

/// Bounds and ordering switches of one queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueConfig {
    /// Most items waiting at once; 0 refuses every push.
    pub max_size: usize,
    /// Waiting this long raises an item's level by one step (`aging_secs` in the config); zero disables aging.
    pub aging: Duration,
    /// Round robin between tenants within a level (else pure arrival order).
    pub fairness: bool,
    /// Times the waiter next in line may be passed over by [`AdmissionQueue::pop_preferring`] for
    /// another of equal standing the freed worker suits better; zero turns the preference off.
    pub max_overtaken: u32,
    /// Seconds of waiting each second of the freed worker's time to first token counts against, in
    /// [`AdmissionQueue::pop_preferring`]'s order: 0 serves equals by their wait alone, higher prefers
    /// the waiters the worker holds more strongly.
    pub prefill_weight: f64,
    /// Weights of the level.
    pub scoring: Scoring,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_size: 100,
            aging: Duration::from_secs(10),
            fairness: true,
            max_overtaken: DEFAULT_MAX_OVERTAKEN,
            prefill_weight: DEFAULT_PREFILL_WEIGHT,
            scoring: Scoring::default(),
        }
    }
}

/// What an item is ordered by besides its arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Base class.
    pub class: Priority,
    /// Its tenant, for fairness.
    pub tenant: u64,
    /// When it must have left the queue; earlier goes first within a standing.
    pub deadline: Option<Instant>,
    /// Times it came back to the queue.
    pub retries: u32,
}

impl Meta {
    /// An item of `class` for `tenant`, without deadline or retries.
    pub fn new(class: Priority, tenant: u64) -> Self {
        Self { class, tenant, deadline: None, retries: 0 }
    }
}

/// Names one queued item, to remove it or ask its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

/// The queue was full; the item is handed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> Full<T> {
    /// The refused item.
    pub fn into_inner(self) -> T {
        self.0
    }
}

#[derive(Debug, Clone)]
struct Entry<T> {
    item: T,
    class: Priority,
    /// Index of the tenant's record in `slots`.
    slot: usize,
    at: Instant,
    deadline: Option<Instant>,
    retries: u32,
    /// Times `pop_preferring` served another of equal standing while this one was next in line.
    bypassed: u32,
}

#[derive(Debug, Clone, Copy)]
struct TenantRec {
    id: u64,
    queued: usize,
    stamp: u64,
}

/// An item's standing: its level negated (lower goes first), then its tenant's turn.
type Standing = (i64, u64);
/// Within a standing: aged out first (0), then by deadline (1), then none (2); then arrival.
type Tiebreak = (u8, Option<Instant>, u64);

/// What one scan needs: aging thresholds (an item that arrived at or before `cutoffs[k]` has aged
/// `k + 1` steps) and the weights.
struct Scan {
    cutoffs: [Option<Instant>; AGED_OUT_STEPS],
    now: Instant,
    scoring: Scoring,
}

impl Scan {
    fn new(cfg: &QueueConfig, now: Instant) -> Self {
        let mut cutoffs = [None; AGED_OUT_STEPS];
        if !cfg.aging.is_zero() {
            for (k, c) in cutoffs.iter_mut().enumerate() {
                *c = cfg.aging.checked_mul(k as u32 + 1).and_then(|d| now.checked_sub(d));
            }
        }
        Self { cutoffs, now, scoring: cfg.scoring }
    }

    fn steps<T>(&self, e: &Entry<T>) -> usize {
        self.cutoffs.iter().take_while(|c| c.is_some_and(|c| e.at <= c)).count()
    }

    /// The level, quantized so that equal inputs compare equal. See the module docs.
    fn level<T>(&self, e: &Entry<T>, fits: bool) -> i64 {
        let w = &self.scoring;
        let steps = self.steps(e);
        let top = w.top();
        let level = if steps >= AGED_OUT_STEPS {
            top
        } else {
            let class_points = 3.0 - e.class.rank().min(3) as f64;
            let waited = self.now.saturating_duration_since(e.at).as_secs_f64();
            let raw = w.priority * class_points
                + steps as f64
                + w.wait * waited
                + if fits { w.token_fit } else { 0.0 }
                + w.retries * f64::from(e.retries.min(RETRY_CAP));
            raw.min(top)
        };
        (level * 1_000_000.0).round() as i64
    }

    fn tiebreak<T>(&self, seq: u64, e: &Entry<T>) -> Tiebreak {
        match e.deadline {
            _ if self.steps(e) >= AGED_OUT_STEPS => (0, None, seq),
            Some(d) => (1, Some(d), seq),
            None => (2, None, seq),
        }
    }
}

/// `to - from` in seconds, negative when `to` is earlier.
fn secs_between(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64(),
        None => -from.saturating_duration_since(to).as_secs_f64(),
    }
}

/// Waiting requests for one model, in dispatch order; see the module docs.
#[derive(Debug, Clone)]
pub struct AdmissionQueue<T> {
    cfg: QueueConfig,
    /// By arrival sequence (= ticket).
    entries: BTreeMap<u64, Entry<T>>,
    /// Tenant id to its record's index in `slots` (only tenants with something queued).
    tenants: HashMap<u64, usize>,
    /// Tenant records, reused through `free`; entries point here so scans need no hashing.
    slots: Vec<TenantRec>,
    free: Vec<usize>,
    next_seq: u64,
    serves: u64,
    counts: [usize; 4],
    last_at: Option<Instant>,
}

impl<T> Default for AdmissionQueue<T> {
    fn default() -> Self {
        Self::new(QueueConfig::default())
    }
}

impl<T> AdmissionQueue<T> {
    /// An empty queue.
    pub fn new(cfg: QueueConfig) -> Self {
        Self {
            cfg,
            entries: BTreeMap::new(),
            tenants: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            next_seq: 0,
            serves: 0,
            counts: [0; 4],
            last_at: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> QueueConfig {
        self.cfg
    }

    /// Changes the configuration (a reload). Items already queued stay even if `max_size` shrank below
    /// their number; pushes are refused until the queue is back under the new bound.
    pub fn set_config(&mut self, cfg: QueueConfig) {
        self.cfg = cfg;
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The items waiting, in arrival order.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.entries.values().map(|e| &e.item)
    }

    /// The queued item of `ticket`, to change what the caller keeps in it.
    pub fn get_mut(&mut self, ticket: Ticket) -> Option<&mut T> {
        self.entries.get_mut(&ticket.0).map(|e| &mut e.item)
    }

    /// Counts one more return to the queue for `ticket` ([`Scoring::retries`]).
    pub fn note_retry(&mut self, ticket: Ticket) {
        if let Some(e) = self.entries.get_mut(&ticket.0) {
            e.retries = e.retries.saturating_add(1);
        }
    }

    /// Tenants with something queued (the size of the fairness bookkeeping).
    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// Items waiting per base class, indexed by [`Priority::rank`].
    pub fn counts_by_class(&self) -> [usize; 4] {
        self.counts
    }

    /// How long the oldest item has waited, if any.
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        self.entries.values().next().map(|e| now.saturating_duration_since(e.at))
    }

    /// Queues `item` of class `class` for `tenant`, or hands it back when the queue is full.
    pub fn push(&mut self, item: T, class: Priority, tenant: u64, now: Instant) -> Result<Ticket, Full<T>> {
        self.push_with(item, Meta::new(class, tenant), now)
    }

    /// Queues `item` ordered by `meta`, or hands it back when the queue is full.
    pub fn push_with(&mut self, item: T, meta: Meta, now: Instant) -> Result<Ticket, Full<T>> {
        if self.entries.len() >= self.cfg.max_size {
            return Err(Full(item));
        }
        let at = self.last_at.map_or(now, |last| last.max(now));
        self.last_at = Some(at);
        let seq = self.next_seq;
        self.next_seq += 1;
        let serves = self.serves;
        let slot = match self.tenants.get(&meta.tenant) {
            Some(&slot) => slot,
            None => {
                let rec = TenantRec { id: meta.tenant, queued: 0, stamp: serves };
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.slots[slot] = rec;
                        slot
                    }
                    None => {
                        self.slots.push(rec);
                        self.slots.len() - 1
                    }
                };
                self.tenants.insert(meta.tenant, slot);
                slot
            }
        };
        self.slots[slot].queued += 1;
        self.counts[meta.class.rank().min(3)] += 1;
        let entry =
            Entry { item, class: meta.class, slot, at, deadline: meta.deadline, retries: meta.retries, bypassed: 0 };
        self.entries.insert(seq, entry);
        Ok(Ticket(seq))
    }

    /// Takes the next item in dispatch order.
    pub fn pop(&mut self, now: Instant) -> Option<(Ticket, T)> {
        self.pop_where(now, |_| true)
    }

    /// Takes the next item in dispatch order among those `accept` approves (a freed worker that
    /// serves only some of the queued items' models).
    pub fn pop_where(&mut self, now: Instant, accept: impl FnMut(&T) -> bool) -> Option<(Ticket, T)> {
        let scan = Scan::new(&self.cfg, now);
        let (_, seq) = self.next_in_line(&scan, accept, |_| true)?;
        self.serve(seq)
    }

    /// The ticket `pop_where(now, accept)` would take, with `fits` telling whose token estimate fits
    /// its budget left ([`Scoring::token_fit`]); nothing changes.
    pub fn peek_scored(
        &self,
        now: Instant,
        accept: impl FnMut(&T) -> bool,
        fits: impl FnMut(&T) -> bool,
    ) -> Option<Ticket> {
        let scan = Scan::new(&self.cfg, now);
        self.next_in_line(&scan, accept, fits).map(|(_, seq)| Ticket(seq))
    }

    /// Takes the next item for a freed worker among those `accept` approves, by how each `fit`s that
    /// worker (see "Cache-aware hand-off" in the module docs). `None` when every accepted waiter of the
    /// best standing holds out for a better worker: the slot stays free.
    pub fn pop_preferring(
        &mut self,
        now: Instant,
        mut accept: impl FnMut(&T) -> bool,
        mut fit: impl FnMut(&T) -> Fit,
    ) -> Option<(Ticket, T)> {
        let scan = Scan::new(&self.cfg, now);
        let (standing, head) = self.next_in_line(&scan, &mut accept, |_| true)?;
        if self.entries.get(&head)?.bypassed >= self.cfg.max_overtaken {
            return self.serve(head);
        }
        // The group the head belongs to, in the order this worker serves it: what each waited (or how
        // little slack its deadline has left) less `prefill_weight` times the time this worker would
        // spend before its first token, the longest first; then `pop`'s own order.
        let weight = self.cfg.prefill_weight;
        let mut group: Vec<(f64, Tiebreak, Fit, Duration)> = Vec::new();
        for (&seq, e) in &self.entries {
            if self.standing(&scan, e, true) != standing || !accept(&e.item) {
                continue;
            }
            let f = fit(&e.item);
            let tie = scan.tiebreak(seq, e);
            let waited = now.saturating_duration_since(e.at);
            let lateness = match tie {
                (1, Some(deadline), _) => -secs_between(now, deadline),
                _ => waited.as_secs_f64(),
            };
            group.push((lateness - weight * f.here.as_secs_f64(), tie, f, waited));
        }
        group.sort_by(|a, b| (a.1 .0).cmp(&b.1 .0).then(b.0.total_cmp(&a.0)).then(a.1.cmp(&b.1)));
        // Waiters already holding out for each better worker, in this order: the queue before them there.
        let mut ahead: HashMap<u64, u32> = HashMap::new();
        let mut head_held_out = false;
        let mut chosen = None;
        for (_, (_, _, seq), f, waited) in &group {
            if let Some(b) = f.better {
                let n = ahead.entry(b.worker).or_default();
                *n += 1;
                let extra = f.here.saturating_sub(b.there);
                let expected = b.interval.saturating_mul(*n);
                if extra > expected && *waited < extra.saturating_mul(HOLD_OUT_LIMIT) {
                    head_held_out |= *seq == head;
                    continue;
                }
            }
            chosen = Some(*seq);
            break;
        }
        let chosen = chosen?;
        if chosen != head && !head_held_out {
            if let Some(e) = self.entries.get_mut(&head) {
                e.bypassed += 1;
            }
        }
        self.serve(chosen)
    }

    /// An entry's standing: its level (negated), then (with fairness) its tenant's turn. Lower goes first.
    fn standing(&self, scan: &Scan, e: &Entry<T>, fits: bool) -> Standing {
        let stamp = if self.cfg.fairness { self.slots[e.slot].stamp } else { 0 };
        (-scan.level(e, fits), stamp)
    }

    /// The best standing among accepted items and its first item by tiebreak: what `pop` serves.
    fn next_in_line(
        &self,
        scan: &Scan,
        mut accept: impl FnMut(&T) -> bool,
        mut fits: impl FnMut(&T) -> bool,
    ) -> Option<(Standing, u64)> {
        let mut best: Option<(Standing, Tiebreak)> = None;
        for (&seq, e) in &self.entries {
            if !accept(&e.item) {
                continue;
            }
            let key = (self.standing(scan, e, fits(&e.item)), scan.tiebreak(seq, e));
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|(standing, (_, _, seq))| (standing, seq))
    }

    /// Removes `seq` as served: its tenant's turn is stamped.
    fn serve(&mut self, seq: u64) -> Option<(Ticket, T)> {
        let e = self.take(seq)?;
        self.serves += 1;
        if let Some(rec) = self.slots.get_mut(e.slot).filter(|r| r.queued > 0) {
            rec.stamp = self.serves;
        }
        Some((Ticket(seq), e.item))
    }

    /// Removes `ticket` as served (e.g. the one [`AdmissionQueue::peek_scored`] named): its tenant's
    /// turn is stamped, as by a pop.
    pub fn serve_ticket(&mut self, ticket: Ticket) -> Option<T> {
        self.serve(ticket.0).map(|(_, item)| item)
    }

    /// Removes an item (its client timed out or went away).
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        self.take(ticket.0).map(|e| e.item)
    }

    /// The item's 1-based position in the dispatch order as of `now` (1 = served next), if queued.
    pub fn position(&self, ticket: Ticket, now: Instant) -> Option<usize> {
        if !self.entries.contains_key(&ticket.0) {
            return None;
        }
        self.dispatch_order(now).iter().position(|&t| t == ticket).map(|i| i + 1)
    }

    /// Every queued ticket in the order successive `pop(now)`s would return them (for positions and
    /// the admin API's queue view).
    pub fn dispatch_order(&self, now: Instant) -> Vec<Ticket> {
        let scan = Scan::new(&self.cfg, now);
        // Levels do not depend on pops: group by level, best first.
        let mut groups: BTreeMap<i64, Vec<(Tiebreak, usize)>> = BTreeMap::new();
        for (&seq, e) in &self.entries {
            groups.entry(-scan.level(e, true)).or_default().push((scan.tiebreak(seq, e), e.slot));
        }
        let mut order = Vec::with_capacity(self.entries.len());
        if !self.cfg.fairness {
            for (_, mut group) in groups {
                group.sort_unstable();
                order.extend(group.into_iter().map(|((_, _, seq), _)| Ticket(seq)));
            }
            return order;
        }
        // Replays the round robin: per level, tenants by (stamp, first tiebreak); each serve restamps.
        let mut stamps: Vec<u64> = self.slots.iter().map(|r| r.stamp).collect();
        let mut serves = self.serves;
        for (_, mut group) in groups {
            group.sort_unstable();
            let mut per_tenant: HashMap<usize, VecDeque<Tiebreak>> = HashMap::new();
            for (tb, slot) in group {
                per_tenant.entry(slot).or_default().push_back(tb);
            }
            let mut heap = BinaryHeap::new();
            for (&slot, items) in &per_tenant {
                if let Some(&first) = items.front() {
                    heap.push(Reverse((stamps[slot], first, slot)));
                }
            }
            while let Some(Reverse((_, tb, slot))) = heap.pop() {
                order.push(Ticket(tb.2));
                serves += 1;
                stamps[slot] = serves;
                let Some(items) = per_tenant.get_mut(&slot) else { continue };
                items.pop_front();
                if let Some(&next) = items.front() {
                    heap.push(Reverse((serves, next, slot)));
                }
            }
        }
        order
    }

    fn take(&mut self, seq: u64) -> Option<Entry<T>> {
        let e = self.entries.remove(&seq)?;
        self.counts[e.class.rank().min(3)] -= 1;
        if let Some(rec) = self.slots.get_mut(e.slot) {
            rec.queued -= 1;
            if rec.queued == 0 {
                self.tenants.remove(&rec.id);
                self.free.push(e.slot);
            }
        }
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Priority::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn queue(max_size: usize, aging: u64, fairness: bool) -> AdmissionQueue<u32> {
        AdmissionQueue::new(QueueConfig { max_size, aging: secs(aging), fairness, ..QueueConfig::default() })
    }

    fn drain(q: &mut AdmissionQueue<u32>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| q.pop(now).map(|(_, v)| v)).collect()
    }

    #[test]
    fn classes_first_then_arrival() {
        let t0 = Instant::now();
        let mut q = queue(10, 10, true);
        for (i, c) in [Low, Normal, High, Urgent, Normal, Low].into_iter().enumerate() {
            q.push(i as u32, c, 7, t0).unwrap();
        }
        assert_eq!(q.counts_by_class(), [1, 1, 2, 2]);
        assert_eq!(drain(&mut q, t0 + secs(1)), vec![3, 2, 1, 4, 0, 5]);
        assert_eq!(q.counts_by_class(), [0; 4]);
        assert_eq!(q.tenant_count(), 0);
    }

    #[test]
    fn aging_lifts_a_starving_low_request() {
        let t0 = Instant::now();
        for fairness in [true, false] {
            // Two normal arrivals per second, one dispatch per second: normal alone would starve low.
            let mut q = queue(1_000, 10, fairness);
            q.push(0, Low, 1, t0).unwrap();
            let mut served_low_at = None;
            for s in 1..100u32 {
                let now = t0 + secs(u64::from(s));
                q.push(s, Normal, 2, now).unwrap();
                q.push(s + 1_000, Normal, 2, now).unwrap();
                if q.pop(now).map(|(_, v)| v) == Some(0) {
                    served_low_at = Some(s);
                    break;
                }
            }
            // At 10 s it competes as normal and is the oldest.
            assert_eq!(served_low_at, Some(10), "fairness {fairness}");
        }
        let mut q = queue(100, 10, true);
        let low = q.push(0, Low, 1, t0).unwrap();
        q.push(1, Normal, 1, t0 + secs(5)).unwrap();
        assert_eq!(q.position(low, t0 + secs(5)), Some(2));
        assert_eq!(q.pop(t0 + secs(5)).map(|(_, v)| v), Some(1));
        // After 15 s: normal-equivalent, ahead of fresh normals, behind a fresh high.
        q.push(2, Normal, 1, t0 + secs(15)).unwrap();
        q.push(9, High, 1, t0 + secs(15)).unwrap();
        assert_eq!(q.dispatch_order(t0 + secs(15)), vec![Ticket(3), low, Ticket(2)]);
        // After 30 s it is urgent: first whatever arrives.
        q.push(10, Urgent, 1, t0 + secs(30)).unwrap();
        assert_eq!(q.position(low, t0 + secs(30)), Some(1));
        // Aging disabled: low stays last forever.
        let mut q = queue(100, 0, true);
        q.push(0, Low, 1, t0).unwrap();
        q.push(1, Normal, 1, t0 + secs(1_000)).unwrap();
        assert_eq!(drain(&mut q, t0 + secs(100_000)), vec![1, 0]);
    }

    #[test]
    fn a_light_tenant_is_not_stuck_behind_a_flood() {
        let t0 = Instant::now();
        let mut q = queue(200, 10, true);
        for i in 0..100 {
            q.push(i, Normal, 1, t0).unwrap();
        }
        let light = q.push(1_000, Normal, 2, t0).unwrap();
        assert_eq!(q.position(light, t0), Some(2));
        let first_two: Vec<u32> = (0..2).filter_map(|_| q.pop(t0).map(|(_, v)| v)).collect();
        assert!(first_two.contains(&1_000), "{first_two:?}");
        // After the flood was being served, a newcomer still waits at most one round.
        let late = q.push(2_000, Normal, 3, t0).unwrap();
        assert!(q.position(late, t0).is_some_and(|p| p <= 2));
        assert_eq!(q.tenant_count(), 2);
        // Fairness off: arrival order, the light request waits behind the flood.
        let mut q = queue(200, 10, false);
        for i in 0..100 {
            q.push(i, Normal, 1, t0).unwrap();
        }
        let light = q.push(1_000, Normal, 2, t0).unwrap();
        assert_eq!(q.position(light, t0), Some(101));
        assert_eq!(drain(&mut q, t0).last(), Some(&1_000));
    }

    #[test]
    fn tenants_take_turns_within_a_class_but_not_across() {
        let t0 = Instant::now();
        let mut q = queue(100, 1_000, true);
        for i in 0..3 {
            q.push(10 + i, Normal, 1, t0).unwrap();
        }
        for i in 0..3 {
            q.push(20 + i, Normal, 2, t0).unwrap();
        }
        q.push(30, High, 1, t0).unwrap();
        assert_eq!(drain(&mut q, t0), vec![30, 20, 10, 21, 11, 22, 12]);
    }

    #[test]
    fn pop_where_skips_what_the_worker_cannot_serve() {
        let t0 = Instant::now();
        let mut q = queue(10, 10, true);
        q.push(1, Urgent, 1, t0).unwrap();
        q.push(2, Low, 1, t0).unwrap();
        q.push(4, Normal, 2, t0).unwrap();
        assert_eq!(q.pop_where(t0, |v| v % 2 == 0).map(|(_, v)| v), Some(4));
        assert_eq!(q.pop_where(t0, |v| v % 2 == 0).map(|(_, v)| v), Some(2));
        assert_eq!(q.pop_where(t0, |v| v % 2 == 0), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn remove_forgets_the_item_and_empty_tenants() {
        let t0 = Instant::now();
        let mut q = queue(10, 10, true);
        let a = q.push(1, Normal, 1, t0).unwrap();
        let b = q.push(2, High, 2, t0 + secs(1)).unwrap();
        assert_eq!(q.oldest_wait(t0 + secs(3)), Some(secs(3)));
        assert_eq!(q.remove(a), Some(1));
        assert_eq!(q.remove(a), None);
        assert_eq!(q.position(a, t0), None);
        assert_eq!((q.len(), q.tenant_count(), q.counts_by_class()), (1, 1, [0, 1, 0, 0]));
        assert_eq!(q.oldest_wait(t0 + secs(3)), Some(secs(2)));
        assert_eq!(q.pop(t0), Some((b, 2)));
        assert_eq!((q.oldest_wait(t0), q.tenant_count(), q.is_empty()), (None, 0, true));
    }

    #[test]
    fn positions_match_pop_order() {
        let t0 = Instant::now();
        for fairness in [true, false] {
            let mut q = queue(100, 10, fairness);
            let classes = [Low, Normal, High, Urgent];
            for i in 0..60u32 {
                let at = t0 + Duration::from_millis(u64::from(i) * 500);
                q.push(i, classes[(i * 7 % 4) as usize], u64::from(i % 5 + i % 3), at).unwrap();
            }
            // Serve a few so that stamps differ, then compare.
            let now = t0 + secs(35);
            for _ in 0..7 {
                q.pop(now).unwrap();
            }
            let order = q.dispatch_order(now);
            for (i, &t) in order.iter().enumerate() {
                assert_eq!(q.position(t, now), Some(i + 1));
            }
            let popped: Vec<Ticket> = std::iter::from_fn(|| q.pop(now).map(|(t, _)| t)).collect();
            assert_eq!(popped, order, "fairness {fairness}");
        }
    }

    #[test]
    fn full_hands_the_item_back() {
        let t0 = Instant::now();
        let mut q = queue(2, 10, true);
        q.push(1, Normal, 1, t0).unwrap();
        q.push(2, Normal, 1, t0).unwrap();
        assert_eq!(q.push(3, Urgent, 2, t0), Err(Full(3)));
        assert_eq!((q.len(), q.tenant_count()), (2, 1));
        let mut zero = queue(0, 10, true);
        assert_eq!(zero.push(5, Urgent, 1, t0).map_err(Full::into_inner), Err(5));
        assert!(zero.is_empty());
        // Shrinking the bound keeps what is queued and refuses pushes until under it.
        q.set_config(QueueConfig { max_size: 1, ..q.config() });
        assert!(q.push(4, Normal, 1, t0).is_err());
        q.pop(t0).unwrap();
        assert!(q.push(4, Normal, 1, t0).is_err());
        q.pop(t0).unwrap();
        assert!(q.push(4, Normal, 1, t0).is_ok());
    }

    #[test]
    fn clock_backwards_does_not_reorder_arrivals() {
        let t0 = Instant::now() + secs(100);
        let mut q = queue(10, 10, false);
        q.push(1, Low, 1, t0).unwrap();
        q.push(2, Low, 1, t0 - secs(50)).unwrap(); // clamped to t0
        assert_eq!(q.oldest_wait(t0 - secs(60)), Some(Duration::ZERO));
        assert_eq!(drain(&mut q, t0 + secs(25)), vec![1, 2]);
    }

    /// Fits for the hand-off tests: multiples of 10 are held by the freed worker (20 ms to a first
    /// token); the others are cold everywhere (1 s of prefill).
    fn held(v: &u32) -> Fit {
        Fit {
            here: if v.is_multiple_of(10) { Duration::from_millis(20) } else { secs(1) + Duration::from_millis(20) },
            better: None,
        }
    }

    #[test]
    fn hand_off_prefers_the_waiter_the_worker_holds_among_equals() {
        let t0 = Instant::now();
        for fairness in [true, false] {
            let mut q = queue(10, 10, fairness);
            for v in [1, 2, 30, 4, 50] {
                q.push(v, Normal, 7, t0).unwrap();
            }
            let pop = |q: &mut AdmissionQueue<u32>| q.pop_preferring(t0, |_| true, held).map(|(_, v)| v);
            // Equal standing (one tenant, one class): the held prefixes first, oldest first among them;
            // then arrival order when nothing is held.
            assert_eq!([pop(&mut q), pop(&mut q), pop(&mut q)], [Some(30), Some(50), Some(1)], "fairness {fairness}");
            // `accept` still filters: an odd-only worker takes the odd ones.
            assert_eq!(q.pop_preferring(t0, |v| v % 2 == 1, held).map(|(_, v)| v), None);
            assert_eq!(q.len(), 2);
        }
    }

    #[test]
    fn a_waiter_holds_out_for_a_better_worker_until_its_line_costs_more_than_the_prefill() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // 100.. are held by worker 7 (20 ms there) and cold here (1 s): 980 ms to save by waiting.
        let fit = |v: &u32| {
            if *v >= 100 {
                Fit { here: secs(1), better: Some(Better { worker: 7, there: ms(20), interval: ms(100) }) }
            } else {
                held(v)
            }
        };
        let mut q = queue(100, 0, false);
        q.push(100, Normal, 1, t0).unwrap();
        assert_eq!(q.pop_preferring(t0, |_| true, fit).map(|(_, v)| v), None, "worker 7 frees sooner");
        // A cold newcomer takes the slot; the one holding out stays.
        q.push(1, Normal, 1, t0).unwrap();
        assert_eq!(q.pop_preferring(t0, |_| true, fit).map(|(_, v)| v), Some(1));
        // Nine more for worker 7: the tenth in its line expects 1 s there, more than the 980 ms it
        // would save: it spills here; the nine before it keep holding out.
        for v in 101..110 {
            q.push(v, Normal, 1, t0).unwrap();
        }
        assert_eq!(q.pop_preferring(t0, |_| true, fit).map(|(_, v)| v), Some(109));
        assert_eq!(q.pop_preferring(t0, |_| true, fit).map(|(_, v)| v), None);
        // Should worker 7 stop freeing slots, nobody holds out past three times its saving.
        let late = t0 + ms(2940);
        assert_eq!(q.pop_preferring(late, |_| true, fit).map(|(_, v)| v), Some(100));
        // Holding out is not being passed over: the head's count did not move while it held out.
        assert_eq!(q.entries.values().map(|e| e.bypassed).max(), Some(0));
    }

    #[test]
    fn hand_off_never_beats_class_or_the_tenants_turn() {
        let t0 = Instant::now();
        let mut q = queue(10, 10, true);
        q.push(10, Normal, 1, t0).unwrap(); // held, but normal
        q.push(1, High, 1, t0).unwrap();
        let pop = |q: &mut AdmissionQueue<u32>| q.pop_preferring(t0, |_| true, held).map(|(_, v)| v);
        assert_eq!(pop(&mut q), Some(1), "class first");
        assert_eq!(pop(&mut q), Some(10));
        // Tenant 1 was just served; tenant 2's turn comes before tenant 1's held waiter.
        q.push(20, Normal, 1, t0).unwrap();
        q.push(3, Normal, 2, t0).unwrap();
        q.push(40, Normal, 1, t0).unwrap();
        // Tenant 2 arrived after tenant 1's last serve: same stamp, same turn; the held one goes first.
        assert_eq!(pop(&mut q), Some(20));
        // Now tenant 1 was served: tenant 2's turn, whatever tenant 1 holds.
        assert_eq!(pop(&mut q), Some(3));
        assert_eq!(pop(&mut q), Some(40));
    }

    #[test]
    fn the_next_in_line_is_passed_over_at_most_max_bypass_times() {
        let t0 = Instant::now();
        let mut q = queue(100, 0, false);
        q.push(1, Normal, 1, t0).unwrap(); // never held: passed over while held ones keep coming
        let mut served_at = None;
        for k in 0..2 * DEFAULT_MAX_OVERTAKEN {
            q.push(10 * (k + 1), Normal, 1, t0).unwrap();
            if q.pop_preferring(t0, |_| true, held).map(|(_, v)| v) == Some(1) {
                served_at = Some(k);
                break;
            }
        }
        assert_eq!(served_at, Some(DEFAULT_MAX_OVERTAKEN));
    }

    #[test]
    fn a_waiter_is_overtaken_only_by_ones_whose_weighted_saving_exceeds_its_longer_wait() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for weight in [1.0, 2.0, 3.0] {
            let mut q = AdmissionQueue::new(QueueConfig { prefill_weight: weight, ..QueueConfig::default() });
            // A held waiter saves 1 s of prefill (20 ms against 1.02 s), worth `weight` s of waiting.
            let worth = ms((weight * 1000.0) as u64);
            q.push(1, Normal, 1, t0).unwrap(); // never held
            q.push(20, Normal, 1, t0 + worth - ms(100)).unwrap();
            let now = t0 + worth;
            assert_eq!(q.pop_preferring(now, |_| true, held).map(|(_, v)| v), Some(20), "weight {weight}");
            q.push(40, Normal, 1, t0 + worth + ms(100)).unwrap();
            let now = t0 + worth + ms(200);
            assert_eq!(q.pop_preferring(now, |_| true, held).map(|(_, v)| v), Some(1), "weight {weight}");
            assert_eq!(q.pop_preferring(now, |_| true, held).map(|(_, v)| v), Some(40));
        }
        // Weight 0: equals leave by their wait alone, however much a later one would save.
        let mut q = AdmissionQueue::new(QueueConfig { prefill_weight: 0.0, ..QueueConfig::default() });
        q.push(1, Normal, 1, t0).unwrap();
        q.push(20, Normal, 1, t0 + ms(1)).unwrap();
        assert_eq!(q.pop_preferring(t0 + ms(2), |_| true, held).map(|(_, v)| v), Some(1));
        // A max_overtaken of zero turns the preference off: strict order.
        let mut q = AdmissionQueue::new(QueueConfig { max_overtaken: 0, ..QueueConfig::default() });
        for v in [1, 20, 30] {
            q.push(v, Normal, 1, t0).unwrap();
        }
        assert_eq!(q.pop_preferring(t0, |_| true, held).map(|(_, v)| v), Some(1));
    }

    #[test]
    fn aging_still_lifts_a_waiter_the_hand_off_passes_over() {
        let t0 = Instant::now();
        for fairness in [true, false] {
            // As in `aging_lifts_a_starving_low_request`, but every normal is held by the freed worker.
            let mut q = queue(1_000, 10, fairness);
            q.push(1, Low, 1, t0).unwrap();
            let mut served_low_at = None;
            for s in 1..100u32 {
                let now = t0 + secs(u64::from(s));
                q.push(10 * s, Normal, 2, now).unwrap();
                q.push(10 * s + 10_000, Normal, 2, now).unwrap();
                if q.pop_preferring(now, |_| true, held).map(|(_, v)| v) == Some(1) {
                    served_low_at = Some(s);
                    break;
                }
            }
            // With fairness, tenant 1's turn comes as soon as it competes as normal. Without, it is the
            // oldest normal from 10 s, and its 10 s of waiting outweigh a held one's 1 s saving.
            assert_eq!(served_low_at, Some(10), "fairness {fairness}");
        }
    }

    fn with_scoring(scoring: Scoring, fairness: bool) -> AdmissionQueue<u32> {
        AdmissionQueue::new(QueueConfig { max_size: 100, aging: secs(10), fairness, scoring, ..QueueConfig::default() })
    }

    fn meta(class: Priority, tenant: u64, deadline: Option<Instant>) -> Meta {
        Meta { class, tenant, deadline, retries: 0 }
    }

    #[test]
    fn earlier_deadlines_go_first_within_a_class_never_across() {
        let t0 = Instant::now();
        for fairness in [true, false] {
            let mut q = queue(10, 10, fairness);
            q.push_with(1, meta(Normal, 1, None), t0).unwrap();
            q.push_with(2, meta(Normal, 1, Some(t0 + secs(30))), t0).unwrap();
            q.push_with(3, meta(Normal, 1, Some(t0 + secs(5))), t0 + secs(1)).unwrap();
            q.push_with(4, meta(High, 1, Some(t0 + secs(50))), t0 + secs(1)).unwrap();
            let order = q.dispatch_order(t0 + secs(2));
            assert_eq!(drain(&mut q, t0 + secs(2)), vec![4, 3, 2, 1], "fairness {fairness}");
            assert_eq!(order.len(), 4);
        }
        // An aged-out item goes before an earlier deadline of its standing: deadlines cannot starve it.
        let mut q = queue(10, 10, false);
        q.push_with(1, meta(Urgent, 1, None), t0).unwrap();
        q.push_with(2, meta(Urgent, 1, Some(t0 + secs(31))), t0 + secs(29)).unwrap();
        assert_eq!(drain(&mut q, t0 + secs(30)), vec![1, 2]);
    }

    #[test]
    fn default_weights_give_the_class_with_aging_order() {
        let t0 = Instant::now();
        // Same pushes, same pops: the default scoring and one with only priority differ in nothing.
        let plain = Scoring { priority: 1.0, wait: 0.0, token_fit: 0.0, retries: 0.0 };
        for fairness in [true, false] {
            let (mut a, mut b) = (with_scoring(Scoring::default(), fairness), with_scoring(plain, fairness));
            for i in 0..40u32 {
                let at = t0 + Duration::from_millis(u64::from(i) * 900);
                let class = Priority::ALL[(i * 7 % 4) as usize];
                a.push(i, class, u64::from(i % 3), at).unwrap();
                b.push(i, class, u64::from(i % 3), at).unwrap();
            }
            let now = t0 + secs(45);
            assert_eq!(drain(&mut a, now), drain(&mut b, now), "fairness {fairness}");
        }
    }

    #[test]
    fn each_weight_changes_the_order_as_documented() {
        let t0 = Instant::now();
        // priority = 2: a normal request aged one step (10 s) no longer reaches a fresh high one.
        let mut q = with_scoring(Scoring { priority: 2.0, ..Scoring::default() }, false);
        q.push(1, Normal, 1, t0).unwrap();
        q.push(2, High, 1, t0 + secs(10)).unwrap();
        assert_eq!(drain(&mut q, t0 + secs(10)), vec![2, 1]);
        let mut q = with_scoring(Scoring::default(), false);
        q.push(1, Normal, 1, t0).unwrap();
        q.push(2, High, 1, t0 + secs(10)).unwrap();
        assert_eq!(drain(&mut q, t0 + secs(10)), vec![1, 2], "default: one step lifts normal to high");
        // wait = 0.5: four seconds of waiting outweigh one class (two points > one).
        let mut q = with_scoring(Scoring { wait: 0.5, ..Scoring::default() }, false);
        q.push(1, Low, 1, t0).unwrap();
        q.push(2, Normal, 1, t0 + secs(4)).unwrap();
        assert_eq!(drain(&mut q, t0 + secs(4)), vec![1, 2]);
        // token_fit = 2: the item that fits goes first across a class, until the other ages out.
        let mut q = with_scoring(Scoring { token_fit: 2.0, ..Scoring::default() }, false);
        q.push(1, High, 1, t0).unwrap(); // does not fit
        q.push(2, Normal, 1, t0).unwrap(); // fits
        let fits = |v: &u32| *v != 1;
        assert_eq!(q.peek_scored(t0 + secs(1), |_| true, fits), Some(Ticket(1)), "the one that fits");
        assert_eq!(q.peek_scored(t0 + secs(30), |_| true, fits), Some(Ticket(0)), "aged out: arrival decides");
        let q2 = {
            let mut q = with_scoring(Scoring::default(), false);
            q.push(1, High, 1, t0).unwrap();
            q.push(2, Normal, 1, t0).unwrap();
            q
        };
        assert_eq!(q2.peek_scored(t0 + secs(1), |_| true, fits), Some(Ticket(0)), "default: fit is one class, a tie");
        // retries = 1: a request back in the queue twice passes a fresh one a class above.
        let mut q = with_scoring(Scoring { retries: 1.0, ..Scoring::default() }, false);
        let back = q.push(1, Low, 1, t0).unwrap();
        q.note_retry(back);
        q.note_retry(back);
        q.push(2, Normal, 1, t0).unwrap();
        assert_eq!(drain(&mut q, t0), vec![1, 2]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize, u64),
        Pop,
        PopPreferring(u64),
        Remove(usize),
    }

    proptest! {
        /// Never more than `max_size` items; with aging out of reach, every pop returns an item of the
        /// best base class queued.
        #[test]
        fn bounded_and_class_ordered(
            max_size in 0usize..20,
            fairness in any::<bool>(),
            ops in proptest::collection::vec(prop_oneof![
                3 => (0usize..4, 0u64..4).prop_map(|(c, t)| Op::Push(c, t)),
                2 => Just(Op::Pop),
                2 => any::<u64>().prop_map(Op::PopPreferring),
                1 => (0usize..30).prop_map(Op::Remove),
            ], 1..200),
        ) {
            let t0 = Instant::now();
            let mut q: AdmissionQueue<usize> =
                AdmissionQueue::new(QueueConfig { max_size, aging: secs(1_000_000), fairness, ..QueueConfig::default() });
            let mut live: BTreeMap<Ticket, usize> = BTreeMap::new();
            let mut issued = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                match op {
                    Op::Push(c, tenant) => match q.push(c, Priority::ALL[c], tenant, now) {
                        Ok(t) => { live.insert(t, c); issued.push(t); }
                        Err(Full(back)) => { prop_assert_eq!(back, c); prop_assert_eq!(live.len(), max_size); }
                    },
                    Op::Pop => {
                        let best = live.values().min().copied();
                        let got = q.pop(now);
                        prop_assert_eq!(got.as_ref().map(|(_, c)| *c), best);
                        if let Some((t, _)) = got { live.remove(&t); }
                    }
                    Op::PopPreferring(salt) => {
                        let best = live.values().min().copied();
                        let got = q.pop_preferring(now, |_| true, |&c| Fit { here: Duration::from_millis((c as u64 ^ salt).wrapping_mul(salt) % 7), better: None });
                        prop_assert_eq!(got.as_ref().map(|(_, c)| *c), best);
                        if let Some((t, _)) = got { live.remove(&t); }
                    }
                    Op::Remove(k) => if let Some(&t) = issued.get(k) {
                        prop_assert_eq!(q.remove(t), live.remove(&t));
                    },
                }
                prop_assert!(q.len() <= max_size);
                prop_assert_eq!(q.len(), live.len());
                prop_assert!(q.tenant_count() <= q.len());
                prop_assert!(q.slots.len() <= max_size);
                let mut counts = [0; 4];
                for &c in live.values() { counts[c] += 1; }
                prop_assert_eq!(q.counts_by_class(), counts);
            }
        }

        /// Whatever the scores, a preferred pop serves an item of the same standing (effective class and
        /// tenant turn, aging included) as `pop` would, and nobody is next in line and passed over more
        /// than `DEFAULT_MAX_OVERTAKEN` times.
        #[test]
        fn preference_keeps_standing_and_bounds_bypasses(
            fairness in any::<bool>(),
            ops in proptest::collection::vec(prop_oneof![
                3 => (0usize..4, 0u64..4, 0u32..8).prop_map(|(c, t, s)| (Some((c, t)), s)),
                2 => (0u32..8).prop_map(|s| (None, s)),
            ], 1..200),
        ) {
            let t0 = Instant::now();
            let mut q: AdmissionQueue<u32> =
                AdmissionQueue::new(QueueConfig { max_size: 50, aging: Duration::from_millis(40), fairness, ..QueueConfig::default() });
            let mut passed: HashMap<u64, u32> = HashMap::new();
            for (i, (push, salt)) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                if let Some((c, tenant)) = push {
                    let _ = q.push(i as u32, Priority::ALL[c], tenant, now);
                    continue;
                }
                let scan = Scan::new(&q.cfg, now);
                let Some((standing, head)) = q.next_in_line(&scan, |_| true, |_| true) else { continue };
                let standing_of: HashMap<u64, Standing> =
                    q.entries.iter().map(|(&seq, e)| (seq, q.standing(&scan, e, true))).collect();
                let (t, _) =
                    q.pop_preferring(now, |_| true, |&v| Fit { here: Duration::from_millis(u64::from((v ^ salt) % 5) * 10), better: None }).unwrap();
                prop_assert_eq!(standing_of[&t.0], standing);
                if t.0 != head {
                    let n = passed.entry(head).or_default();
                    *n += 1;
                    prop_assert!(*n <= DEFAULT_MAX_OVERTAKEN);
                }
            }
        }
    }

    proptest! {
        /// Whatever the weights, the deadlines and who fits: once an item has waited `3 * aging` it is
        /// passed over only by items that arrived before it, or (with fairness) by other tenants taking
        /// their turn, at most once each per serve of its own tenant.
        #[test]
        fn aging_bounds_every_wait_whatever_the_weights(
            w in (0u32..8, 0u32..8, 0u32..8, 0u32..8),
            fairness in any::<bool>(),
            ops in proptest::collection::vec(prop_oneof![
                3 => (0usize..4, 0u64..4, proptest::option::of(0u64..200), 0u32..5)
                    .prop_map(|(c, t, d, r)| Some((c, t, d, r))),
                2 => Just(None),
            ], 1..300),
            fit_salt in any::<u32>(),
        ) {
            let scoring = Scoring {
                priority: f64::from(w.0) / 2.0,
                wait: f64::from(w.1) / 4.0,
                token_fit: f64::from(w.2),
                retries: f64::from(w.3) / 2.0,
            };
            let aging = Duration::from_millis(20);
            let mut q: AdmissionQueue<u32> =
                AdmissionQueue::new(QueueConfig { max_size: 50, aging, fairness, scoring, ..QueueConfig::default() });
            let t0 = Instant::now();
            // ticket -> (tenant, arrival)
            let mut live: BTreeMap<Ticket, (u64, Instant)> = BTreeMap::new();
            // ticket -> (items older than it when it aged out, pops since)
            let mut aged: HashMap<Ticket, (usize, usize)> = HashMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                match op {
                    Some((c, tenant, d, retries)) => {
                        let deadline = d.map(|d| now + Duration::from_millis(d));
                        let m = Meta { class: Priority::ALL[c], tenant, deadline, retries };
                        if let Ok(t) = q.push_with(i as u32, m, now) {
                            live.insert(t, (tenant, now));
                        }
                    }
                    None => {
                        for (&t, &(_, at)) in &live {
                            if now.duration_since(at) >= aging * 3 && !aged.contains_key(&t) {
                                aged.insert(t, (live.range(..t).count(), 0));
                            }
                        }
                        let fits = |v: &u32| !(v ^ fit_salt).is_multiple_of(3);
                        let Some(got) = q.peek_scored(now, |_| true, fits) else { continue };
                        q.serve_ticket(got).unwrap();
                        let (tenant, _) = live.remove(&got).unwrap();
                        aged.remove(&got);
                        for (x, (older, pops)) in aged.iter_mut() {
                            *pops += 1;
                            let (x_tenant, _) = live[x];
                            prop_assert!(got < *x || (fairness && tenant != x_tenant),
                                "{got:?} went before the aged-out {x:?}");
                            prop_assert!(*pops <= 4 * (*older + 1), "{x:?} passed over {pops} times");
                        }
                    }
                }
            }
        }
    }
}
