//! The data stages and libraries: ingest, tokenizers, chat templates, token caches and retrieval.
//!
//! One test binary per area keeps linking (and CI's disk) small; each module was
//! once its own `tests/<name>.rs`.

#[path = "../common/mod.rs"]
mod common;

mod chat_template;
mod data_pipeline;
mod ingest;
mod retrieve;
mod token_cache;
mod tokenizer;
mod tokenizer_stage;
