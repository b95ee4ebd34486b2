//! OpenAI's `x-ratelimit-*` response headers, and the duration format they use (`20ms`, `6m0s`).

use crate::limits::quota::{Limits, Quota, Refusal, Unit};
use std::time::Duration;

/// Sets OpenAI's `x-ratelimit-*` headers from a quota.
pub fn set_headers(headers: &mut http::HeaderMap, q: &Quota) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(http::HeaderName::from_static(name), v);
        }
    };
    put("x-ratelimit-limit-requests", q.limit_requests.to_string());
    put("x-ratelimit-remaining-requests", q.remaining_requests.to_string());
    put("x-ratelimit-reset-requests", format_duration(q.reset_requests));
    if let Some(limit) = q.limit_tokens {
        put("x-ratelimit-limit-tokens", limit.to_string());
        put("x-ratelimit-remaining-tokens", q.remaining_tokens.to_string());
        put("x-ratelimit-reset-tokens", format_duration(q.reset_tokens));
    }
}

/// The headers of a refusal: the limit that refused, nothing left of it, and when it has room again
/// (the same moment as `Retry-After`).
pub fn refusal_headers(r: &Refusal, limits: &Limits) -> Vec<(&'static str, String)> {
    let (limit, reset) = (limits.of(r.limit).to_string(), format_duration(r.retry_after));
    match r.limit.unit() {
        Unit::Tokens => vec![
            ("x-ratelimit-limit-tokens", limit),
            ("x-ratelimit-remaining-tokens", "0".into()),
            ("x-ratelimit-reset-tokens", reset),
        ],
        Unit::Requests => vec![
            ("x-ratelimit-limit-requests", limit),
            ("x-ratelimit-remaining-requests", "0".into()),
            ("x-ratelimit-reset-requests", reset),
        ],
    }
}

/// OpenAI's duration format: `20ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64().ceil() as u64;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::quota::Limit;

    #[test]
    fn openai_duration_format() {
        assert_eq!(format_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(format_duration(Duration::from_secs(1)), "1s");
        assert_eq!(format_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn a_refusal_reports_its_own_limit() {
        let limits = Limits { rps: 1.0, burst: 5.0, rpm: 60, tpm: 1000, rpd: 9, ..Limits::default() };
        let tpm = refusal_headers(&Refusal { limit: Limit::Tpm, retry_after: Duration::from_secs(6) }, &limits);
        assert_eq!(tpm[0], ("x-ratelimit-limit-tokens", "1000".to_string()));
        assert_eq!(tpm[2], ("x-ratelimit-reset-tokens", "6s".to_string()));
        let global = refusal_headers(&Refusal { limit: Limit::GlobalRps, retry_after: Duration::ZERO }, &limits);
        assert_eq!(global[0], ("x-ratelimit-limit-requests", "5".to_string()));
        let rpd = refusal_headers(&Refusal { limit: Limit::Rpd, retry_after: Duration::ZERO }, &limits);
        assert_eq!(rpd[0], ("x-ratelimit-limit-requests", "9".to_string()));
    }
}
