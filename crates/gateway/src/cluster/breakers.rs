//! Breaker openings shared by the replicas: a worker one replica finds failing is left alone by all.
//!
//! When a breaker of this replica opens (a failure streak, the error rate, a stall, a failed trial),
//! [`Cluster::breaker_opened`] queues the opening (bounded, never blocks) and a background task sets
//! `llmgw:breaker:<url>` to the opening's id for its open time and publishes it
//! ([`super::redis::OPENED_CHANNEL`]). Every other replica that hears it opens its own breaker for the
//! time left ([`crate::fleet::worker::Worker::open_breaker_as_told`]): no failure of its own is
//! counted, and what it heard is never published again, so an opening travels once and cannot echo.
//! The re-check every second reads the keys too, so a replica that starts, or lost its subscription,
//! while an opening lasts learns it then. Half-open trials and closing stay local: each replica probes
//! the worker itself once its own breaker's time is up.
//!
//! An operator's reset (`POST /api/circuit-breaker/{id}/reset` on any replica) is the one closing that
//! travels: [`Cluster::breaker_reset`] deletes the opening's key and publishes the reset
//! ([`super::redis::RESET_CHANNEL`]), and every other replica closes its breaker on hearing it, so a
//! worker the operator brought back is not kept out by the replicas that did not see the reset.
//!
//! Each opening is applied once per replica: the id last applied per worker is remembered (one entry
//! per worker of the fleet). With Redis down nothing is shared and every breaker is local as before.

use super::{redis, Cluster, RECHECK};
use crate::fleet::worker::Worker;
use crate::fleet::Fleet;
use guard::{StateName, Transition};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Openings waiting to be told at most (a worker opens at most once per breaker timeout).
pub(super) const OPENING_QUEUE: usize = 256;

/// One opening of this replica's breaker, to tell the others.
pub(super) struct Opening {
    url: String,
    id: String,
    open: Duration,
}

impl Cluster {
    /// Tells the other replicas, when `t` opened `worker`'s breaker, to open theirs (`backend = "redis"`
    /// and Redis up; else nothing). Never blocks: a full queue drops the news.
    pub fn breaker_opened(&self, worker: &Worker, t: Option<Transition>) {
        if !t.is_some_and(|t| t.to == StateName::Open) || self.redis.is_none() || !self.shares_slots() {
            return;
        }
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let open = worker.breaker.lock().config().timeout;
        let opening = Opening { url: worker.base_url.clone(), id: format!("{}:b{n}", self.replica), open };
        if self.openings.try_send(opening).is_err() {
            tracing::debug!(worker = %worker.name, "cluster: opening queue full; the others judge the worker alone");
        }
    }

    /// Applies an opening heard from another replica (`id`, with `open` left) to `worker`, once.
    pub(super) fn hear_opening(&self, worker: &Worker, id: &str, open: Duration) {
        if id.starts_with(self.replica.as_str()) {
            return;
        }
        {
            let mut heard = self.heard_openings.lock();
            if heard.get(worker.base_url.as_str()).is_some_and(|last| last == id) {
                return;
            }
            heard.insert(worker.base_url.clone(), id.to_string());
        }
        let t = worker.open_breaker_as_told(tokio::time::Instant::now(), open);
        self.metrics.count_transition(&worker.name, t);
    }

    /// Tells the other replicas that an operator reset `worker`'s breaker here (`backend = "redis"` and
    /// Redis up; else nothing): its opening ends and they close theirs. Whether they were told.
    pub async fn breaker_reset(&self, worker: &Worker) -> bool {
        let Some(redis) = self.redis.as_ref().filter(|_| self.shares_slots()) else { return false };
        let told = tokio::time::timeout(RECHECK, redis.reset(&worker.base_url, &self.replica)).await;
        let told = matches!(told, Ok(Ok(())));
        if !told {
            tracing::warn!(worker = %worker.name, "cluster: the breaker reset was not told; other replicas keep theirs until it times out");
        }
        told
    }

    /// A message of [`redis::RESET_CHANNEL`]: `<replica> <url>`; another replica's operator reset the
    /// worker's breaker, so this replica closes its own.
    pub(super) fn hear_reset_message(&self, payload: &str, fleet: &Fleet) {
        let Some((replica, url)) = payload.split_once(' ') else { return };
        if replica == self.replica.as_str() {
            return;
        }
        if let Some(w) = fleet.workers.iter().find(|w| w.base_url == url) {
            let t = w.reset_breaker(tokio::time::Instant::now());
            if t.is_some() {
                tracing::info!(worker = %w.name, "circuit breaker reset by an admin of another replica");
            }
            self.metrics.count_transition(&w.name, t);
        }
    }

    /// A message of [`redis::OPENED_CHANNEL`]: `<id> <open ms> <url>`.
    pub(super) fn hear_opening_message(&self, payload: &str, fleet: &Fleet) {
        let mut parts = payload.splitn(3, ' ');
        let (Some(id), Some(ms), Some(url)) = (parts.next(), parts.next(), parts.next()) else { return };
        let Ok(ms) = ms.parse::<u64>() else { return };
        if let Some(w) = fleet.workers.iter().find(|w| w.base_url == url) {
            self.hear_opening(w, id, Duration::from_millis(ms));
        }
    }

    /// The re-check's part: openings still in force in Redis that this replica has not applied (it
    /// started, or its subscription broke, after they were told). Forgets workers that left the fleet.
    pub(super) async fn recheck_openings(&self, redis: &redis::RedisSlots, fleet: &Fleet) {
        self.heard_openings.lock().retain(|url, _| fleet.workers.iter().any(|w| &w.base_url == url));
        let urls: Vec<&str> = fleet.workers.iter().map(|w| w.base_url.as_str()).collect();
        let Ok(Ok(openings)) = tokio::time::timeout(RECHECK, redis.openings(&urls)).await else { return };
        for (w, opening) in fleet.workers.iter().zip(openings) {
            if let Some((id, left)) = opening {
                self.hear_opening(w, &id, left);
            }
        }
    }
}

/// Tells the other replicas of this one's openings, as they come.
pub(super) async fn opening_loop(redis: redis::RedisSlots, mut rx: mpsc::Receiver<Opening>, stop: CancellationToken) {
    loop {
        let opening = tokio::select! {
            _ = stop.cancelled() => return,
            o = rx.recv() => match o { Some(o) => o, None => return },
        };
        let told = tokio::time::timeout(RECHECK, redis.opened(&opening.url, &opening.id, opening.open)).await;
        if !matches!(told, Ok(Ok(()))) {
            tracing::debug!("cluster: a breaker opening was not told; the others judge the worker alone");
        }
    }
}
