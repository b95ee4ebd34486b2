//! A closed-loop load generator: `concurrency` tasks each send requests back to back for a duration and
//! record each request's latency (to the end of the body, streams included) and its time to first byte
//! (the first body bytes: a stream's first event).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

/// What a load run measured.
pub struct Report {
    /// Requests that completed with 2xx.
    pub ok: u64,
    /// Requests that failed (status or transport).
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Sorted latencies of the successful requests.
    pub latencies: Vec<Duration>,
    /// Sorted times to the first body bytes of the successful requests.
    pub first_bytes: Vec<Duration>,
}

impl Report {
    /// This run and `other` as one: counts and times added, latencies pooled.
    pub fn merge(mut self, other: Report) -> Report {
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        self.first_bytes.extend(other.first_bytes);
        self.first_bytes.sort_unstable();
        self
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile of latency (0..1).
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// The `q` quantile of the time to first byte (0..1).
    pub fn first_byte_quantile(&self, q: f64) -> Duration {
        quantile(&self.first_bytes, q)
    }
}

/// The `q` quantile (0..1) of `sorted`, zero when empty.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// A pooled client with TCP_NODELAY, like the gateway's own.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(http)
}

/// Runs `concurrency` closed loops of POST `url` with `body` for `duration`.
pub async fn run(url: &str, body: Bytes, concurrency: usize, duration: Duration) -> anyhow::Result<Report> {
    let client = client();
    let uri: http::Uri = url.parse()?;
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let uri = uri.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut first) = (Vec::new(), Vec::new());
            let mut errors = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                let req = http::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("static request parts are valid");
                match client.request(req).await {
                    Ok(resp) if resp.status().is_success() => match read_body(resp.into_body(), t0).await {
                        Some(at) => {
                            lat.push(t0.elapsed());
                            first.push(at);
                        }
                        None => errors += 1,
                    },
                    _ => errors += 1,
                }
            }
            (lat, first, errors)
        }));
    }
    let (mut latencies, mut first_bytes) = (Vec::new(), Vec::new());
    let mut errors = 0;
    for t in tasks {
        let (lat, first, err) = t.await?;
        latencies.extend(lat);
        first_bytes.extend(first);
        errors += err;
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    first_bytes.sort_unstable();
    Ok(Report { ok: latencies.len() as u64, errors, elapsed, latencies, first_bytes })
}

/// Reads `body` to its end; the time from `t0` to its first bytes, `None` when it failed.
async fn read_body(mut body: hyper::body::Incoming, t0: Instant) -> Option<Duration> {
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
            first = Some(t0.elapsed());
        }
    }
    Some(first.unwrap_or_else(|| t0.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ok: u64, errors: u64, secs: u64, latencies_ms: &[u64]) -> Report {
        let latencies: Vec<Duration> = latencies_ms.iter().map(|&ms| Duration::from_millis(ms)).collect();
        Report { ok, errors, elapsed: Duration::from_secs(secs), first_bytes: latencies.clone(), latencies }
    }

    #[test]
    fn merged_slices_add_their_counts_and_pool_their_latencies_in_order() {
        let merged = report(4, 1, 1, &[1, 5, 7, 9]).merge(report(2, 0, 1, &[2, 3]));
        assert_eq!((merged.ok, merged.errors, merged.elapsed), (6, 1, Duration::from_secs(2)));
        assert_eq!(merged.rps(), 3.0);
        let ms: Vec<u64> = merged.latencies.iter().map(|d| d.as_millis() as u64).collect();
        assert_eq!(ms, [1, 2, 3, 5, 7, 9]);
        assert_eq!(merged.quantile(0.5), Duration::from_millis(5));
        assert_eq!(merged.first_byte_quantile(0.0), Duration::from_millis(1));
    }
}
