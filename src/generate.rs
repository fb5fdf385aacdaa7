//! Text generation from a model directory: what `trainyard generate` and `trainyard
//! chat` run.
//!
//! [`resolve_model_dir`] finds the model (a checkpoint, an export, a pretrain output or a
//! run's `outputs/<stage>` link); [`Generator`] loads it with its `tokenizer.json` and
//! decodes with the kv cache ([`crate::model::CausalLm::forward`] with
//! [`Kernels::Inference`]), sampling with [`SamplingOptions::sample`] (temperature 0 is
//! greedy, the seed makes sampling reproducible). Every special token except the two
//! that end a generation (`<|end|>`, `<|endoftext|>`) is banned: its logit is set to
//! -inf, so role tokens never appear in the output. Text is streamed as it decodes,
//! whole UTF-8
//! characters at a time. [`Conversation`] keeps a chat's history and renders it with the
//! chat template ([`crate::tokenize::chat`]), ending with the open assistant turn.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, IndexOp, Tensor};
use tokenizers::Tokenizer;

use crate::data::records::{ChatMessage, Role};
use crate::model::{self, CausalLm, Kernels, ModelConfig, ModelError};
use crate::path_error::PathIoError;
use crate::rng::Rng;
use crate::tokenize::TokenizeError;
use crate::tokenize::load::{check_special_ids, load_tokenizer};
use crate::tokenize::special::{END_OF_TEXT, END_OF_TURN, TOOL_CALL};
use crate::tokenize::template::{self, ChatTemplate, TemplateChoice, TokenizerConfig};

/// Why a model could not be loaded or text not generated.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model path does not exist.
    #[error("{path}: no such model directory")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The model path is not a model directory.
    #[error("{path}: not a model directory ({reason}){hint}")]
    NotAModel {
        /// The path given.
        path: PathBuf,
        /// What is missing.
        reason: String,
        /// Model directories found inside it, as a sentence (may be empty).
        hint: String,
    },
    /// A file of the model directory could not be read.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizeError),
    /// The tokenizer does not fit the model or the request.
    #[error("{path}: {message}")]
    TokenizerMismatch {
        /// The tokenizer file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// Encoding or decoding text failed.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// A sampling option is out of range.
    #[error("{0}")]
    Options(String),
    /// The prompt does not fit the model's context.
    #[error("the prompt is {tokens} tokens long; the model's context is {context} tokens")]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// The model's longest sequence.
        context: usize,
    },
    /// The prompt encodes to no tokens at all.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing the streamed text failed.
    #[error("writing the output: {0}")]
    Output(io::Error),
}

/// The model directory `path` names: `path` itself when it holds `config.json` (a
/// checkpoint, an export, a pretrain output — its top level is the final model, `best/`
/// beside it — or a run's `outputs/<stage>` link, which is followed). Otherwise an
/// error naming `path` and the model directories found one or two levels below it
/// (`best/`, a run's `outputs/*`).
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf, GenerateError> {
    let metadata = std::fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => GenerateError::NotFound {
            path: path.to_path_buf(),
        },
        _ => PathIoError::new(path, source).into(),
    })?;
    let not_a_model = |reason: &str, hint: String| GenerateError::NotAModel {
        path: path.to_path_buf(),
        reason: reason.to_string(),
        hint,
    };
    if !metadata.is_dir() {
        return Err(not_a_model("a file, not a directory", String::new()));
    }
    if path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let mut found = Vec::new();
    for dir in [path.to_path_buf(), path.join("outputs")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let candidate = entry.path();
            if candidate.join("config.json").is_file() {
                found.push(candidate.display().to_string());
            }
        }
    }
    found.sort();
    let hint = if found.is_empty() {
        "; give a checkpoint, an export or a run's stage output such as \
         runs/latest/outputs/<stage>"
            .to_string()
    } else {
        format!("; model directories inside it: {}", found.join(", "))
    };
    Err(not_a_model("no config.json", hint))
}

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 is greedy (argmax).
    pub temperature: f64,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities (in the whole
    /// distribution) first add up to `p`: the nucleus, at least one token.
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed, prompt and model give the same text.
    pub seed: u64,
    /// Most tokens to generate (the end-of-turn token not counted).
    pub max_new_tokens: usize,
}

impl Default for SamplingOptions {
    fn default() -> SamplingOptions {
        SamplingOptions {
            temperature: 0.7,
            top_k: None,
            top_p: None,
            seed: 0,
            max_new_tokens: 256,
        }
    }
}

impl SamplingOptions {
    /// Checks the ranges: temperature ≥ 0, top-k ≥ 1, top-p in (0, 1].
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |message: String| Err(GenerateError::Options(message));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be 0 (greedy) or positive, not {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top-k must be at least 1".to_string());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("top-p must be in (0, 1], not {p}"));
        }
        Ok(())
    }

    /// Picks a token id from `logits` (`-inf` at banned ids), drawing from `rng`: the
    /// argmax at temperature 0, else a draw from softmax(logits / temperature) over the
    /// `top_k` most likely tokens, cut to the nucleus `top_p`. Written on trainyard's
    /// own [`Rng`] rather than taken from a library, so a seed gives the same text
    /// whatever the versions of the dependencies.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        let logit = |id: &u32| logits[*id as usize];
        // Most likely first, ties to the lower id: a total order, so the kept set and
        // the order of the draw never depend on how a sort breaks ties.
        let order = |a: &u32, b: &u32| logit(b).total_cmp(&logit(a)).then(a.cmp(b));
        let mut kept: Vec<u32> = (0..logits.len() as u32)
            .filter(|id| logit(id) > f32::NEG_INFINITY)
            .collect();
        let Some(best) = kept.iter().copied().min_by(order) else {
            return 0;
        };
        if self.temperature == 0.0 {
            return best;
        }
        let weight = |id: &u32| ((logit(id) - logit(&best)) as f64 / self.temperature).exp();
        let total: f64 = kept.iter().map(weight).sum();
        if let Some(k) = self.top_k.filter(|&k| k < kept.len()) {
            kept.select_nth_unstable_by(k.saturating_sub(1), order);
            kept.truncate(k);
        }
        if let Some(p) = self.top_p {
            kept.sort_unstable_by(order);
            let mut sum = 0.0;
            let nucleus = kept.iter().position(|id| {
                sum += weight(id);
                sum >= p * total
            });
            kept.truncate(nucleus.map_or(kept.len(), |last| last + 1));
        }
        let mut draw = rng.next_f64() * kept.iter().map(weight).sum::<f64>();
        for id in &kept {
            draw -= weight(id);
            if draw < 0.0 {
                return *id;
            }
        }
        // Only rounding reaches this: the draw fell on the sum's last ulp.
        kept.last().copied().unwrap_or(best)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model ended its turn (`<|end|>`).
    EndOfTurn,
    /// The model ended the document (`<|endoftext|>`).
    EndOfText,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The model's context is full.
    ContextFull,
}

impl StopReason {
    /// Short name, as `--stats` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfTurn => "end-of-turn",
            StopReason::EndOfText => "end-of-text",
            StopReason::MaxNewTokens => "max-new-tokens",
            StopReason::ContextFull => "context-full",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text (the stop token not included).
    pub text: String,
    /// The generated token ids (the stop token not included).
    pub tokens: Vec<u32>,
    /// Length of the prompt in tokens.
    pub prompt_tokens: usize,
    /// Why generation stopped.
    pub stop: StopReason,
    /// Time to process the prompt and sample the first token.
    pub prefill: Duration,
    /// Tokens sampled after the first one (each one forward pass of one token).
    pub decode_steps: usize,
    /// Time of those steps.
    pub decode: Duration,
}

impl Generation {
    /// Decode speed: tokens per second after the first token (`None` if there was no
    /// decode step).
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        (self.decode_steps > 0 && !self.decode.is_zero())
            .then(|| self.decode_steps as f64 / self.decode.as_secs_f64())
    }

    /// One line of statistics, `key=value` pairs, as `--stats` prints it.
    pub fn stats_line(&self) -> String {
        format!(
            "stats: prompt_tokens={} generated_tokens={} stop={} prefill_s={:.4} decode_steps={} decode_s={:.4} decode_tokens_per_s={:.1}",
            self.prompt_tokens,
            self.tokens.len(),
            self.stop.as_str(),
            self.prefill.as_secs_f64(),
            self.decode_steps,
            self.decode.as_secs_f64(),
            self.decode_tokens_per_s().unwrap_or(0.0)
        )
    }
}

/// A loaded model with its tokenizer, ready to generate.
pub struct Generator {
    model: CausalLm,
    config: ModelConfig,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    device: Device,
    /// Token ids that end a generation.
    stop: Vec<u32>,
    /// The banned ids, sorted: their logits are set to -inf before sampling.
    banned: Vec<u32>,
    /// The model's chat template (its own, or trainyard's for trainyard tokenizers).
    template: Result<ChatTemplate, String>,
    /// Whether the tokenizer is one a `tokenizer` stage trained (trainyard's role
    /// tokens at their fixed ids): only then do prompts follow trainyard's conventions.
    trainyard_tokenizer: bool,
}

/// The stop tokens of a model directory: `eos_token_id` of `generation_config.json`
/// (a number or a list), then of `config.json`, and `tokenizer_config.json`'s
/// `eos_token`, as transformers' `generate` gathers them.
fn model_stop_ids(dir: &Path, tokenizer: &Tokenizer) -> Vec<u32> {
    let files = ["generation_config.json", "config.json"];
    let mut stop: Vec<u32> = model::declared_token_ids(dir, &files, "eos_token_id")
        .iter()
        .flat_map(model::ids_in)
        .collect();
    if let Ok(config) = TokenizerConfig::load(dir)
        && let Some(id) = config
            .special("eos_token")
            .and_then(|token| tokenizer.token_to_id(token))
    {
        stop.push(id);
    }
    let mut seen = std::collections::HashSet::new();
    stop.retain(|id| seen.insert(*id));
    stop
}

impl Generator {
    /// Loads the model directory `path` (see [`resolve_model_dir`]): `config.json`,
    /// the safetensors weights (as f32) and `tokenizer.json`.
    pub fn load(path: &Path, device: &Device) -> Result<Generator, GenerateError> {
        Generator::load_with(path, device, false)
    }

    /// As [`Generator::load`]; with `bf16_weights`, f32 weight matrices are kept as bf16
    /// (rounded once at load; see [`model::load_pretrained_with`]).
    pub fn load_with(
        path: &Path,
        device: &Device,
        bf16_weights: bool,
    ) -> Result<Generator, GenerateError> {
        let dir = resolve_model_dir(path)?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(GenerateError::NotAModel {
                path: path.to_path_buf(),
                reason: "no tokenizer.json".to_string(),
                hint: String::new(),
            });
        }
        if !dir.join("model.safetensors").is_file()
            && !dir.join("model.safetensors.index.json").is_file()
        {
            return Err(GenerateError::NotAModel {
                path: path.to_path_buf(),
                reason: "no model.safetensors".to_string(),
                hint: String::new(),
            });
        }
        let tokenizer = load_tokenizer(&tokenizer_path)?;
        let (model, config) = model::load_pretrained_with(&dir, DType::F32, device, bf16_weights)?;
        let vocab = config.vocab_size();
        let tokenizer_vocab = tokenizer.get_vocab_size(true);
        if tokenizer_vocab > vocab {
            return Err(GenerateError::TokenizerMismatch {
                path: tokenizer_path,
                message: format!(
                    "the tokenizer has {tokenizer_vocab} tokens, the model only {vocab} embeddings"
                ),
            });
        }
        let trainyard_tokenizer = check_special_ids(&tokenizer).is_ok();
        let mut stop = model_stop_ids(&dir, &tokenizer);
        if trainyard_tokenizer {
            for id in [END_OF_TURN, END_OF_TEXT]
                .iter()
                .filter_map(|token| tokenizer.token_to_id(token))
            {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        let template = ChatTemplate::for_tokenizer(
            &dir,
            TemplateChoice::Auto,
            None,
            trainyard_tokenizer,
            Vec::new(),
        )
        .map_err(|error| error.to_string());
        // trainyard's small models never produce role tokens mid-answer, so for its own
        // tokenizers every special token but the stop tokens and the tool-call marker (a
        // chat shows tool calls) is banned, and so are the rows the tokenizer has no
        // token for. A model from elsewhere samples as transformers does: nothing banned.
        let mut banned: Vec<u32> = if trainyard_tokenizer {
            tokenizer
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(id, token)| {
                    token.special && !stop.contains(id) && token.content != TOOL_CALL
                })
                .map(|(id, _)| id)
                .chain(tokenizer_vocab as u32..vocab as u32)
                .collect()
        } else {
            Vec::new()
        };
        banned.sort_unstable();
        banned.dedup();
        Ok(Generator {
            model,
            config,
            tokenizer,
            tokenizer_path,
            device: device.clone(),
            stop,
            banned,
            template,
            trainyard_tokenizer,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The token ids that are never generated (special tokens other than the stop
    /// tokens, and ids past the tokenizer's vocabulary), sorted.
    pub fn banned_ids(&self) -> &[u32] {
        &self.banned
    }

    /// The token ids that end a generation (`<|end|>`, `<|endoftext|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    /// The ids of `text` (special-token text becomes special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| GenerateError::Tokenize(error.to_string()))
    }

    /// The prompt of plain-text continuation: `text` encoded as transformers encodes it
    /// by default (`add_special_tokens=True`: exactly what the tokenizer's
    /// post-processor adds, a BOS for Llama, nothing for GPT-2 or Qwen2). A tokenizer
    /// trained by trainyard has no post-processor; its models saw every document after
    /// `<|endoftext|>` in pretraining, so that token leads the prompt.
    pub fn raw_prompt(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        if self.trainyard_tokenizer {
            let mut ids: Vec<u32> = self
                .tokenizer
                .token_to_id(END_OF_TEXT)
                .into_iter()
                .collect();
            ids.extend(self.encode(text)?);
            return Ok(ids);
        }
        self.tokenizer
            .encode_fast(text, true)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| GenerateError::Tokenize(error.to_string()))
    }

    /// The prompt of a chat: `messages` rendered with the model's chat template and its
    /// generation prompt, tokenized as `apply_chat_template` does (the template writes
    /// the special tokens). Fails if the model has no template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, GenerateError> {
        let template =
            self.template
                .as_ref()
                .map_err(|message| GenerateError::TokenizerMismatch {
                    path: self.tokenizer_path.clone(),
                    message: format!("{message} (or use plain-text generation, `generate --raw`)"),
                })?;
        let messages = serde_json::to_value(messages)
            .map_err(|error| GenerateError::Tokenize(error.to_string()))?;
        let rendered = template::Conversation::from_messages(&messages)
            .and_then(|conversation| template.render(&conversation, true))
            .map_err(|error| GenerateError::Tokenize(error.to_string()))?;
        self.encode(&rendered.text)
    }

    /// Generates after `prompt` until a stop token, `max_new_tokens` or the end of the
    /// model's context, calling `sink` with each piece of text as soon as it decodes
    /// to whole characters.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &SamplingOptions,
        sink: &mut dyn FnMut(&str) -> io::Result<()>,
    ) -> Result<Generation, GenerateError> {
        options.validate()?;
        let context = self.config.max_positions();
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() > context {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt.len(),
                context,
            });
        }
        // Every generated token but the last is fed back, one position each.
        let room = context - prompt.len() + 1;
        let budget = options.max_new_tokens.min(room);
        // The sampler's only stream: the seed alone fixes the draws.
        let mut rng = Rng::new(options.seed, 0);
        let mut cache = self.model.new_cache();
        let mut stream = TextStream::new(&self.tokenizer);
        let mut tokens = Vec::new();

        let started = Instant::now();
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let logits = crate::model::on_pool(|| {
            self.model
                .forward(&input, Some(&mut cache), Kernels::Inference)
        })?;
        let mut last = logits.i((0, prompt.len() - 1))?;
        let mut prefill = None;
        let mut decode_started = started;
        let stop = loop {
            if tokens.len() == budget {
                break if budget < options.max_new_tokens {
                    StopReason::ContextFull
                } else {
                    StopReason::MaxNewTokens
                };
            }
            let next = self.sample(options, &mut rng, &last)?;
            if prefill.is_none() {
                prefill = Some(started.elapsed());
                decode_started = Instant::now();
            }
            if self.stop.contains(&next) {
                break match self.tokenizer.id_to_token(next).as_deref() {
                    Some(END_OF_TEXT) => StopReason::EndOfText,
                    _ => StopReason::EndOfTurn,
                };
            }
            tokens.push(next);
            if let Some(piece) = stream.push(next)? {
                sink(&piece).map_err(GenerateError::Output)?;
            }
            if tokens.len() < budget {
                let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
                last = crate::model::on_pool(|| {
                    self.model
                        .forward(&input, Some(&mut cache), Kernels::Inference)
                })?
                .i((0, 0))?;
            }
        };
        let decode = decode_started.elapsed();
        if let Some(piece) = stream.finish()? {
            sink(&piece).map_err(GenerateError::Output)?;
        }
        let text = self.decode(&tokens)?;
        let sampled = tokens.len()
            + usize::from(matches!(
                stop,
                StopReason::EndOfTurn | StopReason::EndOfText
            ));
        Ok(Generation {
            text,
            tokens,
            prompt_tokens: prompt.len(),
            stop,
            prefill: prefill.unwrap_or_else(|| started.elapsed()),
            decode_steps: sampled.saturating_sub(1),
            decode: if sampled > 1 { decode } else { Duration::ZERO },
        })
    }

    /// The text of `ids`. Special tokens are written out, not skipped: generated text
    /// never holds one (they are banned, and stop tokens end it), so one in the output
    /// would show a bug rather than hide it.
    pub fn decode(&self, ids: &[u32]) -> Result<String, GenerateError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|error| GenerateError::Tokenize(error.to_string()))
    }

    /// Picks the next token from the logits `[V]` of the last position.
    fn sample(
        &self,
        options: &SamplingOptions,
        rng: &mut Rng,
        logits: &Tensor,
    ) -> Result<u32, GenerateError> {
        let mut logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        for &id in &self.banned {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(options.sample(&logits, rng))
    }
}

/// Turns generated ids into text pieces that end on whole UTF-8 characters (a
/// byte-level token may hold half a character), decoding a short window rather than
/// everything each time.
struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    /// Start of the window decoded each time.
    prefix: usize,
    /// End of the part of the window already emitted.
    read: usize,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a Tokenizer) -> TextStream<'a> {
        TextStream {
            tokenizer,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, GenerateError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|error| GenerateError::Tokenize(error.to_string()))
    }

    /// Adds a token; returns the new text once it ends on a whole character.
    fn push(&mut self, id: u32) -> Result<Option<String>, GenerateError> {
        self.tokens.push(id);
        self.emit(false)
    }

    /// Whatever is left, complete or not.
    fn finish(&mut self) -> Result<Option<String>, GenerateError> {
        self.emit(true)
    }

    fn emit(&mut self, force: bool) -> Result<Option<String>, GenerateError> {
        let before = self.decode(&self.tokens[self.prefix..self.read])?;
        let now = self.decode(&self.tokens[self.prefix..])?;
        if now.len() <= before.len() || (!force && now.ends_with(char::REPLACEMENT_CHARACTER)) {
            return Ok(None);
        }
        let piece = match now.get(before.len()..) {
            Some(piece) if now.starts_with(&before) => piece.to_string(),
            // The window decodes differently with the new tokens: emit what is new
            // after the longest common prefix.
            _ => {
                let common = now
                    .char_indices()
                    .zip(before.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map(|((index, c), _)| index + c.len_utf8())
                    .unwrap_or(0);
                now[common..].to_string()
            }
        };
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(Some(piece))
    }
}

/// A chat: an optional system prompt and the turns so far.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    system: Option<String>,
    history: Vec<ChatMessage>,
    replies: u64,
}

/// The result of one chat turn.
#[derive(Debug, Clone)]
pub struct ChatReply {
    /// The assistant's answer.
    pub generation: Generation,
    /// Oldest exchanges dropped from the history so that the prompt fits the context.
    pub forgotten_turns: usize,
}

impl Conversation {
    /// A new conversation with an optional system prompt.
    pub fn new(system: Option<String>) -> Conversation {
        Conversation {
            system,
            history: Vec::new(),
            replies: 0,
        }
    }

    /// The user and assistant turns so far.
    pub fn history(&self) -> &[ChatMessage] {
        &self.history
    }

    /// Forgets the turns (the system prompt stays).
    pub fn reset(&mut self) {
        self.history.clear();
    }

    /// The messages the model sees for the next turn: the system prompt, the history
    /// and the user's `text`. This is the one place a turn's prompt is assembled (a
    /// retrieval mode would add its documents here).
    pub fn prompt_messages(&self, text: &str) -> Vec<ChatMessage> {
        let message = |role: Role, content: &str| ChatMessage {
            role,
            content: content.to_string(),
            tool_calls: Vec::new(),
            extra: Default::default(),
        };
        self.system
            .iter()
            .map(|system| message(Role::System, system))
            .chain(self.history.iter().cloned())
            .chain(std::iter::once(message(Role::User, text)))
            .collect()
    }

    /// Answers `text`: generates the assistant's turn (streamed to `sink`) and adds
    /// both turns to the history. When the prompt leaves less room in the model's
    /// context than the answer may need (`max_new_tokens`, but at most half the
    /// context), the oldest exchanges are forgotten first. Turn `n` samples with seed
    /// `options.seed + n`, so a replayed conversation is reproducible.
    pub fn reply(
        &mut self,
        generator: &Generator,
        text: &str,
        options: &SamplingOptions,
        sink: &mut dyn FnMut(&str) -> io::Result<()>,
    ) -> Result<ChatReply, GenerateError> {
        let context = generator.config().max_positions();
        let room = options.max_new_tokens.min(context / 2);
        let mut forgotten_turns = 0;
        let prompt = loop {
            let prompt = generator.chat_prompt(&self.prompt_messages(text))?;
            if prompt.len() + room <= context || self.history.is_empty() {
                break prompt;
            }
            // Drop the oldest exchange: its user turn and what follows up to the next.
            let end = self
                .history
                .iter()
                .skip(1)
                .position(|message| message.role == Role::User)
                .map_or(self.history.len(), |index| index + 1);
            self.history.drain(..end);
            forgotten_turns += 1;
        };
        let turn_options = SamplingOptions {
            seed: options.seed.wrapping_add(self.replies),
            ..options.clone()
        };
        let generation = generator.generate(&prompt, &turn_options, sink)?;
        self.replies += 1;
        for (role, content) in [(Role::User, text), (Role::Assistant, &generation.text)] {
            self.history.push(ChatMessage {
                role,
                content: content.to_string(),
                tool_calls: Vec::new(),
                extra: Default::default(),
            });
        }
        Ok(ChatReply {
            generation,
            forgotten_turns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::chat;

    #[test]
    fn out_of_range_options_are_refused() {
        for options in [
            SamplingOptions {
                temperature: -1.0,
                ..SamplingOptions::default()
            },
            SamplingOptions {
                top_k: Some(0),
                ..SamplingOptions::default()
            },
            SamplingOptions {
                top_p: Some(1.5),
                ..SamplingOptions::default()
            },
            SamplingOptions {
                top_p: Some(0.0),
                ..SamplingOptions::default()
            },
        ] {
            assert!(options.validate().is_err(), "{options:?}");
        }
        assert!(SamplingOptions::default().validate().is_ok());
    }

    #[test]
    fn a_path_without_config_json_names_the_models_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("outputs/lm");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model_dir(&model).unwrap(), model);
        let error = resolve_model_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains(&dir.path().display().to_string()), "{error}");
        assert!(error.contains("outputs/lm"), "{error}");
        let missing = dir.path().join("nope");
        let error = resolve_model_dir(&missing).unwrap_err().to_string();
        assert!(
            error.contains("nope") && error.contains("no such"),
            "{error}"
        );
    }

    #[test]
    fn a_turns_prompt_is_the_system_prompt_the_history_and_the_users_text() {
        let mut conversation = Conversation::new(Some("Be brief.".into()));
        for (role, content) in [
            (Role::User, "a"),
            (Role::Assistant, "b"),
            (Role::User, "c"),
            (Role::Assistant, "d"),
        ] {
            conversation.history.push(ChatMessage {
                role,
                content: content.into(),
                tool_calls: Vec::new(),
                extra: Default::default(),
            });
        }
        let rendered = chat::render_text(&conversation.prompt_messages("e"), true);
        assert_eq!(
            rendered,
            "<|system|>Be brief.<|end|><|user|>a<|end|><|assistant|>b<|end|>\
             <|user|>c<|end|><|assistant|>d<|end|><|user|>e<|end|><|assistant|>"
        );
        conversation.reset();
        assert!(conversation.history().is_empty());
        assert_eq!(
            chat::render_text(&conversation.prompt_messages("e"), true),
            "<|system|>Be brief.<|end|><|user|>e<|end|><|assistant|>"
        );
    }
}
