//! Streaming edge cases vllm-sim does not produce: a scripted upstream on loopback speaks raw SSE.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use axum::body::Body;
use axum::routing::{get, post};
use common::*;
use futures_util::stream;
use std::convert::Infallible;
use std::time::Duration;

/// A scripted worker: `/v1/models` says `m`, `/health` is fine, chat answers the given SSE script,
/// where `None` stalls forever.
async fn scripted(script: Vec<Option<&'static str>>) -> String {
    let app = axum::Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "" }))
        .route("/v1/models", get(|| async { axum::Json(serde_json::json!({"object":"list","data":[{"id":"m"}]})) }))
        .route(
            "/v1/chat/completions",
            post(move || {
                let script = script.clone();
                async move {
                    let events = stream::unfold(script.into_iter(), |mut it| async move {
                        match it.next()? {
                            Some(chunk) => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                Some((Ok::<_, Infallible>(bytes::Bytes::from_static(chunk.as_bytes())), it))
                            }
                            None => {
                                std::future::pending::<()>().await;
                                None
                            }
                        }
                    });
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(events))
                        .expect("valid response")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn stream_through(upstream: String, idle_ms: u64) -> String {
    let mut cfg = test_config(vec![llm_gateway::config::WorkerConfig::from_url(upstream)]);
    cfg.upstream.idle_timeout_ms = idle_ms;
    let gw = gateway(cfg).await;
    let resp =
        client().post(format!("{}/v1/chat/completions", gw.url())).json(&chat("m", "hi", true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("the stream must end").unwrap()
}

#[tokio::test]
async fn comment_lines_pass_through_without_breaking_events() {
    let body = stream_through(
        scripted(vec![
            Some(": keep-alive\n\n"),
            Some("data: {\"a\":1}\n\n"),
            Some(": ping\n\n"),
            Some("data: [DONE]\n\n"),
        ])
        .await,
        5_000,
    )
    .await;
    assert!(body.contains(": keep-alive"), "{body}");
    assert_eq!(sse_events(&body), vec![r#"{"a":1}"#.to_string(), "[DONE]".to_string()], "{body}");
}

#[tokio::test]
async fn a_stream_closed_without_done_gets_an_error_event() {
    let body = stream_through(scripted(vec![Some("data: {\"a\":1}\n\n"), Some("data: {\"a\"")]).await, 5_000).await;
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let err: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("error event is its own event");
    assert_eq!(err["error"]["code"], "upstream_stream_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("before [DONE]"), "{body}");
}

#[tokio::test]
async fn a_stalled_stream_times_out_with_an_error_event() {
    let body = stream_through(scripted(vec![Some("data: {\"a\":1}\n\n"), None]).await, 300).await;
    let events = sse_events(&body);
    assert_eq!(events.first().map(String::as_str), Some(r#"{"a":1}"#), "{body}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    assert!(body.contains("idle_timeout_ms"), "{body}");
}

#[tokio::test]
async fn a_stream_still_sending_at_its_total_timeout_ends_with_an_error_event() {
    // Events every 5 ms for about two seconds: the idle timeout never fires, the total one does.
    let upstream = scripted(std::iter::repeat_n(Some("data: {\"a\":1}\n\n"), 400).collect()).await;
    let mut cfg = test_config(vec![llm_gateway::config::WorkerConfig::from_url(upstream)]);
    cfg.upstream.idle_timeout_ms = 5_000;
    cfg.upstream.total_timeout_ms = 400;
    let gw = gateway(cfg).await;
    let resp =
        client().post(format!("{}/v1/chat/completions", gw.url())).json(&chat("m", "hi", true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("the stream must end").unwrap();
    let events = sse_events(&body);
    assert!(events.len() > 3 && events.len() < 400, "some events, not all: {}", events.len());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    assert!(body.contains("total_timeout_ms") && !body.contains("idle_timeout_ms"), "{body}");
}
