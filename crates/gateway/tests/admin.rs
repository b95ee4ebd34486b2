//! The admin API and hot reload end to end: real sims, real gateway, real HTTP on loopback.

mod common;

use common::{client, fast_sim, gateway, sims, test_config, wait_for, worker_configs};
use llm_gateway::reload::{self, ConfigSource};
use llm_gateway::Gateway;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vllm_sim::{SimConfig, SimHandle};

// ---- harness: the shared helpers of tests/common, plus what only these tests need ----

async fn get(gw: &Gateway, path: &str) -> (u16, Value) {
    let resp = client().get(format!("{}{path}", gw.url())).send().await.expect("GET answers");
    (resp.status().as_u16(), resp.json().await.expect("JSON answer"))
}

async fn send(gw: &Gateway, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    // Admin changes are JSON, with or without a body.
    let mut req = client().request(method, format!("{}{path}", gw.url())).header("content-type", "application/json");
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request answers");
    (resp.status().as_u16(), resp.json().await.expect("JSON answer"))
}

/// Sends one chat request; the worker that served it, or the failure.
async fn one_chat(c: &reqwest::Client, url: &str, stream: bool) -> Result<String, String> {
    let resp = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&common::chat("demo-model", "hi", stream))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let worker = resp.headers().get("x-gateway-worker").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    if stream && (!body.trim_end().ends_with("data: [DONE]") || body.contains("\"error\"")) {
        return Err(format!("bad stream: {body}"));
    }
    Ok(worker)
}

/// Concurrent clients sending requests in a loop until stopped; counts successes, failures and which
/// workers served.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<parking_lot::Mutex<Vec<String>>>,
    served: Arc<parking_lot::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let served = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, ok, failures, served, url) =
                    (stop.clone(), ok.clone(), failures.clone(), served.clone(), url.clone());
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        match one_chat(&c, &url, i % 2 == 0).await {
                            Ok(w) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                served.lock().push(w);
                            }
                            Err(e) => failures.lock().push(e),
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failures, served, tasks }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded.
    async fn progress(&self, n: u64) {
        let target = self.ok() + n;
        wait_for("load to progress", Duration::from_secs(20), || async { self.ok() >= target }).await;
    }

    async fn finish(self) -> (u64, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load client ends");
        }
        let failures = self.failures.lock().clone();
        let served = self.served.lock().clone();
        (self.ok.load(Ordering::Relaxed), failures, served)
    }
}

// ---- tests ----

#[tokio::test]
async fn status_workers_and_routing_stats_shapes() {
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let c = client();
    for _ in 0..4 {
        one_chat(&c, &gw.url(), false).await.unwrap();
    }

    let (code, s) = get(&gw, "/api/status").await;
    assert_eq!(code, 200);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_secs"].is_u64());
    assert_eq!(s["strategy"], "round_robin");
    assert_eq!(s["workers"], json!({"total": 2, "healthy": 2, "draining": 0}));
    assert_eq!(s["requests"]["total"], 4, "{s}");
    assert_eq!(s["requests"]["active"], 0);
    assert!(s["qps"].as_f64().unwrap() > 0.0, "{s}");

    let (code, w) = get(&gw, "/api/workers").await;
    assert_eq!(code, 200);
    let w = w.as_array().unwrap();
    assert_eq!(w.len(), 2);
    for key in [
        "id",
        "name",
        "url",
        "weight",
        "models",
        "max_concurrency",
        "healthy",
        "draining",
        "in_flight",
        "running",
        "waiting",
        "kv_usage",
        "ttft_ms",
        "tpot_ms",
        "error_rate",
        "requests_total",
    ] {
        assert!(w[0].get(key).is_some(), "missing {key}: {}", w[0]);
    }
    assert_eq!(w[0]["name"], "sim-0");
    assert_eq!(w[0]["url"], sims[0].url());
    assert_eq!(w[0]["models"], json!(["demo-model"]));
    assert_eq!(w[0]["healthy"], true);
    assert_eq!(w[0]["requests_total"], 2);

    let id = w[1]["id"].as_u64().unwrap();
    let (code, one) = get(&gw, &format!("/api/workers/{id}")).await;
    assert_eq!((code, one["name"].as_str()), (200, Some("sim-1")));
    let (code, err) = get(&gw, "/api/workers/nope").await;
    assert_eq!(code, 404);
    assert_eq!(err["error"]["code"], "not_found");
    let (code, _) = send(&gw, reqwest::Method::POST, "/api/workers/nope/drain", None).await;
    assert_eq!(code, 404);

    let (code, r) = get(&gw, "/api/routing/stats").await;
    assert_eq!(code, 200);
    assert_eq!(r["strategy"], "round_robin");
    assert_eq!(r["decisions"]["round_robin"], json!({"sim-0": 2, "sim-1": 2}));
    assert_eq!(r["workers"][0], json!({"name": "sim-0", "decisions": 2, "share": 0.5}));
}

#[tokio::test]
async fn drain_stops_new_requests_while_in_flight_stream_finishes() {
    let sims = sims(2, |_| SimConfig { itl_ms: 20.0, output_tokens: (40, 40), ..fast_sim() }).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let c = client();
    // A long stream in flight on one worker.
    let resp = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&common::chat("demo-model", "hi", true))
        .send()
        .await
        .unwrap();
    let busy = resp.headers()["x-gateway-worker"].to_str().unwrap().to_string();
    let stream = tokio::spawn(async move { resp.text().await.unwrap() });

    let (code, w) = send(&gw, reqwest::Method::POST, &format!("/api/workers/{busy}/drain"), None).await;
    assert_eq!(code, 200);
    assert_eq!(w["draining"], true);
    assert_eq!(w["in_flight"], 1, "the stream still holds its slot: {w}");
    assert_eq!(get(&gw, "/api/status").await.1["workers"]["draining"], 1);

    let quick = client();
    let mut short = json!({"model": "demo-model", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
    short["stream"] = json!(false);
    for _ in 0..6 {
        let resp = quick.post(format!("{}/v1/chat/completions", gw.url())).json(&short).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_ne!(resp.headers()["x-gateway-worker"].to_str().unwrap(), busy, "a drained worker got a request");
    }
    let body = tokio::time::timeout(Duration::from_secs(10), stream).await.expect("stream ends").unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]") && !body.contains("\"error\""), "{body}");

    let (code, w) = send(&gw, reqwest::Method::POST, &format!("/api/workers/{busy}/undrain"), None).await;
    assert_eq!((code, &w["draining"]), (200, &json!(false)));
    let mut seen = false;
    for _ in 0..6 {
        let resp = quick.post(format!("{}/v1/chat/completions", gw.url())).json(&short).send().await.unwrap();
        seen |= resp.headers()["x-gateway-worker"].to_str().unwrap() == busy;
    }
    assert!(seen, "an undrained worker gets requests again");
}

#[tokio::test]
async fn workers_added_and_removed_under_load_without_failures() {
    let sims = sims(3, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims[..2]))).await;
    let load = Load::start(gw.url(), 8);
    load.progress(20).await;

    let (code, w) =
        send(&gw, reqwest::Method::POST, "/api/workers", Some(json!({"url": sims[2].url(), "name": "sim-2"}))).await;
    assert_eq!(code, 201, "{w}");
    assert_eq!((w["name"].as_str(), w["healthy"].as_bool()), (Some("sim-2"), Some(true)));
    wait_for("the new worker to serve", Duration::from_secs(10), || async {
        load.served.lock().iter().any(|w| w == "sim-2")
    })
    .await;

    // Same name twice, and a bad URL: rejected with the reason; the fleet is unchanged.
    let (code, e) =
        send(&gw, reqwest::Method::POST, "/api/workers", Some(json!({"url": sims[2].url(), "name": "sim-2"}))).await;
    assert_eq!(code, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("used twice"), "{e}");
    let (code, e) = send(&gw, reqwest::Method::POST, "/api/workers", Some(json!({"url": "ftp://x"}))).await;
    assert_eq!(code, 400, "{e}");
    let (code, e) = send(&gw, reqwest::Method::POST, "/api/workers", Some(json!({"name": "no-url"}))).await;
    assert_eq!(code, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("url"), "{e}");

    let (code, w) = send(&gw, reqwest::Method::DELETE, "/api/workers/sim-0", None).await;
    assert_eq!((code, w["name"].as_str()), (200, Some("sim-0")));
    let (code, _) = send(&gw, reqwest::Method::DELETE, "/api/workers/sim-0", None).await;
    assert_eq!(code, 404);
    let after = load.served.lock().len();
    load.progress(40).await;
    let (ok, failures, served) = load.finish().await;
    assert!(failures.is_empty(), "{} failed of {}: {:?}", failures.len(), ok, &failures[..failures.len().min(3)]);
    // A request that loaded the old snapshot just before the swap may still land on sim-0: allow the
    // requests in flight at that moment (8 clients), no more.
    let late = served[after..].iter().filter(|w| *w == "sim-0").count();
    assert!(late <= 8, "{late} requests went to a removed worker");
    let names: Vec<String> = get(&gw, "/api/workers")
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().into())
        .collect();
    assert_eq!(names, ["sim-1", "sim-2"]);
}

#[tokio::test]
async fn strategy_switch_under_load_and_invalid_patches() {
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let load = Load::start(gw.url(), 8);
    load.progress(20).await;

    let (code, cfg) =
        send(&gw, reqwest::Method::PATCH, "/api/config", Some(json!({"routing": {"strategy": "least_queue"}}))).await;
    assert_eq!(code, 200, "{cfg}");
    assert_eq!(cfg["routing"]["strategy"], "least_queue");
    assert_eq!(cfg["workers"].as_array().unwrap().len(), 2, "the rest of the config is kept");
    assert_eq!(get(&gw, "/api/status").await.1["strategy"], "least_queue");
    load.progress(30).await;

    // Invalid patches: 400 naming the key; the running config keeps serving.
    for (patch, needle) in [
        (json!({"routing": {"strategy": "nope"}}), "routing.strategy"),
        (json!({"bogus": 1}), "bogus"),
        (json!({"routing": {"bogus": 1}}), "bogus"),
        (json!({"health": {"interval_ms": 0}}), "health.interval_ms"),
        (json!({"server": {"port": "http"}}), "server.port"),
        (json!(["not", "an", "object"]), "object"),
    ] {
        let (code, e) = send(&gw, reqwest::Method::PATCH, "/api/config", Some(patch.clone())).await;
        assert_eq!(code, 400, "{patch}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{patch}: {msg}");
    }
    let resp = client()
        .patch(format!("{}/api/config", gw.url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(get(&gw, "/api/status").await.1["strategy"], "least_queue");
    load.progress(10).await;

    let (ok, failures, _) = load.finish().await;
    assert!(failures.is_empty(), "{} failed of {}: {:?}", failures.len(), ok, &failures[..failures.len().min(3)]);
    let stats = get(&gw, "/api/routing/stats").await.1;
    assert_eq!(stats["strategy"], "least_queue");
    assert!(stats["decisions"]["least_queue"].as_object().is_some_and(|m| !m.is_empty()), "{stats}");
    assert!(stats["decisions"]["round_robin"].as_object().is_some_and(|m| !m.is_empty()), "{stats}");
}

#[tokio::test]
async fn admin_token_guards_mutations_and_config_is_redacted() {
    let sims = sims(1, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.admin.token = Some("s3cret-admin".into());
    cfg.workers[0].api_key = Some("sk-worker-key".into());
    let gw = gateway(cfg).await;
    let c = client();
    let drain = format!("{}/api/workers/sim-0/drain", gw.url());
    let undrain = format!("{}/api/workers/sim-0/undrain", gw.url());

    let resp = c.post(&drain).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "unauthorized");
    assert!(!e.to_string().contains("s3cret"));
    for (name, value) in [
        ("authorization", "Bearer wrong"),
        ("authorization", "Bearer s3cret-admin-but-longer"),
        ("authorization", "Basic s3cret-admin"),
        ("x-admin-token", "s3cret-admiN"),
    ] {
        let resp = c.post(&drain).header(name, value).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{name}: {value}");
    }
    let resp = c.patch(format!("{}/api/config", gw.url())).json(&json!({"log": {"level": "debug"}})).send().await;
    assert_eq!(resp.unwrap().status(), 401);
    let resp = c.delete(format!("{}/api/workers/sim-0", gw.url())).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(!gw.state.snapshot.load().fleet.workers[0].stats.draining.load(Ordering::Relaxed));

    let resp = c.post(&drain).bearer_auth("s3cret-admin").json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = c.post(&undrain).header("x-admin-token", "s3cret-admin").json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // Reads stay open, and never show a secret.
    assert_eq!(get(&gw, "/api/status").await.0, 200);
    let (code, config) = get(&gw, "/api/config").await;
    assert_eq!(code, 200);
    assert_eq!(config["admin"]["token"], "***");
    assert_eq!(config["workers"][0]["api_key"], "***");
    assert_eq!(config["workers"][0]["url"], sims[0].url());
    let text = config.to_string();
    assert!(!text.contains("s3cret") && !text.contains("sk-worker"), "{text}");

    // A patch with the token keeps the (unredacted) secrets it does not touch.
    let resp = c
        .patch(format!("{}/api/config", gw.url()))
        .bearer_auth("s3cret-admin")
        .json(&json!({"health": {"interval_ms": 200}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let running = gw.state.snapshot.load().config.clone();
    assert_eq!(running.admin.token.as_deref(), Some("s3cret-admin"));
    assert_eq!(running.workers[0].api_key.as_deref(), Some("sk-worker-key"));
    assert_eq!(running.health.interval_ms, 200);
}

#[tokio::test]
async fn config_file_rewritten_on_disk_is_picked_up() {
    let sims = sims(2, |_| fast_sim()).await;
    let dir = common::temp_path("reload");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    let toml = |workers: &[(usize, &SimHandle)], strategy: &str| {
        let mut t = format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\n[health]\ninterval_ms = 100\n[routing]\nstrategy = \"{strategy}\"\n"
        );
        for (i, s) in workers {
            t.push_str(&format!("[[workers]]\nurl = \"{}\"\nname = \"sim-{i}\"\n", s.url()));
        }
        t
    };
    std::fs::write(&file, toml(&[(0, &sims[0])], "round_robin")).unwrap();
    let source = ConfigSource { file: Some(file.clone()), ..ConfigSource::default() };
    let gw = gateway(source.load().unwrap()).await;
    reload::spawn_watchers(gw.state.clone(), source.clone());
    assert_eq!(gw.state.snapshot.load().fleet.workers.len(), 1);

    std::fs::write(&file, toml(&[(0, &sims[0]), (1, &sims[1])], "least_queue")).unwrap();
    wait_for("the rewritten file to be applied", Duration::from_secs(10), || async {
        let snap = gw.state.snapshot.load();
        snap.fleet.workers.len() == 2 && snap.policy.name() == "least_queue"
    })
    .await;
    let w1 = gw.state.snapshot.load().fleet.find("sim-1").cloned().unwrap();
    wait_for("the new worker's probe", Duration::from_secs(5), || async { w1.is_available() }).await;

    // A broken file is rejected with its reason; the running config stays.
    std::fs::write(&file, "[routing]\nstrategy = \"fastest\"\n").unwrap();
    let err = reload::reload_from(&gw.state, &source, "test").await.unwrap_err();
    assert!(err.contains("routing.strategy"), "{err}");
    assert_eq!(gw.state.snapshot.load().policy.name(), "least_queue");
    assert_eq!(gw.state.snapshot.load().fleet.workers.len(), 2);
    one_chat(&client(), &gw.url(), false).await.unwrap();

    // Fixed workers (--demo) replace whatever the file says.
    // (Another file: the watcher of the first one is still running.)
    let other = dir.join("other.toml");
    std::fs::write(&other, toml(&[(0, &sims[0])], "round_robin")).unwrap();
    let fixed = ConfigSource { file: Some(other), fixed_workers: Some(worker_configs(&sims)), ..source };
    reload::reload_from(&gw.state, &fixed, "test").await.unwrap();
    let snap = gw.state.snapshot.load();
    assert_eq!((snap.fleet.workers.len(), snap.policy.name()), (2, "round_robin"));
    drop(snap);
    let _ = std::fs::remove_dir_all(&dir);
}
