//! The `tokenizer` kind: trains a byte-level BPE or unigram tokenizer on a corpus, or
//! adopts an existing Hugging Face `tokenizer.json` (a base model's), and writes
//! `tokenizer.json` and `stats.json`. The work is in [`crate::tokenize`]; this module
//! maps inputs and settings onto it.
//!
//! ```yaml
//! tok:
//!   kind: tokenizer
//!   inputs: { text: corpus/train.jsonl, eval: corpus/eval.jsonl }
//!   with: { algorithm: bpe, vocab_size: 4096, min_frequency: 2 }
//! base-tok:
//!   kind: tokenizer
//!   inputs: { from: models/qwen, eval: corpus/eval.jsonl }   # a tokenizer.json or a directory holding one
//! ```

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Artifact, InputRules, InputSlot, StageContext, StageError, StageKind, StageOutcome, invalid,
    log,
};
use crate::path_error::AtPath;
use crate::tokenize::corpus::{self, Progress};
use crate::tokenize::learn::{self, Algorithm, EvalStats, TrainOptions};
use crate::tokenize::load::{self, load_tokenizer, tokenizer_file};
use crate::tokenize::{MIN_VOCAB_SIZE, TokenizeError};

/// Settings of a `tokenizer` stage. With `inputs.from` nothing is trained and these
/// settings are not used.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenizerSettings {
    /// The model to train: `bpe` (byte-level byte-pair encoding) or `unigram`
    /// (byte-level unigram language model).
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Vocabulary size, counting the 8 special tokens (ids 0–7) and the 256 byte
    /// tokens, so at least 264. BPE stops early when no pair is frequent enough.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// BPE only: a pair of tokens must occur at least this often in the corpus to be
    /// merged (default 2). Not allowed with `unigram`.
    #[serde(default)]
    pub min_frequency: Option<u64>,
    /// Train on at most this many documents (JSONL records, or lines of text files),
    /// from the start of the corpus; all of them when not set.
    #[serde(default)]
    pub max_docs: Option<u64>,
}

fn default_vocab_size() -> usize {
    4096
}

/// `min_frequency` when not set.
pub const DEFAULT_MIN_FREQUENCY: u64 = 2;

/// The `tokenizer` stage kind.
pub struct TokenizerStage;

/// The files a `tokenizer` stage writes.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// Statistics of a `tokenizer` stage.
pub const STATS_JSON: &str = "stats.json";

impl StageKind for TokenizerStage {
    type Settings = TokenizerSettings;
    const NAME: &'static str = "tokenizer";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "train a byte-level BPE or unigram tokenizer with fixed special tokens, or adopt an existing tokenizer.json";
    const OUTPUT: Artifact = Artifact::Tokenizer;
    const INPUTS: InputRules = InputRules::Slots(&[
        InputSlot::optional("text", &[Artifact::Files, Artifact::Corpus]),
        InputSlot::optional("eval", &[Artifact::Files, Artifact::Corpus]),
        InputSlot::optional(
            "from",
            &[
                Artifact::Files,
                Artifact::Tokenizer,
                Artifact::Model,
                Artifact::Export,
            ],
        ),
    ]);

    fn run(
        settings: &TokenizerSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let stats = match (context.inputs.get("text"), context.inputs.get("from")) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "stage `{}`: give `inputs.text` (a corpus to train on) or `inputs.from` (an existing tokenizer.json), not both",
                    context.stage
                )));
            }
            (None, None) => {
                return Err(invalid(format!(
                    "stage `{}`: a tokenizer needs `inputs.text` (a corpus to train on, e.g. `corpus/train.jsonl`) or `inputs.from` (an existing tokenizer.json or a model directory holding one)",
                    context.stage
                )));
            }
            (Some(text), None) => {
                let text = text.clone();
                train_stage(settings, &text, context)?
            }
            (None, Some(from)) => {
                let from = from.clone();
                adopt_stage(&from, context)?
            }
        };
        crate::path_error::write_json(&context.out_dir.join(STATS_JSON), &stats)?;
        let mut outcome = StageOutcome::default();
        outcome
            .metrics
            .insert("vocab_size".into(), stats.vocab_size.into());
        if let Some(seconds) = stats.training_seconds {
            outcome
                .metrics
                .insert("training_seconds".into(), seconds.into());
        }
        if let Some(chars_per_token) = stats.eval.as_ref().and_then(|eval| eval.chars_per_token) {
            outcome
                .metrics
                .insert("eval_chars_per_token".into(), chars_per_token.into());
        }
        Ok(outcome)
    }
}

/// The content of `stats.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerStats {
    /// `trained` or `from` (an existing tokenizer was adopted).
    pub source: &'static str,
    /// `bpe` or `unigram`; for an adopted tokenizer, its model type in lower case.
    pub algorithm: String,
    /// Size of the vocabulary, special and added tokens included.
    pub vocab_size: usize,
    /// The `vocab_size` setting (trained tokenizers only).
    pub requested_vocab_size: Option<usize>,
    /// Id of each of trainyard's special tokens (`null` where an adopted tokenizer lacks
    /// it; a trained one always has ids 0–7).
    pub special_tokens: IndexMap<String, Option<u32>>,
    /// Characters of the training texts (trained tokenizers only).
    pub train_chars: Option<u64>,
    /// Distinct pre-tokens (words) of the training texts (trained tokenizers only).
    pub train_words: Option<usize>,
    /// Compression on the `eval` input, when given.
    pub eval: Option<EvalStats>,
    /// Wall time of reading the corpus and training (trained tokenizers only). Kept in
    /// the manifest's metrics, not in `stats.json`: a timing in the output would change
    /// its hash on every rerun and make downstream stages rerun for nothing.
    #[serde(skip)]
    pub training_seconds: Option<f64>,
}

fn train_stage(
    settings: &TokenizerSettings,
    text: &std::path::Path,
    context: &mut StageContext<'_>,
) -> Result<TokenizerStats, StageError> {
    let min_frequency = match (settings.algorithm, settings.min_frequency) {
        (Algorithm::Unigram, Some(_)) => {
            return Err(invalid(format!(
                "stage `{}`: `with.min_frequency` applies to `algorithm: bpe` only; remove it for unigram",
                context.stage
            )));
        }
        (_, value) => value.unwrap_or(DEFAULT_MIN_FREQUENCY),
    };
    let options = TrainOptions {
        algorithm: settings.algorithm,
        vocab_size: settings.vocab_size,
        min_frequency,
        show_progress: std::io::stderr().is_terminal(),
    };
    if options.vocab_size < MIN_VOCAB_SIZE {
        return Err(StageError::from(TokenizeError::VocabTooSmall {
            requested: options.vocab_size,
        }));
    }
    let started = Instant::now();
    let files = corpus::corpus_files(text, "train.jsonl").map_err(TokenizeError::Corpus)?;
    log(
        context,
        format_args!(
            "training a {} tokenizer (vocab_size {}) on {}",
            options.algorithm.as_str(),
            options.vocab_size,
            files
                .iter()
                .map(|file| file.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let cancel = context.cancel;
    let mut reporter = Reporter::new(options.show_progress);
    let counts = corpus::count_words(
        &files,
        settings.max_docs,
        rayon::current_num_threads(),
        cancel,
        &mut |progress| reporter.report(progress),
    )
    .map_err(TokenizeError::Corpus)?;
    reporter.finish();
    log(
        context,
        format_args!(
            "read {} texts, {} characters, {} distinct words in {:.2}s",
            counts.texts,
            counts.chars,
            counts.words.len(),
            started.elapsed().as_secs_f64()
        ),
    );
    if counts.words.is_empty() {
        return Err(StageError::from(TokenizeError::NoText(
            text.display().to_string(),
        )));
    }
    let tokenizer = learn::train_tokenizer(&counts, &options, cancel, &mut |progress| {
        reporter.report(progress)
    })?;
    reporter.finish();
    let training_seconds = started.elapsed().as_secs_f64();
    let vocab_size = tokenizer.get_vocab_size(true);
    log(
        context,
        format_args!("trained {vocab_size} tokens in {training_seconds:.2}s"),
    );
    let json = learn::tokenizer_json(&tokenizer)?;
    write_file(context, TOKENIZER_JSON, json.as_bytes())?;
    let eval = eval_stage(&tokenizer, context)?;
    Ok(TokenizerStats {
        source: "trained",
        algorithm: options.algorithm.as_str().to_string(),
        vocab_size,
        requested_vocab_size: Some(options.vocab_size),
        special_tokens: load::special_token_ids(&tokenizer),
        train_chars: Some(counts.chars),
        train_words: Some(counts.words.len()),
        eval,
        training_seconds: Some(training_seconds),
    })
}

fn adopt_stage(
    from: &std::path::Path,
    context: &mut StageContext<'_>,
) -> Result<TokenizerStats, StageError> {
    let file = tokenizer_file(from)?;
    let tokenizer = load_tokenizer(&file)?;
    // The file is copied byte for byte: the base model's embeddings match it exactly,
    // so no token is added, even where trainyard's special tokens are missing.
    let bytes = std::fs::read(&file).at(&file)?;
    write_file(context, TOKENIZER_JSON, &bytes)?;
    let special_tokens = load::special_token_ids(&tokenizer);
    let missing: Vec<&str> = special_tokens
        .iter()
        .filter(|(_, id)| id.is_none())
        .map(|(token, _)| token.as_str())
        .collect();
    if !missing.is_empty() {
        log(
            context,
            format_args!(
                "{} lacks trainyard's special tokens {}; they were not added",
                file.display(),
                missing.join(" ")
            ),
        );
    }
    let algorithm = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|json| json["model"]["type"].as_str().map(str::to_lowercase))
        .unwrap_or_else(|| "unknown".to_string());
    let eval = eval_stage(&tokenizer, context)?;
    Ok(TokenizerStats {
        source: "from",
        algorithm,
        vocab_size: tokenizer.get_vocab_size(true),
        requested_vocab_size: None,
        special_tokens,
        train_chars: None,
        train_words: None,
        eval,
        training_seconds: None,
    })
}

fn eval_stage(
    tokenizer: &tokenizers::Tokenizer,
    context: &mut StageContext<'_>,
) -> Result<Option<EvalStats>, StageError> {
    let Some(eval) = context.inputs.get("eval") else {
        return Ok(None);
    };
    let files = corpus::corpus_files(eval, "eval.jsonl").map_err(TokenizeError::Corpus)?;
    let stats = learn::eval_stats(tokenizer, &files, context.cancel)?;
    log(
        context,
        format_args!(
            "eval: {} characters in {} tokens ({} characters per token)",
            stats.chars,
            stats.tokens,
            stats
                .chars_per_token
                .map_or_else(|| "n/a".to_string(), |value| format!("{value:.3}"))
        ),
    );
    Ok(Some(stats))
}

fn write_file(context: &StageContext<'_>, name: &str, bytes: &[u8]) -> Result<(), StageError> {
    let path = context.out_dir.join(name);
    Ok(std::fs::write(&path, bytes).at(path)?)
}

/// Shows progress on a terminal (a bar per phase); silent otherwise.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    phase: &'static str,
    enabled: bool,
}

impl Reporter {
    fn new(enabled: bool) -> Reporter {
        Reporter {
            bar: None,
            phase: "",
            enabled,
        }
    }

    fn report(&mut self, progress: Progress) {
        if !self.enabled {
            return;
        }
        if self.phase != progress.phase {
            self.finish();
            self.phase = progress.phase;
            let bar = indicatif::ProgressBar::new(progress.total);
            let template = if progress.unit == "bytes" {
                "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            } else {
                "{msg} {wide_bar} {pos}/{len} {per_sec} ETA {eta}"
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_message(progress.phase);
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(progress.done);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.phase = "";
    }
}
