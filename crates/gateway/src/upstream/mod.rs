//! HTTP/1.1 towards workers: the connector, each worker's request connections ([`connections`]), the
//! pooled client of the control plane (probes, scrapes, model discovery), hop-by-hop headers.
//!
//! The proxy only needs plain HTTP with keep-alive. `TCP_NODELAY` is set: without it a later stream on a
//! kept-alive connection waits ~40 ms for Nagle's algorithm.

pub mod connections;

use crate::config::UpstreamConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
pub use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The client type used for every request to a worker.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// How connections to workers are opened: over TCP, then HTTP/1.1 on it.
#[derive(Debug, Clone)]
pub struct Connector {
    /// `TCP_NODELAY`, TCP keep-alive, `upstream.connect_timeout_ms`; the control plane's client uses it too.
    pub tcp: HttpConnector,
    /// hyper's settings for a request connection (`upstream.read_buffer_bytes`).
    pub http1: hyper::client::conn::http1::Builder,
}

/// The connector to workers for `cfg`.
pub fn connector(cfg: &UpstreamConfig) -> Connector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    let mut http1 = hyper::client::conn::http1::Builder::new();
    // Exact: hyper's adaptive buffer starts at 8 KB whatever its maximum.
    http1.read_buf_exact_size(Some(cfg.read_buffer_bytes));
    Connector { tcp, http1 }
}

/// The control plane's pooled client (probes, scrapes, model discovery), over `connector`.
pub fn client(connector: HttpConnector) -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .build(connector)
}

/// A small GET (probes, model discovery): status and body up to `max_bytes`, within `timeout`.
pub async fn get(
    client: &Client,
    url: &str,
    auth: Option<&http::HeaderValue>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<(http::StatusCode, Bytes), String> {
    let mut req = http::Request::get(url);
    if let Some(auth) = auth {
        req = req.header(http::header::AUTHORIZATION, auth.clone());
    }
    let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), max_bytes).collect().await.map_err(|e| e.to_string())?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| format!("timed out after {timeout:?}"))?
}

/// The headers [`is_hop_by_hop`] names, for removing them from a map in place.
static HOP_BY_HOP: [http::HeaderName; 11] = [
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::HOST,
    http::header::CONTENT_LENGTH,
];

/// Removes the hop-by-hop headers from `headers` in place (keeping `Content-Length` when
/// `keep_length`): cheaper than copying the others into a new map.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap, keep_length: bool) {
    // One pass over the names present, then a removal only for those found: a map usually holds two
    // or three of the eleven, and each removal is a hash lookup.
    let mut found = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            found |= 1 << i;
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 && !(keep_length && name == http::header::CONTENT_LENGTH) {
            headers.remove(name);
        }
    }
}

/// Headers that describe one connection, not the message; never forwarded either way.
pub fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    hop_by_hop_index(name).is_some()
}

/// Where `name` stands in [`HOP_BY_HOP`]: a match on its text (a switch on the length, then one
/// comparison) rather than a comparison with each of the eleven, which cost about 870 instructions
/// more per request over the two maps a request strips (callgrind, stop 32).
fn hop_by_hop_index(name: &http::HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        "host" => 9,
        "content-length" => 10,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripping_removes_exactly_the_hop_by_hop_headers() {
        let mut h = http::HeaderMap::new();
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
            h.insert(name.clone(), http::HeaderValue::from_static("x"));
        }
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        h.append("x-custom", http::HeaderValue::from_static("a"));
        h.append("x-custom", http::HeaderValue::from_static("b"));
        let mut kept = h.clone();
        strip_hop_by_hop(&mut kept, true);
        assert_eq!(kept.len(), 4, "content-type, content-length and both x-custom values: {kept:?}");
        strip_hop_by_hop(&mut h, false);
        assert!(h.keys().all(|k| !is_hop_by_hop(k)));
        assert_eq!(h.get_all("x-custom").iter().count(), 2);
        // Only the ones present are looked for: a request's usual Host and Content-Length.
        let mut request = http::HeaderMap::new();
        request.insert(http::header::HOST, http::HeaderValue::from_static("gw"));
        request.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from_static("2"));
        request.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut request, false);
        assert_eq!(request.keys().collect::<Vec<_>>(), [http::header::CONTENT_TYPE]);
    }
}
