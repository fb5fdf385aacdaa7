//! `trainyard serve`: a long-running front end over the same executor. Jobs (pipeline
//! runs) wait in a durable queue ([`queue`]) in the workspace; worker processes the
//! server supervises run them with `trainyard run`, so a job runs exactly as it would
//! from the command line, resumes the same way after a crash, and adds no second way
//! of running a stage.

pub mod api;
pub mod queue;
pub mod server;
pub mod worker;
