//! Learning byte-level tokenizers (BPE or unigram) from a corpus, writing them as
//! `tokenizer.json`, and the statistics the `tokenizer` stage reports. Loading existing
//! files is [`super::load`].
//!
//! Every tokenizer trained here is byte-level with no normalizer: text is split by
//! GPT-2's expression, each byte becomes one of 256 printable characters, and the
//! vocabulary holds all 256, so `decode(encode(s)) == s` for every UTF-8 string. The
//! special tokens of [`super::special`] take ids 0–7 and are registered as special added
//! tokens: they are never split, and **wherever their text appears in the input, even in
//! a raw corpus document, it is encoded as the special token**. A corpus that quotes
//! `<|end|>` literally therefore gets a real end-of-turn token there; ingest is the place
//! to escape such text if that matters.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::{AddedToken, Tokenizer};

use crate::interrupt::CancelFlag;

use super::bpe::train_bpe;
use super::corpus::{CorpusFile, Progress, WordCounts, for_each_text};
use super::load::check_special_ids;
use super::pretokenize::{BYTE_CHARS, to_byte_level};
use super::special::SPECIAL_TOKENS;
use super::{MIN_VOCAB_SIZE, TokenizeError};

/// The tokenization model to train.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Byte-level byte-pair encoding, as GPT-2, Llama 3 and Qwen2 use.
    #[default]
    Bpe,
    /// Byte-level unigram language model (SentencePiece's algorithm), over the same
    /// byte-level pre-tokens.
    Unigram,
}

impl Algorithm {
    /// Lower-case name, as in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Bpe => "bpe",
            Algorithm::Unigram => "unigram",
        }
    }
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The model.
    pub algorithm: Algorithm,
    /// Vocabulary size, counting the special and byte tokens.
    pub vocab_size: usize,
    /// BPE: a pair must occur this often to be merged.
    pub min_frequency: u64,
    /// Show the `tokenizers` crate's own progress bar (unigram).
    pub show_progress: bool,
}

/// Trains a tokenizer on pre-token counts (see [`super::corpus::count_words`]).
pub fn train_tokenizer(
    counts: &WordCounts,
    options: &TrainOptions,
    cancel: &CancelFlag,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tokenizer, TokenizeError> {
    if options.vocab_size < MIN_VOCAB_SIZE {
        return Err(TokenizeError::VocabTooSmall {
            requested: options.vocab_size,
        });
    }
    let tokenizer = match options.algorithm {
        Algorithm::Bpe => {
            let model = train_bpe(
                &counts.words,
                &SPECIAL_TOKENS,
                options.vocab_size,
                options.min_frequency,
                cancel,
                progress,
            )?;
            let vocab = model
                .vocab
                .iter()
                .enumerate()
                .map(|(id, token)| (token.clone(), id as u32))
                .collect::<tokenizers::models::bpe::Vocab>();
            let merges = model
                .merges
                .iter()
                .map(|&(a, b)| {
                    (
                        model.vocab[a as usize].clone(),
                        model.vocab[b as usize].clone(),
                    )
                })
                .collect();
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .build()
                .map_err(|error| TokenizeError::library("building the BPE model", error))?;
            byte_level_tokenizer(Tokenizer::new(bpe))
        }
        Algorithm::Unigram => {
            byte_level_tokenizer(Tokenizer::new(train_unigram(counts, options, cancel)?))
        }
    }?;
    check_special_ids(&tokenizer)?;
    Ok(tokenizer)
}

/// Trains a unigram model with the `tokenizers` crate's trainer, made deterministic: the
/// words are fed in sorted order, the trainer runs on one thread (its floating-point
/// sums then add up in one order), and the scores it hands out to rare characters in
/// hash-set order are reassigned in character order.
fn train_unigram(
    counts: &WordCounts,
    options: &TrainOptions,
    cancel: &CancelFlag,
) -> Result<Unigram, TokenizeError> {
    if cancel.is_cancelled() {
        return Err(TokenizeError::Interrupted);
    }
    let trainer = UnigramTrainer::builder()
        .vocab_size(u32::try_from(options.vocab_size).unwrap_or(u32::MAX))
        .special_tokens(special_added_tokens())
        .initial_alphabet(BYTE_CHARS.iter().copied().collect())
        .unk_token(None)
        .show_progress(options.show_progress)
        .build()
        .map_err(|error| TokenizeError::library("configuring the unigram trainer", error))?;
    let sentences: Vec<(String, u32)> = counts
        .words
        .iter()
        .map(|(word, count)| {
            (
                to_byte_level(word),
                u32::try_from(*count).unwrap_or(u32::MAX),
            )
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|error| TokenizeError::library("starting the unigram trainer", error))?;
    let mut model = Unigram::default();
    pool.install(|| trainer.do_train(sentences, &mut model))
        .map_err(|error| TokenizeError::library("training the unigram model", error))?;
    canonical_unigram(&model)
}

/// The unigram model with the trainer's hash-order choices undone (see
/// [`train_unigram`]): characters the trained model lacked get scores `min + k·1e-4` in
/// whatever order a hash set yields them; here those scores go to the characters in
/// code point order, and pieces are ordered by score, then text.
fn canonical_unigram(model: &Unigram) -> Result<Unigram, TokenizeError> {
    let mut pieces: Vec<(String, f64)> = model.iter().cloned().collect();
    let specials: Vec<(String, f64)> = pieces
        .drain(..SPECIAL_TOKENS.len().min(pieces.len()))
        .collect();
    let min = pieces
        .iter()
        .map(|(_, score)| *score)
        .fold(f64::INFINITY, f64::min);
    let mut ladder = Vec::with_capacity(pieces.len() + 1);
    let mut penalty = 0.0;
    for _ in 0..=pieces.len().min(1024) {
        ladder.push(min + penalty);
        penalty += 0.0001;
    }
    let on_ladder: Vec<usize> = (0..pieces.len())
        .filter(|&index| {
            let (token, score) = &pieces[index];
            token.chars().count() == 1 && ladder.contains(score)
        })
        .collect();
    let mut chars: Vec<String> = on_ladder.iter().map(|&i| pieces[i].0.clone()).collect();
    let mut scores: Vec<f64> = on_ladder.iter().map(|&i| pieces[i].1).collect();
    chars.sort();
    scores.sort_by(|a, b| b.total_cmp(a));
    for (&index, (token, score)) in on_ladder.iter().zip(chars.into_iter().zip(scores)) {
        pieces[index] = (token, score);
    }
    pieces.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let vocab: Vec<(String, f64)> = specials.into_iter().chain(pieces).collect();
    Unigram::from(vocab, None, false)
        .map_err(|error| TokenizeError::library("building the unigram model", error))
}

/// The special tokens as `tokenizers` added tokens (special, so never split and never
/// normalized).
pub fn special_added_tokens() -> Vec<AddedToken> {
    SPECIAL_TOKENS
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect()
}

/// Gives `tokenizer` the byte-level pipeline (GPT-2 split without a prefix space, byte
/// characters, byte-level decoding) and registers the special tokens.
fn byte_level_tokenizer(mut tokenizer: Tokenizer) -> Result<Tokenizer, TokenizeError> {
    tokenizer
        .with_pre_tokenizer(Some(
            ByteLevel::default()
                .add_prefix_space(false)
                .trim_offsets(false)
                .use_regex(true),
        ))
        .with_decoder(Some(
            ByteLevelDecoder::default()
                .add_prefix_space(false)
                .trim_offsets(false)
                .use_regex(true),
        ))
        .with_post_processor(Some(
            ByteLevelProcessor::default()
                .add_prefix_space(false)
                .trim_offsets(false)
                .use_regex(true),
        ));
    tokenizer
        .add_special_tokens(special_added_tokens())
        .map_err(|error| TokenizeError::library("adding the special tokens", error))?;
    Ok(tokenizer)
}

/// `tokenizer` as pretty `tokenizer.json` text (deterministic: vocabularies and added
/// tokens are written in id order, merges in rank order).
pub fn tokenizer_json(tokenizer: &Tokenizer) -> Result<String, TokenizeError> {
    let mut text = tokenizer
        .to_string(true)
        .map_err(|error| TokenizeError::library("serializing the tokenizer", error))?;
    text.push('\n');
    Ok(text)
}

/// How well a tokenizer compresses a held-out text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalStats {
    /// Characters (Unicode scalar values) of all texts.
    pub chars: u64,
    /// Tokens they encode to.
    pub tokens: u64,
    /// `chars / tokens`, when there are tokens.
    pub chars_per_token: Option<f64>,
}

/// Encodes every text of `files` and counts characters and tokens.
pub fn eval_stats(
    tokenizer: &Tokenizer,
    files: &[CorpusFile],
    cancel: &CancelFlag,
) -> Result<EvalStats, TokenizeError> {
    const BATCH: usize = 512;
    let mut chars = 0u64;
    let mut tokens = 0u64;
    let mut batch: Vec<String> = Vec::with_capacity(BATCH);
    let mut failure: Option<TokenizeError> = None;
    let flush = |batch: &mut Vec<String>, tokens: &mut u64| -> Result<(), TokenizeError> {
        if batch.is_empty() {
            return Ok(());
        }
        let inputs: Vec<&str> = batch.iter().map(String::as_str).collect();
        let encodings = tokenizer
            .encode_batch(inputs, false)
            .map_err(|error| TokenizeError::library("encoding the eval texts", error))?;
        *tokens += encodings
            .iter()
            .map(|encoding| encoding.len() as u64)
            .sum::<u64>();
        batch.clear();
        Ok(())
    };
    for_each_text(files, None, cancel, &mut |text| {
        if failure.is_some() {
            return;
        }
        chars += text.chars().count() as u64;
        batch.push(text.to_string());
        if batch.len() == BATCH
            && let Err(error) = flush(&mut batch, &mut tokens)
        {
            failure = Some(error);
        }
    })?;
    if let Some(error) = failure {
        return Err(error);
    }
    flush(&mut batch, &mut tokens)?;
    Ok(EvalStats {
        chars,
        tokens,
        chars_per_token: (tokens > 0).then(|| chars as f64 / tokens as f64),
    })
}
