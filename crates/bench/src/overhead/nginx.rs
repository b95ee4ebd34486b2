//! nginx as the reference proxy: Debian's package (installed with `apt-get` when missing), configured
//! from a generated file in the bench's temp dir as a round-robin HTTP/1.1 keep-alive proxy with two
//! worker processes, relaying answers unbuffered (as the gateway does, chunk by chunk).

use crate::procs::{children_of, Proc};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

/// Where Debian's package puts the binary.
const NGINX: &str = "/usr/sbin/nginx";

/// The nginx binary, installing Debian's `nginx` package when it is missing (the bench runs as root).
pub fn binary() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(NGINX);
    if !path.exists() {
        println!("nginx is missing: apt-get install -y nginx");
        let update = Command::new("apt-get").args(["update", "-q"]).status();
        anyhow::ensure!(update.is_ok_and(|s| s.success()), "apt-get update failed");
        let install = Command::new("apt-get")
            .args(["install", "-y", "-q", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        anyhow::ensure!(install.success() && path.exists(), "apt-get install nginx failed");
    }
    Ok(path)
}

/// `nginx -v`'s version line.
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().trim_start_matches("nginx version: ").to_owned())
        .unwrap_or_else(|| "nginx".into())
}

/// A running nginx (master and its workers) in front of one backend.
pub struct Nginx {
    master: Proc,
    /// `http://127.0.0.1:PORT` for HTTP/1.1.
    pub url: String,
    /// `http://127.0.0.1:PORT` speaking HTTP/2 without TLS (prior knowledge).
    pub h2_url: String,
}

impl Nginx {
    /// Starts nginx in the foreground (`daemon off`, so it is our child) with its config, logs and
    /// temp files under `dir`, proxying to `backend` (`host:port`); `access_log` writes one line per
    /// request, as the gateway's request log does.
    pub async fn start(bin: &Path, dir: &Path, backend: &str, access_log: bool) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let (port, h2_port) = (free_port()?, free_port()?);
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, backend, port, h2_port, access_log))?;
        let (prefix, conf_arg, err) = (dir.to_string_lossy(), conf.to_string_lossy(), dir.join("error.log"));
        let err = err.to_string_lossy();
        let args = ["-p", &prefix, "-c", &conf_arg, "-e", &err];
        let mut master = Proc::spawn(bin, &args, &dir.join("nginx.out"), true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            anyhow::ensure!(master.alive(), "nginx exited at start; see {}", dir.display());
            anyhow::ensure!(Instant::now() < deadline, "nginx did not listen within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let url = format!("http://127.0.0.1:{port}");
        Ok(Nginx { master, url, h2_url: format!("http://127.0.0.1:{h2_port}") })
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.master.pid();
        let mut pids = vec![master];
        pids.extend(children_of(master));
        pids
    }
}

impl Drop for Nginx {
    /// SIGTERM first, for the master to stop its workers: killed with SIGKILL it cannot, and they would
    /// keep running (and listening) after the bench; a worker killed before it is replaced at once.
    fn drop(&mut self) {
        let master = self.master.pid();
        let workers = children_of(master);
        let _ = std::process::Command::new("kill").args(["-TERM", &master.to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while self.master.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Those the master did not stop in time (normally none are left).
        for pid in workers.into_iter().filter(|&pid| crate::procs::rss_kb(pid).is_some()) {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        self.master.kill();
    }
}

/// A port free now (bound and released: nginx binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The config: 2 workers, an upstream with keep-alive connections, unbuffered answers, keep-alive
/// without a request cap on either side (hyper has none), the same body limit as the gateway.
fn config(dir: &Path, backend: &str, port: u16, h2_port: u16, access_log: bool) -> String {
    let d = dir.display();
    let log = if access_log { format!("access_log {d}/access.log;") } else { "access_log off;".into() };
    format!(
        r#"worker_processes 2;
daemon off;
pid {d}/nginx.pid;
worker_rlimit_nofile 19000;
events {{
    worker_connections 19000;
}}
http {{
    {log}
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 60s;
    client_max_body_size 32m;
    upstream workers {{
        server {backend};
        keepalive 1024;
        keepalive_requests 1000000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{h2_port} http2;
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"#
    )
}
