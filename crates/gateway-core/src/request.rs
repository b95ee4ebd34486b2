//! What the gateway reads from a request body: only the fields routing, admission and limits need.
//!
//! The body itself is forwarded byte for byte; this parse borrows from it and copies out just a few
//! small fields. Message `content` may be a string or a list of parts (`[{"type":"text","text":..}]`).
//!
//! Nothing here recurses once per level of the client's JSON: a body that nests arrays or objects
//! deeper than [`MAX_JSON_DEPTH`] is refused by one flat scan before anything parses it, serde_json
//! skips unknown fields and raw values without recursion, and prompt text is looked for only within
//! [`MAX_TEXT_LISTS`] levels of lists (deeper values are opaque: they count as no text).

use crate::prefix::{hash_bytes, PrefixHasher};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Deepest nesting of arrays and objects a request body may have. OpenAI's request shapes need a few
/// levels (tool and response schemas a few dozen at most); a deeper body is refused with a 400 rather
/// than walked by the gateway or handed to a worker, whose own parser may not bound its recursion.
pub const MAX_JSON_DEPTH: usize = 100;

/// Levels of lists searched for prompt text in `prompt`, `input` and `content`: enough for a string,
/// a list of strings or parts, and a list of such lists. Token ids and anything deeper give no text.
pub const MAX_TEXT_LISTS: usize = 2;

/// Whether arrays and objects in `body` nest deeper than `limit`.
///
/// One pass over the bytes with no recursion and no allocation; brackets inside strings do not count.
/// Meant for bodies that are then parsed as JSON: on malformed input the answer is only a guess, and
/// the parser reports the real error.
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

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed")]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    session_id: Option<Cow<'a, str>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    instructions: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    previous_response_id: Option<Cow<'a, str>>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed")]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed")]
    text: Option<Cow<'a, str>>,
}

/// A string field borrowed from the body when it has no escapes. serde's `borrow` reaches only a bare
/// `Cow`, so an `Option<Cow<str>>` would copy every string it reads (two roles per chat request).
fn borrowed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(s)))
        }
        fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(s.to_owned())))
        }
        fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(s)))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    d.deserialize_option(Text)
}

/// Text of a `content`, `prompt` or `input` value: a string, or lists (at most [`MAX_TEXT_LISTS`]
/// deep) of strings and `{"text":..}` parts; token ids and deeper lists give none.
///
/// `lists` is how many lists enclose `raw`. Each level re-reads only its own items, and serde_json
/// skips the contents of a raw value without recursion, so the cost stays linear in the body.
fn visit_text(raw: &RawValue, lists: usize, f: &mut dyn FnMut(&str)) -> Result<(), serde_json::Error> {
    let s = raw.get().trim();
    if s.starts_with('"') {
        // A string without escapes is its own text (the raw value is valid JSON): no second parse.
        match s.get(1..s.len() - 1).filter(|inner| memchr::memchr(b'\\', inner.as_bytes()).is_none()) {
            Some(inner) => f(inner),
            None => f(&serde_json::from_str::<Cow<'_, str>>(s)?),
        }
    } else if s.starts_with('[') && lists < MAX_TEXT_LISTS {
        let items: Vec<&RawValue> = serde_json::from_str(raw.get())?;
        for item in items {
            if item.get().trim_start().starts_with('{') {
                let part: Part<'_> = serde_json::from_str(item.get())?;
                if let Some(text) = part.text {
                    f(&text);
                }
            } else {
                visit_text(item, lists + 1, f)?;
            }
        }
    }
    Ok(())
}

impl RequestFeatures {
    /// Parses the routing-relevant fields of a JSON body; the error is the JSON parser's reason, or
    /// that the body nests deeper than [`MAX_JSON_DEPTH`].
    pub fn parse(body: &[u8], opts: PrefixOptions) -> Result<Self, serde_json::Error> {
        // serde's derive also accepts a JSON array for a struct; the API takes objects only.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(serde::de::Error::custom("the request body must be a JSON object"));
        }
        if nests_deeper_than(body, MAX_JSON_DEPTH) {
            return Err(serde::de::Error::custom(format_args!(
                "arrays and objects nest deeper than {MAX_JSON_DEPTH} levels, the gateway's limit"
            )));
        }
        let wire: Wire<'_> = serde_json::from_slice(body)?;
        let model = wire.model.as_deref().unwrap_or("");
        let mut hasher = PrefixHasher::new(model, opts.chunk_bytes, opts.max_chunks);
        let mut prompt_chars = 0usize;
        let mut affinity: Option<u64> = None;
        let mut feed = |text: &str, hasher: &mut PrefixHasher| {
            prompt_chars += text.chars().count();
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
                    visit_text(content, 0, &mut |t| {
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
            visit_text(raw, 0, &mut |t| {
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
            include_usage: wire.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
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
/// what nests too deep, and bounds what it returns. Run by the `request` fuzz target (`fuzz/`) and by
/// the test replaying its corpus.
#[cfg(any(test, fuzzing))]
pub fn check_any_body(body: &[u8]) {
    let opts = PrefixOptions { chunk_bytes: 16, max_chunks: 8, ..PrefixOptions::default() };
    let parsed = RequestFeatures::parse(body, opts);
    if nests_deeper_than(body, MAX_JSON_DEPTH) {
        assert!(parsed.is_err(), "a body nested deeper than the limit was accepted");
    }
    if let Ok(f) = parsed {
        assert!(f.prefix_hashes.len() <= opts.max_chunks);
        assert!(f.prompt_chars <= body.len(), "{} chars from {} bytes", f.prompt_chars, body.len());
        assert!(f.estimated_tokens(u64::MAX) >= f.max_tokens.unwrap_or(u64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_fields_are_borrowed_from_the_body_unless_escaped() {
        let m: Message<'_> = serde_json::from_str(r#"{"role":"user"}"#).unwrap();
        assert!(matches!(m.role, Some(Cow::Borrowed("user"))));
        let m: Message<'_> = serde_json::from_str(r#"{"role":"us\u0065r"}"#).unwrap();
        assert!(matches!(m.role, Some(Cow::Owned(ref r)) if r == "user"));
        let m: Message<'_> = serde_json::from_str(r#"{"role":null}"#).unwrap();
        assert!(m.role.is_none());
        let err = serde_json::from_str::<Message<'_>>(r#"{"role":5}"#).err().unwrap().to_string();
        assert!(err.contains("expected a string"), "{err}");
    }

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
}
