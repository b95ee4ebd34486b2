//! What the gateway reads from a request body: only the fields routing, admission and limits need.
//!
//! The body itself is forwarded byte for byte; this parse borrows from it and copies out just a few
//! small fields. Message `content` may be a string or a list of parts (`[{"type":"text","text":..}]`).
//!
//! The body is read by [`crate::json::Reader`] in one pass that also checks it is JSON. Nothing here
//! recurses once per level of the client's JSON: a body that nests arrays or objects deeper than
//! [`MAX_JSON_DEPTH`] is refused, unknown members and deep values are skipped in a loop, and prompt
//! text is looked for only within [`MAX_TEXT_LISTS`] levels of lists (deeper values are opaque: they
//! count as no text). A member the gateway reads that appears twice is refused.

use crate::json::{JsonError, Kind, Raw, Reader};
use crate::prefix::{hash_bytes, PrefixHasher};
use serde::Deserialize;
use std::borrow::Cow;

/// Deepest nesting of arrays and objects a request body may have. OpenAI's request shapes need a few
/// levels (tool and response schemas a few dozen at most); a deeper body is refused with a 400 rather
/// than walked by the gateway or handed to a worker, whose own parser may not bound its recursion.
pub const MAX_JSON_DEPTH: usize = 100;

/// Levels of lists searched for prompt text in `prompt`, `input` and `content`: enough for a string,
/// a list of strings or parts, and a list of such lists. Token ids and anything deeper give no text.
pub const MAX_TEXT_LISTS: usize = 2;

/// Whether arrays and objects in `body` nest deeper than `limit`: a check of the reader's depth limit
/// apart from the reader ([`check_any_body`]).
///
/// One pass over the bytes with no recursion and no allocation; brackets inside strings do not count.
/// On malformed input the answer is only a guess.
#[cfg(any(test, fuzzing))]
pub fn nests_deeper_than(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        match b {
            // Skip the string to its closing quote; most of a body's bytes are in strings.
            b'"' => loop {
                let Some(at) = body.get(i..).and_then(|rest| memchr::memchr2(b'"', b'\\', rest)) else {
                    return false;
                };
                i += at + 1;
                if body[i - 1] == b'"' {
                    break;
                }
                i += 1; // the escaped byte
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Priority class of a request in the admission queue; lower rank is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served before everything else.
    Urgent,
    /// Served before normal.
    High,
    /// The default.
    #[default]
    Normal,
    /// Served last (but aging lifts it).
    Low,
    /// Batch API lines: below every live class and never aged; they take only spare capacity, and are
    /// handed a slot only when no live request waits for it. Not settable by clients (`X-Priority`) nor
    /// by config (an API key's `priority`).
    #[serde(skip_deserializing)]
    Batch,
}

impl Priority {
    /// The live classes, most urgent first ([`Priority::Batch`] is apart: it never enters the live queue).
    pub const ALL: [Priority; 4] = [Priority::Urgent, Priority::High, Priority::Normal, Priority::Low];

    /// Rank, 0 for urgent to 3 for low (4 for batch, which the live queue never holds).
    pub fn rank(self) -> usize {
        self as usize
    }

    /// The class one step more urgent (urgent stays urgent).
    pub fn raised(self) -> Priority {
        Self::ALL[self.rank().saturating_sub(1)]
    }

    /// Parses `urgent|high|normal|low`, case-insensitive (never `batch`: only the gateway's own batch
    /// runner sends batch lines).
    pub fn parse(s: &str) -> Option<Priority> {
        Self::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Urgent => "urgent",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
            Self::Batch => "batch",
        }
    }
}

/// Characters per token in the gateway's token estimates.
const CHARS_PER_TOKEN: u64 = 4;

/// How the prompt is cut into chunks for prefix hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixOptions {
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Chunks hashed at most (bounds the cost of huge prompts).
    pub max_chunks: usize,
    /// Whether a session key is derived from the first system and user messages when the body names
    /// none ([`RequestFeatures::session_key`]): it copies both, so only a policy that reads it asks.
    pub session_from_messages: bool,
}

impl Default for PrefixOptions {
    fn default() -> Self {
        Self { chunk_bytes: 128, max_chunks: 128, session_from_messages: true }
    }
}

/// The few facts about a request that routing, admission and limits need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFeatures {
    /// `model`, when given.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// Whether `stream_options` was present at all.
    pub has_stream_options: bool,
    /// `user`, when given.
    pub user: Option<String>,
    /// `max_tokens` or `max_completion_tokens`, when given.
    pub max_tokens: Option<u64>,
    /// Characters of prompt text (messages or prompt), for token estimates.
    pub prompt_chars: usize,
    /// Chained hashes of the prompt's chunks (see [`crate::prefix`]).
    pub prefix_hashes: Vec<u64>,
    /// Bytes of prompt text each of `prefix_hashes` covers ([`PrefixOptions::chunk_bytes`]), so a
    /// matched run of hashes converts to prompt tokens; 0 when unknown (treated as the default).
    pub chunk_bytes: usize,
    /// Session key for consistent hashing: `X-Session-Id` header (set by the gateway), else the body's
    /// `session_id`, else `user`, else a hash of the first system and user messages.
    pub session_key: Option<u64>,
    /// Admission priority (set by the gateway from `X-Priority` or the API key).
    pub priority: Priority,
    /// `previous_response_id` (Responses API), when given: the follow-up goes where that response lives.
    pub previous_response_id: Option<String>,
}

/// The members read from a body, before any text is hashed (the hashes are seeded with `model`, which
/// may come last).
#[derive(Default)]
struct Wire<'a> {
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<Option<bool>>,
    user: Option<Cow<'a, str>>,
    session_id: Option<Cow<'a, str>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    messages: Option<Messages<'a>>,
    prompt: Option<Raw<'a>>,
    input: Option<Raw<'a>>,
    instructions: Option<Cow<'a, str>>,
    previous_response_id: Option<Cow<'a, str>>,
}

/// A request's messages, on the stack up to eight: their list was two of a request's allocations.
type Messages<'a> = smallvec::SmallVec<[Message<'a>; 8]>;

struct Message<'a> {
    role: Option<Cow<'a, str>>,
    content: Option<Raw<'a>>,
}

/// Marks member `bit` read; a second member of the same name is an error, as a worker's parser may
/// take either one (the gateway must not route by one `model` while the worker serves another).
fn once(seen: &mut u32, bit: u32, key: &str, r: &Reader<'_>) -> Result<(), JsonError> {
    if *seen & bit != 0 {
        return Err(r.error(format!("duplicate member `{}`", crate::echo(key))));
    }
    *seen |= bit;
    Ok(())
}

impl<'a> Wire<'a> {
    fn read(body: &'a [u8]) -> Result<Self, JsonError> {
        let mut r = Reader::new(body, MAX_JSON_DEPTH)?;
        if r.peek_kind() != Some(Kind::Object) {
            return Err(r.error("the request body must be a JSON object"));
        }
        let mut w = Wire::default();
        let mut seen = 0u32;
        r.object(|key, r| match MEMBERS.iter().position(|m| key == *m) {
            Some(i) => {
                once(&mut seen, 1 << i, &key, r)?;
                w.member(MEMBERS[i], r)
            }
            None => r.skip().map(drop),
        })?;
        r.end()?;
        Ok(w)
    }

    /// Reads the value of member `name`, one of [`MEMBERS`].
    fn member(&mut self, name: &'static str, r: &mut Reader<'a>) -> Result<(), JsonError> {
        match name {
            "model" => self.model = r.string_or_null(name)?,
            "stream" => self.stream = r.bool_or_null(name)?,
            "stream_options" => self.stream_options = stream_options(r)?,
            "user" => self.user = r.string_or_null(name)?,
            "session_id" => self.session_id = r.string_or_null(name)?,
            "max_tokens" => self.max_tokens = r.u64_or_null(name)?,
            "max_completion_tokens" => self.max_completion_tokens = r.u64_or_null(name)?,
            "max_output_tokens" => self.max_output_tokens = r.u64_or_null(name)?,
            "messages" => self.messages = messages(r)?,
            "prompt" => self.prompt = raw_or_null(r)?,
            "input" => self.input = raw_or_null(r)?,
            "instructions" => self.instructions = r.string_or_null(name)?,
            "previous_response_id" => self.previous_response_id = r.string_or_null(name)?,
            // A name in `MEMBERS` without an arm is skipped, never read into another member.
            _ => drop(r.skip()?),
        }
        Ok(())
    }
}

/// The top-level members [`Wire`] reads, each an arm of [`Wire::member`].
const MEMBERS: [&str; 13] = [
    "model",
    "stream",
    "stream_options",
    "user",
    "session_id",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "messages",
    "prompt",
    "input",
    "instructions",
    "previous_response_id",
];

/// A value kept as its raw text to be read later; `null` is `None`.
fn raw_or_null<'a>(r: &mut Reader<'a>) -> Result<Option<Raw<'a>>, JsonError> {
    if r.null()? {
        return Ok(None);
    }
    r.skip().map(Some)
}

/// `stream_options`: `None` when absent or null, else its `include_usage`.
fn stream_options(r: &mut Reader<'_>) -> Result<Option<Option<bool>>, JsonError> {
    if r.null()? {
        return Ok(None);
    }
    if r.peek_kind() != Some(Kind::Object) {
        return Err(r.error("`stream_options` must be an object"));
    }
    let (mut include_usage, mut seen) = (None, 0u32);
    r.object(|key, r| match key.as_ref() {
        "include_usage" => {
            once(&mut seen, 1, &key, r)?;
            include_usage = r.bool_or_null("stream_options.include_usage")?;
            Ok(())
        }
        _ => r.skip().map(drop),
    })?;
    Ok(Some(include_usage))
}

/// `messages`: a list of objects whose `role` and `content` are kept (content as its raw text: the
/// role decides what the content feeds, and may come after it).
fn messages<'a>(r: &mut Reader<'a>) -> Result<Option<Messages<'a>>, JsonError> {
    if r.null()? {
        return Ok(None);
    }
    if r.peek_kind() != Some(Kind::Array) {
        return Err(r.error("`messages` must be a list of message objects"));
    }
    let mut list = Messages::new();
    r.array(|r| {
        if r.peek_kind() != Some(Kind::Object) {
            return Err(r.error("each of `messages` must be an object"));
        }
        let (mut msg, mut seen) = (Message { role: None, content: None }, 0u32);
        r.object(|key, r| match key.as_ref() {
            "role" => {
                once(&mut seen, 1, &key, r)?;
                msg.role = r.string_or_null("role")?;
                Ok(())
            }
            "content" => {
                once(&mut seen, 2, &key, r)?;
                msg.content = raw_or_null(r)?;
                Ok(())
            }
            _ => r.skip().map(drop),
        })?;
        list.push(msg);
        Ok(())
    })?;
    Ok(Some(list))
}

/// Text of a `content`, `prompt` or `input` value: a string, or lists (at most [`MAX_TEXT_LISTS`]
/// deep) of strings and `{"text":..}` parts; token ids and deeper lists give none.
///
/// `lists` is how many lists enclose the value; the recursion is bounded by [`MAX_TEXT_LISTS`], and
/// anything deeper is skipped by the reader's loop.
fn visit_text(r: &mut Reader<'_>, lists: usize, f: &mut dyn FnMut(&str)) -> Result<(), JsonError> {
    match r.kind()? {
        Kind::String => f(&r.string()?),
        Kind::Array if lists < MAX_TEXT_LISTS => r.array(|r| match r.kind()? {
            Kind::Object => {
                let mut seen = 0u32;
                r.object(|key, r| match key.as_ref() {
                    "text" => {
                        once(&mut seen, 1, &key, r)?;
                        if let Some(text) = r.string_or_null("text")? {
                            f(&text);
                        }
                        Ok(())
                    }
                    _ => r.skip().map(drop),
                })
            }
            _ => visit_text(r, lists + 1, &mut *f),
        })?,
        _ => {
            r.skip()?;
        }
    }
    Ok(())
}

/// `text.chars().count()`, with ASCII text (most prompts) answered by its length: checking a word at a
/// time cost 0.3 instructions per byte of prompt where std's count took 0.8.
fn char_count(text: &str) -> usize {
    if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    }
}

/// [`visit_text`] over a value read before: a string without escapes is its own text.
fn visit_raw(raw: Raw<'_>, f: &mut dyn FnMut(&str)) -> Result<(), JsonError> {
    let s = raw.get();
    if let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        if memchr::memchr(b'\\', inner.as_bytes()).is_none() {
            f(inner);
            return Ok(());
        }
    }
    visit_text(&mut Reader::value_in(raw, MAX_JSON_DEPTH), 0, f)
}

impl RequestFeatures {
    /// Reads the routing-relevant members of a JSON body; the error says what in the body is not
    /// JSON (or is deeper than [`MAX_JSON_DEPTH`], or has a member of the wrong type) and where.
    pub fn parse(body: &[u8], opts: PrefixOptions) -> Result<Self, JsonError> {
        let wire = Wire::read(body)?;
        let model = wire.model.as_deref().unwrap_or("");
        let mut hasher = PrefixHasher::new(model, opts.chunk_bytes, opts.max_chunks);
        let mut prompt_chars = 0usize;
        let mut affinity: Option<u64> = None;
        let mut feed = |text: &str, hasher: &mut PrefixHasher| {
            prompt_chars += char_count(text);
            hasher.feed(text.as_bytes());
        };
        if let Some(messages) = &wire.messages {
            // The first system and first user message identify a conversation across its turns.
            let mut first_system: Option<String> = None;
            let mut first_user: Option<String> = None;
            for msg in messages {
                let role = msg.role.as_deref().unwrap_or("");
                hasher.feed(role.as_bytes());
                hasher.feed(b"\n");
                let slot = match role {
                    _ if !opts.session_from_messages => None,
                    "system" | "developer" if first_system.is_none() => Some(first_system.insert(String::new())),
                    "user" if first_user.is_none() => Some(first_user.insert(String::new())),
                    _ => None,
                };
                let mut slot = slot;
                if let Some(content) = msg.content {
                    visit_raw(content, &mut |t| {
                        feed(t, &mut hasher);
                        if let Some(s) = slot.as_deref_mut() {
                            s.push_str(t);
                        }
                    })?;
                }
                hasher.feed(b"\n");
            }
            if first_system.is_some() || first_user.is_some() {
                let sys = hash_bytes(0, first_system.unwrap_or_default().as_bytes());
                affinity = Some(hash_bytes(sys, first_user.unwrap_or_default().as_bytes()));
            }
        }
        if let Some(text) = &wire.instructions {
            feed(text, &mut hasher);
        }
        for raw in [wire.prompt, wire.input].into_iter().flatten() {
            let mut h = 0u64;
            visit_raw(raw, &mut |t| {
                feed(t, &mut hasher);
                h = hash_bytes(h, t.as_bytes());
            })?;
            affinity.get_or_insert(h);
        }
        let session_key = wire
            .session_id
            .as_deref()
            .map(|s| hash_bytes(1, s.as_bytes()))
            .or_else(|| wire.user.as_deref().map(|u| hash_bytes(2, u.as_bytes())))
            .or(affinity);
        Ok(Self {
            model: wire.model.map(Cow::into_owned),
            stream: wire.stream.unwrap_or(false),
            include_usage: wire.stream_options.flatten().unwrap_or(false),
            has_stream_options: wire.stream_options.is_some(),
            user: wire.user.map(Cow::into_owned),
            max_tokens: wire.max_completion_tokens.or(wire.max_tokens).or(wire.max_output_tokens),
            prompt_chars,
            prefix_hashes: hasher.finish(),
            chunk_bytes: opts.chunk_bytes.max(1),
            session_key,
            priority: Priority::Normal,
            previous_response_id: wire.previous_response_id.map(Cow::into_owned),
        })
    }

    /// Sets the session key from an `X-Session-Id` header, which outranks the body.
    pub fn set_session_header(&mut self, session: &str) {
        self.session_key = Some(hash_bytes(1, session.as_bytes()));
    }

    /// Tokens this request may cost before its real usage is known: prompt chars / 4 + `max_tokens`,
    /// saturating (a client's `max_tokens` near `u64::MAX` must not wrap around to a small charge).
    pub fn estimated_tokens(&self, default_max_tokens: u64) -> u64 {
        self.prompt_tokens().saturating_add(self.max_tokens.unwrap_or(default_max_tokens))
    }

    /// Estimated prompt tokens: 4 characters per token, the usual rule for English text and BPE
    /// vocabularies (the gateway does not tokenize).
    pub fn prompt_tokens(&self) -> u64 {
        (self.prompt_chars as u64).div_ceil(CHARS_PER_TOKEN)
    }

    /// Estimated prompt tokens covered by the first `hashes` prefix hashes, at most the prompt's.
    pub fn tokens_in_hashes(&self, hashes: usize) -> u64 {
        let chunk = if self.chunk_bytes == 0 { PrefixOptions::default().chunk_bytes } else { self.chunk_bytes };
        (hashes.saturating_mul(chunk) as u64).div_ceil(CHARS_PER_TOKEN).min(self.prompt_tokens())
    }
}

/// What must hold for any body, fuzzed or not: the parse answers (no panic, no overflow), refuses
/// what nests too deep and what serde_json would not read as JSON, and bounds what it returns. Run by the `request` fuzz target (`fuzz/`) and by
/// the test replaying its corpus.
#[cfg(any(test, fuzzing))]
pub fn check_any_body(body: &[u8]) {
    let opts = PrefixOptions { chunk_bytes: 16, max_chunks: 8, ..PrefixOptions::default() };
    let parsed = RequestFeatures::parse(body, opts);
    if nests_deeper_than(body, MAX_JSON_DEPTH) {
        assert!(parsed.is_err(), "a body nested deeper than the limit was accepted");
    }
    if let Ok(f) = parsed {
        // The reader accepts nothing serde_json would refuse as JSON (read as `IgnoredAny`, which
        // checks the grammar; a tree would also refuse numbers beyond f64, like `1e999`).
        let json = serde_json::from_slice::<serde::de::IgnoredAny>(body);
        assert!(json.is_ok(), "accepted what serde_json refuses: {json:?}");
        assert!(f.prefix_hashes.len() <= opts.max_chunks);
        assert!(f.prompt_chars <= body.len(), "{} chars from {} bytes", f.prompt_chars, body.len());
        assert!(f.estimated_tokens(u64::MAX) >= f.max_tokens.unwrap_or(u64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> RequestFeatures {
        RequestFeatures::parse(
            body.as_bytes(),
            PrefixOptions { chunk_bytes: 8, max_chunks: 64, ..PrefixOptions::default() },
        )
        .expect("parses")
    }

    #[test]
    fn reads_the_routing_fields() {
        let f = parse(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"user":"u1",
                "max_completion_tokens":7,"messages":[{"role":"user","content":"hello\nworld"}],"extra":[1,2]}"#,
        );
        assert_eq!(f.model.as_deref(), Some("m"));
        assert!(f.stream && f.include_usage && f.has_stream_options);
        assert_eq!(f.user.as_deref(), Some("u1"));
        assert_eq!(f.max_tokens, Some(7));
        assert_eq!(f.prompt_chars, 11);
        assert_eq!(parse(r#"{"messages":[{"role":"user","content":"héllo wörld ✓"}]}"#).prompt_chars, 13);
        assert!(!f.prefix_hashes.is_empty());
        assert_eq!(f.estimated_tokens(16), 3 + 7);
        assert_eq!((f.prompt_tokens(), f.chunk_bytes), (3, 8));
        // Hashes convert to tokens at 8 bytes = 2 tokens each, capped by the prompt's estimate.
        assert_eq!((f.tokens_in_hashes(1), f.tokens_in_hashes(5)), (2, 3));
    }

    #[test]
    fn a_session_key_from_the_messages_only_when_asked_for() {
        let body = br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]}"#;
        let opts = PrefixOptions::default();
        let asked = RequestFeatures::parse(body, opts).expect("parses");
        let not = RequestFeatures::parse(body, PrefixOptions { session_from_messages: false, ..opts }).expect("parses");
        assert!(asked.session_key.is_some());
        assert_eq!(not.session_key, None);
        assert_eq!((not.prompt_chars, &not.prefix_hashes), (asked.prompt_chars, &asked.prefix_hashes));
        // A session the body names is read either way.
        let named = br#"{"session_id":"c1","messages":[{"role":"user","content":"u"}]}"#;
        let named = RequestFeatures::parse(named, PrefixOptions { session_from_messages: false, ..opts });
        assert!(named.expect("parses").session_key.is_some());
    }

    #[test]
    fn escaped_and_plain_text_read_alike() {
        let plain =
            parse(r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"héllo, x"}]}"#);
        let escaped = parse(
            r#"{"messages":[{"role":"system","content":"be\u0020brief"},{"role":"user","content":"h\u00e9llo,\u0020x"}]}"#,
        );
        assert_eq!(plain.prompt_chars, 16);
        assert_eq!(escaped, plain);
    }

    #[test]
    fn string_and_parts_content_hash_alike() {
        let a = parse(r#"{"model":"m","messages":[{"role":"user","content":"abcdefghijklmnop"}]}"#);
        let b = parse(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},{"type":"text","text":"ijklmnop"}]}]}"#,
        );
        assert_eq!(a.prefix_hashes, b.prefix_hashes);
        assert_eq!(a.prompt_chars, b.prompt_chars);
        assert_eq!(a.session_key, b.session_key);
    }

    #[test]
    fn session_key_precedence() {
        let by_session = parse(r#"{"model":"m","session_id":"s","user":"u","prompt":"p"}"#);
        let by_user = parse(r#"{"model":"m","user":"u","prompt":"p"}"#);
        let by_prompt = parse(r#"{"model":"m","prompt":"p"}"#);
        assert_ne!(by_session.session_key, by_user.session_key);
        assert_ne!(by_user.session_key, by_prompt.session_key);
        assert!(by_prompt.session_key.is_some());
        let mut f = by_prompt.clone();
        f.set_session_header("s");
        assert_eq!(f.session_key, by_session.session_key);
    }

    #[test]
    fn conversations_sharing_a_system_prompt_share_leading_hashes() {
        let a = parse(
            r#"{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"one"}]}"#,
        );
        let b = parse(
            r#"{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"two"}]}"#,
        );
        assert!(a.prefix_hashes.len() > 3);
        assert_eq!(a.prefix_hashes[..3], b.prefix_hashes[..3]);
        assert_ne!(a.prefix_hashes.last(), b.prefix_hashes.last());
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        for body in ["", "{", "[]", r#"{"model":1}"#, r#"{"stream":"yes"}"#, r#"{"messages":"x"}"#] {
            assert!(RequestFeatures::parse(body.as_bytes(), PrefixOptions::default()).is_err(), "{body}");
        }
        // Token-id prompts and absent fields are fine.
        let f = parse(r#"{"prompt":[1,2,3]}"#);
        assert_eq!(f.model, None);
        assert_eq!(f.prompt_chars, 0);
    }

    /// `field` set to `depth` nested lists around `inner`, inside an otherwise normal body.
    fn nested(field: &str, depth: usize, inner: &str) -> String {
        let value = format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth));
        match field {
            "content" => format!(r#"{{"model":"m","messages":[{{"role":"user","content":{value}}}]}}"#),
            _ => format!(r#"{{"model":"m","{field}":{value}}}"#),
        }
    }

    #[test]
    fn absurd_nesting_in_each_text_field_is_refused_fast_without_recursion() {
        // 100k levels overflowed the stack (one recursive call per level) and re-parsed every level.
        for field in ["prompt", "input", "content", "unknown_field"] {
            let body = nested(field, 100_000, "\"x\"");
            let started = std::time::Instant::now();
            let err = RequestFeatures::parse(body.as_bytes(), PrefixOptions::default()).expect_err(field);
            assert!(err.to_string().contains("nest deeper than 100 levels"), "{field}: {err}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1), "{field}: {:?}", started.elapsed());
        }
    }

    #[test]
    fn nesting_up_to_the_limit_parses_and_deep_values_are_opaque() {
        // The body's object is one level, `messages` two more, the message object a third.
        let deepest = MAX_JSON_DEPTH - 3;
        for field in ["prompt", "input", "content"] {
            let ok = nested(field, deepest, "\"hidden\"");
            let f = RequestFeatures::parse(ok.as_bytes(), PrefixOptions::default()).expect(field);
            assert_eq!(f.prompt_chars, 0, "{field}: text below {MAX_TEXT_LISTS} lists is opaque");
            let too_deep = nested(field, MAX_JSON_DEPTH, "\"hidden\"");
            assert!(RequestFeatures::parse(too_deep.as_bytes(), PrefixOptions::default()).is_err(), "{field}");
        }
        // Brackets inside strings, escaped quotes included, are text and not nesting.
        let brackets = format!(r#"{{"prompt":"\"{}"}}"#, "[{".repeat(5_000));
        assert_eq!(parse(&brackets).prompt_chars, 1 + 10_000);
    }

    #[test]
    fn nests_deeper_than_counts_arrays_and_objects_outside_strings() {
        assert!(!nests_deeper_than(br#"{"a":[{"b":[]}]}"#, 4));
        assert!(nests_deeper_than(br#"{"a":[{"b":[]}]}"#, 3));
        assert!(!nests_deeper_than(br#"{"a":"[[[[\"[[[[\\"}"#, 1));
        assert!(nests_deeper_than(br#"{"a":"\\","b":[[]]}"#, 2));
        assert!(!nests_deeper_than(b"]]]]{}", 1), "stray closers do not go below zero");
        // Found by the `request` fuzz target: a body ending in a backslash inside a string sliced past
        // its end (a panic on a client's body).
        for body in [&br#"{"a":"\"#[..], br#"{"a":"x\\\"#, br#"{"prompt":[["a"],["b\"#] {
            assert!(!nests_deeper_than(body, 3));
            assert!(RequestFeatures::parse(body, PrefixOptions::default()).is_err());
        }
    }

    #[test]
    fn every_openai_prompt_shape_yields_its_text() {
        let string = parse(r#"{"model":"m","prompt":"abcdefghijkl"}"#);
        let strings = parse(r#"{"model":"m","prompt":["abcdef","ghijkl"]}"#);
        let nested_strings = parse(r#"{"model":"m","input":[["abcdef"],["ghijkl"]]}"#);
        for f in [&strings, &nested_strings] {
            assert_eq!(f.prompt_chars, 12);
            assert_eq!(f.prefix_hashes, string.prefix_hashes);
        }
        assert!(!string.prefix_hashes.is_empty());
        for tokens in [r#"{"prompt":[1,2,3]}"#, r#"{"prompt":[[1,2],[3]]}"#, r#"{"input":[[[1]]]}"#] {
            assert_eq!(parse(tokens).prompt_chars, 0, "{tokens}");
        }
        // Content as parts, and parts one list deeper, still count; lists past the bound do not.
        let parts = parse(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"abc"},"de"]}]}"#);
        assert_eq!(parts.prompt_chars, 5);
        assert_eq!(parse(r#"{"messages":[{"role":"user","content":[[{"text":"abc"}]]}]}"#).prompt_chars, 3);
        assert_eq!(parse(r#"{"messages":[{"role":"user","content":[[[{"text":"abc"}]]]}]}"#).prompt_chars, 0);
    }

    #[test]
    fn huge_max_tokens_saturate_the_estimate() {
        // Wrapped to 0 in release builds: a request that claims u64::MAX tokens passed token limits free.
        let f = parse(r#"{"prompt":"abcd","max_tokens":18446744073709551615}"#);
        assert_eq!(f.estimated_tokens(16), u64::MAX);
        assert_eq!(parse(r#"{"prompt":"abcd"}"#).estimated_tokens(u64::MAX), u64::MAX);
    }

    #[test]
    fn request_fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/request");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            let body = std::fs::read(&path).expect("a corpus file");
            assert!(std::panic::catch_unwind(|| check_any_body(&body)).is_ok(), "{}", path.display());
            files += 1;
        }
        assert!(files > 0, "{} is empty", dir.display());
    }

    #[test]
    fn priority_parse_and_raise() {
        assert_eq!(Priority::parse("HIGH"), Some(Priority::High));
        assert_eq!(Priority::parse("x"), None);
        assert_eq!(Priority::parse("batch"), None, "clients cannot ask for the batch class");
        assert!(Priority::Batch > Priority::Low);
        assert_eq!(Priority::Low.raised(), Priority::Normal);
        assert_eq!(Priority::Urgent.raised(), Priority::Urgent);
    }

    /// Model, stream, include_usage, max_tokens and prompt characters of a read body.
    type Read = (Option<String>, bool, bool, Option<u64>, usize);

    /// What a body of `value` must read as, worked out from serde_json's tree: `None` where a member
    /// the gateway reads has the wrong type. (The tree cannot hold a duplicate member.)
    fn expected(value: &serde_json::Value) -> Option<Read> {
        use serde_json::Value;
        fn string(v: Option<&Value>) -> Option<Option<String>> {
            match v {
                None | Some(Value::Null) => Some(None),
                Some(Value::String(s)) => Some(Some(s.clone())),
                _ => None,
            }
        }
        fn whole(v: Option<&Value>) -> Option<Option<u64>> {
            match v {
                None | Some(Value::Null) => Some(None),
                Some(n) => n.as_u64().map(Some),
            }
        }
        fn chars(v: &Value, lists: usize) -> Option<usize> {
            match v {
                Value::String(s) => Some(s.chars().count()),
                Value::Array(items) if lists < MAX_TEXT_LISTS => items.iter().try_fold(0, |n, item| match item {
                    Value::Object(part) => Some(n + string(part.get("text"))?.map_or(0, |t| t.chars().count())),
                    other => Some(n + chars(other, lists + 1)?),
                }),
                _ => Some(0),
            }
        }
        let top = value.as_object()?;
        for key in ["user", "session_id", "instructions", "previous_response_id"] {
            string(top.get(key))?;
        }
        let stream = match top.get("stream") {
            None | Some(Value::Null) => false,
            Some(v) => v.as_bool()?,
        };
        let include_usage = match top.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(v) => v.as_bool()?,
            },
            Some(_) => return None,
        };
        let [max, completion, output] =
            ["max_tokens", "max_completion_tokens", "max_output_tokens"].map(|k| whole(top.get(k)));
        let mut text = top.get("instructions").and_then(Value::as_str).map_or(0, |s| s.chars().count());
        match top.get("messages") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for m in list {
                    let m = m.as_object()?;
                    string(m.get("role"))?;
                    text += m.get("content").map_or(Some(0), |c| chars(c, 0))?;
                }
            }
            Some(_) => return None,
        }
        for key in ["prompt", "input"] {
            text += top.get(key).map_or(Some(0), |v| chars(v, 0))?;
        }
        Some((string(top.get("model"))?, stream, include_usage, completion?.or(max?).or(output?), text))
    }

    /// Any JSON value, a few levels deep, its strings drawn to include escapes and non-ASCII text.
    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            "[1-9][0-9]{0,3}".prop_map(|n| Value::Number(n.parse::<u64>().unwrap().into())),
            Just(serde_json::json!(2.5)),
            "[a-z \"\\\n\t/é😀]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((prop_oneof!["text", "role", "[a-z]{1,3}"], inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Prompt text as a string or a part, inside 0 to 3 lists (the reader looks inside 2).
    fn any_text() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        (0usize..4, "[a-zé]{1,5}", any::<bool>()).prop_map(|(lists, text, part)| {
            let mut v = if part { serde_json::json!({ "text": text }) } else { serde_json::Value::String(text) };
            for _ in 0..lists {
                v = serde_json::Value::Array(vec![v, serde_json::Value::String("ab".into())]);
            }
            v
        })
    }

    /// A request body: each member the gateway reads present or not, most of the right type.
    fn any_body() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::{json, Value};
        let content = prop_oneof![any_text(), any_json()];
        let message = (prop_oneof![Just(json!("user")), Just(json!("system")), any_json()], content)
            .prop_map(|(role, content)| json!({"role": role, "content": content}));
        let members = (
            proptest::option::of(prop_oneof!["[a-z]{1,8}".prop_map(Value::String), any_json()]),
            proptest::option::of(any_json()),
            proptest::option::of(prop_oneof![
                Just(json!({"include_usage": true})),
                any_json().prop_map(|v| json!({ "include_usage": v })),
                any_json()
            ]),
            proptest::option::of(prop_oneof![(1u64..5000).prop_map(Value::from), any_json()]),
            proptest::option::of(prop_oneof![
                proptest::collection::vec(message, 0..4).prop_map(Value::Array),
                any_json()
            ]),
            proptest::option::of(prop_oneof![any_text(), any_json()]),
            proptest::option::of(any_json()),
        );
        members.prop_map(|(model, stream, options, max, messages, prompt, other)| {
            let mut body = serde_json::Map::new();
            for (key, value) in [
                ("model", model),
                ("stream", stream),
                ("stream_options", options),
                ("max_completion_tokens", max),
                ("messages", messages),
                ("prompt", prompt),
                ("other", other),
            ] {
                if let Some(v) = value {
                    body.insert(key.to_owned(), v);
                }
            }
            Value::Object(body)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The reader agrees with serde_json: on what a body reads as, and on whether a body cut or
        /// mangled at one byte is still JSON the gateway accepts.
        #[test]
        fn reads_what_serde_json_reads(value in any_body(), pretty in proptest::prelude::any::<bool>(),
                                       at in 0usize..4096, edit in 0usize..12, on_syntax in proptest::prelude::any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) };
            let body = text.expect("serializes").into_bytes();
            let got = RequestFeatures::parse(&body, PrefixOptions::default())
                .map(|f| (f.model, f.stream, f.include_usage, f.max_tokens, f.prompt_chars));
            proptest::prop_assert_eq!(got.ok(), expected(&value));

            // Half the edits land on the JSON's punctuation, where a lax reader would show.
            let mut mangled = body.clone();
            let syntax: Vec<usize> = (0..body.len()).filter(|&i| b"{}[],:\"".contains(&body[i])).collect();
            let at = if on_syntax { syntax[at % syntax.len()] } else { at % body.len() };
            match b"{}[],:\"\\ 0tn".get(edit) {
                Some(&b) => mangled[at] = b,
                None => drop(mangled.remove(at)),
            }
            check_any_body(&mangled);
            let ours = RequestFeatures::parse(&mangled, PrefixOptions::default());
            if let Ok(tree) = serde_json::from_slice::<serde_json::Value>(&mangled) {
                let duplicate = ours.as_ref().is_err_and(|e| e.to_string().contains("duplicate member"));
                if !duplicate {
                    proptest::prop_assert_eq!(ours.is_ok(), expected(&tree).is_some(), "{}", String::from_utf8_lossy(&mangled));
                }
            }
        }
    }

    #[test]
    fn a_member_read_twice_is_refused() {
        for body in [r#"{"model":"a","model":"b"}"#, r#"{"messages":[{"role":"user","role":"system"}]}"#] {
            let err = RequestFeatures::parse(body.as_bytes(), PrefixOptions::default()).expect_err(body);
            assert!(err.to_string().contains("duplicate member"), "{err}");
        }
        // Members the gateway does not read pass through as they are.
        assert!(RequestFeatures::parse(br#"{"temperature":1,"temperature":2}"#, PrefixOptions::default()).is_ok());
    }
}
