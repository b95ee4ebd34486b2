//! Every endpoint the workers serve, passed through by model (issue 14): rerank, score, tokenize,
//! detokenize, pooling, audio transcriptions (multipart), and `/v1/responses`, whose follow-ups go back to
//! the worker holding the response. Real sims, a real gateway, on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn post(gw: &str, path: &str, body: &Value) -> reqwest::Response {
    client().post(format!("{gw}{path}")).json(body).send().await.unwrap()
}

fn worker_of(r: &reqwest::Response) -> String {
    r.headers()["x-gateway-worker"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn json_endpoints_are_routed_by_model_and_relayed() {
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let cases = [
        ("/v1/rerank", json!({"model": "demo-model", "query": "q", "documents": ["a", "b"]}), "results"),
        ("/rerank", json!({"model": "demo-model", "query": "q", "documents": ["a"]}), "results"),
        ("/v1/score", json!({"model": "demo-model", "text_1": "a", "text_2": ["b", "c"]}), "data"),
        ("/tokenize", json!({"model": "demo-model", "prompt": "hello world"}), "tokens"),
        ("/detokenize", json!({"model": "demo-model", "tokens": [1, 2, 3]}), "prompt"),
        ("/pooling", json!({"model": "demo-model", "input": "x"}), "data"),
    ];
    for (path, body, key) in &cases {
        let resp = post(&gw.url(), path, body).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers().contains_key("x-gateway-worker"), "{path}");
        let v: Value = resp.json().await.unwrap();
        assert!(v.get(*key).is_some(), "{path}: {v}");
        let mut other = body.clone();
        other["model"] = "nope".into();
        let resp = post(&gw.url(), path, &other).await;
        assert_eq!(resp.status(), 404, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found", "{path}: the gateway's own answer");
    }
    let m = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&m, r#"llm_gateway_requests_total{model="demo-model",status="200"}"#), 6.0, "{m}");
}

fn multipart(boundary: &str, model: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    b.extend_from_slice(b"RIFF\x00\x01\x02--not-a-boundary\r\n\xff\xfe");
    b.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n"
        )
        .as_bytes(),
    );
    b
}

#[tokio::test]
async fn transcriptions_are_routed_by_their_model_form_field() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let url = format!("{}/v1/audio/transcriptions", gw.url());
    let send = |ct: &str, body: Vec<u8>| client().post(&url).header("content-type", ct.to_string()).body(body).send();
    let resp = send("multipart/form-data; boundary=B0und", multipart("B0und", "demo-model")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["text"], "simulated transcription");
    // reqwest's own multipart encoder, as SDKs send it.
    let form = reqwest::multipart::Form::new()
        .text("model", "demo-model")
        .part("file", reqwest::multipart::Part::bytes(vec![1u8, 2, 3]).file_name("a.wav"));
    let resp = client().post(&url).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = send("multipart/form-data; boundary=B0und", multipart("B0und", "other")).await.unwrap();
    assert_eq!(resp.status(), 404);
    let bad = send("multipart/form-data; boundary=B0und", b"--B0und\r\ngarbage".to_vec()).await.unwrap();
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_multipart", "{v}");
    let json = send("application/json", b"{}".to_vec()).await.unwrap();
    assert_eq!(json.status(), 400);
    let v: Value = json.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_content_type", "{v}");
}

/// The response id in a `/v1/responses` event stream (its `response.created` event).
fn streamed_id(text: &str) -> String {
    let created = text.lines().find(|l| l.starts_with("data: ") && l.contains("response.created")).expect("created");
    let v: Value = serde_json::from_str(&created["data: ".len()..]).unwrap();
    v["response"]["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn responses_follow_ups_go_to_the_worker_that_holds_the_response() {
    let sims = sims(3, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let url = gw.url();
    let first = post(&url, "/v1/responses", &json!({"model": "demo-model", "input": "hi"})).await;
    assert_eq!(first.status(), 200);
    let home = worker_of(&first);
    let v: Value = first.json().await.unwrap();
    let mut id = v["id"].as_str().unwrap().to_string();
    assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 0);
    // Round robin would spread these over three workers; two of three would answer 404.
    for i in 0..6 {
        let stream = i % 2 == 1;
        let body = json!({"model": "demo-model", "input": "more", "previous_response_id": id, "stream": stream});
        let resp = post(&url, "/v1/responses", &body).await;
        assert_eq!(resp.status(), 200, "follow-up {i}");
        assert_eq!(worker_of(&resp), home, "follow-up {i} went home");
        let text = tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("no hang").unwrap();
        if stream {
            assert!(text.contains("response.completed"), "{text}");
            assert!(!text.contains("\"error\""), "a Responses stream needs no [DONE]: {text}");
            id = streamed_id(&text);
        } else {
            id = serde_json::from_str::<Value>(&text).unwrap()["id"].as_str().unwrap().to_string();
        }
    }
    // Its worker drained: the follow-up is routed like any request (another worker, which answers 404).
    let r = client().post(format!("{url}/api/workers/{home}/drain")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = json!({"model": "demo-model", "input": "more", "previous_response_id": id});
    let resp = post(&url, "/v1/responses", &body).await;
    assert_ne!(worker_of(&resp), home);
    assert_eq!(resp.status(), 404, "the other worker does not hold it");
    // Unknown ids are routed normally too.
    let body = json!({"model": "demo-model", "input": "x", "previous_response_id": "resp_unknown"});
    assert_eq!(post(&url, "/v1/responses", &body).await.status(), 404);
}

#[tokio::test]
async fn responses_are_not_pinned_when_remembering_is_off() {
    let sims = sims(2, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.responses.max_remembered = 0;
    let gw = gateway(cfg).await;
    let first = post(&gw.url(), "/v1/responses", &json!({"model": "demo-model", "input": "hi"})).await;
    let v: Value = first.json().await.unwrap();
    let body = json!({"model": "demo-model", "input": "more", "previous_response_id": v["id"]});
    let url = gw.url();
    let statuses: Vec<u16> = futures_util::future::join_all((0..4).map(|_| post(&url, "/v1/responses", &body)))
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.contains(&404), "round robin without memory reaches the other worker: {statuses:?}");
}
