//! Finds token counts (`"prompt_tokens": N`, `"completion_tokens": N`) in a relayed body without parsing
//! it: the usage object sits at the end of a JSON answer or in the last SSE chunk.

/// Bytes kept across chunk boundaries so a key split between two chunks is still found.
const CARRY: usize = 48;

/// Scans relayed chunks for usage numbers and counts SSE events.
#[derive(Debug, Default)]
pub struct UsageScanner {
    /// Last `prompt_tokens` seen.
    pub prompt_tokens: Option<u64>,
    /// Last `completion_tokens` seen.
    pub completion_tokens: Option<u64>,
    /// `data:` events seen (an estimate of streamed chunks).
    pub events: u64,
    carry: Vec<u8>,
}

impl UsageScanner {
    /// Scans one chunk.
    pub fn scan(&mut self, chunk: &[u8]) {
        let mut buf = std::mem::take(&mut self.carry);
        let scan_from = buf.len();
        buf.extend_from_slice(chunk);
        self.events += count(&buf, b"data:", scan_from) as u64;
        if let Some(v) = last_number_after(&buf, b"\"prompt_tokens\"") {
            self.prompt_tokens = Some(v);
        }
        if let Some(v) = last_number_after(&buf, b"\"completion_tokens\"") {
            self.completion_tokens = Some(v);
        }
        let keep = buf.len().min(CARRY);
        buf.drain(..buf.len() - keep);
        self.carry = buf;
    }
}

/// Occurrences of `needle` that end after `from` (so carried bytes are not counted twice).
fn count(hay: &[u8], needle: &[u8], from: usize) -> usize {
    hay.windows(needle.len()).enumerate().filter(|(i, w)| *w == needle && i + needle.len() > from).count()
}

fn last_number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let pos = hay.windows(key.len()).rposition(|w| w == key)?;
    let rest = &hay[pos + key.len()..];
    let rest = rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    // A number cut by the chunk boundary is read again, whole, with the next chunk.
    if digits == 0 || digits == rest.len() {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
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
                s.scan(chunk);
            }
            assert_eq!(s.prompt_tokens, Some(12), "split {split}");
            assert_eq!(s.completion_tokens, Some(345), "split {split}");
            assert_eq!(s.events, 3, "split {split}");
        }
    }

    #[test]
    fn non_stream_json() {
        let mut s = UsageScanner::default();
        s.scan(br#"{"id":"x","usage":{"prompt_tokens": 5, "completion_tokens" : 9}}"#);
        assert_eq!((s.prompt_tokens, s.completion_tokens, s.events), (Some(5), Some(9), 0));
    }
}
