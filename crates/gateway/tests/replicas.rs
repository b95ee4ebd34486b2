//! Several gateways in front of the same workers (issue 16).
//!
//! - Without a shared count, each replica discounts the load a worker reports that it did not send
//!   (`guard::share`): two replicas settle to the worker's capacity together instead of twice it, and a
//!   lone gateway never sees foreign load of its own making.
//! - With `[cluster] backend = "redis"`, three gateway processes share one count per worker: no worker
//!   ever queues inside under a burst far above capacity, and a replica killed with SIGKILL gives its
//!   slots back within its lease.
//! - Redis down: `redis_failure = "local"` serves, `"deny"` refuses, both count it; Redis back, sharing
//!   resumes without a restart.
//! - Replicas sharing Redis agree on a worker's learned capacity, open each other's breakers (told once,
//!   learned by a replica started meanwhile; an operator's reset closes them all) and hold a conversation on one worker whichever replica gets
//!   each turn (dispatch records).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vllm_sim::SimConfig;

/// Sims with `max_num_seqs` slots whose requests take about 300 ms.
async fn small_sims(n: usize, seqs: usize) -> Vec<vllm_sim::SimHandle> {
    sims(n, |_| SimConfig { max_num_seqs: seqs, itl_ms: 20.0, output_tokens: (15, 15), ..fast_sim() }).await
}

/// A config for a gateway in front of `sims`, each held to `cap`, scraping every 50 ms.
fn replica_config(sims: &[vllm_sim::SimHandle], cap: u32) -> llm_gateway::Config {
    let mut workers = worker_configs(sims);
    for w in &mut workers {
        w.max_concurrency = cap;
    }
    let mut cfg = test_config(workers);
    cfg.health.interval_ms = 50;
    cfg.queue.max_size = 1000;
    cfg
}

/// Sends `n` chat requests spread over `urls` at once; every status.
async fn burst(urls: &[String], n: usize) -> Vec<u16> {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(1000).build().unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{}/v1/chat/completions", urls[i % urls.len()]));
            tokio::spawn(async move {
                // 0: no answer (the replica was killed).
                let Ok(resp) = c.post(&url).json(&chat("demo-model", &format!("hi {i}"), i % 2 == 0)).send().await
                else {
                    return 0;
                };
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(_) => status,
                    Err(_) => 0,
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// What the sims held while a burst ran: samples of waiting requests (all sims summed) every 2 ms.
struct Watch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Duration, usize)>>,
}

impl Watch {
    fn start(sims: Arc<Vec<vllm_sim::SimHandle>>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push((started.elapsed(), sims.iter().map(|s| s.waiting()).sum()));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                samples
            })
        };
        Watch { stop, task }
    }

    async fn stop(self) -> Vec<(Duration, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Mean waiting requests over the samples taken after `from`.
fn mean_after(samples: &[(Duration, usize)], from: Duration) -> f64 {
    let late: Vec<usize> = samples.iter().filter(|(t, _)| *t >= from).map(|(_, w)| *w).collect();
    late.iter().sum::<usize>() as f64 / late.len().max(1) as f64
}

#[tokio::test]
async fn two_uncoordinated_replicas_discount_each_others_load() {
    const SEQS: usize = 4;
    let sims = Arc::new(small_sims(2, SEQS).await);
    let a = gateway(replica_config(&sims, SEQS as u32)).await;
    let b = gateway(replica_config(&sims, SEQS as u32)).await;
    let watch = Watch::start(sims.clone());
    let statuses = burst(&[a.url(), b.url()], 160).await;
    let samples = watch.stop().await;
    assert!(statuses.iter().all(|s| *s == 200), "every request succeeds: {statuses:?}");
    // Both replicas fill every worker at once before their first scrape sees the other (the overshoot
    // of one scrape); after that each takes only what the other leaves. Undiscounted, each worker would
    // hold SEQS waiting the whole burst (2 * SEQS in all).
    let settled = mean_after(&samples, Duration::from_millis(500));
    let max = samples.iter().map(|(_, w)| *w).max().unwrap_or(0);
    eprintln!("waiting in the sims: mean {settled:.2} after 500 ms, max {max}, {} samples", samples.len());
    assert!(settled < SEQS as f64 / 2.0, "the replicas settled near capacity: mean waiting {settled:.2}");
    assert!(max <= 2 * 2 * SEQS, "never more than each replica's full share: {max}");
}

#[tokio::test]
async fn a_lone_gateway_sees_no_foreign_load_of_its_own_making() {
    const SEQS: usize = 4;
    let sims = Arc::new(small_sims(2, SEQS).await);
    let gw = gateway(replica_config(&sims, SEQS as u32)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let (state, stop) = (gw.state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                for w in &state.snapshot.load().fleet.workers {
                    most = most.max(w.stats.foreign_load.load(Ordering::Relaxed));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        })
    };
    let watch = Watch::start(sims.clone());
    let statuses = burst(&[gw.url()], 80).await;
    let samples = watch.stop().await;
    stop.store(true, Ordering::Relaxed);
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(seen.await.unwrap(), 0, "its own requests never count as foreign");
    assert_eq!(samples.iter().map(|(_, w)| *w).max(), Some(0), "as before: the workers never queue");
}

/// The TOML of a gateway process in front of `sims` (each held to `cap`) sharing slots through `redis`.
fn shared_config(sims: &[vllm_sim::SimHandle], cap: u32, redis: &str, lease_secs: u64) -> String {
    let workers: String = sims
        .iter()
        .enumerate()
        .map(|(i, s)| format!("[[workers]]\nurl = \"{}\"\nname = \"sim-{i}\"\nmax_concurrency = {cap}\n", s.url()))
        .collect();
    format!(
        r#"{workers}
[health]
interval_ms = 100
[queue]
max_size = 1000
[cluster]
backend = "redis"
redis_url = "{redis}"
lease_secs = {lease_secs}
redis_timeout_ms = 1000
"#
    )
}

/// Unexpired slot members in Redis, per replica (the part of a member before `:`).
async fn members(conn: &mut redis::aio::MultiplexedConnection) -> std::collections::HashMap<String, usize> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("llmgw:slots:*").query_async(conn).await.unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let mut out = std::collections::HashMap::new();
    for k in keys {
        let live: Vec<String> =
            redis::cmd("ZRANGEBYSCORE").arg(&k).arg(format!("({now_ms}")).arg("+inf").query_async(conn).await.unwrap();
        for m in live {
            *out.entry(m.split(':').next().unwrap_or("").to_string()).or_default() += 1;
        }
    }
    out
}

/// Three gateway processes share two small workers through one Redis: under a burst far above capacity
/// no worker ever queues a request inside, and every request to a live replica succeeds; one replica
/// killed with SIGKILL while holding slots gives them back within its lease, and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_sharing_redis_never_overfill_a_worker_and_survive_a_kill() {
    const SEQS: usize = 4;
    const LEASE: u64 = 3;
    let redis_server = RedisServer::start();
    let mut conn = redis::Client::open(redis_server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let sims = Arc::new(small_sims(2, SEQS).await);
    let config = shared_config(&sims, SEQS as u32, &redis_server.url(), LEASE);
    let watch = Watch::start(sims.clone());

    // The doomed replica first, alone, so its member prefix is known. Its backlog (about 30 s of the
    // workers' time) keeps it holding slots until it is killed, however long the others take to start.
    let mut doomed = GatewayProcess::start(&config, &[]).await;
    let doomed_burst = tokio::spawn({
        let url = doomed.url().to_string();
        async move { burst(&[url], 400).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let prefix = loop {
        let m = members(&mut conn).await;
        if m.values().sum::<usize>() == 2 * SEQS {
            break m.into_keys().next().unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "the first replica never held every slot: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let a = GatewayProcess::start(&config, &[]).await;
    let b = GatewayProcess::start(&config, &[]).await;
    let live = tokio::spawn({
        let urls = vec![a.url().to_string(), b.url().to_string()];
        async move { burst(&urls, 120).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = members(&mut conn).await.get(&prefix).copied().unwrap_or(0);
    assert!(held > 0, "the doomed replica holds slots when killed");
    doomed.process.child.kill().await.unwrap();
    let killed = tokio::time::Instant::now();
    while members(&mut conn).await.contains_key(&prefix) {
        assert!(killed.elapsed() < Duration::from_secs(LEASE + 2), "the killed replica's slots never returned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let returned = killed.elapsed();
    eprintln!("the killed replica held {held} slots; they returned {returned:?} after the kill");
    assert!(returned <= Duration::from_secs(LEASE) + Duration::from_millis(500), "returned after {returned:?}");

    let statuses = live.await.unwrap();
    let samples = watch.stop().await;
    let _ = doomed_burst.await;
    assert!(statuses.iter().all(|s| *s == 200), "every request to a live replica succeeds: {statuses:?}");
    let max = samples.iter().map(|(_, w)| *w).max().unwrap_or(0);
    assert_eq!(max, 0, "a worker queued requests inside ({} samples)", samples.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !members(&mut conn).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "slots left in Redis after the burst");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Restarts `redis-server` on `port` (where a killed one listened), retried while the port frees.
fn restart_redis(port: u16) -> ExternalServer {
    for _ in 0..100 {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let mut server = ExternalServer { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            if server.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill();
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not come back on port {port}");
}

async fn metrics_of(url: &str) -> String {
    client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// Redis dies mid-traffic: `redis_failure = "local"` keeps serving on local slots, `"deny"` answers 503
/// `cluster_unavailable`; both count it and say they are not sharing; Redis back, both share again
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_falls_back_or_denies_and_sharing_resumes_when_it_returns() {
    let mut redis_server = RedisServer::start();
    let port = redis_server.0.port;
    let sims = small_sims(1, 4).await;
    let shared = |failure: llm_gateway::config::RedisFailure| {
        let mut cfg = replica_config(&sims, 4);
        cfg.cluster.backend = llm_gateway::config::ClusterBackend::Redis;
        cfg.cluster.redis_url = redis_server.url();
        cfg.cluster.redis_failure = failure;
        cfg.cluster.redis_timeout_ms = 300;
        cfg
    };
    let local = gateway(shared(llm_gateway::config::RedisFailure::Local)).await;
    let deny = gateway(shared(llm_gateway::config::RedisFailure::Deny)).await;
    for gw in [&local, &deny] {
        assert_eq!(post_chat(&gw.url(), false).await.status(), 200);
        assert_eq!(metric_value(&metrics_of(&gw.url()).await, "llm_gateway_cluster_shared"), 1.0);
    }

    redis_server.kill();
    // The first request after the loss notices it (a failed call), later ones take the failure path.
    for _ in 0..3 {
        assert_eq!(post_chat(&local.url(), false).await.status(), 200, "local fallback keeps serving");
    }
    let mut denied = Vec::new();
    for _ in 0..3 {
        let resp = post_chat(&deny.url(), false).await;
        denied.push((resp.status().as_u16(), resp.text().await.unwrap()));
    }
    assert!(denied.iter().skip(1).all(|(s, b)| *s == 503 && b.contains("cluster_unavailable")), "{denied:?}");
    for gw in [&local, &deny] {
        let m = metrics_of(&gw.url()).await;
        assert_eq!(metric_value(&m, "llm_gateway_cluster_shared"), 0.0);
        assert!(metric_value(&m, "llm_gateway_cluster_fallback_total") >= 2.0, "counted");
    }

    let _back = restart_redis(port);
    for gw in [&local, &deny] {
        let url = gw.url();
        wait_for("sharing to resume", Duration::from_secs(10), || {
            let url = url.clone();
            async move { metric_value(&metrics_of(&url).await, "llm_gateway_cluster_shared") == 1.0 }
        })
        .await;
        assert_eq!(post_chat(&url, false).await.status(), 200, "served through Redis again");
    }
}

/// What one replica learns of a worker's capacity, every replica sharing Redis holds it to.
#[tokio::test]
async fn replicas_agree_on_learned_capacity() {
    let redis_server = RedisServer::start();
    let sims = small_sims(1, 4).await;
    let shared = || {
        let mut cfg = replica_config(&sims, 0);
        cfg.cluster.backend = llm_gateway::config::ClusterBackend::Redis;
        cfg.cluster.redis_url = redis_server.url();
        cfg
    };
    let (a, b) = (gateway(shared()).await, gateway(shared()).await);
    let learned = |gw: &llm_gateway::Gateway| {
        gw.state.snapshot.load().fleet.workers[0].stats.learned_capacity.load(Ordering::Relaxed)
    };
    a.state.snapshot.load().fleet.workers[0].stats.learned_capacity.fetch_max(3, Ordering::Relaxed);
    wait_for("the other replica to learn it", Duration::from_secs(5), || async { learned(&b) == 3 }).await;
    assert_eq!(learned(&a), 3);
}

/// A config for an in-process replica in front of `sims` sharing through `redis`, routing with `p2c_kv`.
fn redis_replica(sims: &[vllm_sim::SimHandle], redis: &str) -> llm_gateway::Config {
    let mut cfg = replica_config(sims, 0);
    cfg.cluster.backend = llm_gateway::config::ClusterBackend::Redis;
    cfg.cluster.redis_url = redis.to_string();
    cfg.routing.strategy = routing::Strategy::P2cKv;
    cfg
}

/// Waits until `n` connections listen on `channel` (the replicas' subscriptions are up), so nothing
/// told before is lost.
async fn subscribed(conn: &mut redis::aio::MultiplexedConnection, channel: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, count): (String, usize) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(conn).await.unwrap();
        if count >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {count} of {n} subscriptions to {channel}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Twelve conversations with long distinct system prompts, each turn sent to the next of `replicas`:
/// the worker that served each turn, per conversation.
async fn converse(replicas: &[llm_gateway::Gateway]) -> Vec<Vec<String>> {
    let c = client();
    let mut out = Vec::new();
    for conv in 0..12 {
        let topic = format!("You are assistant number {conv}. ");
        let system = topic.repeat(3000 / topic.len());
        let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
        let mut served = Vec::new();
        for turn in 0..4 {
            messages.push(serde_json::json!({"role": "user", "content": format!("question {turn} of {conv}")}));
            let gw = &replicas[(conv + turn) % replicas.len()];
            let body = serde_json::json!({"model": "demo-model", "messages": messages, "max_tokens": 8});
            let resp = c.post(format!("{}/v1/chat/completions", gw.url())).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            served.push(resp.headers()["x-gateway-worker"].to_str().unwrap().to_string());
            let answer: serde_json::Value = resp.json().await.unwrap();
            let content = answer["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
            messages.push(serde_json::json!({"role": "assistant", "content": content}));
        }
        out.push(served);
    }
    out
}

/// Each turn of a conversation sent to the next of three replicas lands on the worker that served its
/// first, because each replica tells the others where it sent each prompt (dispatch records). With the
/// records off, the same conversations move: a turn reaching another replica finds no holder there and
/// lands on a random worker (all 36 follow-ups staying put by chance: 4^-36), which shows the first
/// assertion is not vacuous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_stays_on_one_worker_whichever_replica_gets_each_turn() {
    let redis_server = RedisServer::start();
    let mut conn = redis::Client::open(redis_server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let sims = sims(4, |_| fast_sim()).await;
    for share in [true, false] {
        let _ = redis::cmd("FLUSHALL").query_async::<String>(&mut conn).await;
        let mut replicas = Vec::new();
        for _ in 0..3 {
            let mut cfg = redis_replica(&sims, &redis_server.url());
            cfg.cluster.share_dispatches = share;
            replicas.push(gateway(cfg).await);
        }
        subscribed(&mut conn, "llmgw:affinity:dispatched", 3).await;
        let conversations = converse(&replicas).await;
        let stayed = |served: &Vec<String>| served.iter().all(|w| *w == served[0]);
        if share {
            for (i, served) in conversations.iter().enumerate() {
                assert!(stayed(served), "conversation {i} moved between workers: {served:?}");
            }
            let mut placed = std::collections::BTreeMap::<&str, usize>::new();
            for served in &conversations {
                *placed.entry(served[0].as_str()).or_default() += 1;
            }
            eprintln!("conversations per worker: {placed:?}");
            assert!(placed.len() >= 2, "new conversations are spread (p2c), not all on one worker: {placed:?}");
        } else {
            let moved = conversations.iter().filter(|s| !stayed(s)).count();
            eprintln!("without dispatch records {moved} of 12 conversations moved");
            assert!(moved > 0, "without dispatch records turns land anywhere: {conversations:?}");
        }
        for gw in replicas {
            gw.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// The breaker list of the gateway at `url`: worker `i`'s breaker JSON.
async fn breaker_of(url: &str, i: usize) -> serde_json::Value {
    let stats: serde_json::Value =
        client().get(format!("{url}/api/circuit-breaker/stats")).send().await.unwrap().json().await.unwrap();
    stats[i]["breaker"].clone()
}

/// A worker that fails opens the breaker of the replica that sent to it; the other replica opens its
/// own on hearing it, without a failure of its own and without sending the worker anything, and a
/// replica started while the opening lasts learns it from Redis. The opening is told once: hearing it
/// tells no one. An operator's reset on any replica closes every replica's breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_replica_opens_on_the_others() {
    let redis_server = RedisServer::start();
    let mut conn = redis::Client::open(redis_server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let sims = sims(2, |_| fast_sim()).await;
    sims[1].set_faults(vllm_sim::Faults { error_rate: 1.0, ..vllm_sim::Faults::default() });
    let config = || {
        let mut cfg = redis_replica(&sims, &redis_server.url());
        cfg.routing.strategy = routing::Strategy::RoundRobin;
        cfg.circuit_breaker.timeout_seconds = 60;
        cfg.retry.base_ms = 1;
        cfg.retry.max_ms = 5;
        cfg
    };
    let (a, b) = (gateway(config()).await, gateway(config()).await);
    subscribed(&mut conn, "llmgw:breaker:opened", 2).await;

    let url = format!("{}/v1/chat/completions", a.url());
    for _ in 0..20 {
        // Half go to the failing worker first and are retried on the other: every one succeeds.
        let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        if breaker_state(&a.url(), 1).await == "open" {
            break;
        }
    }
    assert_eq!(breaker_state(&a.url(), 1).await, "open", "the replica sending to the failing worker opened");

    let b_url = b.url();
    wait_for("the other replica to open its breaker", Duration::from_secs(5), || {
        let b_url = b_url.clone();
        async move { breaker_state(&b_url, 1).await == "open" }
    })
    .await;
    let key = format!("llmgw:breaker:{}", sims[1].url().trim_end_matches('/'));
    let told: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    let heard = breaker_of(&b.url(), 1).await;
    assert_eq!(heard["counters"]["failures"], 0, "opened without failing there: {heard}");
    assert!(heard["retry_after_ms"].as_u64().unwrap() > 50_000, "open for the time left: {heard}");
    for _ in 0..10 {
        assert_eq!(post_chat(&b.url(), false).await.status(), 200);
    }
    let heard = breaker_of(&b.url(), 1).await;
    assert_eq!(heard["counters"]["failures"], 0, "it sent the failing worker nothing: {heard}");
    let sent = metrics_of(&b.url()).await;
    let to_failing =
        sent.lines().filter(|l| l.starts_with("llm_gateway_upstream_outcomes_total") && l.contains("\"sim-1\""));
    assert_eq!(to_failing.count(), 0, "no outcome at the failing worker");

    let late = gateway(config()).await;
    let late_url = late.url();
    wait_for("a replica started meanwhile to learn the opening", Duration::from_secs(5), || {
        let late_url = late_url.clone();
        async move { breaker_state(&late_url, 1).await == "open" }
    })
    .await;
    assert_eq!(breaker_of(&late.url(), 1).await["counters"]["failures"], 0);
    let still: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(still, told, "hearing an opening tells no one (no echo)");
    assert_eq!(breaker_of(&a.url(), 1).await["counters"]["opens"], 1);

    // The worker is mended and an operator resets its breaker on one replica (not the one that
    // opened it): every replica closes its own, and the opening ends for replicas yet to start.
    subscribed(&mut conn, "llmgw:breaker:reset", 3).await;
    sims[1].set_faults(vllm_sim::Faults::default());
    let reset = format!("{}/api/circuit-breaker/sim-1/reset", b.url());
    let resp = client().post(&reset).header("content-type", "application/json").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(breaker_state(&b.url(), 1).await, "closed");
    for url in [a.url(), late.url()] {
        wait_for("every other replica to close its breaker", Duration::from_secs(5), || {
            let url = url.clone();
            async move { breaker_state(&url, 1).await == "closed" }
        })
        .await;
    }
    let left: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(left, None, "the opening is over");
    let resp = client().post(&url).json(&chat("demo-model", "hi", false)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}
