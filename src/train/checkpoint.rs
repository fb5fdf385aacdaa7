//! Training checkpoints on disk. Each is a Hugging Face-shaped directory —
//! `config.json`, `model.safetensors` (HF tensor names) and, when given,
//! `tokenizer.json` — plus the state needed to resume exactly:
//! `trainer_state.safetensors` (optimizer moments) and `trainer_state.json` (step, RNG
//! state, data position, best eval loss).
//!
//! Checkpoints live in `checkpoints/step-NNNNNNNN/` under a training stage's scratch
//! directory. A checkpoint is written to a `.tmp` sibling and renamed into place, so a
//! crash leaves the previous checkpoint intact and never a half-written one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, lora};
use crate::path_error::AtPath;

/// What a checkpoint's weights are, which decides the files they are written to.
#[derive(Debug, Clone, Copy)]
pub enum ModelFiles<'a> {
    /// A whole model: a Hugging Face directory with this `config.json`.
    Full(&'a ModelConfig),
    /// A LoRA adapter: a PEFT directory with this `adapter_config.json`.
    Adapter(&'a serde_json::Value),
}

/// The resumable state of a training run, besides weights and optimizer moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens consumed so far.
    pub tokens_seen: u64,
    /// The data sampler's RNG state ([`crate::rng::Rng::state`]).
    pub rng_state: u64,
    /// Where the data reader is (e.g. an SFT epoch and cursor), reader-specific.
    pub data_position: serde_json::Value,
    /// Best evaluation loss so far and the step it was reached at.
    pub best_eval: Option<(f64, u64)>,
    /// Wall-clock seconds of training so far (across resumes).
    pub elapsed_s: f64,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
    /// Tensor (de)serialisation.
    #[error("{path}: {source}")]
    Tensors {
        /// The file.
        path: PathBuf,
        /// The error.
        source: candle_core::Error,
    },
    /// The model part could not be written.
    #[error("{path}: {message}")]
    Model {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A malformed `trainer_state.json`.
    #[error("{path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Everything one checkpoint holds.
pub struct Checkpoint<'a> {
    /// What the weights are: a full model or an adapter.
    pub files: ModelFiles<'a>,
    /// Model weights by HF tensor name.
    pub weights: &'a [(String, Tensor)],
    /// Optimizer moments by name.
    pub optimizer: &'a [(String, Tensor)],
    /// Trainer state.
    pub state: &'a TrainerState,
    /// A `tokenizer.json` to copy in, if any.
    pub tokenizer: Option<&'a Path>,
}

/// The directory of the checkpoint at `step` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Writes `checkpoint` as `root/step-N/` atomically and returns its path.
pub fn save(root: &Path, checkpoint: &Checkpoint<'_>) -> Result<PathBuf, CheckpointError> {
    let target = step_dir(root, checkpoint.state.step);
    let temp = root.join(format!(".step-{:08}.tmp", checkpoint.state.step));
    if temp.exists() {
        fs::remove_dir_all(&temp).at(&temp)?;
    }
    fs::create_dir_all(&temp).at(&temp)?;
    write_model(
        &temp,
        checkpoint.files,
        checkpoint.weights,
        checkpoint.tokenizer,
    )?;
    let optimizer_path = temp.join("trainer_state.safetensors");
    let optimizer: HashMap<String, Tensor> = checkpoint.optimizer.iter().cloned().collect();
    candle_core::safetensors::save(&optimizer, &optimizer_path).map_err(|source| {
        CheckpointError::Tensors {
            path: optimizer_path.clone(),
            source,
        }
    })?;
    crate::atomic_file::use_default_permissions(&optimizer_path).at(&optimizer_path)?;
    let state_path = temp.join("trainer_state.json");
    let state =
        serde_json::to_vec_pretty(checkpoint.state).map_err(|error| CheckpointError::State {
            path: state_path.clone(),
            reason: error.to_string(),
        })?;
    fs::write(&state_path, state).at(&state_path)?;
    for entry in fs::read_dir(&temp).at(&temp)? {
        let path = entry.at(&temp)?.path();
        fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .at(&path)?;
    }
    if target.exists() {
        fs::remove_dir_all(&target).at(&target)?;
    }
    fs::rename(&temp, &target).at(&target)?;
    fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .at(root)?;
    Ok(target)
}

/// Writes the trained weights: an HF model directory (`config.json`,
/// `model.safetensors`, through [`crate::model::save_model_dir`]) or a PEFT adapter
/// directory (`adapter_config.json`, `adapter_model.safetensors`), plus a copy of
/// `tokenizer.json` when given, with the template and special-token files beside it.
pub fn write_model(
    dir: &Path,
    files: ModelFiles<'_>,
    weights: &[(String, Tensor)],
    tokenizer: Option<&Path>,
) -> Result<(), CheckpointError> {
    let model_error = |error: crate::model::ModelError| CheckpointError::Model {
        path: dir.to_path_buf(),
        message: error.to_string(),
    };
    match files {
        ModelFiles::Full(config) => {
            crate::model::save_model_dir(dir, config, weights).map_err(model_error)?;
        }
        ModelFiles::Adapter(config) => {
            fs::create_dir_all(dir).at(dir)?;
            crate::path_error::write_json(&dir.join(lora::ADAPTER_CONFIG), config)?;
            crate::model::save_tensors(weights, &dir.join(lora::ADAPTER_WEIGHTS))
                .map_err(model_error)?;
        }
    }
    if let Some(tokenizer) = tokenizer {
        let copy = dir.join("tokenizer.json");
        fs::copy(tokenizer, &copy).at(&copy)?;
        crate::tokenize::template::copy_companions(tokenizer, dir).at(dir)?;
    }
    Ok(())
}

/// A checkpoint read back for resuming.
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// Model weights by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer moments by name.
    pub optimizer: HashMap<String, Tensor>,
    /// Trainer state.
    pub state: TrainerState,
}

/// Reads the checkpoint in `dir`.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded, CheckpointError> {
    let read_tensors = |name: &str| {
        let path = dir.join(name);
        candle_core::safetensors::load(&path, device)
            .map_err(|source| CheckpointError::Tensors { path, source })
    };
    let state_path = dir.join("trainer_state.json");
    let bytes = fs::read(&state_path).at(&state_path)?;
    let state = serde_json::from_slice(&bytes).map_err(|error| CheckpointError::State {
        path: state_path.clone(),
        reason: error.to_string(),
    })?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        weights: if dir.join(lora::ADAPTER_WEIGHTS).is_file() {
            read_tensors(lora::ADAPTER_WEIGHTS)?
        } else {
            read_tensors("model.safetensors")?
        },
        optimizer: read_tensors("trainer_state.safetensors")?,
        state,
    })
}

/// Steps of the finished checkpoints under `root`, ascending (temporary ones ignored).
pub fn steps(root: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut steps: Vec<u64> = entries
        .filter_map(|entry| {
            entry
                .ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// The newest finished checkpoint under `root`.
pub fn latest(root: &Path) -> Option<PathBuf> {
    steps(root).last().map(|&step| step_dir(root, step))
}

/// Deletes all but the newest `keep_last` checkpoints, never the one at `protect`
/// (the best so far).
pub fn prune(root: &Path, keep_last: usize, protect: Option<u64>) -> Result<(), CheckpointError> {
    let all = steps(root);
    let cutoff = all.len().saturating_sub(keep_last.max(1));
    for &step in &all[..cutoff] {
        if Some(step) != protect {
            let dir = step_dir(root, step);
            fs::remove_dir_all(&dir).at(&dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            tokens_seen: step * 100,
            rng_state: 0xdead_beef ^ step,
            data_position: serde_json::json!({ "epoch": 1, "cursor": step }),
            best_eval: Some((2.5, step)),
            elapsed_s: 1.25,
        }
    }

    #[test]
    fn a_checkpoint_round_trips_bit_for_bit_and_old_ones_are_pruned() {
        let root = tempfile::tempdir().unwrap();
        let device = Device::Cpu;
        let weight = Tensor::new(&[[0.1f32, -0.2], [1e-30, 3.0]], &device).unwrap();
        let moment = Tensor::new(&[1e-12f32, 7.0], &device).unwrap();
        let config = ModelConfig::Llama(crate::model::LlamaConfig::tiny(
            crate::model::LlamaFlavor::Llama,
            false,
        ));
        for step in [10, 20, 30] {
            save(
                root.path(),
                &Checkpoint {
                    files: ModelFiles::Full(&config),
                    weights: &[("model.norm.weight".to_string(), weight.clone())],
                    optimizer: &[("exp_avg.model.norm.weight".to_string(), moment.clone())],
                    state: &state(step),
                    tokenizer: None,
                },
            )
            .unwrap();
        }
        assert_eq!(steps(root.path()), [10, 20, 30]);
        let loaded = load(&latest(root.path()).unwrap(), &device).unwrap();
        assert_eq!(loaded.state, state(30));
        let bits = |tensor: &Tensor| {
            tensor
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&loaded.weights["model.norm.weight"]), bits(&weight));
        assert_eq!(
            bits(&loaded.optimizer["exp_avg.model.norm.weight"]),
            bits(&moment)
        );
        assert_eq!(crate::model::load_config(&loaded.dir).unwrap(), config);

        prune(root.path(), 1, Some(10)).unwrap();
        assert_eq!(
            steps(root.path()),
            [10, 30],
            "the best (step 10) and the newest survive"
        );
    }

    #[test]
    fn a_leftover_temporary_checkpoint_is_not_a_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join(".step-00000050.tmp")).unwrap();
        assert!(latest(root.path()).is_none());
    }
}
