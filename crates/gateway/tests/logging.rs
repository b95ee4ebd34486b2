//! The real binary's log: request lines are buffered (`log.flush_ms`), written while it runs, and none
//! is lost when it stops.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use std::time::Duration;

/// Starts `llm-gateway --demo 1` with `log.flush_ms = flush_ms`, its stderr into a file.
async fn start(flush_ms: u64) -> (Listening, std::path::PathBuf) {
    let log = temp_path("logging.log");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
    cmd.args(["--demo", "1", "--host", "127.0.0.1", "--port", "0"])
        .env("LLM_LOG_FLUSH_MS", flush_ms.to_string())
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    (spawn_listening(cmd).await, log)
}

async fn one_request(url: &str) {
    let body =
        serde_json::json!({"model": "demo-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client().post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
}

/// The request lines in the log so far.
fn request_lines(log: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.contains("llm_gateway::proxy::accounting") && l.contains("status=200")).count()
}

#[tokio::test]
async fn buffered_request_lines_reach_the_log_while_the_gateway_runs() {
    let (Listening { mut child, url }, log) = start(200).await;
    one_request(&url).await;
    one_request(&url).await;
    wait_for("both request lines in the log", Duration::from_secs(10), || async { request_lines(&log) == 2 }).await;
    assert!(child.try_wait().unwrap().is_none(), "written by the flush, not at exit");
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn lines_still_buffered_are_written_when_the_gateway_stops() {
    // A flush period far longer than the test: only the stop can write the line.
    let (Listening { mut child, url }, log) = start(600_000).await;
    one_request(&url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(request_lines(&log), 0, "an info line waits in the buffer");
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("it exits").unwrap();
    assert!(status.success());
    assert_eq!(request_lines(&log), 1, "{}", std::fs::read_to_string(&log).unwrap());
    let _ = std::fs::remove_file(&log);
}
