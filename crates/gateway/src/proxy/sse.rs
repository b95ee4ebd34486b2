//! Pure scanning of a relayed event stream, apart from the body types that do IO: whether it ended
//! with `data: [DONE]` ([`SseTail`]) and dropping usage events ([`strip_usage_events`]).
//!
//! Both see the stream in whatever chunks the worker's connection delivers and must answer as if they
//! saw it whole; the fuzz targets in `fuzz/` check exactly that.

use bytes::{Bytes, BytesMut};

/// Bytes kept from before the stream's trailing whitespace: enough for `data: [DONE]`.
const TAIL: usize = 32;

/// The end of an event stream seen so far, in bounded memory: the last [`TAIL`] bytes before its
/// trailing whitespace and the last two bytes of that whitespace.
#[derive(Debug, Default, Clone)]
pub struct SseTail {
    tail: Vec<u8>,
}

impl SseTail {
    /// Takes the next chunk of the stream.
    pub fn push(&mut self, data: &[u8]) {
        let content = data.trim_ascii_end().len();
        let trailing = (data.len() - content).min(2);
        if content >= TAIL {
            // The chunk holds the whole tail (the usual event): what came before is not needed.
            self.tail.clear();
            self.tail.extend_from_slice(&data[content - TAIL..content]);
            self.tail.extend_from_slice(&data[data.len() - trailing..]);
            return;
        }
        self.tail.extend_from_slice(&data[content.saturating_sub(TAIL)..content]);
        self.tail.extend_from_slice(&data[data.len() - trailing..]);
        // A run of whitespace longer than two bytes matters only as "not one space" to the `[DONE]`
        // check and by its last two bytes to the separator: keep those, so whitespace cannot push the
        // content out of the tail.
        let content = self.tail.trim_ascii_end().len();
        let excess = (self.tail.len() - content).saturating_sub(2);
        self.tail.drain(content..content + excess);
        self.tail.drain(..content.saturating_sub(TAIL));
    }

    /// Whether the stream, trailing whitespace aside, ends with `data: [DONE]` (or `data:[DONE]`).
    pub fn saw_done(&self) -> bool {
        let trimmed = self.tail.trim_ascii_end();
        trimmed.ends_with(b"data: [DONE]") || trimmed.ends_with(b"data:[DONE]")
    }

    /// What to write before an event the gateway appends so that it stands as an event of its own:
    /// nothing after a blank line (or at the start), else what closes the half-written event.
    pub fn separator(&self) -> &'static str {
        if self.tail.is_empty() || self.tail.ends_with(b"\n\n") {
            ""
        } else if self.tail.ends_with(b"\n") {
            "\n"
        } else {
            "\n\n"
        }
    }
}

/// Whether an event (its lines) is the usage event: `"choices":[]` with `"usage"` on one line.
pub fn is_usage_event(lines: &[&[u8]]) -> bool {
    lines.iter().any(|l| contains(l, b"\"choices\":[]") && contains(l, b"\"usage\""))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Appends `data` to `carry` and returns its complete events (through its last blank line) minus
/// usage events; the partial event after them stays in `carry`. Events are passed on whole.
///
/// `carry` never holds a blank line between calls, so only the new bytes (and the one before them)
/// are searched for the end of an event.
pub fn strip_usage_events(carry: &mut BytesMut, data: &[u8]) -> Bytes {
    let from = carry.len().saturating_sub(1);
    carry.extend_from_slice(data);
    let Some(end) = carry[from..].windows(2).rposition(|w| w == b"\n\n") else { return Bytes::new() };
    let complete = carry.split_to(from + end + 2);
    let mut out = BytesMut::with_capacity(complete.len());
    for event in complete.split_inclusive(|&b| b == b'\n').collect::<Vec<_>>().split(|line| *line == b"\n") {
        if !event.is_empty() && !is_usage_event(event) {
            for line in event {
                out.extend_from_slice(line);
            }
            out.extend_from_slice(b"\n");
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(chunks: &[&[u8]]) -> SseTail {
        let mut t = SseTail::default();
        chunks.iter().for_each(|c| t.push(c));
        t
    }

    #[test]
    fn done_is_seen_however_the_stream_is_cut() {
        let stream = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let t = tail_of(&stream.chunks(split).collect::<Vec<_>>());
            assert!(t.saw_done(), "split {split}");
            assert_eq!(t.separator(), "", "split {split}");
        }
        assert!(!tail_of(&[b"data: [DONE] x\n\n"]).saw_done());
        assert!(tail_of(&[b"data:[DONE]"]).saw_done());
    }

    #[test]
    fn long_trailing_whitespace_does_not_hide_done() {
        // The fixed 32-byte tail lost `[DONE]` behind 30 bytes of whitespace.
        let t = tail_of(&[b"data: [DONE]", &[b' '; 30], b"\n", &[b'\n'; 100]]);
        assert!(t.saw_done());
        assert_eq!(t.separator(), "");
        // A run of whitespace inside the tail is not taken for the single space of `data: [DONE]`.
        assert!(!tail_of(&[b"data:  ", b"  [DONE]\n\n"]).saw_done());
    }

    #[test]
    fn separator_closes_a_half_written_event() {
        assert_eq!(tail_of(&[]).separator(), "");
        assert_eq!(tail_of(&[b"data: {}"]).separator(), "\n\n");
        assert_eq!(tail_of(&[b"data: {}\n"]).separator(), "\n");
        assert_eq!(tail_of(&[b"data: {}\n", b"   "]).separator(), "\n\n");
    }

    #[test]
    fn a_cut_inside_three_newlines_leaves_only_an_empty_line_waiting() {
        // Found by the relay fuzz target: the third newline stays in the carry, where it is an empty
        // line and changes no event.
        let mut carry = BytesMut::new();
        assert_eq!(&strip_usage_events(&mut carry, b"data: a\n\n")[..], b"data: a\n\n");
        assert!(strip_usage_events(&mut carry, b"\ndata: b").is_empty());
        assert_eq!(&carry[..], b"\ndata: b");
        assert_eq!(&strip_usage_events(&mut carry, b"\n\n")[..], b"data: b\n\n");
    }

    #[test]
    fn usage_event_is_dropped_and_the_partial_event_waits() {
        let mut carry = BytesMut::new();
        let out = strip_usage_events(
            &mut carry,
            b"data: {\"choices\":[{}]}\n\ndata: {\"choices\":[],\"usage\":{}}\n\ndata: [DO",
        );
        assert_eq!(&out[..], b"data: {\"choices\":[{}]}\n\n");
        assert_eq!(&carry[..], b"data: [DO");
        let out = strip_usage_events(&mut carry, b"NE]\n");
        assert!(out.is_empty());
        let out = strip_usage_events(&mut carry, b"\n");
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        assert!(carry.is_empty());
    }
}
