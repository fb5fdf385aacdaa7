//! The training loop every training stage runs: steps of [`train_step`] on batches
//! from a [`BatchSource`], evaluation every N steps, checkpoints every N steps, a
//! `metrics.jsonl` row per step, a progress bar, and exact resume.
//!
//! Layout inside the stage's scratch directory `dir`:
//! ```text
//! checkpoints/step-NNNNNNNN/   resumable checkpoints (last `keep_last` kept; removed at the end)
//! best/                        the model with the lowest eval loss so far (+ best.json)
//! metrics.jsonl                one row per step and per evaluation (timings: not hashed)
//! config.json, model.safetensors, tokenizer.json, training.json   the final model
//! ```
//!
//! Exact resume: everything a step depends on — weights, optimizer moments and step
//! count, the data source's RNG state and position — is in the checkpoint, and nothing
//! else (no wall clock, no thread count) enters the computation. A run stopped at any
//! point and continued from its latest checkpoint therefore ends with the same bytes as
//! an uninterrupted run. Ctrl-C/SIGTERM write a checkpoint before stopping.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint::{self, Checkpoint, CheckpointError, ModelFiles, TrainerState};
use super::loss::{LanguageModel, batch_loss};
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::step::{StepError, train_step};
use crate::data::token_cache::Batch;
use crate::interrupt::CancelFlag;
use crate::model::bf16_gemm::Bf16Unit;
use crate::model::body::Body;
use crate::model::precision::{BF16Scope, Precision};
use crate::model::{CausalLm, named_tensors, on_pool, sorted_vars};
use crate::path_error::{AtPath, PathIoError, write_json};

/// Sub-directory of resumable checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
/// Sub-directory of the best model by eval loss.
pub const BEST: &str = "best";
/// The per-step metrics file. It holds timings, so it is not part of the output hash.
pub const METRICS: &str = "metrics.jsonl";
/// Summary of a finished training run (deterministic: no timings).
pub const SUMMARY: &str = "training.json";

/// Where training batches come from. Its position must be restorable exactly.
pub trait BatchSource {
    /// The next micro-batch.
    fn next_batch(&mut self) -> Result<Batch, String>;
    /// Where the source is now: an RNG state and a reader position.
    fn position(&self) -> (u64, serde_json::Value);
    /// Continues from a position returned by [`BatchSource::position`].
    fn restore(&mut self, rng_state: u64, position: &serde_json::Value) -> Result<(), String>;
}

/// How long and how to train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopSettings {
    /// Optimizer steps in all.
    pub steps: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Global gradient-norm limit.
    pub clip: Option<f64>,
    /// Evaluate every this many steps (and always after the last); 0: only at the end.
    pub eval_every: u64,
    /// Write a checkpoint every this many steps; 0: only when stopped.
    pub save_every: u64,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Write a line to the stage log every this many steps.
    pub log_every: u64,
    /// Activation checkpointing: how many blocks (the first ones) recompute their
    /// activations in the backward pass instead of keeping them; `None`: none.
    pub gradient_checkpointing: Option<usize>,
}

/// One line of [`METRICS`], tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MetricsRow {
    /// After an optimizer step.
    Train {
        /// Steps done.
        step: u64,
        /// Training loss of the step.
        loss: f64,
        /// Learning rate of the step.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Training tokens seen so far.
        tokens: u64,
        /// Speed of the step.
        tokens_per_s: f64,
        /// Training time so far, resumed sessions included.
        elapsed_s: f64,
    },
    /// After an evaluation.
    Eval {
        /// Steps done.
        step: u64,
        /// Loss on the eval batches.
        eval_loss: f64,
        /// `exp(eval_loss)`.
        perplexity: f64,
        /// Training time so far.
        elapsed_s: f64,
    },
}

/// One training run: the model, its data and where it writes.
pub struct TrainJob<'a> {
    /// The model (its parameters live in `varmap`).
    pub model: &'a CausalLm,
    /// What is written: the whole model's `config.json`, or an adapter's.
    pub files: ModelFiles<'a>,
    /// The trained parameters (all of the model's, or an adapter's).
    pub varmap: &'a VarMap,
    /// AdamW hyper-parameters besides the learning rate.
    pub optimizer: AdamWConfig,
    /// Training batches.
    pub data: &'a mut dyn BatchSource,
    /// The fixed evaluation batches (may be empty: no evaluation).
    pub eval: &'a [Batch],
    /// Where tensors live.
    pub device: &'a Device,
    /// A `tokenizer.json` copied into every model directory written.
    pub tokenizer: Option<&'a Path>,
    /// The stage's scratch directory.
    pub dir: &'a Path,
    /// Set when the user asks to stop.
    pub cancel: &'a CancelFlag,
    /// The stage log.
    pub log: &'a mut (dyn Write + Send),
    /// Draw a progress bar on stderr.
    pub show_progress: bool,
    /// Told every row written to [`METRICS`], as it is written (a run's live event log).
    pub on_row: &'a (dyn Fn(&MetricsRow) + Sync),
    /// A `precision` other than the default f32: the setting and the bf16 unit it
    /// resolved to (`None`: f32). Recorded in `training.json`.
    pub precision: Option<(Precision, Option<Bf16Unit>)>,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps done (all of them).
    pub steps: u64,
    /// Training target tokens consumed.
    pub tokens_seen: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Eval loss after the last step.
    pub final_eval: Option<f64>,
    /// Lowest eval loss and its step.
    pub best_eval: Option<(f64, u64)>,
    /// The checkpoint step this run continued from.
    pub resumed_from: Option<u64>,
    /// Training tokens per second in this session.
    pub tokens_per_s: f64,
    /// Wall-clock seconds of training, across resumes.
    pub elapsed_s: f64,
}

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Ctrl-C or SIGTERM; a checkpoint was written when there was progress to keep.
    #[error("interrupted at step {step}")]
    Interrupted {
        /// Steps done.
        step: u64,
        /// The checkpoint written, if any.
        checkpoint: Option<PathBuf>,
    },
    /// The loss or gradient became NaN or infinite.
    #[error("step {step}: the loss or gradient is not finite (loss {loss}); training stopped{}", kept_note(.checkpoint))]
    NotFinite {
        /// The step that failed (1-based).
        step: u64,
        /// Its loss.
        loss: f64,
        /// The last good checkpoint, kept.
        checkpoint: Option<PathBuf>,
    },
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The data source failed.
    #[error("training data: {0}")]
    Data(String),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
}

fn kept_note(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(path) => format!(
            "; the last good checkpoint is kept in {} (lower `lr` or set `clip`, then rerun to resume from it)",
            path.display()
        ),
        None => "; no checkpoint had been written yet (lower `lr` or set `clip`)".to_string(),
    }
}

/// Mean loss over `batches`, weighted by their counted targets.
pub fn evaluate(model: &CausalLm, batches: &[Batch], device: &Device) -> candle_core::Result<f64> {
    let mut total = 0.0;
    let mut count = 0.0;
    for batch in batches {
        let Some(loss) = batch_loss(model, batch, device)? else {
            continue;
        };
        let counted: f64 = batch.weights.iter().map(|&w| f64::from(w)).sum();
        total += loss * counted;
        count += counted;
    }
    Ok(if count > 0.0 { total / count } else { f64::NAN })
}

/// The model during training: each forward pass over a micro-batch draws the LoRA
/// dropout masks of the next key; with `checkpointing` the body runs in pieces.
struct Keyed<'a> {
    model: &'a CausalLm,
    micro_batch: &'a AtomicU64,
    checkpointing: Option<usize>,
}

impl LanguageModel for Keyed<'_> {
    fn hidden(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let key = self.micro_batch.fetch_add(1, Ordering::Relaxed);
        self.model.set_dropout_key(Some(key));
        let hidden = LanguageModel::hidden(self.model, input_ids);
        self.model.set_dropout_key(None);
        hidden
    }

    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        LanguageModel::logits(self.model, hidden)
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn body(&self, input_ids: &Tensor) -> Option<Body<'_>> {
        self.checkpointing.map(|blocks| {
            let key = self.micro_batch.fetch_add(1, Ordering::Relaxed);
            Body::new(self.model, input_ids, Some(key), blocks)
        })
    }
}

/// Runs (or continues) training to `settings.steps` and writes the final model.
pub fn train(job: TrainJob<'_>, settings: &LoopSettings) -> Result<TrainSummary, TrainError> {
    let TrainJob {
        model,
        files,
        varmap,
        optimizer: optimizer_config,
        data,
        eval,
        device,
        tokenizer,
        dir,
        cancel,
        log,
        show_progress,
        on_row,
        precision,
    } = job;
    // Forward and backward passes run on rayon's pool (`on_pool`), under this scope.
    let _precision = BF16Scope::enter(precision.and_then(|(_, unit)| unit));
    let root = dir.join(CHECKPOINTS);
    fs::create_dir_all(&root).at(&root)?;
    let params = sorted_vars(varmap);
    let vars: Vec<Var> = params.iter().map(|(_, var)| var.clone()).collect();
    let mut optimizer = AdamW::new(params.clone(), optimizer_config)?;
    let (rng_state, data_position) = data.position();
    let mut state = TrainerState {
        step: 0,
        tokens_seen: 0,
        rng_state,
        data_position,
        best_eval: None,
        elapsed_s: 0.0,
    };
    let mut resumed_from = None;
    if let Some(latest) = checkpoint::latest(&root) {
        let loaded = checkpoint::load(&latest, device)?;
        for (name, var) in &params {
            let saved = loaded.weights.get(name).ok_or_else(|| {
                TrainError::Data(format!(
                    "checkpoint {} has no tensor `{name}`",
                    latest.display()
                ))
            })?;
            var.set(&saved.to_dtype(var.dtype())?)?;
        }
        optimizer.load_state(&loaded.optimizer, loaded.state.step)?;
        data.restore(loaded.state.rng_state, &loaded.state.data_position)
            .map_err(TrainError::Data)?;
        state = loaded.state;
        resumed_from = Some(state.step);
        let _ = writeln!(
            log,
            "resuming from {} (step {} of {})",
            latest.display(),
            state.step,
            settings.steps
        );
    }
    let metrics_path = dir.join(METRICS);
    keep_metrics_through(&metrics_path, state.step)?;
    let mut metrics = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .at(&metrics_path)?;

    let bar = progress_bar(settings.steps, show_progress);
    bar.set_position(state.step);
    // LoRA dropout masks are keyed by the micro-batch's index in the whole run, so a
    // resumed run draws the same masks as an uninterrupted one; evaluation never drops.
    let micro_batch = AtomicU64::new(0);
    let forward = Keyed {
        model,
        micro_batch: &micro_batch,
        checkpointing: settings.gradient_checkpointing,
    };
    let session = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut session_tokens = 0u64;
    let mut last_saved = resumed_from;
    let mut final_loss = f64::NAN;
    let mut final_eval = None;
    while state.step < settings.steps {
        if cancel.is_cancelled() {
            let checkpoint = if state.step > 0 && last_saved != Some(state.step) {
                Some(save_checkpoint(
                    &root, files, varmap, &optimizer, &state, tokenizer, settings,
                )?)
            } else {
                checkpoint::latest(&root)
            };
            bar.abandon();
            if let Some(path) = &checkpoint {
                let _ = writeln!(
                    log,
                    "interrupted at step {}; checkpoint {}",
                    state.step,
                    path.display()
                );
            }
            return Err(TrainError::Interrupted {
                step: state.step,
                checkpoint,
            });
        }
        let micro_batches = (0..settings.grad_accum.max(1))
            .map(|_| data.next_batch())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TrainError::Data)?;
        let lr = settings.schedule.lr_at(state.step);
        micro_batch.store(
            state.step * settings.grad_accum.max(1) as u64,
            Ordering::Relaxed,
        );
        let started = Instant::now();
        let outcome = match on_pool(|| {
            train_step(
                &forward,
                &vars,
                &mut optimizer,
                &micro_batches,
                lr,
                settings.clip,
                device,
            )
        }) {
            Ok(outcome) => outcome,
            Err(StepError::NotFinite { loss }) => {
                bar.abandon();
                let error = TrainError::NotFinite {
                    step: state.step + 1,
                    loss,
                    checkpoint: checkpoint::latest(&root),
                };
                let _ = writeln!(log, "{error}");
                return Err(error);
            }
            Err(StepError::Candle(error)) => return Err(error.into()),
        };
        let seconds = started.elapsed().as_secs_f64();
        state.step += 1;
        state.tokens_seen += outcome.tokens;
        session_tokens += outcome.tokens;
        (state.rng_state, state.data_position) = data.position();
        state.elapsed_s = elapsed_before + session.elapsed().as_secs_f64();
        final_loss = outcome.loss;
        let tokens_per_s = outcome.tokens as f64 / seconds.max(1e-9);
        let row = MetricsRow::Train {
            step: state.step,
            loss: outcome.loss,
            lr,
            grad_norm: outcome.grad_norm,
            tokens: state.tokens_seen,
            tokens_per_s: round3(tokens_per_s),
            elapsed_s: round3(state.elapsed_s),
        };
        write_row(&mut metrics, &metrics_path, &row)?;
        on_row(&row);
        if settings.log_every > 0 && state.step.is_multiple_of(settings.log_every) {
            let _ = writeln!(
                log,
                "step {}/{} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tokens/s",
                state.step, settings.steps, outcome.loss, lr, outcome.grad_norm, tokens_per_s
            );
        }
        let last = state.step == settings.steps;
        let eval_due =
            last || (settings.eval_every > 0 && state.step.is_multiple_of(settings.eval_every));
        if eval_due && !eval.is_empty() {
            let eval_loss = on_pool(|| evaluate(model, eval, device))?;
            let row = MetricsRow::Eval {
                step: state.step,
                eval_loss,
                perplexity: eval_loss.exp(),
                elapsed_s: round3(state.elapsed_s),
            };
            write_row(&mut metrics, &metrics_path, &row)?;
            on_row(&row);
            let _ = writeln!(
                log,
                "eval at step {}: loss {:.4}, perplexity {:.2}",
                state.step,
                eval_loss,
                eval_loss.exp()
            );
            let improved = state.best_eval.is_none_or(|(best, _)| eval_loss < best);
            if eval_loss.is_finite() && improved {
                state.best_eval = Some((eval_loss, state.step));
                write_best(dir, files, varmap, tokenizer, eval_loss, state.step)?;
            }
            if last {
                final_eval = Some(eval_loss);
            }
        }
        if !last && settings.save_every > 0 && state.step.is_multiple_of(settings.save_every) {
            save_checkpoint(
                &root, files, varmap, &optimizer, &state, tokenizer, settings,
            )?;
            last_saved = Some(state.step);
        }
        bar.set_position(state.step);
        bar.set_message(format!(
            "loss {:.3} · {} tok/s",
            outcome.loss,
            human_count(tokens_per_s)
        ));
    }
    bar.finish_and_clear();

    checkpoint::write_model(dir, files, &named_tensors(varmap), tokenizer)?;
    let summary_path = dir.join(SUMMARY);
    let mut summary = json!({
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "best_eval": state.best_eval.map(|(loss, step)| json!({ "loss": loss, "step": step })),
        "final_eval_loss": final_eval,
    });
    if let Some((setting, unit)) = precision {
        summary["precision"] = json!({
            "setting": setting,
            "compute": if unit.is_some() { "bf16" } else { "f32" },
            "unit": unit.map(Bf16Unit::name),
        });
    }
    write_json(&summary_path, &summary)?;
    // The final model is in place; intermediate checkpoints are not part of the output.
    fs::remove_dir_all(&root).at(&root)?;
    let session_s = session.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: state.step,
        tokens_seen: state.tokens_seen,
        final_loss,
        final_eval,
        best_eval: state.best_eval,
        resumed_from,
        tokens_per_s: session_tokens as f64 / session_s.max(1e-9),
        elapsed_s: state.elapsed_s,
    })
}

fn save_checkpoint(
    root: &Path,
    files: ModelFiles<'_>,
    varmap: &VarMap,
    optimizer: &AdamW,
    state: &TrainerState,
    tokenizer: Option<&Path>,
    settings: &LoopSettings,
) -> Result<PathBuf, TrainError> {
    let path = checkpoint::save(
        root,
        &Checkpoint {
            files,
            weights: &named_tensors(varmap),
            optimizer: &optimizer.state()?,
            state,
            tokenizer,
        },
    )?;
    checkpoint::prune(root, settings.keep_last, None)?;
    Ok(path)
}

/// Replaces `dir/best` with the current model, atomically.
fn write_best(
    dir: &Path,
    files: ModelFiles<'_>,
    varmap: &VarMap,
    tokenizer: Option<&Path>,
    eval_loss: f64,
    step: u64,
) -> Result<(), TrainError> {
    let target = dir.join(BEST);
    let temp = dir.join(".best.tmp");
    if temp.exists() {
        fs::remove_dir_all(&temp).at(&temp)?;
    }
    checkpoint::write_model(&temp, files, &named_tensors(varmap), tokenizer)?;
    write_json(
        &temp.join("best.json"),
        &json!({ "step": step, "eval_loss": eval_loss }),
    )?;
    if target.exists() {
        fs::remove_dir_all(&target).at(&target)?;
    }
    Ok(fs::rename(&temp, &target).at(&target)?)
}

fn write_row(file: &mut fs::File, path: &Path, row: &MetricsRow) -> Result<(), TrainError> {
    let mut line = serde_json::to_string(row)
        .map_err(io::Error::other)
        .at(path)?;
    line.push('\n');
    Ok(file.write_all(line.as_bytes()).at(path)?)
}

/// Drops the rows of `path` after `step` (they are recomputed after a resume).
fn keep_metrics_through(path: &Path, step: u64) -> Result<(), TrainError> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(PathIoError::new(path, error).into()),
    };
    let mut kept = String::new();
    for line in io::BufReader::new(file).lines() {
        let line = line.at(path)?;
        let row_step = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|row| row.get("step").and_then(serde_json::Value::as_u64));
        if row_step.is_some_and(|row_step| row_step <= step) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    Ok(fs::write(path, kept).at(path)?)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `12.3k`, `4.56M`: a rate for the progress bar.
fn human_count(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

fn progress_bar(steps: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "  training [{bar:30}] {pos}/{len} steps · {msg} · ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
