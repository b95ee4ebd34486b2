//! A worker's mark in the slot count replicas share ([`crate::cluster`] moves it; the admission queue
//! reads it). Here, in the fleet, so a worker can carry it without the fleet depending on the cluster.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// What this replica knows of a worker's shared count.
#[derive(Debug, Default)]
pub struct WorkerShare {
    /// Redis refused a slot here and none freed since: requests wait in the queue meanwhile.
    pub(crate) full: AtomicBool,
    /// Slots freed here anywhere, as heard (a refusal that raced one must not stick).
    pub(crate) freed: AtomicU64,
    /// This replica's releases here still on their way to Redis.
    pub(crate) releasing: AtomicU32,
    /// Told when one of them landed.
    pub(crate) released: tokio::sync::Notify,
}

impl WorkerShare {
    /// Whether Redis refused a slot here and no slot freed since.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// A slot freed here (heard, or assumed by the re-check): the mark goes.
    pub(crate) fn freed(&self) {
        self.freed.fetch_add(1, Ordering::AcqRel);
        self.full.store(false, Ordering::Release);
    }
}
