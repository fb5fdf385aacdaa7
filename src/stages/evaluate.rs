//! The `evaluate` kind: how good a model is. Loss and perplexity on the eval split of a
//! token cache (pretrain windows, or SFT examples with the loss on the assistant's
//! tokens), and, given a question set (JSONL `question`, `answer`), the accuracy of
//! greedy answers generated through the chat template: exact match and normalised
//! contains. Writes `metrics.json` and `samples.jsonl` (answers next to the expected).

use crate::data::Split;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::training_stage::DeviceSetting;
use super::{
    Artifact, InputRules, InputSlot, MODEL_SOURCES, StageContext, StageError, StageKind,
    StageOutcome, TOKEN_CACHE_SOURCES, invalid,
};
use crate::data::records::{ChatMessage, QuestionRecord, Role};
use crate::data::token_cache::{Batch, CacheMode, SftBatcher, SftPosition, TokenCache};
use crate::generate::{Generator, SamplingOptions};
use crate::model;
use crate::path_error::{AtPath, write_json};
use crate::train::trainer::evaluate;

/// Settings of an `evaluate` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EvaluateSettings {
    /// Rows per loss batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Batches of the eval split for the loss (at most one pass over it).
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Tokens per row; by default the cache's `max_len` (SFT) or 256, at most the
    /// model's positions.
    #[serde(default)]
    pub context: Option<usize>,
    /// Questions asked (the first ones of the file).
    #[serde(default = "default_max_questions")]
    pub max_questions: usize,
    /// Longest answer generated, in tokens.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Answers written to `samples.jsonl`.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// A system prompt before every question.
    #[serde(default)]
    pub system: Option<String>,
    /// `auto`, `cpu`, `cuda` or `metal`.
    #[serde(default)]
    pub device: DeviceSetting,
}

fn default_batch_size() -> usize {
    8
}
fn default_eval_batches() -> usize {
    16
}
fn default_max_questions() -> usize {
    200
}
fn default_max_new_tokens() -> usize {
    32
}
fn default_samples() -> usize {
    20
}

/// The `evaluate` stage kind.
pub struct Evaluate;

/// The question set inside an `ingest` output directory.
const QUESTIONS_FILE: &str = "questions.jsonl";

impl StageKind for Evaluate {
    type Settings = EvaluateSettings;
    const NAME: &'static str = "evaluate";
    // 3: one vectorised exp (model::exp) in the loss and attention.
    // 4: one-token products of f32 weights as per-row dot products (weight::FewRowProduct),
    // four partial-sum chains in the mapped dot products: greedy answers may differ.
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "loss/perplexity on an eval cache and question accuracy from greedy answers";
    const OUTPUT: Artifact = Artifact::Metrics;
    const INPUTS: InputRules = InputRules::Slots(&[
        InputSlot::required("model", MODEL_SOURCES),
        InputSlot::optional("data", TOKEN_CACHE_SOURCES),
        InputSlot::optional("questions", &[Artifact::Corpus, Artifact::Files]),
    ]);

    fn check(settings: &EvaluateSettings, inputs: &[&str]) -> Result<(), String> {
        if !inputs.contains(&"data") && !inputs.contains(&"questions") {
            return Err("nothing to evaluate: give a `data` input (an eval cache), a `questions` input, or both".to_string());
        }
        if settings.batch_size == 0 {
            return Err("`batch_size` must be positive".to_string());
        }
        Ok(())
    }

    fn run(
        settings: &EvaluateSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        run(settings, context)
    }
}

/// Lower-case words separated by single spaces: punctuation and spacing do not count.
pub fn normalise(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first line of `text`, cut after its first sentence (`.`, `!` or `?` followed by a
/// space or the end).
pub fn first_sentence(text: &str) -> &str {
    let line = text.trim_start().lines().next().unwrap_or("");
    let ends = line
        .char_indices()
        .filter(|(_, c)| matches!(c, '.' | '!' | '?'));
    for (at, c) in ends {
        let rest = &line[at + c.len_utf8()..];
        if rest.is_empty() || rest.starts_with(char::is_whitespace) {
            return &line[..at + c.len_utf8()];
        }
    }
    line
}

/// Whether the normalised `answer` occurs as whole words in the normalised first sentence
/// of `output`: an answer that rambles through many names only counts if it opens with
/// the right one.
pub fn contains_answer(output: &str, answer: &str) -> bool {
    let (output, answer) = (normalise(first_sentence(output)), normalise(answer));
    !answer.is_empty() && format!(" {output} ").contains(&format!(" {answer} "))
}

/// The eval batches of `cache`'s eval split.
fn loss_batches(
    cache: &TokenCache,
    settings: &EvaluateSettings,
    max_positions: usize,
) -> Result<Vec<Batch>, StageError> {
    if !cache.has(Split::Eval) {
        return Err(invalid(format!(
            "the token cache {} has no eval split",
            cache.dir.display()
        )));
    }
    Ok(match cache.meta.mode {
        CacheMode::Pretrain => {
            let context = settings.context.unwrap_or(256).min(max_positions);
            let stream = cache.stream(Split::Eval)?;
            let windows =
                stream.sequential_windows(context + 1, settings.eval_batches * settings.batch_size);
            windows
                .chunks(settings.batch_size)
                .map(Batch::from_windows)
                .collect()
        }
        CacheMode::Sft => {
            let context = settings
                .context
                .or(cache.meta.max_len.map(|len| len as usize))
                .unwrap_or(max_positions)
                .min(max_positions);
            let examples = cache.examples(Split::Eval)?;
            let mut batcher = SftBatcher::new(
                &examples,
                0,
                settings.batch_size,
                context,
                false,
                cache.meta.pad_id,
                SftPosition::default(),
            );
            let batches = settings
                .eval_batches
                .min(examples.len().div_ceil(settings.batch_size));
            (0..batches).filter_map(|_| batcher.next_batch()).collect()
        }
    })
}

/// The question records of `path` (a JSONL file, or an ingest output holding one).
fn read_questions(path: &Path, limit: usize) -> Result<Vec<QuestionRecord>, StageError> {
    let file: PathBuf = if path.is_dir() {
        path.join(QUESTIONS_FILE)
    } else {
        path.to_path_buf()
    };
    let reader = std::fs::File::open(&file).map(BufReader::new).at(&file)?;
    let mut questions = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        if questions.len() >= limit {
            break;
        }
        let line = line.at(&file)?;
        if line.trim().is_empty() {
            continue;
        }
        let record: QuestionRecord = serde_json::from_str(&line).map_err(|error| {
            invalid(format!(
                "{}:{}: {error} (a question set has `question` and `answer` on every line)",
                file.display(),
                index + 1
            ))
        })?;
        questions.push(record);
    }
    Ok(questions)
}

fn run(
    settings: &EvaluateSettings,
    context: &mut StageContext<'_>,
) -> Result<StageOutcome, StageError> {
    let device: Device = settings.device.device().map_err(invalid)?;
    let model_dir = context.inputs["model"].clone();
    let mut metrics = serde_json::Map::new();

    if let Some(data) = context.inputs.get("data") {
        let (model, config) = model::load_pretrained(&model_dir, DType::F32, &device)?;
        let cache = TokenCache::open(data)?;
        let batches = loss_batches(&cache, settings, config.max_positions())?;
        if batches.is_empty() {
            return Err(invalid(format!(
                "the eval split of {} is shorter than one row",
                cache.dir.display()
            )));
        }
        let loss = crate::model::on_pool(|| evaluate(&model, &batches, &device))?;
        let _ = writeln!(
            context.log,
            "eval loss {loss:.4}, perplexity {:.2} over {} batches",
            loss.exp(),
            batches.len()
        );
        metrics.insert("eval_loss".into(), json!(loss));
        metrics.insert("perplexity".into(), json!(loss.exp()));
        metrics.insert("eval_batches".into(), json!(batches.len()));
    }

    if let Some(questions_path) = context.inputs.get("questions") {
        let questions = read_questions(questions_path, settings.max_questions)?;
        if questions.is_empty() {
            return Err(invalid(format!(
                "{}: no questions",
                questions_path.display()
            )));
        }
        let generator = Generator::load(&model_dir, &device)?;
        let options = SamplingOptions {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: context.seed,
            max_new_tokens: settings.max_new_tokens,
        };
        let samples_path = context.out_dir.join("samples.jsonl");
        let mut samples = std::fs::File::create(&samples_path).at(&samples_path)?;
        let (mut exact, mut contains) = (0usize, 0usize);
        // Per category: questions, exact matches, contained answers.
        let mut by_category: std::collections::BTreeMap<&str, [usize; 3]> = Default::default();
        for (index, question) in questions.iter().enumerate() {
            if context.cancel.is_cancelled() {
                return Err(StageError::Interrupted);
            }
            let mut messages = Vec::new();
            if let Some(system) = &settings.system {
                messages.push(ChatMessage {
                    role: Role::System,
                    content: system.clone(),
                    tool_calls: Vec::new(),
                    extra: Default::default(),
                });
            }
            messages.push(ChatMessage {
                role: Role::User,
                content: question.question.clone(),
                tool_calls: Vec::new(),
                extra: Default::default(),
            });
            let prompt = generator.chat_prompt(&messages)?;
            let generation = generator.generate(&prompt, &options, &mut |_| Ok(()))?;
            let answer = generation.text.trim().to_string();
            let is_exact = normalise(&answer) == normalise(&question.answer);
            let is_contained = contains_answer(&answer, &question.answer);
            exact += usize::from(is_exact);
            contains += usize::from(is_contained);
            if let Some(category) = &question.category {
                let tally = by_category.entry(category).or_default();
                tally[0] += 1;
                tally[1] += usize::from(is_exact);
                tally[2] += usize::from(is_contained);
            }
            if index < settings.samples {
                let mut row = json!({
                    "question": question.question,
                    "expected": question.answer,
                    "answer": answer,
                    "exact_match": is_exact,
                    "contains": is_contained,
                });
                if let Some(category) = &question.category {
                    row["category"] = json!(category);
                }
                writeln!(samples, "{row}").at(&samples_path)?;
            }
        }
        let total = questions.len() as f64;
        let _ = writeln!(
            context.log,
            "{} questions: exact match {:.3}, contains {:.3}",
            questions.len(),
            exact as f64 / total,
            contains as f64 / total
        );
        metrics.insert("questions".into(), json!(questions.len()));
        metrics.insert("exact_match".into(), json!(exact as f64 / total));
        metrics.insert("contains_accuracy".into(), json!(contains as f64 / total));
        if !by_category.is_empty() {
            let mut categories = serde_json::Map::new();
            for (category, [count, exact, contains]) in by_category {
                let share = |hits: usize| hits as f64 / count as f64;
                let _ = writeln!(
                    context.log,
                    "  {category}: {count} questions, exact match {:.3}, contains {:.3}",
                    share(exact),
                    share(contains)
                );
                categories.insert(
                    category.to_string(),
                    json!({
                        "questions": count,
                        "exact_match": share(exact),
                        "contains_accuracy": share(contains),
                    }),
                );
            }
            metrics.insert("by_category".into(), json!(categories));
        }
    }

    let path = context.out_dir.join("metrics.json");
    write_json(&path, &metrics)?;
    Ok(StageOutcome { metrics })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_after_normalising_case_punctuation_and_spacing() {
        assert_eq!(normalise("  Tebris, of   ARDEL! "), "tebris of ardel");
        assert!(contains_answer("It is Tebris.", "tebris"));
        assert!(contains_answer("Founded in 1214. It grew.", "1214"));
        assert!(
            !contains_answer("It is Ardel. Tebris is near.", "Tebris"),
            "only the first sentence counts"
        );
        assert!(!contains_answer("Ardel\nTebris", "Tebris"));
        assert_eq!(first_sentence("  It is 3.5 km. Then"), "It is 3.5 km.");
        assert!(
            !contains_answer("It is Tebrisville.", "Tebris"),
            "whole words only"
        );
        assert!(
            !contains_answer("anything", "  "),
            "an empty answer never matches"
        );
    }
}
