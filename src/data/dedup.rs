//! Exact de-duplication: the set of the 128-bit keys ([`text::dedup_key`]) of the
//! normalised texts seen so far, 16 bytes per unique document.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use crate::data::text;

/// The keys are already uniform hashes, so the set uses their low bits as they are
/// instead of hashing them again.
#[derive(Default, Clone, Copy)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

/// The normalised texts seen so far.
#[derive(Default)]
pub struct DedupSet(HashSet<u128, BuildHasherDefault<PreHashed>>);

impl DedupSet {
    /// Records `normalized`; `false` if an equal text was recorded before.
    pub fn insert(&mut self, normalized: &str) -> bool {
        self.0.insert(text::dedup_key(normalized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_new_once() {
        let mut seen = DedupSet::default();
        assert!(seen.insert("a b"));
        assert!(!seen.insert("a b"));
        assert!(seen.insert("a c"));
    }
}
