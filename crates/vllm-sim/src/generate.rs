//! One request's life in time: wait for a batch slot, pay the time to first token, then emit tokens one
//! inter-token latency apart. The latency model:
//!
//! - **TTFT** (from scheduling) = `ttft_ms + prefill_ms_per_1k_tokens * uncached_prompt_tokens / 1000
//!   + extra_latency_ms` (the fault). Prefix-cache hits are free, which is what makes cache-aware routing pay.
//! - **ITL** = `itl_ms * (1 + running / max_num_seqs)`, read afresh before each token: a full batch
//!   decodes at half the speed of an empty one, so piling load on one worker shows up in its latency.
//!
//! Token deadlines are absolute (`previous deadline + ITL`), so a reader slower than the ITL gets the
//! backlog in a burst, as from a real engine that does not wait for slow clients.
//!
//! With every latency zero no timer is touched: tokens are produced back to back. A [`Generation`] owns the
//! engine [`Ticket`], so whoever owns the generation (the response body, or the handler future for
//! non-streaming requests) holds the request's load; dropping it mid-way counts an abort.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::Rng;
use tokio::time::Instant;

use crate::engine::Ticket;
use crate::metrics::FinishReason;
use crate::openai::Usage;

/// Latency settings for one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Fixed TTFT part, ms.
    pub ttft_ms: f64,
    /// Prefill ms per 1000 uncached prompt tokens.
    pub prefill_ms_per_1k_tokens: f64,
    /// Base ITL, ms.
    pub itl_ms: f64,
    /// Fault: extra ms before the first token.
    pub extra_latency_ms: u64,
}

/// What the next step of generation produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A token's text.
    Token(&'static str),
    /// The `die_after_tokens` fault fired: the connection must be cut now.
    Died,
    /// All planned tokens were produced.
    Done(FinishReason),
}

const VOCAB: &[&str] = &[
    " the", " model", " token", " cache", " of", " and", " a", " to", " is", " in", " batch", " that", " it", " for",
    " on", " with", " as", " block", " was", " prefix", ".", ",", " worker", " route", " load",
];

/// A request being generated. Dropping it before it is done records an abort and frees its engine slot.
pub struct Generation {
    ticket: Ticket,
    timing: Timing,
    rng: SmallRng,
    arrival: Instant,
    prompt_tokens: u32,
    cached_tokens: u32,
    planned: u32,
    reason: FinishReason,
    die_after: Option<u32>,
    emitted: u32,
    next_at: Option<Instant>,
    finished: bool,
}

impl Generation {
    /// A generation of `planned` tokens ending with `reason`, for a request that arrived at `arrival`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ticket: Ticket,
        timing: Timing,
        rng: SmallRng,
        arrival: Instant,
        prompt_tokens: u32,
        planned: u32,
        reason: FinishReason,
        die_after: Option<u32>,
    ) -> Self {
        Self {
            ticket,
            timing,
            rng,
            arrival,
            prompt_tokens,
            cached_tokens: 0,
            planned,
            reason,
            die_after,
            emitted: 0,
            next_at: None,
            finished: false,
        }
    }

    /// Wait for a batch slot, then for the time to first token.
    pub async fn begin(&mut self) {
        let admitted = self.ticket.admitted().await;
        self.cached_tokens = admitted.cached_tokens;
        let uncached = self.prompt_tokens.saturating_sub(admitted.cached_tokens);
        let t = self.timing;
        let ms = t.ttft_ms + t.prefill_ms_per_1k_tokens * f64::from(uncached) / 1000.0 + t.extra_latency_ms as f64;
        let now = Instant::now();
        let first = now + Duration::from_secs_f64((ms / 1000.0).max(0.0));
        if first > now {
            tokio::time::sleep_until(first).await;
        }
        self.next_at = Some(first);
    }

    /// Produce the next token, after one ITL if it is not the first. Call [`Generation::begin`] first.
    pub async fn next(&mut self) -> Step {
        if self.emitted >= self.planned {
            if !self.finished {
                self.finished = true;
                let m = &self.ticket.engine().metrics;
                m.on_finished(self.reason, self.arrival.elapsed().as_secs_f64());
            }
            return Step::Done(self.reason);
        }
        if self.die_after.is_some_and(|n| self.emitted >= n) {
            return Step::Died;
        }
        if self.emitted > 0 && self.timing.itl_ms > 0.0 {
            let engine = self.ticket.engine();
            let load = engine.running() as f64 / engine.max_num_seqs() as f64;
            let itl = Duration::from_secs_f64(self.timing.itl_ms * (1.0 + load) / 1000.0);
            let at = self.next_at.unwrap_or_else(Instant::now) + itl;
            self.next_at = Some(at);
            tokio::time::sleep_until(at).await;
        }
        let metrics = &self.ticket.engine().metrics;
        if self.emitted == 0 {
            metrics.on_first_token(self.arrival.elapsed().as_secs_f64());
        }
        metrics.on_token();
        self.emitted += 1;
        Step::Token(VOCAB[self.rng.random_range(0..VOCAB.len())])
    }

    /// Token counts so far.
    pub fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.emitted, cached_tokens: self.cached_tokens }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            let m = &self.ticket.engine().metrics;
            m.on_finished(FinishReason::Abort, self.arrival.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::SeedableRng;

    use super::*;
    use crate::engine::Engine;
    use crate::tokenizer::tokenize;

    fn gen(engine: &Arc<Engine>, prompt: &[u8], timing: Timing, planned: u32) -> Generation {
        let p = tokenize("m", prompt, 16);
        let ticket = engine.submit(&p, planned).unwrap();
        let rng = SmallRng::seed_from_u64(0);
        Generation::new(ticket, timing, rng, Instant::now(), p.tokens, planned, FinishReason::Length, None)
    }

    #[tokio::test(start_paused = true)]
    async fn ttft_pays_for_uncached_prompt_and_itl_grows_with_batch() {
        let engine = Arc::new(Engine::new(2, 10, 1000, 16));
        let timing = Timing { ttft_ms: 100.0, prefill_ms_per_1k_tokens: 1000.0, itl_ms: 10.0, extra_latency_ms: 5 };
        let prompt = vec![b'p'; 4000]; // 1000 tokens
        let mut a = gen(&engine, &prompt, timing, 3);
        let t0 = Instant::now();
        a.begin().await;
        // 100 + 1000 * 1000/1000 + 5 ms.
        assert_eq!(t0.elapsed(), Duration::from_millis(1105));
        assert!(matches!(a.next().await, Step::Token(_)));
        assert_eq!(t0.elapsed(), Duration::from_millis(1105), "first token right after TTFT");
        // A second request joins the batch (its prefill is not awaited here).
        let b = gen(&engine, b"short", timing, 1);
        assert_eq!(engine.running(), 2);
        let t1 = Instant::now();
        assert!(matches!(a.next().await, Step::Token(_)));
        // Full 2-slot batch: 10 * (1 + 2/2) = 20 ms.
        assert_eq!(t1.elapsed(), Duration::from_millis(20));
        drop(b);
        let t2 = Instant::now();
        assert!(matches!(a.next().await, Step::Token(_)));
        // Alone: 10 * (1 + 1/2) = 15 ms.
        assert_eq!(t2.elapsed(), Duration::from_millis(15));
        assert_eq!(a.next().await, Step::Done(FinishReason::Length));
        assert_eq!(a.usage().completion_tokens, 3);
        drop(a);
        // Same prompt again: 992 of 1000 tokens hit (whole blocks; the last token is always computed),
        // so prefill costs 8 ms.
        let mut c = gen(&engine, &prompt, timing, 1);
        let t3 = Instant::now();
        c.begin().await;
        assert_eq!(t3.elapsed(), Duration::from_millis(113));
        assert_eq!(c.usage().cached_tokens, 992);
    }
}
