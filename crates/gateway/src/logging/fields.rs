//! The fields of a human-readable log line, written directly.
//!
//! tracing-subscriber's default field formatter writes every field through `core::fmt` with styling
//! wrappers (italic names, a dimmed `=`), even when colours are off: about 1,000 instructions a field,
//! 15k for the request line, more than the rest of the gateway's own work on a request (callgrind,
//! BENCHMARKS.md "Instructions per request"). [`PlainFields`] writes the same text (`name=value`,
//! strings quoted as `Debug` quotes them, the message bare) with plain writes: integers through
//! `itoa`, strings that need no escaping as they are. It is used when stderr is not a terminal (then
//! there are no colours to keep); a terminal keeps the default, styled formatter.

use std::fmt;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// Makes a [`PlainVisitor`] per event; give it to `fmt().fmt_fields(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor { writer, first: true, result: Ok(()) }
    }
}

/// Writes one event's fields, separated by spaces, as the default formatter does.
pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Starts a field: the separator, then `name=` (nothing for the message).
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        let name = field.name();
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result =
                self.result.and_then(|()| self.writer.write_str(name)).and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    fn integer(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            self.writer.write_str(value)
        } else if value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
            // What `Debug` would write for it, without its per-character escaping.
            self.writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'))
        } else {
            write!(self.writer, "{value:?}")
        };
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::tests::{writes, Writes};
    use crate::logging::{Sink, SinkWriters};
    use std::sync::Arc;

    fn event() {
        let id: std::sync::Arc<str> = "96401316-e134-4ac1-9666-da13e661cf16".into();
        let none: Option<u64> = None;
        tracing::info!(
            request_id = %id,
            model = "demo-model",
            status = 200u16,
            negative = -3i64,
            stream = true,
            tenant = Some("team a"),
            absent = none,
            ttft_ms = Some(46u64),
            quoted = "say \"hi\"\n",
            unicode = "naïve",
            debugged = ?std::time::Duration::from_millis(5),
            r#type = "raw",
            "request {}", 7
        );
        tracing::warn!(worker = "http://w:8000", "worker stalled: no answer");
    }

    /// The same event through the default formatter and through [`PlainFields`], without timestamps.
    fn both() -> (String, String) {
        // Unbuffered sinks: each line is written as it is made.
        let (default, plain) =
            (Arc::new(Sink::new(Writes::default(), false)), Arc::new(Sink::new(Writes::default(), false)));
        let sub = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_writer(SinkWriters(Arc::clone(&default)))
            .finish();
        tracing::subscriber::with_default(sub, event);
        let sub = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .fmt_fields(PlainFields)
            .with_writer(SinkWriters(Arc::clone(&plain)))
            .finish();
        tracing::subscriber::with_default(sub, event);
        (writes(&default).concat(), writes(&plain).concat())
    }

    #[test]
    fn plain_fields_write_what_the_default_formatter_writes() {
        let (default, plain) = both();
        assert!(default.contains("request_id=96401316") && default.contains("status=200"), "{default}");
        assert!(default.contains(r#"quoted="say \"hi\"\n""#), "{default}");
        assert_eq!(plain, default);
    }
}
