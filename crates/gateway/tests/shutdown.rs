//! Graceful shutdown of the real binary: SIGTERM while streams run lets every stream finish, refuses
//! new connections, and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use futures_util::StreamExt;
use std::time::Duration;

#[tokio::test]
async fn sigterm_lets_running_streams_finish_and_exits_zero() {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
    cmd.args(["--demo", "2", "--host", "127.0.0.1", "--port", "0"])
        .env("LLM_SERVER_SHUTDOWN_GRACE_SECS", "20")
        .stderr(std::process::Stdio::null());
    let Listening { mut child, url } = spawn_listening(cmd).await;
    let c = client();
    // Long enough streams (100 tokens at the demo's ~10 ms) to be mid-flight at SIGTERM.
    let mut streams = Vec::new();
    for _ in 0..6 {
        let body = serde_json::json!({"model": "demo-model", "stream": true, "max_tokens": 100,
            "messages": [{"role": "user", "content": "tell me a long story"}]});
        let resp = c.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut s = resp.bytes_stream();
        let first = s.next().await.expect("a first chunk").unwrap();
        streams.push((String::from_utf8_lossy(&first).to_string(), s));
    }
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    // New connections are refused once the listener closed.
    let addr = url.trim_start_matches("http://").to_string();
    wait_for("the listener to close", Duration::from_secs(5), || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(addr).await.is_err() }
    })
    .await;
    for (mut body, mut s) in streams {
        while let Some(chunk) = s.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.expect("the stream is not cut")));
        }
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        assert!(!body.contains("\"error\""), "{body}");
    }
    let code = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("the gateway exits").unwrap();
    assert_eq!(code.code(), Some(0));
}
