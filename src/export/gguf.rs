//! GGUF files for llama.cpp from a Hugging Face-shaped checkpoint (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `GPT2LMHeadModel`) and its byte-level BPE `tokenizer.json`.
//!
//! The file is what llama.cpp's own `convert_hf_to_gguf.py` would write for the same
//! model, so llama.cpp, ollama and candle's quantized models read it as one of theirs:
//!
//! - **Metadata**: `general.architecture` is `llama`, `qwen2` or `gpt2` and the
//!   hyper-parameters sit under that prefix (`llama.context_length`,
//!   `qwen2.attention.head_count_kv`, `gpt2.attention.layer_norm_epsilon`, …) with the
//!   converter's value types (u32 counts, f32 rotary base and epsilons).
//! - **Tokenizer**: `tokenizer.ggml.model = "gpt2"` (llama.cpp's name for byte-level
//!   BPE), every token in id order with its type (1 normal, 3 control for the special
//!   tokens, 4 user-defined for other added tokens, 5 unused for ids the tokenizer lacks
//!   below the model's `vocab_size`), the merges as `"a b"` strings, and
//!   `tokenizer.ggml.pre` read off the tokenizer's own pre-tokenizer: llama.cpp chooses its
//!   split expression from that key alone and its converter only knows tokenizers by the
//!   hash of their output, so a trainyard tokenizer must say `gpt-2` itself. BOS is
//!   `<|endoftext|>`, EOS and EOT are `<|end|>` (the generation stop of the chat
//!   template), padding is `<|pad|>`, and neither BOS nor EOS is added to prompts,
//!   because trainyard never trained with them there. The chat template is
//!   [`crate::tokenize::chat::JINJA_TEMPLATE`].
//! - **Tensors**: llama.cpp's names (`token_embd.weight`, `blk.N.attn_q.weight`, …,
//!   `output_norm.weight`, `output.weight` unless tied). For `llama` only, the rows of Q
//!   and K (weights and biases) are permuted: Hugging Face rotates the two halves of
//!   each head (`rotate_half`) while llama.cpp's `llama` architecture rotates adjacent
//!   pairs, so row `j·d/2 + i` of a head moves to row `2i + j`. `qwen2` uses the
//!   half-split ("NEOX") rotation in llama.cpp too, so its rows stay as they are.
//!   GPT-2's Conv1D weights (`[in, out]`) are transposed to `[out, in]`, its fused
//!   `c_attn` becomes `attn_qkv`, its learned positions `position_embd.weight`, and its
//!   output projection is always the embedding (no `output.weight`).
//! - **Types**: vectors (norm gains, biases) and GPT-2's position table are always f32;
//!   matrices take the requested type. A q8_0 matrix whose rows are not a multiple of 32 wide falls back to f16,
//!   as in the converter.
//!
//! The file is GGUF version 3, little-endian, with 32-byte alignment. It is written to
//! `<out>.partial` and renamed into place, so a failed export never leaves a truncated
//! file under the final name.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::model::{self, Gpt2Config, LlamaConfig, LlamaFlavor, ModelConfig, ModelError};
use crate::path_error::AtPath;
use crate::tokenize::chat::JINJA_TEMPLATE;
use crate::tokenize::load::tokenizer_file;
use crate::tokenize::special::{END_OF_TEXT, END_OF_TURN, PAD};
use crate::tokenize::template;

/// The GGUF version written.
pub const GGUF_VERSION: u32 = 3;

/// Alignment of the tensor data section and of every tensor in it (GGUF's default, so
/// no `general.alignment` key is needed).
pub const ALIGNMENT: u64 = 32;

/// `"GGUF"` read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;

/// `general.quantization_version`: ggml's `GGML_QNT_VERSION`, which the converter
/// writes into every file.
const QUANTIZATION_VERSION: u32 = 2;

/// Elements per q8_0 block.
const Q8_0_BLOCK: usize = 32;

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Split expressions of pre-tokenizers llama.cpp implements, as they appear in a
/// `tokenizer.json` `Split` pre-tokenizer, with the `tokenizer.ggml.pre` that selects
/// the same expression in llama.cpp.
const KNOWN_SPLITS: [(&str, &str); 2] = [
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2",
    ),
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "llama-bpe",
    ),
];

/// The numeric type of the weight matrices in a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum GgufDtype {
    /// 32-bit floats: lossless.
    #[serde(rename = "f32")]
    F32,
    /// 16-bit floats.
    #[serde(rename = "f16")]
    F16,
    /// ggml's 8-bit blocks: 32 weights share one f16 scale (8.5 bits a weight).
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl GgufDtype {
    /// The lower-case name (`f32`, `f16`, `q8_0`), as in settings and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            GgufDtype::F32 => "f32",
            GgufDtype::F16 => "f16",
            GgufDtype::Q8_0 => "q8_0",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`): `ALL_F32`, `MOSTLY_F16`,
    /// `MOSTLY_Q8_0`.
    pub fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
        }
    }

    fn matrix_type(self) -> GgmlDType {
        match self {
            GgufDtype::F32 => GgmlDType::F32,
            GgufDtype::F16 => GgmlDType::F16,
            GgufDtype::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

impl std::fmt::Display for GgufDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a GGUF file could not be written. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The checkpoint's `config.json` or safetensors could not be read.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The `tokenizer.json` cannot be expressed in GGUF.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A weight is missing, unexpected, or has the wrong shape.
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        /// The model directory.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Reading the tokenizer or writing the output failed.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
}

/// One tensor of a written GGUF file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GgufTensor {
    /// llama.cpp's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape in row-major order, as in the Hugging Face file (GGUF itself stores the
    /// dimensions innermost first).
    pub shape: Vec<usize>,
    /// `f32`, `f16` or `q8_0`.
    pub dtype: String,
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GgufSummary {
    /// The GGUF file.
    pub path: PathBuf,
    /// `general.architecture`: `llama`, `qwen2` or `gpt2`.
    pub architecture: String,
    /// The requested matrix type.
    pub dtype: GgufDtype,
    /// `tokenizer.ggml.pre`.
    pub tokenizer_pre: String,
    /// Every metadata key, in file order.
    pub metadata_keys: Vec<String>,
    /// Every tensor, in file order (a q8_0 export lists its f16 fallbacks here).
    pub tensors: Vec<GgufTensor>,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Writes `out` as a GGUF file of the llama, qwen2 or gpt2 model in `model_dir`
/// (`config.json` and safetensors with Hugging Face names) and the byte-level BPE
/// tokenizer `tokenizer_json` (a `tokenizer.json`, or a directory holding one), with
/// weight matrices of type `dtype`.
///
/// Fails with [`GgufError::Tokenizer`] for tokenizers llama.cpp cannot reproduce
/// (unigram, unknown pre-tokenizers, normalizers other than NFC) and with
/// [`GgufError::Tensor`] when the weights do not fit `config.json`; both are found
/// before anything is written.
pub fn write_gguf(
    model_dir: &Path,
    tokenizer_json: &Path,
    out: &Path,
    dtype: GgufDtype,
) -> Result<GgufSummary, GgufError> {
    let config = model::load_config(model_dir)?;
    let vocab = read_vocab(tokenizer_json, config.vocab_size())?;
    let mut layout = match &config {
        ModelConfig::Llama(config) => llama_layout(config, dtype),
        ModelConfig::Gpt2(config) => gpt2_layout(config, dtype),
    };
    let files = model::safetensors_files(model_dir)?;
    // SAFETY: the files are mapped read-only and never written while mapped; each tensor
    // is copied out of the map before it is converted.
    let weights = unsafe { MmapedSafetensors::multi(&files) }.map_err(ModelError::from)?;
    resolve_tensor_names(model_dir, &weights, &mut layout)?;
    let metadata = metadata(&layout, &vocab, dtype);

    let partial = partial_path(out);
    let result = write_file(&partial, &metadata, &layout.plans, |plan| {
        tensor_data(model_dir, &weights, plan)
    });
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(error) => {
            // Best effort: the error being returned matters more than a leftover file.
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::rename(&partial, out).at(out)?;
    Ok(GgufSummary {
        path: out.to_path_buf(),
        architecture: layout.arch.to_string(),
        dtype,
        tokenizer_pre: vocab.pre.to_string(),
        metadata_keys: metadata.iter().map(|(key, _)| key.clone()).collect(),
        tensors: layout
            .plans
            .iter()
            .map(|plan| GgufTensor {
                name: plan.gguf_name.clone(),
                shape: plan.shape.clone(),
                dtype: ggml_name(plan.ggml).to_string(),
            })
            .collect(),
        bytes,
    })
}

/// `out` with `.partial` appended to its file name.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Permutes the rows of a Hugging Face Q or K projection (`[heads·d, in]`, or a bias
/// `[heads·d]`) from the half-split rotary layout to llama.cpp's adjacent-pair layout:
/// within each head, row `j·d/2 + i` becomes row `2i + j`. This is the converter's
/// `LlamaModel.permute`.
pub fn permute_for_llama_rope(tensor: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    let rest: usize = dims.iter().skip(1).product();
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows do not split into {heads} heads of even width");
    }
    let half = rows / heads / 2;
    tensor
        .reshape((heads, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

// ---------------------------------------------------------------------------------
// Tokenizer

/// The tokenizer as GGUF needs it.
struct Vocab {
    /// Token texts in id order, `vocab_size` of them.
    tokens: Vec<String>,
    /// llama.cpp token types, parallel to `tokens`.
    types: Vec<i32>,
    /// `"a b"` merges in rank order.
    merges: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pre: &'static str,
    bos: Option<u32>,
    eos: u32,
    pad: u32,
    /// Whether the tokenizer's post-processor puts the BOS in front of a prompt.
    add_bos: bool,
    /// The chat template llama.cpp applies: the model's own, else trainyard's.
    chat_template: String,
}

/// Reads a Hugging Face `tokenizer.json` of a byte-level BPE model, padded (as the
/// converter does) to the model's `vocab_size`.
fn read_vocab(path: &Path, vocab_size: usize) -> Result<Vocab, GgufError> {
    let path = &tokenizer_file(path).map_err(|e| GgufError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let error = |message: String| GgufError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).at(path)?;
    let json: Json = serde_json::from_str(&text).map_err(|e| error(format!("not JSON: {e}")))?;
    let model = json
        .get("model")
        .ok_or_else(|| error("missing key `model`".to_string()))?;
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("");
    if kind != "BPE" {
        return Err(error(format!(
            "key `model.type`: GGUF export supports byte-level BPE tokenizers, not `{kind}`"
        )));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model
            .get(key)
            .is_some_and(|value| !value.is_null() && value.as_str() != Some(""))
        {
            return Err(error(format!(
                "key `model.{key}`: llama.cpp's BPE has no such option"
            )));
        }
    }
    if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(error(
            "key `model.byte_fallback`: byte-fallback BPE is not byte-level BPE".to_string(),
        ));
    }
    let pre = pre_tokenizer_name(&json).map_err(error)?;
    match json.get("normalizer") {
        None | Some(Json::Null) => {}
        // Qwen2's own tokenizer.json has NFC. llama.cpp applies no normalizer to
        // byte-level BPE and its converter drops this one, so accepting it exports an
        // imported Qwen2 tokenizer exactly as llama.cpp's own converter would.
        Some(value) if value.get("type").and_then(Json::as_str) == Some("NFC") => {}
        Some(value) => {
            return Err(error(format!(
                "key `normalizer`: llama.cpp cannot apply normalizer {value}"
            )));
        }
    }

    let mut slots: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, token: &str, kind: i32, key: &str| -> Result<(), GgufError> {
        match slots.get_mut(id as usize) {
            Some(slot) => {
                *slot = Some((token.to_string(), kind));
                Ok(())
            }
            None => Err(error(format!(
                "key `{key}`: token {token:?} has id {id}, but the model's vocab_size is {vocab_size}"
            ))),
        }
    };
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| error("key `model.vocab`: missing or not an object".to_string()))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| error(format!("key `model.vocab.{token}`: id is not an integer")))?;
        put(id, token, TOKEN_NORMAL, "model.vocab")?;
    }
    // Added tokens come second: where one shares an id with the model's vocabulary (the
    // special tokens do in trainyard tokenizers), its text and type are the ones the
    // tokenizer acts on.
    for (index, added) in json
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let key = format!("added_tokens[{index}]");
        let id = added
            .get("id")
            .and_then(Json::as_u64)
            .ok_or_else(|| error(format!("key `{key}.id`: missing or not an integer")))?;
        let content = added
            .get("content")
            .and_then(Json::as_str)
            .ok_or_else(|| error(format!("key `{key}.content`: missing or not a string")))?;
        let special = added
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let kind = if special {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        put(id, content, kind, &key)?;
    }
    let (tokens, types): (Vec<String>, Vec<i32>) = slots
        .into_iter()
        .enumerate()
        .map(|(id, slot)| slot.unwrap_or_else(|| (format!("[PAD{id}]"), TOKEN_UNUSED)))
        .unzip();

    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| error("key `model.merges`: missing or not a list".to_string()))?
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            let bad = |why: &str| error(format!("key `model.merges[{index}]`: {why}"));
            let (left, right) = match merge {
                Json::String(text) => text
                    .split_once(' ')
                    .ok_or_else(|| bad("a merge string needs a space between its parts"))?,
                Json::Array(pair) => match pair.as_slice() {
                    [Json::String(left), Json::String(right)] => (left.as_str(), right.as_str()),
                    _ => return Err(bad("a merge pair must be two strings")),
                },
                _ => return Err(bad("a merge must be \"a b\" or [\"a\", \"b\"]")),
            };
            // llama.cpp splits each merge at its first space after the first character.
            if left.is_empty() || right.is_empty() || left.contains(' ') || right.contains(' ') {
                return Err(bad("a part is empty or contains a space"));
            }
            Ok(format!("{left} {right}"))
        })
        .collect::<Result<Vec<String>, GgufError>>()?;

    let id_of = |token: &str| -> Result<u32, GgufError> {
        tokens
            .iter()
            .position(|text| text == token)
            .map(|id| id as u32)
            .ok_or_else(|| {
                error(format!(
                    "lacks the special token {token}, which the GGUF's bos/eos/padding ids name"
                ))
            })
    };
    // A model from elsewhere names its own special tokens and template beside its
    // tokenizer.json; trainyard's tokenizers use trainyard's.
    let dir = template::tokenizer_dir(path);
    let config = template::TokenizerConfig::load(&dir).map_err(|e| error(e.to_string()))?;
    let own_template =
        template::model_template_text(&dir, &config).map_err(|e| error(e.to_string()))?;
    let (bos, eos, pad, chat_template) = match (&own_template, config.special("eos_token")) {
        (Some((text, _)), Some(eos)) => {
            let eos = id_of(eos)?;
            // Without a `bos_token` (Qwen2), the id generation_config.json names, as
            // llama.cpp's own converter takes it.
            let bos = match config.special("bos_token") {
                Some(token) => Some(id_of(token)?),
                None => {
                    model::declared_token_ids(&dir, &["generation_config.json"], "bos_token_id")
                        .iter()
                        .flat_map(model::ids_in)
                        .find(|id| (*id as usize) < tokens.len())
                }
            };
            let pad = config
                .special("pad_token")
                .map(&id_of)
                .transpose()?
                .unwrap_or(eos);
            (bos, eos, pad, text.clone())
        }
        _ => (
            Some(id_of(END_OF_TEXT)?),
            id_of(END_OF_TURN)?,
            id_of(PAD)?,
            JINJA_TEMPLATE.to_string(),
        ),
    };
    let add_bos = match bos {
        Some(bos) => {
            let tokenizer = tokenizers::Tokenizer::from_file(path)
                .map_err(|e| error(format!("cannot load: {e}")))?;
            let with = tokenizer
                .encode("a", true)
                .map_err(|e| error(format!("cannot encode: {e}")))?;
            with.get_ids().first() == Some(&bos)
        }
        None => false,
    };
    Ok(Vocab {
        tokens,
        types,
        merges,
        pre,
        bos,
        eos,
        pad,
        add_bos,
        chat_template,
    })
}

/// `tokenizer.ggml.pre` for the pre-tokenizer of a `tokenizer.json`: `gpt-2` for a
/// byte-level pre-tokenizer with GPT-2's own expression (trainyard's), `qwen2` or
/// `llama-bpe` for a `Split` with Qwen2's or Llama 3's expression followed by a
/// regex-free byte-level step.
fn pre_tokenizer_name(json: &Json) -> Result<&'static str, String> {
    let pre = json.get("pre_tokenizer").unwrap_or(&Json::Null);
    let kind = |value: &Json| value.get("type").and_then(Json::as_str).map(str::to_string);
    let byte_level = |value: &Json, use_regex: bool| {
        kind(value).as_deref() == Some("ByteLevel")
            && value.get("add_prefix_space").and_then(Json::as_bool) != Some(true)
            && value
                .get("use_regex")
                .and_then(Json::as_bool)
                .unwrap_or(true)
                == use_regex
    };
    if byte_level(pre, true) {
        return Ok("gpt-2");
    }
    if kind(pre).as_deref() == Some("Sequence")
        && let Some([split, last]) = pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .map(Vec::as_slice)
        && kind(split).as_deref() == Some("Split")
        && byte_level(last, false)
        && let Some(pattern) = split
            .get("pattern")
            .and_then(|pattern| pattern.get("Regex"))
            .and_then(Json::as_str)
        && let Some((_, name)) = KNOWN_SPLITS.iter().find(|(regex, _)| *regex == pattern)
    {
        return Ok(*name);
    }
    Err(format!(
        "key `pre_tokenizer`: llama.cpp has no pre-tokenizer known to match {pre} \
         (supported: byte-level with GPT-2's expression, or Qwen2's / Llama 3's split)"
    ))
}

// ---------------------------------------------------------------------------------
// Metadata

/// A GGUF metadata value (only the types this writer needs).
#[derive(Debug, Clone, PartialEq)]
enum MetaValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    String(String),
    StringArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// A count as GGUF's u32 (model sizes never come near its limit).
fn count(value: usize) -> MetaValue {
    MetaValue::U32(u32::try_from(value).unwrap_or(u32::MAX))
}

/// The metadata of the file, in the order it is written: general keys, the
/// architecture's hyper-parameters under its prefix, then the tokenizer.
fn metadata(layout: &Layout, vocab: &Vocab, dtype: GgufDtype) -> Vec<(String, MetaValue)> {
    let text = |value: &str| MetaValue::String(value.to_string());
    let mut entries: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), text(layout.arch)),
        (
            "general.file_type".into(),
            MetaValue::U32(dtype.file_type()),
        ),
        (
            "general.quantization_version".into(),
            MetaValue::U32(QUANTIZATION_VERSION),
        ),
    ];
    for (key, value) in &layout.hyper {
        entries.push((format!("{}.{key}", layout.arch), value.clone()));
    }
    let mut tokenizer = vec![
        ("tokenizer.ggml.model", text("gpt2")),
        ("tokenizer.ggml.pre", text(vocab.pre)),
        (
            "tokenizer.ggml.tokens",
            MetaValue::StringArray(vocab.tokens.clone()),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::I32Array(vocab.types.clone()),
        ),
        (
            "tokenizer.ggml.merges",
            MetaValue::StringArray(vocab.merges.clone()),
        ),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(vocab.eos)),
        ("tokenizer.ggml.eot_token_id", MetaValue::U32(vocab.eos)),
        ("tokenizer.ggml.padding_token_id", MetaValue::U32(vocab.pad)),
        (
            "tokenizer.ggml.add_bos_token",
            MetaValue::Bool(vocab.add_bos),
        ),
        ("tokenizer.ggml.add_eos_token", MetaValue::Bool(false)),
        ("tokenizer.chat_template", text(&vocab.chat_template)),
    ];
    if let Some(bos) = vocab.bos {
        tokenizer.push(("tokenizer.ggml.bos_token_id", MetaValue::U32(bos)));
    }
    entries.extend(
        tokenizer
            .into_iter()
            .map(|(key, value)| (key.to_string(), value)),
    );
    entries
}

// ---------------------------------------------------------------------------------
// Tensors

/// How a Hugging Face tensor becomes its GGUF counterpart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    /// Copied as it is.
    None,
    /// llama's Q or K: rows permuted for llama.cpp's RoPE, with this many heads.
    PermuteRope(usize),
    /// GPT-2's Conv1D weight `[in, out]`, transposed to `nn.Linear`'s `[out, in]`.
    Transpose,
}

/// One tensor to write: where it comes from and how it is stored.
#[derive(Debug, Clone)]
struct TensorPlan {
    /// The name in the safetensors files.
    hf_name: String,
    gguf_name: String,
    /// Row-major shape as stored (after any transposition).
    shape: Vec<usize>,
    ggml: GgmlDType,
    transform: Transform,
    /// Values computed from the config rather than read from the files (Llama 3's
    /// `rope_freqs`).
    generated: Option<Vec<f32>>,
}

impl TensorPlan {
    fn byte_size(&self) -> u64 {
        let count: usize = self.shape.iter().product();
        (count / self.ggml.block_size() * self.ggml.type_size()) as u64
    }

    /// The shape the tensor has in the safetensors files.
    fn source_shape(&self) -> Vec<usize> {
        match self.transform {
            Transform::Transpose => self.shape.iter().rev().copied().collect(),
            _ => self.shape.clone(),
        }
    }
}

/// What one model family looks like in GGUF.
#[derive(Debug, Clone)]
struct Layout {
    /// `general.architecture`, also the prefix of the hyper-parameter keys.
    arch: &'static str,
    /// Hyper-parameters, keys without the architecture prefix.
    hyper: Vec<(&'static str, MetaValue)>,
    /// Every tensor in file order.
    plans: Vec<TensorPlan>,
    /// Tensors a checkpoint may hold that GGUF does without.
    ignorable: fn(&str) -> bool,
    /// Prefix some files of this family lack (the original GPT-2 files store `wte.weight`
    /// rather than `transformer.wte.weight`).
    optional_prefix: Option<&'static str>,
}

/// Collects tensor plans, choosing each tensor's stored type the way llama.cpp's
/// converter does.
struct Planner {
    dtype: GgufDtype,
    plans: Vec<TensorPlan>,
}

impl Planner {
    fn new(dtype: GgufDtype) -> Planner {
        Planner {
            dtype,
            plans: Vec::new(),
        }
    }

    fn add(&mut self, hf: impl Into<String>, gguf: impl Into<String>, shape: Vec<usize>) {
        self.add_typed(hf.into(), gguf.into(), shape, Transform::None, None);
    }

    /// `forced`: a type this tensor always has (GPT-2's position table stays f32).
    fn add_typed(
        &mut self,
        hf: String,
        gguf: String,
        shape: Vec<usize>,
        transform: Transform,
        forced: Option<GgmlDType>,
    ) {
        let row = shape.last().copied().unwrap_or(0);
        let ggml = if shape.len() < 2 {
            // ggml's kernels take norm gains and biases in f32 only.
            GgmlDType::F32
        } else if let Some(forced) = forced {
            forced
        } else if self.dtype == GgufDtype::Q8_0 && !row.is_multiple_of(Q8_0_BLOCK) {
            GgmlDType::F16
        } else {
            self.dtype.matrix_type()
        };
        self.plans.push(TensorPlan {
            hf_name: hf,
            gguf_name: gguf,
            shape,
            ggml,
            transform,
            generated: None,
        });
    }

    /// A weight of `shape` (`[rows, cols]`, or `[rows]` for a norm) and, when `bias`,
    /// its bias `[rows]`; `base` names are without the `.weight`/`.bias` suffix.
    fn linear(
        &mut self,
        hf_base: &str,
        gguf_base: &str,
        shape: Vec<usize>,
        bias: bool,
        transform: Transform,
    ) {
        let rows = shape[0];
        let (hf, gguf) = (
            |part| format!("{hf_base}.{part}"),
            |part| format!("{gguf_base}.{part}"),
        );
        self.add_typed(hf("weight"), gguf("weight"), shape, transform, None);
        if bias {
            // A bias follows its weight's rows: permuted with them, never transposed.
            let bias_transform = match transform {
                Transform::PermuteRope(heads) => Transform::PermuteRope(heads),
                _ => Transform::None,
            };
            self.add_typed(hf("bias"), gguf("bias"), vec![rows], bias_transform, None);
        }
    }
}

/// The llama family (`llama`, `qwen2`): the embedding, each block, the final norm and
/// (untied) the output projection.
fn llama_layout(config: &LlamaConfig, dtype: GgufDtype) -> Layout {
    let (hidden, inner, head_dim) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
    );
    let (d, f) = (hidden, inner);
    let q = config.num_attention_heads * head_dim;
    let kv = config.num_key_value_heads * head_dim;
    let rope = |heads: usize| match config.flavor {
        LlamaFlavor::Llama | LlamaFlavor::Mistral => Transform::PermuteRope(heads),
        LlamaFlavor::Qwen2 => Transform::None,
    };
    let mut planner = Planner::new(dtype);
    planner.add(
        "model.embed_tokens.weight",
        "token_embd.weight",
        vec![config.vocab_size, hidden],
    );
    let rope_q = rope(config.num_attention_heads);
    let rope_k = rope(config.num_key_value_heads);
    let (qkv, o, mlp) = (config.qkv_bias, config.o_bias, config.mlp_bias);
    let none = Transform::None;
    for layer in 0..config.num_hidden_layers {
        let tensors = [
            ("input_layernorm", "attn_norm", vec![d], false, none),
            ("self_attn.q_proj", "attn_q", vec![q, d], qkv, rope_q),
            ("self_attn.k_proj", "attn_k", vec![kv, d], qkv, rope_k),
            ("self_attn.v_proj", "attn_v", vec![kv, d], qkv, none),
            ("self_attn.o_proj", "attn_output", vec![d, q], o, none),
            ("post_attention_layernorm", "ffn_norm", vec![d], false, none),
            ("mlp.gate_proj", "ffn_gate", vec![f, d], mlp, none),
            ("mlp.up_proj", "ffn_up", vec![f, d], mlp, none),
            ("mlp.down_proj", "ffn_down", vec![d, f], mlp, none),
        ];
        for (hf, gguf, shape, bias, transform) in tensors {
            let hf = format!("model.layers.{layer}.{hf}");
            planner.linear(&hf, &format!("blk.{layer}.{gguf}"), shape, bias, transform);
        }
    }
    planner.add("model.norm.weight", "output_norm.weight", vec![hidden]);
    if !config.tie_word_embeddings {
        planner.add(
            "lm_head.weight",
            "output.weight",
            vec![config.vocab_size, hidden],
        );
    }
    let ignorable: fn(&str) -> bool = if config.tie_word_embeddings {
        // Old checkpoints carry RoPE's inverse frequencies, which GGUF recomputes; a
        // tied lm_head, when written at all, is the embedding again.
        |name| name.ends_with(".rotary_emb.inv_freq") || name == "lm_head.weight"
    } else {
        |name| name.ends_with(".rotary_emb.inv_freq")
    };
    if let Some(scaling) = &config.rope_scaling {
        // llama.cpp divides each rotary frequency by `rope_freqs[i]` (its converter's
        // factors for Llama 3), so the table is the unscaled over the scaled frequency.
        let factors: Vec<f32> = model::llama::default_inv_freqs(head_dim, config.rope_theta)
            .into_iter()
            .map(|plain| (plain / scaling.scale(plain)) as f32)
            .collect();
        planner.plans.push(TensorPlan {
            hf_name: "rope_freqs".into(),
            gguf_name: "rope_freqs.weight".into(),
            shape: vec![head_dim / 2],
            ggml: GgmlDType::F32,
            transform: Transform::None,
            generated: Some(factors),
        });
    }
    Layout {
        // llama.cpp runs Mistral (without a sliding window shorter than the context) as
        // llama, as its own converter writes it.
        arch: match config.flavor {
            LlamaFlavor::Mistral => "llama",
            flavor => flavor.model_type(),
        },
        hyper: vec![
            ("vocab_size", count(config.vocab_size)),
            ("context_length", count(config.max_positions())),
            ("embedding_length", count(hidden)),
            ("feed_forward_length", count(inner)),
            ("block_count", count(config.num_hidden_layers)),
            ("attention.head_count", count(config.num_attention_heads)),
            ("attention.head_count_kv", count(config.num_key_value_heads)),
            // Explicit head widths: llama.cpp would otherwise assume hidden_size / heads,
            // which a config with its own `head_dim` need not satisfy.
            ("attention.key_length", count(head_dim)),
            ("attention.value_length", count(head_dim)),
            (
                "attention.layer_norm_rms_epsilon",
                MetaValue::F32(config.rms_norm_eps as f32),
            ),
            ("rope.dimension_count", count(head_dim)),
            ("rope.freq_base", MetaValue::F32(config.rope_theta as f32)),
        ],
        plans: planner.plans,
        ignorable,
        optional_prefix: None,
    }
}

/// GPT-2 as llama.cpp's `gpt2` architecture: learned positions, LayerNorms with
/// biases, the fused `c_attn` as `attn_qkv`, every Conv1D weight transposed to
/// `[out, in]`, and the output projection always tied to the embedding.
fn gpt2_layout(config: &Gpt2Config, dtype: GgufDtype) -> Layout {
    let (width, inner) = (config.n_embd, config.n_inner);
    let mut planner = Planner::new(dtype);
    planner.add(
        "transformer.wte.weight",
        "token_embd.weight",
        vec![config.vocab_size, width],
    );
    // The converter keeps position embeddings in f32 whatever the file type.
    planner.add_typed(
        "transformer.wpe.weight".into(),
        "position_embd.weight".into(),
        vec![config.n_positions, width],
        Transform::None,
        Some(GgmlDType::F32),
    );
    let (none, transpose) = (Transform::None, Transform::Transpose);
    for layer in 0..config.n_layer {
        let tensors = [
            ("ln_1", "attn_norm", vec![width], none),
            ("attn.c_attn", "attn_qkv", vec![3 * width, width], transpose),
            ("attn.c_proj", "attn_output", vec![width, width], transpose),
            ("ln_2", "ffn_norm", vec![width], none),
            ("mlp.c_fc", "ffn_up", vec![inner, width], transpose),
            ("mlp.c_proj", "ffn_down", vec![width, inner], transpose),
        ];
        for (hf, gguf, shape, transform) in tensors {
            let hf = format!("transformer.h.{layer}.{hf}");
            planner.linear(&hf, &format!("blk.{layer}.{gguf}"), shape, true, transform);
        }
    }
    planner.linear("transformer.ln_f", "output_norm", vec![width], true, none);
    Layout {
        arch: "gpt2",
        hyper: vec![
            ("vocab_size", count(config.vocab_size)),
            ("context_length", count(config.n_positions)),
            ("embedding_length", count(width)),
            ("feed_forward_length", count(inner)),
            ("block_count", count(config.n_layer)),
            ("attention.head_count", count(config.n_head)),
            (
                "attention.layer_norm_epsilon",
                MetaValue::F32(config.layer_norm_epsilon as f32),
            ),
        ],
        plans: planner.plans,
        // transformers' GPT-2 files may carry the causal-mask buffers and a tied lm_head.
        ignorable: |name| {
            name.ends_with(".attn.bias")
                || name.ends_with(".attn.masked_bias")
                || name == "lm_head.weight"
        },
        optional_prefix: Some("transformer."),
    }
}

/// Points every plan at its name in the safetensors files and fails on a weight the
/// files lack, the config does not explain, or whose shape the config contradicts, so
/// that a checkpoint whose `config.json` disagrees with its tensors (say, biases the
/// config does not declare) is neither exported with weights silently dropped nor found
/// out only after gigabytes are written.
fn resolve_tensor_names(
    model_dir: &Path,
    weights: &MmapedSafetensors,
    layout: &mut Layout,
) -> Result<(), GgufError> {
    let present: BTreeSet<String> = weights
        .tensors()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    if let Some(prefix) = layout.optional_prefix
        && !present.iter().any(|name| name.starts_with(prefix))
    {
        for plan in &mut layout.plans {
            if let Some(bare) = plan.hf_name.strip_prefix(prefix) {
                plan.hf_name = bare.to_string();
            }
        }
    }
    let planned: BTreeSet<&str> = layout
        .plans
        .iter()
        .filter(|plan| plan.generated.is_none())
        .map(|plan| plan.hf_name.as_str())
        .collect();
    if let Some(missing) = planned.iter().find(|name| !present.contains(**name)) {
        return Err(GgufError::Tensor {
            path: model_dir.to_path_buf(),
            name: missing.to_string(),
            message: "missing from the safetensors files".to_string(),
        });
    }
    for plan in layout.plans.iter().filter(|plan| plan.generated.is_none()) {
        let shape = weights
            .get(&plan.hf_name)
            .map(|view| view.shape().to_vec())
            .unwrap_or_default();
        if shape != plan.source_shape() {
            return Err(GgufError::Tensor {
                path: model_dir.to_path_buf(),
                name: plan.hf_name.clone(),
                message: format!(
                    "has shape {shape:?}, config.json implies {:?}",
                    plan.source_shape()
                ),
            });
        }
    }
    if let Some(extra) = present
        .iter()
        .find(|name| !planned.contains(name.as_str()) && !(layout.ignorable)(name))
    {
        return Err(GgufError::Tensor {
            path: model_dir.to_path_buf(),
            name: extra.clone(),
            message: format!(
                "is not part of a {} model as config.json describes it",
                layout.arch
            ),
        });
    }
    Ok(())
}

/// The stored bytes of one tensor: loaded as f32, checked against the planned shape,
/// transformed when planned, and converted to the planned type.
fn tensor_data(
    model_dir: &Path,
    weights: &MmapedSafetensors,
    plan: &TensorPlan,
) -> Result<Vec<u8>, GgufError> {
    let error = |message: String| GgufError::Tensor {
        path: model_dir.to_path_buf(),
        name: plan.hf_name.clone(),
        message,
    };
    let tensor = match &plan.generated {
        Some(values) => Tensor::from_slice(values, values.len(), &Device::Cpu),
        None => weights
            .load(&plan.hf_name, &Device::Cpu)
            .and_then(|tensor| tensor.to_dtype(DType::F32)),
    }
    .map_err(|e| error(e.to_string()))?;
    if tensor.dims() != plan.source_shape().as_slice() {
        return Err(error(format!(
            "has shape {:?}, config.json implies {:?}",
            tensor.dims(),
            plan.source_shape()
        )));
    }
    let tensor = match plan.transform {
        Transform::None => Ok(tensor),
        Transform::PermuteRope(heads) => permute_for_llama_rope(&tensor, heads),
        Transform::Transpose => tensor.t().and_then(|t| t.contiguous()),
    }
    .map_err(|e| error(format!("rearranging for llama.cpp: {e}")))?;
    let bytes: Vec<u8> = QTensor::quantize(&tensor, plan.ggml)
        .and_then(|quantized| quantized.data().map(Cow::into_owned))
        .map_err(|e| error(format!("converting to {}: {e}", ggml_name(plan.ggml))))?;
    if bytes.len() as u64 != plan.byte_size() {
        return Err(error(format!(
            "converted to {} bytes, expected {}",
            bytes.len(),
            plan.byte_size()
        )));
    }
    Ok(bytes)
}

/// GGUF's name for a ggml type, as llama.cpp prints it.
fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::Q8_0 => "q8_0",
        _ => "other",
    }
}

/// ggml's type id (`enum ggml_type`).
fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        // Only the three types above are ever planned; q8_0 is 8.
        _ => 8,
    }
}

// ---------------------------------------------------------------------------------
// The file format

/// Counts the bytes written, so padding can be computed without seeking.
struct Counting<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn u32(&mut self, value: u32) -> std::io::Result<()> {
        self.bytes(&value.to_le_bytes())
    }

    fn u64(&mut self, value: u64) -> std::io::Result<()> {
        self.bytes(&value.to_le_bytes())
    }

    fn string(&mut self, text: &str) -> std::io::Result<()> {
        self.u64(text.len() as u64)?;
        self.bytes(text.as_bytes())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let padding = self.written.next_multiple_of(ALIGNMENT) - self.written;
        self.bytes(&vec![0u8; padding as usize])
    }

    fn value(&mut self, value: &MetaValue) -> std::io::Result<()> {
        // gguf_type ids: 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array.
        match value {
            MetaValue::U32(v) => {
                self.u32(4)?;
                self.u32(*v)
            }
            MetaValue::F32(v) => {
                self.u32(6)?;
                self.bytes(&v.to_le_bytes())
            }
            MetaValue::Bool(v) => {
                self.u32(7)?;
                self.bytes(&[u8::from(*v)])
            }
            MetaValue::String(v) => {
                self.u32(8)?;
                self.string(v)
            }
            MetaValue::StringArray(items) => {
                self.u32(9)?;
                self.u32(8)?;
                self.u64(items.len() as u64)?;
                items.iter().try_for_each(|item| self.string(item))
            }
            MetaValue::I32Array(items) => {
                self.u32(9)?;
                self.u32(5)?;
                self.u64(items.len() as u64)?;
                items
                    .iter()
                    .try_for_each(|item| self.bytes(&item.to_le_bytes()))
            }
        }
    }
}

/// Writes the whole file to `path` and returns its size: header, metadata, tensor
/// infos, then each tensor's data (fetched one at a time by `data`, so only one tensor
/// is in memory), every section aligned to [`ALIGNMENT`].
fn write_file(
    path: &Path,
    metadata: &[(String, MetaValue)],
    plans: &[TensorPlan],
    mut data: impl FnMut(&TensorPlan) -> Result<Vec<u8>, GgufError>,
) -> Result<u64, GgufError> {
    let file = std::fs::File::create(path).at(path)?;
    let mut out = Counting {
        inner: BufWriter::new(file),
        written: 0,
    };
    out.u32(GGUF_MAGIC).at(path)?;
    out.u32(GGUF_VERSION).at(path)?;
    out.u64(plans.len() as u64).at(path)?;
    out.u64(metadata.len() as u64).at(path)?;
    for (key, value) in metadata {
        out.string(key).at(path)?;
        out.value(value).at(path)?;
    }
    let mut offset = 0u64;
    for plan in plans {
        out.string(&plan.gguf_name).at(path)?;
        out.u32(plan.shape.len() as u32).at(path)?;
        // GGUF lists dimensions innermost first (ggml's ne[0] is the row length).
        for &dim in plan.shape.iter().rev() {
            out.u64(dim as u64).at(path)?;
        }
        out.u32(ggml_type_id(plan.ggml)).at(path)?;
        out.u64(offset).at(path)?;
        offset = (offset + plan.byte_size()).next_multiple_of(ALIGNMENT);
    }
    out.pad().at(path)?;
    for plan in plans {
        let bytes = data(plan)?;
        out.bytes(&bytes).at(path)?;
        out.pad().at(path)?;
    }
    let Counting { inner, written } = out;
    let file = inner.into_inner().map_err(|e| e.into_error()).at(path)?;
    file.sync_all().at(path)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_two_halves_of_each_head() {
        // Two heads of width 4: rows [a0 a1 b0 b1 | c0 c1 d0 d1] → [a0 b0 a1 b1 | c0 d0 c1 d1].
        let rows: Vec<f32> = (0..8).map(|row| row as f32).collect();
        let tensor = Tensor::from_vec(rows, 8, &Device::Cpu).unwrap();
        let permuted = permute_for_llama_rope(&tensor, 2).unwrap();
        assert_eq!(
            permuted.to_vec1::<f32>().unwrap(),
            [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
        // A matrix moves whole rows.
        let matrix = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 4))
            .unwrap();
        let permuted = permute_for_llama_rope(&matrix, 1).unwrap();
        assert_eq!(
            permuted.to_vec2::<f32>().unwrap()[1],
            [8.0, 9.0, 10.0, 11.0]
        );
        assert!(permute_for_llama_rope(&tensor, 3).is_err());
    }

    #[test]
    fn pre_tokenizer_names_follow_llama_cpp() {
        let byte_level = serde_json::json!({"pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
        }});
        assert_eq!(pre_tokenizer_name(&byte_level), Ok("gpt-2"));
        let qwen2 = serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": KNOWN_SPLITS[0].0}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]}});
        assert_eq!(pre_tokenizer_name(&qwen2), Ok("qwen2"));
        let prefix_space = serde_json::json!({"pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": true, "use_regex": true
        }});
        assert!(pre_tokenizer_name(&prefix_space).is_err());
        assert!(pre_tokenizer_name(&serde_json::json!({"pre_tokenizer": null})).is_err());
    }

    #[test]
    fn q8_0_matrices_with_ragged_rows_fall_back_to_f16() {
        let mut config = LlamaConfig::tiny(LlamaFlavor::Llama, true);
        config.hidden_size = 64;
        config.intermediate_size = 48;
        let plans = llama_layout(&config, GgufDtype::Q8_0).plans;
        let kind = |name: &str| {
            plans
                .iter()
                .find(|plan| plan.gguf_name == name)
                .map(|plan| plan.ggml)
        };
        assert_eq!(kind("blk.0.ffn_up.weight"), Some(GgmlDType::Q8_0));
        assert_eq!(kind("blk.0.ffn_down.weight"), Some(GgmlDType::F16));
        assert_eq!(kind("blk.0.attn_norm.weight"), Some(GgmlDType::F32));
        assert_eq!(kind("output.weight"), None);
    }
}
