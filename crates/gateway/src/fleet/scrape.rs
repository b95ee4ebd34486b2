//! Reads the load gauges out of a worker's Prometheus `/metrics` text, in the dialect its engine speaks.
//!
//! Engines name the same facts differently; the dialect is told from the names present:
//!
//! | fact | vLLM | SGLang | llama.cpp server | Hugging Face TGI |
//! |---|---|---|---|---|
//! | running | `vllm:num_requests_running` | `sglang:num_running_reqs` | `llamacpp:requests_processing` | `tgi_batch_current_size` |
//! | waiting | `vllm:num_requests_waiting` | `sglang:num_queue_reqs` | `llamacpp:requests_deferred` | `tgi_queue_size` |
//! | KV usage 0..1 | `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before v1) | `sglang:token_usage` | `llamacpp:kv_cache_usage_ratio` | — |
//! | tokens generated | `vllm:generation_tokens_total` | `sglang:generation_tokens_total` | `llamacpp:tokens_predicted_total` | — |
//! | most requests at once | — | `sglang:max_running_requests_under_SLO` (when set) | — (`/props`) | — (`/info`) |
//!
//! Engines export one series per engine (and per model); the gateway sums request counts and tokens and
//! takes the highest KV usage.

/// The metrics dialect of a worker's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Dialect {
    /// No load metrics read (no `/metrics`, or none of the names below): load comes from the gateway's
    /// own counts.
    #[default]
    None = 0,
    /// vLLM (`vllm:*`).
    Vllm = 1,
    /// SGLang (`sglang:*`).
    Sglang = 2,
    /// llama.cpp's server (`llamacpp:*`).
    LlamaCpp = 3,
    /// Hugging Face text-generation-inference (`tgi_*`).
    Tgi = 4,
}

impl Dialect {
    /// The name shown in `/api/workers`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::LlamaCpp => "llamacpp",
            Self::Tgi => "tgi",
        }
    }

    /// The dialect stored as `u8` by [`Dialect::as_u8`].
    pub fn from_u8(v: u8) -> Self {
        [Self::None, Self::Vllm, Self::Sglang, Self::LlamaCpp, Self::Tgi]
            .get(usize::from(v))
            .copied()
            .unwrap_or_default()
    }

    /// For an atomic.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Load gauges of one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerLoad {
    /// Requests running, summed.
    pub running: f64,
    /// Requests waiting in the engine's own queue, summed.
    pub waiting: f64,
    /// KV-cache usage 0..1, the highest over series.
    pub kv_usage: f64,
    /// Tokens generated so far, summed: generation progress between two scrapes.
    pub generated: f64,
    /// KV-cache capacity in tokens, when the engine says: vLLM's `cache_config_info`
    /// (`num_gpu_blocks * block_size`), sglang's `max_total_num_tokens`; 0 when unknown.
    pub cache_tokens: f64,
    /// Most requests the engine says it runs at once (SGLang's `max_running_requests_under_SLO`); 0 when
    /// unknown (SGLang exports -1 or nothing when unset).
    pub max_running: f64,
    /// Which names were read.
    pub dialect: Dialect,
}

/// What a sample means, by its name.
enum Fact {
    Running,
    Waiting,
    KvUsage,
    Generated,
    CacheTokens,
    /// vLLM's `cache_config_info`: the capacity is in its labels.
    CacheConfigInfo,
    MaxRunning,
}

fn fact(name: &str) -> Option<(Dialect, Fact)> {
    use Dialect::*;
    Some(match name {
        "vllm:num_requests_running" => (Vllm, Fact::Running),
        "vllm:num_requests_waiting" => (Vllm, Fact::Waiting),
        "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => (Vllm, Fact::KvUsage),
        "vllm:generation_tokens_total" => (Vllm, Fact::Generated),
        "vllm:cache_config_info" => (Vllm, Fact::CacheConfigInfo),
        "sglang:num_running_reqs" => (Sglang, Fact::Running),
        "sglang:num_queue_reqs" => (Sglang, Fact::Waiting),
        "sglang:token_usage" => (Sglang, Fact::KvUsage),
        "sglang:generation_tokens_total" => (Sglang, Fact::Generated),
        "sglang:max_total_num_tokens" => (Sglang, Fact::CacheTokens),
        "sglang:max_running_requests_under_SLO" => (Sglang, Fact::MaxRunning),
        "llamacpp:requests_processing" => (LlamaCpp, Fact::Running),
        "llamacpp:requests_deferred" => (LlamaCpp, Fact::Waiting),
        "llamacpp:kv_cache_usage_ratio" => (LlamaCpp, Fact::KvUsage),
        "llamacpp:tokens_predicted_total" => (LlamaCpp, Fact::Generated),
        "tgi_batch_current_size" => (Tgi, Fact::Running),
        "tgi_queue_size" => (Tgi, Fact::Waiting),
        _ => return Option::None,
    })
}

/// Parses the gauges the gateway needs in whichever dialect the text speaks; unknown lines are
/// ignored, so any exposition parses.
pub fn parse_metrics(text: &str) -> WorkerLoad {
    let mut load = WorkerLoad::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = split_sample(line) else { continue };
        let Some((dialect, fact)) = fact(name) else { continue };
        load.dialect = dialect;
        match fact {
            Fact::Running => load.running += value,
            Fact::Waiting => load.waiting += value,
            Fact::KvUsage => load.kv_usage = load.kv_usage.max(value),
            Fact::Generated => load.generated += value,
            Fact::CacheTokens => load.cache_tokens += value,
            Fact::MaxRunning => load.max_running = load.max_running.max(value),
            Fact::CacheConfigInfo => {
                let number = |key| label(line, key).and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite());
                if let (Some(blocks), Some(size)) = (number("num_gpu_blocks"), number("block_size")) {
                    load.cache_tokens += blocks * size;
                }
            }
        }
    }
    load.kv_usage = load.kv_usage.clamp(0.0, 1.0);
    load
}

/// The value of label `key` in a sample line (`name{key="value",...} v`); escapes are not undone (the
/// labels read are numbers).
fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let labels = &line[line.find('{')? + 1..];
    let mut rest = labels;
    loop {
        let eq = rest.find("=\"")?;
        let name = rest[..eq].trim_start_matches([',', ' ']);
        let value_start = eq + 2;
        let len = rest[value_start..].find('"')?;
        if name == key {
            return Some(&rest[value_start..value_start + len]);
        }
        rest = &rest[value_start + len + 1..];
        if rest.starts_with('}') {
            return None;
        }
    }
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
        let load = parse_metrics(text);
        assert_eq!(
            load,
            WorkerLoad {
                running: 5.0,
                waiting: 7.0,
                kv_usage: 0.5,
                generated: 42.0,
                cache_tokens: 0.0,
                max_running: 0.0,
                dialect: Dialect::Vllm
            }
        );
    }

    #[test]
    fn reads_every_dialect() {
        let sglang = "sglang:num_running_reqs{model_name=\"m\"} 3\nsglang:num_queue_reqs 2\nsglang:token_usage 0.7\nsglang:generation_tokens_total 9\n";
        let l = parse_metrics(sglang);
        assert_eq!((l.dialect, l.running, l.waiting, l.kv_usage, l.generated), (Dialect::Sglang, 3.0, 2.0, 0.7, 9.0));
        let llama = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\nllamacpp:requests_deferred 4\nllamacpp:kv_cache_usage_ratio 0.25\nllamacpp:tokens_predicted_total 50\n";
        let l = parse_metrics(llama);
        assert_eq!(
            (l.dialect, l.running, l.waiting, l.kv_usage, l.generated),
            (Dialect::LlamaCpp, 1.0, 4.0, 0.25, 50.0)
        );
        let tgi = "tgi_batch_current_size 6\ntgi_queue_size 11\ntgi_request_count 3\n";
        let l = parse_metrics(tgi);
        assert_eq!((l.dialect, l.running, l.waiting), (Dialect::Tgi, 6.0, 11.0));
        assert_eq!(parse_metrics("process_cpu_seconds_total 3\n").dialect, Dialect::None);
        for d in [Dialect::None, Dialect::Vllm, Dialect::Sglang, Dialect::LlamaCpp, Dialect::Tgi] {
            assert_eq!(Dialect::from_u8(d.as_u8()), d);
        }
    }

    #[test]
    fn reads_the_cache_capacity() {
        let vllm = "vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",num_cpu_blocks=\"None\",num_gpu_blocks=\"2048\",swap_space=\"4\"} 1.0\n";
        assert_eq!(parse_metrics(vllm).cache_tokens, 32768.0);
        let sglang = "sglang:max_total_num_tokens{model_name=\"m\"} 471258.0\n";
        assert_eq!(parse_metrics(sglang).cache_tokens, 471258.0);
        let slo = "sglang:max_running_requests_under_SLO{model_name=\"m\"} 48.0\n";
        assert_eq!(parse_metrics(slo).max_running, 48.0);
        let unset = "sglang:max_running_requests_under_SLO{model_name=\"m\"} -1.0\n";
        assert_eq!(parse_metrics(unset).max_running, 0.0, "-1: not set");
        let unknown = "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"None\"} 1.0\n";
        assert_eq!(parse_metrics(unknown).cache_tokens, 0.0, "not yet profiled: unknown");
        assert_eq!(parse_metrics("vllm:num_requests_running 3\n").cache_tokens, 0.0);
    }

    #[test]
    fn garbage_is_ignored() {
        let load = parse_metrics("vllm:num_requests_running{ 3\nvllm:num_requests_waiting NaN\nnonsense\n");
        assert_eq!(load, WorkerLoad::default());
        assert_eq!(parse_metrics("vllm:num_requests_waiting 4 1700000000").waiting, 4.0);
    }
}
