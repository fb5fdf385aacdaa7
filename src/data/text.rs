//! Text utilities shared by the corpus readers and the ingest stage: the normal form used
//! for exact de-duplication, the seeded content hashes that decide sampling and the
//! train/eval split, and splitting an over-long document at natural boundaries.
//!
//! Every decision made from a hash depends only on (seed, normalised text), never on a
//! document's position, so adding documents to a corpus never changes what happens to
//! the ones already in it.

/// Writes the normal form of `text` into `out` (cleared first): Unicode lower case, runs
/// of whitespace collapsed to one space, no leading or trailing whitespace. Two documents
/// are duplicates when their normal forms are equal.
pub fn normalize_into(text: &str, out: &mut String) {
    out.clear();
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
}

/// The normal form of `text` (see [`normalize_into`]).
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    normalize_into(text, &mut out);
    out
}

/// What a hash is used for; each purpose hashes in its own domain so that, for example,
/// the documents sampled out by `max_docs` are not correlated with the eval split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Exact de-duplication (seed-independent).
    Dedup,
    /// The train/eval split.
    Split,
    /// The `max_docs` sample.
    Sample,
}

impl Purpose {
    fn context(self) -> &'static str {
        match self {
            Purpose::Dedup => "trainyard ingest 2025 dedup v1",
            Purpose::Split => "trainyard ingest 2025 split v1",
            Purpose::Sample => "trainyard ingest 2025 sample v1",
        }
    }
}

/// A 256-bit blake3 digest of (purpose, seed, normalised text), for [`Purpose`]'s needs.
fn digest(purpose: Purpose, seed: u64, normalized: &str) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(purpose.context());
    hasher.update(&seed.to_le_bytes());
    hasher.update(normalized.as_bytes());
    *hasher.finalize().as_bytes()
}

/// The 128-bit identity of a normalised text for exact de-duplication (a collision
/// between two different texts is vanishingly unlikely: about n²/2¹²⁹ for n documents).
pub fn dedup_key(normalized: &str) -> u128 {
    let bytes = digest(Purpose::Dedup, 0, normalized);
    let mut head = [0; 16];
    head.copy_from_slice(&bytes[..16]);
    u128::from_le_bytes(head)
}

/// A uniform 64-bit hash of (purpose, seed, normalised text).
pub fn seeded_hash(purpose: Purpose, seed: u64, normalized: &str) -> u64 {
    let bytes = digest(purpose, seed, normalized);
    let mut head = [0; 8];
    head.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(head)
}

/// Whether a document belongs to the eval split: `hash / 2^64 < eval_ratio`. The decision
/// depends only on the seed and the document's own normalised text.
pub fn is_eval(seed: u64, normalized: &str, eval_ratio: f64) -> bool {
    let hash = seeded_hash(Purpose::Split, seed, normalized);
    // 2^-64 spacing: exact for every hash; the comparison is the definition above.
    (hash as f64) / 18_446_744_073_709_551_616.0 < eval_ratio
}

/// Splits `text` into pieces of at most `max_chars` characters (Unicode scalar values),
/// cutting at the last paragraph break that fits, else the last sentence end, else the
/// last whitespace, else mid-word. Whitespace at the cuts is dropped; pieces are never
/// empty. A text that already fits comes back as one piece.
pub fn split_long(text: &str, max_chars: usize) -> Vec<&str> {
    let max_chars = max_chars.max(1);
    let mut pieces = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        // Byte offset just past the first `max_chars` characters, if the text is longer.
        let Some((limit, _)) = rest.char_indices().nth(max_chars) else {
            pieces.push(rest);
            break;
        };
        let cut = best_cut(rest, limit).unwrap_or(limit);
        let (piece, tail) = rest.split_at(cut);
        let piece = piece.trim_end();
        if !piece.is_empty() {
            pieces.push(piece);
        }
        rest = tail.trim_start();
    }
    pieces
}

/// The byte offset in `rest` to cut at (the piece is `rest[..cut]`, so `cut <= limit`),
/// preferring the last paragraph break, then the last sentence end, then the last
/// whitespace. A boundary exactly at `limit` counts.
fn best_cut(rest: &str, limit: usize) -> Option<usize> {
    // Candidate cuts, last first: every character boundary up to and including `limit`.
    let boundaries = || {
        std::iter::once(limit)
            .chain(rest[..limit].char_indices().rev().map(|(at, _)| at))
            .filter(|&at| at > 0)
    };
    boundaries()
        .find(|&at| rest[at..].starts_with("\n\n"))
        .or_else(|| {
            boundaries().find(|&at| {
                rest[..at].ends_with(['.', '!', '?', '。'])
                    && rest[at..].starts_with(char::is_whitespace)
            })
        })
        .or_else(|| boundaries().find(|&at| rest[at..].starts_with(char::is_whitespace)))
}

/// Number of characters (Unicode scalar values) in `text`.
pub fn char_count(text: &str) -> usize {
    text.chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_form_lowercases_unicode_and_collapses_whitespace() {
        assert_eq!(normalize("  Hello\t\tWORLD \n"), "hello world");
        assert_eq!(normalize("ÉCOLE  Straße"), "école straße");
        assert_eq!(normalize("ΑΘΗΝΑ\u{00a0}x"), "αθηνα x");
        assert_eq!(normalize(" \n "), "");
    }

    #[test]
    fn dedup_key_ignores_case_and_spacing_only() {
        assert_eq!(
            dedup_key(&normalize("A  b\nc")),
            dedup_key(&normalize("a B c"))
        );
        assert_ne!(
            dedup_key(&normalize("a b c")),
            dedup_key(&normalize("a b d"))
        );
    }

    #[test]
    fn split_decision_depends_on_seed_and_text_only() {
        let texts: Vec<String> = (0..4000).map(|i| format!("document {i}")).collect();
        let eval: Vec<bool> = texts.iter().map(|t| is_eval(7, t, 0.1)).collect();
        let again: Vec<bool> = texts.iter().rev().map(|t| is_eval(7, t, 0.1)).collect();
        assert_eq!(eval, again.into_iter().rev().collect::<Vec<_>>());
        let share = eval.iter().filter(|&&e| e).count() as f64 / texts.len() as f64;
        assert!((0.08..0.12).contains(&share), "{share}");
        let other: Vec<bool> = texts.iter().map(|t| is_eval(8, t, 0.1)).collect();
        assert_ne!(eval, other);
        assert!(texts.iter().all(|t| !is_eval(7, t, 0.0)));
        assert!(texts.iter().all(|t| is_eval(7, t, 1.0)));
    }

    #[test]
    fn split_long_prefers_paragraphs_then_sentences_then_spaces() {
        let text = "First paragraph here.\n\nSecond one is a bit longer. It has two sentences.";
        let pieces = split_long(text, 40);
        assert_eq!(
            pieces,
            [
                "First paragraph here.",
                "Second one is a bit longer.",
                "It has two sentences."
            ]
        );
        assert_eq!(split_long("aaaa bbbb cccc", 9), ["aaaa bbbb", "cccc"]);
        assert_eq!(split_long("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(split_long("short", 40), ["short"]);
        assert!(split_long("  \n ", 3).is_empty());
    }

    #[test]
    fn split_long_counts_characters_not_bytes() {
        let text = "ééééé ééééé";
        let pieces = split_long(text, 5);
        assert_eq!(pieces, ["ééééé", "ééééé"]);
        for max in 1..12 {
            for piece in split_long("日本語の文章です。次の文。", max) {
                assert!(char_count(piece) <= max, "{piece} > {max}");
            }
        }
    }
}
