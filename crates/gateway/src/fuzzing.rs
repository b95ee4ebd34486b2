//! What must hold for any input to the gateway's scanners and config loader: the checks the fuzz
//! targets in `fuzz/` run on every input, and tests that replay the committed corpus
//! (`fuzz/corpus/<target>/`) through the same checks so CI guards them without a fuzzer.
//!
//! Compiled only for tests and fuzz builds (`cargo afl` sets `--cfg fuzzing`). A byte stream is cut
//! into chunks by its first four bytes (each gives a chunk length of 1 to 64, in turn), so the fuzzer
//! also explores how a worker's connection splits what it sends.

use crate::config::{Config, Overrides};
use crate::proxy::sse::{is_usage_event, strip_usage_events, SseTail};
use crate::proxy::usage::UsageScanner;
use bytes::BytesMut;

/// The relayed stream (input after its first four bytes) and the chunks it arrives in.
fn chunked(data: &[u8]) -> (&[u8], Vec<&[u8]>) {
    let (head, stream) = data.split_at(data.len().min(4));
    let mut chunks = Vec::new();
    let mut rest = stream;
    for b in head.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(rest.len().min(1 + usize::from(*b) % 64));
        chunks.push(chunk);
        rest = tail;
    }
    (stream, chunks)
}

/// `[DONE]` detection, the separator before an appended event, and usage stripping: in chunks they
/// answer exactly as on the whole stream.
pub fn relay(data: &[u8]) {
    let (stream, chunks) = chunked(data);
    let mut tail = SseTail::default();
    chunks.iter().for_each(|c| tail.push(c));
    let trimmed = stream.trim_ascii_end();
    assert_eq!(tail.saw_done(), trimmed.ends_with(b"data: [DONE]") || trimmed.ends_with(b"data:[DONE]"));
    let separator = if stream.is_empty() || stream.ends_with(b"\n\n") {
        ""
    } else if stream.ends_with(b"\n") {
        "\n"
    } else {
        "\n\n"
    };
    assert_eq!(tail.separator(), separator);

    let mut carry = BytesMut::new();
    let mut out = Vec::new();
    for chunk in &chunks {
        out.extend_from_slice(&strip_usage_events(&mut carry, chunk));
    }
    // Everything through the last blank line went out, minus usage events; the rest waits. A chunk
    // cut inside "\n\n\n" may leave the third newline waiting too: an empty line, no event.
    let cut = stream.windows(2).rposition(|w| w == b"\n\n").map_or(0, |i| i + 2);
    let waiting = carry.strip_prefix(b"\n").filter(|rest| rest.len() == stream.len() - cut).unwrap_or(&carry);
    assert_eq!(waiting, &stream[cut..]);
    let kept: Vec<Vec<&[u8]>> = events(&stream[..cut]).into_iter().filter(|e| !is_usage_event(e)).collect();
    assert_eq!(events(&out), kept);
}

/// Events of SSE text: runs of non-empty lines between blank lines.
fn events(text: &[u8]) -> Vec<Vec<&[u8]>> {
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    lines.split(|l| l.is_empty()).filter(|e| !e.is_empty()).map(<[&[u8]]>::to_vec).collect()
}

/// The usage scanner: `data:` lines counted exactly once however the stream is cut; on the whole stream
/// the number after the key's last occurrence; in chunks, a number that follows the key somewhere.
pub fn usage(data: &[u8]) {
    let (stream, chunks) = chunked(data);
    let mut parts = UsageScanner::default();
    chunks.iter().for_each(|c| parts.scan(c, true));
    let mut whole = UsageScanner::default();
    whole.scan(stream, true);
    let data_fields = stream.split(|&b| b == b'\n').filter(|line| line.starts_with(b"data:")).count() as u64;
    assert_eq!((parts.events, whole.events), (data_fields, data_fields));
    for (key, whole, parts) in [
        (&b"\"prompt_tokens\""[..], whole.prompt_tokens, parts.prompt_tokens),
        (b"\"completion_tokens\"", whole.completion_tokens, parts.completion_tokens),
    ] {
        let numbers = numbers_after(stream, key);
        assert_eq!(whole, numbers.last().copied().flatten());
        if let Some(v) = parts {
            assert!(numbers.contains(&Some(v)), "{v} not in {numbers:?}");
        }
    }
}

/// For each occurrence of `key`: the number after `:` (spaces allowed), if one ends before the stream.
fn numbers_after(stream: &[u8], key: &[u8]) -> Vec<Option<u64>> {
    let mut found = Vec::new();
    for (i, _) in stream.windows(key.len()).enumerate().filter(|(_, w)| *w == key) {
        let rest = stream[i + key.len()..].trim_ascii_start();
        let number = rest.strip_prefix(b":").map(<[u8]>::trim_ascii_start).and_then(|r| {
            let digits = r.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 || digits == r.len() {
                return None;
            }
            std::str::from_utf8(&r[..digits]).ok()?.parse().ok()
        });
        found.push(number);
    }
    found
}

/// A TOML config through [`Config::load_from`] (figment layering, then validation): loaded configs
/// validate, and errors are one line.
pub fn config(data: &[u8]) {
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let path = std::env::temp_dir().join(format!("llm-gateway-fuzz-{}-{thread}.toml", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    match Config::load_from(Some(&path), &Overrides::default(), std::iter::empty()) {
        Ok(config) => assert_eq!(config.validate(), Ok(())),
        Err(e) => assert!(!e.contains('\n'), "a multi-line error: {e}"),
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    /// Runs `check` on every file of `fuzz/corpus/<target>/`.
    fn replay(target: &str, check: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            let data = std::fs::read(&path).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails its check", path.display());
            files += 1;
        }
        assert!(files > 0, "{} is empty", dir.display());
    }

    #[test]
    fn relay_corpus_replays() {
        replay("relay", super::relay);
    }

    #[test]
    fn usage_corpus_replays() {
        replay("usage", super::usage);
    }

    #[test]
    fn config_corpus_replays() {
        replay("config", super::config);
    }
}
