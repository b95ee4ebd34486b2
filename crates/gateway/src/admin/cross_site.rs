//! Refuses admin requests that a web page on another site could have made.
//!
//! A browser lets any page send a "simple" cross-site request (a `POST` with `Content-Type: text/plain`,
//! a form, a `no-cors` fetch) and open a WebSocket anywhere, carrying no token but reaching an admin API
//! left open (`admin.token` unset, the default) on the user's network. Two checks close that door:
//! - [`check_origin`]: a request whose `Origin` names another host than the one it was sent to (or
//!   whose `Sec-Fetch-Site` says `cross-site`) is refused with 403 `forbidden_origin`. Tools that are not
//!   browsers send no `Origin` and pass.
//! - [`require_json`]: a mutation must say `Content-Type: application/json` (or another `+json` type).
//!   A browser sends that type cross-site only after a CORS preflight, which the gateway never approves.
//!
//! Both are pure functions of the request head.

use gateway_core::{echo, ErrorKind, GatewayError};
use http::header::{CONTENT_TYPE, HOST, ORIGIN};
use http::HeaderMap;

/// `Sec-Fetch-Site`, set by browsers on every request: `same-origin`, `same-site`, `cross-site` or `none`.
pub const SEC_FETCH_SITE: &str = "sec-fetch-site";

/// `Ok` unless the request comes from another site's page: an `Origin` whose host and port differ from
/// the request's own (`Host`, else the URI's authority, as HTTP/2 carries it), an `Origin` of `null`
/// (sandboxed frames, `file:` pages), or `Sec-Fetch-Site: cross-site`.
pub fn check_origin(uri: &http::Uri, headers: &HeaderMap) -> Result<(), GatewayError> {
    let cross_site = headers
        .get(SEC_FETCH_SITE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("cross-site"));
    if cross_site {
        return Err(forbidden("Sec-Fetch-Site: cross-site"));
    }
    let Some(origin) = headers.get(ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().unwrap_or("");
    let host = headers.get(HOST).and_then(|v| v.to_str().ok()).or_else(|| uri.authority().map(|a| a.as_str()));
    if host.is_some_and(|h| same_host(origin, h)) {
        Ok(())
    } else {
        Err(forbidden(&format!("Origin {:?}", echo(origin))))
    }
}

/// Whether the `Origin` value `origin` (`scheme://host[:port]`) names the authority `host` (`host[:port]`).
/// A `Host` without a port takes the origin scheme's default port: behind a TLS-terminating proxy the page
/// is `https://gw` while the gateway hears `Host: gw`.
pub fn same_host(origin: &str, host: &str) -> bool {
    let Ok(o) = url::Url::parse(origin) else { return false };
    let (Some(o_host), Some(o_port)) = (o.host_str(), o.port_or_known_default()) else { return false };
    let Ok(a) = host.trim().parse::<http::uri::Authority>() else { return false };
    if a.as_str().contains('@') {
        return false;
    }
    let a_port = a.port_u16().or_else(|| o.port_or_known_default());
    a.host().eq_ignore_ascii_case(o_host) && a_port == Some(o_port)
}

/// `Ok` when the `Content-Type` is `application/json` or a `+json` type (parameters allowed); else 400
/// `invalid_content_type`, a missing header included.
pub fn require_json(headers: &HeaderMap) -> Result<(), GatewayError> {
    let ct = headers.get(CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
    let essence = ct.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        return Ok(());
    }
    let got = match ct {
        Some(ct) => format!("got {:?}", echo(ct)),
        None => "got none".to_string(),
    };
    Err(GatewayError::new(
        ErrorKind::UnsupportedContentType,
        format!("admin changes must be sent with Content-Type: application/json, {got}"),
    ))
}

fn forbidden(what: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::ForbiddenOrigin,
        format!("cross-site request refused ({what}): the admin API and the dashboard socket take requests from their own page or from tools without an Origin"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn origin_ok(pairs: &[(&'static str, &'static str)]) -> bool {
        check_origin(&http::Uri::from_static("/api/workers"), &head(pairs)).is_ok()
    }

    #[test]
    fn no_origin_is_a_tool_and_passes() {
        assert!(origin_ok(&[("host", "10.0.0.1:9000")]));
        assert!(origin_ok(&[]));
        assert!(origin_ok(&[("sec-fetch-site", "same-origin"), ("host", "gw:9000")]));
        assert!(origin_ok(&[("sec-fetch-site", "none")]));
    }

    #[test]
    fn same_origin_passes_with_ports_normalised() {
        assert!(origin_ok(&[("host", "127.0.0.1:9000"), ("origin", "http://127.0.0.1:9000")]));
        assert!(origin_ok(&[("host", "GW.example"), ("origin", "http://gw.example")]));
        assert!(origin_ok(&[("host", "gw.example:80"), ("origin", "http://gw.example")]));
        assert!(origin_ok(&[("host", "gw.example"), ("origin", "https://gw.example:443")]));
        assert!(origin_ok(&[("host", "[::1]:9000"), ("origin", "http://[::1]:9000")]));
    }

    #[test]
    fn foreign_origins_are_refused() {
        for pairs in [
            &[("host", "127.0.0.1:9000"), ("origin", "http://evil.example")][..],
            &[("host", "127.0.0.1:9000"), ("origin", "http://127.0.0.1:9001")],
            &[("host", "gw.example:80"), ("origin", "https://gw.example")],
            &[("host", "gw.example"), ("origin", "http://gw.example.evil.example")],
            &[("host", "127.0.0.1:9000"), ("origin", "null")],
            &[("host", "127.0.0.1:9000"), ("origin", "")],
            &[("origin", "http://127.0.0.1:9000")],
            &[("host", "127.0.0.1:9000"), ("origin", "http://127.0.0.1:9000"), ("sec-fetch-site", "cross-site")],
            &[("host", "evil@127.0.0.1:9000"), ("origin", "http://127.0.0.1:9000")],
        ] {
            let e = check_origin(&http::Uri::from_static("/api/x"), &head(pairs)).unwrap_err();
            assert_eq!((e.status(), e.body()["error"]["code"].as_str()), (403, Some("forbidden_origin")), "{pairs:?}");
        }
    }

    #[test]
    fn http2_authority_stands_in_for_host() {
        let uri = http::Uri::from_static("http://127.0.0.1:9000/api/workers");
        assert!(check_origin(&uri, &head(&[("origin", "http://127.0.0.1:9000")])).is_ok());
        assert!(check_origin(&uri, &head(&[("origin", "http://evil.example")])).is_err());
    }

    #[test]
    fn only_json_content_types_pass() {
        assert!(require_json(&head(&[("content-type", "application/json")])).is_ok());
        assert!(require_json(&head(&[("content-type", "Application/JSON; charset=utf-8")])).is_ok());
        assert!(require_json(&head(&[("content-type", "application/merge-patch+json")])).is_ok());
        for bad in [
            &[("content-type", "text/plain")][..],
            &[("content-type", "text/plain; charset=application/json")],
            &[("content-type", "application/x-www-form-urlencoded")],
            &[("content-type", "multipart/form-data; boundary=x")],
            &[("content-type", "text/json+json")],
            &[],
        ] {
            let e = require_json(&head(bad)).unwrap_err();
            assert_eq!(
                (e.status(), e.body()["error"]["code"].as_str()),
                (400, Some("invalid_content_type")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn echoed_header_values_are_bounded_and_escaped() {
        let long = format!("http://{}.example", "e".repeat(5000));
        let mut h = head(&[("host", "gw:1")]);
        h.insert(ORIGIN, HeaderValue::from_str(&long).unwrap());
        let e = check_origin(&http::Uri::from_static("/"), &h).unwrap_err();
        assert!(e.message.len() < 600, "{}", e.message.len());
    }
}
