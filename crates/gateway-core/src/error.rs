//! The one error type of the gateway and the single table that spells every OpenAI `type`/`code`.
//!
//! Every error the gateway itself produces is rendered once, as
//! `{"error":{"message","type","param","code"}}`. Errors answered by a worker are *not* wrapped:
//! they pass through unchanged, because clients rely on vLLM's own error objects.

use serde::Serialize;

/// Which side of the gateway caused an error: tells operators where to look and retries whether to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The request itself is wrong; retrying it unchanged cannot help.
    Client,
    /// A worker failed or is unreachable; another worker may succeed.
    Upstream,
    /// The gateway refused or failed on its own account (capacity, limits, a bug).
    Internal,
}

/// Every kind of error the gateway answers with. The table in [`ErrorKind::spec`] gives each one its
/// HTTP status, OpenAI `type` and `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not valid JSON or misses a required field.
    InvalidJson,
    /// The `Content-Type` is not `application/json`.
    UnsupportedContentType,
    /// A request header the gateway reads has a value it cannot use (e.g. `X-Request-Timeout`).
    InvalidHeader,
    /// The body is larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// The body did not arrive whole within `server.body_read_timeout_ms`.
    RequestTimeout,
    /// The request named a model no worker serves.
    ModelNotFound,
    /// The request named no model and several are served.
    ModelRequired,
    /// No healthy worker serves the model.
    NoHealthyWorker,
    /// The admission queue for the model is full.
    QueueFull,
    /// The request waited in the admission queue longer than `queue.timeout_secs`.
    QueueTimeout,
    /// A rate limit was hit; the `code` names the limit.
    RateLimited,
    /// Missing or unknown API key.
    InvalidApiKey,
    /// Missing or wrong admin token on an admin endpoint.
    Unauthorized,
    /// An admin mutation or the dashboard socket came from another site's page (`Origin`).
    ForbiddenOrigin,
    /// An admin request named a worker that does not exist.
    NotFound,
    /// The worker could not be reached or broke the connection.
    UpstreamUnavailable,
    /// The worker did not answer within the configured timeout.
    UpstreamTimeout,
    /// The gateway holds as many connections or buffered body bytes as it may (`server.max_connections`,
    /// `server.max_buffered_bytes`); the client should retry shortly.
    ServerBusy,
    /// A bug or an unexpected state inside the gateway.
    Internal,
}

/// Status, OpenAI `type`, default `code` and side of one [`ErrorKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorSpec {
    /// HTTP status code.
    pub status: u16,
    /// OpenAI `error.type`.
    pub kind: &'static str,
    /// OpenAI `error.code` (unless the error overrides it).
    pub code: &'static str,
    /// Who is at fault.
    pub side: Side,
}

impl ErrorKind {
    /// The one table of every status, `type` and `code` the gateway answers with.
    pub const fn spec(self) -> ErrorSpec {
        use ErrorKind::*;
        let (status, kind, code, side) = match self {
            InvalidJson => (400, "invalid_request_error", "invalid_json", Side::Client),
            UnsupportedContentType => (400, "invalid_request_error", "invalid_content_type", Side::Client),
            InvalidHeader => (400, "invalid_request_error", "invalid_header", Side::Client),
            BodyTooLarge => (413, "invalid_request_error", "request_too_large", Side::Client),
            RequestTimeout => (408, "invalid_request_error", "request_timeout", Side::Client),
            ModelNotFound => (404, "invalid_request_error", "model_not_found", Side::Client),
            ModelRequired => (400, "invalid_request_error", "model_required", Side::Client),
            NoHealthyWorker => (503, "service_unavailable", "no_healthy_workers", Side::Internal),
            QueueFull => (429, "queue_full", "queue_full", Side::Internal),
            QueueTimeout => (504, "queue_timeout", "queue_timeout", Side::Internal),
            RateLimited => (429, "rate_limit_exceeded", "rate_limit_exceeded", Side::Client),
            InvalidApiKey => (401, "invalid_request_error", "invalid_api_key", Side::Client),
            Unauthorized => (401, "invalid_request_error", "unauthorized", Side::Client),
            ForbiddenOrigin => (403, "invalid_request_error", "forbidden_origin", Side::Client),
            NotFound => (404, "invalid_request_error", "not_found", Side::Client),
            UpstreamUnavailable => (502, "upstream_error", "upstream_unavailable", Side::Upstream),
            UpstreamTimeout => (504, "upstream_error", "upstream_timeout", Side::Upstream),
            ServerBusy => (503, "service_unavailable", "server_busy", Side::Internal),
            Internal => (500, "internal_error", "internal_error", Side::Internal),
        };
        ErrorSpec { status, kind, code, side }
    }
}

/// An error produced by the gateway itself, rendered once as an OpenAI error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// What went wrong, which fixes status, type and side.
    pub kind: ErrorKind,
    /// Human-readable reason.
    pub message: String,
    /// The request parameter at fault, if any.
    pub param: Option<&'static str>,
    /// Overrides the table's `code` (rate limits name the limit hit).
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying, for `Retry-After`.
    pub retry_after_secs: Option<u64>,
    /// More response headers, name and value (a rate-limit refusal reports its `x-ratelimit-*` quota).
    pub headers: Vec<(&'static str, String)>,
}

impl GatewayError {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), param: None, code: None, retry_after_secs: None, headers: Vec::new() }
    }

    /// Names the request parameter at fault.
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Overrides the table's `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Sets the `Retry-After` seconds.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Adds a response header (`name` in lower case).
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// HTTP status code.
    pub fn status(&self) -> u16 {
        self.kind.spec().status
    }

    /// Who is at fault.
    pub fn side(&self) -> Side {
        self.kind.spec().side
    }

    /// Whether trying another worker may help: only for upstream failures.
    pub fn retryable(&self) -> bool {
        self.side() == Side::Upstream
    }

    /// The OpenAI-shaped JSON body.
    pub fn body(&self) -> serde_json::Value {
        let spec = self.kind.spec();
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": spec.kind,
                "param": self.param,
                "code": self.code.unwrap_or(spec.code),
            }
        })
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.spec().code)
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let err = GatewayError::new(ErrorKind::ModelNotFound, "no such model: x").with_param("model");
        let body = err.body();
        assert_eq!(err.status(), 404);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["message"], "no such model: x");
    }

    #[test]
    fn code_override_and_side() {
        let err = GatewayError::new(ErrorKind::RateLimited, "slow down").with_code("per_user_rpm");
        assert_eq!(err.body()["error"]["code"], "per_user_rpm");
        assert!(!err.retryable());
        assert!(GatewayError::new(ErrorKind::UpstreamUnavailable, "refused").retryable());
        assert_eq!(GatewayError::new(ErrorKind::QueueFull, "full").body()["error"]["param"], serde_json::Value::Null);
    }
}
