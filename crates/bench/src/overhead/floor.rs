//! `bench hyper-proxy`: the floor of the design's HTTP stack. A reverse proxy with nothing but hyper
//! and tokio in it (hyper-util's server that speaks HTTP/1 and HTTP/2, its pooled HTTP/1 client, the
//! multi-threaded runtime, no router, no parsing, no queue, no log line), run by `bench overhead` as
//! the peer `hyper`, so the table shows how much of the gateway's CPU per request the stack costs on
//! its own beside nginx in the same run.

use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Options of `bench hyper-proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// The worker every request is forwarded to, `http://host:port`.
    #[arg(long)]
    upstream: String,
}

type Body = http_body_util::Either<Incoming, http_body_util::Empty<bytes::Bytes>>;

/// Serves on an ephemeral loopback port (printed as `listening on http://...`) until killed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("hyper-proxy listening on http://{}", listener.local_addr()?);
    serve(listener, &args.upstream).await
}

/// Proxies every request accepted on `listener` to `upstream`.
async fn serve(listener: TcpListener, upstream: &str) -> anyhow::Result<()> {
    let base = upstream.trim_end_matches('/').to_owned();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build(connector);
    loop {
        let (io, _) = listener.accept().await?;
        io.set_nodelay(true)?;
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| forward(client.clone(), base.clone(), req));
            // A client that goes away mid-request is no error of the proxy's.
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service).await;
        });
    }
}

/// The request sent on to `base` with its path, the worker's response relayed as it comes; 502 when the
/// worker cannot be reached.
async fn forward(
    client: Client<HttpConnector, Incoming>,
    base: String,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else { return Ok(status(StatusCode::BAD_REQUEST)) };
    *req.uri_mut() = uri;
    *req.version_mut() = hyper::Version::HTTP_11;
    req.headers_mut().remove(HOST);
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(Body::Left),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    })
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Body::Right(http_body_util::Empty::new()));
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor relays path, query, body and status both ways, and answers 502 for a worker that is gone.
    #[tokio::test]
    async fn relays_requests_and_answers_502_without_a_worker() -> anyhow::Result<()> {
        let worker = TcpListener::bind("127.0.0.1:0").await?;
        let worker_url = format!("http://{}", worker.local_addr()?);
        tokio::spawn(async move {
            while let Ok((io, _)) = worker.accept().await {
                let echo = service_fn(|req: Request<Incoming>| async move {
                    use http_body_util::BodyExt;
                    let what = format!("{} {}", req.method(), req.uri());
                    let body = req.into_body().collect().await?.to_bytes();
                    let text = format!("{what} {}", String::from_utf8_lossy(&body));
                    Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(bytes::Bytes::from(text))))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), echo));
            }
        });
        let proxy = |upstream: String| async move {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            tokio::spawn(async move { serve(listener, &upstream).await });
            anyhow::Ok(url)
        };
        let client = reqwest::Client::new();
        let url = proxy(worker_url).await?;
        let resp = client.post(format!("{url}/v1/chat/completions?x=1")).body("{}").send().await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await?, "POST /v1/chat/completions?x=1 {}");
        let gone = proxy("http://127.0.0.1:1".to_owned()).await?;
        assert_eq!(client.post(format!("{gone}/v1/chat/completions")).send().await?.status(), 502);
        Ok(())
    }
}
