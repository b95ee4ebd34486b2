//! What a slow, idle, greedy or unusual client can hold of the server (issue 11, defects 3, 7 and 9):
//! header, body and idle timeouts, `max_connections`, running out of file descriptors, the shared
//! body budget, the bearer scheme in any case, 429 quota headers, and HTTP/2.
//! Real gateways on loopback, raw TCP clients where a normal client would not misbehave. Timeouts are
//! configured short (hundreds of ms) and asserted with wide margins; exact timings are proven on paused
//! time in `connections.rs` and `proxy.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use llm_gateway::config::{ApiKeyConfig, Config};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

async fn sim_config() -> (Vec<vllm_sim::SimHandle>, Config) {
    let sims = sims(1, |_| fast_sim()).await;
    let cfg = test_config(worker_configs(&sims));
    (sims, cfg)
}

fn chat_body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": "demo-model", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]}))
    .unwrap()
}

/// Reads until the server closes the connection (or `limit` passes: then panics). Returns what was
/// read and how long it took.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(started + limit, tcp.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for {limit:?}: {}", String::from_utf8_lossy(&out)),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), started.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one whole HTTP/1.1 response with a `content-length` (head and body).
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                .and_then(Result::ok);
            if len.is_some_and(|n| body.len() >= n) {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "the server closed before answering: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

async fn get_health(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    read_response(tcp).await
}

#[tokio::test]
async fn silent_and_trickling_request_heads_are_cut_at_the_header_timeout() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.server.header_read_timeout_ms = 300;
    let gw = gateway(cfg).await;
    // Connected, never a byte.
    let mut silent = TcpStream::connect(gw.addr()).await.unwrap();
    let (_, took) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(200), "not before the timeout: {took:?}");
    // A head sent a byte every 50 ms: it keeps sending, yet is cut.
    let mut slow = TcpStream::connect(gw.addr()).await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /health HTTP/1.1\r\nhost: gw\r\nx-pad: ".iter().chain([b'a'; 200].iter()) {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut probe = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(50), slow.read(&mut probe)).await {
            cut = true;
            break;
        }
    }
    assert!(cut, "a head trickled for {:?} was never cut", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(8));
    // A prompt client on the same gateway is served.
    let mut ok = TcpStream::connect(gw.addr()).await.unwrap();
    assert!(get_health(&mut ok).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn idle_keep_alive_lasts_the_idle_timeout_not_the_header_timeout() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.server.header_read_timeout_ms = 200;
    cfg.server.idle_timeout_ms = 1_500;
    let gw = gateway(cfg).await;
    let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
    assert!(get_health(&mut tcp).await.starts_with("HTTP/1.1 200"));
    // Idle for three header timeouts: still open, because keep-alive idle has its own timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(get_health(&mut tcp).await.starts_with("HTTP/1.1 200"), "reused after 600 ms idle");
    let (rest, took) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(rest.is_empty());
    assert!(took >= Duration::from_millis(1_000), "closed by the idle timeout, not before: {took:?}");
}

#[tokio::test]
async fn a_body_trickled_past_the_body_timeout_gets_408() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.server.body_read_timeout_ms = 300;
    let gw = gateway(cfg).await;
    let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"")
        .await
        .unwrap();
    let started = Instant::now();
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let body: serde_json::Value = serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(gw.state.body_budget.used(), 0, "the partial body's bytes were given back");
}

/// A request whose body is still being sent: it holds its connection (and its declared bytes).
async fn busy_connection(addr: std::net::SocketAddr, declared: usize) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n{{"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test]
async fn beyond_max_connections_a_quiet_connection_is_reclaimed_else_503() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.server.max_connections = 2;
    let gw = gateway(cfg).await;
    let open = |n: usize| {
        let state = std::sync::Arc::clone(&gw.state);
        move || {
            let state = std::sync::Arc::clone(&state);
            async move { state.connections.open() == n }
        }
    };
    // Two connections with requests in flight: nothing to reclaim, the third is shed with a 503.
    let busy = [busy_connection(gw.addr(), 100).await, busy_connection(gw.addr(), 100).await];
    wait_for("two busy connections", Duration::from_secs(5), || {
        let s = std::sync::Arc::clone(&gw.state);
        async move { s.body_budget.used() == 200 }
    })
    .await;
    let mut third = TcpStream::connect(gw.addr()).await.unwrap();
    let (resp, _) = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(lower.contains("connection: close") && lower.contains("retry-after: 1"), "{resp}");
    assert!(resp.contains("\"server_busy\""), "{resp}");
    drop(busy);
    wait_for("the busy connections to close", Duration::from_secs(5), open(0)).await;

    // Two idle keep-alive connections: a newcomer is served, and the one idle the longest is closed.
    let mut idle_old = TcpStream::connect(gw.addr()).await.unwrap();
    assert!(get_health(&mut idle_old).await.starts_with("HTTP/1.1 200"));
    let mut idle_new = TcpStream::connect(gw.addr()).await.unwrap();
    assert!(get_health(&mut idle_new).await.starts_with("HTTP/1.1 200"));
    let mut newcomer = TcpStream::connect(gw.addr()).await.unwrap();
    assert!(get_health(&mut newcomer).await.starts_with("HTTP/1.1 200"));
    let (rest, _) = read_until_closed(&mut idle_old, Duration::from_secs(10)).await;
    assert!(rest.is_empty());
    assert!(get_health(&mut idle_new).await.starts_with("HTTP/1.1 200"), "the younger idle one was kept");
    wait_for("back within the limit", Duration::from_secs(5), open(2)).await;
}

#[tokio::test]
async fn bodies_beyond_max_buffered_bytes_get_503_server_busy() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.server.max_body_bytes = 1 << 20;
    cfg.server.max_buffered_bytes = 2 << 20;
    cfg.server.body_read_timeout_ms = 30_000;
    let gw = gateway(cfg).await;
    // Two 1 MiB bodies on their way hold the whole budget.
    let slow = [busy_connection(gw.addr(), 1 << 20).await, busy_connection(gw.addr(), 1 << 20).await];
    wait_for("two bodies to hold the budget", Duration::from_secs(5), || {
        let s = std::sync::Arc::clone(&gw.state);
        async move { s.body_budget.used() == 2 << 20 }
    })
    .await;
    let c = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let resp = c.post(&url).header("content-type", "application/json").body(chat_body()).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "server_busy");
    assert_eq!(body["error"]["type"], "service_unavailable");
    drop(slow);
    wait_for("the abandoned bodies to give their bytes back", Duration::from_secs(5), || {
        let s = std::sync::Arc::clone(&gw.state);
        async move { s.body_budget.used() == 0 }
    })
    .await;
    let resp = c.post(&url).header("content-type", "application/json").body(chat_body()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.state.body_budget.used(), 0, "an answered request holds no bytes");
}

/// Lines of the gateway's stderr that mention running out of file descriptors.
fn fd_warnings(log: &str) -> usize {
    log.lines().filter(|l| l.contains("out of file descriptors")).count()
}

#[tokio::test]
async fn health_answers_while_idle_sockets_exhaust_file_descriptors() {
    let sims = sims(1, |_| fast_sim()).await;
    let log_path = temp_path("server-limits-fd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // 64 descriptors: a handful for the runtime, the listener and the worker, the rest for clients.
    // Timeouts far longer than the test: only closing quiet connections can free descriptors.
    let mut cmd = tokio::process::Command::new("prlimit");
    cmd.args(["--nofile=64:64", "--"])
        .arg(env!("CARGO_BIN_EXE_llm-gateway"))
        .args(["--host", "127.0.0.1", "--port", "0", "--workers", &sims[0].url()])
        .env("LLM_SERVER_HEADER_READ_TIMEOUT_MS", "120000")
        .env("LLM_SERVER_IDLE_TIMEOUT_MS", "120000")
        .env("RUST_LOG", "info")
        .stderr(log);
    let Listening { mut child, url } = spawn_listening(cmd).await;
    let addr = url.trim_start_matches("http://").to_string();
    // 150 idle sockets: more than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    let started = Instant::now();
    let c = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let resp = c.get(format!("{url}/health")).send().await.expect("/health answers while descriptors are exhausted");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["status"].is_string(), "{body}");
    let took = started.elapsed();
    // And it keeps serving: a second client as well.
    let resp = c.get(format!("{url}/health")).send().await.expect("still serving");
    assert!(resp.status().is_success() || resp.status() == 503);
    assert!(child.try_wait().unwrap().is_none(), "the gateway is still running");
    let _ = child.kill().await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let warnings = fd_warnings(&log);
    assert!(warnings >= 1, "the exhaustion was logged:\n{log}");
    assert!(warnings <= 3, "once per episode, not once per refused accept ({warnings} lines)");
    eprintln!("/health answered {took:?} after 150 idle sockets; {warnings} warning line(s)");
    drop(idle);
}

fn key(k: &str, name: &str) -> ApiKeyConfig {
    ApiKeyConfig {
        key: k.into(),
        name: name.into(),
        priority: Default::default(),
        requests_per_minute: None,
        tokens_per_minute: None,
        requests_per_day: None,
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_for_keys_and_the_admin_token() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.auth.enabled = true;
    cfg.auth.keys = vec![key("sk-alpha", "alpha")];
    cfg.admin.token = Some("admin-secret".into());
    let gw = gateway(cfg).await;
    let c = client();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let resp = c
            .post(format!("{}/v1/chat/completions", gw.url()))
            .header("authorization", format!("{scheme} sk-alpha"))
            .header("content-type", "application/json")
            .body(chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
        let resp = c
            .post(format!("{}/api/workers/sim-0/undrain", gw.url()))
            .header("authorization", format!("{scheme} admin-secret"))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "admin, {scheme}");
    }
    let resp = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("authorization", "Basic sk-alpha")
        .body(chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "another scheme is not a bearer token");
}

#[tokio::test]
async fn a_rate_limited_429_carries_the_x_ratelimit_headers() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.requests_per_second = 0.0;
    cfg.rate_limit.per_user_rpm = 1;
    let gw = gateway(cfg).await;
    let c = client();
    let body = serde_json::json!({"model": "demo-model", "max_tokens": 5, "user": "carol",
        "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("{}/v1/chat/completions", gw.url());
    let ok = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-limit-requests"], "1");
    let refused = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let h = refused.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "1");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    assert!(h.contains_key("retry-after"));
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let (_sims, cfg) = sim_config().await;
    let gw = gateway(cfg).await;
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let get = http::Request::get(format!("{}/health", gw.url()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send.send_request(get).await.expect("an HTTP/2 answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // Two requests at once on the one connection, one of them a stream.
    let mut streamed = serde_json::from_slice::<serde_json::Value>(&chat_body()).unwrap();
    streamed["stream"] = true.into();
    let post = |body: Vec<u8>| {
        http::Request::post(format!("{}/v1/chat/completions", gw.url()))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    let (a, b) = tokio::join!(
        send.clone().send_request(post(chat_body())),
        send.send_request(post(serde_json::to_vec(&streamed).unwrap()))
    );
    for resp in [a.unwrap(), b.unwrap()] {
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("chat.completion"), "{text}");
    }
}

#[tokio::test]
async fn an_h2c_upgrade_request_is_answered_over_http1() {
    let (_sims, cfg) = sim_config().await;
    let gw = gateway(cfg).await;
    let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
    tcp.write_all(
        b"GET /health HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"status\""), "{resp}");
}

/// A chat request written whole, then the client's sending side shut down (`nc -N`, some HTTP/1.0
/// tools): what it reads back until the server closes.
async fn chat_then_half_close(addr: std::net::SocketAddr) -> String {
    let body = chat_body();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    tcp.shutdown().await.unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(10)).await.0
}

#[tokio::test]
async fn a_client_that_half_closes_gets_its_answer_with_server_half_close() {
    let (_sims, mut cfg) = sim_config().await;
    cfg.server.half_close = true;
    let gw = gateway(cfg).await;
    let answer = chat_then_half_close(gw.addr()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"chat.completion\""), "{answer}");
    // Off (the default), the end of input is the client leaving: nothing is answered.
    let (_sims, cfg) = sim_config().await;
    let gw = gateway(cfg).await;
    assert_eq!(chat_then_half_close(gw.addr()).await, "");
}
