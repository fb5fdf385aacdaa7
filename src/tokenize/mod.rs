//! Tokenization: the special tokens every trainyard tokenizer carries, training and
//! loading Hugging Face `tokenizer.json` files, and the chat template.
//!
//! [`corpus`] streams and counts the texts of a corpus, [`pretokenize`] splits them the
//! way byte-level tokenizers do, [`bpe`] trains byte-pair merges, and [`train`] turns
//! either algorithm's result into a `tokenizers` tokenizer (or loads an existing one).

pub mod added;
pub mod bpe;
pub mod chat;
pub mod corpus;
pub mod fast;
pub mod pretokenize;
pub mod special;
pub mod template;
pub mod train;
