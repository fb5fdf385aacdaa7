//! Data sources and readers that the stages use; they know nothing of pipelines.

pub mod records;
pub mod sources;
pub mod synthetic;
pub mod text;
pub mod token_cache;
