//! trainyard: declarative, fingerprinted language-model training pipelines.
//!
//! The library owns everything; `main.rs` is a thin clap layer over [`cli`].

pub mod data;
