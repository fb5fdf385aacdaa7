//! The transformer language models trainyard trains: the `llama` family (Llama with
//! Llama 3 rotary scaling, Mistral and, with q/k/v biases, Qwen2) and the `gpt2`
//! family, in candle.
//!
//! This module owns the Hugging Face side of a checkpoint: [`load_config`] reads a
//! `config.json` (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`,
//! `GPT2LMHeadModel`; anything else is refused by name, see [`check_architecture`]),
//! [`ModelConfig::to_hf_json`] writes one, [`save_safetensors`] writes
//! `model.safetensors` with HF tensor names, [`shards`] reads and writes sharded
//! weights, and [`load_pretrained`] loads a local HF directory. Parameters live in a
//! [`VarMap`] under their HF names, so the same [`CausalLm::new`] builds a trainable
//! model (from a `VarMap`, always f32) or a frozen one. A frozen base keeps its dtype:
//! f32 weights are loaded as tensors, bf16/f16 matrices are read in place from the
//! mapped files and multiplied in f32 ([`mapped`]). [`init_weights`] initialises a
//! fresh model bit-reproducibly from [`crate::rng::Rng`].
//!
//! Every op on the training forward path has a backward pass in candle 0.11: norms,
//! softmax and RoPE are written as compositions of differentiable primitives (see
//! `llama.rs`) or as trainyard's fused ops with a hand-written backward ([`fused`]).
//! The fused `candle_nn` kernels (`ops::rms_norm`, `softmax_last_dim`,
//! `rotary_emb::rope`) silently cut the gradient, so [`CausalLm::forward`] takes them
//! only when asked for [`Kernels::Inference`], as cached generation does, feeding new
//! tokens through a [`KvCache`].
//!
//! GPT-2 weights stay in HF's Conv1D layout `[in, out]` in memory as well as on disk
//! (the forward computes `x·W + b`), so neither load nor save transposes anything.

pub mod attention;
pub mod bf16_gemm;
pub mod body;
pub mod exp;
pub mod fused;
pub mod gpt2;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod mapped;
pub mod precision;
pub mod quant;
pub mod quantized_files;
pub mod shards;
#[cfg(test)]
mod testing;
pub mod vocab;
pub mod weight;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::path_error::AtPath;
use crate::rng::Rng;

pub use attention::Kernels;
pub use gpt2::{Gpt2, Gpt2Config};
pub use kv_cache::KvCache;
pub use llama::{Llama, Llama3RopeScaling, LlamaConfig, LlamaFlavor};
pub use mapped::MappedSafetensors;
pub use quantized_files::StoredTensor;
pub use shards::safetensors_files;

/// Runs `work` on a thread of rayon's pool and waits for it. A forward or backward pass
/// is hundreds of parallel products, norms and element-wise ops; started from a thread
/// outside the pool, each hands its work over and sleeps until it is done (a futex
/// wake-up both ways: ~17% of a one-token decoding step, and at 2 threads a training
/// step ran 4,842–5,063 → 5,896–6,085 tok/s once inside), while from inside the pool
/// they run in place. The caller's precision scope ([`precision::BF16Scope`], which is
/// thread-local) holds inside `work` too.
pub fn on_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    let unit = precision::bf16_unit();
    rayon::scope(|_| {
        let _precision = precision::BF16Scope::enter(unit);
        work()
    })
}

/// The rotary base HF uses when a config names none (neither `rope_theta` nor
/// `rope_parameters.rope_theta`).
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// Standard deviation of the normal initialisation of weight matrices and embeddings.
pub const INIT_STD: f64 = 0.02;

/// The RNG stream of weight initialisation (see [`crate::rng::Rng::for_item`]).
const INIT_STREAM: u64 = 0x6d6f_6465_6c69_6e69;

/// Errors of building, loading and saving models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
    /// A `config.json` is not valid JSON or has a value of the wrong type.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A `config.json` lacks a key this family needs.
    #[error("{path}: missing key `{key}`")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A `config.json` asks for something trainyard does not implement, or its values
    /// are inconsistent.
    #[error("{path}: key `{key}`: {message}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// Why.
        message: String,
    },
    /// A shard listed in `model.safetensors.index.json` is not there.
    #[error("{index}: lists `{shard}`, which does not exist ({})", .index.with_file_name(.shard).display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name as the index gives it.
        shard: String,
    },
    /// A safetensors file could not be read or written.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A LoRA adapter does not fit its base model.
    #[error("{path}: {message}")]
    Adapter {
        /// The adapter's weights file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// A tensor operation failed (shape mismatch, missing tensor, …).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// [`ModelError::Unsupported`]: `key` of `path`, and why.
    pub fn unsupported(path: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        let (path, key, message) = (path.to_path_buf(), key.into(), message.into());
        ModelError::Unsupported { path, key, message }
    }

    /// [`ModelError::Json`] at `path`.
    pub fn json(path: &Path, message: impl ToString) -> Self {
        let (path, message) = (path.to_path_buf(), message.to_string());
        ModelError::Json { path, message }
    }

    /// [`ModelError::MissingKey`] `key` of `path`.
    pub fn missing_key(path: &Path, key: impl Into<String>) -> Self {
        let (path, key) = (path.to_path_buf(), key.into());
        ModelError::MissingKey { path, key }
    }

    /// [`ModelError::Safetensors`] at `path`.
    pub fn safetensors(path: &Path, message: impl ToString) -> Self {
        let (path, message) = (path.to_path_buf(), message.to_string());
        ModelError::Safetensors { path, message }
    }
}

/// The HF `model_type`s trainyard implements, with their `architectures` entry.
pub const SUPPORTED_ARCHITECTURES: [(&str, &str); 4] = [
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("gpt2", "GPT2LMHeadModel"),
];

/// A model architecture with its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// `LlamaForCausalLM`, `Qwen2ForCausalLM` or `MistralForCausalLM`.
    Llama(LlamaConfig),
    /// `GPT2LMHeadModel`.
    Gpt2(Gpt2Config),
}

impl ModelConfig {
    /// The HF `model_type`: `llama`, `qwen2`, `mistral` or `gpt2`.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Llama(config) => config.flavor.model_type(),
            ModelConfig::Gpt2(_) => "gpt2",
        }
    }

    /// Vocabulary size (rows of the embedding, columns of the logits).
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Llama(config) => config.vocab_size,
            ModelConfig::Gpt2(config) => config.vocab_size,
        }
    }

    /// The config with the vocabulary grown (or set) to `vocab` tokens.
    pub fn with_vocab_size(&self, vocab: usize) -> ModelConfig {
        let mut config = self.clone();
        match &mut config {
            ModelConfig::Llama(config) => config.vocab_size = vocab,
            ModelConfig::Gpt2(config) => config.vocab_size = vocab,
        }
        config
    }

    /// Whether the output head shares the embedding table (always for GPT-2).
    pub fn tied_embeddings(&self) -> bool {
        match self {
            ModelConfig::Llama(config) => config.tie_word_embeddings,
            ModelConfig::Gpt2(_) => true,
        }
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Llama(config) => config.num_hidden_layers,
            ModelConfig::Gpt2(config) => config.n_layer,
        }
    }

    /// Longest sequence the model is configured for.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Llama(config) => config.max_positions(),
            ModelConfig::Gpt2(config) => config.n_positions,
        }
    }

    /// The HF `config.json` of this model (`torch_dtype: float32`; for the llama family
    /// the rotary base in both the transformers 5 and the older form).
    pub fn to_hf_json(&self) -> Value {
        match self {
            ModelConfig::Llama(config) => config.to_hf_json(),
            ModelConfig::Gpt2(config) => config.to_hf_json(),
        }
    }

    /// Checks the hyper-parameters fit together (head counts divide, sizes non-zero).
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        match self {
            ModelConfig::Llama(config) => config.validate(path),
            ModelConfig::Gpt2(config) => config.validate(path),
        }
    }

    /// Writes `config.json` into `dir` (pretty-printed, trailing newline), saying the
    /// weights are f32.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        self.save_with_dtype(dir, DType::F32)
    }

    /// Writes `config.json` into `dir` with `torch_dtype`/`dtype` naming `dtype`, the
    /// dtype of the weights beside it.
    pub fn save_with_dtype(&self, dir: &Path, dtype: DType) -> Result<(), ModelError> {
        let path = dir.join("config.json");
        let mut value = self.to_hf_json();
        set_torch_dtype(&mut value, dtype);
        Ok(crate::path_error::write_json(&path, &value)?)
    }
}

/// transformers' name of a dtype (`torch_dtype` in `config.json`).
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Sets `torch_dtype` (transformers 4) and `dtype` (transformers 5) of an HF config.
pub fn set_torch_dtype(config: &mut Value, dtype: DType) {
    if let Some(map) = config.as_object_mut() {
        map.insert("torch_dtype".into(), json!(torch_dtype_name(dtype)));
        map.insert("dtype".into(), json!(torch_dtype_name(dtype)));
    }
}

/// The subset of HF config keys the families use; everything optional so that a
/// missing key can be reported by name (or defaulted the way transformers does).
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    // llama / qwen2
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    sliding_window: Option<usize>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    // gpt2
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_positions: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
}

/// The `config.json` of a model directory (or `dir` itself when it is a file).
fn config_path(dir: &Path) -> PathBuf {
    if dir.is_dir() {
        dir.join("config.json")
    } else {
        dir.to_path_buf()
    }
}

/// Reads `dir/config.json` (or `dir` itself when it is a file) as an HF config of the
/// `llama`, `qwen2`, `mistral` or `gpt2` family.
///
/// Missing optional keys get transformers' defaults, except that the rotary base is
/// read from `rope_parameters.rope_theta` (transformers 5) or top-level `rope_theta`
/// (older files) and is [`DEFAULT_ROPE_THETA`] only when neither is present. Features
/// trainyard does not implement (rope scaling other than Llama 3's, Qwen2's sliding
/// windows, other activations) are errors, not silently ignored.
pub fn load_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = config_path(dir);
    let text = std::fs::read_to_string(&path).at(&path)?;
    parse_config(&text, &path)
}

/// Refuses, by name, a model whose `config.json` declares an architecture trainyard does
/// not implement (`model_type` or an `architectures` entry), reading nothing but
/// `config.json`: cheap enough to call when a pipeline is planned, before any stage
/// runs. [`load_config`] makes the same check first.
pub fn check_architecture(dir: &Path) -> Result<(), ModelError> {
    let path = config_path(dir);
    let text = std::fs::read_to_string(&path).at(&path)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::json(&path, e))?;
    architecture_of(&value, &path).map(|_| ())
}

/// What can be checked of a model directory without reading its weights: the
/// architecture ([`check_architecture`], config.json alone) and that every shard the
/// index lists exists. For model inputs when a pipeline is planned.
pub fn check_model_dir(dir: &Path) -> Result<(), ModelError> {
    check_architecture(dir)?;
    safetensors_files(dir).map(|_| ())
}

/// The supported `model_type` of a parsed `config.json`, or the error naming what is
/// not supported.
fn architecture_of<'a>(value: &'a Value, path: &Path) -> Result<&'a str, ModelError> {
    let unsupported = |key: &str, name: &str, supported: Vec<&str>| {
        let message = format!(
            "`{name}` is not supported (trainyard supports {})",
            supported.join(", ")
        );
        ModelError::unsupported(path, key, message)
    };
    let model_type = match value.get("model_type") {
        Some(Value::String(model_type)) => model_type.as_str(),
        Some(_) => {
            return Err(ModelError::json(
                path,
                "key `model_type`: expected a string",
            ));
        }
        None => return Err(ModelError::missing_key(path, "model_type")),
    };
    if !SUPPORTED_ARCHITECTURES
        .iter()
        .any(|(known, _)| *known == model_type)
    {
        let names = SUPPORTED_ARCHITECTURES
            .iter()
            .map(|(name, _)| *name)
            .collect();
        return Err(unsupported("model_type", model_type, names));
    }
    if let Some(Value::Array(architectures)) = value.get("architectures") {
        for architecture in architectures.iter().filter_map(Value::as_str) {
            if !SUPPORTED_ARCHITECTURES
                .iter()
                .any(|(_, known)| *known == architecture)
            {
                let names = SUPPORTED_ARCHITECTURES
                    .iter()
                    .map(|(_, name)| *name)
                    .collect();
                return Err(unsupported("architectures", architecture, names));
            }
        }
    }
    Ok(model_type)
}

/// Llama 3 rotary scaling from `rope_parameters` (transformers 5) or `rope_scaling`
/// (older files, `type` or `rope_type`); `None` for the default rotation. Any other
/// rotary type is refused.
fn rope_scaling_of(raw: &RawConfig, path: &Path) -> Result<Option<Llama3RopeScaling>, ModelError> {
    let (key, object) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(Value::Object(object)), _) => ("rope_parameters", object),
        (_, Some(Value::Object(object))) => ("rope_scaling", object),
        _ => return Ok(None),
    };
    let kind = object
        .get("rope_type")
        .or_else(|| object.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => return Ok(None),
        "llama3" => {}
        other => {
            return Err(ModelError::unsupported(
                path,
                format!("{key}.rope_type"),
                format!("`{other}` is not supported (only `default` and `llama3`)"),
            ));
        }
    }
    let number = |field: &str| {
        object
            .get(field)
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::missing_key(path, format!("{key}.{field}")))
    };
    let scaling = Llama3RopeScaling {
        factor: number("factor")?,
        low_freq_factor: number("low_freq_factor")?,
        high_freq_factor: number("high_freq_factor")?,
        original_max_position_embeddings: number("original_max_position_embeddings")? as usize,
    };
    if scaling.high_freq_factor <= scaling.low_freq_factor || scaling.factor <= 0.0 {
        return Err(ModelError::unsupported(
            path,
            key,
            "llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor",
        ));
    }
    Ok(Some(scaling))
}

/// Parses the text of an HF `config.json`; `path` is only used in error messages.
pub fn parse_config(text: &str, path: &Path) -> Result<ModelConfig, ModelError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ModelError::json(path, e))?;
    architecture_of(&value, path)?;
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        ModelError::json(path, format!("key `{}`: {}", error.path(), error.inner()))
    })?;
    let missing = |key: &str| ModelError::missing_key(path, key);
    let unsupported = |key: &str, message: String| ModelError::unsupported(path, key, message);
    let model_type = raw
        .model_type
        .as_deref()
        .ok_or_else(|| missing("model_type"))?;
    let config = match model_type {
        "llama" | "qwen2" | "mistral" => {
            let flavor = match model_type {
                "llama" => LlamaFlavor::Llama,
                "qwen2" => LlamaFlavor::Qwen2,
                _ => LlamaFlavor::Mistral,
            };
            if let Some(act) = raw.hidden_act.as_deref()
                && act != "silu"
            {
                return Err(unsupported(
                    "hidden_act",
                    format!("`{act}` is not supported (only `silu`)"),
                ));
            }
            let rope_scaling = rope_scaling_of(&raw, path)?;
            if raw.use_sliding_window == Some(true) && flavor == LlamaFlavor::Qwen2 {
                return Err(unsupported(
                    "use_sliding_window",
                    "sliding-window attention is not supported".to_string(),
                ));
            }
            let num_attention_heads = raw
                .num_attention_heads
                .ok_or_else(|| missing("num_attention_heads"))?;
            let hidden_size = raw.hidden_size.ok_or_else(|| missing("hidden_size"))?;
            let rope_theta = raw
                .rope_parameters
                .as_ref()
                .and_then(|rope| rope.get("rope_theta"))
                .and_then(Value::as_f64)
                .or(raw.rope_theta)
                .unwrap_or(DEFAULT_ROPE_THETA);
            let attention_bias = raw.attention_bias.unwrap_or(false);
            ModelConfig::Llama(LlamaConfig {
                flavor,
                vocab_size: raw.vocab_size.ok_or_else(|| missing("vocab_size"))?,
                hidden_size,
                intermediate_size: raw
                    .intermediate_size
                    .ok_or_else(|| missing("intermediate_size"))?,
                num_hidden_layers: raw
                    .num_hidden_layers
                    .ok_or_else(|| missing("num_hidden_layers"))?,
                num_attention_heads,
                num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
                head_dim: raw
                    .head_dim
                    .unwrap_or(hidden_size / num_attention_heads.max(1)),
                rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
                rope_theta,
                rope_scaling,
                // Qwen2's `sliding_window` only applies with `use_sliding_window`,
                // refused above.
                sliding_window: match flavor {
                    LlamaFlavor::Mistral => raw.sliding_window,
                    _ => None,
                },
                max_position_embeddings: raw.max_position_embeddings.unwrap_or(match flavor {
                    LlamaFlavor::Llama => 2048,
                    LlamaFlavor::Qwen2 => 32768,
                    LlamaFlavor::Mistral => 131_072,
                }),
                tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
                // Qwen2 always has q/k/v biases and never an o_proj bias; Llama's
                // `attention_bias` puts a bias on all four projections.
                qkv_bias: flavor == LlamaFlavor::Qwen2 || attention_bias,
                o_bias: flavor == LlamaFlavor::Llama && attention_bias,
                mlp_bias: flavor == LlamaFlavor::Llama && raw.mlp_bias.unwrap_or(false),
            })
        }
        "gpt2" => {
            if let Some(act) = raw.activation_function.as_deref()
                && act != "gelu_new"
            {
                return Err(unsupported(
                    "activation_function",
                    format!("`{act}` is not supported (only `gelu_new`)"),
                ));
            }
            for (key, value, wanted) in [
                ("scale_attn_weights", raw.scale_attn_weights, true),
                (
                    "scale_attn_by_inverse_layer_idx",
                    raw.scale_attn_by_inverse_layer_idx,
                    false,
                ),
                (
                    "reorder_and_upcast_attn",
                    raw.reorder_and_upcast_attn,
                    false,
                ),
            ] {
                if value.is_some_and(|value| value != wanted) {
                    return Err(unsupported(key, format!("only `{wanted}` is supported")));
                }
            }
            if raw.tie_word_embeddings == Some(false) {
                return Err(unsupported(
                    "tie_word_embeddings",
                    "GPT-2 models always tie lm_head to wte".to_string(),
                ));
            }
            let n_embd = raw.n_embd.ok_or_else(|| missing("n_embd"))?;
            ModelConfig::Gpt2(Gpt2Config {
                vocab_size: raw.vocab_size.ok_or_else(|| missing("vocab_size"))?,
                n_embd,
                n_layer: raw.n_layer.ok_or_else(|| missing("n_layer"))?,
                n_head: raw.n_head.ok_or_else(|| missing("n_head"))?,
                n_positions: raw.n_positions.unwrap_or(1024),
                layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
                n_inner: raw.n_inner.unwrap_or(4 * n_embd),
            })
        }
        other => {
            return Err(unsupported(
                "model_type",
                format!(
                    "`{other}` is not supported (trainyard supports llama, qwen2, mistral, gpt2)"
                ),
            ));
        }
    };
    config.validate(path)?;
    Ok(config)
}

/// A causal language model of either family.
#[derive(Debug, Clone)]
pub enum CausalLm {
    /// Llama or Qwen2.
    Llama(Llama),
    /// GPT-2.
    Gpt2(Gpt2),
}

impl CausalLm {
    /// Turns the LoRA adapters' dropout on with masks keyed by `key` (one key per training
    /// micro-batch), or off with `None`. A model without adapters ignores it.
    pub fn set_dropout_key(&self, key: Option<u64>) {
        if let Some(adapter) = self.adapter() {
            adapter.set_dropout_key(key);
        }
    }

    /// The LoRA adapter the model was built with, if any (its spec as settled for the
    /// family).
    pub fn adapter(&self) -> Option<&std::sync::Arc<lora::Adapter>> {
        match self {
            CausalLm::Llama(model) => model.adapter(),
            CausalLm::Gpt2(model) => model.adapter(),
        }
    }
}

impl CausalLm {
    /// Builds the model, fetching (or, from a `VarMap`, creating) every parameter under
    /// its HF name through `vb`.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<CausalLm, ModelError> {
        CausalLm::with_builders(config, lora::Builders::plain(vb))
    }

    /// As [`CausalLm::new`], reading the bf16/f16 matrices of a frozen base in place
    /// when `builders` maps them.
    pub fn with_builders(
        config: &ModelConfig,
        builders: lora::Builders,
    ) -> Result<CausalLm, ModelError> {
        Ok(match config {
            ModelConfig::Llama(config) => CausalLm::Llama(Llama::with_adapters(config, builders)?),
            ModelConfig::Gpt2(config) => CausalLm::Gpt2(Gpt2::with_builders(config, &builders)?),
        })
    }

    /// Logits `[B, T, V]` (the dtype of the parameters) for token ids `[B, T]` (u32):
    /// positions `0..T`, or with a `cache` the `T` positions after those it holds, which
    /// it then holds too (after an error it must be cleared). Feeding a sequence in
    /// pieces gives the logits it gets whole. Training takes
    /// [`Kernels::Differentiable`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        self.logits(&self.hidden(input_ids, cache, kernels)?, kernels)
    }

    /// The final hidden states `[B, T, H]` (after the last norm) for token ids `[B, T]`:
    /// [`CausalLm::forward`] without the head.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        match self {
            CausalLm::Llama(model) => model.hidden(input_ids, cache, kernels),
            CausalLm::Gpt2(model) => model.hidden(input_ids, cache, kernels),
        }
    }

    /// The head: logits `[…, V]` of final hidden states `[…, H]`.
    pub fn logits(&self, hidden: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        match self {
            CausalLm::Llama(model) => model.logits(hidden),
            CausalLm::Gpt2(model) => model.logits(hidden, kernels),
        }
    }

    /// The vocabulary the head answers over.
    pub fn vocab_size(&self) -> usize {
        match self {
            CausalLm::Llama(model) => model.config().vocab_size,
            CausalLm::Gpt2(model) => model.config().vocab_size,
        }
    }

    /// The number of blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            CausalLm::Llama(model) => model.config().num_hidden_layers,
            CausalLm::Gpt2(model) => model.config().n_layer,
        }
    }

    /// An empty [`KvCache`] for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }
}

/// A fresh trainable model: its parameters are created in a new [`VarMap`] of `dtype`
/// on `device` and initialised by [`init_weights`] with `seed`.
pub fn new_trainable(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(CausalLm, VarMap), ModelError> {
    let varmap = VarMap::new();
    let model = CausalLm::new(config, VarBuilder::from_varmap(&varmap, dtype, device))?;
    init_weights(&varmap, config, seed)?;
    Ok((model, varmap))
}

/// A frozen base model from the HF directory `dir` with a trainable LoRA adapter: the
/// base weights are plain tensors (no gradient) or, stored as bf16/f16, read in place
/// (see [`frozen_builders`]); the adapter's `lora_A`/`lora_B` (and the whole modules of
/// `modules_to_save`, copied from the base) live in the returned [`VarMap`] under PEFT's
/// names in `dtype`, initialised from `seed`.
pub fn new_lora(
    dir: &Path,
    spec: &lora::LoraSpec,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(CausalLm, VarMap, ModelConfig), ModelError> {
    let config = load_config(dir)?;
    let config_path = dir.join("config.json");
    let unsupported =
        |key: &str, message: String| ModelError::unsupported(&config_path, key, message);
    let spec =
        &adapter_for(&config, spec.clone()).map_err(|(key, message)| unsupported(key, message))?;
    let files = safetensors_files(dir)?;
    match (quantized_base(dir)?, spec.quant) {
        (Some(stored), None) => {
            return Err(unsupported(
                quantized_files::CONFIG_KEY,
                format!(
                    "the base holds {}-quantized weights: train on it with `adapter: {{ kind: \
                     qlora }}` (LoRA adapts a full-precision base)",
                    stored.kind.as_str()
                ),
            ));
        }
        (Some(stored), Some(wanted)) if stored != wanted => {
            return Err(unsupported(
                quantized_files::CONFIG_KEY,
                format!(
                    "the base is quantized as {}{}, the adapter asks for {}{}: leave \
                     `adapter.quant` out to train on the stored codes",
                    stored.kind.as_str(),
                    if stored.double_quant {
                        " (double_quant)"
                    } else {
                        ""
                    },
                    wanted.kind.as_str(),
                    if wanted.double_quant {
                        " (double_quant)"
                    } else {
                        ""
                    },
                ),
            ));
        }
        _ => {}
    }
    if spec.quant.is_some() && !(dtype == DType::F32 && device.is_cpu()) {
        return Err(unsupported(
            "quant",
            "a quantized (QLoRA) base trains in f32 on the CPU only".to_string(),
        ));
    }
    let unprefixed = gpt2_unprefixed(&config, &files)?;
    let frozen = frozen_builders(&files, dtype, device, (unprefixed, false), spec.quant)?;
    let base = frozen.base.clone();
    let varmap = VarMap::new();
    let adapter = VarBuilder::from_varmap(&varmap, dtype, device)
        .pp("base_model")
        .pp("model");
    let builders = lora::Builders {
        base: base.clone(),
        mapped: frozen.mapped,
        lora: Some((
            adapter,
            std::sync::Arc::new(lora::Adapter::new(spec.clone(), seed)),
        )),
    };
    let model = CausalLm::with_builders(&config, builders)?;
    lora::init_adapter(&varmap, seed, &base)?;
    // Trainable token rows may have grown the vocabulary.
    let config = match &model {
        CausalLm::Llama(llama) => ModelConfig::Llama(llama.config().clone()),
        CausalLm::Gpt2(_) => config,
    };
    Ok((model, varmap, config))
}

/// `spec` checked against the family of `config` and settled for it: the default
/// targets (every llama projection) become every projection of a GPT-2 block, and
/// `fan_in_fan_out` follows the layers. An error names the setting and says why.
fn adapter_for(
    config: &ModelConfig,
    spec: lora::LoraSpec,
) -> Result<lora::LoraSpec, (&'static str, String)> {
    let llama_config = match config {
        ModelConfig::Llama(llama_config) => llama_config,
        ModelConfig::Gpt2(_) => {
            let mut spec = spec.for_family(true);
            if spec.targets == lora::LLAMA_TARGETS {
                spec.targets = lora::GPT2_TARGETS.map(str::to_string).to_vec();
            }
            check_targets(&spec.targets, &lora::GPT2_TARGETS, "a GPT-2 block")?;
            if !spec.modules_to_save.is_empty() || !spec.trainable_tokens.is_empty() {
                return Err((
                    "modules_to_save",
                    "GPT-2 adapters train the blocks' projections only: saving whole \
                     modules or training new tokens' rows (`add_tokens`) is implemented for \
                     the llama family"
                        .to_string(),
                ));
            }
            return Ok(spec);
        }
    };
    let spec = spec.for_family(false);
    check_targets(&spec.targets, &lora::LLAMA_TARGETS, "this model")?;
    if let Some(module) = spec
        .modules_to_save
        .iter()
        .find(|module| !lora::SAVABLE_MODULES.contains(&module.as_str()))
    {
        return Err((
            "modules_to_save",
            format!(
                "`{module}` cannot be saved whole (expected some of {})",
                lora::SAVABLE_MODULES.join(", ")
            ),
        ));
    }
    if llama_config.tie_word_embeddings && spec.modules_to_save.iter().any(|m| m == "lm_head") {
        return Err((
            "modules_to_save",
            "this model's `lm_head` is tied to `embed_tokens`: list `embed_tokens` alone"
                .to_string(),
        ));
    }
    for (module, ids) in &spec.trainable_tokens {
        let allowed =
            module == "embed_tokens" || (module == "lm_head" && !llama_config.tie_word_embeddings);
        if !allowed {
            return Err((
                "trainable_token_indices",
                format!(
                    "token rows of `{module}` cannot be trained (expected `embed_tokens`, and `lm_head` when it is not tied)"
                ),
            ));
        }
        if spec.modules_to_save.contains(module) {
            return Err((
                "modules_to_save",
                format!(
                    "`{module}` is saved whole and has trainable token rows; PEFT takes one or the other"
                ),
            ));
        }
        if ids.is_empty() {
            return Err((
                "trainable_token_indices",
                format!("`{module}` lists no token ids"),
            ));
        }
    }
    Ok(spec)
}

/// Every target is one of `allowed` (the projections of `what`); else the error
/// [`adapter_for`] gives.
fn check_targets(
    targets: &[String],
    allowed: &[&str],
    what: &str,
) -> Result<(), (&'static str, String)> {
    match targets
        .iter()
        .find(|target| !allowed.contains(&target.as_str()))
    {
        Some(target) => Err((
            "targets",
            format!(
                "`{target}` is not a projection of {what} (expected some of {})",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// Whether `config` is GPT-2's and `files` name its tensors without `transformer.`
/// (the original GPT-2 files on the Hub).
fn gpt2_unprefixed(config: &ModelConfig, files: &[PathBuf]) -> Result<bool, ModelError> {
    Ok(matches!(config, ModelConfig::Gpt2(_)) && {
        let names = shards::tensor_names(files)?;
        !names.contains("transformer.wte.weight") && names.contains("wte.weight")
    })
}

/// The non-null `key` entries (`bos_token_id`, `eos_token_id`, `pad_token_id`: a number,
/// or for `eos_token_id` a list) of the model directory's JSON `files`
/// (`config.json`, `generation_config.json`), in `files`' order; a missing or unreadable
/// file is passed over, as transformers does.
pub fn declared_token_ids(dir: &Path, files: &[&str], key: &str) -> Vec<Value> {
    files
        .iter()
        .filter_map(|file| std::fs::read_to_string(dir.join(file)).ok())
        .filter_map(|text| serde_json::from_str::<Value>(&text).ok())
        .filter_map(|value| value.get(key).filter(|id| !id.is_null()).cloned())
        .collect()
}

/// The ids of a [`declared_token_ids`] entry: one number or a list of them.
pub fn ids_in(entry: &Value) -> Vec<u32> {
    let ids = match entry {
        Value::Array(ids) => ids.as_slice(),
        single => std::slice::from_ref(single),
    };
    ids.iter()
        .filter_map(Value::as_u64)
        .map(|id| id as u32)
        .collect()
}

/// The LoRA spec of the PEFT adapter in `adapter_dir`, from its `adapter_config.json`.
pub fn read_adapter_spec(adapter_dir: &Path) -> Result<lora::LoraSpec, ModelError> {
    let config_path = adapter_dir.join(lora::ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&config_path).at(&config_path)?;
    let value: Value =
        serde_json::from_str(&text).map_err(|error| ModelError::json(&config_path, error))?;
    lora::LoraSpec::from_adapter_config(&value).map_err(|message| ModelError::Json {
        path: config_path,
        message,
    })
}

/// Every tensor of the safetensors file `path`, by name.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, ModelError> {
    candle_core::safetensors::load(path, device)
        .map_err(|error| ModelError::safetensors(path, error))
}

/// A base model from `base_dir` with the PEFT adapter in `adapter_dir` applied (not
/// merged): the adapter's spec comes from its `adapter_config.json`.
pub fn load_lora(
    base_dir: &Path,
    adapter_dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(CausalLm, ModelConfig), ModelError> {
    let mut spec = read_adapter_spec(adapter_dir)?;
    // On a quantized base (QLoRA's), the adapter runs over the stored codes.
    spec.quant = quantized_base(base_dir)?;
    let (model, varmap, config) = new_lora(base_dir, &spec, dtype, device, 0)?;
    let weights_path = adapter_dir.join(lora::ADAPTER_WEIGHTS);
    let saved = load_tensors(&weights_path, device)?;
    for (name, var) in sorted_vars(&varmap) {
        let tensor = saved
            .get(&name)
            .ok_or_else(|| ModelError::safetensors(&weights_path, format!("no tensor `{name}`")))?;
        if tensor.dims() != var.dims() {
            return Err(ModelError::safetensors(
                &weights_path,
                format!(
                    "tensor `{name}` has shape {:?}, the base model needs {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&tensor.to_dtype(dtype)?)?;
    }
    Ok((model, config))
}

/// How [`init_weights`] sets one parameter, decided by its HF name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitRule {
    /// Normal(0, std).
    Normal(f64),
    /// All ones (norm gains).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// The initialisation of the parameter called `name` in a model of `num_layers`
/// blocks: ones for norm gains, zeros for biases, normal(0, [`INIT_STD`]) for weight
/// matrices and embeddings, with the residual output projections (`o_proj`,
/// `down_proj`, `c_proj`) scaled by `1/sqrt(2·num_layers)` as in GPT-2.
pub fn init_rule(name: &str, num_layers: usize) -> InitRule {
    let is_norm = name.contains("norm.") || name.contains("ln_");
    if name.ends_with(".bias") {
        InitRule::Zeros
    } else if is_norm {
        InitRule::Ones
    } else if name.contains("o_proj.") || name.contains("down_proj.") || name.contains("c_proj.") {
        InitRule::Normal(INIT_STD / (2.0 * num_layers.max(1) as f64).sqrt())
    } else {
        InitRule::Normal(INIT_STD)
    }
}

/// Initialises every parameter of `varmap` by [`init_rule`]. Each tensor draws from its
/// own SplitMix64 stream keyed by `seed` and its name (normals by Box–Muller in f64), so
/// the result is bit-identical across runs and independent of iteration order.
pub fn init_weights(varmap: &VarMap, config: &ModelConfig, seed: u64) -> Result<(), ModelError> {
    let vars = sorted_vars(varmap);
    for (name, var) in vars {
        let count = var.elem_count();
        let values: Vec<f64> = match init_rule(&name, config.num_layers()) {
            InitRule::Ones => vec![1.0; count],
            InitRule::Zeros => vec![0.0; count],
            InitRule::Normal(std) => {
                let mut rng = Rng::for_item(seed, INIT_STREAM, name_key(&name));
                normals(&mut rng, count)
                    .into_iter()
                    .map(|z| z * std)
                    .collect()
            }
        };
        let tensor = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&tensor)?;
    }
    Ok(())
}

/// A stable 64-bit key of a parameter name (FNV-1a), to pick its RNG stream.
pub(crate) fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `count` standard normals by the Box–Muller transform.
fn normals(rng: &mut Rng, count: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(count + 1);
    while out.len() < count {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - rng.next_f64()).ln()).sqrt();
        let angle = std::f64::consts::TAU * rng.next_f64();
        out.push(radius * angle.cos());
        out.push(radius * angle.sin());
    }
    out.truncate(count);
    out
}

/// The variables of `varmap`, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = match varmap.data().lock() {
        Ok(data) => data,
        Err(poisoned) => poisoned.into_inner(),
    };
    let sorted: BTreeMap<String, Var> = data
        .iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    sorted.into_iter().collect()
}

/// The parameters of `varmap` with their HF names, sorted by name.
pub fn named_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    sorted_vars(varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect()
}

/// Writes every parameter of `varmap` to the safetensors file `path` (see
/// [`save_tensors`]).
pub fn save_safetensors(varmap: &VarMap, path: &Path) -> Result<(), ModelError> {
    save_tensors(&named_tensors(varmap), path)
}

/// Writes `tensors` to the safetensors file `path` under their names (sorted by name,
/// metadata `format: pt` as transformers expects), f32, f64, bf16 and f16 as they are,
/// other dtypes as f32. GPT-2 weights are already in Conv1D layout, so nothing is
/// transposed.
/// A tied `lm_head` is not a separate parameter and is not written, as in
/// transformers' own files.
pub fn save_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<(), ModelError> {
    let mut stored = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let flat = tensor.flatten_all()?;
        let (dtype, data) = match flat.dtype() {
            DType::F64 => (safetensors::Dtype::F64, le_bytes(&flat, f64::to_le_bytes)?),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                le_bytes(&flat, half::bf16::to_le_bytes)?,
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                le_bytes(&flat, half::f16::to_le_bytes)?,
            ),
            _ => (
                safetensors::Dtype::F32,
                le_bytes(&flat.to_dtype(DType::F32)?, f32::to_le_bytes)?,
            ),
        };
        let shape = tensor.dims().to_vec();
        stored.push((name.clone(), StoredTensor { dtype, shape, data }));
    }
    save_stored(&stored, path)
}

/// Writes tensors given as bytes to the safetensors file `path` (names sorted, as
/// [`save_tensors`] does).
pub fn save_stored(tensors: &[(String, StoredTensor)], path: &Path) -> Result<(), ModelError> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let view =
            safetensors::tensor::TensorView::new(tensor.dtype, tensor.shape.clone(), &tensor.data)
                .map_err(|error| {
                    ModelError::safetensors(path, format!("tensor `{name}`: {error}"))
                })?;
        views.push((name.as_str(), view));
    }
    views.sort_by(|a, b| a.0.cmp(b.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|error| ModelError::safetensors(path, error))?;
    Ok(crate::atomic_file::use_default_permissions(path).at(path)?)
}

/// How the model directory `dir` is quantized, from its `config.json`'s
/// `quantization_config` (`None`: it is not).
pub fn quantized_base(dir: &Path) -> Result<Option<quant::QuantSpec>, ModelError> {
    let path = config_path(dir);
    let text = std::fs::read_to_string(&path).at(&path)?;
    let value: Value =
        serde_json::from_str(&text).map_err(|error| ModelError::json(&path, error))?;
    quantized_files::read_config_entry(&value)
        .map_err(|message| ModelError::unsupported(&path, quantized_files::CONFIG_KEY, message))
}

/// An error unless `dir` holds full-precision weights: a quantized base (`kind:
/// quantize`) only serves QLoRA.
pub fn require_unquantized(dir: &Path) -> Result<(), ModelError> {
    match quantized_base(dir)? {
        None => Ok(()),
        Some(base) => Err(ModelError::unsupported(
            &config_path(dir),
            quantized_files::CONFIG_KEY,
            format!(
                "{} holds {}-quantized weights: it is a base for `sft` with `adapter: {{ kind: \
                 qlora }}` only; give this stage the full-precision model it was made from",
                dir.display(),
                base.kind.as_str()
            ),
        )),
    }
}

/// The values of the 1-D `tensor` as little-endian bytes, by `bytes`.
fn le_bytes<T: candle_core::WithDType, const N: usize>(
    tensor: &Tensor,
    bytes: fn(T) -> [u8; N],
) -> candle_core::Result<Vec<u8>> {
    Ok(tensor.to_vec1::<T>()?.into_iter().flat_map(bytes).collect())
}

/// Writes a checkpoint directory's model part from a `VarMap`: `config.json` and
/// `model.safetensors`.
pub fn save_pretrained(
    varmap: &VarMap,
    config: &ModelConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    save_model_dir(dir, config, &named_tensors(varmap))
}

/// Writes an HF model directory: `config.json` and `model.safetensors` holding
/// `weights` (HF names), with `torch_dtype` the weights' dtype. The one writer of
/// single-file model directories in trainyard (sharded ones: [`shards`]).
pub fn save_model_dir(
    dir: &Path,
    config: &ModelConfig,
    weights: &[(String, Tensor)],
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).at(dir)?;
    let dtype = shards::main_dtype(weights.iter().map(|(_, tensor)| {
        (
            tensor.dtype(),
            tensor.elem_count() * tensor.dtype().size_in_bytes(),
        )
    }));
    config.save_with_dtype(dir, dtype)?;
    save_tensors(weights, &dir.join("model.safetensors"))
}

/// Where a frozen base's parameters come from: a `VarBuilder` over the files in
/// `dtype` (f32 weights, norms, biases) and, when computing in f32 on the CPU, the
/// files' bf16/f16 matrices mapped in place ([`mapped`]) so that they are neither
/// widened nor copied. `gpt2_unprefixed` makes the files' `wte.weight`, … answer to
/// `transformer.wte.weight`, … (the original GPT-2 files on the Hub). `f32_as_bf16`
/// serves the f32 matrices as bf16 too (rounded once; generation's lighter weights).
/// `quantize` holds the blocks' projections quantized (a QLoRA base; f32 on the CPU only).
pub fn frozen_builders(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    (gpt2_unprefixed, f32_as_bf16): (bool, bool),
    quantize: Option<quant::QuantSpec>,
) -> Result<lora::Builders<'static>, ModelError> {
    // SAFETY: the files are mapped read-only; trainyard never writes to a model
    // directory it is reading, and candle copies each tensor out of the map on load.
    let mut vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
    let mut mapped = None;
    if dtype == DType::F32 && device.is_cpu() {
        let mut files = MappedSafetensors::open(files)?;
        if f32_as_bf16 {
            files = files.with_f32_as_bf16();
        }
        if let Some(kind) = quantize {
            files = files.with_quantized_projections(kind);
        }
        if files.has_half_tensors() {
            mapped = Some(files);
        }
    }
    if gpt2_unprefixed {
        vb = vb.rename_f(|name| strip_gpt2_prefix(name).to_string());
        mapped = mapped.map(|files| files.with_prefix_aliases("transformer."));
    }
    Ok(lora::Builders {
        base: vb,
        mapped: mapped.map(std::sync::Arc::new),
        lora: None,
    })
}

/// Loads a local HF model directory (`config.json` + safetensors) as a frozen model
/// computing in `dtype` on `device`. Computing in f32 on the CPU, bf16/f16 matrices stay
/// in their dtype, read in place from the mapped files (see [`frozen_builders`]); every
/// other parameter is converted to `dtype`.
pub fn load_pretrained(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(CausalLm, ModelConfig), ModelError> {
    load_pretrained_with(dir, dtype, device, false)
}

/// As [`load_pretrained`]; with `f32_as_bf16` (f32 on the CPU), f32 matrices are kept
/// as bf16 too ([`MappedSafetensors::with_f32_as_bf16`]): generation reads half the bytes.
pub fn load_pretrained_with(
    dir: &Path,
    dtype: DType,
    device: &Device,
    f32_as_bf16: bool,
) -> Result<(CausalLm, ModelConfig), ModelError> {
    require_unquantized(dir)?;
    let config = load_config(dir)?;
    let files = safetensors_files(dir)?;
    let unprefixed = gpt2_unprefixed(&config, &files)?;
    let builders = frozen_builders(&files, dtype, device, (unprefixed, f32_as_bf16), None)?;
    let model = CausalLm::with_builders(&config, builders)?;
    Ok((model, config))
}

/// Loads a local HF model directory into a trainable [`VarMap`] (a base model for
/// training): builds the model on the map, then overwrites every parameter from the
/// files (converting their dtype). Returns the config too.
pub fn load_trainable(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(CausalLm, VarMap, ModelConfig), ModelError> {
    load_trainable_with_tokens(dir, dtype, device, &[])
}

/// As [`load_trainable`], with the vocabulary grown for the new token ids `added`
/// (`add_tokens`): the embedding table and an untied head get rows up to the largest
/// id, and the rows of `added` start as the mean of the original rows.
pub fn load_trainable_with_tokens(
    dir: &Path,
    dtype: DType,
    device: &Device,
    added: &[u32],
) -> Result<(CausalLm, VarMap, ModelConfig), ModelError> {
    require_unquantized(dir)?;
    let config = load_config(dir)?;
    let rows = config.vocab_size();
    let vocab = vocab::grown_vocab(rows, added);
    let config = config.with_vocab_size(vocab);
    let is_table = |name: &str| {
        ["embed_tokens.weight", "lm_head.weight", "wte.weight"]
            .iter()
            .any(|table| name.ends_with(table))
    };
    let varmap = VarMap::new();
    let model = CausalLm::new(&config, VarBuilder::from_varmap(&varmap, dtype, device))?;
    let files = safetensors_files(dir)?;
    // SAFETY: as in `load_pretrained`.
    let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
    for (name, var) in sorted_vars(&varmap) {
        // The original GPT-2 files name the base model's tensors without `transformer.`.
        let file_name = if tensors.get(&name).is_err() {
            strip_gpt2_prefix(&name)
        } else {
            &name
        };
        let tensor = tensors
            .load(file_name, device)
            .map_err(|error| ModelError::safetensors(dir, format!("tensor `{name}`: {error}")))?;
        let mut tensor = tensor.to_dtype(dtype)?;
        if !added.is_empty() && is_table(&name) && tensor.dims() == [rows, var.dims()[1]] {
            tensor = vocab::grown_rows(&tensor, vocab, added)?;
        }
        if tensor.dims() != var.dims() {
            return Err(ModelError::safetensors(
                dir,
                format!(
                    "tensor `{name}` has shape {:?}, the config needs {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&tensor)?;
    }
    Ok((model, varmap, config))
}

/// `name` without GPT-2's `transformer.` prefix (the original OpenAI GPT-2 files on the
/// Hub store `wte.weight`, `h.0.…` rather than `transformer.wte.weight`, …).
fn strip_gpt2_prefix(name: &str) -> &str {
    name.strip_prefix("transformer.").unwrap_or(name)
}

/// The `torch_dtype`/`dtype` pair (f32 until [`set_torch_dtype`] says otherwise) and
/// `architectures` shared by every written config.
fn hf_header(architecture: &str, model_type: &str) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("architectures".into(), json!([architecture]));
    map.insert("model_type".into(), json!(model_type));
    map.insert("torch_dtype".into(), json!("float32"));
    map.insert("dtype".into(), json!("float32"));
    map
}

/// Fails with [`ModelError::Unsupported`] naming the first of `fields` (config key,
/// value) that is zero.
pub(crate) fn require_positive(
    path: &std::path::Path,
    fields: &[(&str, usize)],
) -> std::result::Result<(), ModelError> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(ModelError::unsupported(path, *key, "must be positive")),
        None => Ok(()),
    }
}
