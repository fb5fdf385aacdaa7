//! `trainyard serve` against a real server process on a free localhost port: the job
//! queue, the HTTP API with its Server-Sent Events, artifacts, security, and restarts.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod dashboard;
