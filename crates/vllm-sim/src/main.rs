//! The `vllm-sim` binary: parse flags, bind, announce the address on stdout, serve until killed.

use std::io::Write as _;

use clap::Parser;
use vllm_sim::cli::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let bind = format!("{}:{}", cli.host, cli.port);
    let cfg = match cli.into_config() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("vllm-sim: {e}");
            std::process::exit(2);
        }
    };
    let model = cfg.model.clone();
    let listener =
        tokio::net::TcpListener::bind(&bind).await.map_err(|e| anyhow::anyhow!("cannot bind {bind}: {e}"))?;
    let handle = vllm_sim::spawn(listener, cfg).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "vllm-sim listening on {} model={model}", handle.url())?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c().await?;
    handle.shutdown();
    Ok(())
}
