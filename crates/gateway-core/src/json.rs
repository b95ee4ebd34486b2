//! A validating, one-pass JSON reader for the few members of a request body the gateway reads.
//!
//! It replaced serde_json with a derived struct in [`crate::request`]: on a 1 KB chat body that cost
//! about 10,000 instructions of a parse of 12,000 (a third of the gateway's own work per request),
//! going over the message text several times (serde_json's string scan, the raw value's UTF-8 check,
//! the caller's escape check). Here the body's UTF-8 is checked once up front (`simdutf8`), a string's
//! first 16 bytes are looked at a word at a time for its end, an escape or a control character, and a
//! longer string's rest with `memchr` and one vectorised pass for control characters. The
//! caller walks objects member by member ([`Reader::object`]) and takes the values it wants; every
//! other value is checked and skipped ([`Reader::skip`]) in a loop with a small fixed stack, never by
//! recursion, however deep the client nests.
//!
//! It accepts exactly JSON text (RFC 8259) whose arrays and objects nest at most the reader's limit
//! deep: a malformed body, one that nests deeper, or one that is not UTF-8 is an error naming what was
//! wrong and where (line and column), which the gateway passes to the client as `invalid_json`.

use std::borrow::Cow;
use std::fmt;

/// Deepest nesting a [`Reader`] can be asked to allow (the skip's container stack is one `u128`).
pub const MAX_DEPTH_SUPPORTED: usize = 127;

/// Why a body is not JSON the reader accepts, and where. Boxed: every step of a read returns a
/// `Result`, and one pointer-sized error keeps those results in registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError(Box<ErrorAt>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ErrorAt {
    what: Cow<'static, str>,
    line: usize,
    column: usize,
}

impl JsonError {
    /// An error at byte offset `at` of `body`.
    fn at(body: &[u8], at: usize, what: impl Into<Cow<'static, str>>) -> Self {
        let before = &body[..at.min(body.len())];
        let line = 1 + memchr::memchr_iter(b'\n', before).count();
        let line_start = memchr::memrchr(b'\n', before).map_or(0, |i| i + 1);
        // Columns count characters, not bytes (the body before `at` may be cut inside a character).
        let column = 1 + String::from_utf8_lossy(&before[line_start..]).chars().count();
        Self(Box::new(ErrorAt { what: what.into(), line, column }))
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at line {} column {}", self.0.what, self.0.line, self.0.column)
    }
}

impl std::error::Error for JsonError {}

/// What the next value is, read from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{`
    Object,
    /// `[`
    Array,
    /// `"`
    String,
    /// A digit or `-`.
    Number,
    /// `true` or `false`.
    Bool,
    /// `null`
    Null,
}

/// A value as it stands in the body (already checked): where, and how deep it sits. Read it again
/// with [`Reader::value_in`], whose errors then say where in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raw<'a> {
    body: &'a str,
    start: usize,
    end: usize,
    depth: usize,
}

impl<'a> Raw<'a> {
    /// The value's JSON text.
    pub fn get(&self) -> &'a str {
        &self.body[self.start..self.end]
    }
}

/// The bytes and words of one kind of container.
#[derive(Clone, Copy)]
struct Container {
    open: u8,
    close: u8,
    what: &'static str,
    after: &'static str,
}

impl Container {
    const OBJECT: Self =
        Self { open: b'{', close: b'}', what: "an object", after: "`,` or `}` after an object member" };
    const ARRAY: Self = Self { open: b'[', close: b']', what: "an array", after: "`,` or `]` after an array element" };
}

/// A cursor over a JSON body checked as it goes.
#[derive(Debug)]
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
    max_depth: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `body`, which must be UTF-8; arrays and objects may nest `max_depth` deep (at
    /// most [`MAX_DEPTH_SUPPORTED`]).
    pub fn new(body: &'a [u8], max_depth: usize) -> Result<Self, JsonError> {
        // simdutf8's check (vectorised, chosen at run time) cost a fifth of std's instructions on a 1 KB body.
        let text = simdutf8::compat::from_utf8(body)
            .map_err(|e| JsonError::at(body, e.valid_up_to(), "the body is not valid UTF-8"))?;
        Ok(Self { text, pos: 0, depth: 0, max_depth: max_depth.min(MAX_DEPTH_SUPPORTED) })
    }

    /// A reader at a value read before, at the depth it was found (meant to read that one value).
    pub fn value_in(raw: Raw<'a>, max_depth: usize) -> Self {
        Self { text: raw.body, pos: raw.start, depth: raw.depth, max_depth: max_depth.min(MAX_DEPTH_SUPPORTED) }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// An error at the current position.
    pub fn error(&self, what: impl Into<Cow<'static, str>>) -> JsonError {
        JsonError::at(self.bytes(), self.pos, what)
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes().get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes().get(self.pos).copied()
    }

    /// Consumes `byte` as the next non-whitespace byte, or fails with "expected {what}".
    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn unexpected(&self, what: &str) -> JsonError {
        match self.bytes().get(self.pos) {
            None => self.error(format!("the body ends where {what} was expected")),
            Some(_) => self.error(format!("expected {what}")),
        }
    }

    /// The next value's kind; an error when no value starts here.
    pub fn kind(&mut self) -> Result<Kind, JsonError> {
        self.peek_kind().ok_or_else(|| self.unexpected("a value"))
    }

    /// The next value's kind, or `None` when no value starts here.
    pub fn peek_kind(&mut self) -> Option<Kind> {
        Some(match self.peek()? {
            b'{' => Kind::Object,
            b'[' => Kind::Array,
            b'"' => Kind::String,
            b'-' | b'0'..=b'9' => Kind::Number,
            b't' | b'f' => Kind::Bool,
            b'n' => Kind::Null,
            _ => return None,
        })
    }

    /// Only whitespace is left: the body held one value.
    pub fn end(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("trailing characters after the JSON value")),
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(self
                .error(format!("arrays and objects nest deeper than {} levels, the gateway's limit", self.max_depth)));
        }
        Ok(())
    }

    /// Reads an object, handing each member's key to `member`, which must consume the member's value
    /// (read it, or [`Reader::skip`] it).
    pub fn object(
        &mut self,
        mut member: impl FnMut(Cow<'a, str>, &mut Self) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        let each = |r: &mut Self| {
            let key = r.key()?;
            member(key, r)
        };
        self.container(Container::OBJECT, each)
    }

    /// Reads an array, calling `item` at each element, which must consume it.
    pub fn array(&mut self, item: impl FnMut(&mut Self) -> Result<(), JsonError>) -> Result<(), JsonError> {
        self.container(Container::ARRAY, item)
    }

    /// An object or array: its opening byte, `each` at every member or element, a comma between them,
    /// its closing byte.
    fn container(
        &mut self,
        kind: Container,
        mut each: impl FnMut(&mut Self) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        self.expect(kind.open, kind.what)?;
        self.enter()?;
        if self.peek() == Some(kind.close) {
            self.pos += 1;
        } else {
            loop {
                each(self)?;
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b) if b == kind.close => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.unexpected(kind.after)),
                }
            }
        }
        self.depth -= 1;
        Ok(())
    }

    /// An object member's key and the `:` after it.
    fn key(&mut self) -> Result<Cow<'a, str>, JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.unexpected("a string key"));
        }
        let key = self.string_at(true)?;
        self.expect(b':', "`:` after an object key")?;
        Ok(key)
    }

    /// A string, borrowed from the body unless it has escapes.
    pub fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.expect_at(b'"', "a string")?;
        self.string_at(true)
    }

    /// Like [`Reader::expect`] but leaves the byte unconsumed.
    fn expect_at(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    /// The string opening at the current `"`; escapes are decoded only when `decode`.
    fn string_at(&mut self, decode: bool) -> Result<Cow<'a, str>, JsonError> {
        let (text, bytes) = (self.text, self.bytes());
        self.pos += 1;
        let start = self.pos;
        let mut decoded: Option<String> = None;
        let mut run = start; // start of the bytes not yet copied into `decoded`
        loop {
            let end = match first_stop_in_opening_words(&bytes[self.pos..]) {
                Ok(at) => self.pos + at,
                // Longer strings: vectorised searches from where the words left off.
                Err(clean) => {
                    let from = self.pos + clean;
                    let Some(at) = memchr::memchr2(b'"', b'\\', &bytes[from..]) else {
                        self.pos = bytes.len();
                        return Err(self.error("the body ends inside a string"));
                    };
                    match first_control(&bytes[from..from + at]) {
                        Some(bad) => from + bad,
                        None => from + at,
                    }
                }
            };
            if bytes[end] < 0x20 {
                self.pos = end;
                return Err(self.error("a control character inside a string (it must be escaped)"));
            }
            self.pos = end + 1;
            if bytes[end] == b'"' {
                return Ok(match decoded {
                    None => Cow::Borrowed(&text[start..end]),
                    Some(mut s) => {
                        s.push_str(&text[run..end]);
                        Cow::Owned(s)
                    }
                });
            }
            let out = if decode {
                let s = decoded.get_or_insert_with(String::new);
                s.push_str(&text[run..end]);
                Some(s)
            } else {
                None
            };
            self.escape(out)?;
            run = self.pos;
        }
    }

    /// The escape after a `\`, appended to `out` when given.
    fn escape(&mut self, out: Option<&mut String>) -> Result<(), JsonError> {
        let Some(&b) = self.bytes().get(self.pos) else {
            return Err(self.error("the body ends inside a string"));
        };
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        // A leading surrogate must be followed by `\u` and a trailing one.
                        if self.bytes().get(self.pos..self.pos + 2) != Some(&b"\\u"[..]) {
                            return Err(self.error("a lone surrogate in a \\u escape"));
                        }
                        self.pos += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(self.error("a lone surrogate in a \\u escape"));
                        }
                        let code = 0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                        char::from_u32(code).ok_or_else(|| self.error("an invalid \\u escape"))?
                    }
                    0xDC00..=0xDFFF => return Err(self.error("a lone surrogate in a \\u escape")),
                    _ => char::from_u32(u32::from(unit)).ok_or_else(|| self.error("an invalid \\u escape"))?,
                }
            }
            _ => {
                self.pos -= 1;
                return Err(self.error("an invalid escape in a string"));
            }
        };
        if let Some(out) = out {
            out.push(c);
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let digits = self.bytes().get(self.pos..self.pos + 4).ok_or_else(|| self.error("a short \\u escape"))?;
        let mut unit = 0u16;
        for &d in digits {
            let v = (d as char).to_digit(16).ok_or_else(|| self.error("an invalid \\u escape"))?;
            unit = unit * 16 + v as u16;
        }
        self.pos += 4;
        Ok(unit)
    }

    /// A number's text, checked against JSON's grammar.
    fn number(&mut self) -> Result<&'a str, JsonError> {
        self.skip_whitespace();
        let bytes = self.bytes();
        let start = self.pos;
        let digits = |from: usize| bytes[from..].iter().take_while(|b| b.is_ascii_digit()).count();
        let mut i = start + usize::from(bytes.get(start) == Some(&b'-'));
        match digits(i) {
            0 => {
                self.pos = i;
                return Err(self.unexpected("a digit"));
            }
            n if n > 1 && bytes[i] == b'0' => {
                self.pos = i + 1;
                return Err(self.error("a number with a leading zero"));
            }
            n => i += n,
        }
        if bytes.get(i) == Some(&b'.') {
            match digits(i + 1) {
                0 => {
                    self.pos = i + 1;
                    return Err(self.unexpected("a digit after the decimal point"));
                }
                n => i += 1 + n,
            }
        }
        if let Some(b'e' | b'E') = bytes.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = bytes.get(i) {
                i += 1;
            }
            match digits(i) {
                0 => {
                    self.pos = i;
                    return Err(self.unexpected("a digit in the exponent"));
                }
                n => i += n,
            }
        }
        self.pos = i;
        Ok(&self.text[start..i])
    }

    fn literal(&mut self, word: &'static str) -> Result<(), JsonError> {
        if self.bytes()[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.error("expected a value (`true`, `false` and `null` are the only bare words)"))
        }
    }

    /// `null` (consumed) or not (nothing consumed).
    pub fn null(&mut self) -> Result<bool, JsonError> {
        if self.kind()? == Kind::Null {
            self.literal("null")?;
            return Ok(true);
        }
        Ok(false)
    }

    /// `true` or `false`; `null` is `None`; anything else is an error naming `field`.
    pub fn bool_or_null(&mut self, field: &str) -> Result<Option<bool>, JsonError> {
        match self.kind()? {
            Kind::Null => self.literal("null").map(|()| None),
            Kind::Bool if self.bytes()[self.pos] == b't' => self.literal("true").map(|()| Some(true)),
            Kind::Bool => self.literal("false").map(|()| Some(false)),
            _ => Err(self.error(format!("`{field}` must be true or false"))),
        }
    }

    /// A string; `null` is `None`; anything else is an error naming `field`.
    pub fn string_or_null(&mut self, field: &str) -> Result<Option<Cow<'a, str>>, JsonError> {
        match self.kind()? {
            Kind::Null => self.literal("null").map(|()| None),
            Kind::String => self.string().map(Some),
            _ => Err(self.error(format!("`{field}` must be a string"))),
        }
    }

    /// A whole number from 0 to `u64::MAX`; `null` is `None`; anything else is an error naming `field`.
    pub fn u64_or_null(&mut self, field: &str) -> Result<Option<u64>, JsonError> {
        match self.kind()? {
            Kind::Null => self.literal("null").map(|()| None),
            Kind::Number => {
                let at = self.pos;
                let n = self.number()?;
                n.parse().map(Some).map_err(|_| {
                    self.pos = at;
                    self.error(format!("`{field}` must be a whole number from 0 to {}", u64::MAX))
                })
            }
            _ => Err(self.error(format!("`{field}` must be a whole number"))),
        }
    }

    /// Checks and skips the next value, returning its text. Nested arrays and objects are walked in a
    /// loop, their kinds kept in one bit per level.
    pub fn skip(&mut self) -> Result<Raw<'a>, JsonError> {
        self.skip_whitespace();
        let (start, depth) = (self.pos, self.depth);
        // Bit `n` set: the container `n + 1` levels below `depth` is an object.
        let mut objects = 0u128;
        loop {
            // At a value.
            match self.kind()? {
                Kind::Object | Kind::Array => {
                    let is_object = self.bytes()[self.pos] == b'{';
                    self.pos += 1;
                    self.enter()?;
                    let bit = 1u128 << (self.depth - depth - 1);
                    let close = if is_object {
                        objects |= bit;
                        b'}'
                    } else {
                        objects &= !bit;
                        b']'
                    };
                    if self.peek() != Some(close) {
                        if is_object {
                            self.skip_key()?;
                        }
                        continue;
                    }
                    self.pos += 1;
                    self.depth -= 1;
                }
                Kind::String => {
                    self.string_at(false)?;
                }
                Kind::Number => {
                    self.number()?;
                }
                Kind::Bool if self.bytes()[self.pos] == b't' => self.literal("true")?,
                Kind::Bool => self.literal("false")?,
                Kind::Null => self.literal("null")?,
            }
            // After a value: close what ends here, then find the next value or finish.
            loop {
                if self.depth == depth {
                    return Ok(Raw { body: self.text, start, end: self.pos, depth });
                }
                let in_object = objects & (1u128 << (self.depth - depth - 1)) != 0;
                match (self.peek(), in_object) {
                    (Some(b','), _) => {
                        self.pos += 1;
                        if in_object {
                            self.skip_key()?;
                        }
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.pos += 1;
                        self.depth -= 1;
                    }
                    (_, true) => return Err(self.unexpected(Container::OBJECT.after)),
                    (_, false) => return Err(self.unexpected(Container::ARRAY.after)),
                }
            }
        }
    }

    fn skip_key(&mut self) -> Result<(), JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.unexpected("a string key"));
        }
        self.string_at(false)?;
        self.expect(b':', "`:` after an object key")
    }
}

/// `0x0101..01`: a byte's worth of `1` in each lane of a word.
const LANES: u64 = u64::from_le_bytes([1; 8]);

/// The first byte a string stops at (`"`, `\` or a control character) within `bytes`' first two
/// 8-byte words: `Ok(offset)`, else `Err(n)`, the `n` bytes looked at (0, 8 or 16) holding none. Most
/// keys and short values end here in a few instructions a word, where `memchr2` and the control
/// check each cost a call and a setup; a long string goes on with them after these 16 bytes.
fn first_stop_in_opening_words(bytes: &[u8]) -> Result<usize, usize> {
    // A lane whose byte is zero (below `n`) sets its top bit; a borrow can set lanes above a true
    // one too, never below it, so the lowest set bit is the first true one.
    let zero = |w: u64| w.wrapping_sub(LANES) & !w & (LANES << 7);
    let below = |w: u64, n: u8| w.wrapping_sub(LANES * u64::from(n)) & !w & (LANES << 7);
    for start in [0, 8] {
        let Some(word) = bytes.get(start..).and_then(<[u8]>::first_chunk::<8>) else { return Err(start) };
        let w = u64::from_le_bytes(*word);
        let stops = zero(w ^ (LANES * u64::from(b'"'))) | zero(w ^ (LANES * u64::from(b'\\'))) | below(w, 0x20);
        if stops != 0 {
            return Ok(start + (stops.trailing_zeros() / 8) as usize);
        }
    }
    Err(16)
}

/// The offset of the first byte below 0x20 (a control character, which JSON strings must escape).
fn first_control(bytes: &[u8]) -> Option<usize> {
    // One pass without an early exit vectorises; the position is looked for only on a bad body.
    if bytes.iter().fold(false, |any, &b| any | (b < 0x20)) {
        bytes.iter().position(|&b| b < 0x20)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip_all(body: &str) -> Result<(), JsonError> {
        let mut r = Reader::new(body.as_bytes(), 8)?;
        r.skip()?;
        r.end()
    }

    #[test]
    fn accepts_json_and_refuses_what_is_not() {
        for ok in [
            "0",
            "-0.5e+3",
            "1E-2",
            " \"a\\u00e9\\ud83d\\ude00\\n\" ",
            "true",
            "null",
            "[]",
            "{}",
            r#"{"a":[1,{"b":null},"c"],"d":{}}"#,
            "[[[[[[[[]]]]]]]]",
        ] {
            assert_eq!(skip_all(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "01",
            "1.",
            "-",
            ".5",
            "1e",
            "+1",
            "tru",
            "nul",
            "[1,]",
            "[1 2]",
            "{\"a\"}",
            "{\"a\":1,}",
            "{1:2}",
            "{\"a\":1]",
            "[1}",
            "\"a",
            "\"a\tb\"",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "[] []",
            "[[[[[[[[[]]]]]]]]]",
            "'a'",
        ] {
            assert!(skip_all(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Reader::new(b"\"\xff\"", 8).is_err(), "not UTF-8");
        // Control characters anywhere in a long string.
        let long = "x".repeat(40);
        assert_eq!(skip_all(&format!("[\"{long}\",\"{long}\\n{long}\"]")), Ok(()));
        for at in [0, 23, 24, 30, 39] {
            let mut bad = long.clone().into_bytes();
            bad[at] = b'\t';
            let bad = format!("\"{}\"", String::from_utf8(bad).unwrap());
            assert!(skip_all(&bad).unwrap_err().to_string().contains("control character"), "{at}");
        }
        assert!(skip_all(&format!("\"{long}")).unwrap_err().to_string().contains("ends inside a string"));
    }

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let mut r = Reader::new(br#"["plain","es\"caped\u0041",null,5]"#, 8).unwrap();
        let mut got = Vec::new();
        r.array(|r| {
            got.push(r.string_or_null("s"));
            if got.last().is_some_and(|g| g.is_err()) {
                r.skip()?;
            }
            Ok(())
        })
        .unwrap();
        assert!(matches!(got[0], Ok(Some(Cow::Borrowed("plain")))));
        assert!(matches!(&got[1], Ok(Some(Cow::Owned(s))) if s == "es\"capedA"));
        assert!(matches!(got[2], Ok(None)));
        assert!(got[3].as_ref().unwrap_err().to_string().contains("`s` must be a string"));
    }

    #[test]
    fn errors_say_where() {
        let err = skip_all("{\"a\":\n  [1,,2]}").unwrap_err();
        assert_eq!(err.to_string(), "expected a value at line 2 column 6");
        let err = skip_all("[1,2").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the body ends where `,` or `]` after an array element was expected at line 1 column 5"
        );
    }

    #[test]
    fn a_value_read_again_reports_positions_in_the_body() {
        let body = b"{\"a\":\n  [1, true]}";
        let mut r = Reader::new(body, 8).unwrap();
        let mut raw = None;
        r.object(|_, r| {
            raw = Some(r.skip()?);
            Ok(())
        })
        .unwrap();
        let raw = raw.unwrap();
        assert_eq!(raw.get(), "[1, true]");
        let mut again = Reader::value_in(raw, 8);
        let err = again.array(|r| r.u64_or_null("n").map(drop)).unwrap_err();
        assert_eq!(err.to_string(), "`n` must be a whole number at line 2 column 7");
    }

    #[test]
    fn whole_numbers_only_where_asked() {
        let read = |s: &str| Reader::new(s.as_bytes(), 8).unwrap().u64_or_null("n");
        assert_eq!(read("18446744073709551615"), Ok(Some(u64::MAX)));
        assert_eq!(read("null"), Ok(None));
        for bad in ["18446744073709551616", "-1", "1.5", "1e3", "\"1\""] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Strings dense in what a string stops at, around the 8- and 16-byte words looked at first:
        /// read as serde_json reads them (the same text, or an error for both).
        #[test]
        fn strings_read_as_serde_json_reads_them(
            chars in proptest::collection::vec(proptest::sample::select(
                vec!['a', '"', '\\', '\n', '\u{1f}', ' ', '\u{7f}', 'é', 'u', '0', 'n', '/']), 0..40)
        ) {
            let body = format!("\"{}\"", chars.iter().collect::<String>());
            let ours = Reader::new(body.as_bytes(), 8).and_then(|mut r| {
                let s = r.string()?;
                r.end().map(|()| s.into_owned())
            });
            let theirs = serde_json::from_str::<String>(&body);
            proptest::prop_assert_eq!(ours.ok(), theirs.ok(), "{:?}", body);
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = format!("{}{}", "[{\"a\":".repeat(200_000), "1}]".repeat(200_000));
        let err = Reader::new(deep.as_bytes(), 100).unwrap().skip().unwrap_err();
        assert!(err.to_string().contains("nest deeper than 100 levels"), "{err}");
    }
}
