//! API keys and rate limits end to end, locally and shared through a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use llm_gateway::config::{ApiKeyConfig, ModelConfig, OnLimit, RateLimitBackend};
use std::time::Duration;
use tokio::time::Instant;
use vllm_sim::SimConfig;

fn tiny_sim() -> SimConfig {
    SimConfig { ttft_ms: 0.0, itl_ms: 0.0, output_tokens: (1, 1), max_num_seqs: 1024, ..fast_sim() }
}

fn key(key: &str, name: &str, rpm: Option<u64>) -> ApiKeyConfig {
    ApiKeyConfig {
        key: key.into(),
        name: name.into(),
        priority: Default::default(),
        requests_per_minute: rpm,
        tokens_per_minute: None,
        requests_per_day: None,
    }
}

async fn post(c: &reqwest::Client, gw: &str, key: Option<&str>, body: &serde_json::Value) -> reqwest::Response {
    let mut rb = c.post(format!("{gw}/v1/chat/completions")).json(body);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    rb.send().await.unwrap()
}

#[tokio::test]
async fn api_keys_are_required_and_checked() {
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.auth.enabled = true;
    cfg.auth.keys = vec![key("sk-alpha", "alpha", None)];
    let gw = gateway(cfg).await;
    let c = client();
    let body = chat("demo-model", "hi", false);
    for bad in [None, Some("sk-wrong"), Some("")] {
        let resp = post(&c, &gw.url(), bad, &body).await;
        assert_eq!(resp.status(), 401, "{bad:?}");
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_api_key");
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
    assert_eq!(post(&c, &gw.url(), Some("sk-alpha"), &body).await.status(), 200);
    assert_eq!(c.get(format!("{}/v1/models", gw.url())).send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{}/v1/models", gw.url())).bearer_auth("sk-alpha").send().await.unwrap().status(), 200);
    // Health and metrics stay open for probes and Prometheus.
    assert_eq!(c.get(format!("{}/health", gw.url())).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn per_key_rpm_sets_headers_and_names_the_limit() {
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.auth.enabled = true;
    cfg.auth.keys = vec![key("sk-small", "small", Some(3)), key("sk-big", "big", Some(1000))];
    cfg.rate_limit.enabled = true;
    let gw = gateway(cfg).await;
    let c = client();
    let body = chat("demo-model", "hi", false);
    for remaining in ["2", "1", "0"] {
        let resp = post(&c, &gw.url(), Some("sk-small"), &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], remaining);
        assert!(resp.headers().contains_key("x-ratelimit-reset-requests"));
    }
    let resp = post(&c, &gw.url(), Some("sk-small"), &body).await;
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_exceeded");
    assert_eq!(err["error"]["code"], "per_user_rpm");
    assert_eq!(post(&c, &gw.url(), Some("sk-big"), &body).await.status(), 200, "keys have their own buckets");
    let metrics = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&metrics, "llm_rate_limiter_rejected_total{limit=\"per_user_rpm\"}"), 1.0);
}

/// Sends `n` requests at `rate` per second (open loop) and returns (admitted, elapsed between first and
/// last send).
async fn offer(gateways: &[String], rate: f64, n: usize) -> (usize, Duration) {
    let c = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        let (c, gw) = (c.clone(), gateways[i % gateways.len()].clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": "demo-model", "max_tokens": 1, "prompt": "x"});
            c.post(format!("{gw}/v1/completions")).json(&body).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }
    let elapsed = start.elapsed();
    let mut admitted = 0;
    for t in tasks {
        let status = t.await.unwrap();
        assert!(status == 200 || status == 429, "status {status}");
        admitted += usize::from(status == 200);
    }
    (admitted, elapsed)
}

// The refill rate of the local buckets is tested on tokio's paused clock in
// `limits::tests::offered_twice_the_limit_admits_the_limit_on_the_paused_clock`; over HTTP, only the
// shared (Redis) buckets below, which run on Redis's clock.

#[tokio::test]
async fn two_gateway_processes_sharing_redis_enforce_one_limit() {
    let redis = RedisServer::start();
    let sims = sims(1, |_| tiny_sim()).await;
    let config = format!(
        r#"
[[workers]]
url = "{sim}"
[rate_limit]
enabled = true
backend = "redis"
redis_url = "{redis}"
redis_timeout_ms = 1000
requests_per_second = 50.0
burst_size = 5.0
per_user_rpm = 0
per_worker_qps = 0.0
[log]
level = "warn"
"#,
        sim = sims[0].url(),
        redis = redis.url()
    );
    let mut gateways = Vec::new();
    for _ in 0..2 {
        gateways.push(GatewayProcess::start(&config, &[]).await);
    }
    let urls: Vec<String> = gateways.iter().map(|g| g.url().to_string()).collect();
    let (admitted, elapsed) = offer(&urls, 100.0, 300).await;
    let expected = 5.0 + 50.0 * elapsed.as_secs_f64();
    let error = (admitted as f64 - expected).abs() / expected;
    assert!(error <= 0.05, "admitted {admitted} by both, expected {expected:.0} ({:.1}% off)", error * 100.0);
    for g in &gateways {
        let m = client().get(format!("{}/metrics", g.url())).send().await.unwrap().text().await.unwrap();
        assert_eq!(metric_value(&m, "llm_rate_limiter_fallback_total"), 0.0, "Redis answered every check");
        // Which replica refuses depends on the phase of arrivals against refills; only the sum is fixed.
        assert_eq!(metric_value(&m, "llm_rate_limiter_requests_total"), 150.0, "each replica checked its half");
    }
    drop(gateways);
}

#[tokio::test]
async fn requests_keep_flowing_when_redis_dies() {
    let mut redis = RedisServer::start();
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.backend = RateLimitBackend::Redis;
    cfg.rate_limit.redis_url = redis.url();
    cfg.rate_limit.redis_timeout_ms = 200;
    let gw = gateway(cfg).await;
    let c = client();
    let body = chat("demo-model", "hi", false);
    assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 200);
    redis.kill();
    for _ in 0..5 {
        assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 200, "local buckets take over");
    }
    let m = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(metric_value(&m, "llm_rate_limiter_fallback_total") >= 5.0, "{m}");
}

#[tokio::test]
async fn token_limits_count_stream_usage_without_showing_it_to_clients_that_did_not_ask() {
    let sims = sims(1, |_| SimConfig { output_tokens: (5, 5), ..fast_sim() }).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.per_user_tpm = 100_000;
    let gw = gateway(cfg).await;
    let c = client();
    let mut body = chat("demo-model", "hi", true);
    body["user"] = "tok".into();
    let resp = post(&c, &gw.url(), None, &body).await;
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "100000");
    let text = resp.text().await.unwrap();
    assert!(!text.contains("\"usage\""), "the client did not ask for usage: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let text = post(&c, &gw.url(), None, &body).await.text().await.unwrap();
    assert!(text.contains("\"usage\""), "this one asked: {text}");
    let m = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&m, "llm_gateway_tokens_total{kind=\"completion\",model=\"demo-model\"}"), 10.0, "{m}");
}

#[tokio::test]
async fn a_reload_keeps_buckets_whose_limits_did_not_change() {
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.per_user_rpm = 2;
    let gw = gateway(cfg).await;
    let c = client();
    let mut body = chat("demo-model", "hi", false);
    body["user"] = "u".into();
    for _ in 0..2 {
        assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 200);
    }
    assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 429);
    let patch = |p: serde_json::Value| c.patch(format!("{}/api/config", gw.url())).json(&p).send();
    assert_eq!(patch(serde_json::json!({"rate_limit": {"requests_per_second": 500.0}})).await.unwrap().status(), 200);
    assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 429, "the user's bucket was not reset");
    assert_eq!(patch(serde_json::json!({"rate_limit": {"per_user_rpm": 600}})).await.unwrap().status(), 200);
    // Same level, faster refill (10/s): admitted again within a fraction of a second.
    wait_for("the new limit to apply", Duration::from_secs(3), || async {
        post(&c, &gw.url(), None, &body).await.status() == 200
    })
    .await;
}

/// A `[[models]]` table for the sims' `demo-model` with no limits.
fn demo_model() -> ModelConfig {
    ModelConfig {
        name: "demo-model".into(),
        aliases: Vec::new(),
        requests_per_minute: 0,
        tokens_per_minute: 0,
        requests_per_day: 0,
        max_concurrency: 0,
        queue_max_size: None,
        queue_timeout_secs: None,
        priority: None,
    }
}

/// Rate limits on, with only the limits a test sets (no global rate, no per-user minute).
fn limited(sims: &[vllm_sim::SimHandle], model: ModelConfig) -> llm_gateway::Config {
    let mut cfg = test_config(worker_configs(sims));
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.requests_per_second = 0.0;
    cfg.rate_limit.per_user_rpm = 0;
    cfg.models = vec![model];
    cfg
}

#[tokio::test]
async fn per_model_rpm_is_shared_by_tenants_and_names_its_limit() {
    let sims = sims(1, |_| tiny_sim()).await;
    let gw = gateway(limited(&sims, ModelConfig { requests_per_minute: 2, ..demo_model() })).await;
    let c = client();
    for (user, remaining) in [("a", "1"), ("b", "0")] {
        let mut body = chat("demo-model", "hi", false);
        body["user"] = user.into();
        let resp = post(&c, &gw.url(), None, &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], remaining);
    }
    let mut body = chat("demo-model", "hi", false);
    body["user"] = "c".into();
    let resp = post(&c, &gw.url(), None, &body).await;
    assert_eq!(resp.status(), 429, "a third tenant meets the model's limit");
    assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(resp.headers().contains_key("x-ratelimit-reset-requests"));
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=31).contains(&retry_after), "{retry_after}");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (err["error"]["type"].as_str(), err["error"]["code"].as_str()),
        (Some("rate_limit_exceeded"), Some("per_model_rpm"))
    );
    let m = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&m, "llm_rate_limiter_rejected_total{limit=\"per_model_rpm\"}"), 1.0);
    // A reload changing another setting keeps the model's bucket where it was.
    let patch = serde_json::json!({"rate_limit": {"burst_size": 300.0}});
    assert_eq!(c.patch(format!("{}/api/config", gw.url())).json(&patch).send().await.unwrap().status(), 200);
    assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 429, "the model's bucket was not reset");
}

#[tokio::test]
async fn per_model_tpm_counts_tokens_in_flight_and_names_its_limit() {
    // Streams held open for ~1 s: the first one's estimate is still charged when the second arrives.
    let sims = sims(1, |_| SimConfig { itl_ms: 200.0, output_tokens: (5, 5), ..fast_sim() }).await;
    let gw = gateway(limited(&sims, ModelConfig { tokens_per_minute: 300, ..demo_model() })).await;
    let c = client();
    let mut body = chat("demo-model", "hi", true);
    body["max_tokens"] = 200.into();
    let first = post(&c, &gw.url(), None, &body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-tokens"], "300");
    assert_eq!(first.headers()["x-ratelimit-remaining-tokens"], "99", "300 - (1 prompt + 200 max) tokens");
    let resp = post(&c, &gw.url(), None, &body).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "300");
    assert_eq!(resp.headers()["x-ratelimit-remaining-tokens"], "0");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "per_model_tpm");
    assert!(first.text().await.unwrap().trim_end().ends_with("data: [DONE]"));
}

#[tokio::test]
async fn an_alias_reaches_the_worker_as_the_served_name_and_is_listed() {
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.models = vec![ModelConfig { aliases: vec!["fast".into(), "gpt-4o-mini".into()], ..demo_model() }];
    let gw = gateway(cfg).await;
    let c = client();
    wait_for("the sim's model to be known", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.knows_model("demo-model")
    })
    .await;
    for stream in [false, true] {
        // The sim answers 404 to any name but its own: a 200 means it received the served name.
        let resp = post(&c, &gw.url(), None, &chat("fast", "hi", stream)).await;
        assert_eq!(resp.status(), 200, "stream {stream}");
        let text = resp.text().await.unwrap();
        assert!(text.contains("\"model\":\"demo-model\""), "{text}");
    }
    assert_eq!(post(&c, &gw.url(), None, &chat("slow", "hi", false)).await.status(), 404, "not an alias");
    let models: serde_json::Value =
        c.get(format!("{}/v1/models", gw.url())).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["demo-model", "fast", "gpt-4o-mini"]);
    assert_eq!(models["data"][1]["root"], "demo-model");
}

#[tokio::test]
async fn queue_mode_admits_the_budget_then_serves_the_rest_as_it_refills() {
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = limited(&sims, demo_model());
    // 30 per minute: a burst of 30, then one every 2 s.
    cfg.rate_limit.per_user_rpm = 30;
    cfg.rate_limit.on_limit = OnLimit::Queue;
    let gw = gateway(cfg).await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(64).build().unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (c, url) = (c.clone(), gw.url());
        tasks.push(tokio::spawn(async move {
            let mut body = chat("demo-model", "hi", false);
            body["user"] = "a".into();
            let resp = post(&c, &url, None, &body).await;
            let position: usize = resp.headers()["x-queue-position"].to_str().unwrap().parse().unwrap();
            (resp.status().as_u16(), position, start.elapsed())
        }));
    }
    // The two over budget wait in the queue, counted in its length.
    wait_for("two budget waiters", Duration::from_secs(5), || async {
        gw.state.admission.stats().iter().any(|q| q.length == 2)
    })
    .await;
    // Another tenant is not held up by tenant a's wait.
    let mut other = chat("demo-model", "hi", false);
    other["user"] = "b".into();
    let resp = post(&c, &gw.url(), None, &other).await;
    assert_eq!(
        (resp.status(), &resp.headers()["x-queue-position"]),
        (reqwest::StatusCode::OK, &"0".parse::<reqwest::header::HeaderValue>().unwrap())
    );
    assert!(start.elapsed() < Duration::from_millis(1500), "b answered while a's requests wait");
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(results.iter().all(|(status, _, _)| *status == 200), "nothing lost: {results:?}");
    let (waited, direct): (Vec<_>, Vec<_>) = results.iter().partition(|(_, position, _)| *position > 0);
    assert_eq!(direct.len(), 30, "exactly the budget went through at once");
    let mut done: Vec<Duration> = waited.iter().map(|(_, _, at)| *at).collect();
    done.sort();
    // One refills every 2 s: the first waiter at ~2 s, the second at ~4 s.
    assert!(done[0] >= Duration::from_millis(1900) && done[1] >= Duration::from_millis(3900), "{done:?}");
    assert!(done[1] < Duration::from_secs(8), "{done:?}");
}

#[tokio::test]
async fn queue_mode_gives_up_with_429_when_the_budget_cannot_refill_in_time() {
    let sims = sims(1, |_| tiny_sim()).await;
    let mut cfg = limited(&sims, ModelConfig { requests_per_minute: 1, ..demo_model() });
    cfg.rate_limit.on_limit = OnLimit::Queue;
    cfg.queue.timeout_secs = 5;
    let gw = gateway(cfg).await;
    let c = client();
    let body = chat("demo-model", "hi", false);
    assert_eq!(post(&c, &gw.url(), None, &body).await.status(), 200);
    // The next request refills in 60 s, past the 5 s queue timeout: refused at once, not after 5 s.
    let start = Instant::now();
    let resp = post(&c, &gw.url(), None, &body).await;
    assert_eq!(resp.status(), 429);
    assert!(start.elapsed() < Duration::from_secs(2));
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "per_model_rpm");
}

#[tokio::test]
async fn model_max_concurrency_holds_requests_until_a_stream_ends() {
    let sims = sims(2, |_| SimConfig { itl_ms: 100.0, output_tokens: (8, 8), ..fast_sim() }).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.models = vec![ModelConfig { max_concurrency: 1, ..demo_model() }];
    let gw = gateway(cfg).await;
    let c = client();
    let busy = post(&c, &gw.url(), None, &chat("demo-model", "hi", true)).await;
    assert_eq!(busy.status(), 200);
    assert_eq!(gw.state.admission.model_in_flight("demo-model"), 1, "held while the stream runs");
    let start = Instant::now();
    let resp = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("x-request-timeout", "0.3")
        .json(&chat("demo-model", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504, "two workers free, but the model allows one in flight");
    assert!(start.elapsed() >= Duration::from_millis(290));
    assert!(busy.text().await.unwrap().trim_end().ends_with("data: [DONE]"));
    wait_for("the permit to be released", Duration::from_secs(5), || async {
        gw.state.admission.model_in_flight("demo-model") == 0
    })
    .await;
    assert_eq!(post(&c, &gw.url(), None, &chat("demo-model", "hi", false)).await.status(), 200);
}

#[tokio::test]
async fn tenant_and_model_buckets_in_redis_are_kept_apart_and_name_their_limits() {
    let redis = RedisServer::start();
    let sims = sims(1, |_| tiny_sim()).await;
    let shared = |model: ModelConfig, per_user_rpm: u64, per_user_rpd: u64| {
        let mut cfg = limited(&sims, model);
        cfg.rate_limit.backend = RateLimitBackend::Redis;
        cfg.rate_limit.redis_url = redis.url();
        cfg.rate_limit.per_user_rpm = per_user_rpm;
        cfg.rate_limit.per_user_rpd = per_user_rpd;
        cfg
    };
    let c = client();
    let send = |gw: String, user: &'static str| {
        let c = c.clone();
        async move {
            let mut body = chat("demo-model", "hi", false);
            body["user"] = user.into();
            let resp = post(&c, &gw, None, &body).await;
            let status = resp.status().as_u16();
            let err: serde_json::Value = if status == 429 { resp.json().await.unwrap() } else { Default::default() };
            (status, err["error"]["code"].as_str().map(str::to_owned))
        }
    };
    // Per day: a tenant's 2, the model's 3 over all tenants.
    let gw = gateway(shared(ModelConfig { requests_per_day: 3, ..demo_model() }, 0, 2)).await;
    assert_eq!(send(gw.url(), "a").await, (200, None));
    assert_eq!(send(gw.url(), "a").await, (200, None));
    assert_eq!(send(gw.url(), "a").await, (429, Some("per_user_rpd".into())));
    assert_eq!(send(gw.url(), "b").await, (200, None), "b has its own day; the model's third");
    assert_eq!(send(gw.url(), "c").await, (429, Some("per_model_rpd".into())));
    drop(gw);
    // Per minute, on another gateway sharing the same Redis: a tenant's 1, the model's 2. A refused
    // request charges no bucket, so d's second one leaves the model's count at 1.
    let gw = gateway(shared(ModelConfig { requests_per_minute: 2, ..demo_model() }, 1, 0)).await;
    assert_eq!(send(gw.url(), "d").await, (200, None));
    assert_eq!(send(gw.url(), "d").await, (429, Some("per_user_rpm".into())));
    assert_eq!(send(gw.url(), "e").await, (200, None));
    assert_eq!(send(gw.url(), "f").await, (429, Some("per_model_rpm".into())));
    let m = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&m, "llm_rate_limiter_fallback_total"), 0.0, "Redis answered every check");
    // The buckets live in Redis under the tenant's and the model's own keys.
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("llmgw:*").query_async(&mut conn).await.unwrap();
    for expected in ["llmgw:rl:d:rpm", "llmgw:rl:e:rpm", "llmgw:rlm:demo-model:rpm"] {
        assert!(keys.iter().any(|k| k == expected), "{expected} in {keys:?}");
    }
    assert!(keys.iter().any(|k| k.starts_with("llmgw:rl:a:rpd:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("llmgw:rlm:demo-model:rpd:")), "{keys:?}");
}
