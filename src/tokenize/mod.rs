//! Tokenization: the special tokens every trainyard tokenizer carries, training and
//! loading Hugging Face `tokenizer.json` files, and the chat template.
//!
//! [`corpus`] streams and counts the texts of a corpus, [`pretokenize`] splits them the
//! way byte-level tokenizers do, [`bpe`] learns byte-pair merges, [`learn`] turns either
//! algorithm's result into a `tokenizers` tokenizer, and [`load`] reads an existing one.

pub mod added;
pub mod bpe;
pub mod chat;
pub mod corpus;
pub mod encode;
pub mod fast;
pub mod learn;
pub mod load;
pub mod pretokenize;
pub mod special;
pub mod template;

use std::path::PathBuf;

use corpus::CorpusError;
use special::SPECIAL_TOKENS;

/// The smallest vocabulary a trained tokenizer can have: the special tokens and the 256
/// byte tokens.
pub const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + 256;

/// Why a tokenizer could not be trained, loaded or measured.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// Reading the corpus failed.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// The requested vocabulary cannot hold the special and byte tokens.
    #[error(
        "vocab_size {requested} is too small: the {} special tokens and 256 byte tokens alone need {MIN_VOCAB_SIZE}",
        SPECIAL_TOKENS.len()
    )]
    VocabTooSmall {
        /// What was asked for.
        requested: usize,
    },
    /// The corpus holds no text at all.
    #[error("{0}: the corpus holds no text to train on")]
    NoText(String),
    /// A setting does not apply to the chosen algorithm.
    #[error("{0}")]
    Setting(String),
    /// The `tokenizers` crate reported an error.
    #[error("{context}: {message}")]
    Library {
        /// What was being done.
        context: String,
        /// Its message.
        message: String,
    },
    /// A trained tokenizer does not give a special token its fixed id.
    #[error("special token {token} has id {found:?} instead of {expected} (this is a bug)")]
    SpecialTokenId {
        /// The token.
        token: &'static str,
        /// Its fixed id.
        expected: u32,
        /// The id it got.
        found: Option<u32>,
    },
    /// An existing tokenizer file could not be used.
    #[error("{path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The user asked to stop.
    #[error("interrupted")]
    Interrupted,
}

impl From<crate::interrupt::Interrupted> for TokenizeError {
    fn from(_: crate::interrupt::Interrupted) -> TokenizeError {
        TokenizeError::Interrupted
    }
}

impl TokenizeError {
    pub(crate) fn library(
        context: impl Into<String>,
        error: impl std::fmt::Display,
    ) -> TokenizeError {
        TokenizeError::Library {
            context: context.into(),
            message: error.to_string(),
        }
    }
}
