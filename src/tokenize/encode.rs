//! Corpus records to token ids, as a token cache stores them: a record's text (or its
//! conversation rendered as text) for pretraining, and a conversation's ids with a loss
//! mask over the assistant's spans for SFT. One record is one JSONL line with `text` or
//! `messages`; the caller adds file and line to the errors.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::chat;
use super::fast::FastEncoder;
use super::template::{ChatTemplate, Conversation, TemplateError, span_mask};
use crate::data::records::ChatMessage;

/// Why a record cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The line is not JSON of the expected shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// `messages` is not a list of messages.
    #[error("`messages`: {0}")]
    Messages(serde_json::Error),
    /// The record has neither `text` nor `messages`.
    #[error("a record needs `text` or `messages`")]
    Empty,
    /// An SFT record without `messages`.
    #[error("an SFT corpus needs `messages` on every line")]
    NotAConversation,
    /// The conversation cannot be read or rendered by the template.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The tokenizer failed.
    #[error("cannot tokenize: {0}")]
    Tokenize(String),
}

/// What happens to an SFT example longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Leave it out (counted in `meta.json` under `dropped.too_long`): never trains on a
    /// conversation cut in the middle.
    #[default]
    Drop,
    /// Keep its last `max_len` tokens: the final answer survives, early turns are lost.
    KeepEnd,
    /// Keep its first `max_len` tokens: the final answer may be cut.
    KeepStart,
}

impl Truncation {
    /// The setting's name, as `meta.json` records it.
    pub fn name(self) -> &'static str {
        match self {
            Truncation::Drop => "drop",
            Truncation::KeepEnd => "keep_end",
            Truncation::KeepStart => "keep_start",
        }
    }
}

/// The fields of a corpus line that encoding reads (others are ignored).
#[derive(Debug, Deserialize)]
pub struct Record {
    /// Plain text.
    pub text: Option<String>,
    /// A conversation (a list of messages).
    pub messages: Option<serde_json::Value>,
}

impl Record {
    /// Parses one JSONL line; it must have `text` or `messages`.
    pub fn parse(line: &str) -> Result<Record, EncodeError> {
        let record: Record = serde_json::from_str(line)?;
        if record.text.is_none() && record.messages.is_none() {
            return Err(EncodeError::Empty);
        }
        Ok(record)
    }
}

/// One SFT example: its ids and loss mask, or why it is left out.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Token ids and the loss mask (1 on the assistant's tokens).
    Kept(Vec<u32>, Vec<u8>),
    /// Left out, for this reason (`no_assistant_turn`, `too_long`), counted in `meta.json`.
    Dropped(&'static str),
}

/// Encodes with trainyard's fast path when the tokenizer allows it, else with
/// `tokenizers`; both give the same ids (tested in `fast`).
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    fast: Option<FastEncoder<'a>>,
}

impl<'a> Encoder<'a> {
    /// An encoder for `tokenizer`.
    pub fn new(tokenizer: &'a Tokenizer) -> Encoder<'a> {
        Encoder {
            tokenizer,
            fast: FastEncoder::new(tokenizer),
        }
    }

    /// The ids of `text`, without added special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EncodeError> {
        match &self.fast {
            Some(fast) => {
                let mut ids = Vec::with_capacity(text.len() / 3);
                fast.encode_into(text, &mut ids)
                    .map_err(EncodeError::Tokenize)?;
                Ok(ids)
            }
            None => self
                .tokenizer
                .encode_fast(text, false)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|error| EncodeError::Tokenize(error.to_string())),
        }
    }

    /// The ids of a pretraining record (the JSONL `line`): its `text`, or its
    /// conversation rendered as text by `template` (trainyard's plain rendering without
    /// one). The caller appends the separator.
    pub fn pretraining_ids(
        &self,
        line: &str,
        template: Option<&ChatTemplate>,
    ) -> Result<Vec<u32>, EncodeError> {
        let record = Record::parse(line)?;
        let text = match (record.text, record.messages, template) {
            (Some(text), _, _) => text,
            (None, Some(_), Some(template)) => {
                template
                    .render(&Conversation::from_json(line)?, false)?
                    .text
            }
            (None, Some(messages), None) => {
                let messages: Vec<ChatMessage> =
                    serde_json::from_value(messages).map_err(EncodeError::Messages)?;
                chat::render_text(&messages, false)
            }
            (None, None, _) => return Err(EncodeError::Empty),
        };
        self.encode(&text)
    }
}

/// The SFT example of a record (the JSONL `line`): the text `template` renders, tokenized
/// whole without added special tokens (as transformers' `apply_chat_template` does),
/// masked over the template's assistant spans, and cut to `max_len` by `truncation`.
pub fn sft_example(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    line: &str,
    max_len: usize,
    truncation: Truncation,
) -> Result<Example, EncodeError> {
    if Record::parse(line)?.messages.is_none() {
        return Err(EncodeError::NotAConversation);
    }
    let conversation = Conversation::from_json(line)?;
    let rendered = template.render(&conversation, false)?;
    let spans = template.trainable_spans(&conversation, &rendered)?;
    let encoding = tokenizer
        .encode(rendered.text.as_str(), false)
        .map_err(|error| EncodeError::Tokenize(error.to_string()))?;
    let mut ids = encoding.get_ids().to_vec();
    let mut mask = span_mask(encoding.get_offsets(), &spans);
    if !mask.contains(&1) {
        return Ok(Example::Dropped("no_assistant_turn"));
    }
    if ids.len() > max_len {
        match truncation {
            Truncation::Drop => return Ok(Example::Dropped("too_long")),
            Truncation::KeepStart => {
                ids.truncate(max_len);
                mask.truncate(max_len);
            }
            Truncation::KeepEnd => {
                let cut = ids.len() - max_len;
                ids.drain(..cut);
                mask.drain(..cut);
            }
        }
        if !mask.contains(&1) {
            return Ok(Example::Dropped("no_assistant_turn"));
        }
    }
    Ok(Example::Kept(ids, mask))
}
