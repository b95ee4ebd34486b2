//! What the gateway reads from a request body: only the fields routing, admission and limits need.
//!
//! The body itself is forwarded byte for byte; this parse borrows from it and copies out just a few
//! small fields. Message `content` may be a string or a list of parts (`[{"type":"text","text":..}]`).

use crate::prefix::{hash_bytes, PrefixHasher};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

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

/// How the prompt is cut into chunks for prefix hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixOptions {
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Chunks hashed at most (bounds the cost of huge prompts).
    pub max_chunks: usize,
}

impl Default for PrefixOptions {
    fn default() -> Self {
        Self { chunk_bytes: 128, max_chunks: 128 }
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
    /// Session key for consistent hashing: `X-Session-Id` header (set by the gateway), else the body's
    /// `session_id`, else `user`, else a hash of the first system and user messages.
    pub session_key: Option<u64>,
    /// Admission priority (set by the gateway from `X-Priority` or the API key).
    pub priority: Priority,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
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
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// Text of a `content` or `prompt` value: a string, a list of parts or strings; token-id lists give none.
fn visit_text(raw: &RawValue, f: &mut dyn FnMut(&str)) -> Result<(), serde_json::Error> {
    let s = raw.get().trim_start();
    if s.starts_with('"') {
        let text: Cow<'_, str> = serde_json::from_str(raw.get())?;
        f(&text);
    } else if s.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(raw.get())?;
        for item in items {
            let t = item.get().trim_start();
            if t.starts_with('{') {
                let part: Part<'_> = serde_json::from_str(item.get())?;
                if let Some(text) = part.text {
                    f(&text);
                }
            } else if t.starts_with('"') || t.starts_with('[') {
                visit_text(item, f)?;
            }
        }
    }
    Ok(())
}

impl RequestFeatures {
    /// Parses the routing-relevant fields of a JSON body; the error is the JSON parser's reason.
    pub fn parse(body: &[u8], opts: PrefixOptions) -> Result<Self, serde_json::Error> {
        // serde's derive also accepts a JSON array for a struct; the API takes objects only.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(serde::de::Error::custom("the request body must be a JSON object"));
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
                    "system" | "developer" if first_system.is_none() => Some(first_system.insert(String::new())),
                    "user" if first_user.is_none() => Some(first_user.insert(String::new())),
                    _ => None,
                };
                let mut slot = slot;
                if let Some(content) = msg.content {
                    visit_text(content, &mut |t| {
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
        for raw in [wire.prompt, wire.input].into_iter().flatten() {
            let mut h = 0u64;
            visit_text(raw, &mut |t| {
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
            max_tokens: wire.max_completion_tokens.or(wire.max_tokens),
            prompt_chars,
            prefix_hashes: hasher.finish(),
            session_key,
            priority: Priority::Normal,
        })
    }

    /// Sets the session key from an `X-Session-Id` header, which outranks the body.
    pub fn set_session_header(&mut self, session: &str) {
        self.session_key = Some(hash_bytes(1, session.as_bytes()));
    }

    /// Tokens this request may cost before its real usage is known: prompt chars / 4 + `max_tokens`.
    pub fn estimated_tokens(&self, default_max_tokens: u64) -> u64 {
        (self.prompt_chars as u64).div_ceil(4) + self.max_tokens.unwrap_or(default_max_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> RequestFeatures {
        RequestFeatures::parse(body.as_bytes(), PrefixOptions { chunk_bytes: 8, max_chunks: 64 }).expect("parses")
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
