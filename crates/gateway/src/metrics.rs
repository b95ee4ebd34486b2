//! Every metric the gateway exports, spelled in this one module.
//!
//! Labels come from bounded sets only: model names the fleet serves (else `unknown`), worker names from
//! config, strategy names, status codes, outcome kinds, limit names. Never request ids or raw user input.
//!
//! A worker has one identity in every metric: the label `worker`, its name (config `name`, else
//! `host:port`, never its URL, which may carry credentials).

use parking_lot::RwLock;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Buckets for request latency, seconds: 5 ms to 10 min.
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// Buckets for time to first token, seconds: 1 ms to 60 s.
const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The gateway's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    labels: Vec<(String, Vec<String>)>,
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
    /// `llm_gateway_uptime_seconds`.
    pub uptime: Gauge,
    /// `llm_gateway_prefix_index_entries`.
    pub prefix_index_entries: IntGauge,
    /// `llm_worker_in_flight_requests{worker}`.
    pub worker_in_flight: IntGaugeVec,
    /// `llm_worker_running_requests{worker}`.
    pub worker_running: IntGaugeVec,
    /// `llm_worker_waiting_requests{worker}`.
    pub worker_waiting: IntGaugeVec,
    /// `llm_worker_kv_cache_usage{worker}`.
    pub worker_kv_usage: GaugeVec,
    /// `llm_worker_healthy{worker}`.
    pub worker_healthy: IntGaugeVec,
    /// `llm_worker_capacity{worker,source}`: requests the gateway keeps in flight on the worker at most
    /// (0: unlimited) and the tier that set it; one series per worker (the other sources' are removed).
    pub worker_capacity: IntGaugeVec,
    /// `llm_circuit_breaker_state{worker}`: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGaugeVec,
    /// `llm_circuit_breaker_failures_total{worker}`.
    pub breaker_failures: IntCounterVec,
    /// `llm_circuit_breaker_transitions_total{worker,to}`.
    pub breaker_transitions: IntCounterVec,
    /// `llm_gateway_queue_length{model}`.
    pub queue_length: IntGaugeVec,
    /// `llm_gateway_queue_wait_seconds{model}`: time dispatched requests waited in the admission queue.
    pub queue_wait: HistogramVec,
    /// `llm_gateway_queue_rejected_total{model,reason}`: `queue_full`, `queue_timeout`, `cancelled`.
    pub queue_rejected: IntCounterVec,
    /// `llm_rate_limiter_requests_total`: requests checked by the rate limiter.
    pub rate_limiter_requests: IntCounter,
    /// `llm_rate_limiter_rejected_total{limit}`.
    pub rate_limiter_rejected: IntCounterVec,
    /// `llm_rate_limiter_fallback_total`: checks answered locally because Redis was unreachable.
    pub rate_limiter_fallback: IntCounter,
    /// `llm_gateway_cluster_fallback_total`: requests that took a slot without the shared count
    /// (`cluster.backend = "redis"` and Redis unreachable), or were refused for it (`redis_failure = "deny"`).
    pub cluster_fallback: IntCounter,
    /// `llm_gateway_cluster_shared`: 1 while slots are counted in Redis with the other replicas, else 0.
    pub cluster_shared: IntGauge,
    /// `llm_gateway_batch_lines_total{outcome}`: completed, failed, retried.
    pub batch_lines: IntCounterVec,
    /// `llm_gateway_batch_lines_in_flight`.
    pub batch_lines_in_flight: IntGauge,
    /// `llm_gateway_batch_lines_pending`.
    pub batch_lines_pending: IntGauge,
    /// `llm_gateway_batch_lines_per_second`.
    pub batch_lines_per_second: Gauge,
    /// `llm_gateway_batches{status}`.
    pub batches: IntGaugeVec,
    /// Each model's request series, resolved once ([`Metrics::model_series`]).
    models: RwLock<crate::config::ModelMap<Arc<ModelSeries>>>,
}

/// Models whose series are kept resolved; past it a model's series are looked up per request (still
/// counted, only slower). Model labels are the fleet's served models, a bounded set.
const MAX_RESOLVED_MODELS: usize = 1024;

/// One model's per-request series, resolved once: a request records its outcome without looking each
/// series up by its label strings (a hash and a lock per series).
#[derive(Debug)]
pub struct ModelSeries {
    /// `llm_gateway_requests_total{model, status="200"}`, the usual outcome (others are looked up).
    pub ok: IntCounter,
    /// `llm_gateway_request_latency_seconds{model}`.
    pub latency: Histogram,
    /// `llm_gateway_time_to_first_token_seconds{model}`.
    pub ttft: Histogram,
    /// `llm_gateway_tokens_total{model, kind="prompt"}`.
    pub prompt_tokens: IntCounter,
    /// `llm_gateway_tokens_total{model, kind="completion"}`.
    pub completion_tokens: IntCounter,
}

/// Registers collectors and remembers their names (a `Vec` metric with no series yet is absent from
/// `gather()`, but its name is still one the gateway exports).
struct Registrar {
    registry: Registry,
    names: Vec<String>,
    labels: Vec<(String, Vec<String>)>,
}

impl Registrar {
    fn add<C: Collector + Clone + 'static>(&mut self, c: C) -> Result<C, prometheus::Error> {
        self.names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
        self.labels.extend(c.desc().iter().map(|d| (d.fq_name.clone(), d.variable_labels.clone())));
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counter(&mut self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help)?)
    }

    fn counters(&mut self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge(&mut self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help)?)
    }

    fn gauges(&mut self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn histograms(&mut self, name: &str, help: &str, buckets: &[f64]) -> Result<HistogramVec, prometheus::Error> {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model"])?)
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let mut r = Registrar { registry: Registry::new(), names: Vec::new(), labels: Vec::new() };
        let worker = &["worker"];
        Ok(Self {
            requests: r.counters(
                "llm_gateway_requests_total",
                "Requests answered, by model and status",
                &["model", "status"],
            )?,
            active_requests: r.gauge("llm_gateway_active_requests", "Requests in flight through the gateway")?,
            latency: r.histograms(
                "llm_gateway_request_latency_seconds",
                "Request latency to the end of the response",
                LATENCY_BUCKETS,
            )?,
            ttft: r.histograms(
                "llm_gateway_time_to_first_token_seconds",
                "Time to the first streamed chunk",
                TTFT_BUCKETS,
            )?,
            healthy_workers: r.gauge("llm_gateway_healthy_workers", "Workers passing health probes")?,
            tokens: r.counters("llm_gateway_tokens_total", "Tokens served, by model and kind", &["model", "kind"])?,
            retries: r.counter("llm_gateway_retries_total", "Requests retried on another worker")?,
            routing_decisions: r.counters(
                "llm_gateway_routing_decisions_total",
                "Workers picked, by strategy and worker",
                &["strategy", "worker"],
            )?,
            upstream_outcomes: r.counters(
                "llm_gateway_upstream_outcomes_total",
                "Finished upstream attempts, by worker and outcome",
                &["worker", "outcome"],
            )?,
            uptime: r.add(Gauge::new("llm_gateway_uptime_seconds", "Seconds since the gateway started")?)?,
            prefix_index_entries: r.gauge(
                "llm_gateway_prefix_index_entries",
                "Entries in the routing policy's bounded prefix index (p2c_kv)",
            )?,
            worker_in_flight: r.gauges(
                "llm_worker_in_flight_requests",
                "Requests the gateway has in flight on the worker",
                worker,
            )?,
            worker_running: r.gauges(
                "llm_worker_running_requests",
                "Running requests scraped from the worker",
                worker,
            )?,
            worker_waiting: r.gauges(
                "llm_worker_waiting_requests",
                "Waiting requests scraped from the worker",
                worker,
            )?,
            worker_kv_usage: r.add(GaugeVec::new(
                Opts::new("llm_worker_kv_cache_usage", "KV-cache usage scraped from the worker, 0..1"),
                worker,
            )?)?,
            worker_healthy: r.gauges("llm_worker_healthy", "1 when the worker passes its health probes", worker)?,
            worker_capacity: r.gauges(
                "llm_worker_capacity",
                "Requests the gateway keeps in flight on the worker at most (0 unlimited), by the tier that set it",
                &["worker", "source"],
            )?,
            breaker_state: r.gauges(
                "llm_circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open",
                worker,
            )?,
            breaker_failures: r.counters(
                "llm_circuit_breaker_failures_total",
                "Failures reported to the worker's breaker (connect errors, timeouts, 5xx, slow calls)",
                worker,
            )?,
            breaker_transitions: r.counters(
                "llm_circuit_breaker_transitions_total",
                "Circuit breaker state changes, by the state entered",
                &["worker", "to"],
            )?,
            queue_length: r.gauges(
                "llm_gateway_queue_length",
                "Requests waiting in the admission queue",
                &["model"],
            )?,
            queue_wait: r.histograms(
                "llm_gateway_queue_wait_seconds",
                "Time dispatched requests waited in the admission queue",
                LATENCY_BUCKETS,
            )?,
            queue_rejected: r.counters(
                "llm_gateway_queue_rejected_total",
                "Requests that left the admission queue without a worker, by reason",
                &["model", "reason"],
            )?,
            rate_limiter_requests: r
                .counter("llm_rate_limiter_requests_total", "Requests checked by the rate limiter")?,
            rate_limiter_rejected: r.counters(
                "llm_rate_limiter_rejected_total",
                "Requests rejected by a rate limit, by the limit hit",
                &["limit"],
            )?,
            rate_limiter_fallback: r.counter(
                "llm_rate_limiter_fallback_total",
                "Rate-limit checks answered locally because Redis was unreachable",
            )?,
            cluster_fallback: r.counter(
                "llm_gateway_cluster_fallback_total",
                "Requests that took a slot without the shared count (Redis unreachable), or were refused for it",
            )?,
            cluster_shared: r.gauge(
                "llm_gateway_cluster_shared",
                "1 while worker slots are counted in Redis with the other replicas, else 0",
            )?,
            batch_lines: r.counters(
                "llm_gateway_batch_lines_total",
                "Batch lines finished (completed, failed) or retried",
                &["outcome"],
            )?,
            batch_lines_in_flight: r.gauge("llm_gateway_batch_lines_in_flight", "Batch lines sent and not yet back")?,
            batch_lines_pending: r.gauge("llm_gateway_batch_lines_pending", "Lines of open batches not yet done")?,
            batch_lines_per_second: r.add(Gauge::new(
                "llm_gateway_batch_lines_per_second",
                "Batch lines finished per second over the last 10 s",
            )?)?,
            batches: r.gauges("llm_gateway_batches", "Batches in the store, by status", &["status"])?,
            names: std::mem::take(&mut r.names),
            labels: std::mem::take(&mut r.labels),
            registry: r.registry,
            models: RwLock::default(),
        })
    }

    /// `model`'s per-request series, resolved on its first request and kept.
    pub fn model_series(&self, model: &Arc<str>) -> Arc<ModelSeries> {
        if let Some(series) = self.models.read().get(model) {
            return Arc::clone(series);
        }
        let series = Arc::new(ModelSeries {
            ok: self.requests.with_label_values(&[model, "200"]),
            latency: self.latency.with_label_values(&[model]),
            ttft: self.ttft.with_label_values(&[model]),
            prompt_tokens: self.tokens.with_label_values(&[model, "prompt"]),
            completion_tokens: self.tokens.with_label_values(&[model, "completion"]),
        });
        let mut models = self.models.write();
        if models.len() < MAX_RESOLVED_MODELS {
            models.insert(Arc::clone(model), Arc::clone(&series));
        }
        series
    }

    /// Every metric family name the gateway exports, whether or not it has series yet; dashboards and
    /// alerts are checked against it.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The label names of the metric family `name` (histograms add `le`), `None` for a name the gateway
    /// does not export; dashboards are checked against them.
    pub fn labels(&self, name: &str) -> Option<&[String]> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, l)| l.as_slice())
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

    /// Drops the per-worker series of a removed worker (by its name) so they stop being exported.
    pub fn forget_worker(&self, worker: &str) {
        for g in [
            &self.worker_in_flight,
            &self.worker_running,
            &self.worker_waiting,
            &self.worker_healthy,
            &self.breaker_state,
        ] {
            let _ = g.remove_label_values(&[worker]);
        }
        let _ = self.worker_kv_usage.remove_label_values(&[worker]);
        for source in crate::fleet::capacity::CapacitySource::ALL {
            let _ = self.worker_capacity.remove_label_values(&[worker, source.as_str()]);
        }
        let _ = self.breaker_failures.remove_label_values(&[worker]);
        for to in [guard::StateName::Closed, guard::StateName::Open, guard::StateName::HalfOpen] {
            let _ = self.breaker_transitions.remove_label_values(&[worker, to.as_str()]);
        }
    }

    /// Sets a worker's capacity series to `capacity` (`u32::MAX`: unlimited, exported as 0) under
    /// `source`, removing its series under the other sources so the worker has one.
    pub fn set_worker_capacity(&self, worker: &str, capacity: u32, source: crate::fleet::capacity::CapacitySource) {
        for other in crate::fleet::capacity::CapacitySource::ALL {
            if other != source {
                let _ = self.worker_capacity.remove_label_values(&[worker, other.as_str()]);
            }
        }
        let value = if capacity == u32::MAX { 0 } else { i64::from(capacity) };
        self.worker_capacity.with_label_values(&[worker, source.as_str()]).set(value);
    }

    /// Requests answered so far: the sum of the `requests` family over its label sets.
    pub fn requests_total(&self) -> u64 {
        sum_by(&self.requests, &[]).values().sum()
    }

    /// Routing decisions so far, by strategy and then worker name.
    pub fn routing_decisions_by_strategy(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (labels, n) in sum_by(&self.routing_decisions, &["strategy", "worker"]) {
            if let [strategy, worker] = labels.as_slice() {
                *out.entry(strategy.clone()).or_default().entry(worker.clone()).or_default() += n;
            }
        }
        out
    }

    /// Rate-limit refusals so far, by limit name (empty until a limit refuses something).
    pub fn rate_limit_rejections(&self) -> BTreeMap<String, u64> {
        sum_by(&self.rate_limiter_rejected, &["limit"]).into_iter().map(|(l, n)| (l.concat(), n)).collect()
    }

    /// Counts a breaker transition of the worker named `worker`.
    pub fn count_transition(&self, worker: &str, t: Option<guard::Transition>) {
        if let Some(t) = t {
            self.breaker_transitions.with_label_values(&[worker, t.to.as_str()]).inc();
        }
    }
}

/// One count in `llm_gateway_active_requests`, held from arrival until the response body ends (the
/// relayed body takes it over) or the handler answers an error.
pub struct Active(prometheus::IntGauge);

impl Active {
    /// Counts one active request.
    pub fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A bounded label for a status code.
pub fn status_label(status: u16) -> &'static str {
    const LABELS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        404 => "404",
        413 => "413",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s => LABELS[usize::from(s / 100).saturating_sub(1).min(5)],
    }
}

/// The counts of a counter family summed by the values of `keys` (a missing label reads `unknown`).
fn sum_by(family: &IntCounterVec, keys: &[&str]) -> BTreeMap<Vec<String>, u64> {
    let mut out = BTreeMap::new();
    for mf in family.collect() {
        for m in mf.get_metric() {
            let values = keys
                .iter()
                .map(|k| m.get_label().iter().find(|l| l.name() == *k).map_or("unknown", |l| l.value()).to_string())
                .collect();
            *out.entry(values).or_default() += m.get_counter().get_value() as u64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_resolved_series_are_the_exported_ones_and_kept_up_to_a_bound() {
        let m = Metrics::new().expect("metrics register");
        let model: Arc<str> = Arc::from("m");
        let series = m.model_series(&model);
        series.ok.inc();
        series.prompt_tokens.inc_by(7);
        series.latency.observe(0.2);
        assert_eq!(m.requests.with_label_values(&["m", "200"]).get(), 1);
        assert_eq!(m.tokens.with_label_values(&["m", "prompt"]).get(), 7);
        assert_eq!(m.latency.with_label_values(&["m"]).get_sample_count(), 1);
        assert!(Arc::ptr_eq(&series, &m.model_series(&model)), "resolved once");
        for i in 0..MAX_RESOLVED_MODELS + 5 {
            m.model_series(&Arc::from(format!("model-{i}")));
        }
        assert_eq!(m.models.read().len(), MAX_RESOLVED_MODELS);
        let late: Arc<str> = Arc::from("late");
        m.model_series(&late).ok.inc();
        m.model_series(&late).ok.inc();
        assert_eq!(m.requests.with_label_values(&["late", "200"]).get(), 2, "past the bound still counted");
    }

    #[test]
    fn names_cover_metrics_without_series() {
        let m = Metrics::new().expect("metrics register");
        for name in ["llm_gateway_requests_total", "llm_gateway_queue_wait_seconds", "llm_rate_limiter_rejected_total"]
        {
            assert!(m.names().iter().any(|n| n == name), "{name}");
        }
        assert!(!m.render().contains("llm_rate_limiter_rejected_total{"), "no series yet");
    }

    #[test]
    fn every_worker_metric_is_labelled_by_worker_name_only() {
        let m = Metrics::new().expect("metrics register");
        for name in m.names() {
            let labels = m.labels(name).expect("labels of an exported name");
            assert!(!labels.iter().any(|l| l == "url"), "{name} is labelled by url: {labels:?}");
            if name.starts_with("llm_worker_") || name.starts_with("llm_circuit_breaker_") {
                assert_eq!(labels.first().map(String::as_str), Some("worker"), "{name}: {labels:?}");
            }
        }
        assert_eq!(
            m.labels("llm_gateway_upstream_outcomes_total"),
            Some(&["worker".to_string(), "outcome".into()][..])
        );
        assert_eq!(m.labels("nope"), None);
    }
}
