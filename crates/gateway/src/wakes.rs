//! A waker for futures one task polls together, so that a wake makes the task do only what it was for:
//! wakes a poll gives itself are kept inside that poll, and parts nothing woke since they were last
//! pending are not polled at all.
//!
//! A request drives its worker connection from its own task ([`crate::upstream::connections`]): the connection's
//! future and the answer or body it feeds talk through hyper's channels, and each hand-over between them
//! wakes the other side. Both sides are polled by the same task, so each of those wakes made tokio poll
//! the task again once the poll returned: the client connection's whole dispatcher, for nothing (the
//! poll had already taken what the wake announced). On a stream that was once per relayed event,
//! about as many instructions as the relay itself.
//!
//! [`SelfWakes::poll`] gives the polled parts a waker of its own. A wake that comes while the poll runs
//! is noted and the parts are polled once more in place; one that comes between polls (the worker's
//! socket turned readable) wakes the task as the task's own waker would. And parts that were pending
//! and have not been woken since are pending still: the task, polled for another reason (the relay
//! asking for the next chunk right after a batch, the client's socket), does not poll them again.
//!
//! A served connection's watchers (shutdown, its watchdog's wake and timer) are polled through one
//! too ([`crate::server::connections`]): `tokio::select!` polled them on every wake of the connection's
//! task, that is on every relayed chunk, each taking a lock or reading a clock.

use futures_util::task::AtomicWaker;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// No poll is running, the parts were pending at the last and nothing woke them since.
const QUIET: u8 = 0;
/// No poll is running and the parts must be polled (they were ready last, or woke since).
const STIRRED: u8 = 1;
/// A poll is running and nothing woke it yet.
const POLLING: u8 = 2;
/// A poll is running and something woke it: it goes round again.
const WOKEN: u8 = 3;

/// Rounds one [`SelfWakes::poll`] makes before handing a wake to the task: parts that wake themselves
/// every time (tokio's cooperative budget, once spent, does) must let the task yield.
const MAX_ROUNDS: usize = 4;

/// A waker for the parts one task polls together; see the module docs.
#[derive(Debug)]
pub struct SelfWakes {
    shared: Arc<Shared>,
    waker: Waker,
}

#[derive(Debug)]
struct Shared {
    state: AtomicU8,
    /// The task that polled last.
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // While polling, note it (once); between polls, the task must run and poll the parts.
        let noted = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| match state {
            POLLING => Some(WOKEN),
            QUIET => Some(STIRRED),
            _ => None,
        });
        if matches!(noted, Ok(QUIET) | Err(STIRRED)) {
            self.task.wake();
        }
    }
}

impl Default for SelfWakes {
    fn default() -> Self {
        let shared = Arc::new(Shared { state: AtomicU8::new(STIRRED), task: AtomicWaker::new() });
        let waker = Waker::from(Arc::clone(&shared));
        Self { shared, waker }
    }
}

impl SelfWakes {
    /// Polls `parts` with this waker, again while they woke themselves during the poll and are still
    /// pending (at most [`MAX_ROUNDS`] times; then the task is woken to poll again later); pending
    /// without polling them when they were pending and nothing woke them since.
    ///
    /// `parts` are futures that change only when they wake (hyper's connection and channels are), the
    /// same from one call to the next until they are ready. A wake during a poll that ends ready is not
    /// passed on: the next call polls them.
    pub fn poll<T>(&self, cx: &mut Context<'_>, mut parts: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        self.shared.task.register(cx.waker());
        if self.shared.state.load(Ordering::Acquire) == QUIET {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&self.waker);
        for _ in 0..MAX_ROUNDS {
            self.shared.state.store(POLLING, Ordering::Release);
            let polled = parts(&mut own);
            let after = if polled.is_ready() { STIRRED } else { QUIET };
            let was = self.shared.state.swap(after, Ordering::AcqRel);
            if polled.is_ready() || was != WOKEN {
                return polled;
            }
        }
        self.arm();
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Runs `f`, which hands the parts something (a request to send), without waking the task for it:
    /// the caller polls the parts next, and [`SelfWakes::poll`] will.
    pub fn stir<R>(&self, f: impl FnOnce() -> R) -> R {
        self.shared.state.store(POLLING, Ordering::Release);
        let out = f();
        self.arm();
        out
    }

    /// Makes the next [`SelfWakes::poll`] poll the parts: they changed without a wake (a future new
    /// among them, a timer moved).
    pub fn arm(&self) {
        self.shared.state.store(STIRRED, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A task waker counting its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (Arc::clone(&count), Waker::from(count))
    }

    /// Polls through `wakes` for `task` a part that stays pending and keeps the waker it was given, as
    /// a socket does to wake when it turns readable; returns that waker.
    fn pending_part(wakes: &SelfWakes, task: &Waker) -> Waker {
        let mut kept = None;
        let polled: Poll<()> = wakes.poll(&mut Context::from_waker(task), |cx| {
            kept = Some(cx.waker().clone());
            Poll::Pending
        });
        assert_eq!(polled, Poll::Pending);
        kept.expect("the part was polled")
    }

    #[test]
    fn a_wake_during_the_poll_polls_again_without_waking_the_task() {
        let (count, waker) = task();
        let wakes = SelfWakes::default();
        let mut rounds = 0;
        let polled = wakes.poll(&mut Context::from_waker(&waker), |cx| {
            rounds += 1;
            if rounds == 1 {
                // A channel hand-over: the other side is woken, and it is this poll's own part.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(rounds)
        });
        assert_eq!(polled, Poll::Ready(2));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_wake_between_polls_wakes_the_task() {
        let (count, waker) = task();
        let wakes = SelfWakes::default();
        let kept = pending_part(&wakes, &waker);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        std::thread::spawn(move || kept.wake()).join().expect("joins");
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn parts_pending_and_not_woken_since_are_not_polled_again() {
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let wakes = SelfWakes::default();
        let (mut polls, mut kept) = (0, None);
        for _ in 0..3 {
            let _: Poll<()> = wakes.poll(&mut cx, |cx| {
                polls += 1;
                kept = Some(cx.waker().clone());
                Poll::Pending
            });
        }
        assert_eq!(polls, 1, "the task polled for something else: the parts are still pending");
        kept.take().expect("a part kept the waker").wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let polled = wakes.poll(&mut cx, |_| {
            polls += 1;
            Poll::Ready(())
        });
        assert_eq!((polled, polls), (Poll::Ready(()), 2), "woken, they are polled");
        let _: Poll<()> = wakes.poll(&mut cx, |_| {
            polls += 1;
            Poll::Pending
        });
        assert_eq!(polls, 3, "and after being ready, polled again");
        let _: Poll<()> = wakes.poll(&mut cx, |_| {
            polls += 1;
            Poll::Pending
        });
        assert_eq!(polls, 3, "pending, not woken since");
        wakes.arm();
        let _: Poll<()> = wakes.poll(&mut cx, |_| {
            polls += 1;
            Poll::Pending
        });
        assert_eq!(polls, 4, "armed (a part changed without a wake): polled");
    }

    #[test]
    fn what_stir_hands_over_is_polled_next_without_waking_the_task() {
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let wakes = SelfWakes::default();
        let kept = pending_part(&wakes, &waker);
        // Sending a request wakes the connection, which is this task's own part.
        wakes.stir(|| kept.wake_by_ref());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        let mut polled = false;
        let _: Poll<()> = wakes.poll(&mut cx, |_| {
            polled = true;
            Poll::Pending
        });
        assert!(polled);
    }

    #[test]
    fn a_wake_during_a_poll_that_ends_ready_is_not_passed_on() {
        let (count, waker) = task();
        let wakes = SelfWakes::default();
        let polled = wakes.poll(&mut Context::from_waker(&waker), |cx| {
            cx.waker().wake_by_ref();
            Poll::Ready(())
        });
        assert_eq!(polled, Poll::Ready(()));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn parts_that_always_wake_themselves_let_the_task_yield() {
        let (count, waker) = task();
        let wakes = SelfWakes::default();
        let mut rounds = 0;
        let polled: Poll<()> = wakes.poll(&mut Context::from_waker(&waker), |cx| {
            rounds += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert_eq!(polled, Poll::Pending);
        assert_eq!(rounds, MAX_ROUNDS);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task polls again later");
    }

    #[test]
    fn the_last_task_to_poll_is_the_one_woken() {
        let (first, first_waker) = task();
        let (second, second_waker) = task();
        let wakes = SelfWakes::default();
        let kept = pending_part(&wakes, &first_waker);
        let _: Poll<()> = wakes.poll(&mut Context::from_waker(&second_waker), |_| Poll::Pending);
        kept.wake();
        assert_eq!((first.0.load(Ordering::SeqCst), second.0.load(Ordering::SeqCst)), (0, 1));
    }
}
