//! The shared byte budget of request bodies held in memory (`server.max_buffered_bytes`).
//!
//! Each request body takes bytes from one process-wide budget while it is read (its `Content-Length` up
//! front, else chunk by chunk) and gives them back when its [`Held`] guard drops: once the body was
//! forwarded and answered, or on any error. Many large bodies at once are refused with 503 `server_busy`
//! instead of growing memory without bound. The limit is passed at each take, so a reload applies at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of request bodies held now, over all requests.
#[derive(Debug, Default)]
pub struct ByteBudget {
    used: AtomicUsize,
}

/// Bytes taken from a [`ByteBudget`], given back on drop.
#[derive(Debug)]
pub struct Held {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    /// An empty budget.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if the total stays within `limit`; `None` leaves the budget unchanged.
    pub fn take(self: &Arc<Self>, bytes: usize, limit: usize) -> Option<Held> {
        self.add(bytes, limit).then(|| Held { budget: Arc::clone(self), bytes })
    }

    fn add(&self, bytes: usize, limit: usize) -> bool {
        bytes == 0
            || self
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|t| *t <= limit))
                .is_ok()
    }
}

impl Held {
    /// Bytes held by this guard.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `total` bytes in all (no-op when it holds that many already); `false`, holding what it
    /// held, when the budget's total would exceed `limit`.
    pub fn grow_to(&mut self, total: usize, limit: usize) -> bool {
        if total <= self.bytes {
            return true;
        }
        let ok = self.budget.add(total - self.bytes, limit);
        if ok {
            self.bytes = total;
        }
        ok
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_within_the_limit_and_gives_back_on_drop() {
        let b = ByteBudget::new();
        let a = b.take(60, 100).expect("fits");
        assert!(b.take(50, 100).is_none(), "60 + 50 > 100");
        assert_eq!(b.used(), 60, "a refused take leaves nothing behind");
        let mut c = b.take(0, 100).expect("an empty body always fits");
        assert!(c.grow_to(40, 100));
        assert!(!c.grow_to(41, 100), "one byte over");
        assert_eq!((b.used(), c.bytes()), (100, 40));
        drop(a);
        assert!(c.grow_to(41, 100));
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn concurrent_takes_never_overshoot() {
        let b = ByteBudget::new();
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> =
                (0..8).map(|_| s.spawn(|| (0..100).filter_map(|_| b.take(7, 1000)).collect::<Vec<_>>())).collect();
            hs.into_iter().flat_map(|h| h.join().expect("no panic")).collect()
        });
        assert_eq!(held.len(), 1000 / 7);
        assert!(b.used() <= 1000);
        drop(held);
        assert_eq!(b.used(), 0);
    }
}
