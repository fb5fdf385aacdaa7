//! The one random number generator trainyard uses for data order and sampling:
//! SplitMix64 (Steele, Lea, Flood 2014; Vigna's reference C). Its whole state is one
//! `u64`, so a training checkpoint saves and restores it exactly, and its streams are
//! fixed by this file alone, on every platform and compiler version.

/// The SplitMix64 increment (2^64 / φ).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 output function: a strong 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A SplitMix64 generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed`; different `stream`s give independent sequences.
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng {
            state: mix64(seed.wrapping_add(stream.wrapping_mul(GOLDEN))),
        }
    }

    /// The generator of item `index` of `stream` under `seed`: items (documents,
    /// conversations) can then be generated independently and in any order.
    pub fn for_item(seed: u64, stream: u64, index: u64) -> Rng {
        Rng::from_state(mix64(Rng::new(seed, stream).state.wrapping_add(index)))
    }

    /// Restores a generator from [`Rng::state`].
    pub fn from_state(state: u64) -> Rng {
        Rng { state }
    }

    /// The whole state, for checkpoints.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// An integer in `0..n` (multiply-shift; bias below 2^-40 for n < 2^24), `n > 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// An index in `0..n`, `n > 0`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// A random element of a non-empty slice.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.index(i + 1));
        }
    }

    /// A float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64_stream() {
        // Vigna's splitmix64.c with x = 1234567: the first outputs.
        let mut rng = Rng::from_state(1234567);
        let outputs: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            outputs,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423
            ]
        );
    }

    #[test]
    fn restoring_the_state_continues_the_same_stream() {
        let mut rng = Rng::new(42, 7);
        rng.next_u64();
        let mut copy = Rng::from_state(rng.state());
        assert_eq!(rng.next_u64(), copy.next_u64());
        assert!((0..1000).map(|_| rng.below(10)).all(|value| value < 10));
        assert!(
            (0..1000)
                .map(|_| rng.next_f64())
                .all(|value| (0.0..1.0).contains(&value))
        );
    }
}
