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
        PlainVisitor { writer, text: FieldText::default() }
    }
}

/// Room for a request line's fields without growing.
const LINE_CAPACITY: usize = 512;

/// One line's fields as text: `name=value` separated by spaces, the message bare, strings quoted as
/// `Debug` quotes them, `%` (display) values bare. What [`PlainVisitor`] writes for an event, and what
/// the request line writes without going through tracing ([`crate::logging::write_info`]).
#[derive(Debug)]
pub struct FieldText(String);

impl Default for FieldText {
    fn default() -> Self {
        Self(String::with_capacity(LINE_CAPACITY))
    }
}

// The writers are `#[inline]`: at a call with a literal name, each piece is a copy of known length
// rather than a `memcpy` call (600 instructions of the request line's 2,500, callgrind).
impl FieldText {
    /// The text so far.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Empties it, keeping its room.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Starts a field: the separator, then `name=` (nothing for the message).
    #[inline]
    fn start(&mut self, name: &str) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if name != "message" {
            self.0.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.0.push('=');
        }
    }

    /// The event's message.
    #[inline]
    pub fn message(&mut self, text: &str) -> &mut Self {
        self.start("message");
        self.0.push_str(text);
        self
    }

    /// An integer field.
    #[inline]
    pub fn int(&mut self, name: &str, value: impl itoa::Integer) -> &mut Self {
        self.start(name);
        self.0.push_str(itoa::Buffer::new().format(value));
        self
    }

    /// An integer field when there is one (tracing writes nothing for `None`).
    #[inline]
    pub fn some_int(&mut self, name: &str, value: Option<impl itoa::Integer>) -> &mut Self {
        if let Some(v) = value {
            self.int(name, v);
        }
        self
    }

    /// A boolean field.
    #[inline]
    pub fn bool(&mut self, name: &str, value: bool) -> &mut Self {
        self.start(name);
        self.0.push_str(if value { "true" } else { "false" });
        self
    }

    /// A string field, quoted.
    #[inline]
    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        self.start(name);
        if value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
            // What `Debug` would write for it, without its per-character escaping.
            self.0.push('"');
            self.0.push_str(value);
            self.0.push('"');
        } else {
            self.write(format_args!("{value:?}"));
        }
        self
    }

    /// A string field when there is one.
    #[inline]
    pub fn some_str(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        if let Some(v) = value {
            self.str(name, v);
        }
        self
    }

    /// A field written by its `Display` (tracing's `%value`), bare.
    #[inline]
    pub fn display(&mut self, name: &str, value: &str) -> &mut Self {
        self.start(name);
        self.0.push_str(value);
        self
    }

    /// A field written by its `Debug`.
    pub fn debug(&mut self, name: &str, value: &dyn fmt::Debug) -> &mut Self {
        self.start(name);
        self.write(format_args!("{value:?}"));
        self
    }

    fn write(&mut self, args: fmt::Arguments<'_>) {
        use fmt::Write;
        // Writing to a String cannot fail.
        let _ = self.0.write_fmt(args);
    }
}

/// Writes one event's fields, separated by spaces, as the default formatter does. They are collected
/// in a [`FieldText`] and handed to the subscriber's writer once, in [`VisitOutput::finish`]: a write
/// through it is a dynamic call, and a field took three.
pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    text: FieldText,
}

impl Visit for PlainVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.text.int(field.name(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.text.int(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.text.bool(field.name(), value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.text.message(value),
            name => self.text.str(name, value),
        };
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text.debug(field.name(), value);
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(mut self) -> fmt::Result {
        self.writer.write_str(self.text.as_str())
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.text.0
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
