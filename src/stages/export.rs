//! The `export` kind: a model as other tools run it. The Hugging Face directory
//! (`config.json`, `model.safetensors` or shards with their index, `tokenizer.json`,
//! `tokenizer_config.json` with the chat template and special tokens,
//! `generation_config.json`) loads in `transformers` as it is; GGUF files (f32, f16,
//! q8_0) load in llama.cpp.
//!
//! The weights keep the source's dtype unless `dtype:` says otherwise, and its shards:
//! a sharded source is written with the same shards, a single file is split as
//! transformers' `save_pretrained` splits it when bigger than `max_shard_size`. Files
//! that need no change are copied; otherwise one shard at a time is converted and
//! written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, TOKENIZER_SOURCES, invalid,
};
use crate::export::gguf::{self, GgufDtype};
use crate::model::{self, ModelConfig, ModelError, shards};
use crate::path_error::write_json;
use crate::tokenize::chat::JINJA_TEMPLATE;
use crate::tokenize::load::{check_special_ids, load_tokenizer, tokenizer_file};
use crate::tokenize::special::{END_OF_TEXT, END_OF_TURN, PAD, SPECIAL_TOKENS};
use crate::tokenize::template::{TOKENIZER_CONFIG, copy_companions};

/// Settings of an `export` stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct ExportSettings {
    /// GGUF files to write, by weight type (`f32`, `f16`, `q8_0`); by default `[q8_0]`.
    /// `[]` writes none.
    #[serde(default)]
    pub gguf: Option<Vec<GgufDtype>>,
    /// The dtype of the Hugging Face weights (`f32`, `bf16`, `f16`); by default the
    /// source's.
    #[serde(default)]
    pub dtype: Option<WeightDtype>,
    /// The largest shard of the Hugging Face weights, in bytes or as transformers writes
    /// it (`"5GB"`, `"500MB"`, `"2GiB"`); by default transformers' 50GB.
    #[serde(default)]
    pub max_shard_size: Option<ShardSize>,
}

/// A dtype of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl WeightDtype {
    fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
}

/// A shard size: bytes, or a number with a unit as transformers reads it (`KB`, `MB`,
/// `GB` decimal; `KiB`, `MiB`, `GiB` binary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ShardSize {
    /// Bytes.
    Bytes(u64),
    /// `"5GB"` and the like.
    Text(String),
}

impl ShardSize {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        let text = match self {
            ShardSize::Bytes(0) => return Err("`max_shard_size` must be positive".to_string()),
            ShardSize::Bytes(bytes) => return Ok(*bytes),
            ShardSize::Text(text) => text.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KIB" => 1 << 10,
            "MIB" => 1 << 20,
            "GIB" => 1 << 30,
            _ => 0,
        };
        match number.parse::<u64>() {
            Ok(number) if number > 0 && scale > 0 => Ok(number * scale),
            _ => Err(format!(
                "`max_shard_size`: `{text}` is not a size (bytes, or a number with KB, MB, GB, KiB, MiB or GiB)"
            )),
        }
    }
}

/// The `export` stage kind.
pub struct Export;

impl StageKind for Export {
    type Settings = ExportSettings;
    const NAME: &'static str = "export";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "write a model as a Hugging Face directory (with chat template) and GGUF files";
    const OUTPUT: Artifact = Artifact::Export;
    const INPUTS: InputRules = InputRules::Slots(&[
        InputSlot::required("model", MODEL_SOURCES),
        InputSlot::optional("tokenizer", TOKENIZER_SOURCES),
    ]);

    fn check(settings: &ExportSettings, _inputs: &[&str]) -> Result<(), String> {
        match &settings.max_shard_size {
            Some(size) => size.bytes().map(|_| ()),
            None => Ok(()),
        }
    }

    fn run(
        settings: &ExportSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        run(settings, context)
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), StageError> {
    std::fs::copy(from, to).map(|_| ()).map_err(|error| {
        StageError::io(
            format!("copying {} to {}", from.display(), to.display()),
            error,
        )
    })
}

/// Whether the tokenizer has trainyard's special tokens at their fixed ids (then the
/// chat template applies).
fn has_trainyard_specials(tokenizer: &tokenizers::Tokenizer) -> bool {
    check_special_ids(tokenizer).is_ok()
}

/// `tokenizer_config.json` for `transformers`' `PreTrainedTokenizerFast`.
fn tokenizer_config(tokenizer: &tokenizers::Tokenizer, config: &ModelConfig) -> Value {
    let mut decoder = serde_json::Map::new();
    let mut added: Vec<(u32, String, bool)> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, token)| (id, token.content, token.special))
        .collect();
    added.sort();
    for (id, content, special) in &added {
        decoder.insert(
            id.to_string(),
            json!({
                "content": content,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": special,
            }),
        );
    }
    let mut value = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_positions(),
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": decoder,
    });
    if has_trainyard_specials(tokenizer)
        && let Some(map) = value.as_object_mut()
    {
        map.insert("chat_template".into(), json!(JINJA_TEMPLATE));
        map.insert("bos_token".into(), json!(END_OF_TEXT));
        map.insert("eos_token".into(), json!(END_OF_TURN));
        map.insert("pad_token".into(), json!(PAD));
        map.insert(
            "additional_special_tokens".into(),
            json!(SPECIAL_TOKENS[3..].to_vec()),
        );
    }
    value
}

fn run(
    settings: &ExportSettings,
    context: &mut StageContext<'_>,
) -> Result<StageOutcome, StageError> {
    let source = &context.inputs["model"];
    model::require_unquantized(source)?;
    let config = model::load_config(source)?;
    let tokenizer_path = tokenizer_file(context.inputs.get("tokenizer").unwrap_or(source))?;
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let out = context.out_dir;

    let max_shard_size = match &settings.max_shard_size {
        Some(size) => size.bytes().map_err(invalid)?,
        None => shards::DEFAULT_MAX_SHARD_SIZE,
    };
    let weights = write_weights(
        source,
        out,
        settings.dtype.map(WeightDtype::dtype),
        max_shard_size,
        context,
    )?;

    // config.json with the weights' dtype and the special-token ids transformers'
    // generate() reads.
    let mut hf_config = config.to_hf_json();
    model::set_torch_dtype(&mut hf_config, weights.dtype);
    let ours = has_trainyard_specials(&tokenizer);
    if ours && let Some(map) = hf_config.as_object_mut() {
        map.insert("bos_token_id".into(), json!(1));
        map.insert("eos_token_id".into(), json!(2));
        map.insert("pad_token_id".into(), json!(0));
    }
    if !ours && let Some(map) = hf_config.as_object_mut() {
        // A model from elsewhere keeps its special-token ids: from its own config.json,
        // else from the generation_config.json that travels with its tokenizer.
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            let files = ["config.json", "generation_config.json"];
            if let Some(id) = model::declared_token_ids(source, &files, key)
                .into_iter()
                .next()
            {
                map.entry(key).or_insert(id);
            }
        }
    }
    write_json(&out.join("config.json"), &hf_config)?;
    let copied = weights.files;
    copy(&tokenizer_path, &out.join("tokenizer.json"))?;
    // A model from elsewhere keeps its own template, special tokens and stop tokens;
    // trainyard writes them only for its own tokenizers.
    let companions = copy_companions(&tokenizer_path, out)
        .map_err(|error| StageError::io(format!("copying beside {}", out.display()), error))?;
    if !companions.contains(&TOKENIZER_CONFIG) {
        write_json(
            &out.join("tokenizer_config.json"),
            &tokenizer_config(&tokenizer, &config),
        )?;
    }
    if !companions.contains(&"generation_config.json") {
        let generation = if ours {
            // Stop at the end of a turn, or at the end of a document for raw text.
            json!({ "bos_token_id": 1, "eos_token_id": [2, 1], "pad_token_id": 0 })
        } else {
            json!({})
        };
        write_json(&out.join("generation_config.json"), &generation)?;
    }

    let gguf_types = settings
        .gguf
        .clone()
        .unwrap_or_else(|| vec![GgufDtype::Q8_0]);
    let mut metrics = serde_json::Map::new();
    for dtype in gguf_types {
        if context.cancel.is_cancelled() {
            return Err(StageError::Interrupted);
        }
        let path = out.join(format!("model-{}.gguf", dtype.as_str()));
        let summary = gguf::write_gguf(source, &tokenizer_path, &path, dtype)?;
        let _ = writeln!(
            context.log,
            "wrote {} ({} tensors, {} bytes, pre-tokenizer {})",
            path.display(),
            summary.tensors.len(),
            summary.bytes,
            summary.tokenizer_pre
        );
        metrics.insert(
            format!("gguf_{}_bytes", dtype.as_str()),
            json!(summary.bytes),
        );
    }
    let _ = writeln!(
        context.log,
        "exported {} ({}, {}) with {}",
        source.display(),
        config.model_type(),
        model::torch_dtype_name(weights.dtype),
        copied
            .iter()
            .map(|name| name.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(StageOutcome { metrics })
}

/// The Hugging Face weights an export wrote.
struct WrittenWeights {
    /// File names, in order.
    files: Vec<PathBuf>,
    /// The dtype most of the weights are in (`torch_dtype`).
    dtype: DType,
}

/// Writes the weights of `source` into `out` in `dtype` (each tensor's own when
/// `None`): copied when nothing changes, else converted one shard at a time. A sharded
/// source keeps its shards; a single file is split at `max_shard_size`.
fn write_weights(
    source: &Path,
    out: &Path,
    dtype: Option<DType>,
    max_shard_size: u64,
    context: &StageContext<'_>,
) -> Result<WrittenWeights, StageError> {
    let files = model::safetensors_files(source)?;
    let headers = shards::read_headers(&files)?;
    let target = |header: &shards::TensorHeader| dtype.unwrap_or(header.dtype);
    let sizes: Vec<(String, u64)> = headers
        .iter()
        .map(|header| (header.name.clone(), header.bytes_in(target(header))))
        .collect();
    let written_dtype = shards::main_dtype(
        headers
            .iter()
            .map(|header| (target(header), header.bytes_in(target(header)) as usize)),
    );
    let total: u64 = sizes.iter().map(|(_, bytes)| bytes).sum();
    let unchanged = headers.iter().all(|header| target(header) == header.dtype);
    let name_of = |path: &Path| path.file_name().map(PathBuf::from).unwrap_or_default();
    if unchanged && (files.len() > 1 || total <= max_shard_size) {
        let mut copied = Vec::new();
        for file in &files {
            copy(file, &out.join(name_of(file)))?;
            copied.push(name_of(file));
        }
        let index = source.join(shards::INDEX_FILE);
        if files.len() > 1 && index.is_file() {
            copy(&index, &out.join(shards::INDEX_FILE))?;
        }
        return Ok(WrittenWeights {
            files: copied,
            dtype: written_dtype,
        });
    }
    // The groups of tensor names, one per output file, and the files' names.
    let (groups, names): (Vec<Vec<String>>, Vec<PathBuf>) = if files.len() > 1 {
        let mut groups = vec![Vec::new(); files.len()];
        for header in &headers {
            groups[header.file].push(header.name.clone());
        }
        (groups, files.iter().map(|file| name_of(file)).collect())
    } else {
        let groups = shards::plan_shards(&sizes, max_shard_size);
        let count = groups.len();
        let names = match count {
            1 => vec![PathBuf::from(shards::SINGLE_FILE)],
            _ => (1..=count)
                .map(|k| PathBuf::from(shards::shard_name(k, count)))
                .collect(),
        };
        (groups, names)
    };
    // SAFETY: the source files are mapped read-only and not written while mapped.
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|error| ModelError::safetensors(source, error))?;
    let mut weight_map = BTreeMap::new();
    for (group, name) in groups.iter().zip(&names) {
        if context.cancel.is_cancelled() {
            return Err(StageError::Interrupted);
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(group.len());
        for tensor_name in group {
            let tensor = mapped
                .load(tensor_name, &Device::Cpu)
                .and_then(|tensor| match dtype {
                    Some(dtype) => tensor.to_dtype(dtype),
                    None => Ok(tensor),
                })
                .map_err(|error| {
                    ModelError::safetensors(source, format!("`{tensor_name}`: {error}"))
                })?;
            tensors.push((tensor_name.clone(), tensor));
            weight_map.insert(tensor_name.clone(), name.display().to_string());
        }
        model::save_tensors(&tensors, &out.join(name))?;
    }
    if names.len() > 1 {
        shards::write_index(out, total, &weight_map)?;
    }
    Ok(WrittenWeights {
        files: names,
        dtype: written_dtype,
    })
}
