//! Test harness: real vllm-sim workers and a real gateway on ephemeral loopback ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // shared test helpers

use llm_gateway::config::{Config, WorkerConfig};
use llm_gateway::Gateway;
use std::future::Future;
use std::time::Duration;
use vllm_sim::{SimConfig, SimHandle};

/// A fast sim: small latencies so tests run quickly.
pub fn fast_sim() -> SimConfig {
    SimConfig {
        ttft_ms: 1.0,
        itl_ms: 1.0,
        prefill_ms_per_1k_tokens: 0.0,
        output_tokens: (4, 8),
        ..SimConfig::default()
    }
}

pub async fn sims(n: usize, cfg: impl Fn(usize) -> SimConfig) -> Vec<SimHandle> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(vllm_sim::start(cfg(i)).await.expect("sim starts"));
    }
    out
}

pub fn worker_configs(sims: &[SimHandle]) -> Vec<WorkerConfig> {
    sims.iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = WorkerConfig::from_url(s.url());
            w.name = Some(format!("sim-{i}"));
            w
        })
        .collect()
}

pub fn test_config(workers: Vec<WorkerConfig>) -> Config {
    let mut cfg = Config { workers, ..Config::default() };
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.health.interval_ms = 100;
    cfg.health.timeout_ms = 500;
    // Round robin spreads deterministically, which the shape and count assertions rely on; the default
    // strategy (p2c_kv) is held to `config/gateway.toml` by the config golden test.
    cfg.routing.strategy = routing::Strategy::RoundRobin;
    cfg
}

pub async fn gateway(cfg: Config) -> Gateway {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    Gateway::serve(listener, cfg).await.expect("gateway starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

pub fn chat(model: &str, content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
}

/// POSTs a small chat request for `demo-model` to the gateway at `gw_url`.
pub async fn post_chat(gw_url: &str, stream: bool) -> reqwest::Response {
    client().post(format!("{gw_url}/v1/chat/completions")).json(&chat("demo-model", "hi", stream)).send().await.unwrap()
}

/// Waits until `cond` holds, polling, or panics after `deadline`.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// SSE `data:` payloads of a whole stream body.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_string())))
        .collect()
}

/// The `vllm-sim` binary beside this test's target directory, built on demand when missing.
pub fn sim_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let bin = target.join("vllm-sim");
    if !bin.exists() {
        let release = target.file_name().is_some_and(|n| n == "release");
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "vllm-sim", "--bin", "vllm-sim"]);
        if release {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo runs").success(), "building vllm-sim failed");
    }
    bin
}

/// A real `vllm-sim` process; killed (SIGKILL) when dropped.
pub struct SimProcess {
    pub child: std::process::Child,
    pub url: String,
    pub port: u16,
}

impl SimProcess {
    /// Starts `vllm-sim` with `args` on `port` (0 = ephemeral) and waits for its listening line.
    pub fn start(port: u16, args: &[&str]) -> SimProcess {
        use std::io::BufRead;
        #[allow(clippy::zombie_processes)] // killed and waited for in `Drop`
        let mut child = std::process::Command::new(sim_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("vllm-sim starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = lines.next().expect("a listening line").expect("utf-8");
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("url in the line").to_string();
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the url");
        SimProcess { child, url, port }
    }

    /// Kills the process at once, like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Breaker state name of worker `i` from `/api/circuit-breaker/stats`.
pub async fn breaker_state(gw_url: &str, i: usize) -> String {
    let stats: serde_json::Value =
        client().get(format!("{gw_url}/api/circuit-breaker/stats")).send().await.unwrap().json().await.unwrap();
    stats[i]["breaker"]["state"].as_str().unwrap_or("?").to_string()
}

/// A real `redis-server` on an ephemeral loopback port, killed when dropped.
pub struct RedisServer {
    pub child: std::process::Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts one; fails loudly when Debian's redis-server is not installed (scripts/test.sh installs it).
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server; scripts/test.sh does it)");
        // Owned at once, so a failed start still kills and reaps it.
        let server = RedisServer { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG")) {
                    return server;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of an unlabelled counter (or a labelled series given whole) in a `/metrics` text.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
