//! Byte-level BPE training over pre-token counts, deterministic by construction: the
//! vocabulary starts with the special tokens and all 256 byte characters (so every
//! string can be encoded), then the most frequent adjacent pair is merged until the
//! vocabulary is full or no pair occurs `min_frequency` times. Ties go to the pair of
//! smaller ids, as in the `tokenizers` crate's trainer; unlike it, nothing here depends
//! on hash-map order or thread timing, so the same counts always give the same merges.
//!
//! The result is a plain vocabulary and merge list, which `tokenizers`' `BPE` model
//! encodes with exactly (merges apply by rank).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::interrupt::{CancelFlag, Interrupted};

use super::corpus::{FastState, Progress};
use super::pretokenize::BYTE_CHARS;

type Pair = (u32, u32);

/// A trained byte-level BPE model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpeModel {
    /// Token of every id, in id order: the special tokens, the 256 byte characters
    /// (in code point order), then one token per merge that made a new one.
    pub vocab: Vec<String>,
    /// The merges, in rank order, as pairs of ids.
    pub merges: Vec<Pair>,
}

/// Trains byte-level BPE on `words` (raw pre-tokens with counts, as produced by
/// [`super::corpus::count_words`]). `vocab_size` counts the special tokens and the byte
/// alphabet; it must leave room for both. Stops with [`Interrupted`]
/// when `cancel` is set.
pub fn train_bpe(
    words: &[(Box<str>, u64)],
    special_tokens: &[&str],
    vocab_size: usize,
    min_frequency: u64,
    cancel: &CancelFlag,
    progress: &mut dyn FnMut(Progress),
) -> Result<BpeModel, Interrupted> {
    let mut vocab: Vec<String> = special_tokens
        .iter()
        .map(|token| token.to_string())
        .collect();
    let mut alphabet: Vec<(char, u8)> = BYTE_CHARS
        .iter()
        .enumerate()
        .map(|(byte, &c)| (c, byte as u8))
        .collect();
    alphabet.sort_unstable();
    let mut byte_id = [0u32; 256];
    for (c, byte) in alphabet {
        byte_id[usize::from(byte)] = vocab.len() as u32;
        vocab.push(c.to_string());
    }
    let mut ids: HashMap<String, u32, FastState> = HashMap::default();
    for (id, token) in vocab.iter().enumerate() {
        ids.entry(token.clone()).or_insert(id as u32);
    }

    let mut symbols: Vec<Vec<u32>> = Vec::with_capacity(words.len());
    let mut counts: Vec<i64> = Vec::with_capacity(words.len());
    for (word, count) in words {
        symbols.push(
            word.bytes()
                .map(|byte| byte_id[usize::from(byte)])
                .collect(),
        );
        counts.push(i64::try_from(*count).unwrap_or(i64::MAX));
    }

    // Pair counts and, per pair, the words it may occur in (possibly stale or repeated:
    // merging checks the word itself).
    let mut pair_counts: HashMap<Pair, i64, FastState> = HashMap::default();
    let mut words_with: HashMap<Pair, Vec<u32>, FastState> = HashMap::default();
    for (index, word) in symbols.iter().enumerate() {
        for window in word.windows(2) {
            let pair = (window[0], window[1]);
            *pair_counts.entry(pair).or_insert(0) += counts[index];
            let places = words_with.entry(pair).or_default();
            if places.last() != Some(&(index as u32)) {
                places.push(index as u32);
            }
        }
    }
    let mut queue: BinaryHeap<(i64, Reverse<Pair>)> = pair_counts
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(pair, count)| (*count, Reverse(*pair)))
        .collect();

    let mut merges: Vec<Pair> = Vec::new();
    let mut changes: Vec<(Pair, i64)> = Vec::new();
    let mut grown: Vec<Pair> = Vec::new();
    let mut merged_word: Vec<u32> = Vec::new();
    while vocab.len() < vocab_size {
        let Some((count, Reverse(pair))) = queue.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if count != current {
            if current > 0 {
                queue.push((current, Reverse(pair)));
            }
            continue;
        }
        if count < 1 || (count as u64) < min_frequency {
            break;
        }
        let token = format!("{}{}", vocab[pair.0 as usize], vocab[pair.1 as usize]);
        let new_id = match ids.get(&token) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                ids.insert(token.clone(), id);
                vocab.push(token);
                id
            }
        };
        merges.push(pair);

        let mut places = words_with.remove(&pair).unwrap_or_default();
        places.sort_unstable();
        places.dedup();
        grown.clear();
        for &index in &places {
            let word = &mut symbols[index as usize];
            changes.clear();
            if !merge_word(word, pair, new_id, &mut merged_word, &mut changes) {
                continue;
            }
            std::mem::swap(word, &mut merged_word);
            let count = counts[index as usize];
            for &(changed, delta) in &changes {
                if changed == pair {
                    continue;
                }
                *pair_counts.entry(changed).or_insert(0) += delta * count;
                if delta > 0 {
                    let list = words_with.entry(changed).or_default();
                    if list.last() != Some(&index) {
                        list.push(index);
                    }
                    grown.push(changed);
                }
            }
        }
        pair_counts.remove(&pair);
        grown.sort_unstable();
        grown.dedup();
        for &changed in &grown {
            let count = pair_counts.get(&changed).copied().unwrap_or(0);
            if count > 0 {
                queue.push((count, Reverse(changed)));
            }
        }
        if merges.len().is_multiple_of(256) {
            if cancel.is_cancelled() {
                return Err(Interrupted);
            }
            progress(Progress {
                phase: "merging pairs",
                done: (vocab.len() as u64).min(vocab_size as u64),
                total: vocab_size as u64,
                unit: "tokens",
            });
        }
    }
    Ok(BpeModel { vocab, merges })
}

/// Replaces every occurrence of `pair` in `word` (left to right, without overlap) with
/// `new_id`, writing the result to `out` and the pair-count changes (per occurrence of
/// the word) to `changes`. Returns whether the word held the pair.
fn merge_word(
    word: &[u32],
    pair: Pair,
    new_id: u32,
    out: &mut Vec<u32>,
    changes: &mut Vec<(Pair, i64)>,
) -> bool {
    let (a, b) = pair;
    out.clear();
    let mut found = false;
    let mut at = 0;
    while at < word.len() {
        if at + 1 < word.len() && word[at] == a && word[at + 1] == b {
            found = true;
            if let Some(&previous) = out.last() {
                changes.push(((previous, a), -1));
                changes.push(((previous, new_id), 1));
            }
            if let Some(&next) = word.get(at + 2) {
                changes.push(((b, next), -1));
                changes.push(((new_id, next), 1));
            }
            out.push(new_id);
            at += 2;
        } else {
            out.push(word[at]);
            at += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[(&str, u64)]) -> Vec<(Box<str>, u64)> {
        let mut words: Vec<(Box<str>, u64)> = list
            .iter()
            .map(|(word, count)| ((*word).into(), *count))
            .collect();
        words.sort();
        words
    }

    #[test]
    fn merges_the_most_frequent_pair_first_and_stops_at_min_frequency() {
        let model = train_bpe(
            &words(&[
                ("hug", 10),
                ("pug", 5),
                ("pun", 12),
                ("bun", 4),
                ("hugs", 5),
            ]),
            &["<s>"],
            1000,
            2,
            &CancelFlag::new(),
            &mut |_| {},
        )
        .unwrap();
        let merged: Vec<&str> = model.vocab[257..].iter().map(String::as_str).collect();
        // u+g: 20, u+n: 16, h+ug: 15, p+un: 12, ug+s: 5, p+ug: 5, b+un: 4 (ties: smaller ids first).
        assert_eq!(merged, ["ug", "un", "hug", "pun", "pug", "hugs", "bun"]);
        assert_eq!(model.merges.len(), 7);
    }

    #[test]
    fn overlapping_pairs_are_counted_and_merged_left_to_right() {
        let model = train_bpe(
            &words(&[("aaaa", 3), ("aaa", 1)]),
            &[],
            256 + 2,
            1,
            &CancelFlag::new(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(model.vocab[256..], ["aa".to_string(), "aaaa".to_string()]);
    }

    #[test]
    fn vocab_size_caps_the_vocabulary() {
        let text: Vec<(Box<str>, u64)> = words(&[("abcdefghij", 5), ("klmnopqrst", 5)]);
        let model = train_bpe(
            &text,
            &["x", "y"],
            2 + 256 + 3,
            1,
            &CancelFlag::new(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(model.vocab.len(), 2 + 256 + 3);
        assert_eq!(model.merges.len(), 3);
    }
}
