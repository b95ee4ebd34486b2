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

/// A unique path in the temp directory for `what` (a file or a directory): `llm-gateway-<what>-<uuid>`.
/// The one way tests name temp files.
pub fn temp_path(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("llm-gateway-{what}-{}", uuid::Uuid::new_v4().simple()))
}

/// A child process that printed its listening URL; killed when dropped.
pub struct Listening {
    pub child: tokio::process::Child,
    pub url: String,
}

/// How long a spawned binary has to print its listening line.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Spawns `cmd` (stdout piped, killed on drop; stderr as the caller set it) and reads stdout up to the first line
/// holding an `http://` URL: the listening line of `llm-gateway` and `vllm-sim`. `None` when the process
/// ends its output without one (it could not bind, say). Async, so in-test workers keep serving the
/// probes the gateway makes before it prints the line.
pub async fn try_spawn_listening(mut cmd: tokio::process::Command) -> Option<Listening> {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true).spawn().expect("the binary starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let url = tokio::time::timeout(LISTEN_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                return Some(url.to_string());
            }
        }
        None
    })
    .await
    .expect("a listening line in time")?;
    Some(Listening { child, url })
}

/// [`try_spawn_listening`], panicking when no listening line comes.
pub async fn spawn_listening(cmd: tokio::process::Command) -> Listening {
    try_spawn_listening(cmd).await.expect("a listening line")
}

/// A real `llm-gateway` process on an ephemeral loopback port with `config` (TOML, written to a temp
/// file removed on drop) and `args`; killed when dropped.
pub struct GatewayProcess {
    pub process: Listening,
    config: std::path::PathBuf,
}

impl GatewayProcess {
    pub async fn start(config: &str, args: &[&str]) -> GatewayProcess {
        let path = temp_path("config.toml");
        std::fs::write(&path, config).expect("write the config");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
        cmd.args(["--config", path.to_str().expect("utf-8 path"), "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stderr(std::process::Stdio::null());
        GatewayProcess { process: spawn_listening(cmd).await, config: path }
    }

    pub fn url(&self) -> &str {
        &self.process.url
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A real `vllm-sim` process; killed (SIGKILL) when dropped.
pub struct SimProcess {
    pub process: Listening,
    pub port: u16,
}

impl SimProcess {
    fn command(port: u16, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(sim_binary());
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]).args(args).stderr(std::process::Stdio::null());
        cmd
    }

    fn from(process: Listening) -> SimProcess {
        let port = process.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the url");
        SimProcess { process, port }
    }

    /// Starts `vllm-sim` with `args` on an ephemeral port and waits for its listening line.
    pub async fn start(args: &[&str]) -> SimProcess {
        SimProcess::from(spawn_listening(Self::command(0, args)).await)
    }

    /// Starts `vllm-sim` again on `port`, where a killed one listened: retried until the port is free
    /// again (the old socket may linger a moment), for up to 10 s.
    pub async fn restart_on(port: u16, args: &[&str]) -> SimProcess {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = try_spawn_listening(Self::command(port, args)).await {
                return SimProcess::from(p);
            }
            assert!(tokio::time::Instant::now() < deadline, "port {port} did not become free again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> &str {
        &self.process.url
    }

    /// Kills the process at once, like a crash, and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.process.child.kill().await;
    }
}

/// Starts an external server that picks no port of its own and takes no listener (redis-server,
/// prometheus): takes a free port (bind `:0`, then release it), starts `command(port)` and waits until
/// `ready(port)`. Another process may take the port in between; then the server exits, and it is tried
/// again on another port (5 times). Killed when dropped.
pub fn start_on_free_port(
    what: &str,
    mut command: impl FnMut(u16) -> std::process::Command,
    ready: impl Fn(u16) -> bool,
) -> ExternalServer {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = command(port).spawn().unwrap_or_else(|e| panic!("{what} starts: {e}"));
        // Owned at once, so a failed start still kills and reaps it.
        let mut server = ExternalServer { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if ready(port) {
                return server;
            }
            if server.child.try_wait().ok().flatten().is_some() {
                break; // exited: most likely the port was taken; try another
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("{what} did not come up");
}

/// A process started by [`start_on_free_port`]; killed when dropped.
pub struct ExternalServer {
    pub child: std::process::Child,
    pub port: u16,
}

impl ExternalServer {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ExternalServer {
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
pub struct RedisServer(pub ExternalServer);

impl RedisServer {
    /// Starts one; fails loudly when Debian's redis-server is not installed (scripts/test.sh installs it).
    pub fn start() -> RedisServer {
        let command = |port: u16| {
            let mut cmd = std::process::Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null());
            cmd
        };
        let pong = |port: u16| {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
            let mut buf = [0u8; 16];
            s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
        };
        RedisServer(start_on_free_port(
            "redis-server (apt-get install redis-server; scripts/test.sh does it)",
            command,
            pong,
        ))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.0.port)
    }

    pub fn kill(&mut self) {
        self.0.kill();
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
