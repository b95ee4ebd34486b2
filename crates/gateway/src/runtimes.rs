//! The serving runtimes: one single-threaded tokio runtime per core, each serving the client
//! connections handed to it from accept to close (nginx's shape: a worker process per core).
//!
//! On one work-stealing runtime a request's wakes, its sockets' readiness and its timers move
//! between the cores: a woken task may run on the other thread, and every hand-over is an atomic
//! on a line the other core holds and often a futex to wake it. Here a connection, the worker
//! connections its requests borrow ([`crate::upstream::connections`] keeps one idle list per runtime,
//! [`shard`]) and its timers stay on one thread. The gateway's shared state (fleet, admission,
//! metrics) is still shared; what is per core is the IO and the scheduling. An HTTP/2 connection's
//! streams are the exception: each stream's task goes to the runtimes in turn ([`Streams`]), so one
//! multiplexed connection does not confine its client to one core.
//!
//! Background work (probes, scrapes, reloads, the batch runner) stays on the process's main runtime.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's serving runtime, counted from 1; 0 on any other thread.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Which per-runtime share of a resource this thread uses: its serving runtime's number (from 1), or
/// 0 on a thread of no serving runtime (the main runtime's, a test's). Always below [`shards`].
pub fn shard() -> usize {
    SHARD.with(Cell::get) % shards()
}

/// How many shares a per-runtime resource keeps: one per possible serving runtime and one for the
/// other threads.
pub fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| default_count() + 1)
}

/// Serving runtimes by default: one per core the process may use.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Serving runtimes, each on its own thread until [`Runtimes`] is dropped.
pub struct Runtimes {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Runtimes {
    /// Starts `count` runtimes (`server.threads`): 0 is one per core, and more than the cores is the
    /// cores (a thread more only takes turns with the others, and [`shards`] has room for no more).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let count = if count == 0 { default_count() } else { count.min(default_count()) };
        // Built first, so a thread that cannot start ends the ones started before it (`Drop`).
        let mut this =
            Self { handles: Vec::with_capacity(count), next: AtomicUsize::new(0), stop: CancellationToken::new() };
        for i in 0..count {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let stop = this.stop.clone();
            std::thread::Builder::new().name(format!("llm-gateway-serve-{i}")).spawn(move || {
                SHARD.with(|s| s.set(i + 1));
                rt.block_on(stop.cancelled());
            })?;
            this.handles.push(handle);
        }
        Ok(this)
    }

    /// The runtime the next connection goes to: each in turn.
    pub fn pick(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

/// hyper's executor for the tasks of a connection's HTTP/2 streams: each on the next serving runtime
/// in turn, so the streams of one connection (a client multiplexing everything over one) use every core
/// as they did on one work-stealing runtime; without runtimes (tests, or once they are ending), on the
/// current one. It holds them weakly: the tasks it serves must not keep their own runtimes alive.
#[derive(Clone, Default)]
pub struct Streams(Weak<Runtimes>);

impl Streams {
    /// Spreads stream tasks over `runtimes`.
    pub fn over(runtimes: &Arc<Runtimes>) -> Self {
        Self(Arc::downgrade(runtimes))
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        match self.0.upgrade() {
            Some(runtimes) => drop(runtimes.pick().spawn(fut)),
            None => drop(tokio::spawn(fut)),
        }
    }
}

impl Drop for Runtimes {
    /// Ends the runtimes: tasks still on them are dropped (the server waits for its connections first).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Long enough for a task on another thread to run on a loaded test machine; only a failure waits it.
    const RAN: Duration = Duration::from_secs(10);

    #[test]
    fn connections_go_to_each_runtime_in_turn_which_knows_its_shard() {
        let runtimes = Runtimes::start(0).expect("started");
        let n = default_count();
        let (tx, rx) = mpsc::channel();
        for _ in 0..2 * n {
            let tx = tx.clone();
            runtimes.pick().spawn(async move { tx.send(shard()).expect("sent") });
        }
        let mut seen: Vec<usize> = (0..2 * n).map(|_| rx.recv_timeout(RAN).expect("ran")).collect();
        seen.sort_unstable();
        let want: Vec<usize> = (1..=n).flat_map(|s| [s, s]).collect();
        assert_eq!(seen, want, "one runtime per core, each taking its turn");
        assert_eq!(shard(), 0, "a thread of no serving runtime has the other share");
        assert_eq!(shards(), n + 1);
    }

    #[test]
    fn more_threads_than_cores_are_the_cores() {
        let runtimes = Runtimes::start(default_count() + 3).expect("started");
        assert_eq!(runtimes.handles.len(), default_count());
        let one = Runtimes::start(1).expect("started");
        assert_eq!(one.handles.len(), 1);
    }

    #[test]
    fn dropped_runtimes_drop_what_they_still_ran() {
        struct Held(mpsc::Sender<&'static str>);
        impl Drop for Held {
            fn drop(&mut self) {
                let _ = self.0.send("dropped");
            }
        }
        let runtimes = Runtimes::start(1).expect("started");
        let (tx, rx) = mpsc::channel();
        runtimes.pick().spawn(async move {
            let held = Held(tx);
            held.0.send("started").expect("sent");
            std::future::pending::<()>().await;
        });
        assert_eq!(rx.recv_timeout(RAN), Ok("started"));
        assert!(rx.try_recv().is_err(), "held while the runtimes run");
        drop(runtimes);
        assert_eq!(rx.recv_timeout(RAN), Ok("dropped"), "the runtime ended, and its task with it");
    }
}
