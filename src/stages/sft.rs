//! The `sft` kind: supervised fine-tuning of a base model on an SFT token cache, with
//! the loss on the assistant's tokens only (the cache's mask: answer, tool calls and
//! `<|end|>`). It runs the training loop of [`crate::train::trainer`], so it has the
//! same guarantees as pretraining: evaluation, checkpoints, metrics, exact resume.
//!
//! Inputs: `data` (an SFT token cache), `base` (an upstream model or a local Hugging
//! Face directory) and optionally `tokenizer` (by default the base's `tokenizer.json`).
//! The output is the fine-tuned model as an HF directory, like `pretrain`'s.

use crate::data::Split;
use std::path::{Path, PathBuf};

use candle_core::DType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::training_stage::{self, LoopDefaults, StageTrainJob, TrainingSettings};
use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, TOKEN_CACHE_SOURCES, TOKENIZER_SOURCES, invalid,
};
use crate::data::token_cache::{
    Batch, SftBatcher, SftExamples, SftPosition, TOKENIZER_DIR, TokenCache,
};
use crate::model;
use crate::model::quant::{QuantKind, QuantSpec};
use crate::path_error::AtPath;
use crate::tokenize::load::tokenizer_file;
use crate::train::checkpoint::ModelFiles;
use crate::train::trainer::BatchSource;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Every weight of the model (full fine-tune).
    #[default]
    None,
    /// A LoRA adapter on a frozen base.
    Lora,
    /// QLoRA: a LoRA adapter on a frozen base whose block projections are held
    /// quantized (`quant`) while training; the adapter is the same PEFT LoRA adapter.
    Qlora,
}

impl AdapterKind {
    /// Whether an adapter is trained (`lora`, `qlora`) rather than every weight.
    pub fn is_adapter(self) -> bool {
        self != AdapterKind::None
    }
}

/// The `adapter` setting: `none`, `lora`, `qlora`, or `{ kind: lora | qlora, rank, alpha,
/// dropout, targets, modules_to_save, quant }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct AdapterSetting {
    /// `none` (full fine-tune), `lora` or `qlora`.
    pub kind: AdapterKind,
    /// LoRA rank r.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// LoRA α: the update is scaled by α/r.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout probability on each adapter's input while training (PEFT's
    /// `lora_dropout`); masks are reproducible, so resume stays exact.
    #[serde(default)]
    pub dropout: f64,
    /// The projections adapted: by default every projection of a block (llama family:
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`;
    /// GPT-2: `c_attn`, `c_proj`, `c_fc`).
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Whole modules trained with the adapter and saved in it (PEFT's `modules_to_save`):
    /// `embed_tokens`, `lm_head`. Needed when the base never saw the chat template's
    /// special tokens (a base pretrained on plain text): their embeddings and output rows
    /// are then untrained, and low-rank updates of the projections cannot fix them.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// `qlora` only: how the base's block projections are held while training, `nf4`
    /// (bitsandbytes' 4-bit NormalFloat, the default), `q4_0` or `q8_0` (ggml's blocks).
    /// Embeddings, norms and the head stay as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantKind>,
    /// `qlora` with `nf4` only: the block scales quantized too (QLoRA's double
    /// quantization).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub double_quant: bool,
}

impl Default for AdapterSetting {
    fn default() -> Self {
        AdapterSetting {
            kind: AdapterKind::None,
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: default_targets(),
            modules_to_save: Vec::new(),
            quant: None,
            double_quant: false,
        }
    }
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    model::lora::LLAMA_TARGETS
        .iter()
        .map(|target| target.to_string())
        .collect()
}

impl Serialize for AdapterSetting {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        AdapterSetting::serialize(self, serializer)
    }
}

/// `none`/`lora` alone, or the object form (read by the derived, remote `deserialize`).
impl<'de> Deserialize<'de> for AdapterSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(kind) => Ok(AdapterSetting {
                kind: serde_json::from_value(serde_json::Value::String(kind.clone())).map_err(
                    |_| {
                        D::Error::custom(format!(
                            "unknown adapter `{kind}` (expected `none`, `lora` or `qlora`)"
                        ))
                    },
                )?,
                ..AdapterSetting::default()
            }),
            other => AdapterSetting::deserialize(other).map_err(D::Error::custom),
        }
    }
}

fn adapter_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let object = generator.subschema_for::<AdapterSetting>();
    schemars::json_schema!({
        "description": "`none` (full fine-tune), `lora`, `qlora`, or `{ kind: lora | qlora, rank, alpha, dropout, targets, modules_to_save, quant }`",
        "anyOf": [ { "enum": ["none", "lora", "qlora"] }, object ]
    })
}

/// Settings of an `sft` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SftSettings {
    /// `none` (every weight is trained) or a LoRA adapter on the frozen base.
    #[serde(default)]
    #[schemars(schema_with = "adapter_schema")]
    pub adapter: AdapterSetting,
    /// Passes over the training examples instead of `steps` (1 when neither is given).
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Tokens per row; by default the cache's `max_len`, at most the model's positions.
    #[serde(default)]
    pub context: Option<usize>,
    /// Pack several whole examples into a row (faster); off: one padded example per row.
    #[serde(default = "default_true")]
    pub packing: bool,
    /// The training loop.
    #[serde(flatten)]
    pub training: TrainingSettings<Sft>,
    /// New special tokens: the `token-cache` stage's `add_tokens` (it adds them to the
    /// tokenizer; share the list with `${vars.NAME}`). The model's embeddings (and an
    /// untied head) grow to the extended tokenizer, new rows starting as the mean of the
    /// old ones and trained — with LoRA as PEFT's `trainable_token_indices`. Unset, the
    /// cache's list is followed; set, it must equal it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_tokens: Option<Vec<String>>,
}

fn default_true() -> bool {
    true
}

impl LoopDefaults for Sft {
    fn lr() -> f64 {
        1e-4
    }
    fn weight_decay() -> f64 {
        0.0
    }
}

/// The seed stream of the training order (the eval order uses the next one).
const ORDER_STREAM: u64 = 0x7366_745f_6f72_6465;

/// The `sft` stage kind.
#[derive(Debug, Clone, Copy)]
pub struct Sft;

impl StageKind for Sft {
    type Settings = SftSettings;
    const NAME: &'static str = "sft";
    // 4: one vectorised exp (model::exp) in the loss, attention and SwiGLU.
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "fine-tune a model on chat examples, loss on the assistant's tokens (resumable)";
    const OUTPUT: Artifact = Artifact::Model;
    const INPUTS: InputRules = InputRules::Slots(&[
        InputSlot::required("data", TOKEN_CACHE_SOURCES),
        InputSlot::required("base", MODEL_SOURCES),
        InputSlot::optional("tokenizer", TOKENIZER_SOURCES),
    ]);
    const RESUMABLE: bool = true;

    fn check(settings: &SftSettings, _inputs: &[&str]) -> Result<(), String> {
        let adapter = &settings.adapter;
        if adapter.quant.is_some() && adapter.kind != AdapterKind::Qlora {
            return Err("`adapter.quant` applies to `kind: qlora` only".to_string());
        }
        if adapter.double_quant
            && (adapter.kind != AdapterKind::Qlora
                || adapter.quant.is_some_and(|quant| quant != QuantKind::Nf4))
        {
            return Err(
                "`adapter.double_quant` applies to `kind: qlora` with `quant: nf4` only"
                    .to_string(),
            );
        }
        if adapter.kind.is_adapter() {
            if adapter.rank == 0 {
                return Err("`adapter.rank` must be positive".to_string());
            }
            if !(adapter.alpha.is_finite() && adapter.alpha > 0.0) {
                return Err(format!(
                    "`adapter.alpha` must be positive, not {}",
                    adapter.alpha
                ));
            }
            if !(0.0..1.0).contains(&adapter.dropout) {
                return Err(format!(
                    "`adapter.dropout` must be at least 0 and below 1, not {}",
                    adapter.dropout
                ));
            }
            if adapter.targets.is_empty() {
                return Err("`adapter.targets` is empty".to_string());
            }
            // Which family's names apply is known once the base is read (`new_lora`).
            let known = |target: &str| {
                model::lora::LLAMA_TARGETS.contains(&target)
                    || model::lora::GPT2_TARGETS.contains(&target)
            };
            if let Some(target) = adapter.targets.iter().find(|target| !known(target)) {
                return Err(format!(
                    "`adapter.targets`: unknown projection `{target}` (expected some of {} \
                     for the llama family, of {} for GPT-2)",
                    model::lora::LLAMA_TARGETS.join(", "),
                    model::lora::GPT2_TARGETS.join(", ")
                ));
            }
            if let Some(module) = adapter
                .modules_to_save
                .iter()
                .find(|module| !model::lora::SAVABLE_MODULES.contains(&module.as_str()))
            {
                return Err(format!(
                    "`adapter.modules_to_save`: unknown module `{module}` (expected some of {})",
                    model::lora::SAVABLE_MODULES.join(", ")
                ));
            }
        }
        match (settings.training.steps, settings.epochs) {
            (Some(_), Some(_)) => return Err("give `steps` or `epochs`, not both".to_string()),
            (Some(0), _) => return Err("`steps` must be positive".to_string()),
            (_, Some(epochs)) if !(epochs.is_finite() && epochs > 0.0) => {
                return Err(format!("`epochs` must be positive, not {epochs}"));
            }
            _ => {}
        }
        settings.training.check(settings.context)
    }

    fn run(
        settings: &SftSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        run(settings, context)
    }
}

/// Training batches; the epoch and cursor are the position.
impl BatchSource for SftBatcher<'_> {
    fn next_batch(&mut self) -> Result<Batch, String> {
        SftBatcher::next_batch(self).ok_or_else(|| "the SFT cache has no training examples".into())
    }

    fn position(&self) -> (u64, serde_json::Value) {
        let position = SftBatcher::position(self);
        (
            0,
            serde_json::json!({ "epoch": position.epoch, "cursor": position.cursor }),
        )
    }

    fn restore(&mut self, _rng_state: u64, position: &serde_json::Value) -> Result<(), String> {
        let position: SftPosition = serde_json::from_value(position.clone())
            .map_err(|error| format!("checkpoint data position: {error}"))?;
        self.seek(position);
        Ok(())
    }
}

/// The tokenizer an SFT run trains with, and the token ids `add_tokens` added: the
/// cache's own extended tokenizer when it was built with `add_tokens` (checked to extend
/// `base_tokenizer`, the base's), else `base_tokenizer`.
fn tokenizer_of_cache(
    cache: &TokenCache,
    base_tokenizer: &Path,
    settings: &SftSettings,
) -> Result<(PathBuf, Vec<u32>), StageError> {
    let requested = settings.add_tokens.as_deref().unwrap_or_default();
    let Some(record) = &cache.meta.added_tokens else {
        if !requested.is_empty() {
            return Err(invalid(format!(
                "`add_tokens` lists {requested:?}, but the token cache {} was built without them: \
                 set the same `add_tokens` on the token-cache stage (sft can only train tokens \
                 the examples were tokenized with)",
                cache.dir.display()
            )));
        }
        return Ok((base_tokenizer.to_path_buf(), Vec::new()));
    };
    if settings.add_tokens.is_some() && requested != record.requested.as_slice() {
        return Err(invalid(format!(
            "`add_tokens` lists {requested:?}, but the token cache {} added {:?}: use one list \
             for both stages (`${{vars.NAME}}`)",
            cache.dir.display(),
            record.requested
        )));
    }
    let bytes = std::fs::read(base_tokenizer).at(base_tokenizer)?;
    if blake3::hash(&bytes).to_hex().as_str() != record.base_tokenizer_hash {
        return Err(invalid(format!(
            "the token cache {} extends another tokenizer than the base's {}: rebuild the cache \
             from this base's tokenizer",
            cache.dir.display(),
            base_tokenizer.display()
        )));
    }
    let extended = cache.dir.join(TOKENIZER_DIR).join("tokenizer.json");
    Ok((
        extended,
        record.added.iter().map(|token| token.id).collect(),
    ))
}

/// Steps of `epochs` passes: examples (padded rows) or tokens (packed rows) over what
/// one step consumes.
fn steps_for_epochs(
    examples: &SftExamples,
    epochs: f64,
    rows_per_step: usize,
    seq: usize,
    packing: bool,
) -> u64 {
    let per_epoch = if packing {
        let tokens: usize = (0..examples.len())
            .map(|index| examples.example(index).0.len().saturating_sub(1).min(seq))
            .sum();
        tokens as f64 / (rows_per_step * seq) as f64
    } else {
        examples.len() as f64 / rows_per_step as f64
    };
    (per_epoch * epochs).ceil().max(1.0) as u64
}

fn run(settings: &SftSettings, context: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
    let base = &context.inputs["base"];
    let base_tokenizer = tokenizer_file(context.inputs.get("tokenizer").unwrap_or(base))?;
    let cache = TokenCache::open(&context.inputs["data"])?;
    let (tokenizer, added_ids) = tokenizer_of_cache(&cache, &base_tokenizer, settings)?;
    cache.verify_tokenizer(&tokenizer)?;
    if let Some(record) = &cache.meta.chat_template
        && record.source == "model"
    {
        crate::tokenize::template::verify_model_template(&tokenizer, &record.hash, &cache.dir)?;
    }
    let examples = cache.examples(Split::Train)?;
    if examples.is_empty() {
        return Err(invalid(format!(
            "the SFT cache {} has no training examples",
            cache.dir.display()
        )));
    }
    let eval_examples = match cache.has(Split::Eval) {
        true => Some(cache.examples(Split::Eval)?),
        false => None,
    };
    let device = settings.training.device.device().map_err(invalid)?;
    let mut trainable_tokens = std::collections::BTreeMap::new();
    if !added_ids.is_empty() {
        trainable_tokens.insert("embed_tokens".to_string(), added_ids.clone());
        if !model::load_config(base)?.tied_embeddings() {
            trainable_tokens.insert("lm_head".to_string(), added_ids.clone());
        }
    }
    let stored_quant = match settings.adapter.kind {
        AdapterKind::Qlora => model::quantized_base(base)?,
        _ => None,
    };
    let spec = model::lora::LoraSpec {
        rank: settings.adapter.rank,
        alpha: settings.adapter.alpha,
        targets: settings.adapter.targets.clone(),
        modules_to_save: settings.adapter.modules_to_save.clone(),
        dropout: settings.adapter.dropout,
        trainable_tokens,
        // A base already quantized (a `quantize` stage) is trained on as stored.
        quant: match settings.adapter.kind {
            AdapterKind::Qlora => Some(match (settings.adapter.quant, stored_quant) {
                (Some(kind), _) => QuantSpec {
                    kind,
                    double_quant: settings.adapter.double_quant,
                },
                (None, Some(stored)) => stored,
                (None, None) => QuantSpec {
                    kind: QuantKind::Nf4,
                    double_quant: settings.adapter.double_quant,
                },
            }),
            _ => None,
        },
        // Settled for the base's family by `new_lora`.
        fan_in_fan_out: false,
    };
    let (model, varmap, config) = match settings.adapter.kind {
        AdapterKind::None => {
            model::load_trainable_with_tokens(base, DType::F32, &device, &added_ids)?
        }
        AdapterKind::Lora | AdapterKind::Qlora => {
            model::new_lora(base, &spec, DType::F32, &device, context.seed)?
        }
    };
    let base_name = context
        .input_names
        .get("base")
        .cloned()
        .unwrap_or_else(|| base.display().to_string());
    // As settled for the base's family (GPT-2's targets and `fan_in_fan_out`).
    let spec = model.adapter().map_or(spec, |adapter| adapter.spec.clone());
    let adapter_config = spec.adapter_config(&base_name);
    let files = match settings.adapter.kind {
        AdapterKind::None => ModelFiles::Full(&config),
        AdapterKind::Lora | AdapterKind::Qlora => ModelFiles::Adapter(&adapter_config),
    };
    if (cache.meta.vocab_size as usize) > config.vocab_size() {
        return Err(invalid(format!(
            "the base model {} has {} token embeddings, the cache's tokenizer {} tokens",
            base.display(),
            config.vocab_size(),
            cache.meta.vocab_size
        )));
    }
    let seq = settings
        .context
        .or(cache.meta.max_len.map(|len| len as usize))
        .unwrap_or(config.max_positions())
        .min(config.max_positions());
    let rows_per_step = settings.training.batch_size * settings.training.grad_accum;
    let steps = match settings.training.steps {
        Some(steps) => steps,
        None => steps_for_epochs(
            &examples,
            settings.epochs.unwrap_or(1.0),
            rows_per_step,
            seq,
            settings.packing,
        ),
    };

    let eval: Vec<Batch> = match &eval_examples {
        Some(eval_examples) if !eval_examples.is_empty() => {
            let mut batcher = SftBatcher::new(
                eval_examples,
                context.seed ^ ORDER_STREAM.wrapping_add(1),
                settings.training.batch_size,
                seq,
                settings.packing,
                cache.meta.pad_id,
                SftPosition::default(),
            );
            // At most one pass: evaluating an example twice would only weigh it double.
            let batches = settings
                .training
                .eval_batches
                .min(eval_examples.len().div_ceil(settings.training.batch_size));
            (0..batches).filter_map(|_| batcher.next_batch()).collect()
        }
        _ => Vec::new(),
    };
    let parameters = training_stage::parameter_count(&varmap);
    let _ = writeln!(
        context.log,
        "fine-tuning {} ({} parameters) on {} examples: {steps} steps of {rows_per_step} rows × {seq} tokens{}; {} eval batches",
        base.display(),
        parameters,
        examples.len(),
        if settings.packing { " (packed)" } else { "" },
        eval.len()
    );
    if let Some(quant) = spec.quant {
        let stored = stored_quant.is_some();
        let _ = writeln!(
            context.log,
            "QLoRA: the base's block projections held as {}{}, {}",
            quant.kind.as_str(),
            if quant.double_quant {
                " (double_quant)"
            } else {
                ""
            },
            if stored {
                "as stored"
            } else {
                "quantized while loading"
            }
        );
    }
    if let Some(note) = settings.training.checkpointing_note(config.num_layers()) {
        let _ = writeln!(context.log, "{note}");
    }
    let mut data = SftBatcher::new(
        &examples,
        context.seed ^ ORDER_STREAM,
        settings.training.batch_size,
        seq,
        settings.packing,
        cache.meta.pad_id,
        SftPosition::default(),
    );
    settings.training.train(
        context,
        steps,
        StageTrainJob {
            model: &model,
            files,
            varmap: &varmap,
            data: &mut data,
            eval: &eval,
            device: &device,
            tokenizer: Some(&tokenizer),
            baseline: None,
        },
    )
}
