//! What the training stages (`pretrain`, `sft`) share: device selection, the loop
//! settings every training stage exposes, the loss-curve picture and the metrics a
//! finished run reports.

use std::path::{Path, PathBuf};

use candle_core::Device;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{StageContext, StageError};
use crate::train::schedule::{Decay, Schedule};
use crate::train::trainer::{self, LoopSettings, TrainError, TrainSummary};

/// The output's loss-curve picture.
pub const LOSS_CURVE: &str = "loss_curve.svg";

/// Where to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSetting {
    /// A CUDA or Metal GPU when trainyard was built with one and it is present, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
    /// The Metal GPU (needs a build with `--features metal`).
    Metal,
}

impl DeviceSetting {
    /// The candle device, or why it is not available.
    pub fn device(self) -> Result<Device, String> {
        match self {
            DeviceSetting::Cpu => Ok(Device::Cpu),
            DeviceSetting::Cuda => Device::new_cuda(0).map_err(|error| {
                format!("device `cuda`: {error} (build trainyard with `--features cuda`)")
            }),
            DeviceSetting::Metal => Device::new_metal(0).map_err(|error| {
                format!("device `metal`: {error} (build trainyard with `--features metal`)")
            }),
            DeviceSetting::Auto => {
                if candle_core::utils::cuda_is_available()
                    && let Ok(device) = Device::new_cuda(0)
                {
                    return Ok(device);
                }
                if candle_core::utils::metal_is_available()
                    && let Ok(device) = Device::new_metal(0)
                {
                    return Ok(device);
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The loop knobs every training stage's settings carry, under the same names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    /// Optimizer steps in all.
    pub steps: u64,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate; default lr/10.
    pub min_lr: Option<f64>,
    /// Warmup steps; default 5% of the steps (at most 1000).
    pub warmup: Option<u64>,
    /// Decay shape.
    pub schedule: Decay,
    /// Gradient-norm limit.
    pub clip: Option<f64>,
    /// Evaluation interval; default a tenth of the steps.
    pub eval_every: Option<u64>,
    /// Checkpoint interval; default `eval_every`.
    pub save_every: Option<u64>,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Log interval.
    pub log_every: u64,
}

impl Knobs {
    /// The loop settings, with the defaults that depend on the number of steps filled.
    pub fn loop_settings(&self) -> LoopSettings {
        let eval_every = self.eval_every.unwrap_or((self.steps / 10).max(1));
        LoopSettings {
            steps: self.steps,
            grad_accum: self.grad_accum,
            schedule: Schedule {
                lr: self.lr,
                min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
                warmup: self.warmup.unwrap_or((self.steps / 20).min(1000)),
                total: self.steps,
                decay: self.schedule,
            },
            clip: self.clip,
            eval_every,
            save_every: self.save_every.unwrap_or(eval_every),
            keep_last: self.keep_last,
            log_every: self.log_every,
        }
    }
}

/// Checks the knobs every training stage validates the same way.
pub fn check_knobs(lr: f64, clip: Option<f64>, sizes: &[(&str, usize)]) -> Result<(), String> {
    for (key, value) in sizes {
        if *value == 0 {
            return Err(format!("`{key}` must be positive"));
        }
    }
    if !(lr.is_finite() && lr > 0.0) {
        return Err(format!("`lr` must be a positive number, not {lr}"));
    }
    if let Some(clip) = clip
        && !(clip.is_finite() && clip > 0.0)
    {
        return Err(format!("`clip` must be positive (or null), not {clip}"));
    }
    Ok(())
}

/// A [`TrainError`] as the stage reports it.
pub fn stage_error(error: TrainError) -> StageError {
    match error {
        TrainError::Interrupted { .. } => StageError::Interrupted,
        other => StageError::Invalid(other.to_string()),
    }
}

/// The manifest metrics of a finished run.
pub fn summary_metrics(
    summary: &TrainSummary,
    parameters: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let mut metrics = serde_json::Map::new();
    metrics.insert("steps".into(), json!(summary.steps));
    metrics.insert("tokens".into(), json!(summary.tokens_seen));
    metrics.insert("trained_parameters".into(), json!(parameters));
    metrics.insert("train_loss".into(), json!(summary.final_loss));
    if let Some(loss) = summary.final_eval {
        metrics.insert("eval_loss".into(), json!(loss));
        metrics.insert("perplexity".into(), json!(loss.exp()));
    }
    if let Some((loss, step)) = summary.best_eval {
        metrics.insert("best_eval_loss".into(), json!(loss));
        metrics.insert("best_step".into(), json!(step));
    }
    metrics.insert("tokens_per_s".into(), json!(summary.tokens_per_s.round()));
    if let Some(step) = summary.resumed_from {
        metrics.insert("resumed_from_step".into(), json!(step));
    }
    metrics
}

/// The closing line of a training stage's log.
pub fn log_summary(context: &mut StageContext<'_>, summary: &TrainSummary) {
    let _ = writeln!(
        context.log,
        "done: {} steps, train loss {:.4}{}, {:.0} tokens/s",
        summary.steps,
        summary.final_loss,
        summary
            .final_eval
            .map(|loss| format!(", eval loss {loss:.4} (perplexity {:.2})", loss.exp()))
            .unwrap_or_default(),
        summary.tokens_per_s
    );
}

/// Draws train and eval loss from `metrics.jsonl` into [`LOSS_CURVE`], with a
/// horizontal line at `baseline` (the unigram eval loss) when given.
pub fn write_loss_curve(dir: &Path, baseline: Option<f64>) -> Result<(), StageError> {
    let metrics_path = dir.join(trainer::METRICS);
    let text = std::fs::read_to_string(&metrics_path)
        .map_err(|error| StageError::io(format!("reading {}", metrics_path.display()), error))?;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for row in text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
    {
        let step = row.get("step").and_then(serde_json::Value::as_f64);
        match (row.get("type").and_then(serde_json::Value::as_str), step) {
            (Some("train"), Some(step)) => {
                if let Some(loss) = row.get("loss").and_then(serde_json::Value::as_f64) {
                    train.push((step, loss));
                }
            }
            (Some("eval"), Some(step)) => {
                if let Some(loss) = row.get("eval_loss").and_then(serde_json::Value::as_f64) {
                    eval.push((step, loss));
                }
            }
            _ => {}
        }
    }
    let baseline: Vec<(f64, f64)> = match (baseline, train.first(), train.last()) {
        (Some(loss), Some(first), Some(last)) => vec![(first.0, loss), (last.0, loss)],
        _ => Vec::new(),
    };
    let svg = crate::train::plot::line_chart_svg(
        "Loss",
        "step",
        "cross-entropy (nats)",
        &[
            crate::train::plot::Series {
                label: "train",
                points: &train,
                color: "#1f77b4",
            },
            crate::train::plot::Series {
                label: "eval",
                points: &eval,
                color: "#d62728",
            },
            crate::train::plot::Series {
                label: "unigram baseline",
                points: &baseline,
                color: "#7f7f7f",
            },
        ],
    );
    let path: PathBuf = dir.join(LOSS_CURVE);
    std::fs::write(&path, svg)
        .map_err(|error| StageError::io(format!("writing {}", path.display()), error))
}
