//! A tokenizer stand-in: one token per 4 bytes of prompt text (rounded up), and vLLM-style chained block
//! hashes over those pseudo-tokens. Real tokenization does not matter for routing; what matters is that
//! equal prefixes give equal leading block hashes and that prompt length drives prefill cost.

/// Bytes per pseudo-token.
pub const BYTES_PER_TOKEN: usize = 4;

/// A prompt as the engine sees it: its token count and the chained hash of each full block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    /// Number of prompt tokens (`ceil(bytes / 4)`).
    pub tokens: u32,
    /// Hash of each *full* block of `block_size` tokens; block `i`'s hash covers blocks `0..=i` (chained).
    pub block_hashes: Vec<u64>,
}

/// Number of pseudo-tokens in `text`.
pub fn count_tokens(text: &[u8]) -> u32 {
    u32::try_from(text.len().div_ceil(BYTES_PER_TOKEN)).unwrap_or(u32::MAX)
}

/// Tokenize prompt bytes and hash its full blocks, chaining each block's hash over the previous one and
/// seeding the chain with the model name (like vLLM's `NONE_HASH` seed), so different models never share.
pub fn tokenize(model: &str, text: &[u8], block_size: usize) -> Tokenized {
    let tokens = count_tokens(text);
    let block_bytes = block_size.max(1) * BYTES_PER_TOKEN;
    let mut prev = fnv1a(FNV_OFFSET, model.as_bytes());
    let block_hashes = text
        .chunks_exact(block_bytes)
        .map(|block| {
            prev = fnv1a(fnv1a(FNV_OFFSET, &prev.to_le_bytes()), block);
            prev
        })
        .collect();
    Tokenized { tokens, block_hashes }
}

/// Render chat messages the way a chat template would, so a conversation's earlier turns are a byte prefix
/// of its later requests (which is what makes prefix caching pay off for multi-turn chat).
pub fn chat_prompt<'a>(messages: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        out.push_str("<|");
        out.push_str(role);
        out.push_str("|>\n");
        out.push_str(&content);
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    out
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a continued from `state`: cheap, deterministic across runs and platforms.
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_up() {
        assert_eq!(count_tokens(b""), 0);
        assert_eq!(count_tokens(b"a"), 1);
        assert_eq!(count_tokens(b"abcd"), 1);
        assert_eq!(count_tokens(b"abcde"), 2);
    }

    #[test]
    fn shared_prefix_shares_leading_hashes() {
        let a = tokenize("m", &[b'x'; 200], 16);
        let mut long = vec![b'x'; 128];
        long.extend_from_slice(&[b'y'; 72]);
        let b = tokenize("m", &long, 16);
        assert_eq!(a.tokens, 50);
        assert_eq!(a.block_hashes.len(), 3);
        assert_eq!(a.block_hashes[..2], b.block_hashes[..2]);
        assert_ne!(a.block_hashes[2], b.block_hashes[2]);
        // Chained: identical block content at a different position hashes differently.
        assert_ne!(a.block_hashes[0], a.block_hashes[1]);
        // Seeded by model.
        assert_ne!(tokenize("other", &[b'x'; 200], 16).block_hashes[0], a.block_hashes[0]);
    }
}
