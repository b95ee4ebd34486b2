//! Gateway overhead: the same fixed load against a zero-latency vllm-sim, once directly and once through
//! the gateway, in one process and one run, so the ratio is what the gateway costs on this machine.

use crate::load;
use bytes::Bytes;
use llm_gateway::config::{Config, WorkerConfig};
use llm_gateway::Gateway;
use std::time::Duration;
use vllm_sim::SimConfig;

/// Options of `bench overhead`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    concurrency: Vec<usize>,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// Which request kinds to run: `non-stream`, `stream` or both.
    #[arg(long, value_delimiter = ',', default_value = "non-stream,stream")]
    modes: Vec<String>,
    /// Only measure through the gateway (for profiling the gateway alone).
    #[arg(long)]
    gateway_only: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sim = vllm_sim::start(SimConfig {
        ttft_ms: 0.0,
        itl_ms: 0.0,
        prefill_ms_per_1k_tokens: 0.0,
        output_tokens: (args.tokens, args.tokens),
        max_num_seqs: 1024,
        ..SimConfig::default()
    })
    .await?;
    let mut cfg = Config::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.workers = vec![WorkerConfig::from_url(sim.url())];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::serve(listener, cfg).await?;
    let duration = Duration::from_secs(args.duration);
    println!("gateway overhead: vllm-sim with zero latency, {} output tokens, {}s per run", args.tokens, args.duration);
    println!(
        "| mode | conc | direct rps | gateway rps | rps ratio | direct p50 | gateway p50 | direct p99 | gateway p99 | added p99 | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for stream in [false, true] {
        if !args.modes.iter().any(|m| m == if stream { "stream" } else { "non-stream" }) {
            continue;
        }
        let body = Bytes::from(
            serde_json::json!({
                "model": "demo-model",
                "stream": stream,
                "max_tokens": args.tokens,
                "messages": [{"role": "user", "content": "Say something about load balancers."}],
            })
            .to_string(),
        );
        for &c in &args.concurrency {
            // Warm both paths' connection pools before measuring.
            load::run(&format!("{}/v1/chat/completions", sim.url()), body.clone(), c, Duration::from_millis(500))
                .await?;
            load::run(&format!("{}/v1/chat/completions", gw.url()), body.clone(), c, Duration::from_millis(500))
                .await?;
            let direct = load::run(&format!("{}/v1/chat/completions", sim.url()), body.clone(), c, duration).await?;
            let via = load::run(&format!("{}/v1/chat/completions", gw.url()), body.clone(), c, duration).await?;
            let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
            let added = via.quantile(0.99).saturating_sub(direct.quantile(0.99));
            println!(
                "| {} | {c} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {} |",
                if stream { "stream" } else { "non-stream" },
                direct.rps(),
                via.rps(),
                via.rps() / direct.rps().max(1e-9),
                ms(direct.quantile(0.5)),
                ms(via.quantile(0.5)),
                ms(direct.quantile(0.99)),
                ms(via.quantile(0.99)),
                ms(added),
                direct.errors + via.errors,
            );
        }
    }
    gw.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
