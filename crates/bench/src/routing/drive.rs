//! Sending a workload through a router and timing it from the client's side, and reading the sims' own
//! counters. Every request is a streamed chat completion; its TTFT is the time to the first SSE `data:`
//! event carrying a role or content, and it counts as completed only when `data: [DONE]` arrived.
//!
//! - **Closed loop**: `clients` tasks, client `i` owning workload stream `i`, each sending its next
//!   request when the previous one ended (after an error it pauses [`ERROR_PAUSE`], so a router that fails
//!   fast is not hammered). Clients start no request after the run's end.
//! - **Open loop**: a schedule fixed in advance; at most `max_outstanding` requests in flight, arrivals
//!   beyond it are dropped and counted.
//!
//! A request may run [`REQUEST_TIMEOUT`], and never past [`GRACE`] after the run's end.

use crate::workload::{Arrival, Corpus, Kind, Stream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The pooled HTTP client every request goes through.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Longest one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the run's end requests still in flight may finish.
pub const GRACE: Duration = Duration::from_secs(20);
/// A closed-loop client's pause after a failed request.
pub const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How one request ended.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Streamed to `[DONE]`; first token after `ttft`.
    Ok {
        /// Time to the first token.
        ttft: Duration,
        /// Prompt tokens and those the worker served from its prefix cache (its final `usage`; 0 when
        /// it sent none).
        tokens: (u32, u32),
        /// `X-Queue-Position` when the router sets it (0: it did not wait in a gateway queue).
        queued: u32,
        /// The port of the worker that served it, from `X-Gateway-Worker` when the router names it (else 0).
        worker_port: u16,
    },
    /// Failed, with the kind of failure.
    Err(&'static str),
}

/// One request's result.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// When it ended, from the run's start.
    pub done: Duration,
    /// What was sent.
    pub kind: Kind,
    /// How.
    pub outcome: Outcome,
}

/// Runs `clients` closed loops against `url` for `duration`.
pub async fn closed_loop(
    client: &HttpClient,
    url: &str,
    corpus: &Arc<Corpus>,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let uri: http::Uri = format!("{url}/v1/chat/completions").parse()?;
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let (client, uri) = (client.clone(), uri.clone());
        let mut stream = Stream::new(Arc::clone(corpus), i as u64);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < end {
                let req = stream.next_request();
                let outcome = timed(&client, uri.clone(), &req.session, req.body, end).await;
                samples.push(Sample { done: start.elapsed(), kind: req.kind, outcome });
                if matches!(outcome, Outcome::Err(_)) {
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    Ok(all)
}

/// Replays `arrivals` against `url`; returns the samples and the number of arrivals dropped because
/// `max_outstanding` were in flight.
pub async fn open_loop(
    client: &HttpClient,
    url: &str,
    arrivals: &Arc<Vec<Arrival>>,
    duration: Duration,
    max_outstanding: usize,
) -> anyhow::Result<(Vec<Sample>, u64)> {
    let uri: http::Uri = format!("{url}/v1/chat/completions").parse()?;
    let start = Instant::now();
    let end = start + duration;
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(arrivals.len());
    let mut dropped = 0u64;
    for i in 0..arrivals.len() {
        tokio::time::sleep_until(start + arrivals[i].at).await;
        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
            dropped += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let (client, uri, outstanding, arrivals) =
            (client.clone(), uri.clone(), Arc::clone(&outstanding), Arc::clone(arrivals));
        tasks.push(tokio::spawn(async move {
            let req = &arrivals[i].request;
            let outcome = timed(&client, uri, &req.session, req.body.clone(), end).await;
            outstanding.fetch_sub(1, Ordering::Relaxed);
            Sample { done: start.elapsed(), kind: req.kind, outcome }
        }));
    }
    let mut all = Vec::with_capacity(tasks.len());
    for t in tasks {
        all.push(t.await?);
    }
    Ok((all, dropped))
}

/// One request, bounded by [`REQUEST_TIMEOUT`] and by `end + GRACE`.
async fn timed(client: &HttpClient, uri: http::Uri, session: &str, body: Bytes, end: Instant) -> Outcome {
    let deadline = (Instant::now() + REQUEST_TIMEOUT).min(end + GRACE);
    tokio::time::timeout_at(deadline, one(client, uri, session, body)).await.unwrap_or(Outcome::Err("timeout"))
}

/// Sends one streamed chat request and times its first token.
async fn one(client: &HttpClient, uri: http::Uri, session: &str, body: Bytes) -> Outcome {
    let t0 = Instant::now();
    let Ok(req) = http::Request::post(uri)
        .header("content-type", "application/json")
        .header("x-session-id", session)
        .body(Full::new(body))
    else {
        return Outcome::Err("bad_request");
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(_) => return Outcome::Err("transport"),
    };
    let status = resp.status();
    let queued =
        resp.headers().get("x-queue-position").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    let worker_port = resp
        .headers()
        .get("x-gateway-worker")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    if !status.is_success() {
        return Outcome::Err(match status.as_u16() {
            429 => "429",
            503 => "503",
            504 => "504",
            500..=599 => "5xx",
            _ => "4xx",
        });
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut ttft: Option<Duration> = None;
    let mut tokens = (0, 0);
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Outcome::Err("stream_cut") };
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Some(payload) = line.strip_prefix(b"data:") else { continue };
            let payload = payload.trim_ascii();
            if payload == b"[DONE]" {
                done = true;
                continue;
            }
            let usage = payload.windows(8).any(|w| w == b"\"usage\":");
            if ttft.is_some() && !usage && !payload.windows(8).any(|w| w == b"\"error\":") {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { continue };
            if v.get("error").is_some() {
                return Outcome::Err("stream_error");
            }
            let u = &v["usage"];
            if let Some(prompt) = u["prompt_tokens"].as_u64() {
                let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
                tokens = (u32::try_from(prompt).unwrap_or(u32::MAX), u32::try_from(cached).unwrap_or(u32::MAX));
            }
            let delta = &v["choices"][0]["delta"];
            if delta.get("role").is_some_and(|r| !r.is_null()) || delta.get("content").is_some_and(|c| !c.is_null()) {
                ttft = Some(t0.elapsed());
            }
        }
    }
    match (ttft, done) {
        (Some(ttft), true) => Outcome::Ok { ttft, tokens, queued, worker_port },
        _ => Outcome::Err("incomplete"),
    }
}

/// A sim's own counters: prefix-cache tokens hit and queried (`vllm:prefix_cache_hits_total`,
/// `vllm:prefix_cache_queries_total`) and requests finished (`vllm:request_success_total`, every reason).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Prompt tokens found in the prefix cache.
    pub hits: f64,
    /// Prompt tokens looked up.
    pub queries: f64,
    /// Requests finished.
    pub requests: f64,
}

impl Counters {
    /// `self - before`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            hits: self.hits - before.hits,
            queries: self.queries - before.queries,
            requests: self.requests - before.requests,
        }
    }
}

/// Reads a sim's `/metrics`.
pub async fn counters(client: &HttpClient, sim_url: &str) -> anyhow::Result<Counters> {
    let text = get(client, &format!("{sim_url}/metrics")).await?.1;
    Ok(parse_counters(&text))
}

fn parse_counters(text: &str) -> Counters {
    let mut c = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let name = name.split('{').next().unwrap_or("");
        let Ok(v) = value.parse::<f64>() else { continue };
        match name {
            "vllm:prefix_cache_hits_total" => c.hits += v,
            "vllm:prefix_cache_queries_total" => c.queries += v,
            "vllm:request_success_total" => c.requests += v,
            _ => {}
        }
    }
    c
}

/// GET `url`: status and body text.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<(http::StatusCode, String)> {
    let req = http::Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await??;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await??.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_counter_names() {
        let text = "# TYPE vllm:prefix_cache_hits counter\n\
                    vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 30.0\n\
                    vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 120.0\n\
                    vllm:request_success_total{engine=\"0\",finished_reason=\"stop\",model_name=\"m\"} 3.0\n\
                    vllm:request_success_total{engine=\"0\",finished_reason=\"length\",model_name=\"m\"} 2.0\n\
                    vllm:prompt_tokens_total{engine=\"0\",model_name=\"m\"} 999.0\n";
        let c = parse_counters(text);
        assert_eq!((c.hits, c.queries, c.requests), (30.0, 120.0, 5.0));
        let d = c.since(&Counters { hits: 10.0, queries: 20.0, requests: 1.0 });
        assert_eq!((d.hits, d.queries, d.requests), (20.0, 100.0, 4.0));
    }
}
