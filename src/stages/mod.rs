//! Stage kinds: each is a pure function of (settings, inputs) → files in a scratch
//! directory. This module owns the registry the rest of trainyard consults (names,
//! settings types, implementation versions, input rules) and the context a stage runs in.

pub mod command;
pub mod evaluate;
pub mod export;
pub mod ingest;
pub mod lora_merge;
pub mod pretrain;
pub mod quantize;
pub mod sft;
pub mod token_cache;
pub mod tokenizer;
pub mod training_stage;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use figment::Figment;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::interrupt::CancelFlag;

/// What a stage's output is, so that the DAG can refuse a tokenizer where a token cache
/// is expected before anything runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Artifact {
    /// Arbitrary files (a `command` stage, or a path inside any output).
    Files,
    /// `train.jsonl` / `eval.jsonl` from `ingest`.
    Corpus,
    /// `tokenizer.json`.
    Tokenizer,
    /// Token shards.
    TokenCache,
    /// A Hugging Face-shaped checkpoint.
    Model,
    /// A LoRA adapter in PEFT layout.
    Adapter,
    /// An exported model directory.
    Export,
    /// `metrics.json`.
    Metrics,
}

/// Where a model input (`model`, `base`) may come from: a model stage, an export, or a
/// local Hugging Face directory.
pub const MODEL_SOURCES: &[Artifact] = &[Artifact::Model, Artifact::Export, Artifact::Files];

/// What a token-cache input accepts: a `token-cache` output or a directory holding one.
pub const TOKEN_CACHE_SOURCES: &[Artifact] = &[Artifact::TokenCache, Artifact::Files];

/// Where a `tokenizer` input may come from: a tokenizer stage, a file, or a model or
/// export directory holding `tokenizer.json`.
pub const TOKENIZER_SOURCES: &[Artifact] = &[
    Artifact::Tokenizer,
    Artifact::Files,
    Artifact::Model,
    Artifact::Export,
];

/// One named input a kind reads.
#[derive(Debug)]
pub struct InputSlot {
    /// The key under `inputs:`.
    pub name: &'static str,
    /// Output kinds it accepts from an upstream stage; `Files` also admits plain paths.
    pub accepts: &'static [Artifact],
    /// Whether the stage cannot run without it.
    pub required: bool,
    /// Whether further inputs named `<name>_<anything>` fill this slot too (several
    /// token caches of a mixture: `data`, `data_wiki`, `data_chat`, …).
    pub many: bool,
}

impl InputSlot {
    /// A slot of one input that the stage cannot run without.
    pub const fn required(name: &'static str, accepts: &'static [Artifact]) -> InputSlot {
        InputSlot {
            name,
            accepts,
            required: true,
            many: false,
        }
    }

    /// A slot of at most one input that the stage can run without.
    pub const fn optional(name: &'static str, accepts: &'static [Artifact]) -> InputSlot {
        InputSlot {
            name,
            accepts,
            required: false,
            many: false,
        }
    }

    /// Whether the input called `input` fills this slot.
    pub fn admits(&self, input: &str) -> bool {
        input == self.name
            || (self.many
                && input
                    .strip_prefix(self.name)
                    .is_some_and(|rest| rest.len() > 1 && rest.starts_with('_')))
    }
}

/// Which inputs a kind takes.
#[derive(Debug)]
pub enum InputRules {
    /// Any names, any artifacts (the `command` kind).
    Any,
    /// Exactly these slots.
    Slots(&'static [InputSlot]),
}

/// Everything a stage may touch while it runs: its inputs, its scratch directory, and
/// nothing else (that is what keeps the fingerprint honest).
pub struct StageContext<'a> {
    /// The stage's name in the pipeline.
    pub stage: &'a str,
    /// Absolute path of every input, by input name.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// Every input's portable name, by input name: what an output may record about
    /// where an input came from without tying it to this machine (see
    /// [`portable_input_name`]).
    pub input_names: &'a BTreeMap<String, String>,
    /// Scratch directory that becomes the output once the stage succeeds.
    pub out_dir: &'a Path,
    /// The pipeline seed.
    pub seed: u64,
    /// Set when the user asked to stop.
    pub cancel: &'a CancelFlag,
    /// The stage's log (also kept in the output as [`STAGE_LOG`]).
    pub log: &'a mut (dyn Write + Send),
    /// Structured events for the run's `logs.jsonl` (`train_step`, `eval`): an event
    /// name and its fields; the executor adds the stage's name.
    pub events: &'a (dyn Fn(&str, serde_json::Value) + Sync),
}

/// The name an output records for an input at `path`: the Hugging Face id of a hub
/// snapshot (`hub_repo`, as PEFT records a base), else the path relative to the
/// workspace root when it lies inside the workspace (store entries and files the
/// pipeline names alike, so the same run in another workspace writes the same bytes),
/// else the absolute path.
pub fn portable_input_name(path: &Path, workspace_root: &Path, hub_repo: Option<&str>) -> String {
    if let Some(repo) = hub_repo {
        return repo.to_string();
    }
    match path.strip_prefix(workspace_root) {
        Ok(relative) if !relative.as_os_str().is_empty() => relative
            .components()
            .map(|component| component.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/"),
        _ => path.display().to_string(),
    }
}

/// Name of the log file every stage leaves in its output directory. It is recorded in
/// the manifest but not part of the output hash, so that timings in a log never make
/// downstream stages rerun.
pub const STAGE_LOG: &str = "stage.log";

/// Output files recorded in the manifest but left out of the output hash because they
/// hold timings: the stage log and training metrics. Everything else a stage writes
/// must be a deterministic function of its settings and inputs.
pub const UNHASHED_OUTPUTS: &[&str] = &[STAGE_LOG, crate::train::trainer::METRICS];

/// What a finished stage reports besides its files.
#[derive(Debug, Default)]
pub struct StageOutcome {
    /// Metrics for the manifest (loss, throughput, …); an object.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// Why a stage did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The user asked to stop.
    #[error("interrupted")]
    Interrupted,
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A corpus record cannot be encoded.
    #[error("{}:{line}: {source}", file.display())]
    Record {
        /// The corpus file.
        file: PathBuf,
        /// The 1-based line.
        line: usize,
        /// Why.
        source: crate::tokenize::encode::EncodeError,
    },
    /// A file operation failed; the error names the path.
    #[error(transparent)]
    Path(#[from] crate::path_error::PathIoError),
    /// An external command exited unsuccessfully.
    #[error("command {status}; last lines of its output:\n{tail}")]
    CommandFailed {
        /// `exited with status 3` or `killed by signal 9`.
        status: String,
        /// The last lines of its output.
        tail: String,
    },
    /// The stage's settings or inputs do not allow it to run.
    #[error("{0}")]
    Invalid(String),
    /// A model's files could not be read, built or written.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A tokenizer could not be learned, loaded or extended.
    #[error(transparent)]
    Tokenizer(crate::tokenize::TokenizeError),
    /// Training stopped on an error.
    #[error(transparent)]
    Train(crate::train::trainer::TrainError),
    /// A chat template or `tokenizer_config.json` could not be read or rendered.
    #[error(transparent)]
    Template(#[from] crate::tokenize::template::TemplateError),
    /// A token cache could not be read.
    #[error(transparent)]
    Cache(#[from] crate::data::token_cache::CacheError),
    /// A text source could not be read.
    #[error(transparent)]
    Source(#[from] crate::data::sources::SourceError),
    /// The synthetic world's settings are inconsistent.
    #[error(transparent)]
    World(#[from] crate::data::synthetic::WorldError),
    /// Generation (evaluation prompts) failed.
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    /// A GGUF file could not be written.
    #[error(transparent)]
    Gguf(#[from] crate::export::gguf::GgufError),
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A JSON document of the stage's own could not be written.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<crate::tokenize::TokenizeError> for StageError {
    fn from(error: crate::tokenize::TokenizeError) -> StageError {
        use crate::tokenize::{TokenizeError, corpus::CorpusError};
        match error {
            TokenizeError::Interrupted | TokenizeError::Corpus(CorpusError::Interrupted) => {
                StageError::Interrupted
            }
            other => StageError::Tokenizer(other),
        }
    }
}

impl From<crate::train::trainer::TrainError> for StageError {
    fn from(error: crate::train::trainer::TrainError) -> StageError {
        match error {
            crate::train::trainer::TrainError::Interrupted { .. } => StageError::Interrupted,
            other => StageError::Train(other),
        }
    }
}

impl From<crate::data::writer::WriteError> for StageError {
    fn from(error: crate::data::writer::WriteError) -> StageError {
        let context = format!("{} {}", error.action, error.path.display());
        StageError::io(context, error.source)
    }
}

/// Writes `line` to the stage log. Best effort: a full disk shows up when the outputs
/// are written.
fn log(context: &mut StageContext<'_>, line: std::fmt::Arguments<'_>) {
    let _ = writeln!(context.log, "{line}");
}

/// A [`StageError::Invalid`]: settings or inputs that do not allow the stage to run.
pub(crate) fn invalid(message: impl std::fmt::Display) -> StageError {
    StageError::Invalid(message.to_string())
}

impl StageError {
    /// An I/O error with the operation and path it concerned.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> StageError {
        StageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A stage kind. Implementations live in one module each.
pub trait StageKind {
    /// The kind's `with:` settings. Unknown top-level keys are refused by the
    /// configuration (against the settings' schema, see [`KindEntry::setting_keys`]),
    /// so the type may `#[serde(flatten)]` shared settings such as
    /// [`training_stage::TrainingSettings`]; nested settings types keep `deny_unknown_fields`.
    type Settings: DeserializeOwned + Serialize + JsonSchema;
    /// The name used in `kind:`.
    const NAME: &'static str;
    /// Bumped whenever the kind's output for the same settings and inputs changes; part
    /// of every fingerprint, so old outputs are never reused after such a change.
    const VERSION: u32;
    /// One line for `trainyard kinds` and the schema.
    const SUMMARY: &'static str;
    /// What the output is.
    const OUTPUT: Artifact;
    /// Which inputs it takes.
    const INPUTS: InputRules;
    /// Whether a rerun after a crash continues from what the scratch directory holds
    /// (training checkpoints) instead of starting from an empty one.
    const RESUMABLE: bool = false;
    /// Checks the settings against the names declared under `inputs:`, before anything
    /// runs (e.g. that every input a setting names is declared); the message is shown
    /// at the stage's `with:`.
    fn check(_settings: &Self::Settings, _inputs: &[&str]) -> Result<(), String> {
        Ok(())
    }
    /// Does the work.
    fn run(
        settings: &Self::Settings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError>;
}

/// A type-erased [`StageKind`], as kept in [`KINDS`].
pub struct KindEntry {
    /// See [`StageKind::NAME`].
    pub name: &'static str,
    /// See [`StageKind::VERSION`].
    pub version: u32,
    /// See [`StageKind::SUMMARY`].
    pub summary: &'static str,
    /// See [`StageKind::OUTPUT`].
    pub output: Artifact,
    /// See [`StageKind::INPUTS`].
    pub inputs: InputRules,
    /// See [`StageKind::RESUMABLE`].
    pub resumable: bool,
    extract: fn(&Figment) -> Result<serde_json::Value, Box<figment::Error>>,
    schema: fn(&mut SchemaGenerator) -> Schema,
    keys: fn() -> Vec<String>,
    check: fn(&serde_json::Value, &[&str]) -> Result<(), String>,
    run: fn(&serde_json::Value, &mut StageContext<'_>) -> Result<StageOutcome, StageError>,
}

impl std::fmt::Debug for KindEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KindEntry({} v{})", self.name, self.version)
    }
}

impl KindEntry {
    const fn of<K: StageKind>() -> KindEntry {
        KindEntry {
            name: K::NAME,
            version: K::VERSION,
            summary: K::SUMMARY,
            output: K::OUTPUT,
            inputs: K::INPUTS,
            resumable: K::RESUMABLE,
            extract: extract_settings::<K>,
            schema: settings_schema::<K>,
            keys: setting_keys::<K>,
            check: check_erased::<K>,
            run: run_erased::<K>,
        }
    }

    /// Reads this kind's typed settings out of a figment focused on `stages.X.with`,
    /// filling defaults, and returns them as canonical JSON.
    pub fn extract(&self, figment: &Figment) -> Result<serde_json::Value, Box<figment::Error>> {
        (self.extract)(figment)
    }

    /// The JSON schema of this kind's settings.
    pub fn schema(&self, generator: &mut SchemaGenerator) -> Schema {
        (self.schema)(generator)
    }

    /// The keys this kind accepts in `with:`: the properties of its settings schema,
    /// computed once per kind.
    pub fn setting_keys(&self) -> &'static [String] {
        static KEYS: OnceLock<Vec<Vec<String>>> = OnceLock::new();
        let keys = KEYS.get_or_init(|| KINDS.iter().map(|kind| (kind.keys)()).collect());
        KINDS
            .iter()
            .position(|kind| kind.name == self.name)
            .and_then(|index| keys.get(index))
            .map_or(&[], Vec::as_slice)
    }

    /// Checks settings produced by [`KindEntry::extract`] against the declared input
    /// names (see [`StageKind::check`]).
    pub fn check(&self, settings: &serde_json::Value, inputs: &[&str]) -> Result<(), String> {
        (self.check)(settings, inputs)
    }

    /// Runs the stage with settings previously produced by [`KindEntry::extract`].
    pub fn run(
        &self,
        settings: &serde_json::Value,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        (self.run)(settings, context)
    }

    /// The input slot called `name`, if this kind has fixed slots.
    pub fn slot(&self, name: &str) -> Option<&'static InputSlot> {
        match self.inputs {
            InputRules::Any => None,
            InputRules::Slots(slots) => slots.iter().find(|slot| slot.admits(name)),
        }
    }
}

fn extract_settings<K: StageKind>(
    figment: &Figment,
) -> Result<serde_json::Value, Box<figment::Error>> {
    let settings: K::Settings = figment.extract()?;
    serde_json::to_value(&settings)
        .map_err(|error| Box::new(figment::Error::from(error.to_string())))
}

fn settings_schema<K: StageKind>(generator: &mut SchemaGenerator) -> Schema {
    let reference = generator.subschema_for::<K::Settings>();
    // The configuration refuses other keys (see `KindEntry::setting_keys`); editors learn
    // it here, flattened settings included.
    if let Some(definition) = generator
        .definitions_mut()
        .get_mut(K::Settings::schema_name().as_ref())
        .and_then(serde_json::Value::as_object_mut)
    {
        definition.insert("additionalProperties".into(), false.into());
    }
    reference
}

fn setting_keys<K: StageKind>() -> Vec<String> {
    let schema = SchemaGenerator::default().into_root_schema_for::<K::Settings>();
    schema
        .get("properties")
        .and_then(serde_json::Value::as_object)
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default()
}

fn check_erased<K: StageKind>(settings: &serde_json::Value, inputs: &[&str]) -> Result<(), String> {
    let settings: K::Settings =
        serde_json::from_value(settings.clone()).map_err(|error| error.to_string())?;
    K::check(&settings, inputs)
}

fn run_erased<K: StageKind>(
    settings: &serde_json::Value,
    context: &mut StageContext<'_>,
) -> Result<StageOutcome, StageError> {
    let settings: K::Settings = serde_json::from_value(settings.clone())
        .map_err(|error| invalid(format!("settings of stage `{}`: {error}", context.stage)))?;
    K::run(&settings, context)
}

/// Copies the first `tokenizer.json` found in `sources` into `out_dir`, with its
/// companions (`tokenizer_config.json`, the chat template, …): a model written by a
/// stage carries the tokenizer it was trained with. Nothing when none has one.
pub fn copy_tokenizer(sources: &[&Path], out_dir: &Path) -> Result<(), StageError> {
    use crate::path_error::AtPath;
    let Some(tokenizer) = sources.iter().find_map(|dir| {
        crate::tokenize::load::tokenizer_file(dir)
            .ok()
            .filter(|path| path.is_file())
    }) else {
        return Ok(());
    };
    let copy = out_dir.join("tokenizer.json");
    std::fs::copy(&tokenizer, &copy).at(copy)?;
    crate::tokenize::template::copy_companions(&tokenizer, out_dir).map_err(|error| {
        StageError::io(
            format!("copying {}'s companions", tokenizer.display()),
            error,
        )
    })?;
    Ok(())
}

/// Every stage kind trainyard knows.
pub static KINDS: &[KindEntry] = &[
    KindEntry::of::<command::Command>(),
    KindEntry::of::<ingest::Ingest>(),
    KindEntry::of::<tokenizer::TokenizerStage>(),
    KindEntry::of::<token_cache::TokenCacheStage>(),
    KindEntry::of::<pretrain::Pretrain>(),
    KindEntry::of::<sft::Sft>(),
    KindEntry::of::<lora_merge::LoraMerge>(),
    KindEntry::of::<quantize::Quantize>(),
    KindEntry::of::<export::Export>(),
    KindEntry::of::<evaluate::Evaluate>(),
];

/// The kind called `name`.
pub fn kind(name: &str) -> Option<&'static KindEntry> {
    KINDS.iter().find(|entry| entry.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_named_from_the_workspace_root_or_by_hub_id() {
        let root = Path::new("/tmp/ws");
        assert_eq!(
            portable_input_name(
                Path::new("/tmp/ws/.trainyard/store/pretrain/ab12"),
                root,
                None
            ),
            ".trainyard/store/pretrain/ab12"
        );
        assert_eq!(
            portable_input_name(Path::new("/tmp/ws/models/tiny-llama"), root, None),
            "models/tiny-llama"
        );
        assert_eq!(
            portable_input_name(Path::new("/models/tiny-llama"), root, None),
            "/models/tiny-llama"
        );
        assert_eq!(
            portable_input_name(
                Path::new(
                    "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc"
                ),
                root,
                Some("Qwen/Qwen2.5-0.5B")
            ),
            "Qwen/Qwen2.5-0.5B"
        );
    }
}
