//! The inference endpoints: read and parse the body, admit, pick a worker, forward the original bytes,
//! relay the answer. Failures before the first byte reaches the client are retried on another worker.
//!
//! The modules, in the order a request meets them: [`endpoint`] (what sets each endpoint apart),
//! [`request`] (id, body, features, model), [`models`] (an alias's body rewrite), [`response_homes`]
//! (where a Responses follow-up goes), [`admission`] (the queue in front of full workers and budgets),
//! [`dispatch`] (pick, send, retry, with
//! [`upstream`]), [`classify`] (what an attempt's end means), [`relay`] (the answer's body),
//! [`accounting`] (the attempt's record, settled once), [`usage`] and [`sse`] (token counts, stream
//! scanning).

pub mod accounting;
pub mod admission;
pub mod classify;
pub mod dispatch;
pub mod endpoint;
pub mod models;
pub mod relay;
pub mod request;
pub mod response_homes;
pub mod sse;
pub mod usage;

use crate::config::OnLimit;
use crate::error::ApiError;
use crate::metrics::{status_label, Active};
use crate::proxy::accounting::RequestInfo;
use crate::proxy::admission::Affinity;
use crate::proxy::dispatch::{dispatch, Attempts, Failed, Outbound};
use crate::proxy::endpoint::Endpoint;
use crate::proxy::request::{
    apply_headers, check_content_type, fairness_key, read_body, request_timeout, resolve_model, ClientHeaders,
    RequestId, X_ESTIMATED_WAIT, X_QUEUE_POSITION, X_REQUEST_ID,
};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use gateway_core::request::PrefixOptions;
use gateway_core::{ErrorKind, GatewayError, Priority, RequestFeatures};
use http::header::HeaderValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The budget key of a model's own limits in its queue (tenants' keys are their fairness keys).
const MODEL_BUDGET: u64 = u64::MAX;

/// Every inference endpoint ([`endpoint::ROUTES`]): `/v1/chat/completions`, `/v1/responses`, ...
pub async fn forward(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let client = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    forward_from(app, req, client, std::convert::identity).await
}

/// [`forward`] for a request from `client` (the server calls it directly, without the router), its
/// response handed to `wrap`: the server's wrapping done inside this future, not in another future
/// around it, which copied this one's ~4 KB twice more per request (callgrind, 1,200 instructions).
pub async fn forward_from<R>(
    app: Arc<AppState>,
    req: Request,
    client: Option<std::net::IpAddr>,
    wrap: impl FnOnce(Response) -> R,
) -> R {
    let received = Instant::now();
    let (parts, body) = req.into_parts();
    let headers = ClientHeaders::read(&parts.headers);
    let request_id = RequestId::new(headers.request_id);
    let mut resp = match handle(&app, &parts, body, &headers, client, &request_id, received).await {
        Ok(resp) => resp,
        Err(Refusal { error, model }) => {
            let status = error.status();
            app.metrics
                .requests
                .with_label_values(&[model.as_deref().unwrap_or("unknown"), status_label(status)])
                .inc();
            tracing::info!(request_id = %request_id, model = model.as_deref().unwrap_or("-"), status, error = %error, "request");
            ApiError(error).into_response()
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id.header());
    wrap(resp)
}

/// The gateway's own answer to a request it did not forward, with the model it named once known.
struct Refusal {
    error: GatewayError,
    model: Option<Arc<str>>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Self { error, model: None }
    }
}

/// The phases in order: snapshot, tenant, body, features, model, rate limits, then admission and
/// dispatch until a worker answers (a request that finds no room after admission goes back to the queue).
async fn handle(
    app: &Arc<AppState>,
    parts: &http::request::Parts,
    body: axum::body::Body,
    headers: &ClientHeaders<'_>,
    client_addr: Option<std::net::IpAddr>,
    request_id: &RequestId,
    received: Instant,
) -> Result<Response, Refusal> {
    let active = Active::new(&app.metrics.active_requests);
    let snap = app.snapshot.load_full();
    // Unknown callers are turned away before their body is read. A batch line carries its batch's
    // tenant in an extension only the in-process runner can set.
    let batch_line = parts.extensions.get::<crate::batch::BatchOrigin>().cloned();
    let tenant = match &batch_line {
        Some(origin) => origin.tenant.clone(),
        None => snap.auth.authenticate(&parts.headers)?,
    };
    let endpoint = Endpoint::from_path(parts.uri.path());
    let boundary = if endpoint.multipart() {
        Some(multipart_boundary(headers.content_type)?)
    } else {
        check_content_type(headers.content_type)?;
        None
    };
    // The body's bytes stay counted in `server.max_buffered_bytes` until this request is answered.
    let (mut bytes, _buffered) =
        read_body(body, headers.declared_length(), &snap.config.server, &app.body_budget).await?;
    let mut features = match &boundary {
        Some(boundary) => multipart_features(&bytes, boundary)?,
        None => RequestFeatures::parse(&bytes, prefix_options(&*snap.policy)).map_err(|e| {
            let why = gateway_core::echo(&e.to_string()).into_owned();
            GatewayError::new(ErrorKind::InvalidJson, format!("invalid JSON body: {why}"))
        })?,
    };
    if let Some(t) = &tenant {
        features.priority = t.priority;
    }
    apply_headers(&mut features, headers);
    if batch_line.is_some() {
        features.priority = Priority::Batch;
    }
    let model = resolve_model(&snap, &features)?;
    let fail = |error| Refusal { error, model: Some(Arc::clone(&model)) };
    let model_cfg = snap.config.model(&model);
    // The model's default class, below the API key's (when not the default) and `X-Priority`.
    if let Some(p) = model_cfg.and_then(|m| m.priority) {
        let key_set = tenant.as_ref().is_some_and(|t| t.priority != Priority::Normal);
        if batch_line.is_none() && !key_set && headers.priority.is_none() {
            features.priority = p;
        }
    }
    // An alias: the worker receives the served name (in a JSON body; a multipart form keeps its field).
    if boundary.is_none() && features.model.as_deref().is_some_and(|m| m != &*model) {
        bytes = crate::proxy::models::rewrite_model(&bytes, &model).map_err(fail)?;
    }
    let cap = request_timeout(headers.request_timeout).map_err(fail)?;
    let fairness = fairness_key(tenant.as_deref().map(|t| &*t.name).or(features.user.as_deref()), client_addr);
    let mut spec = app.admission.wait_spec(&snap.config, &model, features.priority, fairness, cap, Instant::now());
    let rl = &snap.config.rate_limit;
    let (quota, mut charge, budget_wait) = if rl.enabled {
        let tokens = features.estimated_tokens(rl.default_max_tokens);
        let limiter = app.limiter.load_full();
        let who = features.user.as_deref();
        let check = || limiter.try_check(rl, &app.metrics, tenant.as_deref(), who, model_cfg, tokens);
        let queue_mode = rl.on_limit == OnLimit::Queue && snap.config.queue.enabled;
        // Budget keys: the tenant's (its fairness key) and the model's, shared by all tenants.
        let key_of = |limit: crate::limits::Limit| if limit.per_model() { MODEL_BUDGET } else { fairness };
        // A newcomer behind waiters for its budget joins them rather than taking the budget first.
        let behind =
            [fairness, MODEL_BUDGET].into_iter().find(|&k| queue_mode && app.admission.has_budget_waiters(&model, k));
        let first = match behind {
            Some(key) => Err((key, Instant::now())),
            None => match check().await.map_err(fail)? {
                Ok(admitted) => Ok(admitted),
                Err(refused) => {
                    let ready_at = Instant::now() + refused.refusal.retry_after;
                    if !queue_mode || !refused.refusal.limit.waitable() || ready_at > spec.deadline {
                        return Err(fail(refused.into_error(&app.metrics)));
                    }
                    Err((key_of(refused.refusal.limit), ready_at))
                }
            },
        };
        match first {
            Ok((quota, charge)) => (Some(quota), charge, None),
            Err((key, ready_at)) => {
                let metrics = &app.metrics;
                let recheck = || async {
                    Ok(match check().await? {
                        Ok(admitted) => Ok(admitted),
                        Err(refused) => Err((Instant::now() + refused.refusal.retry_after, refused)),
                    })
                };
                let give_up = |refused: crate::limits::Refused| refused.into_error(metrics);
                // Boxed: waiting for a budget is rare, and its future would be part of every request's.
                let waited = Box::pin(app.admission.wait_for_budget(&model, &spec, key, ready_at, recheck, give_up));
                let ((quota, charge), ticket) = waited.await.map_err(fail)?;
                (Some(quota), charge, Some(ticket))
            }
        }
    } else {
        (None, None, None)
    };
    // The model's concurrency: held until the response body ends.
    let limit = model_cfg.map_or(0, |m| m.max_concurrency);
    let model_permit = match app.admission.model_permit(&model, limit, spec.deadline).await {
        Ok(permit) => permit,
        Err(e) => {
            if let Some(charge) = charge.take() {
                charge.reconcile(0);
            }
            return Err(fail(e));
        }
    };
    // Token limits need the real usage of streams too: ask the worker for it, and strip it again when
    // the client did not ask.
    let strip_usage = charge.is_some() && features.stream && !features.include_usage && endpoint.stream_usage_option();
    if strip_usage {
        bytes = crate::proxy::usage::with_include_usage(&bytes).map_err(fail)?;
    }
    let info = Arc::new(RequestInfo {
        metrics: Arc::clone(&app.metrics),
        snap: Arc::clone(&snap),
        series: app.metrics.model_series(&model),
        model: Arc::clone(&model),
        request_id: request_id.clone(),
        tenant: tenant.as_ref().map(|t| Arc::clone(&t.name)),
        received,
        stream: features.stream,
        prompt_estimate: u32::try_from(features.prompt_tokens()).unwrap_or(u32::MAX),
        endpoint,
        response_homes: (endpoint == Endpoint::Responses && app.response_homes.enabled())
            .then(|| Arc::clone(&app.response_homes)),
        cluster: Arc::clone(&app.cluster),
    });
    // A Responses follow-up goes to the worker holding the response it continues, while it is eligible.
    let pinned = (endpoint == Endpoint::Responses)
        .then_some(features.previous_response_id.as_deref())
        .flatten()
        .and_then(|id| app.response_homes.home_of(id))
        .and_then(|url| snap.fleet.workers.iter().find(|w| *w.base_url == *url).map(|w| w.id));
    let mut out = Outbound {
        parts,
        bytes: &bytes,
        features: &features,
        info,
        charge,
        strip_usage,
        active: Some(active),
        model_permit,
        queue_wait: budget_wait.map_or(Duration::ZERO, |t| t.waited),
        pinned,
    };
    let mut attempts = Attempts::default();
    loop {
        let eligible =
            dispatch::narrow(dispatch::eligible(app, &snap, &model, &attempts.tried, Instant::now()), pinned);
        let affinity = || {
            let (policy, features) = (Arc::clone(&snap.policy), features.clone());
            let prefill: Affinity = Box::new(move |worker| policy.prefill_time(&features, worker));
            Some(prefill)
        };
        let (mut ticket, reservation) = app.admission.admit(&model, &eligible, &spec, affinity).await.map_err(fail)?;
        // Waiting for budget was waiting in the queue too.
        if let Some(b) = budget_wait.filter(|_| ticket.position == 0) {
            ticket.position = b.position;
        }
        if ticket.position > 0 {
            app.metrics.queue_wait.with_label_values(&[&model]).observe(ticket.waited.as_secs_f64());
        }
        out.queue_wait += ticket.waited;
        // Straight through admission, the eligible list is still the one to pick from.
        let fresh = (reservation.is_none() && ticket.waited.is_zero()).then_some(eligible);
        match dispatch(app, &snap, &mut out, reservation, &mut attempts, fresh).await {
            Err(Failed::NoRoom) => {
                spec.retries += 1;
                continue;
            }
            Err(Failed::Error(e)) => {
                // Nothing was generated: the tokens charged up front go back.
                if let Some(charge) = out.charge.take() {
                    charge.reconcile(0);
                }
                return Err(fail(e));
            }
            Ok(mut resp) => {
                app.admission.record_dispatch(&model, out.queue_wait);
                let h = resp.headers_mut();
                h.insert(X_QUEUE_POSITION.clone(), queue_position_header(ticket.position));
                h.insert(X_ESTIMATED_WAIT.clone(), estimated_wait_header(ticket.estimated_wait));
                if let Some(q) = &quota {
                    crate::limits::set_headers(h, q);
                }
                return Ok(resp);
            }
        }
    }
}

/// How the prompt is read for the policy in force: no prefix hashes, or no session key from its
/// messages, for a policy that reads none.
fn prefix_options(policy: &dyn routing::Policy) -> PrefixOptions {
    let all = PrefixOptions::default();
    PrefixOptions {
        max_chunks: if policy.uses_prefix_hashes() { all.max_chunks } else { 0 },
        session_from_messages: policy.uses_session_key(),
        ..all
    }
}

/// `X-Queue-Position`: most requests waited behind nobody, and a static `0` allocates nothing.
fn queue_position_header(position: usize) -> HeaderValue {
    if position == 0 {
        HeaderValue::from_static("0")
    } else {
        HeaderValue::from(position)
    }
}

/// `X-Estimated-Wait`: seconds with one decimal (most requests wait for nothing: no formatting then).
fn estimated_wait_header(wait: Duration) -> HeaderValue {
    if wait < Duration::from_millis(50) {
        return HeaderValue::from_static("0.0");
    }
    HeaderValue::from_str(&format!("{:.1}", wait.as_secs_f64())).unwrap_or_else(|_| HeaderValue::from_static("0.0"))
}

/// The boundary of a multipart endpoint's body; any other `Content-Type` is refused.
fn multipart_boundary(content_type: Option<&HeaderValue>) -> Result<String, GatewayError> {
    let ct = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    gateway_core::multipart::boundary(ct).map(str::to_owned).ok_or_else(|| {
        GatewayError::new(
            ErrorKind::UnsupportedContentType,
            format!("Content-Type must be multipart/form-data with a boundary, got {:?}", gateway_core::echo(ct)),
        )
    })
}

/// What routing reads from a multipart body: its `model` and `stream` form fields.
fn multipart_features(body: &[u8], boundary: &str) -> Result<RequestFeatures, GatewayError> {
    let fields = gateway_core::multipart::form_fields(body, boundary).map_err(|why| {
        GatewayError::new(ErrorKind::InvalidJson, format!("invalid multipart body: {why}"))
            .with_code("invalid_multipart")
    })?;
    Ok(RequestFeatures { model: fields.model, stream: fields.stream, ..RequestFeatures::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future is built on the stack and copied into its box, so its size is CPU per
    /// request: rare paths (Redis, a new connection, waiting for a budget) are boxed where they start,
    /// not carried inline. This one was 3.9 KB at stop 31; the connection service's box around it had been
    /// 13.8 KB.
    #[tokio::test]
    async fn a_request_future_stays_small() {
        let app = crate::state::AppState::new(crate::config::Config::default()).expect("state");
        let req = Request::new(axum::body::Body::empty());
        let size = std::mem::size_of_val(&forward_from(app, req, None, std::convert::identity));
        assert!(size <= 5 * 1024, "the request future takes {size} bytes");
    }
}
