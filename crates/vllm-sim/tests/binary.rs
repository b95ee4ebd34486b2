//! The `vllm-sim` binary starts, announces its address on stdout, and serves.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn binary_announces_and_serves() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["--port", "0", "--model", "tiny", "--output-tokens", "2-3", "--ttft-ms", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.strip_prefix("vllm-sim listening on ").unwrap().split(' ').next().unwrap().to_owned();
    assert!(line.trim_end().ends_with("model=tiny"), "{line}");
    let v: serde_json::Value = reqwest::get(format!("{url}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    child.kill().unwrap();
    child.wait().unwrap();
}
