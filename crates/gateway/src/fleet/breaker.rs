//! A worker's circuit breaker behind its lock, with "closed" mirrored in an atomic so that judging a
//! healthy fleet's eligibility, twice per request and once per worker, takes no lock.
//!
//! Every change goes through [`BreakerCell::lock`], whose guard stores the mirror when it is dropped, so
//! the mirror is never older than the last critical section. A stale "closed" would only let a request
//! through to [`crate::fleet::slot`]'s permit, which asks the breaker itself under the lock.

use guard::CircuitBreaker;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicBool, Ordering};

/// The breaker and its closed mirror.
#[derive(Debug)]
pub struct BreakerCell {
    breaker: Mutex<CircuitBreaker>,
    closed: AtomicBool,
}

impl Default for BreakerCell {
    fn default() -> Self {
        let breaker = CircuitBreaker::default();
        let closed = AtomicBool::new(breaker.is_closed());
        Self { breaker: Mutex::new(breaker), closed }
    }
}

impl BreakerCell {
    /// The breaker, locked; the mirror follows its state when the guard drops.
    pub fn lock(&self) -> BreakerGuard<'_> {
        BreakerGuard { breaker: self.breaker.lock(), closed: &self.closed }
    }

    /// Whether a request would be admitted at `now`: without a lock while the breaker is closed.
    pub fn would_admit(&self, now: tokio::time::Instant) -> bool {
        self.closed.load(Ordering::Acquire) || self.breaker.lock().would_admit(now.into_std())
    }
}

/// The locked breaker; dropping it updates the closed mirror.
pub struct BreakerGuard<'a> {
    breaker: MutexGuard<'a, CircuitBreaker>,
    closed: &'a AtomicBool,
}

impl std::ops::Deref for BreakerGuard<'_> {
    type Target = CircuitBreaker;

    fn deref(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl std::ops::DerefMut for BreakerGuard<'_> {
    fn deref_mut(&mut self) -> &mut CircuitBreaker {
        &mut self.breaker
    }
}

impl Drop for BreakerGuard<'_> {
    fn drop(&mut self) {
        self.closed.store(self.breaker.is_closed(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn the_mirror_follows_every_change() {
        let cell = BreakerCell::default();
        let now = Instant::now();
        assert!(cell.would_admit(now), "a new breaker is closed");
        cell.lock().trip(now.into_std());
        assert!(!cell.closed.load(Ordering::Acquire));
        assert!(!cell.would_admit(now), "open: the breaker itself is asked");
        let later = now + cell.lock().config().timeout + Duration::from_millis(1);
        assert!(cell.would_admit(later), "half-open after the timeout admits a trial");
        cell.lock().reset(later.into_std());
        assert!(cell.closed.load(Ordering::Acquire), "closed again");
    }
}
