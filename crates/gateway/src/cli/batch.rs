//! `llm-gateway batch submit|list|status|cancel|results`: the Batch API from the command line, through
//! the same `/v1/files` and `/v1/batches` endpoints the OpenAI SDK uses.

use crate::error::error_chain;
use clap::Subcommand;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the gateway is and which API key to use.
#[derive(Debug, Clone, clap::Args)]
pub struct Api {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://localhost:9000", env = "LLM_GATEWAY_URL")]
    pub url: String,
    /// API key (when `[auth]` is on); the batch belongs to its tenant.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// `batch` subcommands.
#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Upload FILE.jsonl and start a batch; with --wait, show progress until it ends and write results.
    Submit {
        /// The JSONL input: one `{"custom_id","method","url","body"}` per line.
        file: PathBuf,
        /// The endpoint every line targets.
        #[arg(long, default_value = "/v1/chat/completions")]
        endpoint: String,
        /// Wait for the batch to end (progress bar), then write its results.
        #[arg(long)]
        wait: bool,
        /// Where --wait writes the results (default: FILE with `.results.jsonl`).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// The gateway and key.
        #[command(flatten)]
        api: Api,
    },
    /// The batches, newest first.
    List {
        /// The gateway and key.
        #[command(flatten)]
        api: Api,
    },
    /// One batch's status and counts.
    Status {
        /// The batch id.
        id: String,
        /// The gateway and key.
        #[command(flatten)]
        api: Api,
    },
    /// Cancel a batch (lines in flight finish; finished lines are kept).
    Cancel {
        /// The batch id.
        id: String,
        /// The gateway and key.
        #[command(flatten)]
        api: Api,
    },
    /// Write a finished batch's output lines (then its error lines) to a file.
    Results {
        /// The batch id.
        id: String,
        /// The file to write.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// The gateway and key.
        #[command(flatten)]
        api: Api,
    },
}

/// Runs a `batch` subcommand.
pub async fn run(cmd: BatchCommand) -> Result<(), String> {
    match cmd {
        BatchCommand::Submit { file, endpoint, wait, output, api } => {
            submit(&api, &file, &endpoint, wait, output).await
        }
        BatchCommand::List { api } => {
            let list = call(&api, reqwest::Method::GET, "/v1/batches?limit=100", None).await?;
            print!("{}", render_list(&list));
            Ok(())
        }
        BatchCommand::Status { id, api } => {
            let b = call(&api, reqwest::Method::GET, &format!("/v1/batches/{id}"), None).await?;
            print!("{}", render_status(&b));
            Ok(())
        }
        BatchCommand::Cancel { id, api } => {
            let b = call(&api, reqwest::Method::POST, &format!("/v1/batches/{id}/cancel"), None).await?;
            print!("{}", render_status(&b));
            Ok(())
        }
        BatchCommand::Results { id, output, api } => {
            let b = call(&api, reqwest::Method::GET, &format!("/v1/batches/{id}"), None).await?;
            let n = write_results(&api, &b, &output).await?;
            println!("wrote {n} lines to {}", output.display());
            Ok(())
        }
    }
}

fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

fn url(api: &Api, path: &str) -> String {
    format!("{}{path}", api.url.trim_end_matches('/'))
}

fn with_key(api: &Api, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match &api.api_key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

/// The body of a 2xx answer, else one line with the status and the gateway's message.
async fn answer(url: &str, resp: reqwest::Response) -> Result<reqwest::Response, String> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|j| j["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(200).collect());
    Err(format!("{url}: HTTP {}: {msg}", status.as_u16()))
}

async fn call(api: &Api, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let url = url(api, path);
    let mut req = with_key(api, client()?.request(method, &url));
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| format!("cannot reach {url}: {}", error_chain(&e)))?;
    let resp = answer(&url, resp).await?;
    resp.json().await.map_err(|e| format!("{url}: the answer is not JSON: {e}"))
}

async fn submit(api: &Api, file: &Path, endpoint: &str, wait: bool, output: Option<PathBuf>) -> Result<(), String> {
    let f = tokio::fs::File::open(file).await.map_err(|e| format!("{}: {e}", file.display()))?;
    let len = f.metadata().await.map_err(|e| format!("{}: {e}", file.display()))?.len();
    let name = file.file_name().map_or("input.jsonl".into(), |n| n.to_string_lossy().into_owned());
    let part = reqwest::multipart::Part::stream_with_length(reqwest::Body::from(f), len)
        .file_name(name)
        .mime_str("application/jsonl")
        .map_err(|e| e.to_string())?;
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
    let upload_url = url(api, "/v1/files");
    let resp = with_key(api, client()?.post(&upload_url).multipart(form))
        .send()
        .await
        .map_err(|e| format!("cannot reach {upload_url}: {}", error_chain(&e)))?;
    let uploaded: Value = answer(&upload_url, resp)
        .await?
        .json()
        .await
        .map_err(|e| format!("{upload_url}: the answer is not JSON: {e}"))?;
    let file_id = uploaded["id"].as_str().ok_or("the upload answer has no id")?.to_string();
    let body = serde_json::json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"});
    let batch = call(api, reqwest::Method::POST, "/v1/batches", Some(&body)).await?;
    let id = batch["id"].as_str().ok_or("the batch answer has no id")?.to_string();
    println!("batch {id} submitted (input file {file_id})");
    if !wait {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:>12} [{bar:40}] {pos}/{len} lines ({per_sec}, eta {eta})",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    let finished = loop {
        let b = call(api, reqwest::Method::GET, &format!("/v1/batches/{id}"), None).await?;
        let counts = &b["request_counts"];
        bar.set_length(counts["total"].as_u64().unwrap_or(0));
        bar.set_position(counts["completed"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0));
        let status = b["status"].as_str().unwrap_or("?").to_string();
        bar.set_message(status.clone());
        if matches!(status.as_str(), "completed" | "failed" | "expired" | "cancelled") {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish();
    print!("{}", render_status(&finished));
    if finished["status"] == "failed" {
        return Err(format!("batch {id} failed validation"));
    }
    let out = output.unwrap_or_else(|| file.with_extension("results.jsonl"));
    let n = write_results(api, &finished, &out).await?;
    println!("wrote {n} lines to {}", out.display());
    Ok(())
}

/// Writes the batch's output file, then its error file, into `out`; returns the lines written.
async fn write_results(api: &Api, batch: &Value, out: &Path) -> Result<usize, String> {
    let mut text = String::new();
    for key in ["output_file_id", "error_file_id"] {
        if let Some(fid) = batch[key].as_str() {
            let u = url(api, &format!("/v1/files/{fid}/content"));
            let resp = with_key(api, client()?.get(&u))
                .send()
                .await
                .map_err(|e| format!("cannot reach {u}: {}", error_chain(&e)))?;
            text.push_str(&answer(&u, resp).await?.text().await.map_err(|e| format!("{u}: {e}"))?);
        }
    }
    if batch["output_file_id"].is_null() && batch["error_file_id"].is_null() {
        return Err(format!(
            "batch {} has no results (status {})",
            batch["id"].as_str().unwrap_or("?"),
            batch["status"].as_str().unwrap_or("?")
        ));
    }
    tokio::fs::write(out, &text).await.map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(text.lines().count())
}

/// One batch as a few lines of text.
pub fn render_status(b: &Value) -> String {
    let c = &b["request_counts"];
    let mut out = format!(
        "{}  {}  {}\n  lines: {} total, {} completed, {} failed\n",
        b["id"].as_str().unwrap_or("?"),
        b["status"].as_str().unwrap_or("?"),
        b["endpoint"].as_str().unwrap_or("?"),
        c["total"].as_u64().unwrap_or(0),
        c["completed"].as_u64().unwrap_or(0),
        c["failed"].as_u64().unwrap_or(0),
    );
    for key in ["output_file_id", "error_file_id"] {
        if let Some(f) = b[key].as_str() {
            out.push_str(&format!("  {key}: {f}\n"));
        }
    }
    if let Some(errors) = b["errors"]["data"].as_array() {
        for e in errors.iter().take(10) {
            out.push_str(&format!(
                "  error line {}: {} ({})\n",
                e["line"].as_u64().map_or("-".into(), |l| l.to_string()),
                e["message"].as_str().unwrap_or("?"),
                e["code"].as_str().unwrap_or("?"),
            ));
        }
    }
    out
}

/// The batch list as a table.
pub fn render_list(list: &Value) -> String {
    let mut out = format!("{:<40} {:<12} {:>8} {:>10} {:>7}\n", "ID", "STATUS", "TOTAL", "COMPLETED", "FAILED");
    for b in list["data"].as_array().into_iter().flatten() {
        let c = &b["request_counts"];
        out.push_str(&format!(
            "{:<40} {:<12} {:>8} {:>10} {:>7}\n",
            b["id"].as_str().unwrap_or("?"),
            b["status"].as_str().unwrap_or("?"),
            c["total"].as_u64().unwrap_or(0),
            c["completed"].as_u64().unwrap_or(0),
            c["failed"].as_u64().unwrap_or(0),
        ));
    }
    out
}
