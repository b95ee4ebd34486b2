//! The HTTP surface, mirroring vLLM's OpenAI server: generation endpoints (streaming and not), embeddings,
//! models, health, version, Prometheus metrics, and the simulator's own `/sim/faults` control. Handlers
//! parse with `openai`, admit through the `engine`, and time tokens with `generate`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::time::Instant;

use crate::config::{Faults, SimConfig};
use crate::engine::{Engine, SubmitError};
use crate::error::ApiError;
use crate::generate::{Generation, Step, Timing};
use crate::metrics::FinishReason;
use crate::openai::{parse_embeddings, parse_generation, Endpoint, Formatter};
use crate::serve::ConnKiller;
use crate::tokenizer::{count_tokens, fnv1a, tokenize};

/// The vLLM version this simulator claims to be.
pub const VLLM_VERSION: &str = "0.11.0";

/// Shared state of one simulated worker: config, live faults and the engine. Cheap to clone.
#[derive(Clone)]
pub struct SimState(Arc<Shared>);

struct Shared {
    cfg: SimConfig,
    faults: Mutex<Faults>,
    engine: Arc<Engine>,
    next_request: AtomicU64,
    created: u64,
    responses: crate::responses::ResponseStore,
}

impl SimState {
    /// A fresh worker state for `cfg` (faults start as `cfg.faults`).
    pub fn new(cfg: SimConfig) -> Self {
        let engine = Arc::new(Engine::new(cfg.max_num_seqs, cfg.max_num_queued, cfg.kv_blocks, cfg.block_size));
        Self(Arc::new(Shared {
            faults: Mutex::new(cfg.faults.clone()),
            cfg,
            engine,
            next_request: AtomicU64::new(0),
            created: unix_now(),
            responses: crate::responses::ResponseStore::default(),
        }))
    }

    /// The configuration this worker started with (its `faults` field is the initial faults only).
    pub fn config(&self) -> &SimConfig {
        &self.0.cfg
    }

    /// Requests in the running batch.
    pub fn running(&self) -> usize {
        self.0.engine.running()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.0.engine.waiting()
    }

    /// Faults in force now.
    pub fn faults(&self) -> Faults {
        self.0.faults.lock().clone()
    }

    /// Replace the faults in force.
    pub fn set_faults(&self, f: Faults) {
        *self.0.faults.lock() = f;
    }

    /// The Prometheus text `/metrics` serves, in the configured dialect.
    pub fn metrics_text(&self) -> String {
        let gauges = self.0.engine.gauges();
        match self.0.cfg.metrics_dialect {
            crate::MetricsDialect::Vllm => self.0.engine.metrics.render(&self.0.cfg.model, gauges),
            other => self.0.engine.metrics.render_dialect(other, gauges),
        }
    }

    /// The engine.
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.0.engine
    }

    /// The ids of the responses this process created.
    pub(crate) fn responses(&self) -> &crate::responses::ResponseStore {
        &self.0.responses
    }

    /// Request `i` draws from its own stream derived from the seed, so runs are reproducible.
    pub(crate) fn request_rng(&self) -> SmallRng {
        let i = self.0.next_request.fetch_add(1, Ordering::Relaxed);
        SmallRng::seed_from_u64(splitmix64(self.0.cfg.seed ^ splitmix64(i)))
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The simulator's router. Tests may drive it without a socket; `die_after_tokens` on a non-streaming
/// request can then only break the body, since there is no connection to cut.
pub fn app(state: SimState) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(crate::responses::create))
        .route("/v1/rerank", post(crate::stubs::rerank))
        .route("/rerank", post(crate::stubs::rerank))
        .route("/v2/rerank", post(crate::stubs::rerank))
        .route("/v1/score", post(crate::stubs::score_texts))
        .route("/score", post(crate::stubs::score_texts))
        .route("/tokenize", post(crate::stubs::tokenize))
        .route("/detokenize", post(crate::stubs::detokenize))
        .route("/pooling", post(crate::stubs::pooling))
        .route("/v1/audio/transcriptions", post(crate::stubs::transcriptions))
        .route("/v1/models", get(models))
        .route("/version", get(version))
        .route("/sim/faults", get(get_faults).post(set_faults));
    // Servers that are not vLLM may lack either endpoint: the gateway must cope.
    if state.0.cfg.health_endpoint {
        router = router.route("/health", get(health));
    }
    // Where other engines state their concurrency (vLLM states none).
    router = match state.0.cfg.metrics_dialect {
        crate::MetricsDialect::Llamacpp => router.route("/props", get(crate::stubs::props)),
        crate::MetricsDialect::Tgi => router.route("/info", get(crate::stubs::tgi_info)),
        crate::MetricsDialect::Sglang => router.route("/get_server_info", get(crate::stubs::sglang_info)),
        _ => router,
    };
    if state.0.cfg.metrics_dialect != crate::MetricsDialect::None {
        router = router.route("/metrics", get(metrics));
    }
    router
        // vLLM puts no limit on prompt size; neither do we.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn chat(State(s): State<SimState>, killer: Option<Extension<ConnKiller>>, body: Bytes) -> Response {
    generate(s, Endpoint::Chat, killer.map(|k| k.0), body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<SimState>, killer: Option<Extension<ConnKiller>>, body: Bytes) -> Response {
    generate(s, Endpoint::Completions, killer.map(|k| k.0), body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    s: SimState,
    endpoint: Endpoint,
    killer: Option<ConnKiller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let cfg = &s.0.cfg;
    let req = parse_generation(endpoint, &body, &cfg.model)?;
    let faults = s.faults();
    let mut rng = s.request_rng();
    let id: u128 = rng.random();
    // Always draw, so the output of request `i` does not depend on the error rate.
    let error_draw: f64 = rng.random();
    let (lo, hi) = (cfg.output_tokens.0.min(cfg.output_tokens.1), cfg.output_tokens.0.max(cfg.output_tokens.1));
    let drawn = rng.random_range(lo..=hi);
    if error_draw < faults.error_rate {
        return Err(ApiError::internal("Simulated engine failure (error_rate fault)."));
    }

    let prompt = tokenize(&cfg.model, &req.prompt, cfg.block_size);
    let requested = prompt.tokens.saturating_add(req.max_tokens.unwrap_or(0));
    if prompt.tokens >= cfg.max_model_len || requested > cfg.max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {requested} tokens ({} in \
             the messages, {} in the completion). Please reduce the length of the messages or completion.",
            cfg.max_model_len,
            prompt.tokens,
            req.max_tokens.unwrap_or(0),
        )));
    }
    let room = cfg.max_model_len - prompt.tokens;
    let cap = req.max_tokens.unwrap_or(room).min(room);
    let (planned, reason) = if drawn >= cap { (cap, FinishReason::Length) } else { (drawn, FinishReason::Stop) };

    let ticket = s.0.engine.submit(&prompt, planned).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::overloaded(format!(
            "The server is overloaded: {} requests are already waiting.",
            cfg.max_num_queued
        )),
        SubmitError::TooLarge { needed, capacity } => ApiError::bad_request(format!(
            "The request needs {needed} KV-cache blocks but the cache only has {capacity}."
        )),
    })?;
    let timing = Timing {
        ttft_ms: cfg.ttft_ms,
        prefill_ms_per_1k_tokens: cfg.prefill_ms_per_1k_tokens,
        itl_ms: cfg.itl_ms,
        extra_latency_ms: faults.extra_latency_ms,
    };
    let mut gen =
        Generation::new(ticket, timing, rng, arrival, prompt.tokens, planned, reason, faults.die_after_tokens);
    if faults.hang {
        // Hold the request (and its engine slot) until the client gives up and this future is dropped.
        std::future::pending::<()>().await;
    }
    let fmt = Formatter::new(endpoint, &format!("{id:032x}"), unix_now(), &cfg.model);
    if req.stream {
        // A server that ignores `stream_options.include_usage` (`--ignore-include-usage`) sends no usage chunk.
        let usage = req.include_usage && !cfg.ignore_include_usage;
        return Ok(sse_response(gen, fmt, endpoint, usage));
    }
    gen.begin().await;
    let mut text = String::new();
    loop {
        match gen.next().await {
            Step::Token(t) => text.push_str(t),
            Step::Done(reason) => {
                let body = fmt.full_body(&text, reason, gen.usage());
                return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
            }
            Step::Died => {
                if let Some(k) = killer {
                    k.kill();
                    std::future::pending::<()>().await;
                }
                let broken = futures_util::stream::once(async { Err::<Bytes, _>(died()) });
                return Ok(Body::from_stream(broken).into_response());
            }
        }
    }
}

fn died() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "die_after_tokens fault: simulated crash")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Tokens,
    Usage,
    Done,
    End,
}

/// The SSE body. It owns the generation, so the request holds its engine slot exactly as long as the body
/// lives; each chunk is yielded as soon as its token exists.
fn sse_response(gen: Generation, fmt: Formatter, endpoint: Endpoint, include_usage: bool) -> Response {
    let state = (gen, fmt, Phase::Start);
    let stream = futures_util::stream::unfold(state, move |(mut gen, fmt, mut phase)| async move {
        loop {
            let out = match phase {
                Phase::Start => {
                    gen.begin().await;
                    phase = Phase::Tokens;
                    match endpoint {
                        Endpoint::Chat => Ok(fmt.role_chunk()),
                        Endpoint::Completions => continue,
                    }
                }
                Phase::Tokens => match gen.next().await {
                    Step::Token(t) => Ok(fmt.token_chunk(t)),
                    Step::Done(reason) => {
                        phase = if include_usage { Phase::Usage } else { Phase::Done };
                        Ok(fmt.finish_chunk(reason))
                    }
                    Step::Died => {
                        // Let hyper flush the chunks already written (it flushes when the body is pending),
                        // so the client sees exactly N tokens before the cut, even with zero latencies.
                        tokio::task::yield_now().await;
                        phase = Phase::End;
                        Err(died())
                    }
                },
                Phase::Usage => {
                    phase = Phase::Done;
                    Ok(fmt.usage_chunk(gen.usage()))
                }
                Phase::Done => {
                    phase = Phase::End;
                    Ok(Formatter::done())
                }
                Phase::End => return None,
            };
            return Some((out, (gen, fmt, phase)));
        }
    });
    ([(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")], Body::from_stream(stream)).into_response()
}

async fn embeddings(State(s): State<SimState>, body: Bytes) -> Result<Response, ApiError> {
    let cfg = &s.0.cfg;
    let inputs = parse_embeddings(&body, &cfg.model)?;
    let mut prompt_tokens = 0u32;
    let data: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            prompt_tokens = prompt_tokens.saturating_add(count_tokens(text));
            let mut h = fnv1a(cfg.seed, text);
            let embedding: Vec<f64> = (0..8)
                .map(|_| {
                    h = splitmix64(h);
                    (h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
                })
                .collect();
            json!({"index": index, "object": "embedding", "embedding": embedding})
        })
        .collect();
    let id: u128 = s.request_rng().random();
    Ok(Json(json!({
        "id": format!("embd-{id:032x}"), "object": "list", "created": unix_now(), "model": cfg.model, "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
    }))
    .into_response())
}

async fn models(State(s): State<SimState>) -> Json<serde_json::Value> {
    let cfg = &s.0.cfg;
    Json(json!({"object": "list", "data": [{
        "id": cfg.model, "object": "model", "created": s.0.created, "owned_by": "vllm", "root": cfg.model,
        "parent": null, "max_model_len": cfg.max_model_len, "permission": [],
    }]}))
}

async fn health(State(s): State<SimState>) -> StatusCode {
    if s.0.faults.lock().refuse_health {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({"version": VLLM_VERSION}))
}

async fn metrics(State(s): State<SimState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics_text()).into_response()
}

async fn get_faults(State(s): State<SimState>) -> Json<Faults> {
    Json(s.faults())
}

async fn set_faults(State(s): State<SimState>, body: Bytes) -> Result<Json<Faults>, ApiError> {
    let f: Faults = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid faults: {e}")))?;
    s.set_faults(f.clone());
    tracing::info!(faults = ?f, "faults replaced");
    Ok(Json(f))
}
