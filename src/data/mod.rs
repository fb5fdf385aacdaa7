//! Data sources and readers that the stages use; they know nothing of pipelines.

pub mod dedup;
pub mod records;
pub mod sample;
pub mod sources;
pub mod stats;
pub mod synthetic;
pub mod text;
pub mod token_cache;
pub mod writer;
