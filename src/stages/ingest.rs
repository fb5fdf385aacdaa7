//! The `ingest` kind: reads one or more sources (text or chat JSONL, text-file globs,
//! dialogue files, Parquet columns, the synthetic world), filters them (length, exact
//! de-duplication, a seeded `max_docs` sample), splits them into train and eval by content
//! hash, and writes `train.jsonl`, `eval.jsonl` and `stats.json` (plus `questions.jsonl`
//! for the synthetic source). The readers live in [`crate::data::sources`], the pieces
//! (de-duplication, sampling, writers, statistics) in [`crate::data`]; this module is the
//! settings and the orchestration.
//!
//! Streaming: documents go from the reader through the filters to a buffered writer one
//! at a time; nothing holds the corpus. What grows with the corpus is the de-duplication
//! set, 16 bytes of hash per unique document (about 32 bytes with the hash table's
//! spare capacity), and, with `max_docs`, a heap of `max_docs` (hash, ordinal) pairs.
//!
//! Determinism: whether a document goes to eval depends only on (seed, its normalised
//! text), so adding documents never moves existing ones between train and eval. `max_docs`
//! keeps the documents with the `max_docs` smallest seeded hashes (bottom-k): a first pass
//! finds the k-th smallest, a second pass writes the documents at or below it, in their
//! original order. The result is exactly `max_docs` documents (or all, if fewer).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Artifact, InputRules, StageContext, StageError, StageKind, StageOutcome, invalid};
use crate::data::dedup::DedupSet;
use crate::data::sample::BottomK;
use crate::data::sources::jsonl::{ChunkMode, JsonlReader, TextField};
use crate::data::sources::synthetic::{Part, SyntheticReader};
use crate::data::sources::{
    Document, DocumentStream, PerFile, SourceError, chat, compile_glob, dialogues, files, parquet,
};
use crate::data::stats::{Counts, SourceStats, Stats};
use crate::data::synthetic::{AnswerStyle, SyntheticSettings};
use crate::data::text::{self, Purpose};
use crate::data::writer::JsonlWriter;
use crate::path_error::write_json;
use crate::suggest::did_you_mean;

/// Settings of an `ingest` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct IngestSettings {
    /// The sources, read in this order; each names its format by its one key (`jsonl`,
    /// `chat_jsonl`, `files`, `dialogues`, `parquet`, `synthetic`). All are text sources or
    /// all are chat sources (`chat_jsonl`, `synthetic` with `part: conversations`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceSettings>,
    /// A single source: shorthand for a one-element `sources`. Give `source` or `sources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSettings>,
    /// Documents with fewer characters (Unicode scalar values) are dropped (`too_short`).
    /// For a conversation, the characters of all its turns count.
    #[serde(default = "default_min_chars")]
    pub min_chars: u64,
    /// Documents with more characters are dropped or split, per `long`; none: no limit.
    #[serde(default)]
    pub max_chars: Option<u64>,
    /// What to do with a document longer than `max_chars`: drop it (`too_long`), or split
    /// it at paragraph, sentence or word boundaries into pieces of at most `max_chars`
    /// (each piece's `chunk_id` gets a `#k` suffix). Conversations are never split.
    #[serde(default)]
    pub long: LongPolicy,
    /// Drop exact duplicates: documents whose text is equal after Unicode lower-casing and
    /// collapsing whitespace (the first one is kept).
    #[serde(default = "default_dedup")]
    pub dedup: bool,
    /// Keep at most this many documents: a sample, deterministic for the pipeline seed,
    /// of exactly this size when there are enough (the rest count as `sampled_out`).
    #[serde(default)]
    pub max_docs: Option<u64>,
    /// Share of documents for `eval.jsonl`, decided per document from the seed and its
    /// normalised text, so adding documents never moves existing ones.
    #[serde(default = "default_eval_ratio")]
    pub eval_ratio: f64,
    /// What a malformed record does: `fail` stops the stage with its file, line and the
    /// reason; `skip` drops it and counts it in `stats.json` under `invalid`.
    #[serde(default)]
    pub on_error: OnError,
}

fn default_min_chars() -> u64 {
    1
}

fn default_dedup() -> bool {
    true
}

fn default_eval_ratio() -> f64 {
    0.02
}

/// What to do with documents longer than `max_chars`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LongPolicy {
    /// Drop them.
    #[default]
    Drop,
    /// Split them into pieces of at most `max_chars`.
    Split,
}

/// What a malformed record does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with the file, line and reason.
    #[default]
    Fail,
    /// Skip the record and count it.
    Skip,
}

/// One source of an ingest stage, keyed by its format.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceSettings {
    /// JSONL with one document per line.
    Jsonl(JsonlSource),
    /// JSONL with one conversation (`{"messages": [...]}`) per line.
    ChatJsonl(ChatJsonlSource),
    /// Text files under a directory, one document each.
    Files(FilesSource),
    /// One text file of dialogues separated by a delimiter.
    Dialogues(DialoguesSource),
    /// A string column of a Parquet file.
    Parquet(ParquetSource),
    /// The built-in synthetic world (seeded by the pipeline seed).
    Synthetic(SyntheticSource),
}

/// A `jsonl` source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlSource {
    /// The stage input (a key of `inputs:`) to read: a file, or a directory whose files
    /// matching `glob` are read in sorted order.
    pub input: String,
    /// The field holding the text: `auto` takes `text`, else `body_text`, else `chunks`
    /// (an array of objects with `text`); a named field may hold a string or such an array.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Whether a chunked document becomes one document (`join`) or one per chunk (`split`).
    #[serde(default)]
    pub chunks: ChunkMode,
    /// Files to read when `input` is a directory.
    #[serde(default = "default_jsonl_glob")]
    pub glob: String,
}

fn default_text_field() -> String {
    "auto".to_string()
}

fn default_jsonl_glob() -> String {
    "**/*.jsonl".to_string()
}

/// A `chat_jsonl` source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatJsonlSource {
    /// The stage input to read: a file, or a directory whose files matching `glob` are read.
    pub input: String,
    /// Files to read when `input` is a directory.
    #[serde(default = "default_jsonl_glob")]
    pub glob: String,
}

/// A `files` source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesSource {
    /// The stage input to read: a directory (or a single file).
    pub input: String,
    /// Which files, relative to the directory: `*` stays within a directory, `**` crosses
    /// directories, `{a,b}` is either.
    #[serde(default = "default_files_glob")]
    pub glob: String,
}

fn default_files_glob() -> String {
    files::DEFAULT_GLOB.to_string()
}

/// A `dialogues` source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DialoguesSource {
    /// The stage input to read: a file, or a directory whose files matching `glob` are read.
    pub input: String,
    /// What separates two dialogues; blocks that are blank once trimmed are dropped.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Files to read when `input` is a directory.
    #[serde(default = "default_dialogues_glob")]
    pub glob: String,
}

fn default_delimiter() -> String {
    dialogues::DEFAULT_DELIMITER.to_string()
}

fn default_dialogues_glob() -> String {
    "**/*.txt".to_string()
}

/// A `parquet` source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParquetSource {
    /// The stage input to read: a file, or a directory whose files matching `glob` are
    /// read (a Hugging Face dataset's shards).
    pub input: String,
    /// The top-level string column holding the text.
    #[serde(default = "default_column")]
    pub column: String,
    /// Files to read when `input` is a directory.
    #[serde(default = "default_parquet_glob")]
    pub glob: String,
}

fn default_column() -> String {
    "text".to_string()
}

fn default_parquet_glob() -> String {
    "**/*.parquet".to_string()
}

/// A `synthetic` source: the settings of [`SyntheticSettings`] plus which part to emit.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSource {
    /// `documents` (text) or `conversations` (chat). The held-out question set is written
    /// to `questions.jsonl` either way.
    pub part: Part,
    /// Number of pretraining documents.
    pub documents: u64,
    /// Number of entities (towns and people); default `documents / 100`, clamped to
    /// 16..=100000.
    pub entities: Option<u32>,
    /// Facts stated per document.
    pub facts_per_document: u32,
    /// Number of SFT conversations.
    pub conversations: u64,
    /// Number of held-out questions (capped so that none repeats).
    pub questions: u64,
    /// How conversations answer: `sentence` (a sentence stating the fact, phrased like the
    /// documents) or `bare` (the answer alone).
    pub answers: AnswerStyle,
}

impl Default for SyntheticSource {
    fn default() -> Self {
        let defaults = SyntheticSettings::default();
        SyntheticSource {
            part: Part::default(),
            documents: defaults.documents,
            entities: defaults.entities,
            facts_per_document: defaults.facts_per_document,
            conversations: defaults.conversations,
            questions: defaults.questions,
            answers: defaults.answers,
        }
    }
}

impl SyntheticSource {
    /// The world settings.
    pub fn world_settings(&self) -> SyntheticSettings {
        SyntheticSettings {
            documents: self.documents,
            entities: self.entities,
            facts_per_document: self.facts_per_document,
            conversations: self.conversations,
            questions: self.questions,
            answers: self.answers,
        }
    }
}

impl SourceSettings {
    /// The format's key.
    pub fn format(&self) -> &'static str {
        match self {
            SourceSettings::Jsonl(_) => "jsonl",
            SourceSettings::ChatJsonl(_) => "chat_jsonl",
            SourceSettings::Files(_) => "files",
            SourceSettings::Dialogues(_) => "dialogues",
            SourceSettings::Parquet(_) => "parquet",
            SourceSettings::Synthetic(_) => "synthetic",
        }
    }

    /// The input it reads, if any.
    pub fn input(&self) -> Option<&str> {
        match self {
            SourceSettings::Jsonl(source) => Some(&source.input),
            SourceSettings::ChatJsonl(source) => Some(&source.input),
            SourceSettings::Files(source) => Some(&source.input),
            SourceSettings::Dialogues(source) => Some(&source.input),
            SourceSettings::Parquet(source) => Some(&source.input),
            SourceSettings::Synthetic(_) => None,
        }
    }

    /// Whether it yields conversations rather than text documents.
    pub fn is_chat(&self) -> bool {
        match self {
            SourceSettings::ChatJsonl(_) => true,
            SourceSettings::Synthetic(source) => source.part == Part::Conversations,
            _ => false,
        }
    }

    /// `format:input` (`jsonl:web`, `synthetic:documents`), as shown in stats and errors.
    pub fn label(&self) -> String {
        match (self, self.input()) {
            (SourceSettings::Synthetic(source), _) => match source.part {
                Part::Documents => "synthetic:documents".to_string(),
                Part::Conversations => "synthetic:conversations".to_string(),
            },
            (_, Some(input)) => format!("{}:{input}", self.format()),
            (_, None) => self.format().to_string(),
        }
    }

    fn glob(&self) -> Option<&str> {
        match self {
            SourceSettings::Jsonl(source) => Some(&source.glob),
            SourceSettings::ChatJsonl(source) => Some(&source.glob),
            SourceSettings::Files(source) => Some(&source.glob),
            SourceSettings::Dialogues(source) => Some(&source.glob),
            SourceSettings::Parquet(source) => Some(&source.glob),
            SourceSettings::Synthetic(_) => None,
        }
    }
}

impl IngestSettings {
    /// `source` or `sources`, as one list.
    pub fn all_sources(&self) -> Vec<&SourceSettings> {
        self.source.iter().chain(&self.sources).collect()
    }

    /// Checks the settings against the names declared under `inputs:` (before anything
    /// runs): one of `source`/`sources`, every source's input declared and every input
    /// read, no mix of chat and text sources, at most one synthetic source, sane limits.
    pub fn check(&self, inputs: &[&str]) -> Result<(), String> {
        let sources = self.all_sources();
        match (&self.source, self.sources.is_empty()) {
            (Some(_), false) => {
                return Err("give either `source` (one) or `sources` (a list), not both".into());
            }
            (None, true) => {
                return Err(
                    "no source: give `sources: [...]` (or `source:` for a single one), e.g. `source: { synthetic: {} }`"
                        .into(),
                );
            }
            _ => {}
        }
        for (index, source) in sources.iter().enumerate() {
            let at = format!("source {} ({})", index + 1, source.format());
            if let Some(input) = source.input()
                && !inputs.contains(&input)
            {
                let declared = if inputs.is_empty() {
                    "the stage declares no inputs".to_string()
                } else {
                    format!("declared inputs: {}", inputs.join(", "))
                };
                let help = did_you_mean(input, inputs.iter().copied())
                    .map(|help| format!("; {help}"))
                    .unwrap_or_default();
                return Err(format!(
                    "{at} reads input `{input}`, which is not under `inputs:` ({declared}){help}"
                ));
            }
            if let Some(glob) = source.glob() {
                compile_glob(glob).map_err(|message| format!("{at}: {message}"))?;
            }
            if let SourceSettings::Dialogues(dialogues) = source
                && dialogues.delimiter.is_empty()
            {
                return Err(format!("{at}: `delimiter` must not be empty"));
            }
        }
        for input in inputs {
            if !sources.iter().any(|source| source.input() == Some(input)) {
                return Err(format!(
                    "input `{input}` is declared but no source reads it (add a source with `input: {input}`, or remove the input)"
                ));
            }
        }
        if let (Some(chat), Some(text)) = (
            sources.iter().position(|source| source.is_chat()),
            sources.iter().position(|source| !source.is_chat()),
        ) {
            return Err(format!(
                "source {} ({}) yields conversations but source {} ({}) yields text documents; a corpus is either chat or text, so use one ingest stage for each",
                chat + 1,
                sources[chat].label(),
                text + 1,
                sources[text].label()
            ));
        }
        let synthetic = sources
            .iter()
            .filter(|source| matches!(source, SourceSettings::Synthetic(_)))
            .count();
        if synthetic > 1 {
            return Err(
                "at most one synthetic source per stage (its questions.jsonl belongs to one world)"
                    .into(),
            );
        }
        if let Some(max_chars) = self.max_chars {
            if max_chars == 0 {
                return Err("`max_chars` must be at least 1".into());
            }
            if max_chars < self.min_chars {
                return Err(format!(
                    "`max_chars` ({max_chars}) is below `min_chars` ({}): nothing could be kept",
                    self.min_chars
                ));
            }
        }
        if self.max_docs == Some(0) {
            return Err("`max_docs` must be at least 1 (or left out for no limit)".into());
        }
        if !(0.0..=1.0).contains(&self.eval_ratio) {
            return Err(format!(
                "`eval_ratio` must be between 0 and 1, got {}",
                self.eval_ratio
            ));
        }
        Ok(())
    }
}

/// The `ingest` stage kind.
pub struct Ingest;

impl StageKind for Ingest {
    type Settings = IngestSettings;
    const NAME: &'static str = "ingest";
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "read text/chat corpora (JSONL, text files, dialogues, Parquet, synthetic), filter, de-duplicate and split into train/eval";
    const OUTPUT: Artifact = Artifact::Corpus;
    const INPUTS: InputRules = InputRules::Any;

    fn check(settings: &IngestSettings, inputs: &[&str]) -> Result<(), String> {
        settings.check(inputs)
    }

    fn run(
        settings: &IngestSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let names: Vec<&str> = context.inputs.keys().map(String::as_str).collect();
        settings.check(&names).map_err(StageError::Invalid)?;
        let progress = Progress::new();
        let threshold = match settings.max_docs {
            Some(k) => {
                progress.phase("ingest: sampling (pass 1 of 2)");
                let mut pass = Pass::new(settings, context.seed, Mode::Sample(BottomK::new(k)));
                pass.read_all(settings, context, &progress)?;
                match pass.mode {
                    Mode::Sample(bottom) => bottom.threshold(),
                    Mode::Write(_) => None,
                }
            }
            None => None,
        };
        progress.phase(if settings.max_docs.is_some() {
            "ingest: writing (pass 2 of 2)"
        } else {
            "ingest"
        });
        let output = Output {
            train: JsonlWriter::create(&context.out_dir.join("train.jsonl"))?,
            eval: JsonlWriter::create(&context.out_dir.join("eval.jsonl"))?,
            threshold,
        };
        let mut pass = Pass::new(settings, context.seed, Mode::Write(output));
        pass.read_all(settings, context, &progress)?;
        progress.finish();
        let Mode::Write(output) = pass.mode else {
            return Err(invalid("internal: not in write mode"));
        };
        output.train.finish()?;
        output.eval.finish()?;

        let sources = settings.all_sources();
        if let Some(SourceSettings::Synthetic(source)) = sources
            .iter()
            .find(|source| matches!(source, SourceSettings::Synthetic(_)))
        {
            write_questions(source, context.seed, context.out_dir)?;
        }
        let chat = sources.iter().any(|source| source.is_chat());
        let per_source = sources.iter().zip(pass.counts);
        let per_source = per_source.map(|(source, counts)| SourceStats {
            source: source.label(),
            counts,
        });
        let stats = Stats::new(chat, per_source.collect());
        let path = context.out_dir.join("stats.json");
        write_json(&path, &stats)?;
        stats
            .log(context.log)
            .map_err(|error| StageError::io("writing the stage log", error))?;
        Ok(StageOutcome {
            metrics: stats.metrics(),
        })
    }
}

/// Writes the synthetic world's held-out questions to `questions.jsonl`.
fn write_questions(source: &SyntheticSource, seed: u64, out_dir: &Path) -> Result<(), StageError> {
    let reader = SyntheticReader::new(seed, &source.world_settings(), source.part)?;
    let mut out = JsonlWriter::create(&out_dir.join("questions.jsonl"))?;
    for question in crate::data::sources::synthetic::questions(reader.world()) {
        out.write(&question)?;
    }
    Ok(out.finish()?)
}

/// Opens the document stream of one source.
fn open_source<'a>(
    source: &'a SourceSettings,
    inputs: &BTreeMap<String, PathBuf>,
    seed: u64,
) -> Result<DocumentStream<'a>, StageError> {
    let path = |input: &str| {
        inputs.get(input).cloned().ok_or_else(|| {
            invalid(format!(
                "source {} reads input `{input}`, which the stage was not given",
                source.label()
            ))
        })
    };
    Ok(match source {
        SourceSettings::Jsonl(jsonl) => {
            let text_field = TextField::parse(&jsonl.text_field);
            per_file(path(&jsonl.input)?, &jsonl.glob, move |file| {
                JsonlReader::open(file, text_field.clone(), jsonl.chunks)
            })?
        }
        SourceSettings::ChatJsonl(source) => {
            per_file(path(&source.input)?, &source.glob, chat::ChatReader::open)?
        }
        SourceSettings::Files(source) => {
            Box::new(files::read_files(&path(&source.input)?, &source.glob)?)
        }
        SourceSettings::Dialogues(source) => {
            per_file(path(&source.input)?, &source.glob, |file| {
                dialogues::DialogueReader::open(file, &source.delimiter)
            })?
        }
        SourceSettings::Parquet(source) => per_file(path(&source.input)?, &source.glob, |file| {
            parquet::ParquetReader::open(file, &source.column)
        })?,
        SourceSettings::Synthetic(source) => Box::new(SyntheticReader::new(
            seed,
            &source.world_settings(),
            source.part,
        )?),
    })
}

/// The documents of the files under `root` that match `glob`, each read by `open`.
fn per_file<'a, S: Iterator<Item = Result<Document, SourceError>> + 'a>(
    root: PathBuf,
    glob: &str,
    mut open: impl FnMut(&Path) -> Result<S, SourceError> + 'a,
) -> Result<DocumentStream<'a>, StageError> {
    let per_file = PerFile::new(&root, glob, move |file| {
        Ok(Box::new(open(&file.path)?) as DocumentStream<'a>)
    });
    Ok(Box::new(per_file?))
}

/// `train.jsonl` and `eval.jsonl`, written as documents arrive.
struct Output {
    train: JsonlWriter,
    eval: JsonlWriter,
    /// With `max_docs`: the largest (hash, ordinal) key to keep.
    threshold: Option<(u64, u64)>,
}

enum Mode {
    /// First pass of `max_docs`: find the bottom-k keys, write nothing.
    Sample(BottomK),
    /// Write the kept documents.
    Write(Output),
}

/// One pass over all sources.
struct Pass {
    seed: u64,
    min_chars: u64,
    max_chars: Option<u64>,
    long: LongPolicy,
    dedup: bool,
    eval_ratio: f64,
    on_error: OnError,
    seen: DedupSet,
    normalized: String,
    /// Documents that passed the filters and de-duplication so far (the sample's tie-break).
    ordinal: u64,
    mode: Mode,
    counts: Vec<Counts>,
}

impl Pass {
    fn new(settings: &IngestSettings, seed: u64, mode: Mode) -> Pass {
        Pass {
            seed,
            min_chars: settings.min_chars,
            max_chars: settings.max_chars,
            long: settings.long,
            dedup: settings.dedup,
            eval_ratio: settings.eval_ratio,
            on_error: settings.on_error,
            seen: DedupSet::default(),
            normalized: String::new(),
            ordinal: 0,
            mode,
            counts: settings
                .all_sources()
                .iter()
                .map(|_| Counts::default())
                .collect(),
        }
    }

    fn read_all(
        &mut self,
        settings: &IngestSettings,
        context: &StageContext<'_>,
        progress: &Progress,
    ) -> Result<(), StageError> {
        for (index, source) in settings.all_sources().into_iter().enumerate() {
            let stream = open_source(source, context.inputs, context.seed)?;
            for (read, item) in stream.enumerate() {
                if read % 256 == 0 && context.cancel.is_cancelled() {
                    return Err(StageError::Interrupted);
                }
                progress.tick();
                match item {
                    Ok(document) => {
                        self.counts[index].documents_read += 1;
                        self.document(index, document)?;
                    }
                    Err(SourceError::Record { location, problem }) => {
                        if self.on_error == OnError::Fail {
                            return Err(invalid(format!(
                                "{location}: {problem} (source {}; set `on_error: skip` to skip such records)",
                                source.label()
                            )));
                        }
                        let counts = &mut self.counts[index];
                        counts.documents_read += 1;
                        counts.dropped.invalid += 1;
                        *counts.invalid.entry(problem.key().to_string()).or_default() += 1;
                    }
                    Err(other) => return Err(other.into()),
                }
            }
        }
        Ok(())
    }

    /// Splits an over-long text document if asked to, then filters each piece.
    fn document(&mut self, source: usize, document: Document) -> Result<(), StageError> {
        if let (Document::Text(record), Some(max_chars), LongPolicy::Split) =
            (&document, self.max_chars, self.long)
        {
            let limit = usize::try_from(max_chars).unwrap_or(usize::MAX);
            if text::char_count(&record.text) > limit {
                let pieces = text::split_long(&record.text, limit);
                let counts = &mut self.counts[source];
                counts.split_long.documents += 1;
                counts.split_long.pieces += pieces.len() as u64;
                let base = record.chunk_id.clone().unwrap_or_default();
                for (k, piece) in pieces.into_iter().enumerate() {
                    let piece = Document::Text(crate::data::records::TextRecord {
                        text: piece.to_string(),
                        chunk_id: Some(format!("{base}#{k}")),
                        ..record.clone()
                    });
                    self.unit(source, &piece)?;
                }
                return Ok(());
            }
        }
        self.unit(source, &document)
    }

    /// Filters, de-duplicates, samples, splits and writes one document.
    fn unit(&mut self, source: usize, document: &Document) -> Result<(), StageError> {
        let chars = match document {
            Document::Text(record) => text::char_count(&record.text),
            Document::Chat(record) => record.char_count(),
        } as u64;
        let counts = &mut self.counts[source];
        if chars < self.min_chars {
            counts.dropped.too_short += 1;
            return Ok(());
        }
        if self.max_chars.is_some_and(|max| chars > max) {
            counts.dropped.too_long += 1;
            return Ok(());
        }
        match document {
            Document::Text(record) => text::normalize_into(&record.text, &mut self.normalized),
            Document::Chat(record) => {
                text::normalize_into(&record.canonical_text(), &mut self.normalized)
            }
        }
        if self.dedup && !self.seen.insert(&self.normalized) {
            counts.dropped.duplicate += 1;
            return Ok(());
        }
        let key = (
            text::seeded_hash(Purpose::Sample, self.seed, &self.normalized),
            self.ordinal,
        );
        self.ordinal += 1;
        match &mut self.mode {
            Mode::Sample(bottom) => bottom.offer(key),
            Mode::Write(output) => {
                if output.threshold.is_some_and(|threshold| key > threshold) {
                    counts.dropped.sampled_out += 1;
                    return Ok(());
                }
                let eval = text::is_eval(self.seed, &self.normalized, self.eval_ratio);
                if eval {
                    &mut output.eval
                } else {
                    &mut output.train
                }
                .write(document)?;
                counts.kept += 1;
                if eval {
                    counts.eval += 1;
                    counts.chars.eval += chars;
                } else {
                    counts.train += 1;
                    counts.chars.train += chars;
                }
            }
        }
        Ok(())
    }
}

/// A documents/s spinner on stderr, only when stderr is a terminal.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new() -> Progress {
        let bar = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} {msg}: {human_pos} documents ({rate}, {elapsed})",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                        let _ = write!(out, "{:.0} documents/s", state.per_sec());
                    },
                ));
            }
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        Progress { bar }
    }

    fn phase(&self, message: &'static str) {
        self.bar.set_position(0);
        self.bar.reset_elapsed();
        self.bar.set_message(message);
    }

    fn tick(&self) {
        self.bar.inc(1);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<IngestSettings, serde_json::Error> {
        let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(value)
    }

    fn settings(yaml: &str) -> IngestSettings {
        parse(yaml).unwrap()
    }

    #[test]
    fn settings_have_defaults_and_accept_the_single_source_shorthand() {
        let s = settings("source: { synthetic: { documents: 300 } }");
        assert_eq!(s.all_sources().len(), 1);
        assert_eq!(
            (s.min_chars, s.max_chars, s.dedup, s.eval_ratio, s.on_error),
            (1, None, true, 0.02, OnError::Fail)
        );
        assert!(s.check(&[]).is_ok());
        let s = settings("sources: [{ jsonl: { input: web } }, { files: { input: notes } }]");
        assert!(s.check(&["notes", "web"]).is_ok());
        let SourceSettings::Jsonl(jsonl) = &s.sources[0] else {
            panic!("jsonl");
        };
        assert_eq!(
            (jsonl.text_field.as_str(), jsonl.chunks),
            ("auto", ChunkMode::Join)
        );
        assert!(parse("sources: [{ jsonl: { input: a, txt: b } }]").is_err());
        assert!(parse("sources: [{ csv: { input: a } }]").is_err());
    }

    #[test]
    fn check_names_unknown_and_unused_inputs_and_mixed_kinds() {
        let s = settings("sources: [{ jsonl: { input: wbe } }]");
        let error = s.check(&["web"]).unwrap_err();
        assert!(error.contains("source 1 (jsonl) reads input `wbe`, which is not under `inputs:` (declared inputs: web)"), "{error}");
        assert!(error.contains("did you mean `web`?"), "{error}");
        let s = settings("sources: [{ jsonl: { input: web } }]");
        let error = s.check(&["web", "extra"]).unwrap_err();
        assert!(
            error.contains("input `extra` is declared but no source reads it"),
            "{error}"
        );
        let s = settings("sources: [{ chat_jsonl: { input: c } }, { jsonl: { input: w } }]");
        let error = s.check(&["c", "w"]).unwrap_err();
        assert!(error.contains("source 1 (chat_jsonl:c) yields conversations but source 2 (jsonl:w) yields text documents"), "{error}");
        let s = settings("{}");
        assert!(s.check(&[]).unwrap_err().contains("no source"));
        let s = settings("source: { synthetic: {} }\nsources: [{ synthetic: {} }]");
        assert!(s.check(&[]).unwrap_err().contains("not both"));
        let s = settings("source: { synthetic: {} }\nmin_chars: 10\nmax_chars: 5");
        assert!(s.check(&[]).unwrap_err().contains("below `min_chars`"));
        let s = settings("source: { synthetic: {} }\neval_ratio: 1.5");
        assert!(s.check(&[]).unwrap_err().contains("`eval_ratio`"));
        let s = settings("source: { files: { input: n, glob: \"[\" } }");
        assert!(s.check(&["n"]).unwrap_err().contains("invalid glob"));
    }
}
