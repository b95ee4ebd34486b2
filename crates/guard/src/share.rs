//! Capacity shared with load this gateway does not send: other replicas in front of the same workers,
//! or clients that reach a worker directly.
//!
//! Without a shared count (no Redis), a gateway still sees the whole load of a worker in its metrics:
//! `running + waiting` at the last scrape. What it sent itself is its own in-flight count; the rest is
//! *foreign*. Taking only `capacity - foreign` slots, independent replicas overshoot a worker by at most
//! what they all send between two scrapes, instead of N times its capacity.
//!
//! The own count to subtract is the highest in-flight count seen while the scrape was on its way (see
//! the gateway's `Slots::peak`): every request the engine reports as ours was in flight at the instant
//! it was counted, so that peak is at least our share of the report. A single gateway therefore sees no
//! foreign load (it is never discounted by its own traffic), whatever moved during the scrape.

/// Load a worker reports that is not this gateway's: `running + waiting - own_peak`, never below 0.
/// `own_peak` is the most requests this gateway had in flight on it while the report was taken.
pub fn foreign_load(running: u32, waiting: u32, own_peak: u32) -> u32 {
    running.saturating_add(waiting).saturating_sub(own_peak)
}

/// The slots this gateway may fill on a worker of `capacity` carrying `foreign` load of others:
/// `capacity - foreign`, never below 0; unlimited (`u32::MAX`) stays unlimited.
pub fn room_for_us(capacity: u32, foreign: u32) -> u32 {
    if capacity == u32::MAX {
        return capacity;
    }
    capacity.saturating_sub(foreign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_gateway_sees_no_foreign_load() {
        // The engine reports our own requests, some of which finished during the scrape.
        assert_eq!(foreign_load(3, 1, 4), 0);
        assert_eq!(foreign_load(2, 0, 4), 0, "requests finished while the scrape was on its way");
        assert_eq!(foreign_load(0, 0, 0), 0);
        assert_eq!(room_for_us(4, foreign_load(4, 0, 4)), 4, "full with our own load: all ours");
    }

    #[test]
    fn another_replicas_load_is_discounted() {
        // Capacity 4, another replica runs 3, we run 1 and 2 more wait inside the engine (2 of ours).
        let foreign = foreign_load(4, 2, 3);
        assert_eq!(foreign, 3);
        assert_eq!(room_for_us(4, foreign), 1);
        assert_eq!(room_for_us(4, foreign_load(8, 4, 0)), 0, "never below zero");
    }

    #[test]
    fn unlimited_stays_unlimited_and_nothing_overflows() {
        assert_eq!(room_for_us(u32::MAX, 10), u32::MAX);
        assert_eq!(foreign_load(u32::MAX, u32::MAX, 0), u32::MAX);
        assert_eq!(room_for_us(0, 0), 0);
    }

    /// Two replicas that both scrape a worker carrying both their loads never plan more than capacity
    /// plus what each takes after its scrape: here, each sees the other's load and takes only the rest.
    #[test]
    fn two_replicas_split_a_worker_between_them() {
        let cap = 8;
        for (a, b) in [(0u32, 0u32), (3, 5), (8, 0), (2, 2), (6, 6)] {
            let room_a = room_for_us(cap, foreign_load(a + b, 0, a));
            let room_b = room_for_us(cap, foreign_load(a + b, 0, b));
            assert_eq!(room_a, cap.saturating_sub(b), "a={a} b={b}");
            assert_eq!(room_b, cap.saturating_sub(a), "a={a} b={b}");
            // Filled to their room from a settled state, together they hold at most the capacity
            // when they started within it.
            if a + b <= cap {
                assert!(room_a.max(a) + b <= cap && room_b.max(b) + a <= cap);
            }
        }
    }
}
