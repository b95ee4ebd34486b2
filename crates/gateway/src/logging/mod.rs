//! Where log lines go: stderr, through a small buffer.
//!
//! One request line per request written with its own `write` cost about as much CPU as formatting it
//! (BENCHMARKS.md, "Overhead"). Lines below `warn` are collected and written together when the buffer
//! holds [`BUFFER_BYTES`] or every `log.flush_ms` (a background thread), as nginx's `access_log
//! buffer= flush=` and Envoy's access log do; a `warn` or `error` line goes out at once, after the lines
//! before it, so problems are never late and the order is kept. [`LogFlush`] writes what is left when the
//! process ends, and a panic writes it before its message. `log.flush_ms = 0` writes every line at once.
//!
//! The request line, one per request, may skip tracing's event machinery: when lines are plain text
//! ([`fields::PlainFields`]), [`write_info`] lays it out as the formatter would and hands it to the same
//! buffer, at about a fifth of the instructions (BENCHMARKS.md, Overhead).

pub mod fields;
pub mod timestamp;

use crate::config::LogConfig;
use parking_lot::Mutex;
use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// Buffered lines are written once they reach this many bytes (a bound, too: the buffer never holds
/// much more than one line beyond it).
pub const BUFFER_BYTES: usize = 64 * 1024;

/// Installs the tracing subscriber: human-readable or JSON, filtered by `RUST_LOG` or `log.level`,
/// written to stderr through the buffer. Keep the answer until the process ends: dropping it writes
/// the lines still buffered.
pub fn init(cfg: &LogConfig) -> LogFlush {
    use tracing_subscriber::EnvFilter;
    let sink = Arc::new(Sink::new(std::io::stderr(), cfg.flush_ms > 0));
    if cfg.flush_ms > 0 {
        let (period, weak) = (Duration::from_millis(cfg.flush_ms), Arc::downgrade(&sink));
        let flusher = std::thread::Builder::new().name("log-flush".into()).spawn(move || loop {
            std::thread::sleep(period);
            match weak.upgrade() {
                Some(sink) => sink.flush(),
                None => return,
            }
        });
        if let Err(e) = flusher {
            eprintln!("llm-gateway: no log flush thread ({e}): writing each line at once");
            sink.buffered.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        let on_panic = Arc::downgrade(&sink);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(sink) = on_panic.upgrade() {
                // Not `flush`: a panic on a thread holding the buffer must not deadlock here.
                if let Some(mut buf) = sink.buf.try_lock_for(Duration::from_millis(100)) {
                    sink.write_out(&mut buf);
                }
            }
            previous(info);
        }));
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(timestamp::Timestamp)
        .with_writer(SinkWriters(Arc::clone(&sink)));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = builder.with_ansi(ansi);
    let _ = match (cfg.format == "json", ansi) {
        (true, _) => builder.json().try_init(),
        // Colours on a terminal; otherwise the same text, written for a fraction of the cost.
        (false, true) => builder.try_init(),
        (false, false) => {
            let installed = builder.fmt_fields(fields::PlainFields).try_init();
            if installed.is_ok() {
                let _ = PLAIN.set(Arc::clone(&sink));
            }
            installed
        }
    };
    LogFlush(sink)
}

/// The buffer of the process's plain-text subscriber, once installed: where [`write_info`] writes.
static PLAIN: OnceLock<Arc<Sink<std::io::Stderr>>> = OnceLock::new();

/// Writes an `info` line of `target` with `fields` straight to the log buffer, laid out as the
/// plain-text formatter lays out an event; `false` when lines are not plain text in this process
/// (JSON, colours on a terminal, no subscriber of ours), and the caller logs through tracing. The
/// caller has checked the filter (`tracing::enabled!`).
pub fn write_info(target: &str, fields: &fields::FieldText) -> bool {
    let Some(sink) = PLAIN.get() else { return false };
    thread_local!(static LINE: RefCell<String> = const { RefCell::new(String::new()) });
    LINE.with_borrow_mut(|line| {
        line.clear();
        info_line(line, target, fields);
        sink.push(line.as_bytes(), false);
    });
    true
}

/// `<time>  INFO <target>: <fields>` and a newline, as tracing-subscriber's full format writes an
/// `info` event without colours, thread names or spans (the gateway opens none).
fn info_line(line: &mut String, target: &str, fields: &fields::FieldText) {
    // Writing to a String cannot fail.
    let _ = timestamp::write_now(line);
    line.push_str("  INFO ");
    line.push_str(target);
    line.push_str(": ");
    line.push_str(fields.as_str());
    line.push('\n');
}

/// Writes the buffered log lines when dropped (at the end of `main`), and every line after that at
/// once (requests a shutdown past its grace period drops are logged later, as the runtime ends).
pub struct LogFlush(Arc<Sink<std::io::Stderr>>);

impl LogFlush {
    /// Writes the buffered lines now (before a message printed to stderr directly).
    pub fn flush(&self) {
        self.0.flush();
    }
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        self.0.buffered.store(false, std::sync::atomic::Ordering::Relaxed);
        self.0.flush();
    }
}

/// Lines waiting for one `write` to `out`.
struct Sink<W> {
    buf: Mutex<Vec<u8>>,
    out: W,
    /// Off when lines are written at once (`log.flush_ms = 0`, or no flush thread).
    buffered: std::sync::atomic::AtomicBool,
}

impl<W> Sink<W>
where
    for<'a> &'a W: Write,
{
    fn new(out: W, buffered: bool) -> Self {
        Self { buf: Mutex::new(Vec::new()), out, buffered: buffered.into() }
    }

    /// Adds one formatted line; writes the buffer when `urgent`, full, or not buffering.
    fn push(&self, line: &[u8], urgent: bool) {
        let mut buf = self.buf.lock();
        buf.extend_from_slice(line);
        if urgent || buf.len() >= BUFFER_BYTES || !self.buffered.load(std::sync::atomic::Ordering::Relaxed) {
            self.write_out(&mut buf);
        }
    }

    /// Writes what is buffered.
    fn flush(&self) {
        let mut buf = self.buf.lock();
        if !buf.is_empty() {
            self.write_out(&mut buf);
        }
    }

    /// Written under the lock, so lines keep their order; a failed write drops them, as an
    /// unbuffered logger would.
    fn write_out(&self, buf: &mut Vec<u8>) {
        let _ = (&self.out).write_all(buf);
        buf.clear();
        // A burst of long lines must not keep a large allocation for good.
        if buf.capacity() > 2 * BUFFER_BYTES {
            buf.shrink_to(BUFFER_BYTES);
        }
    }
}

/// The subscriber's writer factory: one [`LineWriter`] per event, urgent from `warn` up.
struct SinkWriters<W>(Arc<Sink<W>>);

impl<'a, W: 'a> MakeWriter<'a> for SinkWriters<W>
where
    for<'b> &'b W: Write,
{
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { sink: &self.0, urgent: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter { sink: &self.0, urgent: *meta.level() <= tracing::Level::WARN }
    }
}

/// Hands one event's bytes (the subscriber writes each event with one `write_all`) to the sink.
struct LineWriter<'a, W> {
    sink: &'a Sink<W>,
    urgent: bool,
}

impl<W> Write for LineWriter<'_, W>
where
    for<'a> &'a W: Write,
{
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.sink.push(data, self.urgent);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `f`'s events look like through the process's plain-text subscriber (timestamps included).
#[cfg(test)]
pub(crate) fn traced_plain(f: impl FnOnce()) -> String {
    let sink = Arc::new(Sink::new(tests::Writes::default(), false));
    let sub = tracing_subscriber::fmt()
        .with_timer(timestamp::Timestamp)
        .with_ansi(false)
        .fmt_fields(fields::PlainFields)
        .with_writer(SinkWriters(Arc::clone(&sink)))
        .finish();
    tracing::subscriber::with_default(sub, f);
    tests::writes(&sink).concat()
}

/// The line [`write_info`] would write.
#[cfg(test)]
pub(crate) fn direct_line(target: &str, fields: &fields::FieldText) -> String {
    let mut line = String::new();
    info_line(&mut line, target, fields);
    line
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A stand-in for stderr that records each `write` it is given.
    #[derive(Default)]
    pub(super) struct Writes(Mutex<Vec<Vec<u8>>>);

    impl Write for &Writes {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().push(data.to_vec());
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(super) fn writes(sink: &Sink<Writes>) -> Vec<String> {
        sink.out.0.lock().iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect()
    }

    #[test]
    fn info_lines_wait_for_a_flush_and_go_out_in_one_write() {
        let sink = Sink::new(Writes::default(), true);
        sink.push(b"a\n", false);
        sink.push(b"b\n", false);
        assert!(writes(&sink).is_empty(), "nothing written before the flush");
        sink.flush();
        sink.flush();
        assert_eq!(writes(&sink), vec!["a\nb\n"], "one write, and an empty buffer writes nothing");
    }

    #[test]
    fn a_warning_goes_out_at_once_after_the_lines_before_it() {
        let sink = Sink::new(Writes::default(), true);
        sink.push(b"info\n", false);
        sink.push(b"warn\n", true);
        assert_eq!(writes(&sink), vec!["info\nwarn\n"]);
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_the_flush() {
        let sink = Sink::new(Writes::default(), true);
        let line = vec![b'x'; 1000];
        for _ in 0..BUFFER_BYTES / 1000 {
            sink.push(&line, false);
        }
        assert!(writes(&sink).is_empty());
        sink.push(&line, false);
        assert_eq!(writes(&sink).len(), 1);
        assert_eq!(writes(&sink)[0].len(), (BUFFER_BYTES / 1000 + 1) * 1000);
        assert!(sink.buf.lock().is_empty());
    }

    #[test]
    fn through_a_subscriber_warn_and_error_lines_are_urgent_and_info_lines_wait() {
        let sink = Arc::new(Sink::new(Writes::default(), true));
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(SinkWriters(Arc::clone(&sink))).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("first");
            tracing::debug!("filtered out");
        });
        assert!(writes(&sink).is_empty(), "an info line waits");
        tracing::subscriber::with_default(
            tracing_subscriber::fmt().with_ansi(false).with_writer(SinkWriters(Arc::clone(&sink))).finish(),
            || tracing::warn!("second"),
        );
        let out = writes(&sink);
        assert_eq!(out.len(), 1, "{out:?}");
        let (first, second) = (out[0].find("first"), out[0].find("second"));
        assert!(first.is_some() && second.is_some() && first < second, "in order: {out:?}");
        tracing::subscriber::with_default(
            tracing_subscriber::fmt().with_ansi(false).with_writer(SinkWriters(Arc::clone(&sink))).finish(),
            || tracing::error!("third"),
        );
        assert_eq!(writes(&sink).len(), 2, "an error line at once");
    }

    #[test]
    fn unbuffered_writes_each_line_at_once() {
        let sink = Sink::new(Writes::default(), false);
        sink.push(b"a\n", false);
        sink.push(b"b\n", false);
        assert_eq!(writes(&sink), vec!["a\n", "b\n"]);
    }
}
