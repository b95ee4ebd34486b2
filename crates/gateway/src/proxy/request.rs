//! Reading a request: its id, content type, bounded body, the headers that steer routing, and the
//! model it is routed by.

use crate::config::ServerConfig;
use crate::server::budget::{ByteBudget, Held};
use crate::state::Snapshot;
use axum::body::Body;
use bytes::Bytes;
use gateway_core::{ErrorKind, GatewayError, Priority, RequestFeatures};
use http::header::{HeaderName, HeaderValue};
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

/// The client's headers the gateway reads, found in one pass over its map: a lookup per header hashed
/// the name each time, about 125 instructions for each of the seven (callgrind, stop 36). The first
/// value of a repeated header counts, as `HeaderMap::get` reads it.
#[derive(Default)]
pub struct ClientHeaders<'a> {
    /// `X-Request-Id`.
    pub request_id: Option<&'a HeaderValue>,
    /// `Content-Type`.
    pub content_type: Option<&'a HeaderValue>,
    /// `Content-Length`.
    pub content_length: Option<&'a HeaderValue>,
    /// `X-Priority`.
    pub priority: Option<&'a HeaderValue>,
    /// `X-Session-Id`.
    pub session_id: Option<&'a HeaderValue>,
    /// `X-Request-Timeout`.
    pub request_timeout: Option<&'a HeaderValue>,
}

impl<'a> ClientHeaders<'a> {
    /// The headers of `map` the gateway reads.
    pub fn read(map: &'a HeaderMap) -> Self {
        let mut seen = Self::default();
        for (name, value) in map {
            let slot = match name.as_str() {
                "x-request-id" => &mut seen.request_id,
                "content-type" => &mut seen.content_type,
                "content-length" => &mut seen.content_length,
                "x-priority" => &mut seen.priority,
                "x-session-id" => &mut seen.session_id,
                "x-request-timeout" => &mut seen.request_timeout,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        seen
    }

    /// The body's declared length, when it is a number.
    pub fn declared_length(&self) -> Option<u64> {
        self.content_length.and_then(content_length)
    }
}

/// A `Content-Length` value as a number, when it is one.
pub fn content_length(value: &HeaderValue) -> Option<u64> {
    value.to_str().ok()?.parse().ok()
}

/// A request's id, as it is sent both ways in `X-Request-Id` and logged: the client's when it is sane
/// (short, nothing [`gateway_core::echo`] would escape, so it is logged as sent), else a new UUID. Held
/// as the header value it is sent as, so handing it on shares its bytes rather than copying them.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The id of a request whose `X-Request-Id` is `client`.
    pub fn new(client: Option<&HeaderValue>) -> Self {
        let sane = |s: &str| !s.is_empty() && s.len() <= MAX_REQUEST_ID && gateway_core::echo(s) == *s;
        match client {
            Some(v) if v.to_str().is_ok_and(sane) => Self(v.clone()),
            _ => Self::generate(),
        }
    }

    /// A new random (version 4) UUID from a fast generator of the thread's, seeded once from the
    /// thread's cryptographic one: an id must be unique, not unpredictable (it is shown to the client
    /// and logged), and ChaCha's refills cost about 200 instructions a request.
    fn generate() -> Self {
        thread_local! {
            static IDS: std::cell::RefCell<rand::rngs::SmallRng> =
                std::cell::RefCell::new(rand::SeedableRng::from_rng(&mut rand::rng()));
        }
        // One u128 is two 64-bit draws; sixteen bytes were four 32-bit ones.
        let bits: u128 = IDS.with(|ids| rand::Rng::random(&mut *ids.borrow_mut()));
        let id = uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        // Hex digits and hyphens are always a valid header value.
        Self(HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)).unwrap_or(HeaderValue::from_static("-")))
    }

    /// The id as text (for the log line).
    pub fn as_str(&self) -> &str {
        // Visible ASCII either way (checked on the way in), so UTF-8's check, a word at a time, suffices.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or("-")
    }

    /// The id as the header value it is sent as.
    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
pub fn check_content_type(content_type: Option<&HeaderValue>) -> Result<(), GatewayError> {
    let Some(ct) = content_type else { return Ok(()) };
    // What clients send, accepted without splitting parameters off.
    if ct.as_bytes() == b"application/json" {
        return Ok(());
    }
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
    declared: Option<u64>,
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
pub fn apply_headers(features: &mut RequestFeatures, headers: &ClientHeaders<'_>) {
    if let Some(p) = headers.priority.and_then(|v| v.to_str().ok()).and_then(Priority::parse) {
        features.priority = p;
    }
    if let Some(s) = headers.session_id.and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()) {
        features.set_session_header(s);
    }
}

/// `X-Request-Timeout: SECONDS` (a positive number, fractions allowed, at most a day): how long this
/// request may wait in the queue. Absent is `None`; anything else is a 400 naming the header.
pub fn request_timeout(header: Option<&HeaderValue>) -> Result<Option<Duration>, GatewayError> {
    let Some(v) = header else { return Ok(None) };
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
    use http::header::{CONTENT_LENGTH, CONTENT_TYPE};

    #[test]
    fn content_type_rules() {
        assert!(check_content_type(None).is_ok(), "absent is accepted");
        for ok in ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
        {
            assert!(check_content_type(Some(&HeaderValue::from_static(ok))).is_ok(), "{ok}");
        }
        for bad in ["application/x-www-form-urlencoded", "text/plain", "application/jsonx", ""] {
            let err = check_content_type(Some(&HeaderValue::from_static(bad))).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
        }
    }

    #[test]
    fn client_headers_are_read_in_one_pass_as_get_reads_them() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.insert("x-other", HeaderValue::from_static("o"));
        h.append(&X_PRIORITY, HeaderValue::from_static("high"));
        h.append(&X_PRIORITY, HeaderValue::from_static("low"));
        h.insert(&X_SESSION_ID, HeaderValue::from_static("s"));
        h.insert(&X_REQUEST_TIMEOUT, HeaderValue::from_static("3"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("r"));
        let seen = ClientHeaders::read(&h);
        assert_eq!(seen.content_type, h.get(CONTENT_TYPE));
        assert_eq!(seen.declared_length(), Some(12));
        assert_eq!(seen.priority, h.get(&X_PRIORITY), "the first of a repeated header");
        assert_eq!(seen.priority.map(HeaderValue::as_bytes), Some(&b"high"[..]));
        assert_eq!(seen.session_id, h.get(&X_SESSION_ID));
        assert_eq!(seen.request_timeout, h.get(&X_REQUEST_TIMEOUT));
        assert_eq!(seen.request_id, h.get(&X_REQUEST_ID));
        let empty = HeaderMap::new();
        let none = ClientHeaders::read(&empty);
        assert!(none.content_type.is_none() && none.request_id.is_none() && none.declared_length().is_none());
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
        let err =
            read_body(chunks(vec![b"{\"model\"", b":"], true), None, &server(1024, 4096), &budget).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(ServerConfig::default().body_read_timeout_ms));
        assert_eq!(err.status(), 408);
        assert_eq!(err.body()["error"]["code"], "request_timeout");
        assert_eq!(budget.used(), 0, "a failed read gives its bytes back");
    }

    #[tokio::test]
    async fn bodies_share_one_byte_budget() {
        let budget = ByteBudget::new();
        let cfg = server(100, 150);
        let declared = Some(100);
        let (bytes, held) = read_body(Body::from(vec![b'x'; 100]), declared, &cfg, &budget).await.unwrap();
        assert_eq!((bytes.len(), budget.used()), (100, 100), "held until the request is answered");
        // A declared length that does not fit is refused before a byte is read.
        let err = read_body(chunks(vec![], true), declared, &cfg, &budget).await.unwrap_err();
        assert_eq!((err.status(), err.retry_after_secs), (503, Some(1)));
        assert_eq!(err.body()["error"]["code"], "server_busy");
        // Without a length, chunks are counted as they arrive.
        let err = read_body(chunks(vec![&[b'y'; 30], &[b'y'; 30]], false), None, &cfg, &budget).await.unwrap_err();
        assert_eq!(err.body()["error"]["code"], "server_busy");
        assert_eq!(budget.used(), 100, "the refused bodies hold nothing");
        drop(held);
        let (bytes, _held) =
            read_body(chunks(vec![&[b'y'; 30], &[b'y'; 30]], false), None, &cfg, &budget).await.unwrap();
        assert_eq!((bytes.len(), budget.used()), (60, 60));
        let err = read_body(Body::from(vec![b'x'; 101]), None, &cfg, &ByteBudget::new()).await.unwrap_err();
        assert_eq!(err.status(), 413, "max_body_bytes still applies");
    }

    #[test]
    fn request_timeouts() {
        assert_eq!(request_timeout(None).unwrap(), None);
        assert_eq!(
            request_timeout(Some(&HeaderValue::from_static(" 2.5 "))).unwrap(),
            Some(Duration::from_millis(2500))
        );
        for bad in ["0", "-1", "soon", "NaN", "inf", "90000", ""] {
            let err = request_timeout(Some(&HeaderValue::from_str(bad).unwrap())).unwrap_err();
            assert_eq!((err.status(), err.body()["error"]["code"].as_str()), (400, Some("invalid_header")), "{bad:?}");
        }
    }

    #[test]
    fn request_ids() {
        let generated = RequestId::new(None);
        let parsed = uuid::Uuid::parse_str(generated.as_str()).unwrap();
        assert_eq!(parsed.get_version(), Some(uuid::Version::Random));
        assert_eq!(generated.as_str(), parsed.hyphenated().to_string(), "lowercase, hyphenated");
        assert_eq!(generated.header().to_str().unwrap(), generated.as_str(), "sent as it is logged");
        let many: std::collections::HashSet<String> = (0..1000).map(|_| RequestId::new(None).as_str().into()).collect();
        assert_eq!(many.len(), 1000, "every new id differs");
        let sent = |v: &str| RequestId::new(Some(&HeaderValue::from_str(v).unwrap())).as_str().to_owned();
        assert_eq!(sent("abc-1"), "abc-1");
        assert_ne!(sent(&"x".repeat(500)).len(), 500);
        for forged in ["a\tb", "a\\nb", ""] {
            assert!(uuid::Uuid::parse_str(&sent(forged)).is_ok(), "{forged:?} is replaced");
        }
    }
}
