//! Client connections: the accept loop and the limits on each connection that hyper leaves open.
//!
//! hyper serves every connection (HTTP/1.1, HTTP/2 by prior knowledge, upgrades for
//! `/ws`). Around it, this module bounds what a client can hold:
//! - **Header read timeout**, counted from a request's first byte (and from accept for the first
//!   request), and a separate **idle timeout** between requests. hyper's own `header_read_timeout`
//!   starts as soon as a keep-alive connection goes idle, so it would cut every idle connection at the
//!   header timeout; like Go's `net/http`, the two are kept apart here. A connection with a request in
//!   flight has neither (bodies are bounded by `server.body_read_timeout_ms` where they are read).
//! - **`max_connections`**: beyond it, the connection quiet the longest (no request in flight) is closed
//!   to make room, as nginx reuses idle keep-alive connections; when none is quiet, the newcomer gets a
//!   short 503 `server_busy` with `Connection: close`: one non-blocking write on the fresh socket, no
//!   task, no wait, and HTTP clients and load balancers learn why and when to retry.
//! - **Out of file descriptors** (EMFILE/ENFILE) at accept: quiet connections are closed to free some,
//!   accept backs off briefly and goes on; one warning per episode.
//! - **Graceful shutdown**: stop accepting, ask every connection to finish (`graceful_shutdown`), and
//!   return when the last one ended.
//!
//! Each connection's state lives in a [`Conn`] shared by its IO wrapper (which sees bytes arrive), its
//! service (which sees requests start and their response bodies end) and its watchdog (which sleeps
//! until the next deadline, or its next look, at most [`Limits::look_every`] away: a deadline that
//! starts between two looks lies beyond the next one, so the per-request changes never wake it).
//! Deciding the deadline is the pure [`due`].

use crate::config::ServerConfig;
use crate::runtimes::{Runtimes, Streams};
use crate::state::AppState;
use crate::wakes::SelfWakes;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The per-connection limits, read from the config in force when a connection is accepted (a reload
/// applies to new connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest a request head may take, from its first byte.
    pub header_read: Duration,
    /// Longest a connection may stay open with nothing in flight.
    pub idle: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Keep answering after the client's end of input (`server.half_close`).
    pub half_close: bool,
}

impl Limits {
    /// The limits of `[server]`.
    pub fn from_config(s: &ServerConfig) -> Self {
        Self {
            header_read: Duration::from_millis(s.header_read_timeout_ms),
            idle: Duration::from_millis(s.idle_timeout_ms),
            max_connections: s.max_connections,
            half_close: s.half_close,
        }
    }

    /// How often a connection's watchdog looks at its state at least: the shorter timeout, so a deadline
    /// that starts after one look (a head's first byte, a response's end) comes no earlier than the
    /// next look, and the per-request changes need not wake it.
    fn look_every(&self) -> Duration {
        self.header_read.min(self.idle).max(Duration::from_millis(1))
    }
}

/// Why a connection's deadline came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head did not arrive whole in time.
    Header,
    /// Nothing was asked on it for the idle timeout.
    Idle,
}

/// The next deadline of a connection, as an offset from its start: none while a request is in flight;
/// the header timeout from the first byte of a pending HTTP/1 head; else the idle timeout from the end
/// of the last response. HTTP/2 frames (pings, settings) are not request heads: an HTTP/2 connection
/// is only ever idle or busy.
pub fn due(
    in_flight: usize,
    idle_since: Duration,
    head_since: Option<Duration>,
    h2: bool,
    l: &Limits,
) -> Option<(Duration, Expiry)> {
    match (in_flight, head_since) {
        (0, Some(head)) if !h2 => Some((head + l.header_read, Expiry::Header)),
        (0, _) => Some((idle_since + l.idle, Expiry::Idle)),
        _ => None,
    }
}

/// The live state of one connection.
#[derive(Debug)]
struct Conn {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `start` to the end of the last response (0: none yet).
    idle_since: AtomicU64,
    /// Milliseconds from `start` plus one to the first byte of a head not yet dispatched (0: none).
    head_since: AtomicU64,
    h2: AtomicBool,
    /// Set when the accept loop wants this quiet connection closed to make room.
    reclaimed: AtomicBool,
    /// Set while the watchdog drains the connection: the end of the last request then wakes it.
    draining: AtomicBool,
    /// Wakes the watchdog when it must act before its next look (reclaimed, or drained).
    wake: tokio::sync::Notify,
}

impl Conn {
    fn new(start: Instant) -> Self {
        Self {
            start,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // The first request's head is due from accept.
            head_since: AtomicU64::new(1),
            h2: AtomicBool::new(false),
            reclaimed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn millis(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Bytes arrived: with nothing in flight, they begin a request head. The watchdog is not woken: it
    /// looks again within [`Limits::look_every`], before this head's deadline.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) == 0 {
            self.head_since.store(self.millis() + 1, Ordering::Release);
        }
    }

    fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        InFlight(Arc::clone(self))
    }

    fn due(&self, l: &Limits) -> Option<(Instant, Expiry)> {
        let head = self.head_since.load(Ordering::Acquire);
        let (at, why) = due(
            self.in_flight.load(Ordering::Acquire),
            Duration::from_millis(self.idle_since.load(Ordering::Acquire)),
            (head > 0).then(|| Duration::from_millis(head - 1)),
            self.h2.load(Ordering::Acquire),
            l,
        )?;
        Some((self.start + at, why))
    }

    /// Since when it has been quiet (nothing in flight), for choosing which connection to reclaim.
    fn quiet_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 || self.reclaimed.load(Ordering::Acquire) {
            return None;
        }
        let head = self.head_since.load(Ordering::Acquire);
        let ms = if head > 0 { head - 1 } else { self.idle_since.load(Ordering::Acquire) };
        Some(self.start + Duration::from_millis(ms))
    }
}

/// One request in flight on a connection, until its response body ends or is dropped.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since.store(c.millis(), Ordering::Release);
        // Only a draining watchdog waits for the last request's end; the idle deadline that starts
        // now lies beyond its next look.
        if c.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && c.draining.load(Ordering::Acquire) {
            c.wake.notify_one();
        }
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
struct CountedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl HttpBody for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The gateway as hyper calls it for one connection: counts each request in flight until its response
/// body ends, and hands an inference request straight to the proxy with the client's address (the
/// router would only find the same handler, at a measurable cost per request: BENCHMARKS.md,
/// Overhead); every other request goes to the router, with the address as `ConnectInfo`.
#[derive(Clone)]
struct Service {
    router: Router,
    /// The state the proxy serves inference routes with (`None`: everything goes through `router`).
    app: Option<Arc<AppState>>,
    remote: SocketAddr,
    conn: Arc<Conn>,
}

impl hyper::service::Service<http::Request<Incoming>> for Service {
    type Response = http::Response<CountedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        let in_flight = self.conn.start_request();
        if let Some(app) = self.app.as_ref().filter(|_| crate::proxy::endpoint::Endpoint::is_proxied(&req)) {
            let (app, client) = (Arc::clone(app), Some(self.remote.ip()));
            let counted = move |resp: axum::response::Response| {
                Ok(resp.map(|inner| CountedBody { inner, _in_flight: in_flight }))
            };
            return Box::pin(crate::proxy::forward_from(app, req.map(axum::body::Body::new), client, counted));
        }
        req.extensions_mut().insert(ConnectInfo(self.remote));
        let router = self.router.clone();
        Box::pin(async move {
            let resp = match tower::ServiceExt::oneshot(router, req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok(resp.map(|inner| CountedBody { inner, _in_flight: in_flight }))
        })
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The client socket as hyper sees it: tells the connection's state when bytes arrive, recognises the
/// HTTP/2 preface, and holds the connection's [`Slot`] for as long as the socket lives (an upgraded
/// `/ws` socket keeps it after hyper let go).
struct ConnIo<T> {
    tcp: T,
    conn: Arc<Conn>,
    /// Bytes of the HTTP/2 preface matched so far; `None` once decided.
    preface: Option<usize>,
    _slot: Slot,
}

impl<T> ConnIo<T> {
    fn saw(&mut self, bytes: &[u8]) {
        if let Some(matched) = self.preface {
            let want = &H2_PREFACE[matched..];
            let n = want.len().min(bytes.len());
            self.preface = if bytes[..n] != want[..n] {
                None
            } else if matched + n == H2_PREFACE.len() {
                self.conn.h2.store(true, Ordering::Release);
                None
            } else {
                Some(matched + n)
            };
        }
        self.conn.on_read();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            let this = &mut *self;
            this.saw(&buf.filled()[before..]);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Every open connection: how many, and which may be reclaimed.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Conn>>>,
}

/// One counted connection, released on drop.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connections {
    /// No connections yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Connections open now (upgraded `/ws` sockets included).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn try_open(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    /// A slot beyond the limit, for a newcomer that made room by reclaiming a quiet connection (which
    /// closes within moments).
    fn force_open(self: &Arc<Self>) -> Slot {
        self.open.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(self))
    }

    /// Asks up to `n` of the connections quiet the longest to close; how many were asked.
    fn reclaim(&self, n: usize) -> usize {
        let live = self.live.lock();
        let mut quiet: Vec<(Instant, &Arc<Conn>)> = live.values().filter_map(|c| Some((c.quiet_since()?, c))).collect();
        quiet.sort_unstable_by_key(|(since, _)| *since);
        let mut asked = 0;
        for (_, c) in quiet.into_iter().take(n) {
            if !c.reclaimed.swap(true, Ordering::AcqRel) {
                c.wake.notify_one();
                asked += 1;
            }
        }
        asked
    }
}

/// The body of the 503 answered to a connection beyond `server.max_connections`.
fn busy_response() -> Vec<u8> {
    let err = gateway_core::GatewayError::new(
        gateway_core::ErrorKind::ServerBusy,
        "the gateway has as many connections open as it may; retry shortly",
    );
    let body = err.body().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers 503 on a fresh socket without waiting: one non-blocking write (a fresh socket's send buffer
/// is empty), what the client already sent is drained so closing does not reset the answer away.
fn shed(tcp: TcpStream) {
    let _ = tcp.try_write(&busy_response());
    let Ok(std) = tcp.into_std() else { return };
    let _ = std.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match std::io::Read::read(&mut &std, &mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

/// Whether an accept error means the process or system is out of file descriptors (or socket memory).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// How long accept pauses when out of descriptors, after asking quiet connections to close.
const FD_BACKOFF: Duration = Duration::from_millis(20);
/// Quiet connections closed per accept that found no descriptor.
const FD_RECLAIM: usize = 16;
/// An out-of-descriptors episode is over after this long without one.
const FD_EPISODE: Duration = Duration::from_secs(1);

/// How long a quiet connection asked to close may take to do so before it is dropped.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` and serves `router` on each, on `runtimes` in turn, until `stop`
/// is cancelled; then stops accepting, lets every connection finish what it has in flight, and returns
/// (the runtimes live on with the [`crate::server::Gateway`]: an upgraded connection's task, a
/// WebSocket saying goodbye, may still be running on one).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    app: Arc<AppState>,
    stop: CancellationToken,
    runtimes: Arc<Runtimes>,
) {
    let conns = Arc::clone(&app.connections);
    // Every connection task holds a receiver: `closed()` resolves when the last one ended.
    let (alive_tx, alive_rx) = tokio::sync::watch::channel(());
    let mut out_of_fds: Option<(Instant, u64)> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) if out_of_descriptors(&e) => {
                let now = Instant::now();
                match &mut out_of_fds {
                    Some((last, refused)) => {
                        *last = now;
                        *refused += 1;
                    }
                    None => {
                        tracing::warn!(error = %e, open = conns.open(), "out of file descriptors accepting connections: closing quiet connections (raise the open-file limit, or lower server.max_connections)");
                        out_of_fds = Some((now, 1));
                    }
                }
                conns.reclaim(FD_RECLAIM);
                tokio::select! {
                    _ = tokio::time::sleep(FD_BACKOFF) => continue,
                    _ = stop.cancelled() => break,
                }
            }
            Err(e) => {
                // ECONNABORTED and the like concern one connection only.
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        if let Some((last, refused)) = out_of_fds {
            if last.elapsed() >= FD_EPISODE {
                tracing::info!(refused, "accepting connections again: file descriptors available");
                out_of_fds = None;
            }
        }
        let snap = app.snapshot.load();
        let limits = Limits::from_config(&snap.config.server);
        let slot = match conns.try_open(limits.max_connections) {
            Some(slot) => slot,
            None if conns.reclaim(1) == 1 => conns.force_open(),
            None => {
                tracing::debug!(%remote, max = limits.max_connections, "connection shed: server.max_connections reached");
                shed(tcp);
                continue;
            }
        };
        // Streamed chunks must leave at once, not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        // The socket moves to its serving runtime's reactor.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection lost");
                continue;
            }
        };
        let conn = Arc::new(Conn::new(Instant::now()));
        let id = conns.next_id.fetch_add(1, Ordering::Relaxed);
        conns.live.lock().insert(id, Arc::clone(&conn));
        let service = Service { router: router.clone(), app: Some(Arc::clone(&app)), remote, conn: Arc::clone(&conn) };
        let (conns, stop, alive) = (Arc::clone(&conns), stop.clone(), alive_rx.clone());
        let streams = Streams::over(&runtimes);
        runtimes.pick().spawn(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => {
                    let io = ConnIo { tcp, conn: Arc::clone(&conn), preface: Some(0), _slot: slot };
                    serve_connection(io, service, conn, limits, stop, streams).await;
                }
                Err(e) => tracing::debug!(error = %e, "accepted connection lost"),
            }
            conns.live.lock().remove(&id);
            drop(alive);
        });
    }
    drop(listener);
    drop(alive_rx);
    alive_tx.closed().await;
}

/// What woke a served connection's loop.
enum Event<E> {
    /// hyper is done with the connection.
    Ended(Result<(), E>),
    /// The gateway is shutting down.
    Stop,
    /// The watchdog's wake or its timer: time to look at the deadlines.
    Look,
}

/// Serves one connection, and closes it when its deadline passes or the accept loop reclaims it.
async fn serve_connection<T>(
    io: ConnIo<T>,
    service: Service,
    conn: Arc<Conn>,
    limits: Limits,
    stop: CancellationToken,
    streams: Streams,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(streams);
    // Half-close off by default: hyper cannot tell a client that only shut down its sending side from one
    // that went away, and a client that leaves should release its queue place and its worker's
    // generation at once (`server.half_close` trades that for answering half-closing clients).
    builder.http1().half_close(limits.half_close);
    // HTTP/2 WebSockets (`/ws`) use the extended CONNECT protocol.
    builder.http2().enable_connect_protocol();
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    // Set once the connection was asked to finish (shutdown, idle, reclaimed).
    let mut draining = false;
    // When a quiet connection we asked to finish is dropped if hyper has not closed it by then.
    let mut drop_by: Option<Instant> = None;
    // One timer, moved on each look: the deadline when it is due, else the next look.
    let look = tokio::time::sleep(limits.look_every());
    tokio::pin!(look);
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    // The watchers (shutdown, the watchdog's wake, the timer) are polled only when one of them woke the
    // task, not on every wake of the connection (every relayed chunk).
    let watch = SelfWakes::default();
    loop {
        let now = Instant::now();
        let due = if !draining {
            conn.due(&limits).map(|(at, _)| at)
        } else if conn.in_flight.load(Ordering::Acquire) == 0 {
            drop_by
        } else {
            None
        };
        let next_look = now + limits.look_every();
        look.as_mut().reset(due.map_or(next_look, |at| at.min(next_look)));
        let woke = conn.wake.notified();
        tokio::pin!(woke);
        watch.arm();
        let event = poll_fn(|cx| {
            if let Poll::Ready(res) = served.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(res));
            }
            watch.poll(cx, |cx| {
                if !draining && cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Stop);
                }
                if woke.as_mut().poll(cx).is_ready() || look.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Look);
                }
                Poll::Pending
            })
        })
        .await;
        match event {
            Event::Ended(res) => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            Event::Stop => {
                draining = true;
                conn.draining.store(true, Ordering::Release);
                served.as_mut().graceful_shutdown();
            }
            Event::Look => {}
        }
        let now = Instant::now();
        if draining {
            if drop_by.is_some_and(|at| at <= now) && conn.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            continue;
        }
        let expired = conn.due(&limits).filter(|(at, _)| *at <= now).map(|(_, why)| why);
        let reclaimed = conn.reclaimed.load(Ordering::Acquire) && conn.in_flight.load(Ordering::Acquire) == 0;
        match (expired, reclaimed) {
            (None, false) => {}
            // Nothing in flight and the head incomplete: closing loses nothing.
            (Some(Expiry::Header), _) => return,
            (why, _) => {
                tracing::debug!(?why, reclaimed, "closing a quiet connection");
                // HTTP/1 closes at once once the last answer is written out; HTTP/2 sends GOAWAY and
                // still serves a stream the client was opening.
                draining = true;
                conn.draining.store(true, Ordering::Release);
                drop_by = Some(now + DRAIN_GRACE);
                served.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            max_connections: 8,
            half_close: false,
        }
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let l = limits();
        let s = Duration::from_secs;
        assert_eq!(due(0, s(0), Some(s(0)), false, &l), Some((s(10), Expiry::Header)), "first head: from accept");
        assert_eq!(due(1, s(5), None, false, &l), None, "a request in flight has no connection deadline");
        assert_eq!(
            due(0, s(5), None, false, &l),
            Some((s(65), Expiry::Idle)),
            "idle keep-alive: from the last response"
        );
        assert_eq!(
            due(0, s(5), Some(s(30)), false, &l),
            Some((s(40), Expiry::Header)),
            "next head: from its first byte"
        );
        assert_eq!(due(0, s(5), Some(s(30)), true, &l), Some((s(65), Expiry::Idle)), "HTTP/2 frames are not heads");
    }

    /// Serves a router on one in-memory connection, as the accept loop would; returns the client's end.
    fn connect(limits: Limits) -> tokio::io::DuplexStream {
        serve_in_memory(limits, Streams::default())
    }

    /// [`connect`], with HTTP/2 streams run by `streams`.
    fn serve_in_memory(limits: Limits, streams: Streams) -> tokio::io::DuplexStream {
        let router = Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    "ok"
                }),
            )
            .route("/shard", axum::routing::get(|| async { crate::runtimes::shard().to_string() }));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let conn = Arc::new(Conn::new(Instant::now()));
        let io =
            ConnIo { tcp: server, conn: Arc::clone(&conn), preface: Some(0), _slot: Connections::new().force_open() };
        let service =
            Service { router, app: None, remote: SocketAddr::from(([127, 0, 0, 1], 1)), conn: Arc::clone(&conn) };
        tokio::spawn(serve_connection(io, service, conn, limits, CancellationToken::new(), streams));
        client
    }

    #[tokio::test]
    async fn one_http2_connections_streams_run_on_every_serving_runtime() {
        use http_body_util::BodyExt;
        let runtimes = Arc::new(Runtimes::start(0).expect("started"));
        let client = serve_in_memory(limits(), Streams::over(&runtimes));
        let (sender, h2) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(client))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(h2);
        let asks = (0..8).map(|_| {
            let mut sender = sender.clone();
            async move {
                let req = http::Request::get("http://t/shard").body(http_body_util::Empty::<bytes::Bytes>::new());
                let resp = sender.send_request(req.expect("request")).await.expect("answered");
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                String::from_utf8_lossy(&body).parse::<usize>().expect("a shard")
            }
        });
        let mut seen = futures_util::future::join_all(asks).await;
        seen.sort_unstable();
        seen.dedup();
        let n = crate::runtimes::default_count().min(8);
        assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "the streams of one connection took every runtime in turn");
    }

    async fn get(client: &mut tokio::io::DuplexStream, path: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes()).await.expect("sent");
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nok") {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// How long until the server closes the connection.
    async fn closes_after(client: &mut tokio::io::DuplexStream) -> Duration {
        use tokio::io::AsyncReadExt;
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "nothing more was sent: {}", String::from_utf8_lossy(&rest));
        started.elapsed()
    }

    fn about(d: Duration, want: Duration) -> bool {
        d >= want.saturating_sub(Duration::from_millis(2)) && d <= want + Duration::from_millis(2)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_the_header_timeout() {
        let mut c = connect(limits());
        let took = closes_after(&mut c).await;
        assert!(about(took, Duration::from_secs(10)), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_lasts_the_idle_timeout() {
        let mut c = connect(limits());
        get(&mut c, "/").await;
        tokio::time::sleep(Duration::from_secs(50)).await;
        get(&mut c, "/").await;
        let took = closes_after(&mut c).await;
        assert!(
            about(took, Duration::from_secs(60)),
            "idle counts from the last response, not the header timeout: {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_head_sent_a_byte_a_second_is_cut_ten_seconds_after_its_first_byte() {
        use tokio::io::AsyncWriteExt;
        let mut c = connect(limits());
        get(&mut c, "/").await;
        let answered = Instant::now();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let mut sent = 0;
        for b in b"GET / HTTP/1.1\r\nhost: t\r\nx-pad: ".iter().chain([b'a'; 100].iter()) {
            if c.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let closed = answered.elapsed();
        assert!(
            closed >= Duration::from_secs(40) && closed <= Duration::from_secs(41),
            "{closed:?} after {sent} bytes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_is_not_cut_by_connection_timeouts() {
        let mut c = connect(limits());
        let started = Instant::now();
        get(&mut c, "/slow").await;
        assert!(started.elapsed() >= Duration::from_secs(120), "in flight: neither header nor idle timeout applies");
        let took = closes_after(&mut c).await;
        assert!(about(took, Duration::from_secs(60)), "{took:?}");
    }

    #[test]
    fn busy_response_is_a_complete_openai_error() {
        let r = String::from_utf8(busy_response()).expect("ascii");
        let (head, body) = r.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("connection: close") && head.contains("retry-after: 1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "server_busy");
    }
}
