//! End-to-end tests over real HTTP on loopback: wire shapes, engine behaviour and faults.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use vllm_sim::{start, Faults, SimConfig, SimHandle};

/// A config that answers as fast as it can.
fn fast() -> SimConfig {
    SimConfig {
        ttft_ms: 0.0,
        prefill_ms_per_1k_tokens: 0.0,
        itl_ms: 0.0,
        output_tokens: (8, 8),
        ..SimConfig::default()
    }
}

/// A config whose requests last about a second.
fn slow() -> SimConfig {
    SimConfig {
        ttft_ms: 0.0,
        prefill_ms_per_1k_tokens: 0.0,
        itl_ms: 20.0,
        output_tokens: (50, 50),
        ..SimConfig::default()
    }
}

/// Poll `cond` until it holds or `secs` pass.
async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "demo-model", "messages": [{"role": "user", "content": content}]});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

async fn post(sim: &SimHandle, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(format!("{}{path}", sim.url())).json(body).send().await.unwrap()
}

/// Read an SSE body into its `data:` payloads; panics if the framing is not `data: ...\n\n`.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("\n\n"), "stream must end with a blank line: {text:?}");
    text.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("bad event {e:?}")).to_owned())
        .collect()
}

async fn metrics(sim: &SimHandle) -> String {
    reqwest::get(format!("{}/metrics", sim.url())).await.unwrap().text().await.unwrap()
}

fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no metric {prefix}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn non_stream_chat_and_completions_shape() {
    let sim = start(fast()).await.unwrap();
    let parts = json!([{"type": "text", "text": "hello there"}]);
    let resp =
        post(&sim, "/v1/chat/completions", &chat_body("x", json!({"messages": [{"role": "user", "content": parts}]})))
            .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "demo-model");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let c = &v["choices"][0];
    assert_eq!((c["index"].as_u64(), c["message"]["role"].as_str()), (Some(0), Some("assistant")));
    assert!(!c["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(c["finish_reason"], "stop");
    assert!(c["logprobs"].is_null());
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + 8));
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);

    let resp = post(&sim, "/v1/completions", &json!({"prompt": ["once upon", " a time"], "max_tokens": 3})).await;
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], 4); // 16 bytes / 4
}

#[tokio::test]
async fn stream_event_sequence_is_vllms() {
    let sim = start(fast()).await.unwrap();
    let body = chat_body("hi", json!({"stream": true, "max_tokens": 5, "stream_options": {"include_usage": true}}));
    let resp = post(&sim, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(resp).await;
    assert_eq!(events.len(), 1 + 5 + 1 + 1 + 1, "{events:#?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!((c["id"].as_str(), c["object"].as_str()), (Some(id), Some("chat.completion.chunk")));
        assert_eq!(c["model"], "demo-model");
        assert!(c["created"].is_u64());
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    for c in &chunks[1..6] {
        assert!(c["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(c.get("usage").is_none());
    }
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(chunks[7]["usage"]["completion_tokens"], 5);

    // Completions: no role chunk, `text` pieces, finish "stop" when max_tokens is not reached; no usage chunk.
    let resp = post(&sim, "/v1/completions", &json!({"prompt": "abc", "stream": true})).await;
    let events = sse_events(resp).await;
    assert_eq!(events.len(), 8 + 1 + 1);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert!(first["choices"][0]["text"].is_string());
    let fin: Value = serde_json::from_str(&events[8]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn bad_requests_answer_like_vllm() {
    let sim = start(fast()).await.unwrap();
    let resp =
        post(&sim, "/v1/chat/completions", &chat_body("hi", json!({"stream_options": {"include_usage": true}}))).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["object"].as_str(), v["type"].as_str(), v["code"].as_u64()),
        (Some("error"), Some("BadRequestError"), Some(400))
    );
    assert!(v["param"].is_null());

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", sim.url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["type"], "BadRequestError");

    let resp = post(&sim, "/v1/chat/completions", &chat_body("hi", json!({"model": "other"}))).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"object": "error", "message": "The model `other` does not exist.", "type": "NotFoundError",
            "param": null, "code": 404})
    );

    let resp = post(&sim, "/v1/completions", &json!({"prompt": "x", "max_tokens": 9000})).await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn prefix_cache_hits_on_repeated_prompt() {
    let sim = start(fast()).await.unwrap();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let body = chat_body(&long, json!({}));
    let first: Value = post(&sim, "/v1/chat/completions", &body).await.json().await.unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let hits_before = metric_value(&metrics(&sim).await, "vllm:prefix_cache_hits_total");
    let second: Value = post(&sim, "/v1/chat/completions", &body).await.json().await.unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached < prompt, "cached {cached} of {prompt}");
    assert_eq!(cached % 16, 0, "hits are whole blocks");
    let text = metrics(&sim).await;
    assert_eq!(metric_value(&text, "vllm:prefix_cache_hits_total") - hits_before, cached as f64);
    assert_eq!(metric_value(&text, "vllm:prefix_cache_queries_total"), 2.0 * prompt as f64);
}

#[tokio::test]
async fn max_num_seqs_is_respected() {
    let sim = start(SimConfig { max_num_seqs: 2, output_tokens: (10, 10), ..slow() }).await.unwrap();
    let url = sim.url();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = json!({"prompt": format!("request {i}")});
                reqwest::Client::new().post(format!("{url}/v1/completions")).json(&body).send().await.unwrap().status()
            })
        })
        .collect();
    wait_for(5, "a full batch with a queue", || sim.running() == 2 && sim.waiting() > 0).await;
    let mut max_running = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        max_running = max_running.max(sim.running());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(max_running <= 2, "running reached {max_running}");
    assert_eq!((sim.running(), sim.waiting()), (0, 0));
}

#[tokio::test]
async fn client_disconnect_releases_the_request() {
    let sim = start(slow()).await.unwrap();
    // Streaming: read one chunk, then drop the body.
    let resp = post(&sim, "/v1/chat/completions", &chat_body("hi", json!({"stream": true}))).await;
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(sim.running(), 1);
    let text = metrics(&sim).await;
    assert_eq!(metric_value(&text, "vllm:num_requests_running"), 1.0);
    assert!(metric_value(&text, "vllm:kv_cache_usage_perc") > 0.0);
    drop(body);
    wait_for(5, "running back to 0 after a stream disconnect", || sim.running() == 0).await;
    assert_eq!(metric_value(&metrics(&sim).await, "vllm:kv_cache_usage_perc"), 0.0, "blocks released");

    // Non-streaming: the client gives up before the answer.
    let client = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let err = client.post(format!("{}/v1/completions", sim.url())).json(&json!({"prompt": "x"})).send().await;
    assert!(err.is_err());
    wait_for(5, "running back to 0 after a non-stream disconnect", || sim.running() == 0).await;
    assert_eq!(
        metric_value(
            &metrics(&sim).await,
            "vllm:request_success_total{engine=\"0\",model_name=\"demo-model\",finished_reason=\"abort\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn queue_limit_answers_503() {
    let sim = start(SimConfig { max_num_seqs: 1, max_num_queued: 1, ..slow() }).await.unwrap();
    let url = sim.url();
    let spawn_req = || {
        let url = url.clone();
        tokio::spawn(async move {
            reqwest::Client::new().post(format!("{url}/v1/completions")).json(&json!({"prompt": "x"})).send().await
        })
    };
    let a = spawn_req();
    wait_for(5, "one running", || sim.running() == 1).await;
    let b = spawn_req();
    wait_for(5, "one waiting", || sim.waiting() == 1).await;
    let resp = post(&sim, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!((v["object"].as_str(), v["code"].as_u64()), (Some("error"), Some(503)));
    a.abort();
    b.abort();
    wait_for(5, "engine empty after aborts", || sim.running() == 0 && sim.waiting() == 0).await;
}

#[tokio::test]
async fn metrics_have_vllm_names() {
    let sim = start(fast()).await.unwrap();
    post(&sim, "/v1/completions", &json!({"prompt": "hello"})).await.text().await.unwrap();
    let text = metrics(&sim).await;
    for name in [
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:kv_cache_usage_perc{",
        "vllm:gpu_cache_usage_perc{",
        "vllm:prefix_cache_queries_total{",
        "vllm:prefix_cache_hits_total{",
        "vllm:request_success_total{",
        "vllm:prompt_tokens_total{",
        "vllm:generation_tokens_total{",
        "vllm:time_to_first_token_seconds_bucket{",
        "vllm:time_to_first_token_seconds_sum{",
        "vllm:time_to_first_token_seconds_count{",
        "vllm:e2e_request_latency_seconds_bucket{",
        "vllm:e2e_request_latency_seconds_sum{",
        "vllm:e2e_request_latency_seconds_count{",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name) && l.contains("model_name=\"demo-model\"")),
            "missing {name}\n{text}"
        );
    }
    assert!(text.contains("le=\"+Inf\""));
    assert_eq!(metric_value(&text, "vllm:generation_tokens_total"), 8.0);
    assert_eq!(metric_value(&text, "vllm:e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(
        metric_value(
            &text,
            "vllm:request_success_total{engine=\"0\",model_name=\"demo-model\",finished_reason=\"stop\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn side_endpoints() {
    let sim = start(fast()).await.unwrap();
    let resp = reqwest::get(format!("{}/health", sim.url())).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().is_empty());
    let v: Value = reqwest::get(format!("{}/version", sim.url())).await.unwrap().json().await.unwrap();
    assert!(v["version"].is_string());
    let v: Value = reqwest::get(format!("{}/v1/models", sim.url())).await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    let m = &v["data"][0];
    assert_eq!(
        (m["id"].as_str(), m["owned_by"].as_str(), m["root"].as_str()),
        (Some("demo-model"), Some("vllm"), Some("demo-model"))
    );
    assert_eq!(m["max_model_len"], 8192);
    let v: Value =
        post(&sim, "/v1/embeddings", &json!({"input": ["a", "b"], "model": "demo-model"})).await.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["object"], "embedding");
    let again: Value = post(&sim, "/v1/embeddings", &json!({"input": "a"})).await.json().await.unwrap();
    assert_eq!(again["data"][0]["embedding"], v["data"][0]["embedding"], "deterministic");
}

#[tokio::test]
async fn faults_error_rate_health_and_control_endpoint() {
    let sim = start(fast()).await.unwrap();
    let url = sim.url();
    let client = reqwest::Client::new();
    let set: Value = client
        .post(format!("{url}/sim/faults"))
        .json(&json!({"error_rate": 1.0, "refuse_health": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(set["error_rate"], 1.0);
    let got: Faults = reqwest::get(format!("{url}/sim/faults")).await.unwrap().json().await.unwrap();
    assert_eq!(got, Faults { error_rate: 1.0, refuse_health: true, ..Faults::default() });
    let resp = post(&sim, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!((v["object"].as_str(), v["code"].as_u64()), (Some("error"), Some(500)));
    assert_eq!(reqwest::get(format!("{url}/health")).await.unwrap().status(), 503);
    sim.set_faults(Faults::default());
    assert_eq!(reqwest::get(format!("{url}/health")).await.unwrap().status(), 200);
    assert_eq!(post(&sim, "/v1/completions", &json!({"prompt": "x"})).await.status(), 200);
}

#[tokio::test]
async fn fault_extra_latency_delays_first_token() {
    let sim =
        start(SimConfig { faults: Faults { extra_latency_ms: 150, ..Faults::default() }, ..fast() }).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let resp = post(&sim, "/v1/chat/completions", &chat_body("hi", json!({"stream": true}))).await;
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(150), "first token after {:?}", t0.elapsed());
}

#[tokio::test]
async fn fault_hang_never_answers_and_does_not_leak() {
    let sim = start(SimConfig { faults: Faults { hang: true, ..Faults::default() }, ..fast() }).await.unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let res = client
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&chat_body("hi", json!({"stream": true})))
        .send()
        .await;
    assert!(res.unwrap_err().is_timeout());
    wait_for(5, "hung request released", || sim.running() == 0).await;
}

#[tokio::test]
async fn fault_die_after_tokens_aborts_the_connection() {
    let sim =
        start(SimConfig { faults: Faults { die_after_tokens: Some(3), ..Faults::default() }, ..fast() }).await.unwrap();
    // Streaming: role chunk + 3 token chunks, then the body fails without [DONE].
    let resp = post(&sim, "/v1/chat/completions", &chat_body("hi", json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = String::new();
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => got.push_str(std::str::from_utf8(&b).unwrap()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the stream must end in an error, got {got:?}");
    assert_eq!(got.matches("\"content\":").count(), 4, "{got}");
    assert!(!got.contains("[DONE]"));
    // Non-streaming: the connection is cut with no response at all.
    let res =
        reqwest::Client::new().post(format!("{}/v1/completions", sim.url())).json(&json!({"prompt": "x"})).send().await;
    assert!(res.is_err(), "expected a transport error, got {res:?}");
    wait_for(5, "engine empty", || sim.running() == 0).await;
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = start(slow()).await.unwrap();
    let url = sim.url();
    let resp = post(&sim, "/v1/chat/completions", &chat_body("hi", json!({"stream": true}))).await;
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    sim.shutdown();
    // The in-flight stream is cut...
    let mut ended_badly = false;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            ended_badly = true;
            break;
        }
    }
    assert!(ended_badly);
    // ...and new connections are refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if reqwest::get(format!("{url}/health")).await.is_err() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still serving after shutdown");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn deterministic_with_seed() {
    let a = start(SimConfig { output_tokens: (4, 40), seed: 7, ..fast() }).await.unwrap();
    let b = start(SimConfig { output_tokens: (4, 40), seed: 7, ..fast() }).await.unwrap();
    for _ in 0..3 {
        let body = json!({"prompt": "same"});
        let x: Value = post(&a, "/v1/completions", &body).await.json().await.unwrap();
        let y: Value = post(&b, "/v1/completions", &body).await.json().await.unwrap();
        assert_eq!(x["choices"][0]["text"], y["choices"][0]["text"]);
        assert_eq!(x["usage"], y["usage"]);
    }
}
