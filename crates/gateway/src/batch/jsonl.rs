//! Validation of a batch's input file (pure: bytes in, lines or errors out) and the order lines run in.
//!
//! Each line is `{"custom_id": "...", "method": "POST", "url": "<the batch's endpoint>", "body": {...}}`.
//! A file that breaks any rule fails the batch with OpenAI's `errors` list naming the line (1-based)
//! and the reason; the list keeps the first [`MAX_ERRORS`] errors. Blank lines are skipped.
//!
//! Run order: lines sorted by model, then by the chained hashes of their prompt's chunks (the prefix
//! hashes routing uses), then by input position. Lines that share a prompt prefix end up next to each
//! other, so they reach workers while that prefix is still in their KV cache.

use super::store::NewLine;
use gateway_core::request::PrefixOptions;
use gateway_core::RequestFeatures;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashSet;

/// Errors kept in a failed batch's `errors` list at most.
pub const MAX_ERRORS: usize = 100;

/// Longest `custom_id` accepted, bytes.
pub const MAX_CUSTOM_ID: usize = 512;

/// The endpoints a batch may target.
pub const ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// One validation error (an entry of OpenAI's `errors.data`).
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line number, when the error is about one line.
    pub line: Option<usize>,
    /// Machine-readable reason.
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
    /// The field at fault, when one is.
    pub param: Option<&'static str>,
}

impl LineError {
    fn at(line: usize, code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { line: Some(line), code, message: message.into(), param }
    }

    /// OpenAI's batch error object.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code, "message": self.message, "param": self.param, "line": self.line})
    }
}

/// OpenAI's `errors` object for a list of errors.
pub fn errors_json(errors: &[LineError]) -> Value {
    json!({"object": "list", "data": errors.iter().map(LineError::to_json).collect::<Vec<_>>()})
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default)]
    custom_id: Option<Value>,
    #[serde(default)]
    method: Option<Value>,
    #[serde(default)]
    url: Option<Value>,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

/// Validates the whole input `text` for `endpoint`; at most `max_lines` lines. Returns the lines with
/// their run order, or the errors (at most [`MAX_ERRORS`]).
pub fn validate(text: &[u8], endpoint: &str, max_lines: usize) -> Result<Vec<NewLine>, Vec<LineError>> {
    let mut errors = Vec::new();
    let push = |errors: &mut Vec<LineError>, e| {
        if errors.len() < MAX_ERRORS {
            errors.push(e);
        }
    };
    let mut seen = HashSet::new();
    let mut lines: Vec<Parsed> = Vec::new();
    let mut count = 0usize;
    for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        count += 1;
        if count > max_lines {
            errors.truncate(MAX_ERRORS - 1);
            errors.push(LineError {
                line: Some(n),
                code: "too_many_lines",
                message: format!("the input file has more than batch.max_lines = {max_lines} lines"),
                param: None,
            });
            return Err(errors);
        }
        match parse_line(raw, n, endpoint) {
            Ok((custom_id, body, model, hashes)) => {
                if seen.insert(custom_id.clone()) {
                    lines.push((custom_id, body, model, hashes));
                } else {
                    push(
                        &mut errors,
                        LineError::at(n, "duplicate_custom_id", Some("custom_id"), {
                            format!("custom_id {custom_id:?} is used by an earlier line; each must be unique")
                        }),
                    );
                }
            }
            Err(e) => push(&mut errors, e),
        }
    }
    if count == 0 {
        errors.push(LineError {
            line: None,
            code: "empty_file",
            message: "the input file has no lines".into(),
            param: None,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by(|&a, &b| (&lines[a].2, &lines[a].3, a).cmp(&(&lines[b].2, &lines[b].3, b)));
    let mut ord = vec![0i64; lines.len()];
    for (rank, &idx) in order.iter().enumerate() {
        ord[idx] = rank as i64;
    }
    Ok(lines.into_iter().zip(ord).map(|((custom_id, body, _, _), ord)| NewLine { custom_id, ord, body }).collect())
}

type Parsed = (String, Vec<u8>, Option<String>, Vec<u64>);

fn parse_line(raw: &[u8], n: usize, endpoint: &str) -> Result<Parsed, LineError> {
    let wire: Wire<'_> = serde_json::from_slice(raw)
        .map_err(|e| LineError::at(n, "invalid_json_line", None, format!("line {n} is not a JSON object: {e}")))?;
    let custom_id = match wire.custom_id {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_CUSTOM_ID => s,
        Some(Value::String(s)) if !s.is_empty() => {
            return Err(LineError::at(
                n,
                "invalid_custom_id",
                Some("custom_id"),
                format!("custom_id is longer than {MAX_CUSTOM_ID} bytes ({})", s.len()),
            ))
        }
        _ => {
            return Err(LineError::at(
                n,
                "missing_custom_id",
                Some("custom_id"),
                "custom_id must be a non-empty string",
            ))
        }
    };
    match &wire.method {
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        _ => return Err(LineError::at(n, "invalid_method", Some("method"), "method must be \"POST\"")),
    }
    match &wire.url {
        Some(Value::String(u)) if u == endpoint => {}
        Some(Value::String(u)) => {
            return Err(LineError::at(
                n,
                "mismatched_endpoint",
                Some("url"),
                format!("url {u:?} does not match the batch's endpoint {endpoint:?}"),
            ))
        }
        _ => return Err(LineError::at(n, "invalid_url", Some("url"), "url must be a string")),
    }
    let body = wire
        .body
        .filter(|b| b.get().trim_start().starts_with('{'))
        .ok_or_else(|| LineError::at(n, "invalid_body", Some("body"), "body must be a JSON object"))?;
    let features = RequestFeatures::parse(body.get().as_bytes(), PrefixOptions::default())
        .map_err(|e| LineError::at(n, "invalid_body", Some("body"), format!("body is not a valid request: {e}")))?;
    if features.stream {
        return Err(LineError::at(n, "stream_unsupported", Some("body.stream"), "batch lines cannot stream"));
    }
    Ok((custom_id, body.get().as_bytes().to_vec(), features.model, features.prefix_hashes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "/v1/chat/completions";

    fn line(id: &str, model: &str, content: &str) -> String {
        json!({"custom_id": id, "method": "POST", "url": EP,
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}})
        .to_string()
    }

    #[test]
    fn a_good_file_validates_and_runs_by_model_then_shared_prefix() {
        let shared = "x".repeat(300);
        let text = [
            line("a", "m2", "hello"),
            line("b", "m1", &format!("{shared} one")),
            String::new(),
            line("c", "m1", "something else entirely"),
            line("d", "m1", &format!("{shared} two")),
        ]
        .join("\n");
        let lines = validate(text.as_bytes(), EP, 10).expect("valid");
        let ids: Vec<_> = lines.iter().map(|l| l.custom_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "c", "d"], "kept in input order");
        let mut by_ord: Vec<_> = lines.iter().map(|l| (l.ord, l.custom_id.as_str())).collect();
        by_ord.sort();
        let run: Vec<_> = by_ord.iter().map(|(_, id)| *id).collect();
        assert_eq!(run[3], "a", "model m2 runs after m1");
        let pos = |id| run.iter().position(|r| *r == id).unwrap_or(9);
        assert_eq!(pos("b").abs_diff(pos("d")), 1, "lines sharing a prefix run next to each other: {run:?}");
    }

    #[test]
    fn every_broken_rule_is_named_with_its_line() {
        let text = [
            "not json".to_string(),
            json!({"method": "POST", "url": EP, "body": {}}).to_string(),
            json!({"custom_id": "x", "method": "GET", "url": EP, "body": {}}).to_string(),
            json!({"custom_id": "y", "method": "POST", "url": "/v1/embeddings", "body": {}}).to_string(),
            json!({"custom_id": "z", "method": "POST", "url": EP, "body": [1]}).to_string(),
            json!({"custom_id": "s", "method": "POST", "url": EP, "body": {"stream": true}}).to_string(),
            line("dup", "m", "a"),
            line("dup", "m", "b"),
        ]
        .join("\n");
        let errors = validate(text.as_bytes(), EP, 100).expect_err("invalid");
        let got: Vec<_> = errors.iter().map(|e| (e.line.unwrap_or(0), e.code)).collect();
        assert_eq!(
            got,
            vec![
                (1, "invalid_json_line"),
                (2, "missing_custom_id"),
                (3, "invalid_method"),
                (4, "mismatched_endpoint"),
                (5, "invalid_body"),
                (6, "stream_unsupported"),
                (8, "duplicate_custom_id"),
            ]
        );
        assert_eq!(errors_json(&errors)["data"][0]["line"], 1);
    }

    #[test]
    fn limits_hold() {
        let text = (0..5).map(|i| line(&i.to_string(), "m", "hi")).collect::<Vec<_>>().join("\n");
        let errors = validate(text.as_bytes(), EP, 4).expect_err("too many");
        assert_eq!(errors.last().map(|e| e.code), Some("too_many_lines"));
        assert_eq!(validate(b"\n \n", EP, 4).expect_err("empty")[0].code, "empty_file");
        let bad = "x\n".repeat(500);
        assert_eq!(validate(bad.as_bytes(), EP, 1000).expect_err("bad").len(), MAX_ERRORS, "errors are bounded");
    }
}
