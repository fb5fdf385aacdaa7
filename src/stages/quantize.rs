//! The `quantize` kind: a QLoRA base made once and kept in the store. The projections
//! of the model's blocks (`model.layers.N.….*_proj.weight`; GPT-2's Conv1D weights,
//! transposed first as bitsandbytes does) are quantized (`nf4`, with
//! `double_quant` optional, or ggml's `q4_0`/`q8_0`); embeddings, norms, biases and the
//! head are copied as stored. The output is a model directory in bitsandbytes' 4-bit
//! serialization (see [`crate::model::quantized_files`]): every `sft` stage with
//! `adapter: { kind: qlora }` on it reads the codes as they are, so no run, and no
//! resumed run, quantizes the base again; transformers loads it as a 4-bit model. One
//! shard is read and written at a time.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, copy_tokenizer,
};
use crate::model::mapped::{float_values, is_conv1d, is_projection, transpose};
use crate::model::quant::{self, QuantKind, QuantSpec};
use crate::model::quantized_files::{self, StoredTensor};
use crate::model::{self, ModelError, shards};
use crate::path_error::{AtPath, write_json};

/// Settings of a `quantize` stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSettings {
    /// `nf4` (bitsandbytes' 4-bit NormalFloat, QLoRA's), `q4_0` or `q8_0` (ggml's).
    #[serde(default)]
    pub quant: QuantKind,
    /// NF4 only: store each block's scale in 8 bits too (QLoRA's double quantization,
    /// about 0.37 bits per weight less).
    #[serde(default)]
    pub double_quant: bool,
}

impl QuantizeSettings {
    /// The quantization asked for.
    pub fn spec(&self) -> QuantSpec {
        QuantSpec {
            kind: self.quant,
            double_quant: self.double_quant,
        }
    }
}

/// The `quantize` stage kind.
pub struct Quantize;

impl StageKind for Quantize {
    type Settings = QuantizeSettings;
    const NAME: &'static str = "quantize";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "quantize a model's block projections (nf4 | q4_0 | q8_0): a QLoRA base kept in the store";
    const OUTPUT: Artifact = Artifact::Model;
    const INPUTS: InputRules = InputRules::Slots(&[InputSlot::required("model", MODEL_SOURCES)]);

    fn check(settings: &QuantizeSettings, _inputs: &[&str]) -> Result<(), String> {
        if settings.double_quant && settings.quant != QuantKind::Nf4 {
            return Err(format!(
                "`double_quant` applies to `quant: nf4` only, not {}",
                settings.quant.as_str()
            ));
        }
        Ok(())
    }

    fn run(
        settings: &QuantizeSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let source = &context.inputs["model"];
        model::require_unquantized(source)?;
        // A model of a family trainyard implements (the error names the config's key).
        model::load_config(source)?;
        let files = model::safetensors_files(source)?;
        let mut weight_map = BTreeMap::new();
        let (mut matrices, mut values, mut stored_bytes, mut total_bytes) =
            (0usize, 0usize, 0usize, 0u64);
        for (index, file) in files.iter().enumerate() {
            if context.cancel.is_cancelled() {
                return Err(StageError::Interrupted);
            }
            let name = file
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (tensors, quantized) = quantize_file(file, settings)?;
            for (tensor, stored) in &tensors {
                weight_map.insert(tensor.clone(), name.clone());
                total_bytes += stored.data.len() as u64;
                if is_projection(tensor) {
                    stored_bytes += stored.data.len();
                }
            }
            matrices += quantized.len();
            values += quantized.iter().sum::<usize>();
            model::save_stored(&tensors, &context.out_dir.join(&name))?;
            let _ = writeln!(
                context.log,
                "shard {}/{}: {name} written",
                index + 1,
                files.len()
            );
        }
        if files.len() > 1 {
            shards::write_index(context.out_dir, total_bytes, &weight_map)?;
        }
        write_config(source, context.out_dir, settings)?;
        copy_tokenizer(&[source.as_path()], context.out_dir)?;
        let generation = source.join("generation_config.json");
        if generation.is_file() {
            let to = context.out_dir.join("generation_config.json");
            std::fs::copy(&generation, &to).at(to)?;
        }
        let _ = writeln!(
            context.log,
            "quantized {matrices} projections ({values} values) to {}{}",
            settings.quant.as_str(),
            if settings.double_quant {
                " with double quantization"
            } else {
                ""
            }
        );
        let mut metrics = serde_json::Map::new();
        metrics.insert("quant".into(), serde_json::json!(settings.quant.as_str()));
        metrics.insert(
            "double_quant".into(),
            serde_json::json!(settings.double_quant),
        );
        metrics.insert("projections".into(), serde_json::json!(matrices));
        metrics.insert("projection_bytes".into(), serde_json::json!(stored_bytes));
        Ok(StageOutcome { metrics })
    }
}

/// A file's tensors as written, and the number of values of each projection quantized.
type QuantizedFile = (Vec<(String, StoredTensor)>, Vec<usize>);

/// Every tensor of the safetensors file `path`, its projections quantized.
fn quantize_file(
    path: &std::path::Path,
    settings: &QuantizeSettings,
) -> Result<QuantizedFile, StageError> {
    let file = std::fs::File::open(path).at(path)?;
    // SAFETY: mapped read-only; a stage never writes its inputs.
    let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
    let tensors = safetensors::SafeTensors::deserialize(&map)
        .map_err(|error| ModelError::safetensors(path, error))?;
    let mut out = Vec::new();
    let mut quantized_values = Vec::new();
    for (name, view) in tensors.tensors() {
        let shape = view.shape().to_vec();
        let quantizable = is_projection(&name)
            && shape.len() == 2
            && matches!(
                view.dtype(),
                safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
            );
        if !quantizable {
            out.push((
                name,
                StoredTensor {
                    dtype: view.dtype(),
                    shape,
                    data: view.data().to_vec(),
                },
            ));
            continue;
        }
        let (mut rows, mut cols) = (shape[0], shape[1]);
        quantized_values.push(rows * cols);
        let mut values = float_values(view.dtype(), view.data()).map_err(|message| {
            ModelError::safetensors(path, format!("tensor `{name}`: {message}"))
        })?;
        // GPT-2's Conv1D is stored [in, out]: quantized as its transpose, the nn.Linear
        // layout, as bitsandbytes does (its blocks then run along the input).
        if is_conv1d(&name) {
            values = transpose(&values, (rows, cols));
            (rows, cols) = (cols, rows);
        }
        let (quantized, nested) = quant::quantize_spec(settings.spec(), &values, cols)
            .map_err(|error| ModelError::safetensors(path, format!("tensor `{name}`: {error}")))?;
        out.extend(quantized_files::stored_tensors(
            &name,
            &quantized,
            (rows, cols),
            torch_dtype(view.dtype()),
            nested.as_ref(),
        ));
    }
    Ok((out, quantized_values))
}

/// torch's name of a float dtype, as bitsandbytes records a matrix's original dtype.
fn torch_dtype(dtype: safetensors::Dtype) -> &'static str {
    match dtype {
        safetensors::Dtype::BF16 => "bfloat16",
        safetensors::Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// The source's `config.json` with `quantization_config` added.
fn write_config(
    source: &std::path::Path,
    out_dir: &std::path::Path,
    settings: &QuantizeSettings,
) -> Result<(), StageError> {
    let from = source.join("config.json");
    let text = std::fs::read_to_string(&from).at(&from)?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| ModelError::json(&from, error))?;
    let entry = quantized_files::config_entry(settings.spec());
    if let Some(object) = config.as_object_mut() {
        object.insert(quantized_files::CONFIG_KEY.into(), entry);
    }
    write_json(&out_dir.join("config.json"), &config)?;
    Ok(())
}
