//! The training library: optimizer, learning-rate schedules, the loss, checkpoints, the
//! training loop with exact resume, and loss-curve plots. It knows nothing of pipelines.

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod step;
pub mod trainer;
