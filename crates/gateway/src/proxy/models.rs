//! Aliases on the request path: a client names a model by an alias (`[[models]] aliases`) and the
//! worker must receive the served name, so the body's top-level `model` is rewritten.
//!
//! The body was already parsed once (`RequestFeatures::parse`), which proved it a JSON object no
//! deeper than `MAX_JSON_DEPTH`. Rather than parse it again into a tree and serialize it whole, one
//! flat scan finds the bytes of the top-level `"model"` string and only those are replaced: the rest of
//! the body is forwarded byte for byte, as without an alias. Only a key spelled with escapes
//! (`"mod\u0065l"`) misses the scan; then, and only then, the body is rebuilt through `serde_json`.

use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError};
use std::ops::Range;

/// `body` with its top-level `model` set to `served`.
pub fn rewrite_model(body: &Bytes, served: &str) -> Result<Bytes, GatewayError> {
    let value = serde_json::to_vec(served).map_err(|e| internal(&e))?;
    if let Some(span) = model_value_span(body) {
        let mut out = Vec::with_capacity(body.len() - span.len() + value.len());
        out.extend_from_slice(&body[..span.start]);
        out.extend_from_slice(&value);
        out.extend_from_slice(&body[span.end..]);
        return Ok(Bytes::from(out));
    }
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        GatewayError::new(ErrorKind::InvalidJson, format!("invalid JSON body: {}", gateway_core::echo(&e.to_string())))
    })?;
    map.insert("model".into(), serde_json::Value::String(served.into()));
    serde_json::to_vec(&map).map(Bytes::from).map_err(|e| internal(&e))
}

fn internal(e: &serde_json::Error) -> GatewayError {
    GatewayError::new(ErrorKind::Internal, format!("could not rewrite the model name: {e}"))
}

/// The index of the quote closing the string that opens at `start`.
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The byte range of the top-level `"model"` value, quotes included, when it is a string under an
/// unescaped key. One pass, no recursion; strings are skipped whole so braces inside them do not count.
fn model_value_span(body: &[u8]) -> Option<Range<usize>> {
    let skip_ws = |mut j: usize| {
        while body.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        j
    };
    let (mut depth, mut i, mut expect_key) = (0usize, 0usize, false);
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i)?;
                if depth == 1 && expect_key {
                    let colon = skip_ws(end + 1);
                    if body.get(colon) != Some(&b':') {
                        return None;
                    }
                    let value = skip_ws(colon + 1);
                    if &body[i + 1..end] == b"model" {
                        return (body.get(value) == Some(&b'"'))
                            .then(|| string_end(body, value).map(|e| value..e + 1))
                            .flatten();
                    }
                    expect_key = false;
                    i = value;
                    continue;
                }
                i = end + 1;
                continue;
            }
            b'{' => {
                depth += 1;
                expect_key = depth == 1;
            }
            b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_key = true,
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str, served: &str) -> String {
        String::from_utf8(rewrite_model(&Bytes::from(body.to_string()), served).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn only_the_top_level_model_string_changes() {
        let body =
            r#"{"messages":[{"role":"user","content":"{\"model\": \"x\"}","model":"inner"}], "model" : "fast","n":1}"#;
        assert_eq!(
            rewrite(body, "org/Llama-3"),
            r#"{"messages":[{"role":"user","content":"{\"model\": \"x\"}","model":"inner"}], "model" : "org/Llama-3","n":1}"#
        );
        assert_eq!(rewrite(r#"{"model":"a\"b"}"#, "s\"q"), r#"{"model":"s\"q"}"#, "escapes both ways");
    }

    #[test]
    fn an_escaped_key_falls_back_to_a_rebuild() {
        let out: serde_json::Value = serde_json::from_str(&rewrite(r#"{"mod\u0065l":"fast","x":[1]}"#, "big")).unwrap();
        assert_eq!(out, serde_json::json!({"model": "big", "x": [1]}));
    }
}
