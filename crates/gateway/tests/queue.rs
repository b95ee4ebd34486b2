//! The admission queue end to end: real sims at capacity, real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use vllm_sim::SimConfig;

/// One sim whose requests take ~`ms` each, behind a gateway holding at most `cap` in flight on it.
async fn setup(
    n: usize,
    cap: u32,
    ms: u64,
    tweak: impl FnOnce(&mut llm_gateway::Config),
) -> (Vec<vllm_sim::SimHandle>, llm_gateway::Gateway) {
    let tokens = 10u32;
    let sims =
        sims(n, |_| SimConfig { itl_ms: ms as f64 / f64::from(tokens), output_tokens: (tokens, tokens), ..fast_sim() })
            .await;
    let mut workers = worker_configs(&sims);
    for w in &mut workers {
        w.max_concurrency = cap;
    }
    let mut cfg = test_config(workers);
    tweak(&mut cfg);
    (sims, gateway(cfg).await)
}

async fn queue_len(gw: &str) -> u64 {
    let q: serde_json::Value = client().get(format!("{gw}/api/queue")).send().await.unwrap().json().await.unwrap();
    q["models"]["demo-model"]["length"].as_u64().unwrap_or(0)
}

/// Sends a request in the background; resolves to (status, headers, finish order).
fn send(
    gw: &str,
    user: &str,
    priority: &str,
    order: Arc<parking_lot::Mutex<Vec<String>>>,
    tag: &str,
) -> tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap)> {
    let (url, user, priority, tag) =
        (format!("{gw}/v1/chat/completions"), user.to_string(), priority.to_string(), tag.to_string());
    tokio::spawn(async move {
        // The first request holds the slot for the sim's full output; queued ones are short.
        let max_tokens = if tag == "busy" { 1000 } else { 2 };
        let body = serde_json::json!({"model": "demo-model", "user": user, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]});
        let resp = client().post(url).header("x-priority", priority).json(&body).send().await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        let _ = resp.bytes().await;
        order.lock().push(tag);
        (status, headers)
    })
}

/// Queues requests one by one (each is in the queue before the next is sent).
async fn enqueue_in_order(
    gw: &str,
    reqs: &[(&str, &str, &str)],
    order: &Arc<parking_lot::Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap)>> {
    let mut handles = Vec::new();
    for (i, (user, priority, tag)) in reqs.iter().enumerate() {
        handles.push(send(gw, user, priority, order.clone(), tag));
        let want = i as u64 + 1;
        wait_for("the request to be queued", Duration::from_secs(5), || async { queue_len(gw).await == want }).await;
    }
    handles
}

#[tokio::test]
async fn priority_classes_leave_in_order_with_headers() {
    // The busy request must outlast queueing the others one by one, each checked over HTTP: a second
    // is ample on a loaded CI machine, where 150 ms once was not.
    let (_sims, gw) = setup(1, 1, 1000, |_| {}).await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let handles = enqueue_in_order(
        &gw.url(),
        &[("a", "low", "low"), ("b", "normal", "normal"), ("c", "high", "high"), ("d", "urgent", "urgent")],
        &order,
    )
    .await;
    let (status, headers) = busy.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-queue-position"], "0", "it did not wait");
    let mut positions = Vec::new();
    for h in handles {
        let (status, headers) = h.await.unwrap();
        assert_eq!(status, 200);
        positions.push(headers["x-queue-position"].to_str().unwrap().parse::<usize>().unwrap());
        assert!(headers.contains_key("x-estimated-wait"));
    }
    assert_eq!(*order.lock(), ["busy", "urgent", "high", "normal", "low"]);
    // Position on entry in the dispatch order of that moment: each newcomer outranked all before it.
    assert_eq!(positions, [1, 1, 1, 1]);
    assert_eq!(queue_len(&gw.url()).await, 0);
}

#[tokio::test]
async fn positions_count_up_for_equal_requests() {
    // As above: the busy request outlasts the five enqueued after it (100 ms once did not, in CI).
    let (_sims, gw) = setup(1, 1, 1000, |_| {}).await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let reqs: Vec<(&str, &str, &str)> = ["1", "2", "3", "4", "5"].iter().map(|t| ("same", "normal", *t)).collect();
    let handles = enqueue_in_order(&gw.url(), &reqs, &order).await;
    busy.await.unwrap();
    let mut positions = Vec::new();
    for h in handles {
        positions.push(h.await.unwrap().1["x-queue-position"].to_str().unwrap().to_string());
    }
    assert_eq!(positions, ["1", "2", "3", "4", "5"]);
    assert_eq!(*order.lock(), ["busy", "1", "2", "3", "4", "5"]);
}

// Aging and the queue timeout's exact timing are tested on paused time in `proxy::admission`'s unit
// tests (`an_aged_low_request_leaves_before_a_newer_normal_one`, `a_waiter_gets_504_exactly_at_the_queue_timeout`):
// over real HTTP they could only be shown by sleeping on the wall clock.

#[tokio::test]
async fn a_light_tenant_is_not_stuck_behind_a_flooding_one() {
    let (_sims, gw) = setup(1, 1, 1000, |_| {}).await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let flood: Vec<(&str, &str, &str)> = (0..10).map(|_| ("flooder", "normal", "flood")).collect();
    let mut handles = enqueue_in_order(&gw.url(), &flood, &order).await;
    handles.extend(enqueue_in_order_from(&gw.url(), &[("light", "normal", "light")], &order, 10).await);
    busy.await.unwrap();
    for h in handles {
        assert_eq!(h.await.unwrap().0, 200);
    }
    let order = order.lock().clone();
    let light_at = order.iter().position(|t| t == "light").unwrap();
    assert!(light_at <= 2, "the light tenant's request left within the first two dispatches: {order:?}");
}

async fn enqueue_in_order_from(
    gw: &str,
    reqs: &[(&str, &str, &str)],
    order: &Arc<parking_lot::Mutex<Vec<String>>>,
    already: u64,
) -> Vec<tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap)>> {
    let mut handles = Vec::new();
    for (i, (user, priority, tag)) in reqs.iter().enumerate() {
        handles.push(send(gw, user, priority, order.clone(), tag));
        let want = already + i as u64 + 1;
        wait_for("the request to be queued", Duration::from_secs(5), || async { queue_len(gw).await >= want }).await;
    }
    handles
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_a_long_wait_504() {
    let (_sims, gw) = setup(1, 1, 1500, |c| {
        c.queue.max_size = 1;
        c.queue.timeout_secs = 1;
    })
    .await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let _busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let waiting = enqueue_in_order(&gw.url(), &[("a", "normal", "a")], &order).await;
    let resp = post_chat(&gw.url(), false).await;
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "queue_full");
    assert_eq!(body["error"]["code"], "queue_full");
    let (status, _) = waiting.into_iter().next().unwrap().await.unwrap();
    assert_eq!(status, 504, "waited past queue.timeout_secs");
    assert_eq!(queue_len(&gw.url()).await, 0);
    let m = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    for reason in ["queue_full", "queue_timeout"] {
        let series = format!("llm_gateway_queue_rejected_total{{model=\"demo-model\",reason=\"{reason}\"}}");
        assert_eq!(metric_value(&m, &series), 1.0, "{reason}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_is_removed_at_once() {
    let (_sims, gw) = setup(1, 1, 3000, |_| {}).await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let _busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let err =
        impatient.post(format!("{}/v1/chat/completions", gw.url())).json(&chat("demo-model", "hi", false)).send().await;
    assert!(err.is_err(), "the client gave up");
    wait_for("the queue to forget it", Duration::from_secs(5), || async { queue_len(&gw.url()).await == 0 }).await;
    let metrics = client().get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("llm_gateway_queue_length{model=\"demo-model\"} 0"), "{metrics}");
    assert_eq!(
        metric_value(&metrics, "llm_gateway_queue_rejected_total{model=\"demo-model\",reason=\"cancelled\"}"),
        1.0
    );
}

#[tokio::test]
async fn five_hundred_concurrent_requests_never_overload_a_worker() {
    let (sims, gw) = setup(2, 4, 20, |c| c.queue.max_size = 500).await;
    let sims = Arc::new(sims);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (sims, stop) = (sims.clone(), stop.clone());
        tokio::spawn(async move {
            let mut max_running = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in sims.iter() {
                    max_running = max_running.max(s.running() + s.waiting());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            max_running
        })
    };
    let url = format!("{}/v1/chat/completions", gw.url());
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(600).build().unwrap();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            let resp = c.post(&url).json(&chat("demo-model", "hi", stream)).send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap();
            (status, stream, body)
        }));
    }
    for t in tasks {
        let (status, stream, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        if stream {
            assert!(body.trim_end().ends_with("data: [DONE]"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_running = watcher.await.unwrap();
    assert!(max_running <= 4, "a sim saw {max_running} requests at once");
    assert!(max_running >= 3, "the load did reach capacity");
    assert_eq!(queue_len(&gw.url()).await, 0, "the queue drained");
    let q: serde_json::Value =
        client().get(format!("{}/api/queue", gw.url())).send().await.unwrap().json().await.unwrap();
    assert!(q["models"]["demo-model"]["dispatch_rate"].as_f64().unwrap() > 0.0);
    assert_eq!(q["in_flight"]["sim-0"], 0);
}

#[tokio::test]
async fn x_request_timeout_shorter_than_the_queue_timeout_gives_504_at_the_deadline() {
    let (_sims, gw) = setup(1, 1, 3000, |c| c.queue.timeout_secs = 60).await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let _busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let with_timeout =
        |v: &'static str| client().post(&url).header("x-request-timeout", v).json(&chat("demo-model", "hi", false));
    let start = tokio::time::Instant::now();
    let resp = with_timeout("0.5").send().await.unwrap();
    let took = start.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(took >= Duration::from_millis(490) && took < Duration::from_millis(2000), "{took:?}");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "queue_timeout");
    assert_eq!(queue_len(&gw.url()).await, 0, "it left the queue");
    for bad in ["soon", "0", "-3"] {
        let resp = with_timeout(bad).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_header");
        assert!(err["error"]["message"].as_str().unwrap().contains("X-Request-Timeout"));
    }
}

#[tokio::test]
async fn scoring_weights_change_the_order_as_documented() {
    // `priority = 0`: classes count for nothing, so (with fairness off) requests leave in arrival order,
    // the reverse of `priority_classes_leave_in_order_with_headers`.
    let (_sims, gw) = setup(1, 1, 150, |c| {
        c.queue.scoring.priority = 0.0;
        c.queue.enable_fairness = false;
    })
    .await;
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = send(&gw.url(), "x", "normal", order.clone(), "busy");
    wait_for("the slot to be taken", Duration::from_secs(5), || async {
        gw.state.snapshot.load().fleet.workers[0].view().in_flight == 1
    })
    .await;
    let handles = enqueue_in_order(
        &gw.url(),
        &[("a", "low", "low"), ("b", "normal", "normal"), ("c", "high", "high"), ("d", "urgent", "urgent")],
        &order,
    )
    .await;
    busy.await.unwrap();
    for h in handles {
        assert_eq!(h.await.unwrap().0, 200);
    }
    assert_eq!(*order.lock(), ["busy", "low", "normal", "high", "urgent"]);
}
