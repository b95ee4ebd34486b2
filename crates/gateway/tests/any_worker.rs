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
