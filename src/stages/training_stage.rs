//! What the training stages (`pretrain`, `sft`) share: device selection, the loop
//! settings every training stage exposes, the loss-curve picture and the metrics a
//! finished run reports.

use std::io::IsTerminal;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{StageContext, StageError, StageOutcome};
use crate::data::token_cache::Batch;
use crate::model::CausalLm;
use crate::model::precision::Precision;
use crate::path_error::AtPath;
use crate::train::checkpoint::ModelFiles;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::{Decay, Schedule};
use crate::train::trainer::{self, BatchSource, LoopSettings, MetricsRow, TrainJob, TrainSummary};

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

/// The defaults that differ between training kinds.
pub trait LoopDefaults {
    /// Peak learning rate.
    fn lr() -> f64;
    /// Decoupled AdamW weight decay.
    fn weight_decay() -> f64;
}

/// The training-loop settings of every training kind (`pretrain`, `sft`, and those to
/// come), flattened into the kind's `with:` map: the settings JSON stays flat, so
/// fingerprints do not depend on this type. `D` gives the defaults that differ by kind.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(bound = "")]
#[schemars(bound = "D: LoopDefaults", inline)]
pub struct TrainingSettings<D: LoopDefaults> {
    /// Optimizer steps (or the kind's alternative: `tokens` for pretrain, `epochs` for sft).
    #[serde(default)]
    pub steps: Option<u64>,
    /// Sequences (rows) per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Peak learning rate (3e-4 for pretrain, 1e-4 for sft).
    #[serde(default = "D::lr")]
    pub lr: f64,
    /// Final learning rate; by default lr/10.
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Steps of linear warmup; by default 5% of the steps, at most 1000.
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Decay after warmup: `cosine`, `linear` or `constant`.
    #[serde(default)]
    pub schedule: Decay,
    /// Decoupled AdamW weight decay, on matrices only (0.1 for pretrain, 0 for sft).
    #[serde(default = "D::weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm limit; `null` turns clipping off.
    #[serde(default = "default_clip")]
    pub clip: Option<f64>,
    /// Evaluate every this many steps (and after the last); by default a tenth of the
    /// steps; 0 evaluates only at the end.
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Batches of the eval split per evaluation (from each data input that has one).
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Write a resumable checkpoint every this many steps; by default as `eval_every`.
    #[serde(default)]
    pub save_every: Option<u64>,
    /// Checkpoints kept while training.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// A line in the stage log every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// `auto`, `cpu`, `cuda` or `metal`.
    #[serde(default)]
    pub device: DeviceSetting,
    /// Matrix products in `f32`, or `bf16` (f32 master weights and optimizer state; needs
    /// a CPU with AMX-BF16 or AVX512-BF16), or `auto`: bf16 where the CPU has it. Left
    /// out of the fingerprint when `f32`.
    #[serde(default, skip_serializing_if = "Precision::is_default")]
    pub precision: Precision,
    /// Activation checkpointing: `true` keeps only each block's input during the forward
    /// pass and recomputes the block's activations in the backward pass (memory for
    /// activations drops from all of every block's to one hidden state per block, for
    /// one more forward pass of compute: a third more when every weight trains, half
    /// more on a frozen base); a number N recomputes the first N blocks only and the
    /// others keep their activations (between the two). The gradients are the same.
    /// Left out of the fingerprint when off.
    #[serde(default, skip_serializing_if = "Checkpointing::is_off")]
    pub gradient_checkpointing: Checkpointing,
    #[serde(skip)]
    #[schemars(skip)]
    defaults: PhantomData<D>,
}

/// The `gradient_checkpointing` setting: on or off, or how many blocks recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Checkpointing {
    /// Every block (`true`) or none (`false`).
    All(bool),
    /// The first this many blocks.
    Blocks(usize),
}

impl Default for Checkpointing {
    fn default() -> Self {
        Checkpointing::All(false)
    }
}

impl Checkpointing {
    /// Whether nothing is recomputed.
    pub fn is_off(&self) -> bool {
        matches!(self, Checkpointing::All(false) | Checkpointing::Blocks(0))
    }

    /// Blocks recomputed (`usize::MAX`: all), `None` when off.
    pub fn recomputed_blocks(&self) -> Option<usize> {
        match *self {
            _ if self.is_off() => None,
            Checkpointing::All(_) => Some(usize::MAX),
            Checkpointing::Blocks(blocks) => Some(blocks),
        }
    }
}

fn default_batch_size() -> usize {
    8
}
fn default_one() -> usize {
    1
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_eval_batches() -> usize {
    8
}
fn default_keep_last() -> usize {
    2
}
fn default_log_every() -> u64 {
    10
}

impl<D: LoopDefaults> TrainingSettings<D> {
    /// The loop settings for `steps` steps, with the defaults that depend on the number
    /// of steps filled.
    pub fn loop_settings(&self, steps: u64) -> LoopSettings {
        let eval_every = self.eval_every.unwrap_or((steps / 10).max(1));
        LoopSettings {
            steps,
            grad_accum: self.grad_accum,
            schedule: Schedule {
                lr: self.lr,
                min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
                warmup: self.warmup.unwrap_or((steps / 20).min(1000)),
                total: steps,
                decay: self.schedule,
            },
            clip: self.clip,
            eval_every,
            save_every: self.save_every.unwrap_or(eval_every),
            keep_last: self.keep_last,
            log_every: self.log_every,
            gradient_checkpointing: self.gradient_checkpointing.recomputed_blocks(),
        }
    }

    /// The stage-log line saying how many of a model's `layers` blocks recompute their
    /// activations, when any do.
    pub fn checkpointing_note(&self, layers: usize) -> Option<String> {
        self.gradient_checkpointing.recomputed_blocks().map(|blocks| {
            format!(
                "gradient checkpointing: {} of {layers} blocks recompute their activations in the backward pass",
                blocks.min(layers)
            )
        })
    }

    /// Checks the settings every training kind validates the same way; `context` is the
    /// kind's sequence length, when it has one.
    pub fn check(&self, context: Option<usize>) -> Result<(), String> {
        let sizes = [
            ("batch_size", Some(self.batch_size)),
            ("grad_accum", Some(self.grad_accum)),
            ("context", context),
        ];
        for (key, value) in sizes {
            if value == Some(0) {
                return Err(format!("`{key}` must be positive"));
            }
        }
        if self.steps == Some(0) {
            return Err("`steps` must be positive".to_string());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("`lr` must be a positive number, not {}", self.lr));
        }
        if let Some(clip) = self.clip
            && !(clip.is_finite() && clip > 0.0)
        {
            return Err(format!("`clip` must be positive (or null), not {clip}"));
        }
        Ok(())
    }

    /// Trains `model` in the stage's scratch directory, with the optimizer, logging,
    /// interruption and progress bar every training kind uses, then draws the loss
    /// curve and gives the manifest metrics of the finished run.
    pub fn train(
        &self,
        context: &mut StageContext<'_>,
        steps: u64,
        job: StageTrainJob<'_>,
    ) -> Result<StageOutcome, StageError> {
        let unit = self.precision.resolve().map_err(StageError::Invalid)?;
        if !self.precision.is_default() {
            let _ = writeln!(
                context.log,
                "precision: {} (setting `{}`{})",
                if unit.is_some() { "bf16" } else { "f32" },
                serde_json::to_value(self.precision)?
                    .as_str()
                    .unwrap_or_default(),
                unit.map(|unit| format!(", on {}", unit.name()))
                    .unwrap_or_else(|| ", no native bf16 unit on this CPU".to_string()),
            );
        }
        // Every metrics row, live, as an event of the run: `train_step` (with the
        // run's total steps) or `eval`.
        let events = context.events;
        let on_row = |row: &trainer::MetricsRow| {
            let (event, mut fields) = match row {
                trainer::MetricsRow::Train { .. } => ("train_step", json!(row)),
                trainer::MetricsRow::Eval { .. } => ("eval", json!(row)),
            };
            if let Some(fields) = fields.as_object_mut() {
                fields.remove("type");
                if event == "train_step" {
                    fields.insert("steps".into(), json!(steps));
                }
            }
            events(event, fields);
        };
        let summary = trainer::train(
            TrainJob {
                model: job.model,
                files: job.files,
                varmap: job.varmap,
                optimizer: AdamWConfig {
                    weight_decay: self.weight_decay,
                    ..AdamWConfig::default()
                },
                data: job.data,
                eval: job.eval,
                device: job.device,
                tokenizer: job.tokenizer,
                dir: context.out_dir,
                cancel: context.cancel,
                log: &mut *context.log,
                show_progress: std::io::stderr().is_terminal(),
                on_row: &on_row,
                precision: (!self.precision.is_default()).then_some((self.precision, unit)),
            },
            &self.loop_settings(steps),
        )?;
        write_loss_curve(context.out_dir, job.baseline)?;
        let mut metrics = summary_metrics(&summary, parameter_count(job.varmap));
        if let Some(loss) = job.baseline {
            metrics.insert("unigram_eval_loss".into(), json!(loss));
        }
        log_summary(context, &summary);
        Ok(StageOutcome { metrics })
    }
}

/// What a training kind gives [`TrainingSettings::train`]: the parts of a
/// [`TrainJob`] that differ between kinds.
pub struct StageTrainJob<'a> {
    /// The model (its parameters live in `varmap`).
    pub model: &'a CausalLm,
    /// What is written: the whole model's `config.json`, or an adapter's.
    pub files: ModelFiles<'a>,
    /// The trained parameters.
    pub varmap: &'a VarMap,
    /// Training batches.
    pub data: &'a mut dyn BatchSource,
    /// The fixed evaluation batches.
    pub eval: &'a [Batch],
    /// Where tensors live.
    pub device: &'a Device,
    /// A `tokenizer.json` copied into every model directory written.
    pub tokenizer: Option<&'a Path>,
    /// The unigram eval loss, drawn in the loss curve and reported, when known.
    pub baseline: Option<f64>,
}

/// Elements in the parameters of `varmap` (what is trained).
pub fn parameter_count(varmap: &VarMap) -> usize {
    crate::model::sorted_vars(varmap)
        .iter()
        .map(|(_, var)| var.elem_count())
        .sum()
}

/// The manifest metrics of a finished run.
fn summary_metrics(
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
fn log_summary(context: &mut StageContext<'_>, summary: &TrainSummary) {
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
fn write_loss_curve(dir: &Path, baseline: Option<f64>) -> Result<(), StageError> {
    let metrics_path = dir.join(trainer::METRICS);
    let text = std::fs::read_to_string(&metrics_path).at(metrics_path)?;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for row in text
        .lines()
        .filter_map(|line| serde_json::from_str::<MetricsRow>(line).ok())
    {
        match row {
            MetricsRow::Train { step, loss, .. } => train.push((step as f64, loss)),
            MetricsRow::Eval {
                step, eval_loss, ..
            } => eval.push((step as f64, eval_loss)),
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
    Ok(std::fs::write(&path, svg).at(path)?)
}
