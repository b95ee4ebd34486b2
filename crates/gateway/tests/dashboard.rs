//! The dashboard over real HTTP: the embedded page and its assets, and the `/ws` snapshot stream (a
//! minimal WebSocket client on a raw socket: the handshake, then server frames, which are unmasked).

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn page_and_assets_are_served() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let c = client();
    let resp = c.get(gw.url()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = resp.text().await.unwrap();
    assert!(html.contains("<title>llm-gateway dashboard</title>"), "{html}");
    for (path, kind) in [("/dashboard/app.js", "text/javascript"), ("/dashboard/app.css", "text/css")] {
        let resp = c.get(format!("{}{path}", gw.url())).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        assert!(html.contains(path), "the page links {path}");
    }
    // Offline: nothing is loaded from another host.
    for asset in [html, c.get(format!("{}/dashboard/app.js", gw.url())).send().await.unwrap().text().await.unwrap()] {
        assert!(!asset.contains("https://") && !asset.contains("http://"), "an external resource");
    }
    gw.shutdown(Duration::from_secs(5)).await;
}

/// A WebSocket client good enough for a test: text frames from the server, nothing sent after the
/// handshake.
struct Ws {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    async fn connect(addr: std::net::SocketAddr, path: &str) -> Ws {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.expect("send the handshake");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        // The accept key RFC 6455 gives for this sample nonce.
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
        buf.drain(..end);
        Ws { tcp, buf }
    }

    async fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            let mut chunk = [0u8; 16 * 1024];
            let got = self.tcp.read(&mut chunk).await.expect("read");
            assert!(got > 0, "socket closed mid-frame");
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    /// The next text message (single-frame: the server sends whole messages).
    async fn text(&mut self) -> String {
        loop {
            self.fill(2).await;
            let (op, len7) = (self.buf[0] & 0x0f, (self.buf[1] & 0x7f) as usize);
            assert_eq!(self.buf[1] & 0x80, 0, "server frames are unmasked");
            let (len, head) = match len7 {
                126 => {
                    self.fill(4).await;
                    (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                }
                127 => {
                    self.fill(10).await;
                    (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize, 10)
                }
                n => (n, 2),
            };
            self.fill(head + len).await;
            let payload: Vec<u8> = self.buf.drain(..head + len).skip(head).collect();
            match op {
                0x1 => return String::from_utf8(payload).expect("utf-8 text"),
                0x8 => panic!("server closed the socket"),
                _ => continue, // ping, pong
            }
        }
    }
}

#[tokio::test]
async fn ws_pushes_snapshots_with_every_key() {
    let sims = sims(2, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let mut ws = Ws::connect(gw.addr(), "/ws").await;
    let first: Value =
        tokio::time::timeout(Duration::from_secs(5), ws.text()).await.expect("a snapshot at once").parse().unwrap();
    for key in ["status", "workers", "routing", "queue", "rate_limit", "series", "strategies"] {
        assert!(first.get(key).is_some(), "missing {key}: {first}");
    }
    for key in ["t", "qps", "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p99_ms"] {
        assert!(first["series"][key].is_array(), "series.{key}: {first}");
    }
    assert!(first["rate_limit"]["rejected"].is_object());
    let workers = first["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert_eq!(workers[0]["name"], "sim-0");
    assert_eq!(workers[0]["breaker"]["state"], "closed");
    assert!(workers[0]["draining"].is_boolean() && workers[0]["in_flight"].is_number());
    assert_eq!(first["strategies"].as_array().unwrap().len(), 7);
    assert_eq!(first["status"]["strategy"], first["routing"]["strategy"]);

    // Load flows: later snapshots show it, and the sampler adds a point a second.
    let c = client();
    for i in 0..20 {
        let resp = c
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat("demo-model", &format!("hi {i}"), i % 2 == 0))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snap: Value = tokio::time::timeout(Duration::from_secs(3), ws.text())
            .await
            .expect("a snapshot a second")
            .parse()
            .unwrap();
        let total = snap["status"]["requests"]["total"].as_u64().unwrap_or(0);
        let points = snap["series"]["t"].as_array().map_or(0, Vec::len);
        let qps_seen = snap["series"]["qps"].as_array().is_some_and(|q| q.iter().any(|v| v.as_f64() > Some(0.0)));
        let latency_seen = snap["series"]["latency_p50_ms"].as_array().is_some_and(|q| q.iter().any(Value::is_number));
        if total >= 20 && points >= 1 && qps_seen && latency_seen {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "series never showed the load: {snap}");
    }
    drop(ws);
    // Shutdown ends the socket tasks and the sampler: the server stops within the grace.
    assert!(gw.shutdown(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn ws_ends_on_shutdown() {
    let sims = sims(1, |_| fast_sim()).await;
    let gw = gateway(test_config(worker_configs(&sims))).await;
    let mut ws = Ws::connect(gw.addr(), "/ws").await;
    let _ = ws.text().await;
    gw.state.shutdown.cancel();
    // The server closes the socket: a close frame, then end of stream.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            ws.fill(2).await;
            if ws.buf[0] & 0x0f == 0x8 {
                return;
            }
            let _ = ws.text().await;
        }
    })
    .await;
    assert!(closed.is_ok(), "socket still open after shutdown");
}
