//! `trainyard audit`: checks a run against its `resolved_settings.json`. Every input and
//! output the run recorded is hashed again from disk (bypassing the stat cache, with the
//! executor's own hashing: [`store::hash_output`] for outputs), and whatever is missing
//! or differs is reported per stage. With `--reproduce` the recorded settings run again
//! in a fresh workspace and each stage's output hash is compared with the record.
//!
//! The pipeline and profile files are checked too, but a changed one is only a warning:
//! the record holds every resolved value, so neither auditing nor reproducing a run
//! reads them again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::config::{self, Diagnostic, LoadOptions};
use crate::dag::{self, DagError};
use crate::executor::{self, ExecError, RunOptions};
use crate::fingerprint::{self, InputSource, StageIdentity};
use crate::hashing::{ContentHasher, FileDigest};
use crate::interrupt::CancelFlag;
use crate::runs::{
    PipelineRecord, RECORD_FILE, RECORD_FORMAT, RunRecord, RunStatus, StageRunRecord, StageStatus,
};
use crate::stages::UNHASHED_OUTPUTS;
use crate::store::{self, MANIFEST, Manifest, Workspace};

/// Hex characters of a hash shown in reports.
const SHORT_HASH: usize = 12;
/// Name of the pipeline file a reproduction writes into its workspace.
const REPRODUCE_PIPELINE: &str = "pipeline.yaml";

/// Why an audit or a reproduction could not be carried out (as opposed to finding
/// differences, which are its result).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The run directory or its record cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The run record is not valid JSON of the expected shape.
    #[error("{} is not a valid run record: {source}", .path.display())]
    Parse {
        /// The record file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// The run record parses but cannot be used.
    #[error("{}: {message}", .path.display())]
    Invalid {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `--into` names a directory that cannot hold a fresh workspace.
    #[error("--into {}: {message}", .path.display())]
    Into {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Writing the reproduction's workspace failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The recorded settings no longer load (a kind's settings changed since the run).
    #[error("the recorded settings do not load as a pipeline: {0}")]
    Config(#[from] Diagnostic),
    /// The recorded stages do not form a valid graph.
    #[error("the recorded stages do not form a valid pipeline: {0}")]
    Dag(#[from] Box<DagError>),
    /// The reproduction run could not start.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// A run directory, its record, and where its workspace is now.
#[derive(Debug)]
pub struct Run {
    /// The run directory, symlinks resolved (`runs/latest` becomes `runs/<id>`).
    pub dir: PathBuf,
    /// Its `resolved_settings.json`.
    pub record: RunRecord,
    /// The workspace root the recorded store paths are relative to now.
    pub root: PathBuf,
    /// The recorded root, when the workspace was moved or copied since the run; paths
    /// below it (external inputs, the pipeline file) are looked up below `root` instead.
    pub moved_from: Option<PathBuf>,
}

impl Run {
    /// Reads `run_dir/resolved_settings.json`. The workspace is the recorded root if
    /// this run lives there; otherwise `run_dir/../..` (a moved or copied workspace)
    /// when that holds a store, else the recorded root again.
    pub fn open(run_dir: &Path) -> Result<Run, AuditError> {
        let dir = fs::canonicalize(run_dir).map_err(|source| AuditError::Read {
            path: run_dir.to_path_buf(),
            source,
        })?;
        let record_path = dir.join(RECORD_FILE);
        let bytes = fs::read(&record_path).map_err(|source| AuditError::Read {
            path: record_path.clone(),
            source,
        })?;
        let record: RunRecord =
            serde_json::from_slice(&bytes).map_err(|source| AuditError::Parse {
                path: record_path.clone(),
                source,
            })?;
        if record.format != RECORD_FORMAT {
            return Err(AuditError::Invalid {
                path: record_path,
                message: format!(
                    "record format {} is not supported (this trainyard reads format {RECORD_FORMAT})",
                    record.format
                ),
            });
        }
        let recorded = record.workspace.root.clone();
        let holds_this_run = fs::canonicalize(recorded.join("runs").join(&record.run_id))
            .is_ok_and(|found| found == dir);
        let enclosing = dir.parent().and_then(Path::parent).map(Path::to_path_buf);
        let root = match enclosing {
            Some(enclosing)
                if !holds_this_run
                    && (enclosing.join(".trainyard").is_dir() || !recorded.is_dir()) =>
            {
                enclosing
            }
            _ => recorded.clone(),
        };
        let moved =
            root != recorded && fs::canonicalize(&root).ok() != fs::canonicalize(&recorded).ok();
        Ok(Run {
            dir,
            record,
            root,
            moved_from: moved.then_some(recorded),
        })
    }

    /// Where a path the run recorded is now: below the new root if it was below the
    /// recorded one and the workspace moved, else unchanged.
    pub fn relocate(&self, path: &Path) -> PathBuf {
        match &self.moved_from {
            Some(old) => match path.strip_prefix(old) {
                Ok(inside) => self.root.join(inside),
                Err(_) => path.to_path_buf(),
            },
            None => path.to_path_buf(),
        }
    }

    /// A store path recorded relative to the workspace root, made absolute.
    fn store_path(&self, recorded: &Path) -> PathBuf {
        if recorded.is_absolute() {
            self.relocate(recorded)
        } else {
            self.root.join(recorded)
        }
    }

    /// `path` relative to the workspace root when it is inside it, for reports.
    fn shown(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root)
            .map_or_else(|_| path.to_path_buf(), Path::to_path_buf)
    }

    /// Stage names, upstream before downstream (ties by name).
    pub fn stage_order(&self) -> Vec<String> {
        let upstream = self.upstream_stages();
        let mut placed: Vec<String> = Vec::with_capacity(upstream.len());
        let mut left: BTreeSet<&str> = upstream.keys().copied().collect();
        while !left.is_empty() {
            let ready: Vec<&str> = left
                .iter()
                .copied()
                .filter(|name| upstream[name].iter().all(|up| !left.contains(up)))
                .collect();
            // A run cannot record a cycle; should a hand-edited record hold one, the
            // rest is listed by name rather than looping forever.
            let next = if ready.is_empty() {
                left.iter().copied().collect()
            } else {
                ready
            };
            for name in next {
                left.remove(name);
                placed.push(name.to_string());
            }
        }
        placed
    }

    /// Per recorded stage, the stages it reads: from its recorded inputs and, for
    /// stages that never got that far (skipped, not selected), from the inputs the
    /// recorded settings declare, read by the DAG's own rule.
    pub fn upstream_stages(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        let stages = &self.record.stages;
        let names: BTreeSet<&str> = stages.keys().map(String::as_str).collect();
        stages
            .iter()
            .map(|(name, stage)| {
                let recorded = stage
                    .inputs
                    .values()
                    .filter_map(|input| match &input.source {
                        InputSource::Stage { stage, .. } => Some(stage.as_str()),
                        InputSource::Path { .. } => None,
                    });
                let declared = self.record.settings["stages"][name.as_str()]["inputs"]
                    .as_object()
                    .into_iter()
                    .flat_map(|inputs| inputs.values())
                    .filter_map(serde_json::Value::as_str)
                    .filter_map(|declared| dag::as_reference(declared, &names))
                    .map(|(stage, _)| stage);
                let upstream = recorded
                    .chain(declared)
                    .filter(|upstream| *upstream != name.as_str())
                    .filter_map(|upstream| names.get(upstream).copied())
                    .collect();
                (name.as_str(), upstream)
            })
            .collect()
    }

    /// The recorded identity of a stage: what its recorded fingerprint was computed from.
    fn recorded_identity(&self, name: &str, stage: &StageRunRecord) -> StageIdentity {
        let settings = &self.record.settings;
        StageIdentity {
            kind: stage.kind.clone(),
            kind_version: stage.kind_version,
            seed: settings["seed"].as_u64().unwrap_or_default(),
            settings: settings["stages"][name]["with"].clone(),
            inputs: stage.inputs.clone(),
        }
    }
}

/// Only stages whose output is in the store are checked; the others (failed, skipped,
/// interrupted, not selected, …) are reported but not checked.
fn is_audited(stage: &StageRunRecord) -> bool {
    stage.status.has_output()
}

/// Width of the stage-name column.
fn name_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(str::len).max().unwrap_or(0)
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(SHORT_HASH)]
}

/// One file inside an output that is not what it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum FileChange {
    /// Present on both sides with different content.
    Changed {
        /// Path inside the output.
        path: String,
        /// Recorded hash.
        expected: String,
        /// Hash now.
        actual: String,
    },
    /// Recorded but gone.
    Removed {
        /// Path inside the output.
        path: String,
    },
    /// Not recorded but present.
    Added {
        /// Path inside the output.
        path: String,
    },
}

impl fmt::Display for FileChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileChange::Changed {
                path,
                expected,
                actual,
            } => write!(
                f,
                "file {path} changed: expected {}, actual {}",
                short(expected),
                short(actual)
            ),
            FileChange::Removed { path } => write!(f, "file {path} is missing"),
            FileChange::Added { path } => write!(f, "file {path} was added"),
        }
    }
}

/// The files that differ between two listings of one output, leaving out those that
/// are not part of the output hash ([`UNHASHED_OUTPUTS`]).
pub fn file_changes(
    expected: &BTreeMap<String, FileDigest>,
    actual: &BTreeMap<String, FileDigest>,
) -> Vec<FileChange> {
    let paths: BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    paths
        .into_iter()
        .filter(|path| !UNHASHED_OUTPUTS.contains(&path.as_str()))
        .filter_map(|path| match (expected.get(path), actual.get(path)) {
            (Some(before), Some(now)) if before.hash != now.hash => Some(FileChange::Changed {
                path: path.clone(),
                expected: before.hash.clone(),
                actual: now.hash.clone(),
            }),
            (Some(_), None) => Some(FileChange::Removed { path: path.clone() }),
            (None, Some(_)) => Some(FileChange::Added { path: path.clone() }),
            _ => None,
        })
        .collect()
}

/// Something about one stage that is not as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum Finding {
    /// An input is gone.
    InputMissing {
        /// Input name.
        input: String,
        /// Where it comes from, as recorded.
        source: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// An input's content is not the recorded one.
    InputDiffers {
        /// Input name.
        input: String,
        /// Where it comes from, as recorded.
        source: String,
        /// Where it was read.
        path: PathBuf,
        /// Recorded hash.
        expected: String,
        /// Hash now.
        actual: String,
    },
    /// The output directory is gone.
    OutputMissing {
        /// The store directory.
        path: PathBuf,
    },
    /// The output's content is not the recorded one.
    OutputDiffers {
        /// The store directory.
        path: PathBuf,
        /// Recorded output hash.
        expected: String,
        /// Output hash now.
        actual: String,
        /// Which files differ from the manifest's list, when it still describes the
        /// recorded output.
        files: Vec<FileChange>,
    },
    /// The output's `manifest.json` is gone or unreadable, so the store no longer
    /// counts the output as finished.
    ManifestUnreadable {
        /// The manifest.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// The store entry holds a different output than the run recorded (it was replaced
    /// after the run, e.g. by `run --force`).
    ManifestReplaced {
        /// The manifest.
        path: PathBuf,
        /// Output hash the run recorded.
        expected: String,
        /// Output hash the manifest records.
        actual: String,
        /// When the replacing output finished.
        finished_at: String,
    },
    /// Something could not be read or the record lacks what a check needs.
    Unchecked {
        /// What could not be checked and why.
        message: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::InputMissing {
                input,
                source,
                path,
            } => write!(
                f,
                "input `{input}` ({source}) is missing: {}",
                path.display()
            ),
            Finding::InputDiffers {
                input,
                source,
                path,
                expected,
                actual,
            } => write!(
                f,
                "input `{input}` ({source}) differs: expected {}, actual {} ({})",
                short(expected),
                short(actual),
                path.display()
            ),
            Finding::OutputMissing { path } => {
                write!(f, "output is missing: {}", path.display())
            }
            Finding::OutputDiffers {
                path,
                expected,
                actual,
                ..
            } => write!(
                f,
                "output differs: expected {}, actual {} ({})",
                short(expected),
                short(actual),
                path.display()
            ),
            Finding::ManifestUnreadable { path, error } => {
                write!(f, "{} is unreadable: {error}", path.display())
            }
            Finding::ManifestReplaced {
                path,
                expected,
                actual,
                finished_at,
            } => write!(
                f,
                "the store entry was replaced after the run: {} records output {} (finished {finished_at}), the run recorded {}",
                path.display(),
                short(actual),
                short(expected)
            ),
            Finding::Unchecked { message } => write!(f, "cannot check: {message}"),
        }
    }
}

impl Finding {
    /// A few words for the stage's line: `input `src``, `output`, `manifest`.
    fn subject(&self) -> String {
        match self {
            Finding::InputMissing { input, .. } => format!("input `{input}` missing"),
            Finding::InputDiffers { input, .. } => format!("input `{input}` differs"),
            Finding::OutputMissing { .. } => "output missing".to_string(),
            Finding::OutputDiffers { files, .. } => {
                let names: Vec<&str> = files
                    .iter()
                    .map(|change| match change {
                        FileChange::Changed { path, .. }
                        | FileChange::Removed { path }
                        | FileChange::Added { path } => path.as_str(),
                    })
                    .collect();
                if names.is_empty() {
                    "output differs".to_string()
                } else {
                    format!("output differs ({})", names.join(", "))
                }
            }
            Finding::ManifestUnreadable { .. } => "manifest unreadable".to_string(),
            Finding::ManifestReplaced { .. } => "store entry replaced".to_string(),
            Finding::Unchecked { .. } => "unchecked".to_string(),
        }
    }
}

/// The audit of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageAudit {
    /// Stage name.
    pub name: String,
    /// Kind name.
    pub kind: String,
    /// Its status in the run.
    pub status: StageStatus,
    /// Whether it was checked: only stages the run cached or executed have outputs.
    pub audited: bool,
    /// What is not as recorded (empty: the stage is as the run left it).
    pub findings: Vec<Finding>,
}

impl StageAudit {
    /// Whether the stage was checked and something differs.
    pub fn differs(&self) -> bool {
        !self.findings.is_empty()
    }
}

/// The state of the pipeline file or a profile file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SourceState {
    /// Its content is as recorded.
    Unchanged,
    /// Its content changed.
    Changed {
        /// Hash now.
        actual: String,
    },
    /// It is gone.
    Missing,
    /// It cannot be read.
    Unreadable {
        /// Why.
        error: String,
    },
}

/// The pipeline file or a profile file, checked against its recorded hash.
#[derive(Debug, Clone, Serialize)]
pub struct SourceCheck {
    /// `pipeline` or `profile NAME`.
    pub role: String,
    /// Where it was looked for.
    pub path: PathBuf,
    /// Recorded hash.
    pub expected: String,
    /// What was found.
    #[serde(flatten)]
    pub state: SourceState,
}

impl fmt::Display for SourceCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            role,
            path,
            expected,
            state,
        } = self;
        let path = path.display();
        match state {
            SourceState::Unchanged => write!(f, "{role} {path}: unchanged"),
            SourceState::Changed { actual } => write!(
                f,
                "{role} {path} changed since the run: expected {}, actual {}",
                short(expected),
                short(actual)
            ),
            SourceState::Missing => write!(f, "{role} {path} is missing"),
            SourceState::Unreadable { error } => write!(f, "{role} {path} is unreadable: {error}"),
        }
    }
}

/// The result of [`audit`].
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// The run id.
    pub run_id: String,
    /// The run directory.
    pub run_dir: PathBuf,
    /// How the run ended (`succeeded`, `failed`, `interrupted`, or `running` if it died).
    pub run_status: RunStatus,
    /// The workspace root used.
    pub workspace: PathBuf,
    /// The recorded root, if the workspace moved.
    pub moved_from: Option<PathBuf>,
    /// The pipeline file and the profile files: warnings only, see the module doc.
    pub sources: Vec<SourceCheck>,
    /// Every recorded stage, upstream first.
    pub stages: Vec<StageAudit>,
}

impl AuditReport {
    /// Stages that were checked and differ.
    pub fn differing(&self) -> Vec<&StageAudit> {
        self.stages.iter().filter(|stage| stage.differs()).collect()
    }

    /// Whether every audited stage is as recorded (source-file warnings do not count).
    /// A record without stages (a run killed before writing its final record) proves
    /// nothing, so it does not pass.
    pub fn passed(&self) -> bool {
        !self.stages.is_empty() && self.differing().is_empty()
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit of run {} ({}), workspace {}",
            self.run_id,
            self.run_status,
            self.workspace.display()
        )?;
        if let Some(old) = &self.moved_from {
            write!(f, " (recorded at {})", old.display())?;
        }
        writeln!(f)?;
        for source in &self.sources {
            if source.state == SourceState::Unchanged {
                writeln!(f, "  {source}")?;
            } else {
                writeln!(
                    f,
                    "  warning: {source} (not counted as a difference: the run's settings are recorded in full)"
                )?;
            }
        }
        if self.stages.is_empty() {
            writeln!(
                f,
                "  no stage was recorded (the run ended before writing its final record)"
            )?;
        }
        let width = name_width(self.stages.iter().map(|stage| stage.name.as_str()));
        for stage in &self.stages {
            let kind = format!("({})", stage.kind);
            if !stage.audited {
                writeln!(
                    f,
                    "  {:<8} {:<width$} {kind}  not audited ({} in the run)",
                    "-",
                    stage.name,
                    stage.status.as_str()
                )?;
                continue;
            }
            if !stage.differs() {
                writeln!(f, "  {:<8} {:<width$} {kind}", "ok", stage.name)?;
                continue;
            }
            let subjects: Vec<String> = stage.findings.iter().map(Finding::subject).collect();
            writeln!(
                f,
                "  {:<8} {:<width$} {kind}  {}",
                "DIFFERS",
                stage.name,
                subjects.join("; ")
            )?;
            for finding in &stage.findings {
                writeln!(f, "      {}: {finding}", stage.name)?;
                if let Finding::OutputDiffers { files, .. } = finding {
                    for change in files {
                        writeln!(f, "        {change}")?;
                    }
                }
            }
        }
        let audited = self.stages.iter().filter(|stage| stage.audited).count();
        let differing = self.differing().len();
        if self.stages.is_empty() {
            writeln!(
                f,
                "audit FAILED: run {} ({}) recorded no stage to check; the stages it finished are listed in its logs.jsonl",
                self.run_id, self.run_status
            )
        } else if differing == 0 {
            writeln!(f, "audit passed: {audited} stage(s) as recorded")
        } else {
            writeln!(
                f,
                "audit FAILED: {differing} of {audited} audited stage(s) differ from the record"
            )
        }
    }
}

/// Hashes every input and output `run` recorded again and reports what differs.
pub fn audit(run: &Run) -> AuditReport {
    // In memory only: an audit reads every byte rather than trusting size and mtime.
    let hasher = ContentHasher::uncached();
    let record = &run.record;
    let stages = run
        .stage_order()
        .into_iter()
        .map(|name| {
            let stage = &record.stages[&name];
            let audited = is_audited(stage);
            let findings = if audited {
                let mut findings = check_inputs(run, &hasher, stage);
                findings.extend(check_output(run, &hasher, stage));
                findings
            } else {
                Vec::new()
            };
            StageAudit {
                kind: stage.kind.clone(),
                status: stage.status,
                audited,
                findings,
                name,
            }
        })
        .collect();
    AuditReport {
        run_id: record.run_id.clone(),
        run_dir: run.dir.clone(),
        run_status: record.status,
        workspace: run.root.clone(),
        moved_from: run.moved_from.clone(),
        sources: check_sources(run, &hasher),
        stages,
    }
}

fn check_inputs(run: &Run, hasher: &ContentHasher, stage: &StageRunRecord) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (name, input) in &stage.inputs {
        let source = input.source.to_string();
        let path = match &input.source {
            InputSource::Path { .. } => match stage.input_paths.get(name) {
                Some(path) => run.relocate(path),
                None => {
                    findings.push(Finding::Unchecked {
                        message: format!("input `{name}` ({source}): the run recorded no path"),
                    });
                    continue;
                }
            },
            InputSource::Stage {
                stage: upstream,
                subpath,
            } => {
                let Some(dir) = run
                    .record
                    .stages
                    .get(upstream)
                    .and_then(|upstream| upstream.output.as_ref())
                else {
                    findings.push(Finding::Unchecked {
                        message: format!(
                            "input `{name}` ({source}): the run recorded no output for stage `{upstream}`"
                        ),
                    });
                    continue;
                };
                let dir = run.store_path(dir);
                match subpath {
                    Some(subpath) => dir.join(subpath),
                    None => dir,
                }
            }
        };
        // Store paths are shown relative to the workspace, external ones as recorded.
        let shown = match &input.source {
            InputSource::Stage { .. } => run.shown(&path),
            InputSource::Path { .. } => path.clone(),
        };
        if matches!(fs::metadata(&path), Err(error) if error.kind() == io::ErrorKind::NotFound) {
            findings.push(Finding::InputMissing {
                input: name.clone(),
                source,
                path: shown,
            });
            continue;
        }
        // A whole upstream output is hashed as the executor hashed it (its manifest and
        // log left out); a file or folder inside one, or an external input, by content.
        let hashed = match &input.source {
            InputSource::Stage { subpath: None, .. } => {
                store::hash_output(hasher, &path, UNHASHED_OUTPUTS).map(|(hash, _)| hash)
            }
            // Through the whole output, so that links are hashed as the executor did.
            InputSource::Stage {
                subpath: Some(subpath),
                ..
            } => {
                let entry = path
                    .ancestors()
                    .nth(Path::new(subpath).components().count())
                    .unwrap_or(&path);
                store::output_files(hasher, entry).and_then(|files| {
                    store::subpath_hash(&files, subpath).ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no `{subpath}` in the output"),
                        )
                    })
                })
            }
            InputSource::Path { .. } => hasher.hash_path(&path),
        };
        match hashed {
            Ok(actual) if actual == input.hash => {}
            Ok(actual) => findings.push(Finding::InputDiffers {
                input: name.clone(),
                source,
                path: shown,
                expected: input.hash.clone(),
                actual,
            }),
            Err(error) => findings.push(Finding::Unchecked {
                message: format!("input `{name}` ({source}): {error}"),
            }),
        }
    }
    findings
}

fn check_output(run: &Run, hasher: &ContentHasher, stage: &StageRunRecord) -> Vec<Finding> {
    let (Some(recorded_dir), Some(expected)) = (&stage.output, &stage.output_hash) else {
        return vec![Finding::Unchecked {
            message: "the run recorded no output for this stage".to_string(),
        }];
    };
    let dir = run.store_path(recorded_dir);
    if !dir.is_dir() {
        return vec![Finding::OutputMissing {
            path: run.shown(&dir),
        }];
    }
    let manifest_path = run.shown(&dir.join(MANIFEST));
    let manifest: Result<Manifest, String> = fs::read(dir.join(MANIFEST))
        .map_err(|error| error.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|error| error.to_string()));
    let mut findings = Vec::new();
    // The manifest's file list describes the recorded output only if it is the same
    // output; a replaced entry is reported as such instead.
    let listing = match manifest {
        Ok(manifest) if manifest.output_hash == *expected => Some(manifest.files),
        Ok(manifest) => {
            findings.push(Finding::ManifestReplaced {
                path: manifest_path,
                expected: expected.clone(),
                actual: manifest.output_hash,
                finished_at: manifest.finished_at,
            });
            None
        }
        Err(error) => {
            findings.push(Finding::ManifestUnreadable {
                path: manifest_path,
                error,
            });
            None
        }
    };
    match store::hash_output(hasher, &dir, UNHASHED_OUTPUTS) {
        Ok((actual, _)) if actual == *expected => {}
        Ok((actual, files)) => findings.push(Finding::OutputDiffers {
            path: run.shown(&dir),
            expected: expected.clone(),
            actual,
            files: listing
                .map(|listing| file_changes(&listing, &files))
                .unwrap_or_default(),
        }),
        Err(error) => findings.push(Finding::Unchecked {
            message: format!("output {}: {error}", dir.display()),
        }),
    }
    findings
}

fn check_sources(run: &Run, hasher: &ContentHasher) -> Vec<SourceCheck> {
    let pipeline = &run.record.pipeline;
    let pipeline_path = run.relocate(&pipeline.absolute_path);
    let mut checks = vec![check_source(
        hasher,
        "pipeline".to_string(),
        pipeline_path,
        &pipeline.file.hash,
    )];
    let cwd = run_cwd(pipeline);
    for profile in &run.record.profiles {
        // An inline profile lives in the pipeline file, checked above.
        if profile.inline {
            continue;
        }
        let path = match (&cwd, profile.file.path.is_absolute()) {
            // `components` drops the `./` a path may have been given with.
            (Some(cwd), false) => cwd.join(&profile.file.path).components().collect(),
            _ => profile.file.path.clone(),
        };
        checks.push(check_source(
            hasher,
            format!("profile {}", profile.name),
            run.relocate(&path),
            &profile.file.hash,
        ));
    }
    checks
}

fn check_source(
    hasher: &ContentHasher,
    role: String,
    path: PathBuf,
    expected: &str,
) -> SourceCheck {
    let state = match hasher.hash_file(&path) {
        Ok(digest) if digest.hash == expected => SourceState::Unchanged,
        Ok(digest) => SourceState::Changed {
            actual: digest.hash,
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => SourceState::Missing,
        Err(error) => SourceState::Unreadable {
            error: error.to_string(),
        },
    };
    SourceCheck {
        role,
        path,
        expected: expected.to_string(),
        state,
    }
}

/// The directory the run was started from, worked out from the pipeline path as given
/// and made absolute; relative profile paths are relative to it.
fn run_cwd(pipeline: &PipelineRecord) -> Option<PathBuf> {
    let given = &pipeline.file.path;
    if given.is_absolute() {
        return None;
    }
    let depth = given
        .components()
        .filter(|component| !matches!(component, Component::CurDir))
        .count();
    let mut cwd = pipeline.absolute_path.clone();
    for _ in 0..depth {
        if !cwd.pop() {
            return None;
        }
    }
    Some(cwd)
}

/// How to reproduce a run.
#[derive(Debug, Clone, Default)]
pub struct ReproduceOptions {
    /// The workspace to reproduce into: must not exist or be empty, and is kept.
    /// Without it a directory under the system temp dir is used and removed afterwards.
    pub into: Option<PathBuf>,
    /// Stages run at the same time.
    pub jobs: usize,
    /// Print the executor's progress lines to stderr.
    pub progress: bool,
    /// The command line, for the reproduction's run record.
    pub command_line: Vec<String>,
}

/// What reproducing one stage gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The same output hash as recorded.
    Identical {
        /// The output hash.
        hash: String,
    },
    /// A different output hash.
    Differs {
        /// Recorded output hash.
        expected: String,
        /// Reproduced output hash.
        actual: String,
        /// Which files differ, when the original output's manifest is still there.
        files: Vec<FileChange>,
    },
    /// The reproduction did not produce an output for it.
    Failed {
        /// What happened to it in the reproduction; `None` when it was not part of it.
        status: Option<StageStatus>,
        /// The error, if any.
        error: Option<String>,
    },
    /// It had no output in the run, so there is nothing to compare.
    NotReproduced,
}

/// The reproduction of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageReproduction {
    /// Stage name.
    pub name: String,
    /// Kind name.
    pub kind: String,
    /// Its status in the original run.
    pub status: StageStatus,
    /// The comparison.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Why its fingerprint differs from the recorded one (empty when it is the same):
    /// an input changed since the run, or the kind's implementation did.
    pub fingerprint_changes: Vec<String>,
}

impl StageReproduction {
    /// Whether the reproduction differs from the run (or failed where the run did not).
    pub fn differs(&self) -> bool {
        matches!(
            self.verdict,
            Verdict::Differs { .. } | Verdict::Failed { .. }
        )
    }
}

/// The result of [`reproduce`].
#[derive(Debug, Clone, Serialize)]
pub struct Reproduction {
    /// The workspace it ran in.
    pub workspace: PathBuf,
    /// Whether that workspace was kept (`--into`) or removed.
    pub kept: bool,
    /// The reproduction's own run directory.
    pub run_dir: Option<PathBuf>,
    /// Whether it was stopped by Ctrl-C / SIGTERM.
    pub interrupted: bool,
    /// Every recorded stage, upstream first.
    pub stages: Vec<StageReproduction>,
}

impl Reproduction {
    /// Stages whose reproduction differs from the run.
    pub fn differing(&self) -> Vec<&StageReproduction> {
        self.stages.iter().filter(|stage| stage.differs()).collect()
    }

    /// Whether every stage with an output reproduced bit for bit.
    pub fn passed(&self) -> bool {
        !self.interrupted && self.differing().is_empty()
    }
}

impl fmt::Display for Reproduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = if self.kept {
            self.workspace.display().to_string()
        } else {
            format!(
                "{} (removed; --into DIR keeps it)",
                self.workspace.display()
            )
        };
        writeln!(f, "reproduction in {place}")?;
        let width = name_width(self.stages.iter().map(|stage| stage.name.as_str()));
        for stage in &self.stages {
            let kind = format!("({})", stage.kind);
            let name = &stage.name;
            match &stage.verdict {
                Verdict::Identical { hash } => writeln!(
                    f,
                    "  {:<9} {name:<width$} {kind}  {}",
                    "identical",
                    short(hash)
                )?,
                Verdict::Differs {
                    expected,
                    actual,
                    files,
                } => {
                    writeln!(
                        f,
                        "  {:<9} {name:<width$} {kind}  output: expected {}, actual {}",
                        "DIFFERS",
                        short(expected),
                        short(actual)
                    )?;
                    for change in files {
                        writeln!(f, "      {name}: {change}")?;
                    }
                }
                Verdict::Failed { status, error } => {
                    let status = status.map_or("missing", StageStatus::as_str);
                    writeln!(
                        f,
                        "  {:<9} {name:<width$} {kind}  {status} in the reproduction",
                        "FAILED"
                    )?;
                    if let Some(error) = error {
                        for line in error.lines() {
                            writeln!(f, "      {line}")?;
                        }
                    }
                }
                Verdict::NotReproduced => writeln!(
                    f,
                    "  {:<9} {name:<width$} {kind}  not reproduced ({} in the run)",
                    "-",
                    stage.status.as_str()
                )?,
            }
            for change in &stage.fingerprint_changes {
                writeln!(
                    f,
                    "      {name}: fingerprint differs from the run's: {change}"
                )?;
            }
        }
        let compared = self
            .stages
            .iter()
            .filter(|stage| stage.verdict != Verdict::NotReproduced)
            .count();
        let differing = self.differing().len();
        if self.interrupted {
            writeln!(f, "reproduction INTERRUPTED")
        } else if differing == 0 {
            writeln!(
                f,
                "reproduction passed: {compared} stage(s) bit-identical to the run"
            )
        } else {
            writeln!(
                f,
                "reproduction FAILED: {differing} of {compared} stage(s) differ from the run"
            )
        }
    }
}

/// Runs the recorded settings of `run` again in a fresh workspace and compares every
/// stage's output hash with the record. The original workspace is only read.
///
/// The recorded `settings` (name, seed, every stage's kind, inputs and resolved `with`)
/// are written as the pipeline file of the new workspace, external inputs replaced by
/// the absolute paths the run recorded, and that file is run like any other (without
/// profiles or `TRAINYARD_*` variables: the values are already resolved). Only stages
/// the run cached or executed are included, so a run made with `--until` reproduces
/// the same part of the pipeline.
pub fn reproduce(
    run: &Run,
    options: &ReproduceOptions,
    cancel: &CancelFlag,
) -> Result<Reproduction, AuditError> {
    let (dir, kept) = match &options.into {
        Some(into) => (into.clone(), true),
        None => (
            std::env::temp_dir().join(format!(
                "trainyard-reproduce-{}-{}",
                run.record.run_id,
                std::process::id()
            )),
            false,
        ),
    };
    prepare_empty_dir(&dir)?;
    let result = reproduce_in(run, &dir, options, cancel);
    let workspace = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    if !kept && let Err(error) = fs::remove_dir_all(&dir) {
        tracing::warn!("cannot remove {}: {error}", dir.display());
    }
    let (stages, run_dir, interrupted) = result?;
    Ok(Reproduction {
        workspace,
        kept,
        run_dir: run_dir.filter(|_| kept),
        interrupted,
        stages,
    })
}

fn prepare_empty_dir(dir: &Path) -> Result<(), AuditError> {
    let into_error = |message: String| AuditError::Into {
        path: dir.to_path_buf(),
        message,
    };
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(into_error(
                    "not empty; a reproduction needs a fresh workspace (an existing store would answer from its cache)".to_string(),
                ));
            }
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir)
            .map_err(|error| into_error(format!("cannot create it: {error}"))),
        Err(error) => Err(into_error(error.to_string())),
    }
}

type Reproduced = (Vec<StageReproduction>, Option<PathBuf>, bool);

fn reproduce_in(
    run: &Run,
    dir: &Path,
    options: &ReproduceOptions,
    cancel: &CancelFlag,
) -> Result<Reproduced, AuditError> {
    let record_path = run.dir.join(RECORD_FILE);
    let values = reproduction_values(run).map_err(|message| AuditError::Invalid {
        path: record_path.clone(),
        message,
    })?;
    let yaml = serde_norway::to_string(&values).map_err(|error| AuditError::Invalid {
        path: record_path,
        message: format!("cannot write the recorded settings as YAML: {error}"),
    })?;
    let pipeline_file = dir.join(REPRODUCE_PIPELINE);
    let text = format!(
        "# The recorded settings of run {} ({}), external inputs made absolute,\n# written by `trainyard audit --reproduce`.\n{yaml}",
        run.record.run_id,
        run.dir.display()
    );
    fs::write(&pipeline_file, text).map_err(|source| AuditError::Io {
        context: format!("writing {}", pipeline_file.display()),
        source,
    })?;
    let pipeline = config::load(&pipeline_file, &LoadOptions::default())?;
    let dag = dag::build(&pipeline)?;
    let workspace = Workspace::new(dir).map_err(|source| AuditError::Io {
        context: format!("opening the workspace {}", dir.display()),
        source,
    })?;
    let run_options = RunOptions {
        jobs: options.jobs.max(1),
        progress: options.progress,
        command_line: options.command_line.clone(),
        wait_for_lock: false,
        ..RunOptions::default()
    };
    let report = executor::run(&workspace, &pipeline, &dag, &run_options, cancel)?;

    let stages = run
        .stage_order()
        .into_iter()
        .map(|name| {
            let recorded = &run.record.stages[&name];
            let mut reproduction = StageReproduction {
                name: name.clone(),
                kind: recorded.kind.clone(),
                status: recorded.status,
                verdict: Verdict::NotReproduced,
                fingerprint_changes: Vec::new(),
            };
            if !is_audited(recorded) {
                return reproduction;
            }
            let Some(stage) = report.stage(&name) else {
                reproduction.verdict = Verdict::Failed {
                    status: None,
                    error: Some("the reproduction did not include this stage".to_string()),
                };
                return reproduction;
            };
            if let Some(identity) = &stage.identity
                && stage.fingerprint != recorded.fingerprint
            {
                let reasons =
                    fingerprint::explain(&run.recorded_identity(&name, recorded), identity);
                reproduction.fingerprint_changes = if reasons.is_empty() {
                    vec!["its settings no longer serialise the same way".to_string()]
                } else {
                    reasons.iter().map(ToString::to_string).collect()
                };
            }
            reproduction.verdict = match (&stage.output, &recorded.output_hash) {
                (Some((_, manifest)), Some(expected)) if manifest.output_hash == *expected => {
                    Verdict::Identical {
                        hash: manifest.output_hash.clone(),
                    }
                }
                (Some((_, manifest)), expected) => Verdict::Differs {
                    expected: expected.clone().unwrap_or_default(),
                    actual: manifest.output_hash.clone(),
                    files: original_files(run, recorded)
                        .map(|files| file_changes(&files, &manifest.files))
                        .unwrap_or_default(),
                },
                (None, _) => Verdict::Failed {
                    status: Some(stage.status),
                    error: stage.error.clone(),
                },
            };
            reproduction
        })
        .collect();
    let interrupted = report.outcome == RunStatus::Interrupted
        || report
            .stages
            .iter()
            .any(|stage| stage.status == StageStatus::Interrupted);
    Ok((stages, report.run_dir, interrupted))
}

/// The recorded `settings` with only the stages that have an output, and every
/// external input replaced by the absolute path the run read it from.
fn reproduction_values(run: &Run) -> Result<serde_json::Value, String> {
    let mut values = run.record.settings.clone();
    let stages = values
        .get_mut("stages")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or("`settings.stages` is missing")?;
    stages.retain(|name, _| run.record.stages.get(name).is_some_and(is_audited));
    if stages.is_empty() {
        return Err("the run has no stage with an output to reproduce".to_string());
    }
    for (name, stage) in stages.iter_mut() {
        let recorded = &run.record.stages[name];
        for (input, record) in &recorded.inputs {
            if !matches!(record.source, InputSource::Path { .. }) {
                continue;
            }
            let path = recorded
                .input_paths
                .get(input)
                .map(|path| run.relocate(path))
                .ok_or_else(|| format!("stage `{name}`: no path recorded for input `{input}`"))?;
            let path = path.to_str().ok_or_else(|| {
                format!("stage `{name}`: input path {} is not UTF-8", path.display())
            })?;
            let slot = stage
                .get_mut("inputs")
                .and_then(serde_json::Value::as_object_mut)
                .and_then(|inputs| inputs.get_mut(input))
                .ok_or_else(|| format!("`settings.stages.{name}.inputs.{input}` is missing"))?;
            *slot = serde_json::Value::String(path.to_string());
        }
    }
    // The values are resolved: a `${` left in them is literal text and must not be read
    // as a variable when the pipeline is loaded again.
    config::vars::escape_resolved(&mut values);
    // A reproduction runs here, whatever executor the run used.
    if let Some(values) = values.as_object_mut() {
        values.remove("executor");
    }
    Ok(values)
}

/// The file listing of a stage's original output, if its manifest still describes it.
fn original_files(run: &Run, stage: &StageRunRecord) -> Option<BTreeMap<String, FileDigest>> {
    let dir = run.store_path(stage.output.as_ref()?);
    let bytes = fs::read(dir.join(MANIFEST)).ok()?;
    let manifest: Manifest = serde_json::from_slice(&bytes).ok()?;
    (Some(&manifest.output_hash) == stage.output_hash.as_ref()).then_some(manifest.files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(hash: &str) -> FileDigest {
        FileDigest {
            hash: hash.to_string(),
            size: 1,
        }
    }

    #[test]
    fn file_changes_ignore_the_log_and_name_changed_added_and_removed_files() {
        let expected = BTreeMap::from([
            ("a.txt".to_string(), digest("1")),
            ("b.txt".to_string(), digest("2")),
            ("stage.log".to_string(), digest("3")),
        ]);
        let actual = BTreeMap::from([
            ("a.txt".to_string(), digest("1")),
            ("c.txt".to_string(), digest("4")),
            ("stage.log".to_string(), digest("5")),
        ]);
        assert_eq!(
            file_changes(&expected, &actual),
            [
                FileChange::Removed {
                    path: "b.txt".into()
                },
                FileChange::Added {
                    path: "c.txt".into()
                },
            ]
        );
    }

    #[test]
    fn run_cwd_strips_the_pipeline_path_as_given() {
        let record = |given: &str, absolute: &str| PipelineRecord {
            name: "p".into(),
            file: config::SourceRecord {
                path: given.into(),
                hash: String::new(),
            },
            absolute_path: absolute.into(),
        };
        assert_eq!(
            run_cwd(&record("./pipelines/p.yaml", "/w/pipelines/p.yaml")),
            Some(PathBuf::from("/w"))
        );
        assert_eq!(run_cwd(&record("/w/p.yaml", "/w/p.yaml")), None);
    }
}
