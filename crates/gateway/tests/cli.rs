//! The `llm-gateway` binary's subcommands against an in-test gateway with real sims on loopback.

mod common;

use common::{fast_sim, gateway, sims, test_config, worker_configs};
use llm_gateway::Gateway;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::Duration;
use vllm_sim::SimHandle;

async fn setup(admin_token: Option<&str>) -> (Vec<SimHandle>, Gateway) {
    let sims = sims(2, |_| fast_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.admin.token = admin_token.map(str::to_string);
    (sims, gateway(cfg).await)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary (asynchronously, so the in-test gateway keeps serving) with no `LLM_*` environment.
async fn run(args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
    cmd.args(args).kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("LLM_") {
            cmd.env_remove(k);
        }
    }
    // Where no config/gateway.toml is found by default.
    cmd.current_dir(std::env::temp_dir());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("cli finishes").expect("runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn status_workers_drain_and_config() {
    let (_sims, gw) = setup(None).await;
    let url = gw.url();

    let r = run(&["status", "--url", &url]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("strategy  round_robin"), "{}", r.stdout);
    assert!(r.stdout.contains("workers   2 total, 2 healthy, 0 draining"), "{}", r.stdout);

    let r = run(&["workers", "--url", &url]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(lines[0].starts_with("ID") && lines[0].contains("NAME") && lines[0].contains("INFL"), "{}", r.stdout);
    assert!(lines[1].contains("sim-0") && lines[1].contains("healthy") && lines[1].contains("demo-model"));

    let r = run(&["drain", "sim-0", "--url", &url]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("sim-0: draining"), "{}", r.stdout);
    let w0 = gw.state.snapshot.load().fleet.find("sim-0").cloned().unwrap();
    assert!(w0.stats.draining.load(Ordering::Relaxed));
    let r = run(&["workers", "--url", &url]).await;
    assert!(r.stdout.lines().nth(1).unwrap().contains("draining"), "{}", r.stdout);
    let id = w0.id.to_string();
    let r = run(&["undrain", &id, "--url", &url]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!w0.stats.draining.load(Ordering::Relaxed));

    let r = run(&["drain", "nope", "--url", &url]).await;
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("404"), "{}", r.stderr);

    let r = run(&["config", "--set", "routing.strategy=least_queue", "--set", "health.interval_ms=200", "--url", &url])
        .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("routing.strategy = \"least_queue\""), "{}", r.stdout);
    assert_eq!(gw.state.snapshot.load().policy.name(), "least_queue");
    assert_eq!(gw.state.snapshot.load().config.health.interval_ms, 200);

    let r = run(&["config", "--set", "routing.strategy=fastest", "--url", &url]).await;
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("routing.strategy") && r.stderr.contains("400"), "{}", r.stderr);
    assert_eq!(gw.state.snapshot.load().policy.name(), "least_queue");

    let r = run(&["config", "--url", &url]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let shown: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(shown["routing"]["strategy"], "least_queue");

    let r = run(&["status", "--url", "http://127.0.0.1:1"]).await;
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.starts_with("llm-gateway: cannot reach"), "{}", r.stderr);
}

#[tokio::test]
async fn mutations_need_the_admin_token() {
    let (_sims, gw) = setup(Some("tok-123")).await;
    let url = gw.url();
    let r = run(&["drain", "sim-1", "--url", &url]).await;
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("401"), "{}", r.stderr);
    let r = run(&["drain", "sim-1", "--url", &url, "--admin-token", "tok-123"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let r = run(&["status", "--url", &url]).await;
    assert!(r.stdout.contains("1 draining"), "{}", r.stdout);
}

#[tokio::test]
async fn loadtest_reports_throughput_and_writes_json() {
    let (_sims, gw) = setup(None).await;
    let dir = common::temp_path("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report.json");
    let r = run(&["loadtest", &gw.url(), "-c", "4", "-d", "2", "--stream", "-o", out.to_str().unwrap()]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("req/s") && r.stdout.contains("ttft") && r.stdout.contains("errors      none"));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(report["rps"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["errors_total"], 0, "{report}");
    assert_eq!(report["concurrency"], 4);
    assert!(report["ttft_ms"]["p50"].as_f64().unwrap() <= report["latency_ms"]["p50"].as_f64().unwrap());
    assert!(report["tokens_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    let served: u64 =
        gw.state.snapshot.load().fleet.workers.iter().map(|w| w.stats.requests_total.load(Ordering::Relaxed)).sum();
    assert_eq!(served, report["requests"].as_u64().unwrap());

    // Non-stream: no TTFT.
    let r =
        run(&["loadtest", &gw.url(), "-c", "2", "-d", "0.5", "--max-tokens", "3", "-o", out.to_str().unwrap()]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(report["ttft_ms"].is_null());
    assert_eq!(report["output_tokens"].as_u64().unwrap(), 3 * report["ok"].as_u64().unwrap());

    // Nothing listening: every request fails by transport class, and the command fails.
    let r = run(&["loadtest", "http://127.0.0.1:1", "-c", "1", "-d", "0.2", "-o", out.to_str().unwrap()]).await;
    assert_eq!(r.code, Some(1));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(report["errors"]["connect"].as_u64().unwrap() > 0, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn config_error_exits_2_with_one_line_naming_the_key() {
    let r = run(&["--strategy", "fastest", "--workers", "http://127.0.0.1:1"]).await;
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.starts_with("llm-gateway: config error: routing.strategy"), "{}", r.stderr);
}
