//! Pipelines end to end through the binary: settings, caching, errors, audit, crash safety and the shipped pipelines.
//!
//! One test binary per area keeps linking (and CI's disk) small; each module was
//! once its own `tests/<name>.rs`.

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod caching;
mod config;
mod crash_safety;
mod errors;
mod scale;
mod shipped_pipelines;
mod slurm;
mod special_files;
mod store_integrity;
