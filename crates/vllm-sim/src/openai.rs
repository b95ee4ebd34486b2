//! The OpenAI wire format as vLLM speaks it: parsing generation and embedding requests (leniently where
//! vLLM is lenient, with vLLM's 400s where it is strict) and writing response bodies and SSE chunks. Pure:
//! bytes in, bytes out. Chunks are written from pre-rendered prefixes so a token costs one small copy.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::metrics::FinishReason;
use crate::tokenizer::chat_prompt;

/// Which generation endpoint a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// The parts of a generation request the simulator acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenRequest {
    /// Prompt bytes as the engine tokenizes them (chat messages rendered through a template).
    pub prompt: Vec<u8>,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u32>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

pub(crate) fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("The request body must be a JSON object.")),
        Err(e) => Err(ApiError::bad_request(format!("JSON decode error: {e}"))),
    }
}

/// 404 unless `model` is absent or the served model.
pub(crate) fn check_model(map: &serde_json::Map<String, Value>, served: &str) -> Result<(), ApiError> {
    match map.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == served => Ok(()),
        Some(Value::String(m)) => Err(ApiError::model_not_found(m)),
        Some(_) => Err(ApiError::bad_request("`model` must be a string.")),
    }
}

/// Parse a chat or completions body, checking the model against `served`.
pub fn parse_generation(endpoint: Endpoint, body: &[u8], served: &str) -> Result<GenRequest, ApiError> {
    let map = parse_object(body)?;
    check_model(&map, served)?;
    let prompt = match endpoint {
        Endpoint::Chat => chat_prompt_bytes(map.get("messages"))?,
        Endpoint::Completions => input_bytes(map.get("prompt"), "prompt")?,
    };
    let max_tokens = match map.get("max_completion_tokens").filter(|v| !v.is_null()).or(map.get("max_tokens")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            _ => return Err(ApiError::bad_request(format!("max_tokens must be at least 1, got {v}."))),
        },
    };
    let stream = match map.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("`stream` must be a boolean.")),
    };
    let options = map.get("stream_options").filter(|v| !v.is_null());
    if options.is_some() && !stream {
        return Err(ApiError::bad_request("Stream options can only be defined when `stream=True`."));
    }
    let include_usage = options.and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    Ok(GenRequest { prompt, max_tokens, stream, include_usage })
}

/// Render `messages` (content a string, null, or a list of parts whose `text` parts count) into prompt bytes.
fn chat_prompt_bytes(messages: Option<&Value>) -> Result<Vec<u8>, ApiError> {
    let Some(Value::Array(messages)) = messages else {
        return Err(ApiError::bad_request("`messages` must be a list of messages."));
    };
    let mut rendered = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("Each message needs a `role`."))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
            }
            Some(_) => return Err(ApiError::bad_request("Message `content` must be a string or a list of parts.")),
        };
        rendered.push((role, content));
    }
    Ok(chat_prompt(rendered).into_bytes())
}

/// A completions `prompt` or embeddings `input`: a string, a list of strings, a list of token ids or a list of
/// lists of token ids. Lists are joined into one prompt; token ids become 4 bytes each (one pseudo-token).
fn input_bytes(v: Option<&Value>, field: &str) -> Result<Vec<u8>, ApiError> {
    let bad = || ApiError::bad_request(format!("`{field}` must be a string, a list of strings or token ids."));
    let mut out = Vec::new();
    let mut push = |v: &Value| -> Result<(), ApiError> {
        match v {
            Value::String(s) => out.extend_from_slice(s.as_bytes()),
            Value::Number(n) => out.extend_from_slice(&(n.as_u64().ok_or_else(bad)? as u32).to_le_bytes()),
            Value::Array(ids) => {
                for id in ids {
                    out.extend_from_slice(&(id.as_u64().ok_or_else(bad)? as u32).to_le_bytes());
                }
            }
            _ => return Err(bad()),
        }
        Ok(())
    };
    match v {
        Some(Value::Array(items)) => items.iter().try_for_each(&mut push)?,
        Some(v @ Value::String(_)) => push(v)?,
        _ => return Err(bad()),
    }
    Ok(out)
}

/// Parse an embeddings body: returns one byte string per input.
pub fn parse_embeddings(body: &[u8], served: &str) -> Result<Vec<Vec<u8>>, ApiError> {
    let map = parse_object(body)?;
    check_model(&map, served)?;
    match map.get("input") {
        Some(Value::Array(items)) if items.iter().all(|i| i.is_string() || i.is_array()) => {
            items.iter().map(|i| input_bytes(Some(&Value::Array(vec![i.clone()])), "input")).collect()
        }
        v => Ok(vec![input_bytes(v, "input")?]),
    }
}

/// Token counts reported in `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// `usage` in vLLM's field order.
#[derive(Serialize)]
struct UsageJson {
    prompt_tokens: u32,
    total_tokens: u32,
    completion_tokens: u32,
    prompt_tokens_details: CachedJson,
}

#[derive(Serialize)]
struct CachedJson {
    cached_tokens: u32,
}

impl Usage {
    fn to_json(self) -> UsageJson {
        UsageJson {
            prompt_tokens: self.prompt_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
            completion_tokens: self.completion_tokens,
            prompt_tokens_details: CachedJson { cached_tokens: self.cached_tokens },
        }
    }
}

/// A response or usage-chunk envelope in vLLM's field order.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Value>,
    usage: UsageJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<()>,
}

/// Writes one request's bodies and chunks with its id, creation time and model.
#[derive(Clone, Debug)]
pub struct Formatter {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,` rendered once.
    chunk_head: String,
}

impl Formatter {
    /// A formatter for one request; `id_hex` becomes `chatcmpl-<hex>` or `cmpl-<hex>`.
    pub fn new(endpoint: Endpoint, id_hex: &str, created: u64, model: &str) -> Self {
        let (prefix, object) = match endpoint {
            Endpoint::Chat => ("chatcmpl", "chat.completion.chunk"),
            Endpoint::Completions => ("cmpl", "text_completion"),
        };
        let id = format!("{prefix}-{id_hex}");
        // Field order as vLLM writes it: id, object, created, model, choices.
        let chunk_head = format!(
            "data: {{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{},\"choices\":[{{\"index\":0,",
            Value::String(id.clone()),
            Value::String(model.to_owned())
        );
        Self { endpoint, id, created, model: model.to_owned(), chunk_head }
    }

    fn chunk(&self, body: &str, finish: Option<FinishReason>) -> Bytes {
        let finish = finish.map_or("null".to_owned(), |f| format!("\"{}\"", f.as_str()));
        Bytes::from(format!(
            "{}{body},\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}]}}\n\n",
            self.chunk_head
        ))
    }

    /// The first chat chunk: `delta: {"role":"assistant","content":""}`.
    pub fn role_chunk(&self) -> Bytes {
        self.chunk("\"delta\":{\"role\":\"assistant\",\"content\":\"\"}", None)
    }

    /// One token's chunk.
    pub fn token_chunk(&self, text: &str) -> Bytes {
        let text = Value::String(text.to_owned()).to_string();
        match self.endpoint {
            Endpoint::Chat => self.chunk(&format!("\"delta\":{{\"content\":{text}}}"), None),
            Endpoint::Completions => self.chunk(&format!("\"text\":{text}"), None),
        }
    }

    /// The chunk carrying `finish_reason` (empty content).
    pub fn finish_chunk(&self, reason: FinishReason) -> Bytes {
        match self.endpoint {
            Endpoint::Chat => self.chunk("\"delta\":{\"content\":\"\"}", Some(reason)),
            Endpoint::Completions => self.chunk("\"text\":\"\"", Some(reason)),
        }
    }

    /// The final usage chunk (`"choices":[]`), sent when `stream_options.include_usage` is true.
    pub fn usage_chunk(&self, usage: Usage) -> Bytes {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let env = self.envelope(object, Vec::new(), usage, false);
        let v = serde_json::to_string(&env).unwrap_or_default();
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// The stream's terminator.
    pub fn done() -> Bytes {
        Bytes::from_static(b"data: [DONE]\n\n")
    }

    fn envelope(&self, object: &'static str, choices: Vec<Value>, usage: Usage, full: bool) -> Envelope<'_> {
        Envelope {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage: usage.to_json(),
            prompt_logprobs: full.then_some(()),
        }
    }

    /// A whole non-streaming response body (serialized JSON).
    pub fn full_body(&self, text: &str, reason: FinishReason, usage: Usage) -> String {
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": null, "finish_reason": reason.as_str(), "stop_reason": null}),
            ),
            Endpoint::Completions => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str(),
                    "stop_reason": null}),
            ),
        };
        serde_json::to_string(&self.envelope(object, vec![choice], usage, true)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts_and_rejects_stream_options_without_stream() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
            "max_tokens":5}"#;
        let r = parse_generation(Endpoint::Chat, body, "m").unwrap();
        assert_eq!(r.max_tokens, Some(5));
        assert!(String::from_utf8(r.prompt).unwrap().contains("<|user|>\nhi"));
        let e = parse_generation(Endpoint::Chat, br#"{"messages":[],"stream_options":{}}"#, "m").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_generation(Endpoint::Completions, br#"{"model":"x","prompt":"a"}"#, "m").unwrap_err();
        assert_eq!(e.status, 404);
        let r = parse_generation(Endpoint::Completions, br#"{"prompt":["ab","cd"]}"#, "m").unwrap();
        assert_eq!(r.prompt, b"abcd");
    }

    #[test]
    fn chunks_are_valid_json() {
        let f = Formatter::new(Endpoint::Chat, "abc", 1, "m\"x");
        for c in [
            f.role_chunk(),
            f.token_chunk(" \"q\""),
            f.finish_chunk(FinishReason::Length),
            f.usage_chunk(Usage::default()),
        ] {
            let s = std::str::from_utf8(&c).unwrap();
            let v: Value = serde_json::from_str(s.strip_prefix("data: ").unwrap().trim_end()).unwrap();
            assert_eq!(v["id"], "chatcmpl-abc");
            assert_eq!(v["model"], "m\"x");
        }
    }
}
