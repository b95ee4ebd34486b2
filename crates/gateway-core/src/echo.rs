//! Client strings made safe to echo in error messages and log lines.
//!
//! Anything a client chose (a model name, a header value, a path, a worker id in an admin URL) may hold
//! a newline that forges a log line, an ANSI escape that rewrites a terminal, a bidi override that
//! reorders what an operator reads, or a megabyte that floods logs and answers. [`echo`] bounds it to
//! [`MAX_ECHO_CHARS`] characters and escapes every control character, so the echoed text is one
//! printable, bounded run that reads the same in a terminal, a log file and JSON.

use std::borrow::Cow;

/// Most characters an echoed client string keeps (escapes included); longer ones end in [`ELLIPSIS`].
pub const MAX_ECHO_CHARS: usize = 256;

/// Marks a truncated echo.
pub const ELLIPSIS: &str = "…";

/// `s` bounded to [`MAX_ECHO_CHARS`] characters, with control characters escaped Rust-style (`\n`,
/// `\r`, `\t`, `\u{1b}`, ...), backslashes doubled (so an escape in the output always came from the
/// gateway), and bidi and line-separator characters escaped too. Borrows when nothing needs changing.
pub fn echo(s: &str) -> Cow<'_, str> {
    let clean = s.len() <= MAX_ECHO_CHARS && !s.chars().any(needs_escape);
    if clean {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(MAX_ECHO_CHARS + 8));
    let mut used = 0;
    for c in s.chars() {
        let escaped = needs_escape(c).then(|| escape(c));
        // Escapes are ASCII: their byte length is their length in characters.
        let n = escaped.as_ref().map_or(1, String::len);
        if used + n > MAX_ECHO_CHARS {
            out.push_str(ELLIPSIS);
            return Cow::Owned(out);
        }
        match escaped {
            Some(e) => out.push_str(&e),
            None => out.push(c),
        }
        used += n;
    }
    Cow::Owned(out)
}

/// Characters that must not reach a log line or terminal as they are.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        // Bidi embeddings, overrides and isolates reorder what a reader sees ("Trojan Source").
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
        // Line and paragraph separators end a line in some viewers.
        || matches!(c, '\u{2028}' | '\u{2029}')
}

fn escape(c: char) -> String {
    match c {
        '\\' => "\\\\".into(),
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        c => format!("\\u{{{:x}}}", c as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_short_strings_are_borrowed_unchanged() {
        assert!(matches!(echo("demo-model"), Cow::Borrowed("demo-model")));
        assert!(matches!(echo("Ünïcødé 模型 ok"), Cow::Borrowed(_)));
        assert_eq!(echo(""), "");
    }

    #[test]
    fn newlines_and_ansi_escapes_are_escaped() {
        let forged = "x\n2026-01-01T00:00:00Z  INFO request status=200\r";
        let e = echo(forged);
        assert!(!e.contains('\n') && !e.contains('\r'), "{e}");
        assert_eq!(e, "x\\n2026-01-01T00:00:00Z  INFO request status=200\\r");
        let ansi = "\u{1b}[31mred\u{1b}[0m\u{7}";
        assert_eq!(echo(ansi), "\\u{1b}[31mred\\u{1b}[0m\\u{7}");
        assert_eq!(echo("a\tb\0c\u{7f}\u{9b}"), "a\\tb\\u{0}c\\u{7f}\\u{9b}");
    }

    #[test]
    fn backslashes_bidi_and_separators_are_escaped() {
        assert_eq!(echo(r"a\nb"), r"a\\nb", "a literal backslash-n is not mistaken for an escape");
        assert_eq!(echo("abc\u{202E}fed"), "abc\\u{202e}fed");
        assert_eq!(echo("l1\u{2028}l2"), "l1\\u{2028}l2");
    }

    #[test]
    fn long_strings_are_truncated_to_the_bound() {
        let big = "m".repeat(1 << 20);
        let e = echo(&big);
        assert_eq!(e.chars().count(), MAX_ECHO_CHARS + ELLIPSIS.chars().count());
        assert!(e.ends_with(ELLIPSIS));
        let exactly = "n".repeat(MAX_ECHO_CHARS);
        assert_eq!(echo(&exactly), exactly.as_str());
        // Multi-byte characters count as one each: 256 of them are kept whole.
        let wide = "模".repeat(MAX_ECHO_CHARS);
        assert_eq!(echo(&wide), wide.as_str());
    }

    #[test]
    fn escapes_count_towards_the_bound_and_are_never_cut() {
        let all_escapes = "\u{1b}".repeat(1000);
        let e = echo(&all_escapes);
        assert!(e.chars().count() <= MAX_ECHO_CHARS + 1, "{}", e.len());
        let body = e.strip_suffix(ELLIPSIS).expect("truncated");
        assert!(body.split("\\u{1b}").all(str::is_empty), "whole escapes only: {body}");
    }
}
