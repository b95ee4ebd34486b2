//! A worker's keep-alive HTTP/1.1 connections, each owned and driven by the request using it.
//!
//! hyper-util's pooled client costs, per request, a pool lookup keyed by origin, a race between the
//! checkout and a lazy connect, and a task spawned to wait until the connection is idle again (about a
//! tenth of the gateway's instructions per request, see BENCHMARKS.md). Here a worker keeps its idle
//! connections in a short list per serving runtime ([`crate::runtimes`]; a socket is watched by the
//! reactor of the runtime that opened it): a request takes its runtime's most recently used one (or
//! opens one), sends on it, and its response body puts it back when the body has been read to its end.
//! A body dropped earlier (the client went away, the relay gave up) drops the connection with it, so a
//! half-read response never reaches the next request.
//!
//! No task runs a connection: the request's own task polls it (hyper's connection future) while it
//! waits for the answer's head, and the response body polls it before each read. So a request's bytes
//! go from the worker's socket to the client's without a hand-off between tasks (each costs a wake-up
//! and a trip through a channel), and an idle connection costs a socket and its buffers, no task.
//!
//! An idle connection is polled once at checkout: one the worker closed ends there and is skipped; one
//! it closes while the request is handed over fails with the request unsent
//! ([`hyper::client::conn::TrySendError`]), and the request goes out on the next connection. A request
//! that was written is never sent twice here: whether to retry it elsewhere is the dispatcher's decision.
//! A worker that closes an idle connection leaves its socket open here until the next checkout or the
//! idle timeout passes over it (at most [`MAX_IDLE`] per worker and serving runtime).

use super::Connector;
use crate::wakes::SelfWakes;
use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::future::{poll_fn, Future as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service as _;

/// Idle connections kept per worker and serving runtime; a connection given back beyond it is closed.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused (the worker may have forgotten it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Sender = SendRequest<Full<Bytes>>;
type Driver = http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>;

/// One HTTP/1.1 connection: the handle requests are sent through and the future that does its IO,
/// polled by whoever holds the connection.
#[derive(Debug)]
struct Connection {
    sender: Sender,
    /// `None` once it ended: dropping it fails what the connection still owed.
    driver: Option<Driver>,
    /// The waker the connection and what it feeds are polled with: their hand-overs to each other do
    /// not make the task poll again.
    wakes: SelfWakes,
    /// The serving runtime whose reactor its socket is registered with ([`crate::runtimes::shard`]):
    /// the idle list it goes back to.
    shard: usize,
}

/// Does the connection's pending IO; whether it is still open (not closed by the worker, not failed).
fn drive(driver: &mut Option<Driver>, cx: &mut Context<'_>) -> bool {
    let Some(conn) = driver else { return false };
    let Poll::Ready(ended) = Pin::new(conn).poll(cx) else { return true };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "worker connection ended with an error");
    }
    *driver = None;
    false
}

impl Connection {
    /// Whether the connection can take a request: it is driven until its sender is ready, and cannot if
    /// it ended instead.
    async fn ready(&mut self) -> bool {
        let Self { sender, driver, wakes, .. } = self;
        // New to this request: polled whatever it was last (a connection is given back after a ready
        // poll, so this only guards against one that was not).
        wakes.arm();
        poll_fn(|cx| {
            wakes.poll(cx, |cx| {
                if drive(driver, cx) {
                    sender.poll_ready(cx).map(|r| r.is_ok())
                } else {
                    Poll::Ready(false)
                }
            })
        })
        .await
    }

    /// Waits for `answer` (to a request sent on this connection), driving the connection meanwhile: the
    /// connection first, so the answer it read is there when the answer is polled.
    async fn answer<F: std::future::Future>(&mut self, mut answer: Pin<&mut F>) -> F::Output {
        let Self { driver, wakes, .. } = self;
        poll_fn(|cx| {
            wakes.poll(cx, |cx| {
                drive(driver, cx);
                answer.as_mut().poll(cx)
            })
        })
        .await
    }
}

/// Where a worker's requests go: the address to connect to, its `Host`, the path its API lives under.
#[derive(Debug)]
struct Target {
    /// `http://host:port`, what the connector resolves and connects to.
    connect_to: Uri,
    host: HeaderValue,
    /// The base URL's path without its trailing slash (`""` for none): a request's path goes after it.
    base_path: String,
}

/// A list of idle connections, most recently used last.
type IdleList = Mutex<Vec<(Box<Connection>, Instant)>>;

/// One worker's idle connections, a list per serving runtime: a connection is used on the runtime
/// whose reactor watches its socket, so its readiness wakes the thread that is already there.
#[derive(Debug)]
pub struct WorkerConnections {
    target: Option<Target>,
    idle: Box<[IdleList]>,
}

/// Why a request could not be sent to the worker.
#[derive(Debug)]
pub struct SendError {
    connect: bool,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl SendError {
    /// The connection could not be made, so the worker saw nothing of the request.
    pub fn is_connect(&self) -> bool {
        self.connect
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.connect { "cannot connect" } else { "request failed" })
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl WorkerConnections {
    /// No connections yet to the worker at `base_url` (`http://host:port[/path]`). A URL that is not
    /// that fails each request with an error saying so.
    pub fn new(base_url: &str) -> Self {
        let target = base_url.parse::<Uri>().ok().and_then(|uri| {
            let authority: Authority = uri.authority()?.clone();
            let host = HeaderValue::from_str(authority.as_str()).ok()?;
            let connect_to = Uri::builder().scheme(uri.scheme()?.clone()).authority(authority).path_and_query("/");
            let base_path = uri.path().trim_end_matches('/').to_string();
            Some(Target { connect_to: connect_to.build().ok()?, host, base_path })
        });
        let idle = (0..crate::runtimes::shards()).map(|_| IdleList::default()).collect();
        Self { target, idle }
    }

    /// The request target for the client's `path`: the worker's base path, then `path`.
    pub fn request_uri(&self, path: Option<&PathAndQuery>) -> Result<Uri, String> {
        let target = self.target()?;
        match path {
            // No base path: the client's own, already parsed, is the target.
            Some(path) if target.base_path.is_empty() => Ok(Uri::from(path.clone())),
            _ => {
                let path = path.map_or("/", PathAndQuery::as_str);
                format!("{}{path}", target.base_path).parse().map_err(|e: http::uri::InvalidUri| e.to_string())
            }
        }
    }

    fn target(&self) -> Result<&Target, &'static str> {
        self.target.as_ref().ok_or("the worker's URL has no host")
    }

    /// Sends `req` (its URI in origin form, from [`Self::request_uri`]) on an idle connection, or on a
    /// new one made with `connector`, and returns the response whose body gives the connection back.
    pub async fn send(
        self: &Arc<Self>,
        connector: &Connector,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<WorkerBody>, SendError> {
        let target = self.target().map_err(|e| SendError { connect: true, source: e.into() })?;
        req.headers_mut().insert(HOST, target.host.clone());
        while let Some(mut conn) = self.checkout() {
            if !conn.ready().await {
                continue;
            }
            // Pinned here, not moved into `answer`: an argument would be stored in its future twice.
            // Handing the request over wakes the connection, which this task polls next anyway.
            let sent = std::pin::pin!(conn.wakes.stir(|| conn.sender.try_send_request(req)));
            match conn.answer(sent).await {
                Ok(resp) => return Ok(self.wrap(resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Closed under us before a byte was written: the next connection takes it.
                    Some(unsent) => req = unsent,
                    None => return Err(SendError { connect: false, source: e.into_error().into() }),
                },
            }
        }
        // Boxed: connecting is rare, and its futures would otherwise be part of every request's.
        let mut conn = Box::pin(connect(connector, target)).await?;
        let sent = std::pin::pin!(conn.wakes.stir(|| conn.sender.send_request(req)));
        let resp = conn.answer(sent).await.map_err(|e| SendError { connect: false, source: e.into() })?;
        Ok(self.wrap(resp, conn))
    }

    /// Idle connections held now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.iter().map(|list| list.lock().len()).sum()
    }

    fn wrap(self: &Arc<Self>, resp: http::Response<Incoming>, conn: Box<Connection>) -> http::Response<WorkerBody> {
        resp.map(|inner| {
            let mut body = WorkerBody { inner, conn: Some((conn, Arc::clone(self))) };
            body.give_back_if_ended();
            body
        })
    }

    /// The most recently used idle connection not too old (whether the worker closed it is found when
    /// it is driven, [`Connection::ready`]).
    fn checkout(&self) -> Option<Box<Connection>> {
        let now = Instant::now();
        let mut idle = self.idle[crate::runtimes::shard()].lock();
        while let Some((conn, since)) = idle.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn`, whose last answer was read to its end, for the next request (closing the oldest
    /// idle one when it is too old or the list is full).
    fn give_back(&self, conn: Box<Connection>) {
        let now = Instant::now();
        let mut idle = self.idle[conn.shard].lock();
        // The least recently used is at the front: close it when it has idled too long or there is no room.
        if idle.first().is_some_and(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT) || idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push((conn, now));
    }
}

/// A new connection to `target`, its handshake done.
async fn connect(connector: &Connector, target: &Target) -> Result<Box<Connection>, SendError> {
    let io = connector
        .tcp
        .clone()
        .call(target.connect_to.clone())
        .await
        .map_err(|e| SendError { connect: true, source: e.into() })?;
    let (sender, driver) =
        connector.http1.handshake(io).await.map_err(|e| SendError { connect: true, source: e.into() })?;
    // Boxed: the driver holds its buffers inline, and the connection moves on every checkout and return.
    Ok(Box::new(Connection {
        sender,
        driver: Some(driver),
        wakes: SelfWakes::default(),
        shard: crate::runtimes::shard(),
    }))
}

/// A worker's response body: drives its connection while it is read, and gives the connection back to
/// the worker's idle list once read to the end.
#[derive(Debug)]
pub struct WorkerBody {
    inner: Incoming,
    /// The connection the body arrives on (until it is given back or ends) and whose list it returns to.
    conn: Option<(Box<Connection>, Arc<WorkerConnections>)>,
}

impl WorkerBody {
    fn give_back_if_ended(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        if let Some((conn, home)) = self.conn.take() {
            home.give_back(conn);
        }
    }
}

impl http_body::Body for WorkerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // The connection first, so what it reads is in the body's channel when the body is polled. One
        // that ended has delivered all it will: the body then ends or fails.
        let this = &mut *self;
        let polled = match &mut this.conn {
            Some((conn, _)) => {
                let Connection { driver, wakes, .. } = &mut **conn;
                let inner = &mut this.inner;
                let polled = wakes.poll(cx, |cx| {
                    drive(driver, cx);
                    Pin::new(&mut *inner).poll_frame(cx)
                });
                if driver.is_none() {
                    this.conn = None;
                }
                polled
            }
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) => self.give_back_if_ended(),
            // A failed body leaves its connection unusable: it is dropped with `conn`.
            Poll::Ready(Some(Err(_))) => self.conn = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::upstream::connector;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A worker on loopback answering each request head with `body`, closing the connection after
    /// `per_conn` answers; counts connections and keeps the request heads it read.
    struct Server {
        url: String,
        accepted: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    async fn server(body: &'static str, per_conn: usize) -> Server {
        answering(String::new(), body.to_string(), per_conn).await
    }

    /// [`server`] answering with `headers` (each line ending in CRLF) and `body`.
    async fn answering(headers: String, body: String, per_conn: usize) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (accepted, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (a, h) = (Arc::clone(&accepted), Arc::clone(&heads));
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let h = Arc::clone(&h);
                let resp = format!("HTTP/1.1 200 OK\r\n{headers}content-length: {}\r\n\r\n{body}", body.len());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        let head = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break String::from_utf8_lossy(&buf.drain(..end + 4).collect::<Vec<_>>()).into_owned();
                            }
                            let mut chunk = [0u8; 1024];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        h.lock().push(head);
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Server { url, accepted, heads }
    }

    fn get(conns: &WorkerConnections, path: &str) -> http::Request<Full<Bytes>> {
        let uri = conns.request_uri(Some(&PathAndQuery::try_from(path).expect("path"))).expect("uri");
        http::Request::get(uri).body(Full::new(Bytes::new())).expect("request")
    }

    async fn read(resp: http::Response<WorkerBody>) -> String {
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn a_connection_read_to_its_end_serves_the_next_request() {
        let s = server("hello", usize::MAX).await;
        let conns = Arc::new(WorkerConnections::new(&format!("{}/api/", s.url)));
        let connector = connector(&UpstreamConfig::default());
        for _ in 0..3 {
            let resp = conns.send(&connector, get(&conns, "/v1/models?x=1")).await.expect("sent");
            assert_eq!(read(resp).await, "hello");
            assert_eq!(conns.idle(), 1, "given back once read");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1, "one connection for three requests");
        let heads = s.heads.lock();
        let host = s.url.trim_start_matches("http://");
        assert!(heads[0].starts_with("GET /api/v1/models?x=1 HTTP/1.1\r\n"), "{}", heads[0]);
        assert!(heads[0].to_ascii_lowercase().contains(&format!("host: {host}\r\n")), "{}", heads[0]);
    }

    #[tokio::test]
    async fn a_connection_is_reused_on_the_serving_runtime_that_made_it_only() {
        let s = server("hello", usize::MAX).await;
        let conns = Arc::new(WorkerConnections::new(&s.url));
        let connector = Arc::new(connector(&UpstreamConfig::default()));
        let runtimes = crate::runtimes::Runtimes::start(1).expect("started");
        for _ in 0..2 {
            let (conns, connector) = (Arc::clone(&conns), Arc::clone(&connector));
            let sent = runtimes.pick().spawn(async move {
                let resp = conns.send(&connector, get(&conns, "/")).await.expect("sent");
                (read(resp).await, crate::runtimes::shard())
            });
            assert_eq!(sent.await.expect("ran"), ("hello".to_string(), 1));
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1, "the runtime's second request reused its connection");
        // Its socket is watched by that runtime's reactor: this thread (no serving runtime) opens its own.
        let resp = conns.send(&connector, get(&conns, "/")).await.expect("sent");
        assert_eq!(read(resp).await, "hello");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(conns.idle(), 2, "each given back to its own runtime's list");
        assert_eq!(conns.idle[1].lock().len(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
        let s = server("a body the caller never reads", usize::MAX).await;
        let conns = Arc::new(WorkerConnections::new(&s.url));
        let connector = connector(&UpstreamConfig::default());
        let resp = conns.send(&connector, get(&conns, "/")).await.expect("sent");
        drop(resp);
        assert_eq!(conns.idle(), 0, "a half-read connection is not reused");
        let resp = conns.send(&connector, get(&conns, "/")).await.expect("sent");
        assert_eq!(read(resp).await, "a body the caller never reads");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_worker_closed_is_skipped() {
        // One answer per connection, then the worker closes it.
        let s = server("once", 1).await;
        let conns = Arc::new(WorkerConnections::new(&s.url));
        let connector = connector(&UpstreamConfig::default());
        for _ in 0..4 {
            let resp = conns.send(&connector, get(&conns, "/")).await.expect("sent despite the closed idle one");
            assert_eq!(read(resp).await, "once");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_worker_not_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let conns = Arc::new(WorkerConnections::new(&url));
        let err =
            conns.send(&connector(&UpstreamConfig::default()), get(&conns, "/")).await.expect_err("nobody listens");
        assert!(err.is_connect(), "{err}");
        let hostless = Arc::new(WorkerConnections::new("not a url"));
        assert!(hostless.request_uri(None).is_err());
        let req = http::Request::get("/").body(Full::new(Bytes::new())).expect("request");
        assert!(hostless.send(&connector(&UpstreamConfig::default()), req).await.expect_err("no host").is_connect());
    }

    #[tokio::test]
    async fn a_fixed_read_buffer_reads_large_bodies_and_refuses_a_head_that_does_not_fit() {
        let small = connector(&UpstreamConfig { read_buffer_bytes: 1024, ..UpstreamConfig::default() });
        let body = "x".repeat(100_000);
        let s = answering(String::new(), body.clone(), usize::MAX).await;
        let conns = Arc::new(WorkerConnections::new(&s.url));
        for _ in 0..2 {
            let resp = conns.send(&small, get(&conns, "/")).await.expect("sent");
            assert_eq!(read(resp).await, body, "read through the 1 KB buffer whole");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);

        let padded = answering(format!("x-padding: {}\r\n", "p".repeat(2000)), "ok".into(), usize::MAX).await;
        let conns = Arc::new(WorkerConnections::new(&padded.url));
        let err = conns.send(&small, get(&conns, "/")).await.expect_err("a 2 KB head does not fit in 1 KB");
        assert!(!err.is_connect(), "{err}");
        let resp = conns
            .send(&connector(&UpstreamConfig::default()), get(&conns, "/"))
            .await
            .expect("the default 4 KB fits it");
        assert_eq!(read(resp).await, "ok");
    }
}
