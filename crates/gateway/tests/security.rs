//! Hardening against hostile clients and pages (issue 11): real gateways on loopback, real `vllm-sim`
//! workers, the real binary where the log is what is checked.
//!
//! - Defect 4: another site's page cannot change the fleet through an open admin API (no `admin.token`):
//!   a foreign `Origin` is refused (403), a mutation must be JSON (400), the dashboard socket refuses
//!   foreign origins, `admin.require_token` refuses to start without a token.
//! - Defect 6: credentials in a worker URL never show: admin API, breaker stats, `/ws`, `/metrics`, the
//!   trace-level log.
//! - Defect 8: a client's model name reaches neither the answer nor the log raw: bounded, escaped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EVIL: &str = "http://evil.example";

// ---------------------------------------------------------------------------------------------------
// Defect 4: cross-site admin requests

/// Sends `method path` with a body and the given headers; status and JSON answer.
async fn raw(url: &str, method: reqwest::Method, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut req = client().request(method, format!("{url}{path}")).body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn another_sites_page_cannot_change_an_open_admin_api() {
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    assert!(gw.state.snapshot.load().config.admin.token.is_none(), "the default: no admin token");
    let url = gw.url();
    let attacker = json!({"url": "http://127.0.0.1:9", "name": "attacker"}).to_string();
    use reqwest::Method as M;

    // What a page on evil.example can send without a preflight: text/plain (or no type), its Origin.
    let forged: &[(M, &str, &str)] = &[
        (M::POST, "/api/workers", &attacker),
        (M::POST, "/api/workers/sim-0/drain", ""),
        (M::DELETE, "/api/workers/sim-1", ""),
        (M::PATCH, "/api/config", r#"{"routing":{"strategy":"least_queue"}}"#),
        (M::POST, "/api/circuit-breaker/sim-0/reset", ""),
    ];
    for (method, path, body) in forged {
        let (code, e) =
            raw(&url, method.clone(), path, &[("origin", EVIL), ("content-type", "text/plain")], body).await;
        assert_eq!((code, e["error"]["code"].as_str()), (403, Some("forbidden_origin")), "{method} {path}: {e}");
        // Even a JSON type is refused from another origin (a preflight would have been needed anyway)...
        let json_ct = [("origin", EVIL), ("content-type", "application/json")];
        assert_eq!(raw(&url, method.clone(), path, &json_ct, body).await.0, 403, "{method} {path}");
        // ... and so is a browser that says it is cross-site, whatever its Origin.
        let fetch_site = [("sec-fetch-site", "cross-site"), ("content-type", "application/json")];
        assert_eq!(raw(&url, method.clone(), path, &fetch_site, body).await.0, 403, "{method} {path}");
        // Without an Origin (a no-cors request that lost it, a tool), a non-JSON change is refused too.
        for ct in [&[("content-type", "text/plain")][..], &[("content-type", "application/x-www-form-urlencoded")], &[]]
        {
            let (code, e) = raw(&url, method.clone(), path, ct, body).await;
            assert_eq!((code, e["error"]["code"].as_str()), (400, Some("invalid_content_type")), "{method} {path}");
            assert!(e["error"]["message"].as_str().unwrap().contains("application/json"), "{e}");
        }
    }
    // Nothing changed.
    let snap = gw.state.snapshot.load();
    let names: Vec<&str> = snap.fleet.workers.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["sim-0", "sim-1"]);
    assert!(snap.fleet.workers.iter().all(|w| !w.stats.draining.load(Ordering::Relaxed)));
    assert_eq!(snap.policy.name(), "round_robin");
    drop(snap);
    // No CORS approval either: a preflight gets no Access-Control-Allow-Origin.
    let resp = client()
        .request(M::OPTIONS, format!("{url}/api/workers"))
        .header("origin", EVIL)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());

    // The dashboard's own page (same origin, JSON) and tools (no Origin, JSON) still work.
    let own = [("origin", url.as_str()), ("content-type", "application/json"), ("sec-fetch-site", "same-origin")];
    let (code, w) = raw(&url, M::POST, "/api/workers/sim-0/drain", &own, "").await;
    assert_eq!((code, w["draining"].as_bool()), (200, Some(true)), "{w}");
    let tool = [("content-type", "application/json")];
    assert_eq!(raw(&url, M::POST, "/api/workers/sim-0/undrain", &tool, "").await.0, 200);
    let (code, c) = raw(&url, M::PATCH, "/api/config", &own, r#"{"routing":{"strategy":"least_queue"}}"#).await;
    assert_eq!((code, c["routing"]["strategy"].as_str()), (200, Some("least_queue")));
    // Reads stay open (a page cannot read them without CORS approval, and they hold no secret).
    assert_eq!(raw(&url, M::GET, "/api/workers", &[("origin", EVIL)], "").await.0, 200);
    gw.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_admin_token_is_checked_after_the_origin_and_before_the_body_type() {
    let sims = sims(1, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.admin.token = Some("tok-1".into());
    let gw = gateway(cfg).await;
    let url = gw.url();
    let drain = "/api/workers/sim-0/drain";
    let m = reqwest::Method::POST;
    let auth = ("authorization", "Bearer tok-1");
    assert_eq!(
        raw(&url, m.clone(), drain, &[auth, ("origin", EVIL), ("content-type", "application/json")], "").await.0,
        403
    );
    assert_eq!(raw(&url, m.clone(), drain, &[("content-type", "application/json")], "").await.0, 401);
    assert_eq!(raw(&url, m.clone(), drain, &[auth, ("content-type", "text/plain")], "").await.0, 400);
    assert_eq!(raw(&url, m.clone(), drain, &[auth, ("content-type", "application/json")], "").await.0, 200);
    gw.shutdown(Duration::from_secs(5)).await;
}

/// The status line of a WebSocket handshake on `/ws` with the given extra header lines, and the first
/// text frame when the upgrade succeeded.
async fn ws_handshake(addr: std::net::SocketAddr, extra: &str) -> (u16, Option<String>) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("handshake sent");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    if status != 101 {
        return (status, None);
    }
    let mut frame = buf[end..].to_vec();
    // One unmasked server frame: opcode byte, length (7 bits, or 16 / 64 bits extended), payload.
    loop {
        if frame.len() >= 2 {
            let (len, at) = match frame[1] & 0x7f {
                126 if frame.len() >= 4 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
                127 if frame.len() >= 10 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
                n if n < 126 => (usize::from(n), 2),
                _ => (usize::MAX, 0),
            };
            if len != usize::MAX && frame.len() >= at + len {
                return (status, Some(String::from_utf8_lossy(&frame[at..at + len]).to_string()));
            }
        }
        let mut chunk = [0u8; 65536];
        let n = tcp.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before the first snapshot");
        frame.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn the_dashboard_socket_refuses_foreign_origins() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let addr = gw.addr();
    assert_eq!(ws_handshake(addr, &format!("Origin: {EVIL}\r\n")).await, (403, None));
    assert_eq!(ws_handshake(addr, "Origin: null\r\n").await.0, 403);
    assert_eq!(ws_handshake(addr, &format!("Origin: http://{addr}\r\nSec-Fetch-Site: cross-site\r\n")).await.0, 403);
    let (code, first) = ws_handshake(addr, &format!("Origin: http://{addr}\r\n")).await;
    assert_eq!(code, 101, "the gateway's own page connects");
    let snap: Value = serde_json::from_str(&first.expect("a snapshot")).expect("JSON");
    assert_eq!(snap["workers"][0]["name"], "sim-0");
    assert_eq!(ws_handshake(addr, "").await.0, 101, "a tool without an Origin connects");
    gw.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn require_token_refuses_a_start_and_a_reload_without_a_token() {
    for (env, key) in [
        (&[("LLM_ADMIN_REQUIRE_TOKEN", "true")][..], "admin.require_token"),
        (&[("LLM_ADMIN_TOKEN", "")], "admin.token"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env_remove("LLM_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with(&format!("llm-gateway: config error: {key}")), "{stderr}");
    }
    // With a token it serves, and a change that would drop the token is refused while the old config stays.
    let sims = sims(1, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.admin.token = Some("tok-2".into());
    cfg.admin.require_token = true;
    let gw = gateway(cfg).await;
    let hdr = [("authorization", "Bearer tok-2"), ("content-type", "application/json")];
    let (code, e) = raw(&gw.url(), reqwest::Method::PATCH, "/api/config", &hdr, r#"{"admin":{"token":null}}"#).await;
    assert_eq!(code, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("admin.require_token"), "{e}");
    assert_eq!(gw.state.snapshot.load().config.admin.token.as_deref(), Some("tok-2"));
    gw.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------------
// The real binary, its log captured

/// A running `llm-gateway` process whose stderr goes to a file; killed when dropped.
struct Binary {
    child: tokio::process::Child,
    url: String,
    log: PathBuf,
    dir: PathBuf,
}

impl Binary {
    /// Starts the binary on `127.0.0.1:0` with `config` (TOML) and the log filter `level`.
    async fn start(config: &str, level: &str) -> Binary {
        let dir = temp_path("security");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gateway.toml");
        std::fs::write(&file, config).unwrap();
        let log = dir.join("stderr.log");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
        cmd.args(["--config", file.to_str().unwrap(), "--host", "127.0.0.1", "--port", "0"])
            .env("RUST_LOG", level)
            .env_remove("LLM_ADMIN_TOKEN")
            .stderr(std::fs::File::create(&log).unwrap());
        let Listening { child, url } = spawn_listening(cmd).await;
        Binary { child, url, log, dir }
    }

    /// SIGTERM, wait for the exit, and answer the whole log.
    async fn stop(mut self) -> String {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("the gateway exits").unwrap();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------------
// Defect 6: credentials in worker URLs

#[tokio::test]
async fn worker_url_credentials_show_nowhere_not_even_in_the_trace_log() {
    const PW: &str = "pw-0f-the-w0rker";
    let sims = sims(2, |_| fast_sim()).await;
    let with_creds =
        |s: &vllm_sim::SimHandle, user: &str| s.url().replacen("http://", &format!("http://{user}:{PW}@"), 1);
    // One worker named by its URL (host:port), one named in the config; both carry a password.
    let unnamed = sims[0].url().trim_start_matches("http://").to_string();
    let config = format!(
        "[routing]\nstrategy = \"round_robin\"\n[health]\ninterval_ms = 100\n[circuit_breaker]\nfailure_threshold = 2\n\
         [[workers]]\nurl = \"{}\"\n[[workers]]\nname = \"sim-b\"\nurl = \"{}/\"\n",
        with_creds(&sims[0], "alice"),
        with_creds(&sims[1], "bob"),
    );
    let gw = Binary::start(&config, "trace").await;
    let url = gw.url.clone();
    let c = client();
    wait_for("both workers healthy", Duration::from_secs(10), || async {
        c.get(format!("{url}/health")).send().await.unwrap().json::<Value>().await.unwrap()["healthy_workers"] == 2
    })
    .await;
    // Traffic, failures (sim-b answers 500s until its breaker opens), an admin add and a bad add.
    for _ in 0..4 {
        assert_eq!(post_chat(&url, false).await.status(), 200);
        assert_eq!(post_chat(&url, true).await.status(), 200);
    }
    sims[1].set_faults(vllm_sim::Faults { error_rate: 1.0, ..Default::default() });
    for _ in 0..6 {
        post_chat(&url, false).await;
    }
    let added = json!({"url": format!("http://carol:{PW}@127.0.0.1:9/"), "name": "added"});
    let resp = c.post(format!("{url}/api/workers")).json(&added).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let bad = json!({"url": format!("ftp://dave:{PW}@127.0.0.1:9/"), "name": "bad"});
    let resp = c.post(format!("{url}/api/workers")).json(&bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let bad_answer = resp.text().await.unwrap();

    let get = |path: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(format!("{url}{path}")).send().await.unwrap().text().await.unwrap() }
    };
    let workers = get("/api/workers").await;
    let breakers = get("/api/circuit-breaker/stats").await;
    let config_json = get("/api/config").await;
    let metrics = get("/metrics").await;
    let one = c.get(format!("{url}/api/workers/{unnamed}")).send().await.unwrap().text().await.unwrap();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let (code, ws) = ws_handshake(addr, "").await;
    assert_eq!(code, 101);
    let ws = ws.expect("a snapshot");
    for (what, text) in [
        ("/api/workers", &workers),
        ("/api/workers/{id}", &one),
        ("/api/circuit-breaker/stats", &breakers),
        ("/api/config", &config_json),
        ("/metrics", &metrics),
        ("/ws", &ws),
        ("the 400 of a bad worker", &bad_answer),
    ] {
        assert!(!text.contains(PW), "{what} shows the password: {text}");
    }
    // The URL is still shown, redacted, so an operator can tell workers apart.
    let list: Value = serde_json::from_str(&workers).unwrap();
    assert_eq!(list[0]["url"], format!("http://alice:***@{unnamed}"));
    assert_eq!(list[0]["name"], unnamed);
    assert_eq!(list[2]["url"], "http://carol:***@127.0.0.1:9/");
    let breakers: Value = serde_json::from_str(&breakers).unwrap();
    assert_eq!(breakers[1]["url"], format!("{}/", with_creds(&sims[1], "bob").replace(PW, "***")));
    // Every worker metric is labelled by the worker's name, never by its URL.
    assert!(!metrics.contains("url=\""), "a url label is left");
    for series in [
        format!("llm_worker_healthy{{worker=\"{unnamed}\"}} 1"),
        "llm_worker_healthy{worker=\"sim-b\"}".to_string(),
        "llm_circuit_breaker_failures_total{worker=\"sim-b\"}".to_string(),
        "llm_circuit_breaker_transitions_total{to=\"open\",worker=\"sim-b\"} 1".to_string(),
        format!("llm_gateway_routing_decisions_total{{strategy=\"round_robin\",worker=\"{unnamed}\"}}"),
        format!("llm_gateway_upstream_outcomes_total{{outcome=\"success\",worker=\"{unnamed}\"}}"),
        format!("llm_worker_in_flight_requests{{worker=\"{unnamed}\"}} 0"),
    ] {
        assert!(metrics.contains(&series), "missing {series} in:\n{metrics}");
    }

    let log = gw.stop().await;
    assert!(log.contains("TRACE"), "the log was captured at trace level");
    assert!(log.contains("carol:***@"), "the added worker is logged, redacted");
    assert!(!log.contains(PW), "the trace log shows the password:\n{}", {
        log.lines().filter(|l| l.contains(PW)).take(5).collect::<Vec<_>>().join("\n")
    });
}

// ---------------------------------------------------------------------------------------------------
// Defect 8: log injection through client strings

#[tokio::test]
async fn a_hostile_model_name_is_bounded_and_escaped_in_the_answer_and_the_log() {
    let sims = sims(1, |_| fast_sim()).await;
    let config = format!("[health]\ninterval_ms = 100\n[[workers]]\nname = \"sim-0\"\nurl = \"{}\"\n", sims[0].url());
    let gw = Binary::start(&config, "info").await;
    let forged_line = "2026-01-01T00:00:00.000000Z  INFO llm_gateway::admin: FORGED admin token accepted";
    let model = format!("nope\n{forged_line}\n\u{1b}[2J\u{1b}[31mred\u{7}{}", "m".repeat(1 << 20));
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client().post(format!("{}/v1/chat/completions", gw.url)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(text.len() < 2048, "the answer echoes {} bytes", text.len());
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(!msg.contains('\n') && !msg.contains('\u{1b}') && !msg.contains('\u{7}'), "{msg:?}");
    assert!(msg.contains("nope\\n2026-01-01T00:00:00.000000Z") && msg.contains("\\u{1b}[2J"), "escaped: {msg}");
    assert!(msg.chars().count() < 400, "{} chars", msg.chars().count());

    // A path and a Content-Type are echoed bounded too.
    let long_path = format!("{}/v1/{}", gw.url, "p".repeat(10_000));
    let resp = client().get(long_path).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().len() < 1024);
    let ct = format!("text/{}", "x".repeat(10_000));
    let resp = client().post(format!("{}/v1/chat/completions", gw.url)).header("content-type", ct).body("{}").send();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().len() < 1024);

    let log = gw.stop().await;
    assert!(log.contains("does not exist"), "the refused request is logged:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with(forged_line)), "a forged log line:\n{log}");
    assert!(!log.contains('\u{1b}') && !log.contains('\u{7}'), "a control character reached the log");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a {longest}-byte log line");
}
