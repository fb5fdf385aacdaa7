//! The training library: optimizer, learning-rate schedules and (later) the training
//! loop with checkpoints and exact resume. It knows nothing of pipelines.

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod step;
