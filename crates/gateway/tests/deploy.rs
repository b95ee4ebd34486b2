//! The deployment files hold together with the code: the Grafana dashboard queries only metrics the
//! gateway (or a vLLM worker) exports, every config example loads, the Dockerfile builds every workspace
//! crate, and Debian's real `prometheus` scrapes a gateway and its workers with the repo's scrape config.
//!
//! The Prometheus test is `#[ignore]`d so `cargo test --workspace` runs without the binary;
//! `scripts/check-deploy.sh` installs it and runs `cargo test -p llm-gateway --test deploy -- --include-ignored`.

mod common;

use llm_gateway::config::Overrides;
use llm_gateway::Config;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const DASHBOARD: &str = "docker/grafana/dashboards/llm-gateway.json";

/// Config examples written ahead of the config sections they use, and what they wait on: until those
/// land, loading them fails, and the failure says why. Empty: `[auth]`, `[rate_limit]` and `[queue]` landed.
const WAITING_ON: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------------------
// PromQL metric names

/// PromQL words that are not metric names (aggregation modifiers, set and comparison operators).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Index just past the quoted string starting at `i` (backslash escapes honoured).
fn skip_quoted(s: &[char], mut i: usize) -> usize {
    let quote = s[i];
    i += 1;
    while i < s.len() && s[i] != quote {
        i += if s[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// Index just past the `close` that ends the group opened at `i`, skipping quoted strings inside.
fn skip_group(s: &[char], mut i: usize, close: char) -> usize {
    i += 1;
    while i < s.len() && s[i] != close {
        i = if matches!(s[i], '"' | '\'' | '`') { skip_quoted(s, i) } else { i + 1 };
    }
    i + 1
}

/// The metric names a PromQL expression selects: identifiers outside label matchers, ranges, strings and
/// grouping lists that are neither keywords nor function calls. Grafana variables (`$__rate_interval`)
/// are skipped.
fn metric_names(expr: &str) -> Vec<String> {
    let s: Vec<char> = expr.chars().collect();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut labels_next = false;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_quoted(&s, i);
        } else if c == '{' {
            i = skip_group(&s, i, '}');
        } else if c == '[' {
            i = skip_group(&s, i, ']');
        } else if c == '(' && labels_next {
            labels_next = false;
            i = skip_group(&s, i, ')');
        } else if c == '$' {
            i += 1;
            while i < s.len() && is_ident(s[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number: 0.95, 1e-9, 5m.
            i += 1;
            while i < s.len()
                && (s[i].is_ascii_alphanumeric() || s[i] == '.' || (matches!(s[i], '-' | '+') && s[i - 1] == 'e'))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && is_ident(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            // What follows: `(` makes it a function, `by`/`without` an aggregation (`sum by (x) (...)`).
            let rest: String = s[i..].iter().collect::<String>().trim_start().to_ascii_lowercase();
            let aggregation =
                ["by", "without"].iter().any(|k| rest.strip_prefix(k).is_some_and(|r| r.trim_start().starts_with('(')));
            let lower = word.to_ascii_lowercase();
            if KEYWORDS.contains(&lower.as_str()) {
                labels_next = GROUPING.contains(&lower.as_str());
            } else if !rest.starts_with('(') && !aggregation {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` string anywhere in a JSON document.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn promql_metric_names_are_extracted() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le, model) (rate(llm_gateway_request_latency_seconds_bucket{model!~"a}b"}[$__rate_interval])))"#
        ),
        ["llm_gateway_request_latency_seconds_bucket"]
    );
    assert_eq!(
        metric_names("sum(rate(a_total{status=~\"5..\"}[5m])) / clamp_min(sum without (x) (rate(b_total[1m])), 1e-9)"),
        ["a_total", "b_total"]
    );
    assert_eq!(metric_names("sum by (instance) (vllm:num_requests_running) > bool 0"), ["vllm:num_requests_running"]);
    assert_eq!(metric_names("up offset 5m"), ["up"]);
}

/// Every metric the dashboard queries is one the gateway exports (histogram series named by their family
/// plus `_bucket`/`_sum`/`_count`) or a vLLM worker's own `vllm:*` metric; and it covers each area.
#[test]
fn grafana_dashboard_queries_exported_metrics() {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON parses");
    assert_eq!(dash["uid"], "llm-gateway");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 20, "expected a real dashboard, found {} queries", all.len());

    let metrics = llm_gateway::metrics::Metrics::new().expect("metrics register");
    let names = metrics.names();
    let family = |n: &str| -> Option<String> {
        if names.iter().any(|x| x == n) {
            return Some(n.to_string());
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| n.strip_suffix(suffix))
            .find(|base| names.iter().any(|x| x == base))
            .map(str::to_string)
    };
    let mut used = std::collections::BTreeSet::new();
    let mut unknown = Vec::new();
    for e in &all {
        let found = metric_names(e);
        assert!(!found.is_empty(), "query names no metric: {e}");
        for n in found {
            if n.starts_with("vllm:") {
                continue;
            }
            match family(&n) {
                Some(f) => {
                    used.insert(f);
                }
                None => unknown.push(format!("{n} (in {e})")),
            }
        }
    }
    assert!(unknown.is_empty(), "the dashboard queries metrics the gateway does not export:\n{}", unknown.join("\n"));
    for area in [
        "llm_gateway_requests_total",
        "llm_gateway_request_latency_seconds",
        "llm_gateway_time_to_first_token_seconds",
        "llm_gateway_queue_length",
        "llm_gateway_healthy_workers",
        "llm_worker_in_flight_requests",
        "llm_circuit_breaker_state",
        "llm_rate_limiter_rejected_total",
    ] {
        assert!(used.contains(area), "the dashboard shows nothing of {area}");
    }

    // Every panel queries the provisioned datasource.
    let ds = read("docker/grafana/provisioning/datasources/prometheus.yml");
    assert!(ds.contains("uid: prometheus"), "datasource uid");
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "prometheus", "panel {}", p["title"]);
        }
    }
}

/// `(expr, legendFormat)` of every query target anywhere in a JSON document.
fn targets(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(e)) = m.get("expr") {
                out.push((e.clone(), m.get("legendFormat").and_then(Value::as_str).unwrap_or("").to_string()));
            }
            m.values().for_each(|v| targets(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| targets(v, out)),
        _ => {}
    }
}

/// The label names inside every `by (...)` of a query.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by (") {
        let after = &rest[i + 4..];
        let end = after.find(')').unwrap_or(after.len());
        out.extend(after[..end].split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
        rest = &after[end..];
    }
    out
}

/// Every label the dashboard groups by or shows in a legend is one the queried gateway metrics carry (or
/// one Prometheus adds): a renamed label (worker metrics moved from `url` to `worker`) cannot leave a
/// panel silently empty.
#[test]
fn grafana_dashboard_groups_by_exported_labels() {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON parses");
    let metrics = llm_gateway::metrics::Metrics::new().expect("metrics register");
    let mut all = Vec::new();
    targets(&dash, &mut all);
    assert!(all.len() >= 20, "expected the dashboard's queries, found {}", all.len());
    assert_eq!(grouping_labels("sum by (worker, to) (x) / sum by (le) (y)"), ["worker", "to", "le"]);
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (expr, legend) in &all {
        let names = metric_names(expr);
        if names.iter().any(|n| n.starts_with("vllm:")) {
            continue; // a worker's own metrics: their labels are vLLM's
        }
        let mut known: Vec<String> = ["le", "instance", "job"].map(String::from).to_vec();
        for n in &names {
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n);
            known.extend(metrics.labels(n).or(metrics.labels(family)).unwrap_or_default().iter().cloned());
        }
        let legend_labels = legend.split("{{").skip(1).filter_map(|p| p.split_once("}}")).map(|(l, _)| l.trim());
        for label in grouping_labels(expr).iter().map(String::as_str).chain(legend_labels) {
            checked += 1;
            if !known.iter().any(|k| k == label) {
                wrong.push(format!("{label} (in {expr} / {legend:?})"));
            }
        }
    }
    assert!(checked >= 10, "expected grouped queries, checked {checked} labels");
    assert!(wrong.is_empty(), "the dashboard uses labels its metrics do not carry:\n{}", wrong.join("\n"));
}

#[test]
fn config_examples_load() {
    let dir = root().join("config/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/examples")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let file_names: Vec<String> =
        files.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    for (f, _) in WAITING_ON {
        assert!(file_names.iter().any(|n| n == f), "WAITING_ON names {f}, which config/examples lacks");
    }
    for want in ["heterogeneous-fleet.toml", "api-keys.toml", "redis-shared.toml"] {
        assert!(file_names.iter().any(|n| n == want), "config/examples/{want} is missing");
    }
    files.push(root().join("config/gateway.toml"));
    files.push(root().join("deploy/kubernetes/gateway.toml"));

    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        match Config::load_from(Some(path), &Overrides::default(), std::iter::empty()) {
            Ok(cfg) => {
                if name == "heterogeneous-fleet.toml" {
                    assert_eq!(cfg.workers.len(), 4);
                    assert!(cfg.workers.iter().any(|w| w.weight > 1 && w.max_concurrency > 0 && !w.models.is_empty()));
                }
            }
            Err(e) => {
                let waiting = WAITING_ON.iter().find(|(f, _)| *f == name).map(|(_, why)| *why);
                failures.push(match waiting {
                    Some(why) => format!("{name}: {e} (this example waits on {why})"),
                    None => format!("{name}: {e}"),
                });
            }
        }
    }
    assert!(failures.is_empty(), "config examples that do not load:\n{}", failures.join("\n"));
}

/// The Dockerfile's dependency layer copies every workspace member's manifest (a new crate must be added
/// there, or the image build fails on the workspace).
#[test]
fn dockerfile_copies_every_workspace_manifest() {
    use figment::providers::{Format, Toml};
    let ws: Value =
        figment::Figment::from(Toml::file(root().join("Cargo.toml"))).extract().expect("root Cargo.toml parses");
    let members = ws["workspace"]["members"].as_array().expect("workspace.members");
    let dockerfile = read("Dockerfile");
    for m in members {
        let m = m.as_str().expect("member path");
        assert!(dockerfile.contains(&format!("COPY {m}/Cargo.toml {m}/")), "Dockerfile does not copy {m}/Cargo.toml");
    }
    assert!(dockerfile.contains("HEALTHCHECK"), "HEALTHCHECK");
    assert!(dockerfile.contains("EXPOSE 9000"), "EXPOSE 9000");
    assert!(dockerfile.contains("\nUSER "), "non-root USER");
}

// ---------------------------------------------------------------------------------------------------
// Real Prometheus

/// `prometheus` from `PROMETHEUS_BIN` or `PATH`; a clear failure when absent (never a silent skip).
fn prometheus_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS_BIN") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the `prometheus` binary is not installed: `apt-get install prometheus` (Debian's package; \
                 scripts/check-deploy.sh does it) or set PROMETHEUS_BIN"
            )
        })
}

/// A running Prometheus and its scratch directory; killed and removed on drop.
struct Prometheus {
    server: common::ExternalServer,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.server.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The repo's prometheus.yml with its compose targets rewritten to `gateway` and `sims`, scraping every
/// second.
fn scrape_config(gateway: &str, sims: &[String]) -> String {
    let mut cfg = read("prometheus.yml");
    let mut swap = |from: &str, to: &str| {
        assert!(cfg.contains(from), "prometheus.yml no longer holds {from:?}; update tests/deploy.rs");
        cfg = cfg.replace(from, to);
    };
    swap("scrape_interval: 5s", "scrape_interval: 1s");
    swap("\"gateway:9000\"", &format!("\"{gateway}\""));
    for (i, sim) in sims.iter().enumerate() {
        swap(&format!("\"sim-{i}:8000\""), &format!("\"{sim}\""));
    }
    assert!(!cfg.contains("\"sim-"), "prometheus.yml has more sims than the test starts");
    cfg
}

fn start_prometheus(config: &str) -> Prometheus {
    let dir = common::temp_path("deploy");
    std::fs::create_dir_all(dir.join("data")).expect("temp dir");
    std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
    // Prometheus binds its own port: a free one, retried if taken meanwhile.
    let command = |port: u16| {
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let mut cmd = std::process::Command::new(prometheus_binary());
        cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        cmd
    };
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let server = common::start_on_free_port("prometheus", command, listening);
    let url = format!("http://127.0.0.1:{}", server.port);
    Prometheus { server, dir, url }
}

/// The instant vector of `query`, or `None` while Prometheus cannot answer.
async fn query(client: &reqwest::Client, prom: &str, q: &str) -> Option<Vec<Value>> {
    let resp = client.get(format!("{prom}/api/v1/query")).query(&[("query", q)]).send().await.ok()?;
    let body: Value = resp.json().await.ok()?;
    (body["status"] == "success").then(|| body["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The sum of the sample values of a vector.
fn total(v: &[Value]) -> f64 {
    v.iter().filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok()).sum()
}

/// Debian's `prometheus` with the repo's scrape config (targets rewritten to loopback) scrapes the
/// gateway's and the workers' metrics; checked through Prometheus's HTTP query API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's prometheus binary; run by scripts/check-deploy.sh"]
async fn prometheus_scrapes_gateway_and_workers() {
    let _ = prometheus_binary();
    let sim_cfg = vllm_sim::SimConfig {
        ttft_ms: 1.0,
        itl_ms: 1.0,
        prefill_ms_per_1k_tokens: 0.0,
        output_tokens: (4, 8),
        ..vllm_sim::SimConfig::default()
    };
    let mut sims = Vec::new();
    for _ in 0..3 {
        sims.push(vllm_sim::start(sim_cfg.clone()).await.expect("sim starts"));
    }
    let workers = sims.iter().map(|s| llm_gateway::config::WorkerConfig::from_url(s.url())).collect();
    let mut cfg = Config { workers, ..Config::default() };
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.health.interval_ms = 100;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = llm_gateway::Gateway::serve(listener, cfg).await.expect("gateway starts");

    let sim_addrs: Vec<String> = sims.iter().map(|s| s.url().trim_start_matches("http://").to_string()).collect();
    let prom = start_prometheus(&scrape_config(&gw.addr().to_string(), &sim_addrs));

    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    const REQUESTS: usize = 6;
    for i in 0..REQUESTS {
        let body = serde_json::json!({
            "model": "demo-model",
            "stream": i % 2 == 1,
            "messages": [{"role": "user", "content": format!("hello {i}")}],
        });
        let resp =
            client.post(format!("{}/v1/chat/completions", gw.url())).json(&body).send().await.expect("request sent");
        assert_eq!(resp.status(), 200);
        resp.bytes().await.expect("whole answer");
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    loop {
        let requests = query(&client, &prom.url, "sum(llm_gateway_requests_total)").await;
        let running = query(&client, &prom.url, "vllm:num_requests_running").await;
        let up = query(&client, &prom.url, "up == 1").await;
        let latency = query(&client, &prom.url, "sum(llm_gateway_request_latency_seconds_count)").await;
        let healthy = query(&client, &prom.url, "llm_gateway_healthy_workers").await;
        let done = match (&requests, &running, &up, &latency, &healthy) {
            (Some(r), Some(run), Some(up), Some(l), Some(h)) => {
                total(r) >= REQUESTS as f64
                    && run.len() == sims.len()
                    && up.len() == sims.len() + 1
                    && total(l) >= REQUESTS as f64
                    && total(h) == sims.len() as f64
            }
            _ => false,
        };
        if done {
            break;
        }
        last = format!(
            "requests_total={:?} vllm:num_requests_running={:?} up={:?} latency_count={:?} healthy={:?}",
            requests.as_deref().map(total),
            running.as_ref().map(Vec::len),
            up.as_ref().map(Vec::len),
            latency.as_deref().map(total),
            healthy.as_deref().map(total),
        );
        if tokio::time::Instant::now() >= deadline {
            let targets = match client.get(format!("{}/api/v1/targets", prom.url)).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            panic!("metrics did not arrive in Prometheus: {last}\ntargets: {targets}\nlog:\n{}", prom.log());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Worker metrics carry their target, so dashboards can tell workers apart.
    let running = query(&client, &prom.url, "vllm:num_requests_running").await.unwrap_or_default();
    let instances: std::collections::BTreeSet<&str> =
        running.iter().filter_map(|s| s["metric"]["instance"].as_str()).collect();
    assert_eq!(instances, sim_addrs.iter().map(String::as_str).collect(), "{last}");
    drop(prom);
}
