//! trainyard: declarative, fingerprinted language-model training pipelines.
//!
//! Data flows `config` → `dag` → `fingerprint`/`hashing`/`store` → `executor` →
//! `stages`, with `runs` recording each run and `audit` checking a run against its
//! record; `cli` is a thin clap layer over all of it.
//! `data`, `tokenize`, `model`, `train`, `export` and `retrieve` are the
//! machine-learning libraries the stages use; they know nothing of pipelines.
//! `generate` runs a trained model (`trainyard generate`, `trainyard chat`); `hf_cache`
//! finds `hf:org/name` models in the local Hugging Face cache.

// Every public item is documented; keep it so.
#![warn(missing_docs)]

pub mod atomic_file;
pub mod audit;
pub mod cli;
pub mod config;
pub mod console;
pub mod containment;
pub mod dag;
pub mod data;
pub mod executor;
pub mod export;
pub mod fingerprint;
pub mod gc;
pub mod generate;
pub mod hashing;
pub mod hf_cache;
pub mod interrupt;
pub mod memory;
pub mod model;
pub mod path_error;
pub mod retrieve;
pub mod rng;
pub mod runs;
pub mod serve;
pub mod stages;
pub mod store;
pub mod suggest;
pub mod tokenize;
pub mod train;
