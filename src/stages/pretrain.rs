//! The `pretrain` kind: trains a causal language model on token caches (a weighted
//! mixture), from scratch or continuing a base model, with the loop of
//! [`crate::train::trainer`]: evaluation, checkpoints, metrics and exact resume.
//!
//! Inputs: `data` (and `data_<name>` for more caches of a mixture), `tokenizer`, and
//! optionally `base` (an upstream model or a local Hugging Face directory). The output
//! is the final model as an HF directory, `best/`, `metrics.jsonl`, `training.json`
//! and `loss_curve.svg`.

use crate::data::Split;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::training_stage::{self, LoopDefaults, StageTrainJob, TrainingSettings};
use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, TOKEN_CACHE_SOURCES, TOKENIZER_SOURCES, invalid, log,
};
use crate::data::token_cache::{Batch, Mixture, TokenCache};
use crate::model::{self, Gpt2Config, LlamaConfig, LlamaFlavor, ModelConfig};
use crate::rng::Rng;
use crate::tokenize::load::tokenizer_file;
use crate::train::checkpoint::ModelFiles;
use crate::train::trainer::BatchSource;

/// The model families a new model can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `LlamaForCausalLM`: RMSNorm, RoPE, SwiGLU, grouped-query attention.
    Llama,
    /// `Qwen2ForCausalLM`: Llama with q/k/v biases.
    Qwen2,
    /// `GPT2LMHeadModel`: LayerNorm, learned positions, GELU.
    Gpt2,
}

/// The architecture of a new model. The vocabulary size comes from the tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// `llama`, `qwen2` or `gpt2`.
    pub family: Family,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (llama family; fewer than `heads` is grouped-query attention).
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Width of the residual stream (`hidden_size` / `n_embd`).
    pub dim: usize,
    /// Width of the MLP's hidden layer; by default 8/3·dim rounded up to a multiple of
    /// 64 (llama family) or 4·dim (gpt2).
    #[serde(default)]
    pub intermediate: Option<usize>,
    /// Longest sequence the model accepts; by default the stage's `context`.
    #[serde(default)]
    pub max_positions: Option<usize>,
    /// Rotary base (llama family).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Share the embedding and output matrices (always so for gpt2).
    #[serde(default)]
    pub tie_embeddings: Option<bool>,
    /// Epsilon of the norms; by default 1e-6 (llama family) or 1e-5 (gpt2).
    #[serde(default)]
    pub norm_eps: Option<f64>,
}

fn default_rope_theta() -> f64 {
    model::DEFAULT_ROPE_THETA
}

/// Settings of a `pretrain` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PretrainSettings {
    /// The architecture of a new model; leave it out to continue from a `base` input.
    #[serde(default)]
    pub model: Option<ModelSettings>,
    /// Training tokens instead of `steps`: steps = ⌈tokens / (batch_size · grad_accum ·
    /// context)⌉.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Tokens per training sequence.
    #[serde(default = "default_context")]
    pub context: usize,
    /// Mixture weights by input name (`data`, `data_wiki`, …); missing ones weigh 1.
    #[serde(default)]
    pub mixture: BTreeMap<String, f64>,
    /// The training loop.
    #[serde(flatten)]
    pub training: TrainingSettings<Pretrain>,
}

fn default_context() -> usize {
    256
}

impl LoopDefaults for Pretrain {
    fn lr() -> f64 {
        3e-4
    }
    fn weight_decay() -> f64 {
        0.1
    }
}

/// The RNG stream of the training-data sampler.
const DATA_STREAM: u64 = 0x7072_6574_7261_696e;
/// At most this many training tokens are counted for the unigram baseline.
const UNIGRAM_TOKENS: u64 = 50_000_000;

/// The `pretrain` stage kind.
#[derive(Debug, Clone, Copy)]
pub struct Pretrain;

impl StageKind for Pretrain {
    type Settings = PretrainSettings;
    const NAME: &'static str = "pretrain";
    // 2: one vectorised exp (model::exp) in the loss, attention and SwiGLU.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "train a llama/qwen2/gpt2 model on token caches (resumable, bit-exact)";
    const OUTPUT: Artifact = Artifact::Model;
    const INPUTS: InputRules = InputRules::Slots(&[
        DATA_SLOT,
        InputSlot::required("tokenizer", TOKENIZER_SOURCES),
        InputSlot::optional("base", MODEL_SOURCES),
    ]);
    const RESUMABLE: bool = true;

    fn check(settings: &PretrainSettings, inputs: &[&str]) -> Result<(), String> {
        let has_base = inputs.contains(&"base");
        match (&settings.model, has_base) {
            (Some(_), true) => {
                return Err(
                    "give either `model` (a new model) or a `base` input, not both".to_string(),
                );
            }
            (None, false) => {
                return Err(
                    "`model` is required (e.g. `model: { family: llama, layers: 4, heads: 4, dim: 256 }`) unless a `base` input is given"
                        .to_string(),
                );
            }
            _ => {}
        }
        match (settings.training.steps, settings.tokens) {
            (Some(_), Some(_)) => return Err("give `steps` or `tokens`, not both".to_string()),
            (None, None) => return Err("`steps` (or `tokens`) is required".to_string()),
            (Some(0), _) | (_, Some(0)) => {
                return Err("`steps`/`tokens` must be positive".to_string());
            }
            _ => {}
        }
        settings.training.check(Some(settings.context))?;
        for name in settings.mixture.keys() {
            if !inputs.contains(&name.as_str()) {
                let data: Vec<&str> = inputs
                    .iter()
                    .copied()
                    .filter(|input| is_data_input(input))
                    .collect();
                return Err(format!(
                    "`mixture` names `{name}`, which is not a data input (declared: {})",
                    data.join(", ")
                ));
            }
        }
        if let Some(model) = &settings.model
            && model.family == Family::Gpt2
        {
            if model.tie_embeddings == Some(false) {
                return Err(
                    "gpt2 always ties its embeddings (`tie_embeddings: false` is not possible)"
                        .to_string(),
                );
            }
            if model.kv_heads.is_some() {
                return Err("`kv_heads` is for the llama family; gpt2 has none".to_string());
            }
        }
        Ok(())
    }

    fn run(
        settings: &PretrainSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        run(settings, context)
    }
}

/// The token caches: `data`, `data_wiki`, ….
const DATA_SLOT: InputSlot = InputSlot {
    name: "data",
    accepts: TOKEN_CACHE_SOURCES,
    required: true,
    many: true,
};

fn is_data_input(name: &str) -> bool {
    DATA_SLOT.admits(name)
}

/// The token caches of the mixture, opened and checked against the tokenizer.
struct Caches {
    /// (input name, cache), in input-name order.
    caches: Vec<(String, TokenCache)>,
    vocab_size: usize,
}

fn open_caches(context: &StageContext<'_>, tokenizer: &Path) -> Result<Caches, StageError> {
    let mut caches = Vec::new();
    for (name, path) in context.inputs {
        if !is_data_input(name) {
            continue;
        }
        let cache = TokenCache::open(path)?;
        cache.verify_tokenizer(tokenizer)?;
        caches.push((name.clone(), cache));
    }
    let vocab_size = caches
        .first()
        .map(|(_, cache)| cache.meta.vocab_size as usize)
        .ok_or_else(|| invalid("no `data` input"))?;
    Ok(Caches { caches, vocab_size })
}

/// Training batches: windows drawn from the mixture by a seeded RNG, whose state is the
/// whole position.
struct MixtureBatches {
    mixture: Mixture,
    rng: Rng,
    batch_size: usize,
    window: usize,
}

impl BatchSource for MixtureBatches {
    fn next_batch(&mut self) -> Result<Batch, String> {
        let windows = (0..self.batch_size)
            .map(|_| self.mixture.sample(&mut self.rng, self.window))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch::from_windows(&windows))
    }

    fn position(&self) -> (u64, serde_json::Value) {
        (self.rng.state(), serde_json::Value::Null)
    }

    fn restore(&mut self, rng_state: u64, _position: &serde_json::Value) -> Result<(), String> {
        self.rng = Rng::from_state(rng_state);
        Ok(())
    }
}

/// The architecture of a new model from the settings.
pub fn model_config(
    settings: &ModelSettings,
    vocab_size: usize,
    context: usize,
) -> Result<ModelConfig, String> {
    let max_positions = settings.max_positions.unwrap_or(context);
    let config = match settings.family {
        Family::Llama | Family::Qwen2 => {
            let flavor = match settings.family {
                Family::Qwen2 => LlamaFlavor::Qwen2,
                _ => LlamaFlavor::Llama,
            };
            if settings.heads == 0 || !settings.dim.is_multiple_of(settings.heads) {
                return Err(format!(
                    "`model.dim` ({}) must be a multiple of `model.heads` ({})",
                    settings.dim, settings.heads
                ));
            }
            ModelConfig::Llama(LlamaConfig {
                flavor,
                vocab_size,
                hidden_size: settings.dim,
                intermediate_size: settings
                    .intermediate
                    .unwrap_or_else(|| (settings.dim * 8 / 3).div_ceil(64) * 64),
                num_hidden_layers: settings.layers,
                num_attention_heads: settings.heads,
                num_key_value_heads: settings.kv_heads.unwrap_or(settings.heads),
                head_dim: settings.dim / settings.heads,
                rms_norm_eps: settings.norm_eps.unwrap_or(1e-6),
                rope_theta: settings.rope_theta,
                rope_scaling: None,
                sliding_window: None,
                max_position_embeddings: max_positions,
                tie_word_embeddings: settings.tie_embeddings.unwrap_or(false),
                qkv_bias: flavor == LlamaFlavor::Qwen2,
                o_bias: false,
                mlp_bias: false,
            })
        }
        Family::Gpt2 => ModelConfig::Gpt2(Gpt2Config {
            vocab_size,
            n_embd: settings.dim,
            n_layer: settings.layers,
            n_head: settings.heads,
            n_positions: max_positions,
            layer_norm_epsilon: settings.norm_eps.unwrap_or(1e-5),
            n_inner: settings.intermediate.unwrap_or(4 * settings.dim),
        }),
    };
    config
        .validate(Path::new("with.model"))
        .map_err(|error| error.to_string().replace("with.model: key ", "model: "))?;
    Ok(config)
}

fn run(
    settings: &PretrainSettings,
    context: &mut StageContext<'_>,
) -> Result<StageOutcome, StageError> {
    let tokenizer = tokenizer_file(&context.inputs["tokenizer"])?;
    let caches = open_caches(context, &tokenizer)?;
    let device = settings.training.device.device().map_err(invalid)?;
    let dtype = DType::F32;

    let (model, varmap, config) = match (&settings.model, context.inputs.get("base")) {
        (_, Some(base)) => {
            let (model, varmap, config) = model::load_trainable(base, dtype, &device)?;
            if config.vocab_size() < caches.vocab_size {
                return Err(invalid(format!(
                    "the base model {} has {} token embeddings, the tokenizer {} tokens",
                    base.display(),
                    config.vocab_size(),
                    caches.vocab_size
                )));
            }
            (model, varmap, config)
        }
        (Some(model_settings), None) => {
            let config = model_config(model_settings, caches.vocab_size, settings.context)
                .map_err(invalid)?;
            let (model, varmap) = model::new_trainable(&config, dtype, &device, context.seed)?;
            (model, varmap, config)
        }
        (None, None) => return Err(invalid("`model` or a `base` input is required")),
    };
    if settings.context > config.max_positions() {
        return Err(invalid(format!(
            "`context` {} is longer than the model's {} positions",
            settings.context,
            config.max_positions()
        )));
    }

    let tokens_per_step =
        (settings.training.batch_size * settings.training.grad_accum * settings.context) as u64;
    let steps = match (settings.training.steps, settings.tokens) {
        (Some(steps), _) => steps,
        (None, Some(tokens)) => tokens.div_ceil(tokens_per_step),
        (None, None) => return Err(invalid("`steps` or `tokens` is required")),
    };
    let window = settings.context + 1;
    let mut sources = Vec::new();
    let mut eval = Vec::new();
    let mut unigram_counts = vec![0u64; caches.vocab_size];
    for (name, cache) in &caches.caches {
        let stream = cache.stream(Split::Train)?;
        if stream.len() < window as u64 {
            return Err(invalid(format!(
                "token cache `{name}` ({}) holds {} training tokens, fewer than one sequence of `context` + 1 = {window}",
                cache.dir.display(),
                stream.len()
            )));
        }
        for (total, count) in unigram_counts
            .iter_mut()
            .zip(stream.counts(caches.vocab_size, UNIGRAM_TOKENS))
        {
            *total += count;
        }
        let weight = settings.mixture.get(name).copied().unwrap_or(1.0);
        sources.push((name.clone(), stream, weight));
        if cache.has(Split::Eval) {
            let eval_stream = cache.stream(Split::Eval)?;
            let windows = eval_stream.sequential_windows(
                window,
                settings.training.eval_batches * settings.training.batch_size,
            );
            if windows.is_empty() {
                log(
                    context,
                    format_args!(
                        "note: the eval split of `{name}` is shorter than one sequence; it is not evaluated"
                    ),
                );
            }
            eval.extend(
                windows
                    .chunks(settings.training.batch_size)
                    .map(Batch::from_windows),
            );
        }
    }
    let total_weight: f64 = sources.iter().map(|(_, _, weight)| weight).sum();
    for (name, stream, weight) in &sources {
        log(
            context,
            format_args!(
                "data `{name}`: {} training tokens, weight {weight} ({:.0}% of batches)",
                stream.len(),
                100.0 * weight / total_weight
            ),
        );
    }
    if let Some(note) = settings.training.checkpointing_note(config.num_layers()) {
        log(context, format_args!("{note}"));
    }
    let mixture = Mixture::new(sources).map_err(invalid)?;
    let unigram = unigram_loss(&unigram_counts, &eval);
    let parameters = training_stage::parameter_count(&varmap);
    log(
        context,
        format_args!(
            "{} model, {} parameters, vocab {}; {steps} steps of {tokens_per_step} tokens on {:?}; {} eval batches{}",
            config.model_type(),
            parameters,
            config.vocab_size(),
            device,
            eval.len(),
            unigram
                .map(|loss| format!(", unigram baseline eval loss {loss:.4}"))
                .unwrap_or_default()
        ),
    );

    let mut data = MixtureBatches {
        mixture,
        rng: Rng::new(context.seed, DATA_STREAM),
        batch_size: settings.training.batch_size,
        window,
    };
    settings.training.train(
        context,
        steps,
        StageTrainJob {
            model: &model,
            files: ModelFiles::Full(&config),
            varmap: &varmap,
            data: &mut data,
            eval: &eval,
            device: &device,
            tokenizer: Some(&tokenizer),
            baseline: unigram,
        },
    )
}

/// Eval cross-entropy of the unigram model fitted on the training tokens (add-one
/// smoothing): the loss a model that ignores context reaches, the baseline learning
/// must beat.
fn unigram_loss(counts: &[u64], eval: &[Batch]) -> Option<f64> {
    let total: f64 = counts.iter().sum::<u64>() as f64 + counts.len() as f64;
    let mut loss = 0.0;
    let mut n = 0.0;
    for batch in eval {
        for (&target, &weight) in batch.targets.iter().zip(&batch.weights) {
            if weight > 0.0 {
                let count = counts.get(target as usize).copied().unwrap_or(0) as f64 + 1.0;
                loss -= f64::from(weight) * (count / total).ln();
                n += f64::from(weight);
            }
        }
    }
    (n > 0.0).then(|| loss / n)
}
