//! The atomic word of a worker's load slots: in flight in the low 32 bits, reserved in the high 32.
//! Anyone reads it; only the guards of [`crate::fleet::slot`] (its parent) move it. It knows nothing of
//! workers, so a worker can own one without depending on the guards that hold the worker.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One in-flight slot in the word.
pub(super) const IN_FLIGHT: u64 = 1;
/// One reserved slot in the word.
pub(super) const RESERVED: u64 = 1 << 32;

/// In-flight and reserved counts of one worker in one atomic word. Read by anyone; changed only by the
/// guards of [`crate::fleet::slot`]. Beside it, the highest in-flight count since [`Slots::start_peak`]: what the
/// worker may report as ours in a scrape taken meanwhile (see `guard::share`).
#[derive(Debug, Default)]
pub struct Slots(AtomicU64, AtomicU32);

/// In flight plus reserved in `word` (64-bit: the sum cannot overflow).
pub(super) fn taken(word: u64) -> u64 {
    (word & 0xffff_ffff) + (word >> 32)
}

impl Slots {
    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        (self.0.load(Ordering::Acquire) & 0xffff_ffff) as u32
    }

    /// Slots reserved for dequeued requests that have not been sent yet.
    pub fn reserved(&self) -> u32 {
        (self.0.load(Ordering::Acquire) >> 32) as u32
    }

    /// In flight plus reserved: the slots taken.
    pub fn taken(&self) -> u32 {
        u32::try_from(taken(self.0.load(Ordering::Acquire))).unwrap_or(u32::MAX)
    }

    /// Whether one more request fits below `cap` (reserved slots count as taken). The one capacity test.
    pub fn has_room(&self, cap: u32) -> bool {
        taken(self.0.load(Ordering::Acquire)) < u64::from(cap)
    }

    /// Starts watching the in-flight peak: from now on [`Slots::peak`] is at least every in-flight
    /// count the word holds. A scrape calls it before asking the worker.
    pub fn start_peak(&self) {
        self.1.store(0, Ordering::Release);
        self.1.fetch_max(self.in_flight(), Ordering::AcqRel);
    }

    /// The most requests in flight at once since [`Slots::start_peak`].
    pub fn peak(&self) -> u32 {
        self.1.load(Ordering::Acquire)
    }

    /// Adds `unit` (one in-flight or one reserved slot) if the word has room below `cap`; the new word.
    /// Below `cap <= u32::MAX` neither half can overflow into the other.
    pub(super) fn take(&self, unit: u64, cap: u32) -> Option<u64> {
        let word = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (taken(w) < u64::from(cap)).then_some(w + unit))
            .ok()
            .map(|before| before + unit)?;
        if unit == IN_FLIGHT {
            self.note_peak(word);
        }
        Some(word)
    }

    /// Moves one slot from reserved to in flight (the caller holds a reservation, so reserved >= 1 and
    /// in flight < u32::MAX); the new word. The total never changes, so no one can slip in between.
    pub(super) fn reserved_to_in_flight(&self) -> u64 {
        let word = self.0.fetch_sub(RESERVED - IN_FLIGHT, Ordering::AcqRel) - (RESERVED - IN_FLIGHT);
        self.note_peak(word);
        word
    }

    /// Raises the in-flight peak to the in-flight half of `word`.
    fn note_peak(&self, word: u64) {
        self.1.fetch_max((word & 0xffff_ffff) as u32, Ordering::AcqRel);
    }

    /// Gives back one slot of `unit` (the caller's guard holds it).
    pub(super) fn release(&self, unit: u64) {
        self.0.fetch_sub(unit, Ordering::AcqRel);
    }
}
