//! The routing benchmark's workload: a seeded, deterministic schedule of chat requests that looks like
//! a chat product's traffic to prefix caches.
//!
//! - A few long **system prompts** shared by many conversations (the cache's big win: every conversation
//!   on a prompt starts with the same hundreds of tokens).
//! - **Multi-turn conversations**: turn `k` sends the whole history (system prompt, earlier user messages
//!   and assistant replies) plus a new user message, so it extends turn `k - 1`'s prompt byte for byte.
//!   The assistant replies are drawn here, not taken from the worker's answer, so the schedule (and every
//!   request body) is the same for every strategy and every run with the same seed.
//! - **One-off prompts** with unique text, which no cache can help.
//! - **Poisson arrivals** (exponential gaps) at a fixed rate: an open loop, arrivals never wait for answers.
//!
//! Each arrival is a one-off with probability `oneoff_share`; otherwise it is the next turn of one of
//! `active_conversations` open conversations chosen uniformly, and a conversation that sent its last
//! turn is replaced by a new one. With many open conversations a conversation's turns are spread out
//! (about `active_conversations / rate` seconds apart), like a user reading and typing between turns.

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// The shape of the workload.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Seed of every draw.
    pub seed: u64,
    /// Mean arrivals per second.
    pub rate: f64,
    /// Arrivals stop after this long.
    pub duration: Duration,
    /// Model name in every body.
    pub model: String,
    /// Number of shared system prompts.
    pub system_prompts: usize,
    /// Length range of a system prompt, characters.
    pub system_chars: (usize, usize),
    /// Share of arrivals that are one-off prompts with unique text.
    pub oneoff_share: f64,
    /// Length range of a one-off prompt, characters.
    pub oneoff_chars: (usize, usize),
    /// Conversations open at once.
    pub active_conversations: usize,
    /// Range of the number of turns of a conversation.
    pub turns: (u32, u32),
    /// Length range of a user message, characters.
    pub user_chars: (usize, usize),
    /// Length range of an assistant reply appended to the history, characters.
    pub reply_chars: (usize, usize),
    /// `max_tokens` of every request.
    pub max_tokens: u32,
}

impl WorkloadConfig {
    /// The benchmark's default shape at `rate` for `duration`.
    pub fn new(seed: u64, rate: f64, duration: Duration) -> Self {
        Self {
            seed,
            rate,
            duration,
            model: "demo-model".to_owned(),
            system_prompts: 4,
            system_chars: (2000, 4000),
            oneoff_share: 0.25,
            oneoff_chars: (1000, 4000),
            active_conversations: 32,
            turns: (2, 8),
            user_chars: (100, 400),
            // About what the sim answers (16..=48 tokens of ~5 characters).
            reply_chars: (80, 240),
            max_tokens: 64,
        }
    }

    /// One line for the benchmark's header.
    pub fn describe(&self) -> String {
        format!(
            "{} system prompts of {}-{} chars; {} open conversations of {}-{} turns (user {}-{} chars, reply \
             {}-{} chars); {:.0}% one-offs of {}-{} chars; Poisson {} req/s for {}s; seed {}",
            self.system_prompts,
            self.system_chars.0,
            self.system_chars.1,
            self.active_conversations,
            self.turns.0,
            self.turns.1,
            self.user_chars.0,
            self.user_chars.1,
            self.reply_chars.0,
            self.reply_chars.1,
            self.oneoff_share * 100.0,
            self.oneoff_chars.0,
            self.oneoff_chars.1,
            self.rate,
            self.duration.as_secs(),
            self.seed,
        )
    }
}

/// What kind of request an arrival is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Turn `turn` (from 1) of a conversation.
    Turn {
        /// Conversation number.
        conversation: u64,
        /// Turn number, from 1.
        turn: u32,
    },
    /// A one-off prompt with unique text.
    OneOff,
}

/// One scheduled request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Arrival time from the start of the run.
    pub at: Duration,
    /// `X-Session-Id`: the conversation (or the one-off's own id).
    pub session: String,
    /// What it is.
    pub kind: Kind,
    /// The JSON body, streamed with usage.
    pub body: Bytes,
}

/// Words the text is drawn from.
const WORDS: &[&str] = &[
    "the",
    "router",
    "sends",
    "each",
    "request",
    "to",
    "a",
    "worker",
    "whose",
    "cache",
    "already",
    "holds",
    "prefix",
    "of",
    "prompt",
    "and",
    "batch",
    "queue",
    "token",
    "latency",
    "model",
    "system",
    "user",
    "answer",
    "policy",
    "tenant",
    "stream",
    "block",
    "memory",
    "gpu",
    "kernel",
    "schedule",
    "context",
    "window",
    "reply",
    "question",
    "summarise",
    "explain",
    "carefully",
    "briefly",
    "always",
    "never",
    "format",
    "markdown",
    "json",
    "table",
    "list",
    "step",
    "reason",
    "check",
    "assume",
    "customer",
    "support",
    "invoice",
    "refund",
    "order",
];

/// Words drawn from `rng`, cut to a length drawn from `chars`.
fn text(rng: &mut SmallRng, chars: (usize, usize)) -> String {
    let len = in_range(rng, chars);
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out.truncate(len);
    out
}

fn in_range(rng: &mut SmallRng, (lo, hi): (usize, usize)) -> usize {
    rng.random_range(lo.min(hi)..=hi.max(lo))
}

struct Conversation {
    id: u64,
    system: usize,
    turns: u32,
    sent: u32,
    /// `(role, content)` so far, without the system prompt.
    history: Vec<(&'static str, String)>,
}

/// The whole schedule of `cfg`, sorted by arrival time. Same `cfg`, same schedule, byte for byte.
pub fn generate(cfg: &WorkloadConfig) -> Vec<Request> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let systems: Vec<String> = (0..cfg.system_prompts.max(1))
        .map(|i| format!("You are assistant #{i}. {}", text(&mut rng, cfg.system_chars)))
        .collect();
    let mut next_conversation = 0u64;
    let mut new_conversation = |rng: &mut SmallRng| {
        let id = next_conversation;
        next_conversation += 1;
        Conversation {
            id,
            system: rng.random_range(0..systems.len()),
            turns: rng.random_range(cfg.turns.0.min(cfg.turns.1)..=cfg.turns.1.max(cfg.turns.0)).max(1),
            sent: 0,
            history: Vec::new(),
        }
    };
    let mut open: Vec<Conversation> =
        (0..cfg.active_conversations.max(1)).map(|_| new_conversation(&mut rng)).collect();
    let mut out = Vec::new();
    let mut t = 0.0f64;
    let mut oneoffs = 0u64;
    let end = cfg.duration.as_secs_f64();
    loop {
        // Exponential gap: -ln(U) / rate, U in (0, 1].
        let u: f64 = 1.0 - rng.random::<f64>();
        t += -u.ln() / cfg.rate.max(1e-9);
        if t >= end {
            break;
        }
        let at = Duration::from_secs_f64(t);
        if rng.random::<f64>() < cfg.oneoff_share {
            let id = oneoffs;
            oneoffs += 1;
            let content = format!("One-off {id}: {}", text(&mut rng, cfg.oneoff_chars));
            let body = body(cfg, &[("user", content.as_str())]);
            out.push(Request { at, session: format!("oneoff-{id}"), kind: Kind::OneOff, body });
            continue;
        }
        let slot = rng.random_range(0..open.len());
        let conv = &mut open[slot];
        if conv.sent > 0 {
            // The previous turn's answer joins the history before the next question.
            let reply = text(&mut rng, cfg.reply_chars);
            conv.history.push(("assistant", reply));
        }
        let question = text(&mut rng, cfg.user_chars);
        conv.history.push(("user", question));
        conv.sent += 1;
        let mut messages: Vec<(&str, &str)> = vec![("system", systems[conv.system].as_str())];
        messages.extend(conv.history.iter().map(|(r, c)| (*r, c.as_str())));
        out.push(Request {
            at,
            session: format!("conv-{}", conv.id),
            kind: Kind::Turn { conversation: conv.id, turn: conv.sent },
            body: body(cfg, &messages),
        });
        if conv.sent >= conv.turns {
            open[slot] = new_conversation(&mut rng);
        }
    }
    out
}

fn body(cfg: &WorkloadConfig, messages: &[(&str, &str)]) -> Bytes {
    let messages: Vec<_> =
        messages.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
    Bytes::from(
        serde_json::json!({
            "model": cfg.model,
            "messages": messages,
            "max_tokens": cfg.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string(),
    )
}

/// The prefix-cache hit rate (hit tokens / prompt tokens) the schedule would reach on one worker whose
/// cache never evicts, computed with the simulator's own tokenizer and chat template: the ceiling no
/// routing can beat, against which the measured rates read.
pub fn oracle_hit_rate(reqs: &[Request], model: &str, block_size: usize) -> f64 {
    use vllm_sim::tokenizer::{chat_prompt, tokenize};
    let mut seen = std::collections::HashSet::new();
    let (mut hits, mut queries) = (0u64, 0u64);
    for r in reqs {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else { continue };
        let messages = v["messages"].as_array().cloned().unwrap_or_default();
        let prompt = chat_prompt(
            messages.iter().map(|m| (m["role"].as_str().unwrap_or(""), m["content"].as_str().unwrap_or("").to_owned())),
        );
        let t = tokenize(model, prompt.as_bytes(), block_size);
        // vLLM always computes the last prompt token, as the sim does.
        let limit = (t.tokens.saturating_sub(1) as usize) / block_size.max(1);
        let run = t.block_hashes.iter().take(limit).take_while(|h| seen.contains(*h)).count();
        hits += (run * block_size) as u64;
        queries += u64::from(t.tokens);
        seen.extend(t.block_hashes);
    }
    hits as f64 / queries.max(1) as f64
}

/// Counts of a schedule, for the header.
pub struct Summary {
    /// Requests scheduled.
    pub requests: usize,
    /// Of which one-offs.
    pub oneoffs: usize,
    /// Distinct conversations that sent at least one turn.
    pub conversations: usize,
    /// Mean body size, bytes.
    pub mean_body_bytes: usize,
}

/// Summarises a schedule.
pub fn summary(reqs: &[Request]) -> Summary {
    let oneoffs = reqs.iter().filter(|r| r.kind == Kind::OneOff).count();
    let conversations = reqs.iter().filter(|r| matches!(r.kind, Kind::Turn { turn: 1, .. })).count();
    let bytes: usize = reqs.iter().map(|r| r.body.len()).sum();
    Summary { requests: reqs.len(), oneoffs, conversations, mean_body_bytes: bytes / reqs.len().max(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_turns_extend_earlier_prompts() {
        let cfg = WorkloadConfig::new(7, 50.0, Duration::from_secs(10));
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.body == y.body && x.at == y.at && x.session == y.session));
        // Rate: about 500 arrivals.
        assert!((400..600).contains(&a.len()), "{}", a.len());
        // Turn k+1's messages start with turn k's messages.
        let msgs = |r: &Request| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["messages"].as_array().unwrap().clone()
        };
        let mut checked = 0;
        for (i, r) in a.iter().enumerate() {
            if let Kind::Turn { conversation, turn } = r.kind {
                if let Some(next) = a[i + 1..].iter().find(|n| n.kind == Kind::Turn { conversation, turn: turn + 1 }) {
                    let (m, n) = (msgs(r), msgs(next));
                    assert_eq!(n[..m.len()], m[..]);
                    assert_eq!(n.len(), m.len() + 2);
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "{checked}");
        let s = summary(&a);
        assert!(s.oneoffs * 100 / s.requests > 15 && s.oneoffs * 100 / s.requests < 35);
    }
}
