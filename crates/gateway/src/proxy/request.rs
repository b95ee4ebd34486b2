//! Reading a request: its id, content type, bounded body, the headers that steer routing, and the
//! model it is routed by.

use crate::config::ServerConfig;
use crate::server::budget::{ByteBudget, Held};
use crate::state::Snapshot;
use axum::body::Body;
use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError, Priority, RequestFeatures};
use http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Gateway-Worker`: the worker that served the request.
pub static X_GATEWAY_WORKER: HeaderName = HeaderName::from_static("x-gateway-worker");
/// `X-Priority`: the client's priority class.
pub static X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");
/// `X-Session-Id`: the session key for consistent hashing.
pub static X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");

/// Longest client-supplied request id accepted; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// `X-Request-Timeout`: seconds the client allows this request to wait in the queue.
pub static X_REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout");

/// `X-Queue-Position`: the request's position when it entered the admission queue (0: it did not wait).
pub static X_QUEUE_POSITION: HeaderName = HeaderName::from_static("x-queue-position");
/// `X-Estimated-Wait`: seconds it was expected to wait when it entered the queue.
pub static X_ESTIMATED_WAIT: HeaderName = HeaderName::from_static("x-estimated-wait");

/// The client's `X-Request-Id` when it is a sane header value (short, nothing [`gateway_core::echo`]
/// would escape, so it is logged as sent), else a new UUID.
pub fn request_id(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= MAX_REQUEST_ID && gateway_core::echo(s) == *s)
        .map(Arc::from)
        .unwrap_or_else(new_request_id)
}

/// A new random (version 4) UUID, from the thread's RNG rather than a `getrandom` system call per
/// request, written out without the formatting machinery.
fn new_request_id() -> Arc<str> {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    Arc::from(&*id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
}

/// The key a request is queued under for fairness (not a rate-limit bucket): its tenant or `user`,
/// else its client address.
pub fn fairness_key(user: Option<&str>, addr: Option<std::net::IpAddr>) -> u64 {
    use gateway_core::prefix::hash_bytes;
    match (user, addr) {
        (Some(u), _) => hash_bytes(3, u.as_bytes()),
        // The address's bytes, not its text: formatting it cost more than the rest of this function.
        (None, Some(std::net::IpAddr::V4(ip))) => hash_bytes(4, &ip.octets()),
        (None, Some(std::net::IpAddr::V6(ip))) => hash_bytes(4, &ip.octets()),
        (None, None) => 0,
    }
}

/// Only JSON bodies are accepted (`application/json` or any `+json` type); no `Content-Type` is JSON.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(ct) = headers.get(CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") || essence.to_ascii_lowercase().ends_with("+json") {
        Ok(())
    } else {
        Err(GatewayError::new(
            ErrorKind::UnsupportedContentType,
            format!("Content-Type must be application/json, got {:?}", gateway_core::echo(ct)),
        ))
    }
}

/// Reads the whole body, bounded three ways: `server.max_body_bytes` (413), `server.body_read_timeout_ms`
/// (408: a client trickling its body cannot hold the request forever) and the bytes all bodies hold at
/// once, `server.max_buffered_bytes` (503 `server_busy`). The bytes stay counted until the guard drops.
pub async fn read_body(
    mut body: Body,
    headers: &HeaderMap,
    server: &ServerConfig,
    budget: &Arc<ByteBudget>,
) -> Result<(Bytes, Held), GatewayError> {
    let limit = server.max_body_bytes;
    let too_large = || {
        GatewayError::new(ErrorKind::BodyTooLarge, format!("request body is larger than the limit of {limit} bytes"))
    };
    let busy = || {
        GatewayError::new(
            ErrorKind::ServerBusy,
            "the gateway is reading too many request bodies at once; retry shortly",
        )
        .with_retry_after(1)
    };
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // A declared length is taken up front: refused at once rather than after most of it arrived.
    let declared = declared.map_or(0, |n| n as usize);
    let mut held = budget.take(declared, server.max_buffered_bytes).ok_or_else(busy)?;
    let timeout = Duration::from_millis(server.body_read_timeout_ms);
    let deadline = Instant::now() + timeout;
    let mut buf = bytes::BytesMut::with_capacity(declared);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::RequestTimeout,
                    format!("the request body did not arrive within {} ms", timeout.as_millis()),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(GatewayError::new(ErrorKind::InvalidJson, format!("could not read the request body: {e}")))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        let total = buf.len() + data.len();
        if total > limit {
            return Err(too_large());
        }
        if !held.grow_to(total, server.max_buffered_bytes) {
            return Err(busy());
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), held))
}

/// `X-Priority` and `X-Session-Id` override what the body says.
pub fn apply_headers(features: &mut RequestFeatures, headers: &HeaderMap) {
    if let Some(p) = headers.get(&X_PRIORITY).and_then(|v| v.to_str().ok()).and_then(Priority::parse) {
        features.priority = p;
    }
    if let Some(s) = headers.get(&X_SESSION_ID).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()) {
        features.set_session_header(s);
    }
}

/// `X-Request-Timeout: SECONDS` (a positive number, fractions allowed, at most a day): how long this
/// request may wait in the queue. Absent is `None`; anything else is a 400 naming the header.
pub fn request_timeout(headers: &HeaderMap) -> Result<Option<Duration>, GatewayError> {
    let Some(v) = headers.get(&X_REQUEST_TIMEOUT) else { return Ok(None) };
    let text = v.to_str().unwrap_or("").trim();
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 => Ok(Some(Duration::from_secs_f64(secs))),
        _ => Err(GatewayError::new(
            ErrorKind::InvalidHeader,
            format!(
                "X-Request-Timeout must be a number of seconds above 0 and at most 86400, got {:?}",
                gateway_core::echo(text)
            ),
        )),
    }
}

/// The model to route by: the one named (an alias stands for its served name), or the one served
/// when none is named.
pub fn resolve_model(snap: &Snapshot, features: &RequestFeatures) -> Result<Arc<str>, GatewayError> {
    match features.model.as_deref().map(|m| snap.config.served_name(m)) {
        Some(model) if snap.fleet.knows_model(model) => Ok(Arc::from(model)),
        // The name is the client's: bounded and escaped before it reaches the answer and the log line.
        Some(model) => Err(GatewayError::new(
            ErrorKind::ModelNotFound,
            format!("The model `{}` does not exist.", gateway_core::echo(model)),
        )
        .with_param("model")),
        None => {
            let models = snap.fleet.healthy_models();
            let mut it = models.into_iter();
            match (it.next(), it.next()) {
                (Some(only), None) => Ok(Arc::from(only)),
                (None, _) => Err(GatewayError::new(ErrorKind::NoHealthyWorker, "no healthy worker is available")),
                (Some(_), Some(_)) => Err(GatewayError::new(
                    ErrorKind::ModelRequired,
                    "`model` is required: this gateway serves several models",
                )
                .with_param("model")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn content_type_rules() {
        let mut h = HeaderMap::new();
        assert!(check_content_type(&h).is_ok(), "absent is accepted");
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert!(check_content_type(&h).is_ok());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        assert_eq!(check_content_type(&h).unwrap_err().status(), 400);
    }

    fn server(max_body_bytes: usize, max_buffered_bytes: usize) -> ServerConfig {
        ServerConfig { max_body_bytes, max_buffered_bytes, ..ServerConfig::default() }
    }

    fn chunks(parts: Vec<&'static [u8]>, then_stall: bool) -> Body {
        let sent =
            futures_util::stream::iter(parts.into_iter().map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p))));
        if then_stall {
            Body::from_stream(futures_util::StreamExt::chain(sent, futures_util::stream::pending()))
        } else {
            Body::from_stream(sent)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_not_whole_within_the_body_timeout_is_408() {
        let budget = ByteBudget::new();
        let started = Instant::now();
        let err = read_body(chunks(vec![b"{\"model\"", b":"], true), &HeaderMap::new(), &server(1024, 4096), &budget)
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(ServerConfig::default().body_read_timeout_ms));
        assert_eq!(err.status(), 408);
        assert_eq!(err.body()["error"]["code"], "request_timeout");
        assert_eq!(budget.used(), 0, "a failed read gives its bytes back");
    }

    #[tokio::test]
    async fn bodies_share_one_byte_budget() {
        let budget = ByteBudget::new();
        let cfg = server(100, 150);
        let mut declared = HeaderMap::new();
        declared.insert(CONTENT_LENGTH, HeaderValue::from(100));
        let (bytes, held) = read_body(Body::from(vec![b'x'; 100]), &declared, &cfg, &budget).await.unwrap();
        assert_eq!((bytes.len(), budget.used()), (100, 100), "held until the request is answered");
        // A declared length that does not fit is refused before a byte is read.
        let err = read_body(chunks(vec![], true), &declared, &cfg, &budget).await.unwrap_err();
        assert_eq!((err.status(), err.retry_after_secs), (503, Some(1)));
        assert_eq!(err.body()["error"]["code"], "server_busy");
        // Without a length, chunks are counted as they arrive.
        let err = read_body(chunks(vec![&[b'y'; 30], &[b'y'; 30]], false), &HeaderMap::new(), &cfg, &budget)
            .await
            .unwrap_err();
        assert_eq!(err.body()["error"]["code"], "server_busy");
        assert_eq!(budget.used(), 100, "the refused bodies hold nothing");
        drop(held);
        let (bytes, _held) =
            read_body(chunks(vec![&[b'y'; 30], &[b'y'; 30]], false), &HeaderMap::new(), &cfg, &budget).await.unwrap();
        assert_eq!((bytes.len(), budget.used()), (60, 60));
        let err =
            read_body(Body::from(vec![b'x'; 101]), &HeaderMap::new(), &cfg, &ByteBudget::new()).await.unwrap_err();
        assert_eq!(err.status(), 413, "max_body_bytes still applies");
    }

    #[test]
    fn request_timeouts() {
        let mut h = HeaderMap::new();
        assert_eq!(request_timeout(&h).unwrap(), None);
        h.insert(&X_REQUEST_TIMEOUT, HeaderValue::from_static(" 2.5 "));
        assert_eq!(request_timeout(&h).unwrap(), Some(Duration::from_millis(2500)));
        for bad in ["0", "-1", "soon", "NaN", "inf", "90000", ""] {
            h.insert(&X_REQUEST_TIMEOUT, HeaderValue::from_str(bad).unwrap());
            let err = request_timeout(&h).unwrap_err();
            assert_eq!((err.status(), err.body()["error"]["code"].as_str()), (400, Some("invalid_header")), "{bad:?}");
        }
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let generated = request_id(&h);
        let parsed = uuid::Uuid::parse_str(&generated).unwrap();
        assert_eq!(parsed.get_version(), Some(uuid::Version::Random));
        assert_eq!(&*generated, parsed.hyphenated().to_string(), "lowercase, hyphenated");
        assert_ne!(request_id(&h), generated);
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-1"));
        assert_eq!(&*request_id(&h), "abc-1");
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(&"x".repeat(500)).unwrap());
        assert_ne!(request_id(&h).len(), 500);
        for forged in ["a\tb", "a\\nb"] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(forged).unwrap());
            assert!(uuid::Uuid::parse_str(&request_id(&h)).is_ok(), "{forged:?} is replaced");
        }
    }
}
