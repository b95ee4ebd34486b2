//! `llm-gateway loadtest`: closed-loop load on a gateway's `/v1/chat/completions`.
//!
//! `-c` clients each send one request, wait for the whole answer, and send the next, until `-d` seconds
//! have passed (requests in flight then are let finish and counted). The report gives throughput,
//! latency percentiles, time to first token for streams (the first `data:` chunk), output tokens per
//! second (from `usage`, asked for with `stream_options.include_usage`, else counted chunks) and errors
//! by kind: `http_<status>`, `stream_error` (an error event inside a stream), or the transport class
//! (`connect`, `timeout`, `body`, `request`).

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// `loadtest` options.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// The gateway's base URL (requests go to URL/v1/chat/completions).
    #[arg(value_name = "URL")]
    pub url: String,
    /// Concurrent clients, each sending its next request when the last one finished.
    #[arg(short = 'c', long, default_value_t = 8)]
    pub concurrency: usize,
    /// How long to send new requests, seconds.
    #[arg(short = 'd', long, value_name = "SECONDS", default_value_t = 10.0)]
    pub duration: f64,
    /// Ask for streamed answers (and measure time to first token).
    #[arg(long)]
    pub stream: bool,
    /// `model` of each request (default: none, so the gateway picks the one model it serves).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// The user message of each request.
    #[arg(long, default_value = "Write a short poem about load balancing.")]
    pub prompt: String,
    /// Sent as `Authorization: Bearer` (the gateway's own API key, if it asks for one).
    #[arg(long, env = "LLM_LOADTEST_API_KEY")]
    pub api_key: Option<String>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Also write the report as JSON to this file.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// What one request gave.
#[derive(Debug, Clone, Default)]
struct Sample {
    latency: Duration,
    ttft: Option<Duration>,
    output_tokens: u64,
    error: Option<String>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Largest.
    pub max: f64,
}

/// The loadtest report, printed as text and written by `-o` as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Target base URL.
    pub url: String,
    /// Clients.
    pub concurrency: usize,
    /// Whether answers were streamed.
    pub stream: bool,
    /// Wall time from the first request to the last answer, seconds.
    pub elapsed_secs: f64,
    /// Requests finished (ok or not).
    pub requests: u64,
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed.
    pub errors_total: u64,
    /// Successful requests per second.
    pub rps: f64,
    /// Latency of successful requests, to the end of the answer.
    pub latency_ms: Option<Percentiles>,
    /// Time to the first streamed chunk of successful streams (none without `--stream`).
    pub ttft_ms: Option<Percentiles>,
    /// Output tokens of successful requests.
    pub output_tokens: u64,
    /// Output tokens per second.
    pub tokens_per_sec: f64,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
}

/// Runs the load test and prints its report; fails when no request succeeded.
pub async fn run(args: LoadtestArgs) -> Result<(), String> {
    if args.concurrency == 0 {
        return Err("loadtest: -c must be at least 1".into());
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("loadtest: -d must be a positive number of seconds".into());
    }
    let report = load(&args).await?;
    print!("{}", render(&report));
    if let Some(path) = &args.output {
        let text = serde_json::to_string_pretty(&report).map_err(|e| format!("loadtest: report: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("loadtest: cannot write {}: {e}", path.display()))?;
    }
    if report.ok == 0 {
        return Err(format!("loadtest: no request succeeded ({} failed)", report.errors_total));
    }
    Ok(())
}

/// Puts the load on and gathers the report.
pub async fn load(args: &LoadtestArgs) -> Result<Report, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout.max(0.001)))
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("loadtest: cannot build an HTTP client: {e}"))?;
    let endpoint = format!("{}/v1/chat/completions", args.url.trim_end_matches('/'));
    let mut body = json!({
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "stream": args.stream,
    });
    if args.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if let Some(model) = &args.model {
        body["model"] = json!(model);
    }
    let body = Arc::new(body);
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let until = started + duration;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let (client, endpoint, body) = (client.clone(), endpoint.clone(), Arc::clone(&body));
        let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
        let (stream, api_key) = (args.stream, args.api_key.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                let s = one_request(&client, &endpoint, &body, stream, api_key.as_deref()).await;
                if s.error.is_some() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                samples.push(s);
            }
            samples
        }));
    }

    let bar = progress_bar(duration);
    let progress = {
        let (bar, done, failed) = (bar.clone(), Arc::clone(&done), Arc::clone(&failed));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let elapsed = started.elapsed();
                let n = done.load(Ordering::Relaxed);
                bar.set_position(elapsed.min(duration).as_millis() as u64);
                bar.set_message(format!(
                    "{n} requests, {} errors, {:.0} req/s",
                    failed.load(Ordering::Relaxed),
                    n as f64 / elapsed.as_secs_f64().max(1e-3)
                ));
            }
        })
    };
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.map_err(|e| format!("loadtest: a client task failed: {e}"))?);
    }
    let elapsed = started.elapsed();
    progress.abort();
    bar.finish_and_clear();
    Ok(summarize(args, &samples, elapsed))
}

fn progress_bar(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One request, timed to its first `data:` chunk and to its end.
async fn one_request(
    client: &reqwest::Client,
    endpoint: &str,
    body: &Value,
    stream: bool,
    api_key: Option<&str>,
) -> Sample {
    let started = Instant::now();
    let mut req = client.post(endpoint).json(body);
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    let fail = |kind: String| Sample { latency: started.elapsed(), error: Some(kind), ..Sample::default() };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return fail(transport_class(&e)),
    };
    let status = resp.status();
    if !status.is_success() {
        // Read the body so the connection can be reused.
        let _ = resp.bytes().await;
        return fail(format!("http_{}", status.as_u16()));
    }
    if !stream {
        return match resp.json::<Value>().await {
            Ok(v) => Sample {
                latency: started.elapsed(),
                ttft: None,
                output_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
                error: None,
            },
            Err(e) => fail(transport_class(&e)),
        };
    }
    let mut resp = resp;
    let mut ttft = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut events = SseTally::default();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if ttft.is_none() && chunk.windows(5).any(|w| w == b"data:") {
                    ttft = Some(started.elapsed());
                }
                buf.extend_from_slice(&chunk);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    events.event(&String::from_utf8_lossy(&event));
                }
            }
            Ok(None) => break,
            Err(e) => return fail(transport_class(&e)),
        }
    }
    if !buf.is_empty() {
        events.event(&String::from_utf8_lossy(&buf));
    }
    if events.error {
        return fail("stream_error".into());
    }
    Sample {
        latency: started.elapsed(),
        ttft,
        output_tokens: events.usage_tokens.unwrap_or(events.content_chunks),
        error: None,
    }
}

/// What a stream's events said.
#[derive(Debug, Default)]
struct SseTally {
    content_chunks: u64,
    usage_tokens: Option<u64>,
    error: bool,
}

impl SseTally {
    fn event(&mut self, event: &str) {
        for line in event.lines() {
            let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if v.get("error").is_some() {
                self.error = true;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                self.usage_tokens = Some(n);
            }
            let choice = &v["choices"][0];
            let text = choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str());
            if text.is_some_and(|t| !t.is_empty()) {
                self.content_chunks += 1;
            }
        }
    }
}

/// The error class of a transport failure.
fn transport_class(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
    .into()
}

fn percentiles(mut ms: Vec<f64>) -> Option<Percentiles> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    let r = |x: f64| (x * 100.0).round() / 100.0;
    Some(Percentiles {
        p50: r(at(0.50)),
        p95: r(at(0.95)),
        p99: r(at(0.99)),
        mean: r(ms.iter().sum::<f64>() / ms.len() as f64),
        max: r(ms[ms.len() - 1]),
    })
}

fn summarize(args: &LoadtestArgs, samples: &[Sample], elapsed: Duration) -> Report {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mut errors = BTreeMap::new();
    for kind in samples.iter().filter_map(|s| s.error.as_ref()) {
        *errors.entry(kind.clone()).or_insert(0) += 1;
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let output_tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Report {
        url: args.url.clone(),
        concurrency: args.concurrency,
        stream: args.stream,
        elapsed_secs: (secs * 1000.0).round() / 1000.0,
        requests: samples.len() as u64,
        ok: ok.len() as u64,
        errors_total: (samples.len() - ok.len()) as u64,
        rps: (ok.len() as f64 / secs * 100.0).round() / 100.0,
        latency_ms: percentiles(ok.iter().map(|s| ms(s.latency)).collect()),
        ttft_ms: if args.stream { percentiles(ok.iter().filter_map(|s| s.ttft.map(ms)).collect()) } else { None },
        output_tokens,
        tokens_per_sec: (output_tokens as f64 / secs * 10.0).round() / 10.0,
        errors,
    }
}

/// The report as text.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mode = if r.stream { "stream" } else { "non-stream" };
    let _ = writeln!(out, "loadtest {}: {} clients, {mode}, {:.1}s", r.url, r.concurrency, r.elapsed_secs);
    let _ = writeln!(out, "requests    {} ok, {} failed, {:.1} req/s", r.ok, r.errors_total, r.rps);
    if let Some(l) = &r.latency_ms {
        let _ = writeln!(
            out,
            "latency     p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            l.p50, l.p95, l.p99, l.max
        );
    }
    if let Some(t) = &r.ttft_ms {
        let _ = writeln!(out, "ttft        p50 {:.1} ms  p99 {:.1} ms", t.p50, t.p99);
    }
    let _ = writeln!(out, "tokens      {} out, {:.1} tokens/s", r.output_tokens, r.tokens_per_sec);
    if r.errors.is_empty() {
        let _ = writeln!(out, "errors      none");
    } else {
        let kinds: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(out, "errors      {}", kinds.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(percentiles(vec![7.0]).unwrap().p99, 7.0);
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn sse_tally_prefers_usage_and_sees_errors() {
        let mut t = SseTally::default();
        t.event("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n");
        t.event("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        t.event("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n");
        assert_eq!(t.content_chunks, 2);
        t.event("data: {\"choices\":[],\"usage\":{\"completion_tokens\":5}}\n\ndata: [DONE]\n\n");
        assert_eq!(t.usage_tokens, Some(5));
        assert!(!t.error);
        t.event("data: {\"error\":{\"message\":\"x\"}}\n\n");
        assert!(t.error);
    }
}
