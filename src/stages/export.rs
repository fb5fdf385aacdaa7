//! The `export` kind: a model as other tools run it. The Hugging Face directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with
//! the chat template and special tokens, `generation_config.json`) loads in
//! `transformers` as it is; GGUF files (f32, f16, q8_0) load in llama.cpp.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, TOKENIZER_SOURCES,
};
use crate::export::gguf::{self, GgufDtype};
use crate::model::{self, ModelConfig};
use crate::tokenize::chat::JINJA_TEMPLATE;
use crate::tokenize::special::{END_OF_TEXT, END_OF_TURN, PAD, SPECIAL_TOKENS};
use crate::tokenize::template::{TOKENIZER_CONFIG, copy_companions};
use crate::tokenize::train::{load_tokenizer, tokenizer_file};

/// Settings of an `export` stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    /// GGUF files to write, by weight type (`f32`, `f16`, `q8_0`); by default `[q8_0]`.
    /// `[]` writes none.
    #[serde(default)]
    pub gguf: Option<Vec<GgufDtype>>,
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
        InputSlot {
            name: "model",
            accepts: MODEL_SOURCES,
            required: true,
            many: false,
        },
        InputSlot {
            name: "tokenizer",
            accepts: TOKENIZER_SOURCES,
            required: false,
            many: false,
        },
    ]);

    fn run(
        settings: &ExportSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        run(settings, context)
    }
}

fn invalid(message: impl std::fmt::Display) -> StageError {
    StageError::Invalid(message.to_string())
}

fn copy(from: &Path, to: &Path) -> Result<(), StageError> {
    std::fs::copy(from, to).map(|_| ()).map_err(|error| {
        StageError::io(
            format!("copying {} to {}", from.display(), to.display()),
            error,
        )
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value).map_err(invalid)?;
    text.push('\n');
    std::fs::write(path, text)
        .map_err(|error| StageError::io(format!("writing {}", path.display()), error))
}

/// Whether the tokenizer has trainyard's special tokens at their fixed ids (then the
/// chat template applies).
fn has_trainyard_specials(tokenizer: &tokenizers::Tokenizer) -> bool {
    SPECIAL_TOKENS
        .iter()
        .enumerate()
        .all(|(id, token)| tokenizer.token_to_id(token) == Some(id as u32))
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
    let config = model::load_config(source).map_err(invalid)?;
    let tokenizer_path =
        tokenizer_file(context.inputs.get("tokenizer").unwrap_or(source)).map_err(invalid)?;
    let tokenizer = load_tokenizer(&tokenizer_path).map_err(invalid)?;
    let out = context.out_dir;

    // config.json with the special-token ids transformers' generate() reads.
    let mut hf_config = config.to_hf_json();
    let ours = has_trainyard_specials(&tokenizer);
    if ours && let Some(map) = hf_config.as_object_mut() {
        map.insert("bos_token_id".into(), json!(1));
        map.insert("eos_token_id".into(), json!(2));
        map.insert("pad_token_id".into(), json!(0));
    }
    write_json(&out.join("config.json"), &hf_config)?;
    let files = model::safetensors_files(source).map_err(invalid)?;
    let mut copied: Vec<PathBuf> = Vec::new();
    for file in &files {
        let name = file.file_name().map(PathBuf::from).unwrap_or_default();
        copy(file, &out.join(&name))?;
        copied.push(name);
    }
    let index = source.join("model.safetensors.index.json");
    if files.len() > 1 && index.is_file() {
        copy(&index, &out.join("model.safetensors.index.json"))?;
    }
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
        let summary = gguf::write_gguf(source, &tokenizer_path, &path, dtype).map_err(invalid)?;
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
        "exported {} ({}) with {}",
        source.display(),
        config.model_type(),
        copied
            .iter()
            .map(|name| name.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(StageOutcome { metrics })
}
