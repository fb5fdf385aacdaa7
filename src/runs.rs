//! Run records: every `trainyard run` leaves `runs/<run-id>/` with
//! `resolved_settings.json` (enough to audit and reproduce the run), `logs.jsonl`
//! (structured events) and `outputs/<stage>` links into the store; `runs/latest`
//! points at the newest run.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::atomic_file::replace_file;
use crate::config::{ProfileRecord, SourceRecord};
use crate::fingerprint::InputRecord;
use crate::store::Workspace;

/// Version of trainyard, recorded in every run and manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git commit trainyard was built from (`unknown` outside a git checkout).
pub const BUILD_COMMIT: &str = env!("TRAINYARD_GIT_COMMIT");

/// Name of the run record inside `runs/<run-id>/`.
pub const RECORD_FILE: &str = "resolved_settings.json";

/// RFC 3339 timestamp with milliseconds, UTC.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The format of `resolved_settings.json` this trainyard writes and reads.
pub const RECORD_FORMAT: u32 = 1;

/// How a run ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still running, or killed before it could say otherwise.
    Running,
    /// Every selected stage is cached or executed.
    Succeeded,
    /// A stage failed (or was skipped because of a failure).
    Failed,
    /// Stopped by Ctrl-C, SIGTERM or SIGHUP, or found killed by a later run.
    Interrupted,
}

impl RunStatus {
    /// The name as recorded and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a stage in a run (recorded with `_` for spaces: `will_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Its output was already in the store.
    Cached,
    /// It ran and succeeded.
    Executed,
    /// It would run (status / dry run).
    WillRun,
    /// It ran and failed.
    Failed,
    /// It did not run because something upstream failed or the run stopped.
    Skipped,
    /// It was stopped by Ctrl-C / SIGTERM.
    Interrupted,
    /// Outside `--only` / `--until`.
    NotSelected,
    /// Its Slurm job was submitted and had not finished when `run --detach` returned;
    /// `trainyard status` settles it later.
    Submitted,
}

impl StageStatus {
    /// Lower-case name as shown on the console.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Cached => "cached",
            StageStatus::Executed => "executed",
            StageStatus::WillRun => "will run",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::Interrupted => "interrupted",
            StageStatus::NotSelected => "not selected",
            StageStatus::Submitted => "submitted",
        }
    }

    /// Whether the stage has an output the run used (what an audit can check).
    pub fn has_output(self) -> bool {
        matches!(self, StageStatus::Cached | StageStatus::Executed)
    }
}

/// The content of `resolved_settings.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Format version of this file.
    pub format: u32,
    /// The run's id (its directory name).
    pub run_id: String,
    /// How it ended.
    pub status: RunStatus,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once finished.
    pub finished_at: Option<String>,
    /// The command line.
    pub command_line: Vec<String>,
    /// trainyard's version and build commit.
    pub trainyard: ToolRecord,
    /// The workspace root and its git commit, if it is a git checkout.
    pub workspace: WorkspaceRecord,
    /// Pipeline name and file (with hash).
    pub pipeline: PipelineRecord,
    /// Profiles applied, in order, with their files' hashes.
    pub profiles: Vec<ProfileRecord>,
    /// The resolved values (`name`, `seed`, `stages`).
    pub settings: serde_json::Value,
    /// Where each resolved value came from, by key path.
    pub origins: BTreeMap<String, String>,
    /// Per stage, in run order.
    pub stages: BTreeMap<String, StageRunRecord>,
    /// The machine it ran on.
    pub machine: MachineRecord,
}

/// trainyard itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolRecord {
    /// Crate version.
    pub version: String,
    /// Build commit.
    pub git_commit: String,
}

/// The workspace a run used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    /// Absolute root.
    pub root: PathBuf,
    /// HEAD commit of the git repository containing the root, if any.
    pub git_commit: Option<String>,
}

/// The pipeline a run used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineRecord {
    /// `name:`.
    pub name: String,
    /// The file and its hash.
    pub file: SourceRecord,
    /// Absolute path of the file.
    pub absolute_path: PathBuf,
}

/// What happened to one stage in a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRunRecord {
    /// Kind name.
    pub kind: String,
    /// Kind implementation version.
    pub kind_version: u32,
    /// What happened to it.
    pub status: StageStatus,
    /// Fingerprint, once its inputs were known.
    pub fingerprint: Option<String>,
    /// Inputs with their hashes.
    pub inputs: BTreeMap<String, InputRecord>,
    /// Absolute paths of external inputs, for audits.
    pub input_paths: BTreeMap<String, PathBuf>,
    /// The `hf:org/name[@revision]` inputs: the id, the revision and commit it resolved
    /// to, and the snapshot directory read (also in `input_paths`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hub_models: BTreeMap<String, crate::hf_cache::Snapshot>,
    /// Store directory of the output, relative to the workspace root.
    pub output: Option<PathBuf>,
    /// Hash of the output.
    pub output_hash: Option<String>,
    /// Seconds spent executing (0 when cached).
    pub duration_s: Option<f64>,
    /// Why it ran (or would run).
    pub reasons: Vec<String>,
    /// The error, if it failed.
    pub error: Option<String>,
    /// Where it ran, for a stage that ran (or was submitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<StageExecution>,
}

/// Where and how a stage ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageExecution {
    /// `local` or `slurm`.
    pub executor: String,
    /// The Slurm job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The host it ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What its Slurm job asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<crate::config::Resources>,
    /// What it used, as far as it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<ResourcesUsed>,
}

/// What a stage's job used: measured by the stage's own process, and what Slurm
/// reported (`sacct` where accounting is on, else `scontrol show job`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourcesUsed {
    /// Wall time of the stage in the job, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Peak resident memory of the `exec-stage` process, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rss_bytes: Option<u64>,
    /// CPUs Slurm allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory Slurm allocated, as it reports it (`1G`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// The job's final state (`COMPLETED`, `FAILED`, `CANCELLED`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The job's exit code as Slurm reports it (`0:0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<String>,
    /// Times Slurm started it (more than 1 after a requeue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts: Option<u32>,
}

/// The machine a run used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineRecord {
    /// Host name.
    pub host: String,
    /// OS family and release name.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// CPU model.
    pub cpu: String,
    /// Logical cores available.
    pub cores: usize,
    /// Total memory in bytes, if known.
    pub memory_bytes: Option<u64>,
}

impl MachineRecord {
    /// Describes this machine.
    pub fn detect() -> MachineRecord {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let os_release = read("/etc/os-release");
        let pretty = os_release
            .lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME="))
            .map(|name| name.trim_matches('"').to_string());
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|line| {
                line.strip_prefix("model name")
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let memory_bytes = read("/proc/meminfo").lines().find_map(|line| {
            let kib: u64 = line
                .strip_prefix("MemTotal:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        });
        MachineRecord {
            host: host_name(),
            os: match pretty {
                Some(name) => format!("{} ({name})", std::env::consts::OS),
                None => std::env::consts::OS.to_string(),
            },
            arch: std::env::consts::ARCH.to_string(),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_bytes,
        }
    }
}

/// This machine's host name.
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// HEAD commit of the git repository containing `dir`, read from `.git` directly
/// (spawning git would cost more than a whole no-op run).
pub fn git_commit(dir: &Path) -> Option<String> {
    let mut current = Some(dir);
    while let Some(candidate) = current {
        let dot_git = candidate.join(".git");
        let git_dir = if dot_git.is_dir() {
            Some(dot_git)
        } else if dot_git.is_file() {
            let pointer = fs::read_to_string(&dot_git).ok()?;
            pointer
                .strip_prefix("gitdir:")
                .map(|path| candidate.join(path.trim()))
        } else {
            None
        };
        if let Some(git_dir) = git_dir {
            let head = fs::read_to_string(git_dir.join("HEAD")).ok()?;
            let head = head.trim();
            let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
                return Some(head.to_string());
            };
            let common = fs::read_to_string(git_dir.join("commondir"))
                .map(|common| git_dir.join(common.trim()))
                .unwrap_or_else(|_| git_dir.clone());
            for base in [&git_dir, &common] {
                if let Ok(commit) = fs::read_to_string(base.join(reference)) {
                    return Some(commit.trim().to_string());
                }
            }
            let packed = fs::read_to_string(common.join("packed-refs")).ok()?;
            return packed.lines().find_map(|line| {
                let (commit, name) = line.split_once(' ')?;
                (name == reference).then(|| commit.to_string())
            });
        }
        current = candidate.parent();
    }
    None
}

/// Marks the newest run's record `interrupted` (and its `running` stages) when it
/// still says `running`: the process that wrote it was killed before it could finish
/// the record. Called with the workspace lock held, so no live run can own that
/// record. Returns the run's id when it marked one.
pub fn mark_killed_run(workspace: &Workspace) -> io::Result<Option<String>> {
    let runs = workspace.runs_dir();
    let Ok(entries) = fs::read_dir(&runs) else {
        return Ok(None);
    };
    // Run ids start with their UTC start time, so the newest sorts last.
    let newest = entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .max();
    let Some(id) = newest else {
        return Ok(None);
    };
    let path = runs.join(&id).join(RECORD_FILE);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(None);
    };
    // The status alone first: the record of a big pipeline is megabytes, and it is
    // read this way at the start of every run.
    #[derive(Deserialize)]
    struct StatusOnly {
        status: Option<RunStatus>,
    }
    match serde_json::from_str::<StatusOnly>(&text) {
        Ok(StatusOnly {
            status: Some(RunStatus::Running),
        }) => {}
        _ => return Ok(None),
    }
    // As JSON, not a RunRecord: a record written by another version keeps every field.
    let Ok(mut record) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    record["status"] = serde_json::json!(RunStatus::Interrupted);
    let bytes = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
    replace_file(&path, &bytes, true)?;
    Ok(Some(id))
}

/// An open run directory.
#[derive(Debug)]
pub struct RunRecorder {
    /// The run id.
    pub id: String,
    /// `runs/<id>/`.
    pub dir: PathBuf,
    log: Mutex<EventLog>,
}

/// `outputs/.s` links to the store, and each stage's link goes through it
/// (`.s/<stage>/<fingerprint>`): a target that short fits in the link's inode on ext4
/// (under 60 bytes, for stage names up to 23 characters), where the full relative path
/// (`../../../.trainyard/store/…`) needs a 4 KiB block per link — 40 MB and a tenth of a
/// second for every no-op run of a 10,000-stage pipeline. Stage names never start with
/// a dot, so it cannot clash with one.
const STORE_LINK: &str = ".s";
/// The store, relative to the workspace root.
const STORE_FROM_ROOT: &str = ".trainyard/store";

/// The event that [`RunRecorder::event`] batches: the one every stage of a no-op run has.
const BATCHED_EVENT: &str = "stage_cached";
/// Batched events are written once they reach this size.
const EVENT_BATCH_BYTES: usize = 64 * 1024;

/// `logs.jsonl` and the lines not yet written to it.
#[derive(Debug)]
struct EventLog {
    file: File,
    pending: Vec<u8>,
}

impl EventLog {
    fn flush(&mut self) {
        let _ = self.file.write_all(&self.pending);
        self.pending.clear();
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.flush();
    }
}

impl RunRecorder {
    /// Creates `runs/<id>/` with an id from the current time and the pipeline name.
    pub fn create(workspace: &Workspace, pipeline_name: &str) -> io::Result<RunRecorder> {
        let runs = workspace.runs_dir();
        fs::create_dir_all(&runs)?;
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replace(':', "-");
        let safe_name: String = pipeline_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let base = format!("{stamp}-{safe_name}");
        let mut attempt = 1;
        let (id, dir) = loop {
            let id = if attempt == 1 {
                base.clone()
            } else {
                format!("{base}-{attempt}")
            };
            let dir = runs.join(&id);
            match fs::create_dir(&dir) {
                Ok(()) => break (id, dir),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => attempt += 1,
                Err(error) => return Err(error),
            }
        };
        fs::create_dir(dir.join("outputs"))?;
        std::os::unix::fs::symlink(
            Path::new("../../..").join(STORE_FROM_ROOT),
            dir.join("outputs").join(STORE_LINK),
        )?;
        // Appending: on the Slurm executor, jobs on other nodes append their stages'
        // events to the same file while this process still writes its own.
        let file = fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(dir.join("logs.jsonl"))?;
        Ok(RunRecorder {
            id,
            dir,
            log: Mutex::new(EventLog {
                file,
                pending: Vec::new(),
            }),
        })
    }

    /// Opens the existing run directory `dir` to append events to its `logs.jsonl` and
    /// link outputs into it (a Slurm job's `exec-stage` on a node).
    pub fn open(dir: &Path) -> io::Result<RunRecorder> {
        let id = dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| io::Error::other(format!("{} is not a run directory", dir.display())))?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(dir.join("logs.jsonl"))?;
        Ok(RunRecorder {
            id,
            dir: dir.to_path_buf(),
            log: Mutex::new(EventLog {
                file,
                pending: Vec::new(),
            }),
        })
    }

    /// Appends one structured event to `logs.jsonl`.
    pub fn event(&self, event: &str, fields: serde_json::Value) {
        let mut line = serde_json::json!({ "time": timestamp(SystemTime::now()), "event": event });
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        let mut text = line.to_string();
        text.push('\n');
        if let Ok(mut log) = self.log.lock() {
            // Whole lines only, so each write is a run of complete appends. A cached
            // stage's event waits for the next other event (or the end of the run, or
            // 64 KiB of them): a no-op run of ten thousand stages would otherwise make
            // ten thousand writes. Losing a log line must not fail a run whose outputs
            // are fine.
            log.pending.extend_from_slice(text.as_bytes());
            if event != BATCHED_EVENT || log.pending.len() >= EVENT_BATCH_BYTES {
                log.flush();
            }
        }
    }

    /// Points `outputs/<stage>` at the stage's store directory, relatively when the
    /// store is inside the workspace, so a moved workspace keeps working links. A store
    /// entry is reached through `outputs/.s` (see [`STORE_LINK`]).
    pub fn link_output(&self, workspace: &Workspace, stage: &str, target: &Path) -> io::Result<()> {
        let link = self.dir.join("outputs").join(stage);
        let target = match target.strip_prefix(&workspace.root) {
            Ok(inside) => match inside.strip_prefix(STORE_FROM_ROOT) {
                Ok(entry) => Path::new(STORE_LINK).join(entry),
                Err(_) => Path::new("../../..").join(inside),
            },
            Err(_) => target.to_path_buf(),
        };
        // The run directory is new, so a link is there only if this stage was linked
        // before in this run: replace it then, rather than try an unlink every time.
        match std::os::unix::fs::symlink(&target, &link) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&link)?;
                std::os::unix::fs::symlink(target, link)
            }
            result => result,
        }
    }

    /// Writes `resolved_settings.json` atomically, so a crash leaves the previous one;
    /// `durable` also syncs it (the final record; the one written at the start only
    /// has to exist if the run dies).
    pub fn write_record(&self, record: &RunRecord, durable: bool) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        replace_file(&self.dir.join(RECORD_FILE), &bytes, durable)
    }

    /// Points `runs/latest` at this run.
    pub fn mark_latest(&self) -> io::Result<()> {
        let runs = self
            .dir
            .parent()
            .ok_or_else(|| io::Error::other("run directory has no parent"))?;
        let temp = runs.join(format!(".latest.{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        std::os::unix::fs::symlink(&self.id, &temp)?;
        fs::rename(temp, runs.join("latest"))
    }
}
