//! Bottom-k sampling: keeping the k smallest of a stream of seeded keys picks a uniform
//! sample of exactly k items (or all, if fewer) in one pass, with memory bounded by k.

use std::collections::BinaryHeap;

/// The k smallest (hash, ordinal) keys offered so far: a max-heap of at most k.
pub struct BottomK {
    k: usize,
    heap: BinaryHeap<(u64, u64)>,
}

impl BottomK {
    /// An empty sample of at most `k` keys.
    pub fn new(k: u64) -> BottomK {
        let k = usize::try_from(k).unwrap_or(usize::MAX);
        BottomK {
            k,
            // Capped so that a huge `k` does not reserve memory the stream never fills.
            heap: BinaryHeap::with_capacity(k.min(1 << 20)),
        }
    }

    /// Keeps `key` if it is among the k smallest so far.
    pub fn offer(&mut self, key: (u64, u64)) {
        if self.heap.len() < self.k {
            self.heap.push(key);
        } else if self.heap.peek().is_some_and(|&top| key < top) {
            self.heap.pop();
            self.heap.push(key);
        }
    }

    /// The largest key that is kept, or `None` when every key fits.
    pub fn threshold(&self) -> Option<(u64, u64)> {
        (self.heap.len() >= self.k)
            .then(|| self.heap.peek().copied())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bottom_k_keeps_exactly_the_k_smallest_keys() {
        let mut bottom = BottomK::new(3);
        for key in [(5, 0), (1, 1), (9, 2), (3, 3), (1, 4), (7, 5)] {
            bottom.offer(key);
        }
        assert_eq!(bottom.threshold(), Some((3, 3)));
        let mut few = BottomK::new(10);
        few.offer((1, 0));
        assert_eq!(few.threshold(), None);
    }
}
