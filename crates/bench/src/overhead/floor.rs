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
    let base = args.upstream.trim_end_matches('/').to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("hyper-proxy listening on http://{}", listener.local_addr()?);
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
