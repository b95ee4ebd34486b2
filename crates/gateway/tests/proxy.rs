//! The proxy end to end: real sims, real gateway, real HTTP on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use vllm_sim::{Faults, SimConfig};

#[tokio::test]
async fn non_stream_chat_and_completions_pass_through() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let c = client();
    let resp = post_chat(&gw.url(), false).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated ids are UUIDs: {id}");
    assert_eq!(resp.headers()["x-gateway-worker"], "sim-0");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let resp = c
        .post(format!("{}/v1/completions", gw.url()))
        .header("x-request-id", "my-id-1")
        .json(&serde_json::json!({"model": "demo-model", "prompt": "once upon", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "my-id-1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn model_may_be_absent_when_one_is_served() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn stream_is_relayed_incrementally_and_ends_with_done() {
    let sims = sims(1, |_| SimConfig { ttft_ms: 5.0, itl_ms: 25.0, output_tokens: (20, 20), ..fast_sim() }).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let started = Instant::now();
    let resp = post_chat(&gw.url(), true).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let mut first_at = None;
    let mut body = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        first_at.get_or_insert_with(|| started.elapsed());
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let total = started.elapsed();
    let first = first_at.unwrap();
    // 20 tokens at >= 25 ms each take >= 500 ms; the first chunk must come long before the end.
    assert!(total >= Duration::from_millis(450), "total {total:?}");
    assert!(first * 3 < total, "first chunk at {first:?} of {total:?}");
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first_event: serde_json::Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first_event["choices"][0]["delta"]["role"], "assistant");
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_releases_the_worker() {
    let sims = sims(1, |_| SimConfig { itl_ms: 50.0, output_tokens: (400, 400), ..fast_sim() }).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let resp = post_chat(&gw.url(), true).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(sims[0].running(), 1);
    let worker = gw.state.snapshot.load().fleet.workers[0].clone();
    assert_eq!(worker.stats.slots.in_flight(), 1);
    let active = || async {
        let m = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
        metric_value(&m, "llm_gateway_active_requests")
    };
    assert_eq!(active().await, 1.0, "a stream is active until its body ends");
    drop(stream);
    wait_for("the sim to stop running the request", Duration::from_secs(5), || async { sims[0].running() == 0 }).await;
    wait_for("the gateway to release the slot", Duration::from_secs(5), || async {
        worker.stats.slots.in_flight() == 0
    })
    .await;
    wait_for("the active gauge to drop", Duration::from_secs(5), || async { active().await == 0.0 }).await;
}

#[tokio::test]
async fn upstream_death_mid_stream_ends_with_an_error_event() {
    let sims = sims(1, |_| SimConfig { output_tokens: (50, 50), itl_ms: 10.0, ..fast_sim() }).await;
    sims[0].set_faults(Faults { die_after_tokens: Some(3), ..Faults::default() });
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let resp = post_chat(&gw.url(), true).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("no hang").unwrap();
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let err: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "upstream_stream_error", "{body}");
    assert!(events.len() >= 3, "the tokens before the failure were relayed: {body}");
    let worker = gw.state.snapshot.load().fleet.workers[0].clone();
    wait_for("slot release", Duration::from_secs(5), || async { worker.stats.slots.in_flight() == 0 }).await;
}

#[tokio::test]
async fn malformed_requests_get_openai_errors() {
    let sims = sims(1, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.server.max_body_bytes = 1024;
    let gw = gateway(cfg).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let check = |status: u16, code: &'static str| {
        move |resp: (u16, serde_json::Value)| {
            assert_eq!(resp.0, status, "{}", resp.1);
            assert_eq!(resp.1["error"]["code"], code, "{}", resp.1);
            assert!(resp.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(resp.1["error"].get("param").is_some() && resp.1["error"].get("type").is_some());
        }
    };
    async fn send(rb: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let resp = rb.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }
    let json = |b: &str| c.post(&url).header("content-type", "application/json").body(b.to_string());
    check(400, "invalid_json")(send(json("{not json")).await);
    check(400, "invalid_json")(send(json("[1,2]")).await);
    check(400, "invalid_json")(send(json(r#"{"model":"demo-model","stream":"yes"}"#)).await);
    check(400, "invalid_content_type")(send(c.post(&url).header("content-type", "text/plain").body("{}")).await);
    check(404, "model_not_found")(send(json(r#"{"model":"nope","messages":[]}"#)).await);
    check(413, "request_too_large")(send(json(&format!(r#"{{"model":"{}"}}"#, "x".repeat(4096)))).await);
    check(404, "not_found")(send(c.get(format!("{}/v2/nothing", gw.url()))).await);
}

#[tokio::test]
async fn no_healthy_worker_is_503_and_health_says_so() {
    // A port with nothing listening: bind, note it, close.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut w = llm_gateway::config::WorkerConfig::from_url(format!("http://{dead}"));
    w.models = vec!["demo-model".into()];
    let gw = gateway(test_config(vec![w])).await;
    let c = client();
    let resp = post_chat(&gw.url(), false).await;
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_healthy_workers");
    let health = c.get(format!("{}/health", gw.url())).send().await.unwrap();
    assert_eq!(health.status(), 503);
}

#[tokio::test]
async fn worker_errors_pass_through_unchanged() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    sims[0].set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let resp = post_chat(&gw.url(), false).await;
    assert_eq!(resp.status(), 500);
    let body: serde_json::Value = resp.json().await.unwrap();
    // vLLM's own error object: integer code, class-like type.
    assert_eq!(body["object"], "error", "{body}");
    assert_eq!(body["code"], 500, "{body}");
}

#[tokio::test]
async fn round_robin_spreads_evenly_and_models_health_work() {
    let sims = sims(3, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let c = client();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..30 {
        let resp = post_chat(&gw.url(), false).await;
        assert_eq!(resp.status(), 200);
        *counts.entry(resp.headers()["x-gateway-worker"].to_str().unwrap().to_string()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    let models: serde_json::Value =
        c.get(format!("{}/v1/models", gw.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "demo-model");
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let health: serde_json::Value = c.get(format!("{}/health", gw.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["healthy_workers"], 3);
    let metrics = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"llm_gateway_requests_total{model="demo-model",status="200"} 30"#), "{metrics}");
}

#[tokio::test]
async fn unhealthy_worker_is_skipped_and_embeddings_forward() {
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    sims[1].set_faults(Faults { refuse_health: true, ..Faults::default() });
    let w1 = gw.state.snapshot.load().fleet.workers[1].clone();
    wait_for("sim-1 to turn unhealthy", Duration::from_secs(5), || async { !w1.stats.healthy.load(Ordering::Relaxed) })
        .await;
    let c = client();
    for _ in 0..6 {
        let resp = c
            .post(format!("{}/v1/embeddings", gw.url()))
            .json(&serde_json::json!({"model": "demo-model", "input": "hello"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-gateway-worker"], "sim-0");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["data"][0]["embedding"].as_array().is_some_and(|e| !e.is_empty()));
    }
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_worker() {
    let sims = sims(1, |_| fast_sim()).await;
    let mut workers = worker_configs(&sims);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut w = llm_gateway::config::WorkerConfig::from_url(format!("http://{dead}"));
    w.models = vec!["demo-model".into()];
    workers.push(w);
    let gw = gateway(test_config(workers)).await;
    // Pretend the probe has not noticed yet: the dead worker looks healthy.
    gw.state.snapshot.load().fleet.workers[1].stats.healthy.store(true, Ordering::Relaxed);
    for _ in 0..4 {
        let resp = post_chat(&gw.url(), false).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-gateway-worker"], "sim-0");
    }
}
