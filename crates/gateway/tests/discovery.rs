//! Discovery (issue 14, point 5): workers from a watched file and from DNS (`dns+http://`), joining and
//! leaving through the reload path. Real sims, a real gateway, real HTTP and the system's resolver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use llm_gateway::config::Config;
use std::time::Duration;
use vllm_sim::SimConfig;

async fn workers(gw: &str) -> Vec<serde_json::Value> {
    client().get(format!("{gw}/api/workers")).send().await.unwrap().json().await.unwrap()
}

async fn names(gw: &str) -> Vec<String> {
    workers(gw).await.iter().map(|w| w["name"].as_str().unwrap().to_string()).collect()
}

fn file_entry(name: &str, url: &str) -> String {
    format!("[[workers]]\nname = \"{name}\"\nurl = \"{url}\"\n\n")
}

/// Config with no static worker, discovering from `file`.
fn discovering(file: &std::path::Path) -> Config {
    let mut cfg = test_config(Vec::new());
    cfg.discovery.workers_file = Some(file.to_path_buf());
    cfg.discovery.interval_ms = 100;
    cfg
}

#[tokio::test]
async fn a_workers_file_changed_at_runtime_adds_and_removes_workers_and_in_flight_requests_finish() {
    // sim-1 streams slowly, so its stream is still in flight when sim-1 leaves the file.
    let sims =
        sims(
            3,
            |i| if i == 1 { SimConfig { itl_ms: 40.0, output_tokens: (40, 40), ..fast_sim() } } else { fast_sim() },
        )
        .await;
    let file = temp_path("workers").with_extension("toml");
    std::fs::write(&file, file_entry("sim-0", &sims[0].url()) + &file_entry("sim-1", &sims[1].url())).unwrap();
    let cfg = discovering(&file);
    let gw = gateway(cfg.clone()).await;
    assert_eq!(names(&gw.url()).await, ["sim-0", "sim-1"], "the file's workers serve from the start");
    wait_for("both healthy", Duration::from_secs(5), || async {
        workers(&gw.url()).await.iter().all(|w| w["healthy"] == true)
    })
    .await;

    // One request to each (round robin); the one on sim-1 is a slow stream left open.
    let mut on_sim1 = None;
    for _ in 0..2 {
        let resp = post_chat(&gw.url(), true).await;
        assert_eq!(resp.status(), 200);
        if resp.headers()["x-gateway-worker"] == "sim-1" {
            on_sim1 = Some(resp);
        } else {
            resp.text().await.unwrap();
        }
    }
    let on_sim1 = on_sim1.expect("round robin sent one request to sim-1");
    let sim0_before = workers(&gw.url()).await.into_iter().find(|w| w["name"] == "sim-0").unwrap();

    // sim-1 leaves, sim-2 joins; as JSON this time, the other format a workers file may take.
    let json = temp_path("workers").with_extension("json");
    let list = serde_json::json!([{"name": "sim-0", "url": sims[0].url()}, {"name": "sim-2", "url": sims[2].url()}]);
    std::fs::write(&json, list.to_string()).unwrap();
    let mut to_json = cfg.clone();
    to_json.discovery.workers_file = Some(json.clone());
    llm_gateway::reload::apply(&gw.state, to_json.clone()).await.expect("a reload naming the JSON file");
    assert_eq!(names(&gw.url()).await, ["sim-0", "sim-2"]);
    let sim0_after = workers(&gw.url()).await.into_iter().find(|w| w["name"] == "sim-0").unwrap();
    assert_eq!(sim0_after["id"], sim0_before["id"], "the kept worker is the same worker");
    assert!(sim0_after["requests_total"].as_u64() >= sim0_before["requests_total"].as_u64(), "and keeps its counts");

    let body = on_sim1.text().await.unwrap();
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the removed worker's stream finished");
    assert!(events.len() > 40 && !body.contains("\"error\""), "whole, without an error: {} events", events.len());

    // The watch: rewriting the file (no reload asked for) brings sim-1 back.
    let list = serde_json::json!([
        {"name": "sim-0", "url": sims[0].url()},
        {"name": "sim-1", "url": sims[1].url()},
        {"name": "sim-2", "url": sims[2].url()},
    ]);
    std::fs::write(&json, list.to_string()).unwrap();
    wait_for("the watched file's change applied", Duration::from_secs(10), || async {
        names(&gw.url()).await == ["sim-0", "sim-1", "sim-2"]
    })
    .await;
    wait_for("all healthy", Duration::from_secs(5), || async {
        workers(&gw.url()).await.iter().all(|w| w["healthy"] == true)
    })
    .await;
    for _ in 0..6 {
        let resp = post_chat(&gw.url(), false).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }

    // A broken file is refused whole: the reload fails naming the key, the workers in force stay.
    std::fs::write(&json, "[{\"url\": 1}]").unwrap();
    let err = llm_gateway::reload::apply(&gw.state, to_json).await.expect_err("an invalid workers file");
    assert!(err.starts_with("discovery.workers_file"), "{err}");
    assert_eq!(names(&gw.url()).await, ["sim-0", "sim-1", "sim-2"]);
    // A name in both the file and [[workers]] is refused too.
    std::fs::write(&json, serde_json::json!([{"name": "sim-0", "url": sims[0].url()}]).to_string()).unwrap();
    let mut twice = cfg.clone();
    twice.discovery.workers_file = Some(json.clone());
    twice.workers = worker_configs(&sims[..1]);
    let err = llm_gateway::reload::apply(&gw.state, twice).await.expect_err("a name twice");
    assert!(err.contains("also in [[workers]]"), "{err}");

    // A discovered worker cannot be removed through the admin API (its source would bring it back).
    let resp = client().delete(format!("{}/api/workers/sim-1", gw.url())).send().await.unwrap();
    assert_eq!(resp.status(), 400, "{}", resp.text().await.unwrap());
    for f in [file, json] {
        let _ = std::fs::remove_file(f);
    }
}

#[tokio::test]
async fn a_dns_worker_stands_for_every_address_its_name_resolves_to() {
    let sims = sims(2, |_| fast_sim()).await;
    let port = url::Url::parse(&sims[1].url()).unwrap().port().unwrap();
    // What the system's resolver says localhost is (127.0.0.1, often ::1 too): the test expects exactly
    // that, whatever this machine's /etc/hosts holds.
    let mut expected: Vec<std::net::IpAddr> =
        tokio::net::lookup_host(("localhost", port)).await.unwrap().map(|a| a.ip()).collect();
    expected.sort();
    expected.dedup();
    assert!(expected.contains(&"127.0.0.1".parse().unwrap()), "localhost resolves to 127.0.0.1: {expected:?}");

    let mut cfg = test_config(worker_configs(&sims[..1]));
    cfg.discovery.interval_ms = 100;
    let gw = gateway(cfg.clone()).await;
    assert_eq!(names(&gw.url()).await, ["sim-0"]);

    // A dns+http worker added at runtime joins once its name is resolved (the next discovery round).
    let mut with_dns = cfg.clone();
    with_dns.workers.push(llm_gateway::config::WorkerConfig::from_url(format!("dns+http://localhost:{port}")));
    llm_gateway::reload::apply(&gw.state, with_dns).await.expect("a dns+http worker is valid");
    let want: Vec<String> = std::iter::once("sim-0".to_string())
        .chain(expected.iter().map(|ip| format!("localhost:{port}/{ip}")))
        .collect();
    wait_for("one worker per address of localhost", Duration::from_secs(10), || async {
        names(&gw.url()).await == want
    })
    .await;
    let shown = workers(&gw.url()).await;
    let v4 = shown.iter().find(|w| w["name"] == format!("localhost:{port}/127.0.0.1")).unwrap();
    assert_eq!(v4["url"], format!("http://127.0.0.1:{port}/"));

    // The sim listens on 127.0.0.1 only: that worker is healthy and serves; a ::1 one, if any, is not
    // asked to (the probe ejects it, a request that met it first is retried).
    let v4_name = format!("localhost:{port}/127.0.0.1");
    wait_for("the 127.0.0.1 worker healthy", Duration::from_secs(5), || async {
        workers(&gw.url()).await.iter().any(|w| w["name"] == v4_name.as_str() && w["healthy"] == true)
    })
    .await;
    let mut served_by_dns_worker = 0;
    for _ in 0..6 {
        let resp = post_chat(&gw.url(), false).await;
        assert_eq!(resp.status(), 200);
        if resp.headers()["x-gateway-worker"] == v4_name.as_str() {
            served_by_dns_worker += 1;
        }
        resp.text().await.unwrap();
    }
    assert!(served_by_dns_worker > 0, "the discovered worker serves requests");

    // Dropping the dns+http worker from the config removes every worker it stood for, at once.
    llm_gateway::reload::apply(&gw.state, cfg).await.expect("back to the static list");
    assert_eq!(names(&gw.url()).await, ["sim-0"]);
}

#[tokio::test]
async fn a_gateway_starts_with_its_dns_workers_already_resolved() {
    let sims = sims(1, |_| fast_sim()).await;
    let port = url::Url::parse(&sims[0].url()).unwrap().port().unwrap();
    let mut w = llm_gateway::config::WorkerConfig::from_url(format!("dns+http://localhost:{port}"));
    w.name = Some("pods".into());
    let gw = gateway(test_config(vec![w])).await;
    // No waiting: `Gateway::serve` resolves before it serves.
    assert!(names(&gw.url()).await.contains(&"pods/127.0.0.1".to_string()));
}
