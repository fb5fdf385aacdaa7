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
use crate::model::{self, ModelError, lora, shards};

/// Settings of a `lora-merge` stage (none yet; the adapter carries its own spec).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct LoraMergeSettings {}

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
        _settings: &LoraMergeSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let base = &context.inputs["base"];
        let adapter = &context.inputs["adapter"];
        model::require_unquantized(base)?;
        let config = model::load_config(base)?;
        if !adapter.join(lora::ADAPTER_CONFIG).exists() && adapter.join("config.json").is_file() {
            return Err(invalid(format!(
                "{} is a whole model, not a LoRA adapter (no {}): there is nothing to merge; \
                 feed it to the next stage directly (was the sft stage's `adapter` set to `none`?)",
                adapter.display(),
                lora::ADAPTER_CONFIG
            )));
        }
        let spec = model::read_adapter_spec(adapter)?;
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
        for (index, file) in files.iter().enumerate() {
            if context.cancel.is_cancelled() {
                return Err(StageError::Interrupted);
            }
            let mut tensors = model::load_tensors(file, &device)?;
            changed += lora::merge_shard(&mut tensors, &adapter_weights, &spec).map_err(misfit)?;
            let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
            total_bytes += tensors
                .iter()
                .map(|(_, tensor)| (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64)
                .sum::<u64>();
            model::save_tensors(&tensors, &context.out_dir.join(file_name(index)))?;
        }
        if files.len() > 1 {
            let weight_map: BTreeMap<String, String> = headers
                .iter()
                .map(|header| (header.name.clone(), file_name(header.file)))
                .collect();
            shards::write_index(context.out_dir, total_bytes, &weight_map)?;
        }
        let dtype = shards::main_dtype(
            headers
                .iter()
                .map(|h| (h.dtype, h.bytes_in(h.dtype) as usize)),
        );
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
