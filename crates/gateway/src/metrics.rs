//! Every metric the gateway exports, spelled in this one module.
//!
//! Labels come from bounded sets only: model names the fleet serves (else `unknown`), worker names and
//! URLs from config, strategy names, status codes, outcome kinds. Never request ids or raw user input.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets for request latency, seconds: 5 ms to 10 min.
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// Buckets for time to first token, seconds: 1 ms to 60 s.
const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The gateway's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// `llm_gateway_requests_total{model,status}`.
    pub requests: IntCounterVec,
    /// `llm_gateway_active_requests`.
    pub active_requests: IntGauge,
    /// `llm_gateway_request_latency_seconds{model}`.
    pub latency: HistogramVec,
    /// `llm_gateway_time_to_first_token_seconds{model}`.
    pub ttft: HistogramVec,
    /// `llm_gateway_healthy_workers`.
    pub healthy_workers: IntGauge,
    /// `llm_gateway_tokens_total{model,kind}`.
    pub tokens: IntCounterVec,
    /// `llm_gateway_retries_total`.
    pub retries: IntCounter,
    /// `llm_gateway_routing_decisions_total{strategy,worker}`.
    pub routing_decisions: IntCounterVec,
    /// `llm_gateway_upstream_outcomes_total{worker,outcome}`.
    pub upstream_outcomes: IntCounterVec,
    /// `llm_worker_in_flight_requests{url}`.
    pub worker_in_flight: IntGaugeVec,
    /// `llm_worker_running_requests{url}`.
    pub worker_running: IntGaugeVec,
    /// `llm_worker_waiting_requests{url}`.
    pub worker_waiting: IntGaugeVec,
    /// `llm_worker_kv_cache_usage{url}`.
    pub worker_kv_usage: GaugeVec,
    /// `llm_worker_healthy{url}`.
    pub worker_healthy: IntGaugeVec,
    /// `llm_gateway_uptime_seconds`.
    pub uptime: Gauge,
    /// `llm_gateway_prefix_index_entries`.
    pub prefix_index_entries: IntGauge,
    /// `llm_circuit_breaker_state{url}`: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGaugeVec,
    /// `llm_circuit_breaker_failures_total{url}`.
    pub breaker_failures: IntCounterVec,
    /// `llm_circuit_breaker_transitions_total{url,to}`.
    pub breaker_transitions: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge_vec = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["url"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model"])?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let active_requests = IntGauge::new("llm_gateway_active_requests", "Requests in flight through the gateway")?;
        registry.register(Box::new(active_requests.clone()))?;
        let healthy_workers = IntGauge::new("llm_gateway_healthy_workers", "Workers passing health probes")?;
        registry.register(Box::new(healthy_workers.clone()))?;
        let retries = IntCounter::new("llm_gateway_retries_total", "Requests retried on another worker")?;
        registry.register(Box::new(retries.clone()))?;
        let worker_kv_usage = GaugeVec::new(
            Opts::new("llm_worker_kv_cache_usage", "KV-cache usage scraped from the worker, 0..1"),
            &["url"],
        )?;
        registry.register(Box::new(worker_kv_usage.clone()))?;
        let uptime = Gauge::new("llm_gateway_uptime_seconds", "Seconds since the gateway started")?;
        registry.register(Box::new(uptime.clone()))?;
        let prefix_index_entries = IntGauge::new(
            "llm_gateway_prefix_index_entries",
            "Entries in the routing policy's bounded prefix index (p2c_kv)",
        )?;
        registry.register(Box::new(prefix_index_entries.clone()))?;
        Ok(Self {
            requests: counter_vec(
                "llm_gateway_requests_total",
                "Requests answered, by model and status",
                &["model", "status"],
            )?,
            active_requests,
            latency: histogram(
                "llm_gateway_request_latency_seconds",
                "Request latency to the end of the response",
                LATENCY_BUCKETS,
            )?,
            ttft: histogram(
                "llm_gateway_time_to_first_token_seconds",
                "Time to the first streamed chunk",
                TTFT_BUCKETS,
            )?,
            healthy_workers,
            tokens: counter_vec("llm_gateway_tokens_total", "Tokens served, by model and kind", &["model", "kind"])?,
            retries,
            routing_decisions: counter_vec(
                "llm_gateway_routing_decisions_total",
                "Workers picked, by strategy and worker",
                &["strategy", "worker"],
            )?,
            upstream_outcomes: counter_vec(
                "llm_gateway_upstream_outcomes_total",
                "Finished upstream attempts, by worker and outcome",
                &["worker", "outcome"],
            )?,
            worker_in_flight: gauge_vec(
                "llm_worker_in_flight_requests",
                "Requests the gateway has in flight on the worker",
            )?,
            worker_running: gauge_vec("llm_worker_running_requests", "Running requests scraped from the worker")?,
            worker_waiting: gauge_vec("llm_worker_waiting_requests", "Waiting requests scraped from the worker")?,
            worker_kv_usage,
            worker_healthy: gauge_vec("llm_worker_healthy", "1 when the worker passes its health probes")?,
            uptime,
            prefix_index_entries,
            breaker_state: gauge_vec(
                "llm_circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            )?,
            breaker_failures: counter_vec(
                "llm_circuit_breaker_failures_total",
                "Failures reported to the worker's breaker (connect errors, timeouts, 5xx, slow calls)",
                &["url"],
            )?,
            breaker_transitions: counter_vec(
                "llm_circuit_breaker_transitions_total",
                "Circuit breaker state changes, by the state entered",
                &["url", "to"],
            )?,
            registry,
        })
    }

    /// The registry, for subsystems that register metrics of their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics; an empty answer is the safe fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Drops the per-worker series of a removed worker so they stop being exported.
    pub fn forget_worker(&self, url: &str) {
        for g in [
            &self.worker_in_flight,
            &self.worker_running,
            &self.worker_waiting,
            &self.worker_healthy,
            &self.breaker_state,
        ] {
            let _ = g.remove_label_values(&[url]);
        }
        let _ = self.worker_kv_usage.remove_label_values(&[url]);
        let _ = self.breaker_failures.remove_label_values(&[url]);
    }

    /// Counts a breaker transition of the worker at `url`.
    pub fn count_transition(&self, url: &str, t: Option<guard::Transition>) {
        if let Some(t) = t {
            self.breaker_transitions.with_label_values(&[url, t.to.as_str()]).inc();
        }
    }
}
