//! `--demo N`: in-process vllm-sim workers on ephemeral loopback ports, so the gateway runs with no GPU.

use crate::config::WorkerConfig;
use vllm_sim::{SimConfig, SimHandle};

/// The model the demo workers serve.
pub const DEMO_MODEL: &str = "demo-model";

/// Starts `n` simulated workers serving [`DEMO_MODEL`] and returns them with their worker entries.
pub async fn start(n: usize) -> anyhow::Result<(Vec<SimHandle>, Vec<WorkerConfig>)> {
    let mut sims = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = SimConfig { model: DEMO_MODEL.into(), seed: i as u64 + 1, ..SimConfig::default() };
        let sim = vllm_sim::start(cfg).await?;
        let mut w = WorkerConfig::from_url(sim.url());
        w.name = Some(format!("sim-{i}"));
        workers.push(w);
        sims.push(sim);
    }
    Ok((sims, workers))
}
