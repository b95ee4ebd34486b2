//! The one error type of the HTTP layer, rendered once in vLLM's error shape
//! `{"object":"error","message":...,"type":...,"param":null,"code":N}` so clients and the gateway see what a
//! real vLLM would send. All `type` strings live in [`ApiError`]'s constructors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answer: HTTP status, vLLM `type` and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (also the body's `code`).
    pub status: StatusCode,
    /// vLLM's error `type`, e.g. `BadRequestError`.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed or asks for the impossible.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "BadRequestError", message: message.into() }
    }

    /// 404: the request names a model this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message: format!("The model `{model}` does not exist."),
        }
    }

    /// 500: an injected engine failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "InternalServerError", message: message.into() }
    }

    /// 503: the waiting queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, kind: "ServiceUnavailableError", message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "object": "error",
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.status.as_u16(),
        });
        (self.status, axum::Json(body)).into_response()
    }
}
