//! The few form fields routing needs from a `multipart/form-data` body (`/v1/audio/transcriptions`
//! sends `model` as a form field beside the audio file): found by scanning part headers only, in one
//! pass over the bytes, with every header and value bounded, and never a panic on malformed input.

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;
/// Longest part header block read; a longer one is malformed.
const MAX_HEADERS: usize = 8 * 1024;
/// Longest field value kept (`model`, `stream`); longer values are refused.
const MAX_VALUE: usize = 1024;
/// Most parts scanned.
const MAX_PARTS: usize = 1000;

/// The form fields the gateway reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FormFields {
    /// The `model` field, when present.
    pub model: Option<String>,
    /// The `stream` field is `true`.
    pub stream: bool,
}

/// The boundary of a `multipart/form-data` content type, quoted or not; `None` for any other type or
/// a missing, empty or overlong boundary.
pub fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= MAX_BOUNDARY)
}

/// Reads `model` and `stream` from a multipart body delimited by `boundary`. The error says what is
/// malformed (for a 400).
pub fn form_fields(body: &[u8], boundary: &str) -> Result<FormFields, String> {
    let delimiter = [b"--", boundary.as_bytes()].concat();
    let next_delimiter = [b"\r\n--", boundary.as_bytes()].concat();
    let mut at = memchr::memmem::find(body, &delimiter).ok_or("no multipart boundary in the body")?;
    let mut fields = FormFields::default();
    for _ in 0..MAX_PARTS {
        let rest = &body[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            return Ok(fields);
        }
        let rest = rest.strip_prefix(b"\r\n").ok_or("a multipart boundary is not followed by a line break")?;
        let head_len = memchr::memmem::find(&rest[..rest.len().min(MAX_HEADERS + 4)], b"\r\n\r\n")
            .ok_or("a multipart part has no end of headers (or headers over 8 KiB)")?;
        let name = field_name(&rest[..head_len]);
        let content = &rest[head_len + 4..];
        let len = memchr::memmem::find(content, &next_delimiter).ok_or("the multipart body has no closing boundary")?;
        let value = &content[..len];
        if let Some(field @ ("model" | "stream")) = name.as_deref() {
            if value.len() > MAX_VALUE {
                return Err(format!("the form field {field:?} is longer than {MAX_VALUE} bytes"));
            }
            let text = std::str::from_utf8(value).map_err(|_| format!("the form field {field:?} is not UTF-8"))?;
            if field == "model" {
                fields.model = Some(text.to_owned());
            } else {
                fields.stream = text.trim().eq_ignore_ascii_case("true");
            }
        }
        // `at` moves to the next delimiter (past the CRLF that precedes it).
        at = (body.len() - content.len()) + len + 2;
    }
    Err(format!("the multipart body has more than {MAX_PARTS} parts"))
}

/// The `name` parameter of a part's `Content-Disposition: form-data` header.
fn field_name(headers: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(headers).ok()?;
    let line = text
        .split("\r\n")
        .find(|l| l.split_once(':').is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition")))?;
    let (_, value) = line.split_once(':')?;
    value
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("name"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in parts {
            out.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\"");
            if *name == "file" {
                out.extend_from_slice(b"; filename=\"a.wav\"\r\nContent-Type: audio/wav");
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn finds_model_and_stream_wherever_they_are() {
        // The audio may hold bytes that look like a delimiter's start or a header.
        let audio: &[u8] = b"RIFF\x00\xff--Xy\r\nname=\"model\"\r\n\r\nnot-this";
        let b = body(&[("file", audio), ("model", b"whisper-1"), ("stream", b"true")]);
        let f = form_fields(&b, "XyZ").unwrap();
        assert_eq!(f, FormFields { model: Some("whisper-1".into()), stream: true });
        let b = body(&[("model", b"m"), ("file", audio)]);
        assert_eq!(form_fields(&b, "XyZ").unwrap(), FormFields { model: Some("m".into()), stream: false });
        assert_eq!(form_fields(&body(&[("file", audio)]), "XyZ").unwrap().model, None);
    }

    #[test]
    fn reads_the_boundary() {
        assert_eq!(boundary("multipart/form-data; boundary=abc"), Some("abc"));
        assert_eq!(boundary("Multipart/Form-Data;boundary=\"a b\""), Some("a b"));
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))), None);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let good = body(&[("model", b"m"), ("file", b"abc")]);
        for cut in 0..good.len() {
            let _ = form_fields(&good[..cut], "XyZ");
        }
        assert!(form_fields(b"", "XyZ").is_err());
        assert!(form_fields(b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm", "XyZ").is_err());
        let long = body(&[("model", &[b'm'; MAX_VALUE + 1])]);
        assert!(form_fields(&long, "XyZ").is_err());
        let mut bytes = vec![0u8; 4096];
        let mut x = 7u64;
        for _ in 0..200 {
            for b in bytes.iter_mut() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *b = b"-XyZ\r\n=\"amodel"[(x >> 60) as usize % 14];
            }
            let _ = form_fields(&bytes, "XyZ");
        }
    }
}
