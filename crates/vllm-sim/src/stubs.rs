//! vLLM's endpoints beyond generation, answered in their shapes without the engine: rerank, score,
//! tokenize, detokenize, pooling, audio transcriptions (multipart), and the documents other engines
//! state their concurrency in (llama.cpp's `/props`, TGI's `/info`, SGLang's `/get_server_info`), so the
//! gateway's routing and capacity reading are tested offline. Each checks the model like vLLM (404).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::openai::{check_model, parse_object};
use crate::server::{unix_now, SimState};
use crate::tokenizer::{count_tokens, fnv1a};

fn checked(s: &SimState, body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let map = parse_object(body)?;
    check_model(&map, &s.config().model)?;
    Ok(map)
}

/// A score in 0..1 that depends only on the texts.
fn score(seed: u64, a: &str, b: &str) -> f64 {
    (fnv1a(fnv1a(seed, a.as_bytes()), b.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64
}

fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

fn answer(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/rerank` (and `/rerank`, `/v2/rerank`): `query` against `documents`, best first.
pub async fn rerank(State(s): State<SimState>, body: Bytes) -> Response {
    answer(checked(&s, &body).map(|map| {
        let query = text_of(map.get("query"));
        let docs: Vec<String> = map
            .get("documents")
            .and_then(Value::as_array)
            .map(|d| d.iter().map(|x| text_of(Some(x))).collect())
            .unwrap_or_default();
        let mut results: Vec<(usize, f64)> =
            docs.iter().enumerate().map(|(i, d)| (i, score(s.config().seed, &query, d))).collect();
        results.sort_by(|a, b| b.1.total_cmp(&a.1));
        let tokens: u32 = docs.iter().map(|d| count_tokens(d.as_bytes())).sum::<u32>() + count_tokens(query.as_bytes());
        json!({
            "id": format!("rerank-{}", unix_now()), "model": s.config().model, "usage": {"total_tokens": tokens},
            "results": results.iter().map(|(i, sc)| json!({"index": i, "document": {"text": docs[*i]}, "relevance_score": sc})).collect::<Vec<_>>(),
        })
    }))
}

/// `POST /v1/score` (and `/score`): `text_1` against each of `text_2`.
pub async fn score_texts(State(s): State<SimState>, body: Bytes) -> Response {
    answer(checked(&s, &body).map(|map| {
        let a = text_of(map.get("text_1"));
        let bs: Vec<String> = match map.get("text_2") {
            Some(Value::Array(v)) => v.iter().map(|x| text_of(Some(x))).collect(),
            other => vec![text_of(other)],
        };
        let tokens: u32 = bs.iter().map(|b| count_tokens(a.as_bytes()) + count_tokens(b.as_bytes())).sum();
        json!({
            "id": format!("score-{}", unix_now()), "object": "list", "created": unix_now(), "model": s.config().model,
            "data": bs.iter().enumerate().map(|(i, b)| json!({"index": i, "object": "score", "score": score(s.config().seed, &a, b)})).collect::<Vec<_>>(),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        })
    }))
}

/// `POST /tokenize`: one pseudo-token per 4 bytes of `prompt` (or of the messages' text).
pub async fn tokenize(State(s): State<SimState>, body: Bytes) -> Response {
    answer(checked(&s, &body).map(|map| {
        let text = match map.get("prompt") {
            Some(p) => text_of(Some(p)),
            None => text_of(map.get("messages")),
        };
        let tokens: Vec<u32> = text.as_bytes().chunks(4).map(|c| fnv1a(0, c) as u32 & 0xffff).collect();
        json!({"count": tokens.len(), "max_model_len": s.config().max_model_len, "tokens": tokens})
    }))
}

/// `POST /detokenize`: a placeholder text of the tokens' length.
pub async fn detokenize(State(s): State<SimState>, body: Bytes) -> Response {
    answer(checked(&s, &body).map(|map| {
        let n = map.get("tokens").and_then(Value::as_array).map_or(0, Vec::len);
        json!({"prompt": "tok ".repeat(n)})
    }))
}

/// `POST /pooling`: one small vector per request.
pub async fn pooling(State(s): State<SimState>, body: Bytes) -> Response {
    answer(checked(&s, &body).map(|map| {
        let text = text_of(map.get("input"));
        let h = fnv1a(s.config().seed, text.as_bytes());
        let data: Vec<f64> = (0..4).map(|i| ((h >> (i * 16)) & 0xffff) as f64 / 65535.0).collect();
        let tokens = count_tokens(text.as_bytes());
        json!({
            "id": format!("pool-{}", unix_now()), "object": "list", "created": unix_now(), "model": s.config().model,
            "data": [{"index": 0, "object": "pooling", "data": data}],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        })
    }))
}

/// The value of form field `name` in a multipart body (a crude reader: enough for a simulator).
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let needle = format!("name=\"{name}\"");
    let text = String::from_utf8_lossy(body);
    let at = text.find(&needle)?;
    let rest = &text[at..];
    let start = rest.find("\r\n\r\n")? + 4;
    let end = rest[start..].find("\r\n")?;
    Some(rest[start..start + end].to_owned())
}

/// `POST /v1/audio/transcriptions`: multipart with a `file` and a `model` field.
pub async fn transcriptions(State(s): State<SimState>, body: Bytes) -> Response {
    let model = form_field(&body, "model");
    match model {
        Some(m) if m != s.config().model => ApiError::model_not_found(&m).into_response(),
        _ => Json(json!({"text": "simulated transcription", "usage": {"type": "duration", "seconds": 1}}))
            .into_response(),
    }
}

/// `GET /props` (llama.cpp dialect): `total_slots` is `--max-num-seqs`.
pub async fn props(State(s): State<SimState>) -> Json<Value> {
    let c = s.config();
    Json(
        json!({"total_slots": c.max_num_seqs, "model_path": c.model, "default_generation_settings": {"n_ctx": c.max_model_len}}),
    )
}

/// `GET /info` (TGI dialect): the batch is `--max-num-seqs`, the router's bound adds the queue.
pub async fn tgi_info(State(s): State<SimState>) -> Json<Value> {
    let c = s.config();
    Json(
        json!({"model_id": c.model, "max_batch_size": c.max_num_seqs, "max_concurrent_requests": c.max_num_seqs + c.max_num_queued}),
    )
}

/// `GET /get_server_info` (SGLang dialect): `max_running_requests` is `--max-num-seqs`.
pub async fn sglang_info(State(s): State<SimState>) -> Json<Value> {
    let c = s.config();
    Json(json!({"model_path": c.model, "max_running_requests": c.max_num_seqs}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_form_field() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm1\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n";
        assert_eq!(form_field(body, "model").as_deref(), Some("m1"));
        assert_eq!(form_field(body, "language"), None);
    }
}
