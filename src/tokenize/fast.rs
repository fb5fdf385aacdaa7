//! A faster encoder for GPT-2-style byte-level BPE tokenizers (the kind the `tokenizer`
//! stage trains), used when building token caches.
//!
//! The `tokenizers` pipeline runs the GPT-2 split regex through `fancy-regex` (it needs
//! a look-ahead) and keeps a small shared word cache. This encoder gives the same ids
//! faster: it splits with the hand-written [`crate::tokenize::pretokenize::split`] and
//! memoises whole pre-tokens per thread. It only takes tokenizers whose
//! pipeline is exactly: no normalizer, `ByteLevel { add_prefix_space: false,
//! use_regex: true }`, a BPE model without dropout; and it hands any text containing
//! an added (special) token to `tokenizers` itself. Tests and the token-cache benchmark
//! check that the ids are identical.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{Model, Tokenizer};

use crate::tokenize::pretokenize::{split, to_byte_level};

/// Most distinct pre-tokens a cache keeps before it starts over (bounds memory).
const CACHE_LIMIT: usize = 1 << 18;

/// Memo of pre-token → ids.
type WordCache = HashMap<String, Vec<u32>>;

static NEXT_ENCODER_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Each thread memoises for one encoder at a time (tagged by its id), so encoders
    /// of different tokenizers running on the same rayon threads never share entries.
    static CACHE: RefCell<(u64, WordCache)> = RefCell::new((0, WordCache::new()));
}

/// An encoder equivalent to `tokenizer.encode_fast(text, false)` for supported tokenizers.
pub struct FastEncoder<'a> {
    id: u64,
    tokenizer: &'a Tokenizer,
    model: &'a ModelWrapper,
    added: Vec<String>,
}

impl<'a> FastEncoder<'a> {
    /// The fast encoder for `tokenizer`, or `None` if its pipeline is not the supported one.
    pub fn new(tokenizer: &'a Tokenizer) -> Option<FastEncoder<'a>> {
        if tokenizer.get_normalizer().is_some() {
            return None;
        }
        match tokenizer.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(byte_level))
                if !byte_level.add_prefix_space && byte_level.use_regex => {}
            _ => return None,
        }
        let model = tokenizer.get_model();
        match model {
            ModelWrapper::BPE(bpe)
                if bpe.dropout.is_none_or(|dropout| dropout == 0.0)
                    && bpe.continuing_subword_prefix.is_none()
                    && bpe.end_of_word_suffix.is_none() => {}
            _ => return None,
        }
        let added = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|token| token.content)
            .collect();
        Some(FastEncoder {
            id: NEXT_ENCODER_ID.fetch_add(1, Ordering::Relaxed),
            tokenizer,
            model,
            added,
        })
    }

    /// Appends the ids of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        if self.added.iter().any(|token| text.contains(token.as_str())) {
            let encoding = self
                .tokenizer
                .encode_fast(text, false)
                .map_err(|error| error.to_string())?;
            out.extend_from_slice(encoding.get_ids());
            return Ok(());
        }
        CACHE.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (owner, cache) = &mut *guard;
            if *owner != self.id {
                *owner = self.id;
                cache.clear();
            }
            self.encode_words(text, cache, out)
        })
    }

    fn encode_words(
        &self,
        text: &str,
        cache: &mut WordCache,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        if cache.len() > CACHE_LIMIT {
            cache.clear();
        }
        let mut failure = None;
        split(text, |word| {
            if failure.is_some() {
                return;
            }
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
            match self.model.tokenize(&to_byte_level(word)) {
                Ok(tokens) => {
                    let ids: Vec<u32> = tokens.iter().map(|token| token.id).collect();
                    out.extend_from_slice(&ids);
                    cache.insert(word.to_string(), ids);
                }
                Err(error) => failure = Some(error.to_string()),
            }
        });
        failure.map_or(Ok(()), Err)
    }
}
