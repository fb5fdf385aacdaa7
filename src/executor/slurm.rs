//! The Slurm executor (`executor: { kind: slurm }`, or `run --executor slurm`): every
//! stage that must run becomes one `sbatch` job, submitted all at once with
//! `--dependency=afterok:` on the jobs of its upstream stages, so Slurm orders the DAG.
//!
//! What a job runs is `trainyard exec-stage JOB`: JOB names a job description that the
//! submitter wrote into the workspace (`.trainyard/slurm/jobs/JOB.json`, named by the
//! blake3 of its bytes), which points at the run's frozen pipeline (every resolved
//! value, external inputs made absolute: `runs/<id>/slurm/pipeline.yaml`). On the node
//! the same walk as a local run decides and executes that one stage (its upstream
//! outputs are in the store by then) and publishes into the same store with the same
//! atomic rename. A stage's fingerprint includes its upstream outputs' hashes, so it is
//! known at submission only when its inputs are; the node computes it either way.
//!
//! The node leaves `runs/<id>/slurm/<stage>.result.json` (the stage's run record and
//! what it used); the submitter waits on `squeue`, reads those, and shows progress. A
//! failed job fails its stage with the tail of its Slurm log; Ctrl-C on the submitter
//! scancels its jobs. A training stage stops cleanly on SIGTERM (scancel, preemption)
//! and on the SIGUSR1 that `--signal=B:USR1@N` sends before the time limit, when it
//! also requeues its own job: either way its checkpoint is kept and the next start
//! resumes from it, exactly as a local run does.
//!
//! The store and the workspace must be on a filesystem every node mounts at the same
//! path; [`check_shared_store`] refuses a local disk on a cluster of several nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Activity, Engine, ExecError, RunOptions, StageReport, io_error};
use crate::config::{self, ExecutorKind, Resources};
use crate::dag::{self, Binding};
use crate::fingerprint::StageIdentity;
use crate::hashing::ContentHasher;
use crate::interrupt::CancelFlag;
use crate::runs::{
    self, ResourcesUsed, RunRecord, RunRecorder, RunStatus, StageExecution, StageRunRecord,
    StageStatus,
};
use crate::store::Workspace;

/// Format of the files this module writes.
const FORMAT: u32 = 1;
/// How often the submitter asks `squeue`.
const POLL: Duration = Duration::from_millis(500);
/// How long the submitter waits, after Ctrl-C, for scancelled jobs to leave the queue
/// (a training stage writes its checkpoint in that time).
const CANCEL_GRACE: Duration = Duration::from_secs(60);
/// Lines of a failed job's Slurm log quoted in its error.
const LOG_TAIL_LINES: usize = 20;
/// Slurm states in which a job is still queued or running.
const ACTIVE_STATES: &[&str] = &[
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "RESV_DEL_HOLD",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "SUSPENDED",
    "SPECIAL_EXIT",
];

/// What `trainyard exec-stage` reads: one stage of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageJob {
    /// Format of this file.
    pub format: u32,
    /// The submitting run's id.
    pub run_id: String,
    /// The stage to run.
    pub stage: String,
    /// The run's frozen pipeline, relative to the workspace root.
    pub pipeline: PathBuf,
    /// The fingerprint the submitter computed, when the stage's inputs were known then.
    pub fingerprint: Option<String>,
    /// `--force` for this stage.
    pub force: bool,
    /// Resume an interrupted training stage (off with `--no-resume`).
    pub resume: bool,
    /// `--verify`.
    pub verify: bool,
    /// What its Slurm job asks for (for the record).
    pub resources: Resources,
}

/// What `exec-stage` leaves for the submitter: the stage's record in the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageOutcome {
    /// Format of this file.
    pub format: u32,
    /// The stage.
    pub stage: String,
    /// Its record, as a local run would write it, with `execution` filled in.
    pub record: StageRunRecord,
    /// Whether the job asked Slurm to requeue it (time limit near): not final.
    #[serde(default)]
    pub requeued: bool,
}

/// The jobs of a run that no process follows (`.trainyard/slurm/submitted/<run-id>.json`):
/// written as soon as the jobs are submitted and removed once the submitter has read
/// their results, so it outlives `--detach` and a killed submitter alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubmittedRun {
    format: u32,
    run_id: String,
    /// Stage → its job.
    jobs: BTreeMap<String, SubmittedJob>,
}

/// One job of a [`SubmittedRun`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubmittedJob {
    job_id: String,
    kind: String,
    kind_version: u32,
    resources: Resources,
}

/// A run whose jobs finished while no process followed them, and how it ended.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The run.
    pub run_id: String,
    /// How it ended.
    pub status: RunStatus,
}

fn slurm_state_dir(workspace: &Workspace) -> PathBuf {
    workspace.state_dir().join("slurm")
}

fn jobs_dir(workspace: &Workspace) -> PathBuf {
    slurm_state_dir(workspace).join("jobs")
}

fn submitted_dir(workspace: &Workspace) -> PathBuf {
    slurm_state_dir(workspace).join("submitted")
}

fn submitted_marker(workspace: &Workspace, run_id: &str) -> PathBuf {
    submitted_dir(workspace).join(format!("{run_id}.json"))
}

/// `runs/<id>/slurm/`: the frozen pipeline, the batch scripts, the Slurm logs and the
/// stages' results.
fn run_slurm_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("slurm")
}

fn result_path(run_dir: &Path, stage: &str) -> PathBuf {
    run_slurm_dir(run_dir).join(format!("{stage}.result.json"))
}

fn log_path(run_dir: &Path, stage: &str) -> PathBuf {
    run_slurm_dir(run_dir).join(format!("{stage}.log"))
}

/// A Slurm command (`sbatch`, `squeue`, …), from `TRAINYARD_SLURM_BIN` when set.
fn slurm_command(name: &str) -> Command {
    match std::env::var_os("TRAINYARD_SLURM_BIN") {
        Some(dir) => Command::new(Path::new(&dir).join(name)),
        None => Command::new(name),
    }
}

/// Runs a Slurm command and returns its standard output, or an error quoting its
/// standard error.
fn call(name: &str, args: &[String]) -> Result<String, String> {
    let output = slurm_command(name).args(args).output().map_err(|error| {
        format!("cannot run `{name}` ({error}): is Slurm installed and on PATH on this machine?")
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{name} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// One job as `squeue` shows it.
#[derive(Debug, Clone, Default)]
struct JobState {
    state: String,
    node: Option<String>,
    reason: String,
}

impl JobState {
    fn is_active(&self) -> bool {
        ACTIVE_STATES.contains(&self.state.as_str())
    }
}

/// The state of each of `ids` that Slurm still knows (finished jobs stay known for
/// `MinJobAge`); `Err` when `squeue` itself failed.
fn job_states(ids: &[&str]) -> Result<BTreeMap<String, JobState>, String> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let args = vec![
        "--noheader".to_string(),
        "--states=all".to_string(),
        format!("--jobs={}", ids.join(",")),
        "--format=%i|%T|%N|%r".to_string(),
    ];
    let text = match call("squeue", &args) {
        Ok(text) => text,
        // Every id aged out of Slurm's memory.
        Err(error) if error.contains("Invalid job id") => return Ok(BTreeMap::new()),
        Err(error) => return Err(error),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('|');
            let id = fields.next()?.trim().to_string();
            let state = fields.next()?.trim().to_string();
            let node = fields
                .next()
                .map(str::trim)
                .filter(|node| !node.is_empty() && *node != "(null)")
                .map(str::to_string);
            let reason = fields.next().unwrap_or_default().trim().to_string();
            Some((
                id,
                JobState {
                    state,
                    node,
                    reason,
                },
            ))
        })
        .collect())
}

/// `scancel`s `ids` (best effort: a job may have just finished).
fn scancel(ids: &[&str]) {
    if ids.is_empty() {
        return;
    }
    if let Err(error) = call(
        "scancel",
        &ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
    ) {
        tracing::warn!("{error}");
    }
}

/// What Slurm says a finished job used: `sacct` where accounting is on, else `scontrol
/// show job` (which knows a job for `MinJobAge` after it ends).
fn job_usage(id: &str) -> ResourcesUsed {
    let mut used = ResourcesUsed::default();
    let sacct = call(
        "sacct",
        &[
            "--noheader".to_string(),
            "--parsable2".to_string(),
            "--allocations".to_string(),
            format!("--jobs={id}"),
            "--format=State,ExitCode,AllocCPUS,ReqMem,ElapsedRaw".to_string(),
        ],
    );
    if let Ok(text) = sacct
        && let Some(line) = text.lines().next()
    {
        let fields: Vec<&str> = line.split('|').collect();
        if fields.len() == 5 {
            used.state = Some(fields[0].to_string());
            used.exit_code = Some(fields[1].to_string());
            used.cpus = fields[2].parse().ok();
            used.mem = Some(fields[3].to_string()).filter(|mem| !mem.is_empty());
            return used;
        }
    }
    let Ok(text) = call(
        "scontrol",
        &[
            "--oneliner".to_string(),
            "show".to_string(),
            "job".to_string(),
            id.to_string(),
        ],
    ) else {
        return used;
    };
    for field in text.split_whitespace() {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "JobState" => used.state = Some(value.to_string()),
            "ExitCode" => used.exit_code = Some(value.to_string()),
            "NumCPUs" => used.cpus = value.parse().ok(),
            "Restarts" => used.starts = value.parse::<u32>().ok().map(|restarts| restarts + 1),
            "AllocTRES" | "TRES" => {
                if let Some(mem) = value.split(',').find_map(|part| part.strip_prefix("mem=")) {
                    used.mem = Some(mem.to_string());
                }
            }
            _ => {}
        }
    }
    used
}

/// Filesystems that other machines can mount (statfs magic numbers).
const SHARED_FILESYSTEMS: &[(i64, &str)] = &[
    (0x6969, "nfs"),
    (0x517B, "smb"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x1983_0326, "beegfs"),
    (0x00C3_6400, "cephfs"),
    (0x6573_5546, "fuse"),
    (0x5346_414F, "afs"),
    (0x7461_636F, "ocfs2"),
    (0x0116_1970, "gfs2"),
    (0x0102_1997, "9p"),
    (0x1366_1366, "orangefs"),
    (0xAAD7_AAEA, "panfs"),
];

/// Whether statfs type `magic` is a filesystem other machines mount.
fn is_shared(magic: Option<i64>) -> bool {
    magic.is_some_and(|magic| SHARED_FILESYSTEMS.iter().any(|(known, _)| *known == magic))
}

/// The statfs magic of the filesystem holding `path`.
fn filesystem_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is written by the call
    // before it is read, only when the call succeeds.
    let stat = unsafe {
        if libc::statfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    #[allow(clippy::unnecessary_cast)]
    Some(stat.f_type as i64)
}

/// [`check_shared_store`] for the partitions `pipeline`'s stages may use, unless its
/// `executor.check_shared_store` is off.
pub(super) fn check_pipeline_store(
    workspace: &Workspace,
    pipeline: &config::ResolvedPipeline,
) -> Result<(), ExecError> {
    if !pipeline.executor.check_shared_store {
        return Ok(());
    }
    let partitions: BTreeSet<String> = pipeline
        .stages
        .iter()
        .filter_map(|stage| pipeline.resources_of(stage).partition)
        .collect();
    check_shared_store(workspace, &partitions)
}

/// Refuses a workspace that the cluster's nodes cannot see: on a local filesystem while
/// a partition the jobs may use has a node other than this machine. A network or
/// cluster filesystem (NFS, Lustre, GPFS, BeeGFS, CephFS, …) passes; so does a cluster
/// whose only node is this machine.
pub fn check_shared_store(
    workspace: &Workspace,
    partitions: &BTreeSet<String>,
) -> Result<(), ExecError> {
    let magic = filesystem_magic(&workspace.root);
    if is_shared(magic) {
        // No need to ask Slurm for its nodes.
        return Ok(());
    }
    let mut args = vec!["--noheader".to_string(), "--format=%N".to_string()];
    if !partitions.is_empty() {
        args.push(format!(
            "--partition={}",
            partitions.iter().cloned().collect::<Vec<_>>().join(",")
        ));
    }
    let listed = call("sinfo", &args).map_err(ExecError::Slurm)?;
    let mut nodes = BTreeSet::new();
    for list in listed.split_whitespace() {
        let expanded = call(
            "scontrol",
            &[
                "show".to_string(),
                "hostnames".to_string(),
                list.to_string(),
            ],
        )
        .map_err(ExecError::Slurm)?;
        nodes.extend(expanded.split_whitespace().map(str::to_string));
    }
    match unseen_by(&workspace.root, magic, &nodes, &runs::host_name()) {
        None => Ok(()),
        Some(problem) => Err(ExecError::Slurm(problem)),
    }
}

/// Why nodes other than `host` cannot see `root`, on a filesystem of statfs type
/// `magic`: `None` when it is a shared filesystem or every node is `host`.
fn unseen_by(
    root: &Path,
    magic: Option<i64>,
    nodes: &BTreeSet<String>,
    host: &str,
) -> Option<String> {
    if is_shared(magic) {
        return None;
    }
    let short = host.split('.').next().unwrap_or_default();
    let others: Vec<&str> = nodes
        .iter()
        .map(String::as_str)
        .filter(|node| *node != host && *node != short && *node != "localhost")
        .collect();
    if others.is_empty() {
        return None;
    }
    Some(format!(
        "the workspace {} is on a local filesystem (statfs type {}), which the cluster's other nodes ({}{}) cannot see; \
         the Slurm executor needs the workspace and its store on a filesystem every node mounts at the same path \
         (NFS, Lustre, GPFS, BeeGFS, CephFS, …). If the nodes do mount it, set `executor.check_shared_store: false`",
        root.display(),
        magic.map_or_else(|| "unknown".to_string(), |magic| format!("{magic:#x}")),
        others
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join(", "),
        if others.len() > 5 { ", …" } else { "" }
    ))
}

/// Writes the run's frozen pipeline: every resolved value, external inputs made
/// absolute (a `hf:` id stays an id), variables escaped, so a node reloads exactly this
/// run's settings whatever happens to the pipeline files meanwhile.
fn freeze_pipeline(engine: &Engine<'_>, run_dir: &Path) -> Result<PathBuf, ExecError> {
    let mut values = engine.pipeline.values_json();
    for (index, stage) in engine.pipeline.stages.iter().enumerate() {
        for (input, binding) in &engine.dag.bindings[index] {
            if let Binding::External {
                path, hub: None, ..
            } = binding
                && let Some(slot) =
                    values.pointer_mut(&format!("/stages/{}/inputs/{input}", stage.name))
            {
                *slot = serde_json::Value::String(path.to_string_lossy().into_owned());
            }
        }
    }
    config::vars::escape_resolved(&mut values);
    let yaml = serde_norway::to_string(&values)
        .map_err(|error| ExecError::Slurm(format!("cannot write the frozen pipeline: {error}")))?;
    let dir = run_slurm_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let path = dir.join("pipeline.yaml");
    let text = format!(
        "# The resolved pipeline of run {}, external inputs made absolute: what its Slurm jobs run.\n{yaml}",
        engine
            .recorder
            .map(|recorder| recorder.id.as_str())
            .unwrap_or_default()
    );
    crate::atomic_file::write_synced(&path, text.as_bytes())
        .map_err(io_error(format!("writing {}", path.display())))?;
    Ok(path)
}

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Writes the job description of `stage` and returns its id (the blake3 of its bytes).
fn write_stage_job(workspace: &Workspace, job: &StageJob) -> Result<String, ExecError> {
    let bytes = serde_json::to_vec_pretty(job)
        .map_err(|error| ExecError::Slurm(format!("cannot write a stage job: {error}")))?;
    let id = blake3::hash(&bytes).to_hex().to_string();
    let dir = jobs_dir(workspace);
    std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let path = dir.join(format!("{id}.json"));
    crate::atomic_file::write_synced(&path, &bytes)
        .map_err(io_error(format!("writing {}", path.display())))?;
    Ok(id)
}

/// The batch script of one stage's job.
fn batch_script(
    engine: &Engine<'_>,
    run_dir: &Path,
    stage: &str,
    job_id: &str,
    resources: &Resources,
) -> Result<String, ExecError> {
    let exe = std::env::current_exe().map_err(io_error("finding the trainyard executable"))?;
    let root = &engine.workspace.root;
    let mut lines = vec![
        "#!/bin/sh".to_string(),
        format!(
            "#SBATCH --job-name=trainyard:{}:{stage}",
            engine.pipeline.name
        ),
        format!("#SBATCH --output={}", log_path(run_dir, stage).display()),
        "#SBATCH --open-mode=append".to_string(),
        format!("#SBATCH --chdir={}", root.display()),
        "#SBATCH --requeue".to_string(),
        "#SBATCH --kill-on-invalid-dep=yes".to_string(),
        format!(
            "#SBATCH --signal=B:USR1@{}",
            engine.pipeline.executor.signal_lead_s
        ),
    ];
    lines.extend(
        resources
            .sbatch_options()
            .into_iter()
            .map(|option| format!("#SBATCH {option}")),
    );
    lines.push(format!(
        "# Runs stage `{stage}` of run {}: its job description is .trainyard/slurm/jobs/{job_id}.json",
        engine.recorder.map(|recorder| recorder.id.as_str()).unwrap_or_default()
    ));
    lines.push(format!(
        "exec {} --workspace {} exec-stage {job_id}",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&root.to_string_lossy())
    ));
    let mut script = lines.join("\n");
    script.push('\n');
    Ok(script)
}

/// One submitted stage, as the submitter follows it.
struct Submitted {
    job_id: String,
    resources: Resources,
    state: JobState,
    /// Its report once final.
    done: bool,
}

/// Submits every stage `planned` says will run (each after its upstream stages' jobs)
/// and, unless `--detach`, waits for them and returns the final reports.
pub(super) fn submit_and_wait(
    engine: &Engine<'_>,
    recorder: &RunRecorder,
    planned: Vec<StageReport>,
) -> Result<Vec<StageReport>, ExecError> {
    let mut reports = planned;
    let to_run: Vec<usize> = reports
        .iter()
        .enumerate()
        .filter(|(_, report)| report.status == StageStatus::WillRun)
        .map(|(at, _)| at)
        .collect();
    if to_run.is_empty() {
        return Ok(reports);
    }
    let pipeline = engine.pipeline;
    let index_of: BTreeMap<&str, usize> = pipeline
        .stages
        .iter()
        .enumerate()
        .map(|(index, stage)| (stage.name.as_str(), index))
        .collect();
    let frozen = freeze_pipeline(engine, &recorder.dir)?;
    let frozen = frozen
        .strip_prefix(&engine.workspace.root)
        .unwrap_or(&frozen)
        .to_path_buf();
    // Report position → Slurm job, in submission (topological) order.
    let mut submitted: BTreeMap<usize, Submitted> = BTreeMap::new();
    let mut job_of_stage: BTreeMap<usize, String> = BTreeMap::new();
    let forced: BTreeSet<&str> = engine.options.force.iter().map(String::as_str).collect();
    for &at in &to_run {
        if engine.cancel.is_cancelled() {
            break;
        }
        let name = reports[at].name.clone();
        let index = index_of[name.as_str()];
        let stage = &pipeline.stages[index];
        let resources = pipeline.resources_of(stage);
        let job = StageJob {
            format: FORMAT,
            run_id: recorder.id.clone(),
            stage: name.clone(),
            pipeline: frozen.clone(),
            fingerprint: reports[at].fingerprint.clone(),
            force: engine.options.force_all || forced.contains(name.as_str()),
            resume: engine.options.resume,
            verify: engine.options.verify,
            resources: resources.clone(),
        };
        let job_id = write_stage_job(engine.workspace, &job)?;
        let script = batch_script(engine, &recorder.dir, &name, &job_id, &resources)?;
        let script_path = run_slurm_dir(&recorder.dir).join(format!("{name}.sbatch"));
        std::fs::write(&script_path, script)
            .map_err(io_error(format!("writing {}", script_path.display())))?;
        // A result left by an earlier attempt of this run must not be read as this one's.
        let _ = std::fs::remove_file(result_path(&recorder.dir, &name));
        let dependencies: Vec<&str> = engine
            .dag
            .upstream(index)
            .into_iter()
            .filter_map(|up| job_of_stage.get(&up).map(String::as_str))
            .collect();
        let mut args = vec!["--parsable".to_string()];
        if !dependencies.is_empty() {
            args.push(format!("--dependency=afterok:{}", dependencies.join(":")));
        }
        args.push(script_path.to_string_lossy().into_owned());
        let submitted_id = match call("sbatch", &args) {
            Ok(output) => output
                .trim()
                .split(';')
                .next()
                .unwrap_or_default()
                .to_string(),
            Err(error) => {
                // What was already submitted must not run unattended.
                let ids: Vec<&str> = submitted.values().map(|job| job.job_id.as_str()).collect();
                scancel(&ids);
                let message = format!("submitting its Slurm job failed: {error}");
                engine.progress(format_args!("  FAILED   {name}: {message}"));
                reports[at].status = StageStatus::Failed;
                reports[at].error = Some(message);
                for report in reports.iter_mut() {
                    if matches!(report.status, StageStatus::WillRun) {
                        report.status = StageStatus::Skipped;
                        report.error =
                            Some(format!("not run: submitting `{name}` to Slurm failed"));
                        report.execution = None;
                    }
                }
                for &earlier in submitted.keys() {
                    reports[earlier].status = StageStatus::Skipped;
                    reports[earlier].error = Some(format!(
                        "its Slurm job was cancelled: submitting `{name}` failed"
                    ));
                }
                return Ok(reports);
            }
        };
        engine.progress(format_args!(
            "  submitted {name} ({}) as Slurm job {submitted_id}{}",
            stage.kind.name,
            match resources.sbatch_options() {
                options if options.is_empty() => String::new(),
                options => format!(" ({})", options.join(" ")),
            }
        ));
        engine.event(
            "stage_submitted",
            serde_json::json!({ "stage": name, "job_id": submitted_id, "fingerprint": reports[at].fingerprint }),
        );
        reports[at].execution = Some(StageExecution {
            executor: ExecutorKind::Slurm.as_str().to_string(),
            job_id: Some(submitted_id.clone()),
            resources: Some(resources.clone()),
            ..StageExecution::default()
        });
        job_of_stage.insert(index, submitted_id.clone());
        submitted.insert(
            at,
            Submitted {
                job_id: submitted_id,
                resources,
                state: JobState::default(),
                done: false,
            },
        );
    }
    let marker: BTreeMap<String, SubmittedJob> = submitted
        .iter()
        .map(|(&at, job)| {
            let stage = &pipeline.stages[index_of[reports[at].name.as_str()]];
            (
                stage.name.clone(),
                SubmittedJob {
                    job_id: job.job_id.clone(),
                    kind: stage.kind.name.to_string(),
                    kind_version: stage.kind.version,
                    resources: job.resources.clone(),
                },
            )
        })
        .collect();
    mark_submitted(engine.workspace, &recorder.id, marker)?;
    if engine.options.detach && !engine.cancel.is_cancelled() {
        for &at in submitted.keys() {
            reports[at].status = StageStatus::Submitted;
        }
        return Ok(reports);
    }
    wait_for_jobs(engine, recorder, &mut reports, &mut submitted);
    // Followed to the end: the run's own record says how each job ended.
    let marker = submitted_marker(engine.workspace, &recorder.id);
    std::fs::remove_file(&marker).map_err(io_error(format!("removing {}", marker.display())))?;
    Ok(reports)
}

/// Follows the submitted jobs until none is queued or running, updating `reports`.
fn wait_for_jobs(
    engine: &Engine<'_>,
    recorder: &RunRecorder,
    reports: &mut [StageReport],
    submitted: &mut BTreeMap<usize, Submitted>,
) {
    let mut cancelled_at: Option<Instant> = None;
    let mut stopped_by: Option<String> = None;
    let mut squeue_failing_since: Option<Instant> = None;
    let mut events = EventTail::new(recorder.dir.join("logs.jsonl"));
    loop {
        // The jobs' training steps, for the periodic progress line.
        for event in events.read_new() {
            if let (Some(stage), Some(name)) = (
                event.get("stage").and_then(serde_json::Value::as_str),
                event.get("event").and_then(serde_json::Value::as_str),
            ) {
                engine.note_activity(stage, name, &event);
            }
        }
        let open: Vec<&str> = submitted
            .values()
            .filter(|job| !job.done)
            .map(|job| job.job_id.as_str())
            .collect();
        if open.is_empty() {
            break;
        }
        if engine.cancel.is_cancelled() && cancelled_at.is_none() {
            engine.progress(format_args!(
                "  note     interrupted: cancelling {} Slurm job(s) (scancel {})",
                open.len(),
                open.join(" ")
            ));
            scancel(&open);
            cancelled_at = Some(Instant::now());
        }
        let states = match job_states(&open) {
            Ok(states) => {
                squeue_failing_since = None;
                states
            }
            Err(error) => {
                let since = *squeue_failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(120) {
                    for (&at, job) in submitted.iter_mut().filter(|(_, job)| !job.done) {
                        reports[at].status = StageStatus::Failed;
                        reports[at].error =
                            Some(format!("lost track of Slurm job {}: {error}", job.job_id));
                        job.done = true;
                    }
                    break;
                }
                std::thread::sleep(POLL);
                continue;
            }
        };
        for (&at, job) in submitted.iter_mut().filter(|(_, job)| !job.done) {
            let name = reports[at].name.clone();
            let known = states.get(&job.job_id).cloned();
            if let Some(state) = &known
                && state.state != job.state.state
            {
                if state.state == "RUNNING" {
                    engine.progress(format_args!(
                        "  running  {name} (Slurm job {} on {})",
                        job.job_id,
                        state.node.as_deref().unwrap_or("?")
                    ));
                    if let Ok(mut running) = engine.running.lock() {
                        running.insert(
                            name.clone(),
                            Activity {
                                since: Instant::now(),
                                detail: None,
                            },
                        );
                    }
                }
                job.state = state.clone();
            }
            if known.as_ref().is_some_and(JobState::is_active) {
                continue;
            }
            job.done = true;
            if let Ok(mut running) = engine.running.lock() {
                running.remove(&name);
            }
            settle_report(engine, recorder, &mut reports[at], job, known.as_ref());
            if matches!(
                reports[at].status,
                StageStatus::Failed | StageStatus::Interrupted
            ) && !engine.options.keep_going
                && stopped_by.is_none()
                && !engine.cancel.is_cancelled()
            {
                stopped_by = Some(name.clone());
            }
        }
        // Without --keep-going a failure stops what has not started yet, as a local run
        // skips stages still waiting for a slot.
        if let Some(failed) = &stopped_by {
            let waiting: Vec<&str> = submitted
                .values()
                .filter(|job| !job.done && job.state.state == "PENDING")
                .map(|job| job.job_id.as_str())
                .collect();
            if !waiting.is_empty() {
                engine.progress(format_args!(
                    "  note     `{failed}` failed: cancelling {} waiting Slurm job(s) (--keep-going runs those that do not depend on it)",
                    waiting.len()
                ));
                scancel(&waiting);
            }
        }
        if let Some(since) = cancelled_at
            && since.elapsed() > CANCEL_GRACE
        {
            for (&at, job) in submitted.iter_mut().filter(|(_, job)| !job.done) {
                reports[at].status = StageStatus::Interrupted;
                reports[at].error = Some(format!(
                    "its Slurm job {} was cancelled and had not ended after {}s",
                    job.job_id,
                    CANCEL_GRACE.as_secs()
                ));
                job.done = true;
            }
        }
        engine.flush_progress();
        std::thread::sleep(POLL);
    }
    // A stage whose job never ran because an upstream job failed says which one.
    for report in reports.iter_mut() {
        if report.status == StageStatus::Skipped
            && report.error.is_none()
            && let Some(failed) = &stopped_by
        {
            report.error = Some(format!(
                "the run stopped after `{failed}` failed (use --keep-going to continue)"
            ));
        }
    }
}

/// New lines of the run's `logs.jsonl`, which the jobs append to.
struct EventTail {
    path: PathBuf,
    offset: u64,
}

impl EventTail {
    /// Follows `path` from its current end.
    fn new(path: PathBuf) -> EventTail {
        let offset = std::fs::metadata(&path).map_or(0, |metadata| metadata.len());
        EventTail { path, offset }
    }

    /// The complete lines written since the last call, as JSON (others skipped).
    fn read_new(&mut self) -> Vec<serde_json::Value> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut bytes).is_err()
        {
            return Vec::new();
        }
        // A line still being written is read next time.
        let complete = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        self.offset += complete as u64;
        bytes[..complete]
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect()
    }
}

/// The final report of a job that left the queue, from the result its `exec-stage`
/// wrote or, without one, from Slurm's state and the job's log.
fn settle_report(
    engine: &Engine<'_>,
    recorder: &RunRecorder,
    report: &mut StageReport,
    job: &Submitted,
    state: Option<&JobState>,
) {
    let name = report.name.clone();
    let log = log_path(&recorder.dir, &name);
    let mut used = job_usage(&job.job_id);
    let outcome = read_outcome(&recorder.dir, &name);
    let slurm_state = state
        .map(|state| state.state.clone())
        .or_else(|| used.state.clone())
        .unwrap_or_else(|| "GONE".to_string());
    used.state.get_or_insert_with(|| slurm_state.clone());
    let mut execution = StageExecution {
        executor: ExecutorKind::Slurm.as_str().to_string(),
        job_id: Some(job.job_id.clone()),
        node: job.state.node.clone(),
        resources: Some(job.resources.clone()),
        used: Some(used.clone()),
    };
    match outcome {
        Some(outcome) => {
            let record = outcome.record;
            if let Some(from_node) = &record.execution {
                execution.node = from_node.node.clone().or(execution.node);
                if let Some(measured) = &from_node.used {
                    used.elapsed_s = measured.elapsed_s;
                    used.max_rss_bytes = measured.max_rss_bytes;
                }
                execution.used = Some(used);
            }
            apply_record(engine, report, &record);
        }
        None => {
            let dependency = state.is_some_and(|state| state.reason.contains("Dependency"));
            if slurm_state == "CANCELLED" && (dependency || job.state.state == "PENDING") {
                report.status = StageStatus::Skipped;
                report.error = Some(if dependency {
                    format!(
                        "its Slurm job {} was cancelled: an upstream job failed",
                        job.job_id
                    )
                } else {
                    format!(
                        "its Slurm job {} was cancelled before it started",
                        job.job_id
                    )
                });
            } else {
                report.status = StageStatus::Failed;
                let tail = crate::stages::command::tail_of(&log, LOG_TAIL_LINES);
                report.error = Some(format!(
                    "its Slurm job {} ended {slurm_state} without a result\n(Slurm log: {}){}",
                    job.job_id,
                    log.display(),
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("\n{tail}")
                    }
                ));
            }
        }
    }
    report.execution = Some(execution);
    let on = report
        .execution
        .as_ref()
        .and_then(|execution| execution.node.clone())
        .map(|node| format!(" on {node}"))
        .unwrap_or_default();
    match report.status {
        StageStatus::Executed => engine.progress(format_args!(
            "  done     {name} in {:.2}s (Slurm job {}{on})",
            report.duration_s.unwrap_or_default(),
            job.job_id
        )),
        // Its upstream stages reran and gave the bytes they had before.
        StageStatus::Cached => engine.progress(format_args!(
            "  cached   {name} (its inputs came out unchanged; Slurm job {}{on})",
            job.job_id
        )),
        StageStatus::Interrupted => engine.progress(format_args!(
            "  stopped  {name} (Slurm job {} {slurm_state}; a training stage keeps its checkpoint and the next run resumes from it)",
            job.job_id
        )),
        StageStatus::Skipped => engine.progress(format_args!(
            "  skipped  {name} ({})",
            report.error.as_deref().unwrap_or_default()
        )),
        _ => {
            // The stage's own error already names its log; add the job's.
            if let Some(error) = &mut report.error
                && !error.contains("Slurm log")
            {
                let tail = crate::stages::command::tail_of(&log, LOG_TAIL_LINES);
                error.push_str(&format!(
                    "\n(Slurm job {} {slurm_state}; Slurm log: {})\n{tail}",
                    job.job_id,
                    log.display()
                ));
            }
            engine.progress(format_args!(
                "  FAILED   {name} ({}): {}",
                report.kind,
                report.error.as_deref().unwrap_or_default()
            ));
        }
    }
}

/// `report` as the node's record of the stage says it ended.
fn apply_record(engine: &Engine<'_>, report: &mut StageReport, record: &StageRunRecord) {
    report.status = record.status;
    report.fingerprint = record.fingerprint.clone();
    report.duration_s = record.duration_s;
    report.error = record.error.clone();
    report.input_paths = record.input_paths.clone();
    if let Some(stage) = engine.pipeline.stage(&report.name) {
        report.identity = Some(StageIdentity {
            kind: stage.kind.name.to_string(),
            kind_version: stage.kind.version,
            seed: engine.pipeline.seed,
            settings: stage.settings.clone(),
            inputs: record.inputs.clone(),
        });
    }
    report.output = record.fingerprint.as_ref().and_then(|fingerprint| {
        let manifest = engine
            .workspace
            .lookup(&report.name, fingerprint)
            .ok()
            .flatten()?;
        Some((
            engine.workspace.entry_dir(&report.name, fingerprint),
            manifest,
        ))
    });
    if record.status.has_output() && report.output.is_none() {
        report.status = StageStatus::Failed;
        report.error = Some(format!(
            "its job reported an output, but the store has none for fingerprint {}: is the store shared with the node?",
            record.fingerprint.as_deref().unwrap_or("?")
        ));
    }
}

fn read_outcome(run_dir: &Path, stage: &str) -> Option<StageOutcome> {
    let bytes = std::fs::read(result_path(run_dir, stage)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records the jobs of `run_id` (see [`SubmittedRun`]).
fn mark_submitted(
    workspace: &Workspace,
    run_id: &str,
    jobs: BTreeMap<String, SubmittedJob>,
) -> Result<(), ExecError> {
    let marker = SubmittedRun {
        format: FORMAT,
        run_id: run_id.to_string(),
        jobs,
    };
    let dir = submitted_dir(workspace);
    std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let path = submitted_marker(workspace, run_id);
    let bytes =
        serde_json::to_vec_pretty(&marker).map_err(|error| ExecError::Slurm(error.to_string()))?;
    crate::atomic_file::write_synced(&path, &bytes)
        .map_err(io_error(format!("writing {}", path.display())))
}

/// The runs of the workspace whose jobs no process follows, oldest first.
fn submitted_runs(workspace: &Workspace) -> Vec<SubmittedRun> {
    let Ok(entries) = std::fs::read_dir(submitted_dir(workspace)) else {
        return Vec::new();
    };
    let mut runs: Vec<SubmittedRun> = entries
        .flatten()
        .filter_map(|entry| serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok())
        .collect();
    runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    runs
}

/// One job of a run submitted with `--detach` (or whose submitter was killed), as
/// `trainyard status` shows it.
#[derive(Debug, Clone)]
pub struct UnfollowedJob {
    /// The stage.
    pub stage: String,
    /// Its Slurm job.
    pub job_id: String,
    /// Slurm's state, or how the stage ended once it wrote its result.
    pub state: String,
    /// Where it runs or ran.
    pub node: Option<String>,
}

/// The jobs of every run whose jobs no process follows (`--detach`, or a killed
/// submitter), for `trainyard status`. A run still being followed is not listed: its
/// submitter holds the workspace lock.
pub fn unfollowed_status(workspace: &Workspace) -> Vec<(String, Vec<UnfollowedJob>)> {
    submitted_runs(workspace)
        .into_iter()
        .map(|run| {
            let ids: Vec<&str> = run.jobs.values().map(|job| job.job_id.as_str()).collect();
            let states = job_states(&ids).unwrap_or_default();
            let run_dir = workspace.runs_dir().join(&run.run_id);
            let jobs = run
                .jobs
                .iter()
                .map(|(stage, job)| {
                    let job_id = &job.job_id;
                    let known = states.get(job_id);
                    let outcome = read_outcome(&run_dir, stage).filter(|outcome| !outcome.requeued);
                    let state = match (known, &outcome) {
                        (Some(state), _) if state.is_active() => state.state.clone(),
                        (_, Some(outcome)) => outcome.record.status.as_str().to_string(),
                        (Some(state), None) => state.state.clone(),
                        (None, None) => "unknown".to_string(),
                    };
                    UnfollowedJob {
                        stage: stage.clone(),
                        job_id: job_id.clone(),
                        state,
                        node: known.and_then(|state| state.node.clone()),
                    }
                })
                .collect();
            (run.run_id, jobs)
        })
        .collect()
}

/// Completes the records of runs whose jobs no process followed to the end (`--detach`,
/// or a submitter that was killed) once those jobs have all left the queue; fails with
/// [`ExecError::SlurmBusy`] while one still has a job queued or running: a new run must
/// not submit or run again the stages those jobs are writing. Called under the
/// workspace lock.
pub fn settle_unfollowed(workspace: &Workspace) -> Result<Vec<Settled>, ExecError> {
    let mut settled = Vec::new();
    for run in submitted_runs(workspace) {
        let ids: Vec<&str> = run.jobs.values().map(|job| job.job_id.as_str()).collect();
        let states = job_states(&ids).map_err(ExecError::Slurm)?;
        let live: Vec<String> = run
            .jobs
            .iter()
            .filter(|(_, job)| states.get(&job.job_id).is_some_and(JobState::is_active))
            .map(|(stage, job)| format!("{stage}={}", job.job_id))
            .collect();
        if !live.is_empty() {
            return Err(ExecError::SlurmBusy {
                run: run.run_id,
                jobs: live.join(", "),
            });
        }
        let run_dir = workspace.runs_dir().join(&run.run_id);
        let record_path = run_dir.join(runs::RECORD_FILE);
        let text = std::fs::read_to_string(&record_path)
            .map_err(io_error(format!("reading {}", record_path.display())))?;
        let mut record: RunRecord = serde_json::from_str(&text)
            .map_err(|error| ExecError::Slurm(format!("{}: {error}", record_path.display())))?;
        for (stage, job) in &run.jobs {
            let job_id = &job.job_id;
            let mut used = job_usage(job_id);
            // A killed submitter's record lists no stages yet.
            let entry = record
                .stages
                .entry(stage.clone())
                .or_insert_with(|| StageRunRecord {
                    kind: job.kind.clone(),
                    kind_version: job.kind_version,
                    status: StageStatus::Submitted,
                    fingerprint: None,
                    inputs: BTreeMap::new(),
                    input_paths: BTreeMap::new(),
                    hub_models: BTreeMap::new(),
                    output: None,
                    output_hash: None,
                    duration_s: None,
                    reasons: Vec::new(),
                    error: None,
                    execution: None,
                });
            match read_outcome(&run_dir, stage).filter(|outcome| !outcome.requeued) {
                Some(outcome) => {
                    let node_execution = outcome.record.execution.clone().unwrap_or_default();
                    if let Some(measured) = node_execution.used {
                        used.elapsed_s = measured.elapsed_s;
                        used.max_rss_bytes = measured.max_rss_bytes;
                    }
                    *entry = outcome.record;
                    entry.execution = Some(StageExecution {
                        executor: ExecutorKind::Slurm.as_str().to_string(),
                        job_id: Some(job_id.clone()),
                        node: node_execution.node,
                        resources: Some(job.resources.clone()),
                        used: Some(used),
                    });
                }
                None => {
                    let log = log_path(&run_dir, stage);
                    let dependency = used.state.as_deref() == Some("CANCELLED");
                    entry.status = if dependency {
                        StageStatus::Skipped
                    } else {
                        StageStatus::Failed
                    };
                    entry.error = Some(format!(
                        "its Slurm job {job_id} ended {} without a result\n(Slurm log: {})\n{}",
                        used.state.as_deref().unwrap_or("(unknown)"),
                        log.display(),
                        crate::stages::command::tail_of(&log, LOG_TAIL_LINES)
                    ));
                    entry.execution = Some(StageExecution {
                        executor: ExecutorKind::Slurm.as_str().to_string(),
                        job_id: Some(job_id.clone()),
                        node: None,
                        resources: Some(job.resources.clone()),
                        used: Some(used),
                    });
                }
            }
        }
        let statuses: Vec<StageStatus> = record.stages.values().map(|stage| stage.status).collect();
        record.status = if statuses.contains(&StageStatus::Interrupted) {
            RunStatus::Interrupted
        } else if statuses
            .iter()
            .any(|status| matches!(status, StageStatus::Failed | StageStatus::Skipped))
        {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        record.finished_at = Some(runs::timestamp(SystemTime::now()));
        let recorder = RunRecorder::open(&run_dir)
            .map_err(io_error(format!("opening {}", run_dir.display())))?;
        recorder
            .write_record(&record, true)
            .map_err(io_error(format!("writing {}", record_path.display())))?;
        recorder.event(
            "run_finished",
            serde_json::json!({ "status": record.status }),
        );
        let marker = submitted_marker(workspace, &run.run_id);
        std::fs::remove_file(&marker)
            .map_err(io_error(format!("removing {}", marker.display())))?;
        settled.push(Settled {
            run_id: run.run_id,
            status: record.status,
        });
    }
    Ok(settled)
}

/// How `exec-stage` ended, for its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The stage is in the store (run now, or found cached).
    Done,
    /// The stage failed.
    Failed,
    /// Stopped by a signal; its checkpoint (if any) is kept.
    Interrupted,
    /// Stopped before the time limit and requeued: the next start resumes.
    Requeued,
}

/// `trainyard exec-stage JOB` on a node: runs the one stage the job description `job`
/// names, publishes it into the store, and leaves its result for the submitter.
/// `requeue` is set (with `cancel`) when Slurm's time-limit warning arrived.
pub fn exec_stage(
    workspace: &Workspace,
    job: &str,
    cancel: &CancelFlag,
    requeue: &std::sync::atomic::AtomicBool,
) -> Result<ExecOutcome, ExecError> {
    let host = runs::host_name();
    let started = Instant::now();
    let is_hash = job.len() == 64 && job.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hash {
        return Err(ExecError::Slurm(format!(
            "`{job}` is not a stage job id (64 hex digits, as the batch script gives it)"
        )));
    }
    let path = jobs_dir(workspace).join(format!("{job}.json"));
    let bytes = std::fs::read(&path).map_err(|error| {
        ExecError::Slurm(format!(
            "cannot read the stage job {} on {host}: {error}; the workspace must be on a filesystem this node shares with the submitting machine, at the same path",
            path.display()
        ))
    })?;
    if blake3::hash(&bytes).to_hex().as_str() != job {
        return Err(ExecError::Slurm(format!(
            "{} does not hash to its name: it was changed or truncated",
            path.display()
        )));
    }
    let job: StageJob = serde_json::from_slice(&bytes)
        .map_err(|error| ExecError::Slurm(format!("{}: {error}", path.display())))?;
    let run_dir = workspace.runs_dir().join(&job.run_id);
    let pipeline_path = workspace.root.join(&job.pipeline);
    let pipeline = config::load(&pipeline_path, &config::LoadOptions::default())
        .map_err(|error| ExecError::Slurm(format!("{}: {error}", pipeline_path.display())))?;
    let dag = dag::build(&pipeline)
        .map_err(|error| ExecError::Slurm(format!("{}: {error}", pipeline_path.display())))?;
    let recorder = RunRecorder::open(&run_dir).map_err(io_error(format!(
        "opening the run directory {}",
        run_dir.display()
    )))?;
    let options = RunOptions {
        only: Some(job.stage.clone()),
        force: if job.force {
            vec![job.stage.clone()]
        } else {
            Vec::new()
        },
        resume: job.resume,
        verify: job.verify,
        progress: true,
        ..RunOptions::default()
    };
    let engine = Engine {
        workspace,
        pipeline: &pipeline,
        dag: &dag,
        options: &options,
        cancel,
        hasher: {
            let hasher = ContentHasher::open(&workspace.stat_cache()).with_cancel(cancel);
            if job.verify {
                hasher.rehashing_everything()
            } else {
                hasher
            }
        },
        recorder: Some(&recorder),
        console: std::sync::Mutex::default(),
        running: std::sync::Mutex::default(),
        plan_only: false,
    };
    let reports = engine.walk()?;
    // Only a cache: two nodes saving at once lose entries, never correctness.
    let _ = engine.hasher.save();
    let report = reports
        .into_iter()
        .find(|report| report.name == job.stage)
        .ok_or_else(|| {
            ExecError::Slurm(format!(
                "no stage `{}` in {}",
                job.stage,
                pipeline_path.display()
            ))
        })?;
    if let (Some(submitted), Some(actual)) = (&job.fingerprint, &report.fingerprint)
        && submitted != actual
    {
        engine.progress(format_args!(
            "  note     `{}` ran with fingerprint {} (submitted as {}): an input changed after submission",
            job.stage,
            &actual[..12.min(actual.len())],
            &submitted[..12.min(submitted.len())]
        ));
    }
    let requeued = report.status == StageStatus::Interrupted
        && requeue.load(std::sync::atomic::Ordering::SeqCst);
    let mut record = engine
        .stage_records(std::slice::from_ref(&report))
        .remove(&job.stage)
        .ok_or_else(|| ExecError::Slurm(format!("no record for stage `{}`", job.stage)))?;
    record.execution = Some(StageExecution {
        executor: ExecutorKind::Slurm.as_str().to_string(),
        job_id: std::env::var("SLURM_JOB_ID").ok(),
        node: Some(host),
        resources: Some(job.resources.clone()),
        used: Some(ResourcesUsed {
            elapsed_s: Some(started.elapsed().as_secs_f64()),
            max_rss_bytes: peak_rss_bytes(),
            ..ResourcesUsed::default()
        }),
    });
    let outcome = StageOutcome {
        format: FORMAT,
        stage: job.stage.clone(),
        record,
        requeued,
    };
    let result = result_path(&run_dir, &job.stage);
    let bytes =
        serde_json::to_vec_pretty(&outcome).map_err(|error| ExecError::Slurm(error.to_string()))?;
    crate::atomic_file::write_atomically(&result, &bytes)
        .map_err(io_error(format!("writing {}", result.display())))?;
    if requeued && let Ok(id) = std::env::var("SLURM_JOB_ID") {
        engine.progress(format_args!(
            "  note     the time limit is near: checkpoint kept, requeueing Slurm job {id}"
        ));
        call("scontrol", &["requeue".to_string(), id]).map_err(ExecError::Slurm)?;
        return Ok(ExecOutcome::Requeued);
    }
    Ok(match report.status {
        StageStatus::Executed | StageStatus::Cached => ExecOutcome::Done,
        StageStatus::Interrupted => ExecOutcome::Interrupted,
        _ => ExecOutcome::Failed,
    })
}

/// Peak resident memory of this process, from getrusage.
fn peak_rss_bytes() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes the struct before returning 0; it is read only then.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_disk_is_refused_only_when_another_node_could_run_the_jobs() {
        let root = Path::new("/scratch/ws");
        let ext4 = Some(0xEF53);
        let nodes = |names: &[&str]| names.iter().map(ToString::to_string).collect();
        assert_eq!(unseen_by(root, ext4, &nodes(&["vm"]), "vm"), None);
        assert_eq!(
            unseen_by(root, ext4, &nodes(&["vm"]), "vm.cluster.example"),
            None
        );
        let refused = unseen_by(root, ext4, &nodes(&["vm", "gpu01", "gpu02"]), "vm")
            .expect("a local disk on a cluster of three nodes is refused");
        assert!(refused.contains("gpu01, gpu02"), "{refused}");
        assert!(refused.contains("0xef53"), "{refused}");
        assert!(refused.contains("check_shared_store"), "{refused}");
        let nfs = Some(0x6969);
        assert_eq!(
            unseen_by(root, nfs, &nodes(&["gpu01", "gpu02"]), "login"),
            None
        );
        let lustre = Some(0x0BD0_0BD0);
        assert_eq!(unseen_by(root, lustre, &nodes(&["gpu01"]), "login"), None);
    }
}
