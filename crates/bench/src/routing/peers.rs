//! The peer routers the bench measures ours against, from their Python packages: sglang-router
//! (`python -m sglang_router.launch_router`) and vllm-router (its `vllm-router` entry point), both with
//! `--policy cache_aware` and otherwise their defaults, as a new user would start them.
//!
//! Their virtualenv is the bench's own (`.venv-bench/` by default), created with `python3 -m venv` and
//! filled with `pip install` when a package is missing, like scripts/test.sh does for the OpenAI SDK. A
//! peer that cannot be installed is reported in its table row, never skipped silently.

use std::path::{Path, PathBuf};
use tokio::process::Command;

/// A peer router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// sglang-router (PyPI `sglang-router`).
    Sglang,
    /// vllm-router (PyPI `vllm-router`).
    Vllm,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: &'static [Peer] = &[Peer::Sglang, Peer::Vllm];

    /// Its PyPI package.
    pub fn package(self) -> &'static str {
        match self {
            Peer::Sglang => "sglang-router",
            Peer::Vllm => "vllm-router",
        }
    }

    /// The name `--peers` takes.
    pub fn short(self) -> &'static str {
        match self {
            Peer::Sglang => "sglang",
            Peer::Vllm => "vllm",
        }
    }

    /// Program and arguments that start it on `127.0.0.1:port` in front of `workers`, its Prometheus
    /// listener on `127.0.0.1:metrics_port` (both default to ports shared by every instance otherwise).
    pub fn command(self, venv: &Path, workers: &[String], port: u16, metrics_port: u16) -> (PathBuf, Vec<String>) {
        let (program, mut args) = match self {
            Peer::Sglang => (python(venv), vec!["-m".to_owned(), "sglang_router.launch_router".to_owned()]),
            Peer::Vllm => (venv.join("bin").join("vllm-router"), Vec::new()),
        };
        args.push("--worker-urls".into());
        args.extend(workers.iter().cloned());
        for (flag, value) in [
            ("--policy", "cache_aware".to_owned()),
            ("--host", "127.0.0.1".to_owned()),
            ("--port", port.to_string()),
            ("--prometheus-host", "127.0.0.1".to_owned()),
            ("--prometheus-port", metrics_port.to_string()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        (program, args)
    }
}

fn python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// The peer's installed version, installing it into `venv` first (creating the venv) when missing; the
/// error says why it could not be had.
pub async fn ensure(venv: &Path, peer: Peer) -> Result<String, String> {
    if !python(venv).exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(venv))
            .await
            .map_err(|e| format!("python3 -m venv: {e}"))?;
    }
    if let Ok(v) = version(venv, peer).await {
        return Ok(v);
    }
    eprintln!("installing {} into {} ...", peer.package(), venv.display());
    run(Command::new(python(venv)).args(["-m", "pip", "install", "--quiet", peer.package()]))
        .await
        .map_err(|e| format!("pip install {} failed: {e}", peer.package()))?;
    version(venv, peer).await
}

async fn version(venv: &Path, peer: Peer) -> Result<String, String> {
    let code = format!("import importlib.metadata as m; print(m.version({:?}))", peer.package());
    run(Command::new(python(venv)).arg("-c").arg(code)).await.map(|v| v.trim().to_owned())
}

/// Runs a command to its end; its stdout, or an error with the end of its stderr.
async fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().await.map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    Err(format!("{}: {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
}
