//! The byte-level pre-tokenizer of trainyard tokenizers, written out by hand for
//! training speed: text is split exactly as GPT-2's regular expression
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` splits it
//! (the expression the `tokenizers` crate's `ByteLevel` pre-tokenizer uses when a
//! tokenizer encodes), and every byte of a piece maps to one printable character.
//!
//! The character classes come from the same Unicode tables as the `regex` crate's, so
//! training and encoding agree on every string; a property test checks this against the
//! `tokenizers` crate itself.

use std::sync::LazyLock;

/// The class of a character, as GPT-2's split expression sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\s` (Unicode `White_Space`).
    Space,
    /// Everything else: `[^\s\p{L}\p{N}]`.
    Other,
}

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

/// Character classes: a table for the Basic Multilingual Plane, sorted ranges above it.
struct Classes {
    bmp: Vec<u8>,
    astral: Vec<(u32, u32, u8)>,
}

static CLASSES: LazyLock<Classes> = LazyLock::new(|| {
    let mut bmp = vec![0u8; 0x10000];
    let mut astral = Vec::new();
    for (pattern, class) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
        for (start, end) in unicode_class(pattern) {
            for code in start..=end.min(0xFFFF) {
                bmp[code as usize] = class;
            }
            if end > 0xFFFF {
                astral.push((start.max(0x10000), end, class));
            }
        }
    }
    astral.sort_unstable();
    Classes { bmp, astral }
});

/// The code point ranges of a one-class expression, from the `regex` crate's tables.
fn unicode_class(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    // The patterns are constants of this module, so parsing them cannot fail.
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("constant Unicode class pattern");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|range| (u32::from(range.start()), u32::from(range.end())))
            .collect(),
        _ => Vec::new(),
    }
}

fn class_of(c: char) -> Class {
    let code = u32::from(c);
    let classes = &*CLASSES;
    let class = if code < 0x10000 {
        classes.bmp[code as usize]
    } else {
        match classes.astral.binary_search_by(|&(start, end, _)| {
            if end < code {
                std::cmp::Ordering::Less
            } else if start > code {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(index) => classes.astral[index].2,
            Err(_) => 0,
        }
    };
    match class {
        LETTER => Class::Letter,
        NUMBER => Class::Number,
        SPACE => Class::Space,
        _ => Class::Other,
    }
}

/// The character starting at byte `at` of `text`, and its length in bytes.
#[inline]
fn char_at(text: &str, at: usize) -> (char, usize) {
    let byte = text.as_bytes()[at];
    if byte < 0x80 {
        return (char::from(byte), 1);
    }
    match text[at..].chars().next() {
        Some(c) => (c, c.len_utf8()),
        None => (char::REPLACEMENT_CHARACTER, 1),
    }
}

/// The end of the longest run of characters of `class` starting at byte `at`.
#[inline]
fn run_end(text: &str, mut at: usize, class: Class) -> usize {
    while at < text.len() {
        let (c, width) = char_at(text, at);
        if class_of(c) != class {
            break;
        }
        at += width;
    }
    at
}

/// Where the piece that starts at byte `at` ends.
fn piece_end(text: &str, at: usize) -> usize {
    let bytes = text.as_bytes();
    let (first, width) = char_at(text, at);
    // 's 't 're 've 'm 'll 'd
    if first == '\'' {
        match bytes.get(at + 1) {
            Some(b's' | b't' | b'm' | b'd') => return at + 2,
            Some(b'r') if bytes.get(at + 2) == Some(&b'e') => return at + 3,
            Some(b'v') if bytes.get(at + 2) == Some(&b'e') => return at + 3,
            Some(b'l') if bytes.get(at + 2) == Some(&b'l') => return at + 3,
            _ => {}
        }
    }
    //  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+
    if first == ' ' && at + 1 < text.len() {
        let (next, next_width) = char_at(text, at + 1);
        let class = class_of(next);
        if class != Class::Space {
            return run_end(text, at + 1 + next_width, class);
        }
    }
    let class = class_of(first);
    if class != Class::Space {
        return run_end(text, at + width, class);
    }
    // \s+(?!\S) | \s+
    let mut end = at + width;
    let mut last_width = width;
    while end < text.len() {
        let (c, w) = char_at(text, end);
        if class_of(c) != Class::Space {
            break;
        }
        end += w;
        last_width = w;
    }
    if end < text.len() && end - last_width > at {
        // Followed by a non-space: leave the last space to the next piece.
        end - last_width
    } else {
        end
    }
}

/// Calls `piece` with every pre-token of `text`, in order; the pieces concatenate to
/// `text`.
pub fn split<'t>(text: &'t str, mut piece: impl FnMut(&'t str)) {
    let mut at = 0;
    while at < text.len() {
        let end = piece_end(text, at);
        piece(&text[at..end]);
        at = end;
    }
}

/// The printable character GPT-2's byte-level alphabet uses for each byte.
pub static BYTE_CHARS: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut chars = ['\0'; 256];
    let mut extra = 0u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(byte)
        } else {
            extra += 1;
            255 + extra
        };
        chars[usize::from(byte)] = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    chars
});

/// `piece` written in the byte-level alphabet (one character per byte).
pub fn to_byte_level(piece: &str) -> String {
    let chars = &*BYTE_CHARS;
    piece.bytes().map(|byte| chars[usize::from(byte)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        split(text, |piece| out.push(piece));
        out
    }

    #[test]
    fn splits_like_gpt2() {
        assert_eq!(
            pieces("Hello world's  end!!\n\nok   "),
            [
                "Hello", " world", "'s", " ", " end", "!!", "\n", "\n", "ok", "   "
            ]
        );
        assert_eq!(pieces("x 42 ’tis"), ["x", " 42", " ’", "tis"]);
        assert_eq!(pieces(""), Vec::<&str>::new());
    }

    #[test]
    fn byte_level_alphabet_is_a_bijection_onto_printable_characters() {
        let chars = &*BYTE_CHARS;
        let mut sorted = chars.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
        assert_eq!(chars[usize::from(b' ')], 'Ġ');
        assert_eq!(chars[usize::from(b'\n')], 'Ċ');
        assert_eq!(chars[usize::from(b'a')], 'a');
    }
}
