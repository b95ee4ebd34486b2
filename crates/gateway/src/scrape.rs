//! Reads the load gauges out of a vLLM worker's Prometheus `/metrics` text.
//!
//! vLLM exports one series per engine (and per model); the gateway sums the request counts and takes the
//! highest KV usage. Both `vllm:kv_cache_usage_perc` and the older `vllm:gpu_cache_usage_perc` are read.

/// Load gauges of one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerLoad {
    /// `vllm:num_requests_running`, summed.
    pub running: f64,
    /// `vllm:num_requests_waiting`, summed.
    pub waiting: f64,
    /// KV-cache usage 0..1, the highest over series.
    pub kv_usage: f64,
    /// `vllm:generation_tokens_total`, summed: generation progress between two scrapes.
    pub generated: f64,
}

/// Parses the gauges the gateway needs; unknown lines are ignored, so any exposition parses.
pub fn parse_vllm_metrics(text: &str) -> WorkerLoad {
    let mut load = WorkerLoad::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = split_sample(line) else { continue };
        match name {
            "vllm:num_requests_running" => load.running += value,
            "vllm:num_requests_waiting" => load.waiting += value,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => load.kv_usage = load.kv_usage.max(value),
            "vllm:generation_tokens_total" => load.generated += value,
            _ => {}
        }
    }
    load.kv_usage = load.kv_usage.clamp(0.0, 1.0);
    load
}

/// `name{labels} value [timestamp]` to `(name, value)`.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let rest = match line[name_end..].strip_prefix('{') {
        // Label values may contain spaces or braces inside quotes; skip to the closing brace outside quotes.
        Some(labels) => {
            let mut in_quotes = false;
            let mut escaped = false;
            let mut end = None;
            for (i, c) in labels.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_quotes = !in_quotes,
                    '}' if !in_quotes => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            &labels[end? + 1..]
        }
        None => &line[name_end..],
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_gauges() {
        let text = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:gpu_cache_usage_perc{model_name="m {x}"} 0.25
vllm:kv_cache_usage_perc{model_name="m"} 0.5
vllm:prefix_cache_hits_total{model_name="m"} 100
vllm:generation_tokens_total{engine="0",model_name="m"} 40.0
vllm:generation_tokens_total{engine="1",model_name="m"} 2.0
"#;
        let load = parse_vllm_metrics(text);
        assert_eq!(load, WorkerLoad { running: 5.0, waiting: 7.0, kv_usage: 0.5, generated: 42.0 });
    }

    #[test]
    fn garbage_is_ignored() {
        let load = parse_vllm_metrics("vllm:num_requests_running{ 3\nvllm:num_requests_waiting NaN\nnonsense\n");
        assert_eq!(load, WorkerLoad::default());
        assert_eq!(parse_vllm_metrics("vllm:num_requests_waiting 4 1700000000").waiting, 4.0);
    }
}
