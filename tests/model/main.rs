//! The models: specifications, parity with transformers, the kv cache, generation, export and GGUF.
//!
//! One test binary per area keeps linking (and CI's disk) small; each module was
//! once its own `tests/<name>.rs`.

#[path = "../common/mod.rs"]
mod common;

mod export_evaluate;
mod generate;
mod generate_cli;
mod gguf;
mod kv_cache;
mod model;
mod parity;
mod quant;
mod sampler;
