//! Hashing for maps keyed by small integers (job ids, config ids and tuples
//! of them) on the request path: a multiply per word instead of SipHash,
//! which costs more than the lookup it protects. The keys are counters and
//! config-bounded ids, never client-chosen, so flooding is not a concern.

use std::hash::{BuildHasher, Hasher};

/// A `BuildHasher` for integer keys.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher;

impl BuildHasher for IdHasher {
    type Hasher = IdHash;
    fn build_hasher(&self) -> IdHash {
        IdHash(0)
    }
}

/// Folds each word in with a multiply by the golden ratio (Fibonacci hashing).
pub struct IdHash(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IdHash {
    fn finish(&self) -> u64 {
        // The table indexes by the low bits: move the well-mixed high ones down.
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn sequential_and_tuple_keys_spread_over_the_low_bits() {
        // Consecutive ids and small tuples land in distinct buckets of a
        // power-of-two table far more often than not.
        let buckets = |keys: Vec<u64>| {
            let n = keys.len();
            let low: HashSet<u64> = keys.into_iter().map(|k| k & (n as u64 - 1)).collect();
            low.len() as f64 / n as f64
        };
        let ids = (0..1024u64).map(|i| IdHasher.hash_one(i)).collect();
        assert!(buckets(ids) > 0.6);
        let tuples = (0..32u32)
            .flat_map(|a| (0..32u32).map(move |b| (a, b, 200u16)))
            .map(|t| IdHasher.hash_one(t))
            .collect();
        assert!(buckets(tuples) > 0.6);
    }
}
