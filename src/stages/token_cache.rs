//! The `token-cache` kind: tokenizes a corpus once into memory-mappable files that
//! training reads ([`crate::data::token_cache`]). Pretrain caches hold token shards,
//! documents separated by `<|endoftext|>`; SFT caches hold chat examples rendered with
//! the chat template, with a loss mask over the assistant's tokens.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::{
    Artifact, InputRules, InputSlot, StageContext, StageError, StageKind, StageOutcome,
    TOKENIZER_SOURCES, invalid,
};
use crate::data::Split;
use crate::data::token_cache::{
    AddedTokens, CacheMeta, CacheMode, Dtype, FORMAT, SftWriter, ShardWriter, SplitInfo,
    TOKENIZER_DIR, TemplateRecord,
};
use crate::path_error::AtPath;
use crate::tokenize::encode::{self, EncodeError, Encoder, Example, Record, Truncation};
use crate::tokenize::template::{
    ChatTemplate, TemplateChoice, TemplateSource, TokenizerConfig, tokenizer_dir,
};
use crate::tokenize::{added, load, special};

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    /// `sft` if the first record of `train` is a conversation, else `pretrain`.
    #[default]
    Auto,
    /// Token shards for pretraining.
    Pretrain,
    /// Chat examples with loss masks.
    Sft,
}

/// Settings of a `token-cache` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenCacheSettings {
    /// `pretrain`, `sft`, or `auto` (decided by the first record of `train`).
    #[serde(default)]
    pub mode: ModeSetting,
    /// Pretrain: tokens per shard file.
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: u64,
    /// Pretrain: the token placed after every document; by default `<|endoftext|>` (or
    /// the tokenizer's `</s>` / `<|end_of_text|>` / `<eos>` when it has no such token).
    #[serde(default)]
    pub separator: Option<String>,
    /// SFT: the longest example kept, in tokens.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// SFT: what to do with longer examples.
    #[serde(default)]
    pub truncation: Truncation,
    /// SFT: which chat template renders the conversations: `auto` (the tokenizer's own
    /// — `chat_template.jinja` or `tokenizer_config.json` beside it — when it has one,
    /// else trainyard's for a tokenizer a `tokenizer` stage trained), `model` or
    /// `trainyard`. A `.jinja` file of your own is given as the input `chat_template`.
    #[serde(default)]
    pub chat_template: TemplateChoice,
    /// SFT: extra variables for the template, as keyword arguments to transformers'
    /// `apply_chat_template` (`enable_thinking: false`, `date_string: "26 Jul 2024"`).
    #[serde(default)]
    pub template_kwargs: BTreeMap<String, serde_json::Value>,
    /// New special tokens for the tokenizer (`["<|tool|>", …]`), each never split and
    /// given the next free id, as transformers' `add_special_tokens` does. The extended
    /// tokenizer is written into the cache (`tokenizer/`); an `sft` stage on the cache
    /// resizes the model's embeddings and trains the new rows. Tokens the tokenizer
    /// already has keep their ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_tokens: Vec<String>,
    /// Records tokenized together in parallel (bounds memory).
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
}

fn default_shard_tokens() -> u64 {
    1 << 24
}

fn default_max_len() -> usize {
    1024
}

fn default_batch_records() -> usize {
    4096
}

/// The `token-cache` stage kind.
pub struct TokenCacheStage;

const TEXT_INPUTS: &[Artifact] = &[Artifact::Files, Artifact::Corpus];

impl StageKind for TokenCacheStage {
    type Settings = TokenCacheSettings;
    const NAME: &'static str = "token-cache";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "tokenize a corpus into shards (pretrain) or masked chat examples (SFT)";
    const OUTPUT: Artifact = Artifact::TokenCache;
    const INPUTS: InputRules = InputRules::Slots(&[
        InputSlot::required("train", TEXT_INPUTS),
        InputSlot::optional("eval", TEXT_INPUTS),
        InputSlot::required("tokenizer", TOKENIZER_SOURCES),
        InputSlot::optional("chat_template", &[Artifact::Files]),
    ]);

    fn check(settings: &TokenCacheSettings, inputs: &[&str]) -> Result<(), String> {
        if inputs.contains(&"chat_template") && settings.chat_template != TemplateChoice::Auto {
            return Err(format!(
                "`chat_template: {}` contradicts the `chat_template` input; leave the setting `auto` to use the file",
                serde_json::to_value(settings.chat_template)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_string))
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }

    fn run(
        settings: &TokenCacheSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let given_path = load::tokenizer_file(&context.inputs["tokenizer"])?;
        let mut tokenizer = load::load_tokenizer(&given_path)?;
        let (tokenizer_path, added_tokens) = match settings.add_tokens.is_empty() {
            true => (given_path.clone(), None),
            false => {
                let (path, record) = extend_tokenizer(
                    &mut tokenizer,
                    &given_path,
                    &settings.add_tokens,
                    context.out_dir,
                )?;
                writeln!(
                    context.log,
                    "add_tokens: {} new ({}); the extended tokenizer is in {TOKENIZER_DIR}/",
                    record.added.len(),
                    record
                        .added
                        .iter()
                        .map(|token| format!("{} = {}", token.content, token.id))
                        .collect::<Vec<_>>()
                        .join(", "),
                )
                .map_err(|error| StageError::io("writing the stage log", error))?;
                (path, Some(record))
            }
        };
        let (train, eval) = corpus_files(context.inputs)?;
        let mode = match settings.mode {
            ModeSetting::Pretrain => CacheMode::Pretrain,
            ModeSetting::Sft => CacheMode::Sft,
            ModeSetting::Auto => detect_mode(&train)?,
        };
        // One past the largest id, not the count: added tokens may leave gaps, and the
        // reader refuses ids at or above this bound as corruption.
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |largest| largest + 1)
            .max(tokenizer.get_vocab_size(true) as u32);
        let dtype = Dtype::for_vocab(vocab_size);
        let tokenizer_config = TokenizerConfig::load(&tokenizer_dir(&tokenizer_path))?;
        let eos_id = separator_id(&tokenizer, settings.separator.as_deref(), &tokenizer_config)?;
        let pad_id = tokenizer
            .token_to_id(special::PAD)
            .or_else(|| {
                tokenizer_config
                    .special("pad_token")
                    .and_then(|token| tokenizer.token_to_id(token))
            })
            .unwrap_or(eos_id);
        // An extended tokenizer's config lists the new special tokens, which templates
        // see (transformers passes them as variables): render with it.
        let template_source = match added_tokens {
            Some(_) => tokenizer_dir(&tokenizer_path),
            None => context.inputs["tokenizer"].clone(),
        };
        let template = chat_template(
            settings,
            &tokenizer,
            &template_source,
            context.inputs.get("chat_template"),
        );
        let template = match (mode, template) {
            (CacheMode::Sft, template) => Some(template?),
            // Conversations in a pretraining corpus are rendered with the model's own
            // template too; a text-only corpus needs none.
            (CacheMode::Pretrain, template) => template.ok(),
        };
        if let Some(template) = &template {
            writeln!(
                context.log,
                "chat template: {} (hash {})",
                template.source(),
                &template.hash()[..16]
            )
            .map_err(|error| StageError::io("writing the stage log", error))?;
        }
        let mut source_hasher = blake3::Hasher::new();
        let mut splits = BTreeMap::new();
        let mut metrics = serde_json::Map::new();
        for (split, file) in [(Split::Train, Some(&train)), (Split::Eval, eval.as_ref())] {
            let Some(file) = file else { continue };
            let hash = crate::hashing::hash_file_contents(file).at(file)?;
            source_hasher.update(format!("{split}\0{hash}\n").as_bytes());
            let info = match mode {
                CacheMode::Pretrain => build_pretrain(
                    &tokenizer,
                    template.as_ref(),
                    settings,
                    file,
                    context.out_dir,
                    split,
                    dtype,
                    eos_id,
                    context,
                )?,
                CacheMode::Sft => build_sft(
                    &tokenizer,
                    template.as_ref(),
                    settings,
                    file,
                    context.out_dir,
                    split,
                    dtype,
                    context,
                )?,
            };
            writeln!(
                context.log,
                "{split}: {} records, {} tokens, dropped {:?}",
                info.documents, info.tokens, info.dropped
            )
            .map_err(|error| StageError::io("writing the stage log", error))?;
            metrics.insert(format!("{split}_tokens"), info.tokens.into());
            metrics.insert(format!("{split}_records"), info.documents.into());
            splits.insert(split.to_string(), info);
        }
        let tokenizer_bytes = std::fs::read(&tokenizer_path).at(tokenizer_path)?;
        let meta = CacheMeta {
            format: FORMAT,
            mode,
            dtype,
            vocab_size,
            tokenizer_hash: blake3::hash(&tokenizer_bytes).to_hex().to_string(),
            source_hash: source_hasher.finalize().to_hex().to_string(),
            eos_id,
            pad_id,
            shard_tokens: (mode == CacheMode::Pretrain).then_some(settings.shard_tokens),
            max_len: (mode == CacheMode::Sft).then_some(settings.max_len as u64),
            truncation: (mode == CacheMode::Sft).then(|| settings.truncation.name().to_string()),
            chat_template: template.as_ref().map(|template| TemplateRecord {
                source: match template.source() {
                    TemplateSource::Model(_) => "model",
                    TemplateSource::Trainyard => "trainyard",
                    TemplateSource::File(_) => "file",
                }
                .to_string(),
                hash: template.hash(),
            }),
            added_tokens,
            splits,
        };
        let meta_path = context.out_dir.join("meta.json");
        let bytes = serde_json::to_vec_pretty(&meta)?;
        std::fs::write(&meta_path, bytes).at(meta_path)?;
        Ok(StageOutcome { metrics })
    }
}

/// Adds `tokens` to `tokenizer` and writes the result, with the companion files of
/// `given` (the input's `tokenizer.json`), into the cache's [`TOKENIZER_DIR`].
fn extend_tokenizer(
    tokenizer: &mut Tokenizer,
    given: &Path,
    tokens: &[String],
    out_dir: &Path,
) -> Result<(PathBuf, AddedTokens), StageError> {
    let base_bytes = std::fs::read(given).at(given)?;
    let added = added::add_special_tokens(tokenizer, tokens)?;
    let path = added::write_extended(
        tokenizer,
        given,
        tokens,
        &added,
        &out_dir.join(TOKENIZER_DIR),
    )?;
    Ok((
        path,
        AddedTokens {
            requested: tokens.to_vec(),
            added,
            base_tokenizer_hash: blake3::hash(&base_bytes).to_hex().to_string(),
        },
    ))
}

/// The template SFT examples are rendered with (see [`TokenCacheSettings::chat_template`]).
fn chat_template(
    settings: &TokenCacheSettings,
    tokenizer: &Tokenizer,
    tokenizer_input: &Path,
    file: Option<&PathBuf>,
) -> Result<ChatTemplate, StageError> {
    let has_trainyard_tokens = special::SPECIAL_TOKENS
        .iter()
        .all(|token| tokenizer.token_to_id(token).is_some());
    let extra = settings
        .template_kwargs
        .iter()
        .map(|(key, value)| {
            serde_json::from_value::<minijinja::Value>(value.clone())
                .map(|value| (key.clone(), value))
                .map_err(|error| invalid(format!("key `template_kwargs.{key}`: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChatTemplate::for_tokenizer(
        tokenizer_input,
        settings.chat_template,
        file.map(PathBuf::as_path),
        has_trainyard_tokens,
        extra,
    )?)
}

/// The train and optional eval corpus files: given directly, or `train.jsonl` and
/// `eval.jsonl` inside an `ingest` output.
fn corpus_files(
    inputs: &BTreeMap<String, PathBuf>,
) -> Result<(PathBuf, Option<PathBuf>), StageError> {
    let train_input = &inputs["train"];
    let (train, implied_eval) = if train_input.is_dir() {
        let eval = train_input.join("eval.jsonl");
        (
            train_input.join("train.jsonl"),
            eval.is_file().then_some(eval),
        )
    } else {
        (train_input.clone(), None)
    };
    if !train.is_file() {
        return Err(invalid(format!("no corpus file at {}", train.display())));
    }
    let eval = match inputs.get("eval") {
        Some(eval) if eval.is_dir() => Some(eval.join("eval.jsonl")),
        Some(eval) => Some(eval.clone()),
        None => implied_eval,
    };
    Ok((train, eval))
}

/// An encoding error at line `number` of `file`.
fn at_line(file: &Path, number: usize, source: EncodeError) -> StageError {
    StageError::Record {
        file: file.to_path_buf(),
        line: number,
        source,
    }
}

fn detect_mode(file: &Path) -> Result<CacheMode, StageError> {
    let reader = BufReader::new(File::open(file).at(file)?);
    for (index, line) in reader.lines().enumerate() {
        let line = line.at(file)?;
        if line.trim().is_empty() {
            continue;
        }
        let record = Record::parse(&line).map_err(|error| at_line(file, index + 1, error))?;
        return Ok(if record.messages.is_some() {
            CacheMode::Sft
        } else {
            CacheMode::Pretrain
        });
    }
    Ok(CacheMode::Pretrain)
}

fn separator_id(
    tokenizer: &Tokenizer,
    configured: Option<&str>,
    config: &TokenizerConfig,
) -> Result<u32, StageError> {
    if let Some(token) = configured {
        return tokenizer.token_to_id(token).ok_or_else(|| {
            invalid(format!(
                "separator `{token}` is not a token of this tokenizer"
            ))
        });
    }
    [special::END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>"]
        .into_iter()
        .chain(config.special("eos_token"))
        .find_map(|token| tokenizer.token_to_id(token))
        .ok_or_else(|| invalid("the tokenizer has no end-of-text token; set `separator`"))
}

/// Reads `file` in batches of non-empty lines, so memory is bounded by the batch size,
/// encodes each batch's lines in parallel with `encode`, and hands the results to
/// `handle` in file order, with a progress bar on a terminal.
fn encode_lines<T: Send>(
    file: &Path,
    batch_records: usize,
    context: &StageContext<'_>,
    encode: impl Fn(&str) -> Result<T, EncodeError> + Sync,
    mut handle: impl FnMut(T) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let bar = progress_bar(file);
    let mut run = |batch: Vec<(usize, String)>| -> Result<(), StageError> {
        let bytes: u64 = batch.iter().map(|(_, line)| line.len() as u64 + 1).sum();
        let encoded: Vec<T> = batch
            .par_iter()
            .map(|(number, line)| encode(line).map_err(|error| at_line(file, *number, error)))
            // Collected whole, then in order: the error names the first bad line of the
            // file, not whichever thread failed first.
            .collect::<Vec<Result<_, StageError>>>()
            .into_iter()
            .collect::<Result<_, StageError>>()?;
        encoded.into_iter().try_for_each(&mut handle)?;
        bar.inc(bytes);
        Ok(())
    };
    let reader = BufReader::with_capacity(1 << 20, File::open(file).at(file)?);
    let mut batch = Vec::with_capacity(batch_records);
    for (index, line) in reader.lines().enumerate() {
        let line = line.at(file)?;
        if line.trim().is_empty() {
            continue;
        }
        batch.push((index + 1, line));
        if batch.len() >= batch_records.max(1) {
            if context.cancel.is_cancelled() {
                return Err(StageError::Interrupted);
            }
            run(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        run(batch)?;
    }
    bar.finish_and_clear();
    Ok(())
}

fn progress_bar(file: &Path) -> indicatif::ProgressBar {
    let length = std::fs::metadata(file)
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(length)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "  tokenizing {msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(
        file.file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar
}

#[allow(clippy::too_many_arguments)]
fn build_pretrain(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    settings: &TokenCacheSettings,
    file: &Path,
    out_dir: &Path,
    split: Split,
    dtype: Dtype,
    eos_id: u32,
    context: &StageContext<'_>,
) -> Result<SplitInfo, StageError> {
    let mut writer = ShardWriter::new(out_dir, split, dtype, settings.shard_tokens)
        .map_err(|error| StageError::io(format!("creating {split} shards"), error))?;
    let mut info = SplitInfo::default();
    let encoder = Encoder::new(tokenizer);
    let encode = |line: &str| encoder.pretraining_ids(line, template);
    encode_lines(file, settings.batch_records, context, encode, |mut ids| {
        ids.push(eos_id);
        writer
            .push(&ids)
            .map_err(|error| StageError::io(format!("writing {split} shards"), error))?;
        info.tokens += ids.len() as u64;
        info.documents += 1;
        Ok(())
    })?;
    info.shards = writer
        .finish()
        .map_err(|error| StageError::io(format!("writing {split} shards"), error))?;
    Ok(info)
}

#[allow(clippy::too_many_arguments)]
fn build_sft(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    settings: &TokenCacheSettings,
    file: &Path,
    out_dir: &Path,
    split: Split,
    dtype: Dtype,
    context: &StageContext<'_>,
) -> Result<SplitInfo, StageError> {
    let mut writer = SftWriter::new(out_dir, split, dtype)
        .map_err(|error| StageError::io(format!("creating {split} files"), error))?;
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let template = template.ok_or_else(|| invalid("an SFT cache needs a chat template"))?;
    let encode = |line: &str| {
        encode::sft_example(
            tokenizer,
            template,
            line,
            settings.max_len,
            settings.truncation,
        )
    };
    encode_lines(file, settings.batch_records, context, encode, |example| {
        match example {
            Example::Kept(ids, mask) => writer
                .push(&ids, &mask)
                .map_err(|error| StageError::io(format!("writing {split} examples"), error))?,
            Example::Dropped(reason) => *dropped.entry(reason.to_string()).or_default() += 1,
        }
        Ok(())
    })?;
    let (examples, tokens, trainable) = writer
        .finish()
        .map_err(|error| StageError::io(format!("writing {split} examples"), error))?;
    Ok(SplitInfo {
        documents: examples,
        tokens,
        shards: Vec::new(),
        trainable_tokens: Some(trainable),
        dropped,
    })
}
