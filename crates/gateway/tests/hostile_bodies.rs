//! Hostile request bodies against a real `llm-gateway` process in front of a real `vllm-sim` process:
//! whatever a client sends, the gateway answers sanely and keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use std::time::Duration;
use tokio::time::Instant;

/// A real `llm-gateway` process in front of `worker`.
async fn start_gateway(worker: &str) -> GatewayProcess {
    GatewayProcess::start(&format!("[[workers]]\nurl = \"{worker}\"\n[health]\ninterval_ms = 100\n"), &[]).await
}

/// Panics if the process has exited (a crash, e.g. an aborted stack overflow).
fn assert_alive(gw: &mut GatewayProcess) {
    assert!(gw.process.child.try_wait().unwrap().is_none(), "the gateway process died");
}

/// `(endpoint, body)` with `depth` nested lists around a string in the endpoint's text field.
fn nested_bodies(depth: usize) -> [(&'static str, String); 3] {
    let value = format!("{}\"x\"{}", "[".repeat(depth), "]".repeat(depth));
    [
        ("/v1/completions", format!(r#"{{"model":"demo-model","max_tokens":4,"prompt":{value}}}"#)),
        ("/v1/embeddings", format!(r#"{{"model":"demo-model","input":{value}}}"#)),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"demo-model","max_tokens":4,"messages":[{{"role":"user","content":{value}}}]}}"#),
        ),
    ]
}

async fn post(url: &str, body: String) -> (u16, serde_json::Value) {
    let resp =
        client().post(url).header("content-type", "application/json").body(body).send().await.expect("an answer");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

async fn normal_chat_succeeds(gw: &str) -> bool {
    let resp = client().post(format!("{gw}/v1/chat/completions")).json(&chat("demo-model", "hi", false)).send().await;
    matches!(resp, Ok(r) if r.status() == 200)
}

#[tokio::test]
async fn absurdly_nested_text_fields_get_a_fast_400_and_the_gateway_keeps_serving() {
    let sim = SimProcess::start(&["--ttft-ms", "1", "--itl-ms", "1", "--output-tokens", "2"]).await;
    let mut gw = start_gateway(sim.url()).await;
    wait_for("the sim to be routable", Duration::from_secs(10), || normal_chat_succeeds(gw.url())).await;

    // 100k levels (200 KB): this aborted the whole process with a stack overflow.
    for (endpoint, body) in nested_bodies(100_000) {
        let started = Instant::now();
        let (status, json) = post(&format!("{}{endpoint}", gw.url()), body).await;
        let took = started.elapsed();
        assert_eq!(status, 400, "{endpoint}: {json}");
        assert_eq!(json["error"]["type"], "invalid_request_error", "{endpoint}: {json}");
        assert_eq!(json["error"]["code"], "invalid_json", "{endpoint}: {json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("nest deeper than 100 levels"), "{endpoint}: {message}");
        assert!(took < Duration::from_secs(2), "{endpoint} took {took:?}");
        assert_alive(&mut gw);
        assert!(normal_chat_succeeds(gw.url()).await, "a normal request after {endpoint}");
    }

    // Nesting within the gateway's limit passes through: the worker's own answer comes back unchanged.
    for (endpoint, body) in nested_bodies(90) {
        let (direct, direct_json) = post(&format!("{}{endpoint}", sim.url()), body.clone()).await;
        let (status, json) = post(&format!("{}{endpoint}", gw.url()), body).await;
        assert_eq!(status, direct, "{endpoint}: {json}");
        if status != 200 {
            assert_eq!(json, direct_json, "{endpoint}: the worker's error passes through");
        }
    }
    assert_alive(&mut gw);
    assert!(normal_chat_succeeds(gw.url()).await);
}
