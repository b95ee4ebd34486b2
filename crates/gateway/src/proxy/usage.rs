//! Token usage of relayed answers, and the one body rewrite the gateway makes for it.
//!
//! [`UsageScanner`] finds token counts (`"prompt_tokens": N`, `"completion_tokens": N`, and
//! `"cached_tokens": N` from `prompt_tokens_details`) in a relayed body without parsing it: the usage
//! object sits at the end of a JSON answer or in the last SSE chunk. Token limits need the usage of
//! streams too, so [`with_include_usage`] asks the worker for it and [`StripUsage`] drops that event
//! again when the client did not ask for it.

use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError};
use http_body::{Body, Frame};
use memchr::memmem::Finder;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

/// Most bytes of a key and its number cut by a chunk's end that are kept for the next chunk.
const CARRY: usize = 48;
/// Bytes of the next chunk read with the carried ones: the rest of a cut key and its number.
const SEAM: usize = 64;

/// The searcher, built once: building one per search cost more than the search itself (callgrind:
/// about 5,000 instructions per request, 4% of the gateway's).
static TOKENS_KEY_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY_END));
/// The end all three keys share: one search finds every key.
const KEY_END: &[u8] = b"_tokens\"";
/// What comes before [`KEY_END`] in `"prompt_tokens"`, `"completion_tokens"` and `"cached_tokens"`.
const KEY_STARTS: [&[u8]; 3] = [b"\"prompt", b"\"completion", b"\"cached"];
/// The field name that starts an event's data line.
const DATA: &[u8] = b"data:";

/// Scans relayed chunks for usage numbers and counts SSE events.
///
/// Each chunk is searched where it lies. What a chunk's end may cut, a key with its number or a
/// `data:` field name, is carried over only when the chunk ends inside one: an event stream's chunks
/// end with a blank line after a `}`, so nothing is copied for them.
#[derive(Debug)]
pub struct UsageScanner {
    /// Last `prompt_tokens` seen.
    pub prompt_tokens: Option<u64>,
    /// Last `completion_tokens` seen.
    pub completion_tokens: Option<u64>,
    /// Last `cached_tokens` seen (prompt tokens the worker served from its prefix cache).
    pub cached_tokens: Option<u64>,
    /// Lines starting with `data:` seen in an event stream (an estimate of streamed chunks).
    pub events: u64,
    /// The stream's last bytes when they may end inside a key or its number (else empty).
    carry: Vec<u8>,
    /// How much of `data:` the stream's last line holds when that line is no longer than it
    /// (`None` once the line is longer, or is not a `data:` line).
    line_start: Option<usize>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self {
            prompt_tokens: None,
            completion_tokens: None,
            cached_tokens: None,
            events: 0,
            carry: Vec::new(),
            line_start: Some(0),
        }
    }
}

impl UsageScanner {
    /// Scans one chunk; events are counted in an `event_stream` only (a JSON answer has none).
    pub fn scan(&mut self, chunk: &[u8], event_stream: bool) {
        if event_stream {
            self.count_events(chunk);
        }
        if !self.carry.is_empty() {
            // A key (or its number) the last chunk's end cut: read it with the start of this one.
            let carried = self.carry.len();
            let mut seam = [0u8; CARRY + SEAM];
            seam[..carried].copy_from_slice(&self.carry);
            let next = chunk.len().min(SEAM);
            seam[carried..carried + next].copy_from_slice(&chunk[..next]);
            self.take(last_numbers(&seam[..carried + next], carried));
        }
        self.take(last_numbers(chunk, usize::MAX));
        self.carry_end(chunk);
    }

    /// Keeps the numbers found; a key not found (or cut) leaves the last one seen.
    fn take(&mut self, [prompt, completion, cached]: [Option<u64>; 3]) {
        self.prompt_tokens = prompt.or(self.prompt_tokens);
        self.completion_tokens = completion.or(self.completion_tokens);
        self.cached_tokens = cached.or(self.cached_tokens);
    }

    /// Counts the lines of `chunk` (with the stream's line it continues) that start with `data:`.
    fn count_events(&mut self, chunk: &[u8]) {
        let mut line_start = self.line_start.take();
        let mut from = 0;
        for end in memchr::memchr_iter(b'\n', chunk).chain([chunk.len()]) {
            let line = &chunk[from..end];
            if let Some(had) = line_start {
                let want = &DATA[had..];
                if line.starts_with(want) {
                    self.events += 1;
                } else if end == chunk.len() && want.starts_with(line) {
                    // The chunk ends within the line's first bytes: the next chunk tells.
                    self.line_start = Some(had + line.len());
                }
            }
            line_start = Some(0);
            from = end + 1;
        }
    }

    /// Keeps the stream's last bytes when they may end inside a key or its number.
    fn carry_end(&mut self, chunk: &[u8]) {
        let cut = match chunk.trim_ascii_end().last() {
            Some(&b) => b.is_ascii_alphanumeric() || b"_\":".contains(&b),
            // Only whitespace: the stream still ends as it did.
            None => !self.carry.is_empty(),
        };
        if !cut {
            self.carry.clear();
        } else if chunk.len() >= CARRY {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[chunk.len() - CARRY..]);
        } else {
            self.carry.extend_from_slice(chunk);
            self.carry.drain(..self.carry.len().saturating_sub(CARRY));
        }
    }
}

/// For each of [`KEY_STARTS`], the number after the key's last occurrence in `hay` that starts before
/// `starts_before`, when it is whole. One vectorised forward search for the keys' shared end, the last
/// occurrence of each key winning (a byte-by-byte comparison at every offset cost about 2% of the
/// gateway's CPU per request, a search per key about 2,600 instructions, a backwards search, which
/// memchr does not vectorise, 1,500).
fn last_numbers(hay: &[u8], starts_before: usize) -> [Option<u64>; 3] {
    let mut found = [None; 3];
    for end in TOKENS_KEY_END.find_iter(hay) {
        if let Some(i) = (0..3).find(|&i| hay[..end].ends_with(KEY_STARTS[i])) {
            if end - KEY_STARTS[i].len() < starts_before {
                found[i] = number_after(&hay[end + KEY_END.len()..]);
            }
        }
    }
    found
}

/// The number after `: ` at the start of `rest`, when it is whole.
fn number_after(rest: &[u8]) -> Option<u64> {
    let rest = rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    // A number cut by the chunk boundary is read again, whole, with the next chunk.
    if digits == 0 || digits == rest.len() {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The body with `stream_options.include_usage` set (the only case where the gateway rewrites a body).
pub fn with_include_usage(body: &[u8]) -> Result<Bytes, GatewayError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::new(ErrorKind::InvalidJson, format!("invalid JSON body: {e}")))?;
    if let Some(obj) = v.as_object_mut() {
        let opts = obj.entry("stream_options").or_insert_with(|| serde_json::json!({}));
        if let Some(opts) = opts.as_object_mut() {
            opts.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| GatewayError::new(ErrorKind::Internal, format!("re-encoding the body failed: {e}")))
}

/// Makes a relayed stream drop the usage event the gateway asked for on the client's behalf.
pub fn strip_usage_event(resp: axum::response::Response) -> axum::response::Response {
    let (parts, body) = resp.into_parts();
    axum::response::Response::from_parts(parts, axum::body::Body::new(StripUsage::new(body)))
}

/// Drops the usage event (`"choices":[]` with `"usage"`) from an event stream: the gateway asked the
/// worker for it to count tokens, and the client did not. Events are passed on whole; a partial event
/// waits for the rest of it.
pub struct StripUsage {
    inner: axum::body::Body,
    carry: bytes::BytesMut,
    done: bool,
}

impl StripUsage {
    /// Wraps a relayed event-stream body.
    pub fn new(inner: axum::body::Body) -> Self {
        Self { inner, carry: bytes::BytesMut::new(), done: false }
    }
}

impl Body for StripUsage {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = crate::proxy::sse::strip_usage_events(&mut this.carry, &data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.carry.split().freeze();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_usage_across_chunk_boundaries() {
        let body = br#"data: {"choices":[{"delta":{"content":"hi"}}]}

data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":345,"total_tokens":357}}

data: [DONE]

"#;
        for split in [1, 7, 50, 110, 130, 150] {
            let mut s = UsageScanner::default();
            for chunk in body.chunks(split) {
                s.scan(chunk, true);
            }
            assert_eq!(s.prompt_tokens, Some(12), "split {split}");
            assert_eq!(s.completion_tokens, Some(345), "split {split}");
            assert_eq!(s.events, 3, "split {split}");
        }
    }

    /// However a stream is cut, its chunks give what the whole stream gives: every `data:` line
    /// counted once (not a `data:` inside a line), and each key's last number.
    #[test]
    fn chunks_read_as_the_whole_stream() {
        let parts: [&[u8]; 8] = [
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\": 12,\"completion_tokens\":345,\"prompt_tokens_details\":{\"cached_tokens\" : 7}}}\n\n",
            b": ping\n\n",
            b"event: x\ndata: {\"a\":\"data: in a string\"}\n\n",
            b"data:[DONE]\r\n\r\n",
            b"data: {\"completion_tokens\":98765}\n\n",
            b"dat\n\n",
            b"data: {\"prompt_tokens\":4,\"cached_tokens\":0}\n\n",
        ];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..3000 {
            let mut stream = Vec::new();
            for _ in 0..1 + next(8) {
                stream.extend_from_slice(parts[next(parts.len() as u64) as usize]);
            }
            let mut whole = UsageScanner::default();
            whole.scan(&stream, true);
            let lines = stream.split(|&b| b == b'\n').filter(|l| l.starts_with(b"data:")).count() as u64;
            assert_eq!(whole.events, lines);
            let mut chunked = UsageScanner::default();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rest.len().min(1 + next(80) as usize));
                chunked.scan(chunk, true);
                rest = tail;
            }
            let read = |s: &UsageScanner| (s.events, s.prompt_tokens, s.completion_tokens, s.cached_tokens);
            assert_eq!(read(&chunked), read(&whole), "{}", String::from_utf8_lossy(&stream));
        }
    }

    /// The one search finds what a backwards search per key finds.
    #[test]
    fn one_search_finds_what_three_find() {
        fn old(hay: &[u8], key: &[u8]) -> Option<u64> {
            let pos = memchr::memmem::FinderRev::new(key).rfind(hay)?;
            number_after(&hay[pos + key.len()..])
        }
        let parts: [&[u8]; 10] = [
            b"\"prompt_tokens\": 12,",
            b"\"completion_tokens\":3",
            b"\"cached_tokens\" : 7}",
            b"\"total_tokens\":99,",
            b"\"prompt_tokens_details\":{",
            b"\"x_prompt_tokens\":5,",
            b"prompt_tokens\":8,",
            b"\"completion_tokens\":",
            b"41",
            b" {\"choices\":[]} ",
        ];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut hay = Vec::new();
            for _ in 0..(rng % 9) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                hay.extend_from_slice(parts[(rng % parts.len() as u64) as usize]);
            }
            let want =
                [old(&hay, b"\"prompt_tokens\""), old(&hay, b"\"completion_tokens\""), old(&hay, b"\"cached_tokens\"")];
            assert_eq!(last_numbers(&hay, usize::MAX), want, "{}", String::from_utf8_lossy(&hay));
        }
    }

    #[test]
    fn non_stream_json() {
        let mut s = UsageScanner::default();
        let answer = br#"{"id":"x","content":"data: is not an event here","usage":{"prompt_tokens": 5, "completion_tokens" : 9}}"#;
        s.scan(answer, false);
        assert_eq!((s.prompt_tokens, s.completion_tokens, s.events), (Some(5), Some(9), 0));
        assert_eq!(s.cached_tokens, None, "absent when the worker does not say");
        s.scan(
            br#"{"usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":32},"completion_tokens":1}}"#,
            false,
        );
        assert_eq!((s.prompt_tokens, s.cached_tokens), (Some(40), Some(32)));
    }
}

#[cfg(test)]
mod strip_tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn usage_event_is_dropped_and_others_pass_whole() {
        let stream = "data: {\"choices\":[{\"delta\":{}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n";
        for split in [1usize, 5, 17, 1000] {
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                stream.as_bytes().chunks(split).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            let out = StripUsage::new(body).collect().await.expect("collects").to_bytes();
            let out = String::from_utf8(out.to_vec()).expect("utf-8");
            assert_eq!(out, "data: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n", "split {split}");
        }
    }
}
