//! Workers that are not vLLM (issue 14): no `/health`, no `/metrics`, other metric dialects, probes that
//! fail while real requests succeed. Real sims shaped like those servers, a real gateway, on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::Duration;
use vllm_sim::{Faults, MetricsDialect, SimConfig};

async fn workers(gw: &str) -> Vec<serde_json::Value> {
    client().get(format!("{gw}/api/workers")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn a_server_without_health_is_probed_on_v1_models_and_its_dialect_is_read() {
    let dialects = [MetricsDialect::Llamacpp, MetricsDialect::Sglang, MetricsDialect::Tgi, MetricsDialect::None];
    let sims =
        sims(dialects.len(), |i| SimConfig { health_endpoint: false, metrics_dialect: dialects[i], ..fast_sim() })
            .await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    wait_for("every worker healthy without /health", Duration::from_secs(5), || async {
        workers(&gw.url()).await.iter().all(|w| w["healthy"] == true)
    })
    .await;
    let shown: Vec<(String, String)> = workers(&gw.url())
        .await
        .iter()
        .map(|w| (w["probe_path"].as_str().unwrap().to_string(), w["metrics_dialect"].as_str().unwrap().to_string()))
        .collect();
    let want: Vec<(String, String)> =
        ["llamacpp", "sglang", "tgi", "none"].iter().map(|d| ("/v1/models".to_string(), d.to_string())).collect();
    assert_eq!(shown, want);
    for stream in [false, true] {
        for _ in 0..8 {
            let resp = post_chat(&gw.url(), stream).await;
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap();
        }
    }
}

#[tokio::test]
async fn passive_health_serves_a_worker_with_no_probe_at_all() {
    let sims =
        sims(1, |_| SimConfig { health_endpoint: false, metrics_dialect: MetricsDialect::None, ..fast_sim() }).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.workers[0].models = vec!["demo-model".into()];
    cfg.health.path = "none".into();
    let gw = gateway(cfg).await;
    let w = &workers(&gw.url()).await[0];
    assert_eq!((w["probe_path"].as_str(), w["healthy"].as_bool()), (Some("passive"), Some(true)), "{w}");
    assert_eq!(post_chat(&gw.url(), false).await.status(), 200);
}

#[tokio::test]
async fn a_failing_probe_does_not_eject_a_worker_whose_real_requests_succeed() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    assert_eq!(post_chat(&gw.url(), false).await.status(), 200);
    // Its probe now fails (a one-request-at-a-time server answers probes late), but traffic succeeds.
    sims[0].set_faults(Faults { refuse_health: true, ..Faults::default() });
    let busy_until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < busy_until {
        assert_eq!(post_chat(&gw.url(), false).await.status(), 200, "real traffic outweighs the failed probe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without traffic the probe is the only evidence left: unhealthy.
    wait_for("the idle worker with a failing probe to turn unhealthy", Duration::from_secs(5), || async {
        workers(&gw.url()).await[0]["healthy"] == false
    })
    .await;
}

#[tokio::test]
async fn capacity_comes_from_the_first_tier_that_knows_and_one_slot_is_held_at_one() {
    // sim-0: llama.cpp with one slot (`/props` total_slots 1); sim-1: TGI (`/info`); sim-2: SGLang
    // (`/get_server_info`); sim-3: vLLM, which states nothing (on the ramp until learned: twice its
    // peers' largest capacity, 6, or the floor of 16); sim-4: llama.cpp, but configured.
    let dialects = [
        MetricsDialect::Llamacpp,
        MetricsDialect::Tgi,
        MetricsDialect::Sglang,
        MetricsDialect::Vllm,
        MetricsDialect::Llamacpp,
    ];
    let sims = sims(dialects.len(), |i| SimConfig {
        metrics_dialect: dialects[i],
        max_num_seqs: [1, 6, 5, 256, 2][i],
        itl_ms: 5.0,
        output_tokens: (8, 8),
        ..fast_sim()
    })
    .await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.workers[4].max_concurrency = 3;
    cfg.queue.default_worker_concurrency = 0;
    let gw = gateway(cfg).await;
    wait_for("the vLLM worker on its ramp", Duration::from_secs(5), || async {
        workers(&gw.url()).await[3]["capacity_source"] == "ramp"
    })
    .await;
    let shown: Vec<(serde_json::Value, String)> = workers(&gw.url())
        .await
        .iter()
        .map(|w| (w["capacity"].clone(), w["capacity_source"].as_str().unwrap().to_string()))
        .collect();
    let want: Vec<(serde_json::Value, String)> = [
        (serde_json::json!(1), "engine"),
        (serde_json::json!(6), "engine"),
        (serde_json::json!(5), "engine"),
        (serde_json::json!(16), "ramp"),
        (serde_json::json!(3), "configured"),
    ]
    .into_iter()
    .map(|(c, s)| (c, s.to_string()))
    .collect();
    assert_eq!(shown, want);
    let m = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&m, r#"llm_worker_capacity{source="engine",worker="sim-0"}"#), 1.0, "{m}");
    assert_eq!(metric_value(&m, r#"llm_worker_capacity{source="configured",worker="sim-4"}"#), 3.0, "{m}");
    assert!(!m.contains(r#"llm_worker_capacity{source="default",worker="sim-0"}"#), "one series per worker");

    // The one-slot worker alone: concurrent requests wait in the gateway's queue, not in the worker.
    let mut cfg = test_config(worker_configs(&sims[..1]));
    cfg.queue.default_worker_concurrency = 0;
    let gw = gateway(cfg).await;
    let sim = &sims[0];
    let sends: Vec<_> = (0..4)
        .map(|_| {
            let url = gw.url();
            tokio::spawn(async move {
                let resp = post_chat(&url, false).await;
                let pos: u32 = resp.headers()["x-queue-position"].to_str().unwrap().parse().unwrap();
                (resp.status(), pos)
            })
        })
        .collect();
    let mut most_waiting_in_worker = 0;
    let mut answers = Vec::new();
    for s in sends {
        most_waiting_in_worker = most_waiting_in_worker.max(sim.waiting());
        answers.push(s.await.unwrap());
    }
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    assert!(answers.iter().any(|(_, pos)| *pos > 0), "some waited in the gateway's queue: {answers:?}");
    assert_eq!(most_waiting_in_worker, 0, "the worker never had a request waiting");
}

#[tokio::test]
async fn a_stream_without_its_usage_chunk_is_counted_and_ends_cleanly() {
    let sims = sims(1, |_| SimConfig { ignore_include_usage: true, output_tokens: (5, 5), ..fast_sim() }).await;
    let mut cfg = test_config(worker_configs(&sims));
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.per_user_tpm = 10_000;
    let gw = gateway(cfg).await;
    let c = client();
    let send = |body: serde_json::Value| {
        let (c, url) = (c.clone(), format!("{}/v1/chat/completions", gw.url()));
        async move { c.post(url).json(&body).send().await.unwrap() }
    };
    let mut body = chat("demo-model", "hi", true);
    body["user"] = "u".into();
    body["max_tokens"] = 1000.into();
    let remaining = |r: &reqwest::Response| -> i64 {
        r.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap()
    };
    // Asked for by the gateway (the client did not) and by the client: neither gets a usage chunk.
    for asked in [false, true] {
        if asked {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), send(body.clone())).await.expect("no hang");
        assert_eq!(resp.status(), 200);
        let text = tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("no hang").unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert!(!text.contains("\"error\"") && !text.contains("\"usage\""), "{text}");
    }
    // Each request charged ~1001 tokens up front; the two finished ones gave back all but what they used
    // (about 8 each: the prompt estimate and the counted deltas), so this third one sees ~10000-1001-16.
    let third = send(body.clone()).await;
    let left = remaining(&third);
    third.text().await.unwrap();
    assert!(left > 10_000 - 1001 - 100, "the estimates were reconciled with counted tokens: {left} left");
    let m = c.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    let completion = metric_value(&m, r#"llm_gateway_tokens_total{kind="completion",model="demo-model"}"#);
    assert!((15.0..=30.0).contains(&completion), "5 tokens per stream counted from its deltas: {completion}");
}
