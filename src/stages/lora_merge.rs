//! The `lora-merge` kind: folds a LoRA adapter (PEFT layout, from an `sft` stage with
//! `adapter: lora` or any PEFT directory) into its base model, `W' = W + (α/r)·B·A`,
//! and writes a full checkpoint in the base's Hugging Face layout: the same shards
//! (`model.safetensors`, or `model-0000k-of-0000n.safetensors` with the index), each in
//! the base's dtype. It streams: one base shard is loaded, merged (in f32), written and
//! freed before the next, so memory holds one shard and the adapter, never the model.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, copy_tokenizer, invalid,
};
use crate::model::mapped::is_conv1d;
use crate::model::quantized_files::{self, StoredView};
use crate::model::{self, ModelError, lora, shards};
use crate::path_error::AtPath;

/// Settings of a `lora-merge` stage (the adapter carries its own spec).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraMergeSettings {
    /// `base` (the default): `base` is the full-precision model, as PEFT users merge after
    /// QLoRA. `dequantized`: `base` is a quantized one (a `quantize` stage's output or a
    /// bitsandbytes 4-bit checkpoint) and the adapter is merged into its restored weights,
    /// the ones it was trained against. Left out of the fingerprint when `base`.
    #[serde(default, skip_serializing_if = "MergeInto::is_base")]
    pub merge_into: MergeInto,
}

/// What a LoRA adapter is merged into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeInto {
    /// The full-precision base.
    #[default]
    Base,
    /// A quantized base's restored weights.
    Dequantized,
}

impl MergeInto {
    fn is_base(&self) -> bool {
        *self == MergeInto::Base
    }
}

/// The `lora-merge` stage kind.
pub struct LoraMerge;

impl StageKind for LoraMerge {
    type Settings = LoraMergeSettings;
    const NAME: &'static str = "lora-merge";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "fold a LoRA adapter into its base model (W + α/r·B·A)";
    const OUTPUT: Artifact = Artifact::Model;
    const INPUTS: InputRules = InputRules::Slots(&[
        InputSlot::required("base", MODEL_SOURCES),
        InputSlot::required(
            "adapter",
            &[Artifact::Adapter, Artifact::Model, Artifact::Files],
        ),
    ]);

    fn run(
        settings: &LoraMergeSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let base = &context.inputs["base"];
        let adapter = &context.inputs["adapter"];
        let quantized = model::quantized_base(base)?;
        match (settings.merge_into, quantized) {
            (MergeInto::Base, Some(quant)) => {
                return Err(invalid(format!(
                    "{} holds {}-quantized weights: give `base` the full-precision model it \
                     was made from (PEFT users merge a QLoRA adapter into that), or set \
                     `merge_into: dequantized` to merge into the restored weights",
                    base.display(),
                    quant.kind.as_str()
                )));
            }
            (MergeInto::Dequantized, None) => {
                return Err(invalid(format!(
                    "`merge_into: dequantized` merges into a quantized base's restored \
                     weights, and {} is not quantized (no quantization_config)",
                    base.display()
                )));
            }
            _ => {}
        }
        let config = model::load_config(base)?;
        if !adapter.join(lora::ADAPTER_CONFIG).exists() && adapter.join("config.json").is_file() {
            return Err(invalid(format!(
                "{} is a whole model, not a LoRA adapter (no {}): there is nothing to merge; \
                 feed it to the next stage directly (was the sft stage's `adapter` set to `none`?)",
                adapter.display(),
                lora::ADAPTER_CONFIG
            )));
        }
        // PEFT's `fan_in_fan_out` follows the base's layers (GPT-2's Conv1D), as in PEFT.
        let spec = model::read_adapter_spec(adapter)?
            .for_family(matches!(config, model::ModelConfig::Gpt2(_)));
        // Token rows past the base's table (`add_tokens`) grow the vocabulary.
        let config = config.with_vocab_size(lora::merged_vocab(&spec, config.vocab_size()));
        let device = Device::Cpu;
        let files = model::safetensors_files(base)?;
        let headers = shards::read_headers(&files)?;
        let names: BTreeSet<&str> = headers.iter().map(|header| header.name.as_str()).collect();
        let adapter_path = adapter.join(lora::ADAPTER_WEIGHTS);
        let adapter_weights = model::load_tensors(&adapter_path, &device)?;
        let misfit = |message| ModelError::Adapter {
            path: adapter_path.clone(),
            message,
        };
        // Every adapter tensor must find its base weight before the first shard is written.
        lora::check_merge(|name| names.contains(name), &adapter_weights).map_err(misfit)?;
        let file_name = |index: usize| {
            files[index]
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut changed = 0;
        let mut total_bytes = 0;
        let mut written = Vec::new();
        for (index, file) in files.iter().enumerate() {
            if context.cancel.is_cancelled() {
                return Err(StageError::Interrupted);
            }
            let mut tensors = match quantized {
                Some(_) => dequantized_shard(file, &device)?,
                None => model::load_tensors(file, &device)?,
            };
            changed += lora::merge_shard(&mut tensors, &adapter_weights, &spec).map_err(misfit)?;
            let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
            for (_, tensor) in &tensors {
                let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
                total_bytes += bytes as u64;
                written.push((tensor.dtype(), bytes));
            }
            model::save_tensors(&tensors, &context.out_dir.join(file_name(index)))?;
        }
        if files.len() > 1 {
            let weight_map: BTreeMap<String, String> = headers
                .iter()
                .filter(|header| !quantized_files::is_quant_part(&header.name))
                .map(|header| (header.name.clone(), file_name(header.file)))
                .collect();
            shards::write_index(context.out_dir, total_bytes, &weight_map)?;
        }
        let dtype = shards::main_dtype(written);
        config.save_with_dtype(context.out_dir, dtype)?;
        // The tokenizer travels with the model: the adapter's (what SFT used), else the base's.
        copy_tokenizer(&[adapter, base], context.out_dir)?;
        let _ = writeln!(
            context.log,
            "merged a rank-{} adapter (α {}) on {} into {changed} tensors of {} ({} shard(s), {})",
            spec.rank,
            spec.alpha,
            spec.targets.join(", "),
            headers.len(),
            files.len(),
            model::torch_dtype_name(dtype)
        );
        let mut metrics = serde_json::Map::new();
        metrics.insert("rank".into(), serde_json::json!(spec.rank));
        metrics.insert("alpha".into(), serde_json::json!(spec.alpha));
        Ok(StageOutcome { metrics })
    }
}

/// The tensors of a quantized base's shard `file` with every quantized matrix restored
/// (in the dtype it was quantized from) and the tensors that stored it dropped.
fn dequantized_shard(
    file: &std::path::Path,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>, StageError> {
    let mut tensors = model::load_tensors(file, device)?;
    let file_handle = std::fs::File::open(file).at(file)?;
    // SAFETY: mapped read-only; a stage never writes its inputs.
    let map = unsafe { memmap2::Mmap::map(&file_handle) }.at(file)?;
    let stored = safetensors::SafeTensors::deserialize(&map)
        .map_err(|error| ModelError::safetensors(file, error))?;
    let get = |key: &str| {
        stored.tensor(key).ok().map(|view| StoredView {
            dtype: view.dtype(),
            data: view.data(),
        })
    };
    let matrices: BTreeSet<&str> = stored
        .names()
        .into_iter()
        .filter_map(|name| name.split_once(".quant_state.").map(|(matrix, _)| matrix))
        .collect();
    for name in matrices {
        let Some(matrix) = quantized_files::read_stored_matrix(name, get)
            .map_err(|message| ModelError::safetensors(file, message))?
        else {
            continue;
        };
        let (rows, cols) = matrix.dims;
        let mut values = vec![0f32; rows * cols];
        matrix.quantized.dequantize_into(0, &mut values);
        let dtype = match matrix.dtype.as_str() {
            "bfloat16" => candle_core::DType::BF16,
            "float16" => candle_core::DType::F16,
            _ => candle_core::DType::F32,
        };
        let mut restored = Tensor::from_vec(values, (rows, cols), device)?;
        // GPT-2's Conv1D was quantized as its transpose: back to its [in, out].
        if is_conv1d(name) {
            restored = restored.t()?.contiguous()?;
        }
        let restored = restored.to_dtype(dtype)?;
        tensors.insert(name.to_string(), restored);
    }
    tensors.retain(|name, _| !quantized_files::is_quant_part(name));
    Ok(tensors)
}
