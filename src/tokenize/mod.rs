//! Tokenization: the special tokens every trainyard tokenizer carries, training and
//! loading Hugging Face `tokenizer.json` files, and the chat template.

pub mod chat;
pub mod fast;
pub mod special;
