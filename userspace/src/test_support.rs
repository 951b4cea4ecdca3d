//! Helpers shared by unit tests: a seeded generator and random JSON.

/// xorshift64: deterministic, seeded, good enough to shuffle test inputs.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A random JSON value: objects whose keys come from `keys`, arrays, and
/// `leaves` (JSON text), nested at most `depth` levels deep.
pub fn json_value(
    rng: &mut XorShift,
    keys: &[&str],
    leaves: &[&str],
    depth: u32,
    out: &mut String,
) {
    match rng.below(6) {
        0 | 1 if depth > 0 => {
            out.push('{');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                out.push('"');
                out.push_str(rng.pick(keys));
                out.push_str("\":");
                json_value(rng, keys, leaves, depth - 1, out);
            }
            out.push('}');
        }
        2 if depth > 0 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push_str(if rng.below(2) == 0 { "," } else { " , " });
                }
                json_value(rng, keys, leaves, depth - 1, out);
            }
            out.push(']');
        }
        _ => out.push_str(rng.pick(leaves)),
    }
}

/// One random byte of `doc` replaced by a structural one, dropped, or doubled.
pub fn damage(rng: &mut XorShift, doc: &mut Vec<u8>) {
    if doc.is_empty() {
        return;
    }
    const NOISE: &[u8] = b"{}[],:\"\\ 0-.eu";
    let at = rng.below(doc.len() as u64) as usize;
    match rng.below(3) {
        0 => doc[at] = NOISE[rng.below(NOISE.len() as u64) as usize],
        1 => {
            doc.remove(at);
        }
        _ => doc.insert(at, doc[at]),
    }
}
