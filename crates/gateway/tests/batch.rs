//! The Batch API end to end: real HTTP, real vllm-sim workers, and for crashes a real `llm-gateway`
//! process killed with SIGKILL and restarted on the same data_dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use llm_gateway::config::{ApiKeyConfig, Config};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// A data directory under the system temp dir, removed when dropped.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> Self {
        let p = temp_path("batch");
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` chat lines for `demo-model` asking for `max_tokens` tokens.
fn jsonl(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "demo-model", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": format!("line {i}: tell me something")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn with_key(req: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

async fn upload(url: &str, key: Option<&str>, text: String) -> reqwest::Response {
    let part = reqwest::multipart::Part::text(text).file_name("input.jsonl");
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
    with_key(client().post(format!("{url}/v1/files")).multipart(form), key).send().await.unwrap()
}

/// Uploads `text` and creates a batch of it; returns the batch object.
async fn submit(url: &str, key: Option<&str>, text: String) -> Value {
    let resp = upload(url, key, text).await;
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    let body = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
        "metadata": {"job": "test"}});
    let resp = with_key(client().post(format!("{url}/v1/batches")).json(&body), key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let batch: Value = resp.json().await.unwrap();
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["metadata"]["job"], "test");
    batch
}

async fn get_batch(url: &str, key: Option<&str>, id: &str) -> Value {
    with_key(client().get(format!("{url}/v1/batches/{id}")), key).send().await.unwrap().json().await.unwrap()
}

/// Polls the batch until `cond` holds; panics after `deadline`.
async fn wait_batch(
    url: &str,
    key: Option<&str>,
    id: &str,
    deadline: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let b = get_batch(url, key, id).await;
        if cond(&b) {
            return b;
        }
        assert!(tokio::time::Instant::now() < end, "timed out; batch is {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn terminal(b: &Value) -> bool {
    matches!(b["status"].as_str(), Some("completed" | "failed" | "expired" | "cancelled"))
}

fn done_count(b: &Value) -> u64 {
    b["request_counts"]["completed"].as_u64().unwrap() + b["request_counts"]["failed"].as_u64().unwrap()
}

async fn content(url: &str, key: Option<&str>, file_id: &str) -> Vec<Value> {
    let resp = with_key(client().get(format!("{url}/v1/files/{file_id}/content")), key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn config(sims: &[vllm_sim::SimHandle], dir: &DataDir) -> Config {
    let mut cfg = test_config(worker_configs(sims));
    cfg.batch.data_dir = dir.0.clone();
    cfg.batch.retry_base_ms = 50;
    cfg.batch.retry_max_ms = 500;
    cfg
}

fn demo_sim(_: usize) -> vllm_sim::SimConfig {
    vllm_sim::SimConfig { model: "demo-model".into(), ..fast_sim() }
}

#[tokio::test]
async fn a_batch_of_hundreds_completes_with_one_output_line_per_input() {
    let sims = sims(2, demo_sim).await;
    let dir = DataDir::new();
    let gw = gateway(config(&sims, &dir)).await;
    let url = gw.url();
    let batch = submit(&url, None, jsonl(300, 8)).await;
    let id = batch["id"].as_str().unwrap();
    let done = wait_batch(&url, None, id, Duration::from_secs(60), terminal).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"], json!({"total": 300, "completed": 300, "failed": 0}));
    for key in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[key].as_i64().is_some(), "{key} set: {done}");
    }
    assert!(done["error_file_id"].is_null());
    let out = content(&url, None, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 300);
    let mut ids: Vec<&str> = out.iter().map(|l| l["custom_id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300, "every custom_id once");
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["custom_id"], format!("req-{i}"), "output in input order");
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(line["response"]["status_code"], 200);
        assert!(!line["response"]["request_id"].as_str().unwrap().is_empty());
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
        assert!(line["error"].is_null());
    }
    // Listed, and counted in the metrics and the operators' view.
    let list: Value = client().get(format!("{url}/v1/batches?limit=5")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], id);
    assert_eq!(list["has_more"], false);
    let metrics = client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&metrics, "llm_gateway_batch_lines_total{outcome=\"completed\"}"), 300.0);
    let admin: Value = client().get(format!("{url}/api/batches")).send().await.unwrap().json().await.unwrap();
    assert_eq!(admin["batches"][0]["progress"], 1.0);
    // The lines went through the live path: counted as requests like any other.
    assert!(metric_value(&metrics, "llm_gateway_requests_total{model=\"demo-model\",status=\"200\"}") >= 300.0);
}

#[tokio::test]
async fn a_malformed_file_fails_the_batch_with_errors_naming_each_line() {
    let sims = sims(1, demo_sim).await;
    let dir = DataDir::new();
    let gw = gateway(config(&sims, &dir)).await;
    let url = gw.url();
    let good = jsonl(2, 8);
    let text = format!(
        "{good}\nnot json at all\n{}\n{}",
        json!({"custom_id": "req-0", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
        json!({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}),
    );
    let batch = submit(&url, None, text).await;
    let done = wait_batch(&url, None, batch["id"].as_str().unwrap(), Duration::from_secs(20), terminal).await;
    assert_eq!(done["status"], "failed");
    assert!(done["failed_at"].as_i64().is_some());
    let errors: Vec<(u64, String)> = done["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        errors,
        vec![(3, "invalid_json_line".into()), (4, "duplicate_custom_id".into()), (5, "mismatched_endpoint".into())]
    );
    // Bad requests to the API itself are 400s in OpenAI's error shape.
    let bad = json!({"input_file_id": done["input_file_id"], "endpoint": "/v1/images", "completion_window": "24h"});
    let resp = client().post(format!("{url}/v1/batches")).json(&bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "endpoint");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part("file", reqwest::multipart::Part::text("{}").file_name("a.jsonl"));
    let resp = client().post(format!("{url}/v1/files")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn an_upload_over_max_file_bytes_is_413_and_leaves_nothing_behind() {
    let sims = sims(1, demo_sim).await;
    let dir = DataDir::new();
    let mut cfg = config(&sims, &dir);
    cfg.batch.max_file_bytes = 10_000;
    let gw = gateway(cfg).await;
    let resp = upload(&gw.url(), None, "x".repeat(50_000)).await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large");
    let left: Vec<_> = std::fs::read_dir(dir.0.join("files")).unwrap().collect();
    assert!(left.is_empty(), "no partial upload kept: {left:?}");
    assert_eq!(upload(&gw.url(), None, "y".repeat(5_000)).await.status(), 200, "under the limit is fine");
}

#[tokio::test]
async fn cancel_ends_cancelled_with_partial_counts_and_keeps_finished_lines() {
    let sims = sims(1, |_| vllm_sim::SimConfig {
        model: "demo-model".into(),
        itl_ms: 5.0,
        output_tokens: (20, 20),
        ..fast_sim()
    })
    .await;
    let dir = DataDir::new();
    let mut cfg = config(&sims, &dir);
    cfg.batch.max_concurrency = 4;
    let gw = gateway(cfg).await;
    let url = gw.url();
    let batch = submit(&url, None, jsonl(400, 20)).await;
    let id = batch["id"].as_str().unwrap();
    wait_batch(&url, None, id, Duration::from_secs(30), |b| done_count(b) >= 10).await;
    let resp = client().post(format!("{url}/v1/batches/{id}/cancel")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let cancelling: Value = resp.json().await.unwrap();
    assert!(matches!(cancelling["status"].as_str(), Some("cancelling" | "cancelled")), "{cancelling}");
    assert!(cancelling["cancelling_at"].as_i64().is_some());
    let done = wait_batch(&url, None, id, Duration::from_secs(30), terminal).await;
    assert_eq!(done["status"], "cancelled");
    let finished = done_count(&done);
    assert!((10..400).contains(&finished), "partial counts: {done}");
    let out = content(&url, None, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() as u64, done["request_counts"]["completed"].as_u64().unwrap());
    let errors = content(&url, None, done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() + errors.len(), 400, "every line accounted for once");
    assert!(errors.iter().any(|e| e["error"]["code"] == "batch_cancelled"));
    // Cancelling again returns it as it is; a finished batch cannot be cancelled.
    let again = client().post(format!("{url}/v1/batches/{id}/cancel")).send().await.unwrap();
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn another_tenants_key_sees_404_and_lines_run_as_the_batchs_tenant() {
    let sims = sims(1, demo_sim).await;
    let dir = DataDir::new();
    let mut cfg = config(&sims, &dir);
    cfg.auth.enabled = true;
    let key = |k: &str, name: &str| ApiKeyConfig {
        key: k.into(),
        name: name.into(),
        priority: Default::default(),
        requests_per_minute: None,
        tokens_per_minute: None,
        requests_per_day: None,
    };
    cfg.auth.keys = vec![key("sk-a", "team-a"), key("sk-b", "team-b")];
    let gw = gateway(cfg).await;
    let url = gw.url();
    assert_eq!(upload(&url, None, jsonl(1, 8)).await.status(), 401, "no key, no upload");
    let batch = submit(&url, Some("sk-a"), jsonl(20, 8)).await;
    let id = batch["id"].as_str().unwrap();
    let done = wait_batch(&url, Some("sk-a"), id, Duration::from_secs(30), terminal).await;
    assert_eq!(done["request_counts"]["completed"], 20, "lines run with team-a's identity: {done}");
    for path in [
        format!("/v1/batches/{id}"),
        format!("/v1/files/{}", done["input_file_id"].as_str().unwrap()),
        format!("/v1/files/{}/content", done["output_file_id"].as_str().unwrap()),
    ] {
        let resp = client().get(format!("{url}{path}")).bearer_auth("sk-b").send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
    let resp = client().post(format!("{url}/v1/batches/{id}/cancel")).bearer_auth("sk-b").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let list: Value =
        client().get(format!("{url}/v1/batches")).bearer_auth("sk-b").send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"], json!([]));
    let files: Value =
        client().get(format!("{url}/v1/files")).bearer_auth("sk-b").send().await.unwrap().json().await.unwrap();
    assert_eq!(files["data"], json!([]));
    let mine: Value =
        client().get(format!("{url}/v1/batches")).bearer_auth("sk-a").send().await.unwrap().json().await.unwrap();
    assert_eq!(mine["data"][0]["id"], id);
}

#[tokio::test]
async fn lines_wait_for_rate_limit_budget_instead_of_failing() {
    let sims = sims(1, demo_sim).await;
    let dir = DataDir::new();
    let mut cfg = config(&sims, &dir);
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.requests_per_second = 20.0;
    cfg.rate_limit.burst_size = 5.0;
    cfg.rate_limit.per_user_rpm = 0;
    let gw = gateway(cfg).await;
    let url = gw.url();
    let started = tokio::time::Instant::now();
    let batch = submit(&url, None, jsonl(40, 4)).await;
    let done = wait_batch(&url, None, batch["id"].as_str().unwrap(), Duration::from_secs(60), terminal).await;
    assert_eq!(done["request_counts"], json!({"total": 40, "completed": 40, "failed": 0}), "{done}");
    // 40 lines at 20/s after a burst of 5 take at least 1.75 s: the limit held.
    assert!(started.elapsed() >= Duration::from_millis(1750), "{:?}", started.elapsed());
    let metrics = client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric_value(&metrics, "llm_gateway_batch_lines_total{outcome=\"retried\"}") > 0.0, "429s were retried");
}

#[tokio::test]
async fn batch_lines_keep_to_their_share_and_live_requests_go_straight_through() {
    // One worker of capacity 4, batch share 0.5: batch lines hold at most 2 slots.
    let sims = sims(1, |_| vllm_sim::SimConfig {
        model: "demo-model".into(),
        itl_ms: 10.0,
        output_tokens: (10, 10),
        ..fast_sim()
    })
    .await;
    let dir = DataDir::new();
    let mut cfg = config(&sims, &dir);
    cfg.workers[0].max_concurrency = 4;
    cfg.batch.max_share = 0.5;
    cfg.batch.max_concurrency = 16;
    let gw = gateway(cfg).await;
    let url = gw.url();
    let batch = submit(&url, None, jsonl(200, 10)).await;
    let id = batch["id"].as_str().unwrap().to_string();
    wait_batch(&url, None, &id, Duration::from_secs(30), |b| done_count(b) >= 5).await;
    let mut max_seen = 0;
    for _ in 0..20 {
        // While the batch runs, a live request is admitted at once (queue position 0).
        let resp = post_chat(&url, false).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-queue-position"], "0", "a live request never waits behind batch lines");
        let q: Value = client().get(format!("{url}/api/queue")).send().await.unwrap().json().await.unwrap();
        max_seen = max_seen.max(q["in_flight"]["sim-0"].as_u64().unwrap());
        assert!(sims[0].running() <= 3, "at most 2 batch lines + this probe's view");
    }
    assert!(max_seen <= 2, "batch lines held {max_seen} of 4 slots (share 0.5)");
    let done = wait_batch(&url, None, &id, Duration::from_secs(60), terminal).await;
    assert_eq!(done["request_counts"]["completed"], 200);
}

/// The `llm-gateway` binary serving `config` (a TOML text); returns the child and its URL.
fn spawn_gateway(config: &str, dir: &DataDir) -> (std::process::Child, String) {
    use std::io::BufRead;
    let file = dir.0.join("gateway.toml");
    std::fs::write(&file, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
        .arg("-c")
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines.next().expect("a listening line").unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    (child, url)
}

/// Requests the sims served to the end, from their `vllm:request_success_total` counters.
async fn sim_requests(sims: &[vllm_sim::SimHandle]) -> f64 {
    let mut total = 0.0;
    for s in sims {
        let text = client().get(format!("{}/metrics", s.url())).send().await.unwrap().text().await.unwrap();
        total += text
            .lines()
            .filter(|l| l.starts_with("vllm:request_success_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

// Multi-threaded: the in-process sims must answer the spawned gateway's first probe while this thread
// blocks reading its listening line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_then_restart_resumes_with_exactly_one_output_per_line() {
    let sims = sims(2, |_| vllm_sim::SimConfig {
        model: "demo-model".into(),
        itl_ms: 5.0,
        output_tokens: (20, 20),
        ..fast_sim()
    })
    .await;
    let dir = DataDir::new();
    let workers: String = sims.iter().map(|s| format!("[[workers]]\nurl = \"{}\"\n", s.url())).collect();
    let max_concurrency = 8;
    let config = format!(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\n[health]\ninterval_ms = 100\n{workers}\
         [batch]\ndata_dir = \"{}\"\nmax_concurrency = {max_concurrency}\nretry_base_ms = 50\n",
        dir.0.join("data").display()
    );
    let (mut first, url) = spawn_gateway(&config, &dir);
    let n = 400;
    let batch = submit(&url, None, jsonl(n, 20)).await;
    let id = batch["id"].as_str().unwrap().to_string();
    let before = wait_batch(&url, None, &id, Duration::from_secs(60), |b| done_count(b) >= 60).await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(done_count(&before) < n as u64, "killed mid-batch: {before}");
    let served_before_restart = sim_requests(&sims).await;

    let (mut second, url) = spawn_gateway(&config, &dir);
    let done = wait_batch(&url, None, &id, Duration::from_secs(120), terminal).await;
    let out = if done["output_file_id"].is_string() {
        content(&url, None, done["output_file_id"].as_str().unwrap()).await
    } else {
        Vec::new()
    };
    if let Some(errors) = done["error_file_id"].as_str() {
        let first = content(&url, None, errors).await.into_iter().next();
        panic!("lines failed; the first: {first:?}");
    }
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"], json!({"total": n, "completed": n, "failed": 0}));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in &out {
        *seen.entry(line["custom_id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(out.len(), n, "exactly one output line per input line");
    assert_eq!(seen.len(), n, "every custom_id present");
    assert!(seen.values().all(|&c| c == 1));
    // Finished lines never ran again: the sims served each line once, plus at most the lines that were
    // in flight at the kill (sent, never recorded).
    let served = sim_requests(&sims).await;
    assert!(served >= n as f64, "{served}");
    assert!(served <= (n + max_concurrency) as f64, "served {served} for {n} lines (re-ran finished lines?)");
    assert!(served_before_restart >= done_count(&before) as f64);
}
