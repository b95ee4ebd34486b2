//! The inference endpoints the gateway passes through, and what sets each apart: how its body is read
//! for routing, whether its streams carry `stream_options` usage and end with `data: [DONE]`, and
//! whether its answers name a response a follow-up may point back to.
//!
//! Every one of them is routed by its model through the same path (limits, queue, breakers, relay).

/// One inference endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/responses`: streams are typed events ending with `response.completed`, no `[DONE]`; the
    /// worker keeps the response for follow-ups (`previous_response_id`).
    Responses,
    /// `/v1/rerank`, `/rerank`, `/v2/rerank`.
    Rerank,
    /// `/v1/score`, `/score`.
    Score,
    /// `/tokenize`.
    Tokenize,
    /// `/detokenize`.
    Detokenize,
    /// `/pooling`.
    Pooling,
    /// `/v1/audio/transcriptions`: `multipart/form-data`, `model` a form field.
    Transcriptions,
    /// `/v1/audio/translations`: as transcriptions.
    Translations,
}

/// Every path the gateway passes through and its endpoint, for the router.
pub const ROUTES: &[(&str, Endpoint)] = &[
    ("/v1/chat/completions", Endpoint::Chat),
    ("/v1/completions", Endpoint::Completions),
    ("/v1/embeddings", Endpoint::Embeddings),
    ("/v1/responses", Endpoint::Responses),
    ("/v1/rerank", Endpoint::Rerank),
    ("/rerank", Endpoint::Rerank),
    ("/v2/rerank", Endpoint::Rerank),
    ("/v1/score", Endpoint::Score),
    ("/score", Endpoint::Score),
    ("/tokenize", Endpoint::Tokenize),
    ("/detokenize", Endpoint::Detokenize),
    ("/pooling", Endpoint::Pooling),
    ("/v1/audio/transcriptions", Endpoint::Transcriptions),
    ("/v1/audio/translations", Endpoint::Translations),
];

impl Endpoint {
    /// Whether `req` is one the proxy serves (a POST to one of [`ROUTES`]), which the server hands to
    /// [`crate::proxy::forward_from`] without the router.
    pub fn is_proxied<B>(req: &http::Request<B>) -> bool {
        req.method() == http::Method::POST && Self::at(req.uri().path()).is_some()
    }

    /// The endpoint served at `path` (chat completions for a path not in [`ROUTES`], which only a
    /// caller bypassing the router can send).
    pub fn from_path(path: &str) -> Self {
        Self::at(path).unwrap_or(Self::Chat)
    }

    /// The endpoint of `path` in [`ROUTES`], if any.
    fn at(path: &str) -> Option<Self> {
        ROUTES.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
    }

    /// Whether the body is `multipart/form-data` (else JSON).
    pub fn multipart(self) -> bool {
        matches!(self, Self::Transcriptions | Self::Translations)
    }

    /// Whether its streams take `stream_options.include_usage` (so token limits may ask for usage).
    pub fn stream_usage_option(self) -> bool {
        matches!(self, Self::Chat | Self::Completions)
    }

    /// Whether a complete event stream of it ends with `data: [DONE]` (a Responses stream ends with
    /// its `response.completed` event instead).
    pub fn stream_ends_with_done(self) -> bool {
        !matches!(self, Self::Responses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_endpoints() {
        assert_eq!(Endpoint::from_path("/v1/responses"), Endpoint::Responses);
        assert_eq!(Endpoint::from_path("/v2/rerank"), Endpoint::Rerank);
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Endpoint::Chat);
        assert!(Endpoint::from_path("/v1/audio/transcriptions").multipart());
        assert!(!Endpoint::Responses.stream_ends_with_done());
        assert!(!Endpoint::Responses.stream_usage_option() && Endpoint::Chat.stream_usage_option());
        let mut paths: Vec<_> = ROUTES.iter().map(|(p, _)| *p).collect();
        paths.dedup();
        assert_eq!(paths.len(), ROUTES.len(), "each path once");
    }
}
