//! The `lora-merge` kind: folds a LoRA adapter (PEFT layout, from an `sft` stage with
//! `adapter: lora` or any PEFT directory) into its base model, `W' = W + (α/r)·B·A`,
//! and writes a full checkpoint in the base's Hugging Face layout.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome,
};
use crate::model::{self, lora};
use crate::tokenize::train::tokenizer_file;

/// Settings of a `lora-merge` stage (none yet; the adapter carries its own spec).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
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
        InputSlot {
            name: "base",
            accepts: MODEL_SOURCES,
            required: true,
            many: false,
        },
        InputSlot {
            name: "adapter",
            accepts: &[Artifact::Adapter, Artifact::Model, Artifact::Files],
            required: true,
            many: false,
        },
    ]);

    fn run(
        _settings: &LoraMergeSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let invalid = |message: String| StageError::Invalid(message);
        let base = &context.inputs["base"];
        let adapter = &context.inputs["adapter"];
        let config = model::load_config(base).map_err(|error| invalid(error.to_string()))?;
        let adapter_config_path = adapter.join(lora::ADAPTER_CONFIG);
        if !adapter_config_path.exists() && adapter.join("config.json").is_file() {
            return Err(invalid(format!(
                "{} is a whole model, not a LoRA adapter (no {}): there is nothing to merge; \
                 feed it to the next stage directly (was the sft stage's `adapter` set to `none`?)",
                adapter.display(),
                lora::ADAPTER_CONFIG
            )));
        }
        let text = std::fs::read_to_string(&adapter_config_path).map_err(|error| {
            StageError::io(format!("reading {}", adapter_config_path.display()), error)
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| invalid(format!("{}: {error}", adapter_config_path.display())))?;
        let spec = lora::LoraSpec::from_adapter_config(&value)
            .map_err(|message| invalid(format!("{}: {message}", adapter_config_path.display())))?;
        let device = Device::Cpu;
        let mut base_weights: HashMap<String, Tensor> = HashMap::new();
        for file in model::safetensors_files(base).map_err(|error| invalid(error.to_string()))? {
            let tensors = candle_core::safetensors::load(&file, &device)
                .map_err(|error| invalid(format!("{}: {error}", file.display())))?;
            base_weights.extend(tensors);
        }
        let adapter_path = adapter.join(lora::ADAPTER_WEIGHTS);
        let adapter_weights = candle_core::safetensors::load(&adapter_path, &device)
            .map_err(|error| invalid(format!("{}: {error}", adapter_path.display())))?;
        let merged = lora::merge(&base_weights, &adapter_weights, &spec)
            .map_err(|message| invalid(format!("{}: {message}", adapter_path.display())))?;
        model::save_model_dir(context.out_dir, &config, &merged)
            .map_err(|error| invalid(error.to_string()))?;
        // The tokenizer travels with the model: the adapter's (what SFT used), else the base's.
        let tokenizer = tokenizer_file(adapter)
            .ok()
            .filter(|path| path.is_file())
            .or_else(|| tokenizer_file(base).ok().filter(|path| path.is_file()));
        if let Some(tokenizer) = tokenizer {
            let copy = context.out_dir.join("tokenizer.json");
            std::fs::copy(&tokenizer, &copy)
                .map_err(|error| StageError::io(format!("writing {}", copy.display()), error))?;
            crate::tokenize::template::copy_companions(&tokenizer, context.out_dir).map_err(
                |error| {
                    StageError::io(
                        format!("copying {}'s companions", tokenizer.display()),
                        error,
                    )
                },
            )?;
        }
        let _ = writeln!(
            context.log,
            "merged a rank-{} adapter (α {}) on {} into {} tensors",
            spec.rank,
            spec.alpha,
            spec.targets.join(", "),
            merged.len()
        );
        let mut metrics = serde_json::Map::new();
        metrics.insert("rank".into(), serde_json::json!(spec.rank));
        metrics.insert("alpha".into(), serde_json::json!(spec.alpha));
        Ok(StageOutcome { metrics })
    }
}
