//! Serving on a socket. We run our own accept loop over hyper (HTTP/1.1, as vLLM's uvicorn speaks) rather
//! than `axum::serve` for two reasons: every connection task lives in a `JoinSet` owned by the server task,
//! so [`SimHandle::shutdown`] aborts in-flight connections like a killed process; and each connection
//! carries a [`ConnKiller`] so the `die_after_tokens` fault can cut a non-streaming request's connection
//! without sending any response.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{Faults, SimConfig};
use crate::server::{app, SimState};

/// Cuts the connection a request arrived on (put in the request's extensions by the accept loop).
#[derive(Clone, Debug, Default)]
pub struct ConnKiller(Arc<Notify>);

impl ConnKiller {
    /// Drop the connection now: no response, no proper end, like a crashed server.
    pub fn kill(&self) {
        self.0.notify_one();
    }
}

/// A running simulator: its address, live state, and the task serving it.
pub struct SimHandle {
    addr: SocketAddr,
    state: SimState,
    task: JoinHandle<()>,
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests in the running batch.
    pub fn running(&self) -> usize {
        self.state.running()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.state.waiting()
    }

    /// Replace the faults in force.
    pub fn set_faults(&self, f: Faults) {
        self.state.set_faults(f);
    }

    /// The worker's shared state (faults, metrics text, counts).
    pub fn state(&self) -> &SimState {
        &self.state
    }

    /// Stop serving: the listener closes and in-flight connections are aborted, like a killed process. The
    /// abort takes effect at the runtime's next scheduling point, not synchronously.
    pub fn shutdown(self) {
        self.task.abort();
    }
}

/// Serve a new simulator on `listener` in a background task. Dropping the returned handle leaves it running.
pub async fn spawn(listener: TcpListener, cfg: SimConfig) -> anyhow::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let state = SimState::new(cfg);
    let router = app(state.clone());
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let killer = ConnKiller::default();
                    let svc = {
                        let killer = killer.clone();
                        let inner = TowerToHyperService::new(router.clone());
                        hyper::service::service_fn(move |mut req: Request<Incoming>| {
                            req.extensions_mut().insert(killer.clone());
                            hyper::service::Service::call(&inner, req)
                        })
                    };
                    conns.spawn(async move {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc);
                        tokio::select! {
                            res = conn => {
                                if let Err(e) = res {
                                    tracing::debug!(error = %e, "connection ended with error");
                                }
                            }
                            () = killer.0.notified() => tracing::debug!("connection killed by fault"),
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok(SimHandle { addr, state, task })
}

/// Bind `127.0.0.1:0` and [`spawn`] there.
pub async fn start(cfg: SimConfig) -> anyhow::Result<SimHandle> {
    spawn(TcpListener::bind("127.0.0.1:0").await?, cfg).await
}
