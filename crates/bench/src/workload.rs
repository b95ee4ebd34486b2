//! The routing bench's workloads: seeded, deterministic chat traffic that looks like a chat product's to
//! prefix caches, replayed byte for byte against every router.
//!
//! - A set of long **system prompts** shared by many conversations, drawn with a popularity law: uniform,
//!   or Zipf (a few hot prompts carry most of the traffic). A prompt's tokens are the cache's big win.
//! - **Multi-turn conversations**: turn `k` sends the whole history (system prompt, earlier user messages
//!   and assistant replies) plus a new user message, so it extends turn `k - 1`'s prompt byte for byte.
//!   Assistant replies are drawn here, not taken from the worker's answer, so every body is fixed by the
//!   seed alone.
//! - Optional **one-off prompts** with unique text, which no cache can help.
//!
//! A [`Stream`] is one client's endless, deterministic sequence of requests (conversation after
//! conversation). Closed-loop clients each own one: client `i` sends the same bodies in the same order
//! behind every router, however fast the router answers. The open loop ([`open_loop`]) draws arrival
//! times from a rate that may burst and hands each arrival to one of a fixed set of streams, all fixed by
//! the seed before the run starts.

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

/// How often each system prompt is chosen by a new conversation.
#[derive(Clone, Copy, Debug)]
pub enum Popularity {
    /// Every prompt equally often.
    Uniform,
    /// Prompt `k` (from 0) with weight `1 / (k + 1)^s`.
    Zipf(f64),
}

/// The shape of a workload.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Seed of every draw.
    pub seed: u64,
    /// Model name in every body.
    pub model: String,
    /// Number of distinct system prompts.
    pub system_prompts: usize,
    /// Length range of a system prompt, characters.
    pub system_chars: (usize, usize),
    /// How conversations pick their system prompt.
    pub popularity: Popularity,
    /// Range of the number of turns of a conversation.
    pub turns: (u32, u32),
    /// Length range of a user message, characters.
    pub user_chars: (usize, usize),
    /// Length range of an assistant reply appended to the history, characters.
    pub reply_chars: (usize, usize),
    /// Share of requests that are one-off prompts with unique text.
    pub oneoff_share: f64,
    /// Length range of a one-off prompt, characters.
    pub oneoff_chars: (usize, usize),
    /// `max_tokens` of every request.
    pub max_tokens: u32,
}

impl Shape {
    /// One line for the bench's header.
    pub fn describe(&self) -> String {
        let popularity = match self.popularity {
            Popularity::Uniform => "uniform".to_owned(),
            Popularity::Zipf(s) => format!("Zipf s={s}"),
        };
        format!(
            "{} system prompts of {}-{} chars ({popularity}); conversations of {}-{} turns (user {}-{} chars, \
             reply {}-{} chars); {:.0}% one-offs of {}-{} chars; max_tokens {}; seed {}",
            self.system_prompts,
            self.system_chars.0,
            self.system_chars.1,
            self.turns.0,
            self.turns.1,
            self.user_chars.0,
            self.user_chars.1,
            self.reply_chars.0,
            self.reply_chars.1,
            self.oneoff_share * 100.0,
            self.oneoff_chars.0,
            self.oneoff_chars.1,
            self.max_tokens,
            self.seed,
        )
    }
}

/// What kind of request a body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Turn `turn` (from 1) of a conversation.
    Turn {
        /// The stream (client) it belongs to.
        stream: u64,
        /// Conversation number within its stream.
        conversation: u64,
        /// Turn number, from 1.
        turn: u32,
        /// Its system prompt's index in the corpus.
        system: usize,
    },
    /// A one-off prompt with unique text.
    OneOff,
}

/// One request of a workload.
#[derive(Clone, Debug)]
pub struct Request {
    /// `X-Session-Id`: the conversation (or the one-off's own id), unique over all streams.
    pub session: String,
    /// What it is (the tests check turn order with it; the samples name its system prompt and turn).
    pub kind: Kind,
    /// The JSON body, streamed with usage.
    pub body: Bytes,
}

/// The system prompts of a workload and the law that picks them: shared by all its streams.
pub struct Corpus {
    shape: Shape,
    systems: Vec<String>,
    /// Cumulative popularity of the system prompts, ending at 1.
    cdf: Vec<f64>,
}

impl Corpus {
    /// The prompts of `shape`, drawn from its seed.
    pub fn new(shape: Shape) -> Arc<Self> {
        let mut rng = SmallRng::seed_from_u64(shape.seed);
        let n = shape.system_prompts.max(1);
        let systems: Vec<String> =
            (0..n).map(|i| format!("You are assistant #{i}. {}", text(&mut rng, shape.system_chars))).collect();
        let weights: Vec<f64> = (0..n)
            .map(|k| match shape.popularity {
                Popularity::Uniform => 1.0,
                Popularity::Zipf(s) => 1.0 / ((k + 1) as f64).powf(s),
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Arc::new(Self { shape, systems, cdf })
    }

    /// The system prompts.
    pub fn systems(&self) -> &[String] {
        &self.systems
    }

    /// Share of new conversations that pick system prompt `k`.
    #[cfg(test)]
    fn popularity(&self, k: usize) -> f64 {
        let below = if k == 0 { 0.0 } else { self.cdf.get(k - 1).copied().unwrap_or(1.0) };
        self.cdf.get(k).copied().unwrap_or(1.0) - below
    }

    fn pick_system(&self, rng: &mut SmallRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.iter().position(|c| u < *c).unwrap_or(self.cdf.len() - 1)
    }

    fn body(&self, messages: &[(&str, &str)]) -> Bytes {
        let messages: Vec<_> =
            messages.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
        Bytes::from(
            serde_json::json!({
                "model": self.shape.model,
                "messages": messages,
                "max_tokens": self.shape.max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string(),
        )
    }
}

struct Conversation {
    id: u64,
    system: usize,
    turns: u32,
    sent: u32,
    /// `(role, content)` so far, without the system prompt.
    history: Vec<(&'static str, String)>,
}

/// One client's endless sequence of requests: the next turn of its current conversation (a new one when
/// the last ended), or now and then a one-off. Same corpus and client number, same sequence.
pub struct Stream {
    corpus: Arc<Corpus>,
    client: u64,
    rng: SmallRng,
    conversation: Option<Conversation>,
    next_conversation: u64,
    oneoffs: u64,
}

impl Stream {
    /// Client `client`'s stream over `corpus`.
    pub fn new(corpus: Arc<Corpus>, client: u64) -> Self {
        let seed = splitmix64(corpus.shape.seed ^ splitmix64(client.wrapping_add(1)));
        Self {
            corpus,
            client,
            rng: SmallRng::seed_from_u64(seed),
            conversation: None,
            next_conversation: 0,
            oneoffs: 0,
        }
    }

    /// The next request.
    pub fn next_request(&mut self) -> Request {
        let shape = &self.corpus.shape;
        if shape.oneoff_share > 0.0 && self.rng.random::<f64>() < shape.oneoff_share {
            let id = self.oneoffs;
            self.oneoffs += 1;
            let content = format!("One-off {}-{id}: {}", self.client, text(&mut self.rng, shape.oneoff_chars));
            let body = self.corpus.body(&[("user", content.as_str())]);
            return Request { session: format!("c{}-oneoff-{id}", self.client), kind: Kind::OneOff, body };
        }
        let conv = match self.conversation.take() {
            Some(c) if c.sent < c.turns => c,
            _ => {
                let id = self.next_conversation;
                self.next_conversation += 1;
                let (lo, hi) = (shape.turns.0.min(shape.turns.1), shape.turns.0.max(shape.turns.1));
                Conversation {
                    id,
                    system: self.corpus.pick_system(&mut self.rng),
                    turns: self.rng.random_range(lo..=hi).max(1),
                    sent: 0,
                    history: Vec::new(),
                }
            }
        };
        let mut conv = conv;
        if conv.sent > 0 {
            // The previous turn's answer joins the history before the next question.
            let reply = text(&mut self.rng, shape.reply_chars);
            conv.history.push(("assistant", reply));
        }
        let question = text(&mut self.rng, shape.user_chars);
        conv.history.push(("user", question));
        conv.sent += 1;
        let mut messages: Vec<(&str, &str)> = vec![("system", self.corpus.systems[conv.system].as_str())];
        messages.extend(conv.history.iter().map(|(r, c)| (*r, c.as_str())));
        let req = Request {
            session: format!("c{}-conv-{}", self.client, conv.id),
            kind: Kind::Turn { stream: self.client, conversation: conv.id, turn: conv.sent, system: conv.system },
            body: self.corpus.body(&messages),
        };
        self.conversation = Some(conv);
        req
    }
}

/// A rate that is `base` per second, and `burst` per second during the first `burst_len` of every
/// `period` (so `period` and `burst_len` equal to zero mean a steady rate).
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Arrivals per second between bursts.
    pub base: f64,
    /// Arrivals per second during a burst.
    pub burst: f64,
    /// Time from the start of one burst to the next.
    pub period: Duration,
    /// Length of a burst.
    pub burst_len: Duration,
}

impl Rate {
    /// Arrivals per second at `t` seconds from the start.
    pub fn at(&self, t: f64) -> f64 {
        let period = self.period.as_secs_f64();
        if period > 0.0 && t.rem_euclid(period) < self.burst_len.as_secs_f64() {
            self.burst
        } else {
            self.base
        }
    }
}

/// One arrival of an open loop.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Time from the start of the run.
    pub at: Duration,
    /// The request.
    pub request: Request,
}

/// An open-loop schedule for `duration`: Poisson arrivals at `rate` (by thinning, so bursts start and end
/// sharply), each the next request of one of `streams` streams chosen uniformly. Fixed by the seed.
pub fn open_loop(corpus: &Arc<Corpus>, streams: usize, rate: Rate, duration: Duration) -> Vec<Arrival> {
    let mut rng = SmallRng::seed_from_u64(splitmix64(corpus.shape.seed ^ 0x6f70_656e));
    let mut streams: Vec<Stream> = (0..streams.max(1) as u64).map(|i| Stream::new(Arc::clone(corpus), i)).collect();
    let max = rate.base.max(rate.burst).max(1e-9);
    let end = duration.as_secs_f64();
    let mut out = Vec::new();
    let mut t = 0.0f64;
    loop {
        // Exponential gap at the peak rate: -ln(U) / max, U in (0, 1]; kept with probability rate(t) / max.
        let u: f64 = 1.0 - rng.random::<f64>();
        t += -u.ln() / max;
        if t >= end {
            break;
        }
        if rng.random::<f64>() * max >= rate.at(t) {
            continue;
        }
        let i = rng.random_range(0..streams.len());
        out.push(Arrival { at: Duration::from_secs_f64(t), request: streams[i].next_request() });
    }
    out
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(popularity: Popularity) -> Shape {
        Shape {
            seed: 7,
            model: "m".into(),
            system_prompts: 8,
            system_chars: (500, 800),
            popularity,
            turns: (2, 5),
            user_chars: (50, 100),
            reply_chars: (50, 100),
            oneoff_share: 0.1,
            oneoff_chars: (100, 200),
            max_tokens: 16,
        }
    }

    fn messages(r: &Request) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["messages"].as_array().unwrap().clone()
    }

    #[test]
    fn streams_are_deterministic_and_turns_extend_earlier_prompts() {
        let corpus = Corpus::new(shape(Popularity::Uniform));
        let again = Corpus::new(shape(Popularity::Uniform));
        let mut a = Stream::new(Arc::clone(&corpus), 3);
        let mut b = Stream::new(again, 3);
        let mut other = Stream::new(Arc::clone(&corpus), 4);
        let xs: Vec<Request> = (0..200).map(|_| a.next_request()).collect();
        let ys: Vec<Request> = (0..200).map(|_| b.next_request()).collect();
        assert!(xs.iter().zip(&ys).all(|(x, y)| x.body == y.body && x.session == y.session));
        assert_ne!(xs[0].body, other.next_request().body, "clients differ");
        let (mut checked, mut oneoffs) = (0, 0);
        for w in xs.windows(2) {
            match (w[0].kind, w[1].kind) {
                (Kind::Turn { conversation: c0, turn: t0, .. }, Kind::Turn { conversation: c1, turn: t1, .. })
                    if c0 == c1 =>
                {
                    assert_eq!(t1, t0 + 1);
                    let (m, n) = (messages(&w[0]), messages(&w[1]));
                    assert_eq!(n[..m.len()], m[..], "turn k+1 extends turn k");
                    assert_eq!(n.len(), m.len() + 2);
                    checked += 1;
                }
                (Kind::OneOff, _) => oneoffs += 1,
                _ => {}
            }
        }
        assert!(checked > 80, "{checked}");
        assert!((5..40).contains(&oneoffs), "{oneoffs}");
    }

    #[test]
    fn zipf_concentrates_traffic_on_the_first_prompts() {
        let corpus = Corpus::new(shape(Popularity::Zipf(1.2)));
        assert!((0..8).map(|k| corpus.popularity(k)).sum::<f64>() > 0.999);
        assert!(corpus.popularity(0) > 3.0 * corpus.popularity(4));
        let mut s = Stream::new(Arc::clone(&corpus), 0);
        let hot = corpus.systems()[0].as_str();
        let first_turns: Vec<Request> =
            (0..2000).map(|_| s.next_request()).filter(|r| matches!(r.kind, Kind::Turn { turn: 1, .. })).collect();
        let on_hot = first_turns.iter().filter(|r| messages(r)[0]["content"] == hot).count();
        let share = on_hot as f64 / first_turns.len() as f64;
        assert!((corpus.popularity(0) - share).abs() < 0.08, "{share} vs {}", corpus.popularity(0));
    }

    #[test]
    fn open_loop_follows_the_rate_and_its_bursts() {
        let corpus = Corpus::new(shape(Popularity::Uniform));
        let rate =
            Rate { base: 20.0, burst: 100.0, period: Duration::from_secs(10), burst_len: Duration::from_secs(2) };
        let a = open_loop(&corpus, 16, rate, Duration::from_secs(30));
        let b = open_loop(&corpus, 16, rate, Duration::from_secs(30));
        assert!(a.iter().zip(&b).all(|(x, y)| x.at == y.at && x.request.body == y.request.body));
        let in_burst = a.iter().filter(|r| r.at.as_secs_f64() % 10.0 < 2.0).count();
        let between = a.len() - in_burst;
        // Expected: 3 bursts x 2 s x 100 = 600; 3 x 8 s x 20 = 480.
        assert!((480..720).contains(&in_burst), "{in_burst}");
        assert!((380..580).contains(&between), "{between}");
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
    }
}
