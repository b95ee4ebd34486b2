//! Subcommands that read or steer a running gateway through its admin API, and their text rendering.

use super::Remote;
use crate::error::error_chain;
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::time::Duration;

/// A JSON call to the gateway at `remote`: the body on 2xx, else one line with the status and the
/// gateway's error message.
async fn call(remote: &Remote, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let url = format!("{}{path}", remote.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let mut req = client.request(method.clone(), &url);
    if let Some(token) = &remote.admin_token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    } else if method != reqwest::Method::GET {
        // The gateway takes admin changes only as JSON (its guard against cross-site forms).
        req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
    }
    let resp = req.send().await.map_err(|e| format!("cannot reach {url}: {}", error_chain(&e)))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| format!("{url}: reading the answer: {e}"))?;
    let json: Option<Value> = serde_json::from_str(&text).ok();
    if !status.is_success() {
        let msg = json
            .as_ref()
            .and_then(|j| j["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(200).collect());
        return Err(format!("{url}: HTTP {}: {msg}", status.as_u16()));
    }
    json.ok_or_else(|| format!("{url}: the answer is not JSON"))
}

/// `health`: prints `/health` and fails when the gateway is not healthy.
pub async fn health(remote: &Remote) -> Result<(), String> {
    let body = call(remote, reqwest::Method::GET, "/health", None).await?;
    println!("{body}");
    Ok(())
}

/// `status`.
pub async fn status(remote: &Remote) -> Result<(), String> {
    let s = call(remote, reqwest::Method::GET, "/api/status", None).await?;
    print!("{}", render_status(&remote.url, &s));
    Ok(())
}

/// `workers`.
pub async fn workers(remote: &Remote) -> Result<(), String> {
    let w = call(remote, reqwest::Method::GET, "/api/workers", None).await?;
    print!("{}", render_workers(&w));
    Ok(())
}

/// `watch`: status and workers, redrawn every `interval` seconds until Ctrl-C. A failed refresh is
/// shown and retried; the command ends only on Ctrl-C.
pub async fn watch(remote: &Remote, interval: f64) -> Result<(), String> {
    let every = Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        let status = call(remote, reqwest::Method::GET, "/api/status", None).await;
        let workers = call(remote, reqwest::Method::GET, "/api/workers", None).await;
        let mut screen = String::from("\x1b[2J\x1b[H");
        match (status, workers) {
            (Ok(s), Ok(w)) => {
                screen.push_str(&render_status(&remote.url, &s));
                screen.push('\n');
                screen.push_str(&render_workers(&w));
            }
            (Err(e), _) | (_, Err(e)) => {
                let _ = writeln!(screen, "{e}");
            }
        }
        let _ = writeln!(screen, "\nrefreshing every {:.1}s; Ctrl-C to quit", every.as_secs_f64());
        print!("{screen}");
    }
}

/// `drain ID` / `undrain ID`.
pub async fn drain(remote: &Remote, id: &str, on: bool) -> Result<(), String> {
    let action = if on { "drain" } else { "undrain" };
    let path = format!("/api/workers/{}/{action}", encode_path(id));
    let w = call(remote, reqwest::Method::POST, &path, None).await?;
    let name = w["name"].as_str().unwrap_or(id);
    if on {
        println!("{name}: draining ({} in flight will finish; no new requests)", w["in_flight"]);
    } else {
        println!("{name}: taking new requests again");
    }
    Ok(())
}

/// `config [--set KEY=VALUE ...]`: prints the running config, or patches it.
pub async fn config(remote: &Remote, sets: &[String]) -> Result<(), String> {
    if sets.is_empty() {
        let c = call(remote, reqwest::Method::GET, "/api/config", None).await?;
        println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
        return Ok(());
    }
    let patch = build_patch(sets)?;
    let new = call(remote, reqwest::Method::PATCH, "/api/config", Some(&patch)).await?;
    for set in sets {
        let key = set.split_once('=').map_or(set.as_str(), |(k, _)| k.trim());
        let value = key.split('.').try_fold(&new, |v, part| v.get(part));
        match value {
            Some(v) => println!("{key} = {v}"),
            None => println!("{key} set"),
        }
    }
    Ok(())
}

/// A JSON merge patch from `key.path=value` pairs; each value is read as JSON when it parses, else as a
/// string (`routing.strategy=p2c_kv`, `health.interval_ms=500`, `admin.token=null` to unset).
pub fn build_patch(sets: &[String]) -> Result<Value, String> {
    let mut root = Map::new();
    for set in sets {
        let (key, raw) = set.split_once('=').ok_or_else(|| format!("--set {set:?}: expected KEY=VALUE"))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("--set {set:?}: the key must be a dotted path such as routing.strategy"));
        }
        let value = serde_json::from_str::<Value>(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        let mut map = &mut root;
        for part in &parts[..parts.len() - 1] {
            let child = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                return Err(format!("--set {set:?}: {part} is set to a value and used as a section"));
            }
            map = match child {
                Value::Object(m) => m,
                _ => return Err(format!("--set {set:?}: {part} is not a section")),
            };
        }
        map.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(Value::Object(root))
}

/// Percent-encodes a worker id for a path segment (names may hold `:`; keep it readable otherwise).
fn encode_path(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `status` as text.
pub fn render_status(url: &str, s: &Value) -> String {
    let mut out = String::new();
    let uptime = s["uptime_secs"].as_u64().unwrap_or(0);
    let _ =
        writeln!(out, "llm-gateway {} at {url}, up {}", s["version"].as_str().unwrap_or("?"), human_duration(uptime));
    let _ = writeln!(out, "strategy  {}", s["strategy"].as_str().unwrap_or("?"));
    let w = &s["workers"];
    let _ = writeln!(out, "workers   {} total, {} healthy, {} draining", w["total"], w["healthy"], w["draining"]);
    let r = &s["requests"];
    let _ = writeln!(
        out,
        "requests  {} total, {} active, {:.1} req/s",
        r["total"],
        r["active"],
        s["qps"].as_f64().unwrap_or(0.0)
    );
    out
}

fn human_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `workers` as an aligned table.
pub fn render_workers(workers: &Value) -> String {
    let header = ["ID", "NAME", "URL", "STATE", "INFL", "RUN", "WAIT", "KV%", "TTFT", "TPOT", "ERR%", "REQS", "MODELS"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for w in workers.as_array().map(Vec::as_slice).unwrap_or_default() {
        let state = match (w["healthy"].as_bool(), w["draining"].as_bool()) {
            (_, Some(true)) => "draining",
            (Some(true), _) => "healthy",
            _ => "down",
        };
        let num = |k: &str| w[k].as_f64().unwrap_or(0.0);
        let ms = |k: &str| if num(k) > 0.0 { format!("{:.0}ms", num(k)) } else { "-".into() };
        let models: Vec<&str> =
            w["models"].as_array().map(|m| m.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        rows.push(vec![
            w["id"].to_string(),
            w["name"].as_str().unwrap_or("?").to_string(),
            w["url"].as_str().unwrap_or("?").to_string(),
            state.to_string(),
            w["in_flight"].to_string(),
            w["running"].to_string(),
            w["waiting"].to_string(),
            format!("{:.0}", num("kv_usage") * 100.0),
            ms("ttft_ms"),
            ms("tpot_ms"),
            format!("{:.1}", num("error_rate") * 100.0),
            w["requests_total"].to_string(),
            if models.is_empty() { "-".into() } else { models.join(",") },
        ]);
    }
    table(&rows)
}

/// Left-aligned columns separated by two spaces (the last column is not padded).
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_pairs_become_a_merge_patch() {
        let sets = ["routing.strategy=p2c_kv", "health.interval_ms=500", "routing.p2c.w_kv=1.5", "admin.token=null"];
        let patch = build_patch(&sets.map(String::from)).unwrap();
        assert_eq!(
            patch,
            json!({"routing": {"strategy": "p2c_kv", "p2c": {"w_kv": 1.5}}, "health": {"interval_ms": 500},
                   "admin": {"token": null}})
        );
        assert!(build_patch(&["nokey".to_string()]).is_err());
        assert!(build_patch(&["a..b=1".to_string()]).is_err());
        assert!(build_patch(&["a=1".to_string(), "a.b=2".to_string()]).is_err());
    }

    #[test]
    fn tables_align() {
        let t = table(&[vec!["A".into(), "BB".into(), "C".into()], vec!["long".into(), "x".into(), "y".into()]]);
        assert_eq!(t, "A     BB  C\nlong  x   y\n");
    }
}
