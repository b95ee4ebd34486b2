//! `llm-gateway`: read config, exit with one clear line on bad config, run until SIGTERM or Ctrl-C
//! (reloading the config on SIGHUP and file change).

use clap::Parser;
use llm_gateway::cli::{Cli, ServeArgs};
use llm_gateway::reload::{self, ConfigSource};
use llm_gateway::{demo, Config, Gateway};
use std::process::ExitCode;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(cmd) => llm_gateway::cli::run(cmd).await,
        None => serve(cli.serve).await,
    }
}

async fn serve(cli: ServeArgs) -> ExitCode {
    let mut source = ConfigSource { file: cli.config.clone(), overrides: cli.overrides(), fixed_workers: None };
    let mut config = match Config::load(cli.config.as_deref(), &source.overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llm-gateway: config error: {e}");
            return ExitCode::from(2);
        }
    };
    // Held to the end: dropping it writes the log lines still buffered.
    let log = llm_gateway::logging::init(&config.log);
    // Demo workers live as long as main does.
    let _sims = match cli.demo {
        Some(n) => match demo::start(n.max(1)).await {
            Ok((sims, workers)) => {
                // Reloads keep the demo workers, whatever the file says.
                source.fixed_workers = Some(workers.clone());
                config.workers = workers;
                sims
            }
            Err(e) => {
                log.flush();
                eprintln!("llm-gateway: cannot start demo workers: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Vec::new(),
    };
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let gateway = match Gateway::start(config).await {
        Ok(g) => g,
        Err(e) => {
            log.flush();
            eprintln!("llm-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("llm-gateway listening on {}", gateway.url());
    reload::spawn_watchers(std::sync::Arc::clone(&gateway.state), source);
    shutdown_signal().await;
    tracing::info!("shutting down");
    if gateway.shutdown(grace).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
