//! Runs a pipeline: stages in topological order, each one only if no finished output
//! with its fingerprint exists, independent stages side by side (`--jobs`), under the
//! workspace lock, recording everything in `runs/<run-id>/`.
//!
//! The same walk, without executing, answers `status` and `--dry-run`: a stage is
//! `cached`, or `will run` with the reasons from [`crate::fingerprint::explain`].
//!
//! Where a stage executes is the executor's choice: here, in this process, or as a
//! Slurm job running `trainyard exec-stage` on a node ([`slurm`]); the walk that decides
//! what must run is the same.

pub mod slurm;

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use crate::config::ResolvedPipeline;
use crate::dag::{Binding, Dag};
use crate::fingerprint::{self, InputRecord, InputSource, Reason, StageIdentity};
use crate::hashing::ContentHasher;
use crate::hf_cache::Snapshot;
use crate::interrupt::CancelFlag;
use crate::path_error::AtPath;
use crate::runs::{
    self, RunRecord, RunRecorder, RunStatus, StageExecution, StageRunRecord, StageStatus,
};
use crate::stages::{STAGE_LOG, StageContext, StageError, invalid};
use crate::store::{self, LockError, MANIFEST, Manifest, Workspace};
use crate::suggest::did_you_mean;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stages to rerun even if cached.
    pub force: Vec<String>,
    /// Rerun every selected stage.
    pub force_all: bool,
    /// Run only this stage (its upstream stages must be cached).
    pub only: Option<String>,
    /// Run this stage and everything it depends on, nothing downstream.
    pub until: Option<String>,
    /// Report what would run, run nothing.
    pub dry_run: bool,
    /// Stages run at the same time, at most.
    pub jobs: usize,
    /// Keep running independent stages after a failure.
    pub keep_going: bool,
    /// Wait for the workspace lock instead of failing when another run holds it.
    pub wait_for_lock: bool,
    /// Continue an interrupted training stage from its last checkpoint (off: start it
    /// over, discarding the checkpoints).
    pub resume: bool,
    /// Re-read every input and stored output instead of trusting unchanged file
    /// signatures (size, mtime, inode).
    pub verify: bool,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// With `progress`, when stderr is not a terminal: a line this often saying what
    /// runs (a terminal gets progress bars instead).
    pub progress_every: Option<std::time::Duration>,
    /// The command line, for the run record.
    pub command_line: Vec<String>,
    /// With the Slurm executor: return once the jobs are submitted (`trainyard status`
    /// follows them) instead of waiting for them.
    pub detach: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            force: Vec::new(),
            force_all: false,
            only: None,
            until: None,
            dry_run: false,
            jobs: 1,
            keep_going: false,
            wait_for_lock: true,
            resume: true,
            verify: false,
            progress: false,
            progress_every: None,
            command_line: Vec::new(),
            detach: false,
        }
    }
}

/// One stage's result.
#[derive(Debug, Clone)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Kind name.
    pub kind: &'static str,
    /// What happened.
    pub status: StageStatus,
    /// Its identity, once its inputs were known.
    pub identity: Option<StageIdentity>,
    /// Fingerprint of `identity`.
    pub fingerprint: Option<String>,
    /// Absolute paths of its external inputs.
    pub input_paths: BTreeMap<String, PathBuf>,
    /// Why it ran or would run.
    pub reasons: Vec<Reason>,
    /// Its store directory and manifest, when it has an output.
    pub output: Option<(PathBuf, Manifest)>,
    /// Seconds spent running.
    pub duration_s: Option<f64>,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    /// Where it ran, once it ran (or was submitted).
    pub execution: Option<StageExecution>,
}

impl StageReport {
    fn new(name: &str, kind: &'static str, status: StageStatus) -> StageReport {
        StageReport {
            name: name.to_string(),
            kind,
            status,
            identity: None,
            fingerprint: None,
            input_paths: BTreeMap::new(),
            reasons: Vec::new(),
            output: None,
            duration_s: None,
            error: None,
            execution: None,
        }
    }

    fn succeeded(&self) -> bool {
        matches!(self.status, StageStatus::Cached | StageStatus::Executed)
    }
}

/// The result of [`run`] or [`status`].
#[derive(Debug)]
pub struct RunReport {
    /// `runs/<id>/`, for real runs.
    pub run_dir: Option<PathBuf>,
    /// Every stage, in topological order.
    pub stages: Vec<StageReport>,
    /// How it ended.
    pub outcome: RunStatus,
}

impl RunReport {
    /// The report of the stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|stage| stage.name == name)
    }

    /// Names of the stages with `status`, in order.
    pub fn with_status(&self, status: StageStatus) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|stage| stage.status == status)
            .map(|stage| stage.name.as_str())
            .collect()
    }
}

/// Why a run could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The workspace lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// `--force` / `--only` / `--until` names no stage.
    #[error("{flag} {name}: no such stage{}", .help.as_ref().map(|help| format!("; {help}")).unwrap_or_default())]
    UnknownStage {
        /// The flag.
        flag: &'static str,
        /// The name given.
        name: String,
        /// A suggestion.
        help: Option<String>,
    },
    /// Slurm refused a command, or a job could not be read back.
    #[error("{0}")]
    Slurm(String),
    /// Jobs of an earlier `run --detach` are still queued or running.
    #[error(
        "run {run} still has Slurm jobs queued or running ({jobs}); `trainyard status` follows them: wait for them to finish, or scancel them"
    )]
    SlurmBusy {
        /// The detached run.
        run: String,
        /// Its live jobs, `stage=id` each.
        jobs: String,
    },
    /// Workspace I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The position of the stage `name` given to `flag`, or an error suggesting the closest.
fn stage_index(
    pipeline: &ResolvedPipeline,
    flag: &'static str,
    name: &str,
) -> Result<usize, ExecError> {
    pipeline
        .stages
        .iter()
        .position(|stage| stage.name == name)
        .ok_or_else(|| ExecError::UnknownStage {
            flag,
            name: name.to_string(),
            help: did_you_mean(
                name,
                pipeline.stages.iter().map(|stage| stage.name.as_str()),
            ),
        })
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExecError {
    let context = context.into();
    move |source| ExecError::Io { context, source }
}

/// When set, [`run`] writes the id of the run it records to this file as soon as
/// `runs/<id>/` exists (a `serve` worker follows the run's events from there).
pub const RUN_ID_FILE_ENV: &str = "TRAINYARD_RUN_ID_FILE";

/// Runs `pipeline` in `workspace`.
pub fn run(
    workspace: &Workspace,
    pipeline: &ResolvedPipeline,
    dag: &Dag,
    options: &RunOptions,
    cancel: &CancelFlag,
) -> Result<RunReport, ExecError> {
    // Flags naming stages are checked before anything is locked or recorded: a typo
    // must not leave a run record behind that looks killed.
    let named = options.force.iter().map(|name| ("--force", name));
    let named = named
        .chain(options.only.iter().map(|name| ("--only", name)))
        .chain(options.until.iter().map(|name| ("--until", name)));
    for (flag, name) in named {
        stage_index(pipeline, flag, name)?;
    }
    let _lock = if options.dry_run {
        None
    } else {
        let mut on_wait = |holder: &str| {
            crate::console::line(format_args!(
                "waiting for the workspace lock, held by {holder}"
            ));
        };
        Some(workspace.lock(options.wait_for_lock, &mut on_wait, Some(cancel))?)
    };
    if !options.dry_run {
        // Their records say `running` until settled, which a killed run's would too.
        for settled in slurm::settle_unfollowed(workspace)? {
            if options.progress {
                crate::console::line(format_args!(
                    "note: the Slurm jobs of run {} finished ({}); its record is complete",
                    settled.run_id, settled.status
                ));
            }
        }
    }
    if !options.dry_run
        && let Some(killed) = crate::runs::mark_killed_run(workspace)
            .map_err(io_error("reading the last run record"))?
        && options.progress
    {
        crate::console::line(format_args!(
            "note: run {killed} was killed before it finished; its record now says interrupted"
        ));
    }
    if !options.dry_run {
        let killed = crate::containment::kill_leftovers(&workspace.work_dir())
            .map_err(io_error("stopping processes a killed run left behind"))?;
        if killed > 0 && options.progress {
            crate::console::line(format_args!(
                "note: killed {killed} process(es) a killed run's command stages left running"
            ));
        }
        let restored = workspace
            .restore_unreplaced()
            .map_err(io_error("restoring store entries a killed run moved aside"))?;
        for entry in restored {
            if options.progress {
                crate::console::line(format_args!(
                    "note: restored {} (a killed run had moved it aside to replace it)",
                    entry.display()
                ));
            }
        }
    }
    let on_slurm = pipeline.executor.kind == crate::config::ExecutorKind::Slurm;
    if on_slurm && !options.dry_run {
        // Before anything is recorded: a store the nodes cannot see is a setup error.
        slurm::check_pipeline_store(workspace, pipeline)?;
    }
    let recorder = if options.dry_run {
        None
    } else {
        Some(
            RunRecorder::create(workspace, &pipeline.name)
                .map_err(io_error("creating the run directory"))?,
        )
    };
    let engine = Engine {
        workspace,
        pipeline,
        dag,
        options,
        cancel,
        hasher: {
            let hasher = ContentHasher::open(&workspace.stat_cache()).with_cancel(cancel);
            if options.verify {
                hasher.rehashing_everything()
            } else {
                hasher
            }
        },
        recorder: recorder.as_ref(),
        console: Mutex::default(),
        running: Mutex::default(),
        plan_only: on_slurm,
    };
    if let (Some(recorder), Some(path)) = (&recorder, std::env::var_os(RUN_ID_FILE_ENV)) {
        // A `serve` worker follows this run's events from the start.
        std::fs::write(&path, &recorder.id).map_err(io_error(format!(
            "writing the run id to {}",
            std::path::Path::new(&path).display()
        )))?;
    }
    let started = SystemTime::now();
    // Built once and finished at the end: the settings and origins of a big pipeline
    // are most of the record and do not change during the run.
    let mut record = None;
    if let Some(recorder) = &recorder {
        recorder.event(
            "run_started",
            serde_json::json!({ "pipeline": pipeline.name, "run_id": recorder.id }),
        );
        let started_record = engine.run_record(&recorder.id, started);
        recorder
            .write_record(&started_record, false)
            .map_err(io_error("writing resolved_settings.json"))?;
        record = Some(started_record);
    }
    let stop_ticker = std::sync::atomic::AtomicBool::new(false);
    let reports = std::thread::scope(|scope| {
        if let Some(every) = options
            .progress_every
            .filter(|_| options.progress && !options.dry_run && !std::io::stderr().is_terminal())
        {
            let (engine, stop) = (&engine, &stop_ticker);
            scope.spawn(move || engine.tick(every, stop));
        }
        let reports = match (engine.plan_only && !options.dry_run, &recorder) {
            (true, Some(recorder)) => engine
                .walk()
                .and_then(|planned| slurm::submit_and_wait(&engine, recorder, planned)),
            _ => engine.walk(),
        };
        stop_ticker.store(true, std::sync::atomic::Ordering::Relaxed);
        reports
    })?;
    engine
        .hasher
        .save()
        .map_err(io_error("saving the stat cache"))?;
    let outcome = if reports
        .iter()
        .any(|report| report.status == StageStatus::Submitted)
    {
        RunStatus::Running
    } else if reports
        .iter()
        .any(|report| report.status == StageStatus::Interrupted)
        || cancel.is_cancelled()
    {
        RunStatus::Interrupted
    } else if reports
        .iter()
        .any(|report| matches!(report.status, StageStatus::Failed | StageStatus::Skipped))
    {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    if let (Some(recorder), Some(mut record)) = (&recorder, record) {
        let status = outcome;
        record.status = status;
        if status != RunStatus::Running {
            record.finished_at = Some(runs::timestamp(SystemTime::now()));
        }
        record.stages = engine.stage_records(&reports);
        recorder
            .write_record(&record, true)
            .map_err(io_error("writing resolved_settings.json"))?;
        // Detached: `settle_unfollowed` finishes the record once the jobs are done.
        if status != RunStatus::Running {
            recorder.event("run_finished", serde_json::json!({ "status": status }));
        }
        recorder
            .mark_latest()
            .map_err(io_error("updating runs/latest"))?;
    }
    Ok(RunReport {
        run_dir: recorder.map(|recorder| recorder.dir),
        stages: reports,
        outcome,
    })
}

/// What `run` would do, without the lock, a run directory, or executing anything.
pub fn status(
    workspace: &Workspace,
    pipeline: &ResolvedPipeline,
    dag: &Dag,
) -> Result<RunReport, ExecError> {
    let options = RunOptions {
        dry_run: true,
        ..RunOptions::default()
    };
    let cancel = CancelFlag::new();
    let engine = Engine {
        workspace,
        pipeline,
        dag,
        options: &options,
        cancel: &cancel,
        hasher: ContentHasher::open(&workspace.stat_cache()),
        recorder: None,
        console: Mutex::default(),
        running: Mutex::default(),
        plan_only: false,
    };
    let stages = engine.walk()?;
    // Saving is only an optimisation; a read-only workspace must not fail `status`.
    let _ = engine.hasher.save();
    Ok(RunReport {
        run_dir: None,
        stages,
        outcome: RunStatus::Succeeded,
    })
}

struct Engine<'a> {
    workspace: &'a Workspace,
    pipeline: &'a ResolvedPipeline,
    dag: &'a Dag,
    options: &'a RunOptions,
    cancel: &'a CancelFlag,
    hasher: ContentHasher,
    recorder: Option<&'a RunRecorder>,
    /// Lines of cached stages not yet written (see [`Engine::progress_batched`]).
    console: Mutex<BatchedLines>,
    /// The stages running now, for the periodic progress line (see [`Engine::tick`]).
    running: Mutex<BTreeMap<String, Activity>>,
    /// Decide without executing: a stage that must run is reported `will run` (with its
    /// fingerprint when its inputs are known), for the Slurm executor to submit.
    plan_only: bool,
}

/// A running stage as the periodic progress line shows it.
struct Activity {
    /// When it started.
    since: Instant,
    /// Its last training step, as `step 120/600, loss 2.345, 1.2k tokens/s`.
    detail: Option<String>,
}

/// Console lines written together: a no-op run of a big pipeline prints one line per
/// stage in a burst, and a write each (stderr is unbuffered) cost tens of thousands of
/// system calls.
#[derive(Default)]
struct BatchedLines {
    text: String,
    since: Option<Instant>,
}

/// Batched lines are written once they are this old or this long.
const BATCH_AGE: Duration = Duration::from_millis(100);
const BATCH_BYTES: usize = 32 << 10;

enum Slot {
    Pending,
    Running,
    Done(Box<StageReport>),
}

/// A stage ready to execute: its identity and where its inputs are.
struct Job {
    index: usize,
    identity: StageIdentity,
    fingerprint: String,
    inputs: BTreeMap<String, PathBuf>,
    report: StageReport,
}

impl Engine<'_> {
    fn stage_index(&self, flag: &'static str, name: &str) -> Result<usize, ExecError> {
        stage_index(self.pipeline, flag, name)
    }

    fn progress(&self, line: std::fmt::Arguments<'_>) {
        if self.options.progress {
            self.flush_progress();
            crate::console::line(line);
        }
    }

    /// Like [`Engine::progress`], for the lines of a burst (cached stages): they wait
    /// until [`BATCH_AGE`] or [`BATCH_BYTES`] is reached, the next unbatched line, or
    /// [`Engine::flush_progress`].
    fn progress_batched(&self, line: std::fmt::Arguments<'_>) {
        if !self.options.progress {
            return;
        }
        let full = {
            let Ok(mut batch) = self.console.lock() else {
                return;
            };
            use std::fmt::Write as _;
            let _ = writeln!(batch.text, "{line}");
            let since = *batch.since.get_or_insert_with(Instant::now);
            batch.text.len() >= BATCH_BYTES || since.elapsed() >= BATCH_AGE
        };
        if full {
            self.flush_progress();
        }
    }

    /// Writes the batched lines.
    fn flush_progress(&self) {
        let Ok(mut batch) = self.console.lock() else {
            return;
        };
        if !batch.text.is_empty() {
            crate::console::write(&batch.text);
            batch.text.clear();
        }
        batch.since = None;
    }

    /// Until `stop`, every `every`: one line on stderr naming each running stage, how
    /// long it has run and its last training step. For runs whose stderr is a file or a
    /// service's log, where progress bars are not drawn and a long stage would
    /// otherwise print nothing between "running" and "done".
    fn tick(&self, every: Duration, stop: &std::sync::atomic::AtomicBool) {
        let mut last = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100).min(every));
            if last.elapsed() < every {
                continue;
            }
            last = Instant::now();
            let Ok(running) = self.running.lock() else {
                return;
            };
            if running.is_empty() {
                continue;
            }
            let stages: Vec<String> = running
                .iter()
                .map(|(name, activity)| {
                    let elapsed = humantime::format_duration(Duration::from_secs(
                        activity.since.elapsed().as_secs(),
                    ));
                    match &activity.detail {
                        Some(detail) => format!("{name} ({elapsed}, {detail})"),
                        None => format!("{name} ({elapsed})"),
                    }
                })
                .collect();
            drop(running);
            self.progress(format_args!("  ...      running {}", stages.join("; ")));
        }
    }

    /// An event a running stage reports (a training step, an evaluation): into the
    /// run's `logs.jsonl` with the stage's name, and a training step into the periodic
    /// progress line.
    fn stage_event(&self, stage: &str, event: &str, fields: serde_json::Value) {
        self.note_activity(stage, event, &fields);
        let mut fields = fields;
        if let serde_json::Value::Object(map) = &mut fields {
            map.insert("stage".to_string(), serde_json::json!(stage));
        }
        if let Some(recorder) = self.recorder {
            recorder.event(event, fields);
        }
    }

    /// Keeps a running stage's last training step for the periodic progress line.
    fn note_activity(&self, stage: &str, event: &str, fields: &serde_json::Value) {
        if event == "train_step"
            && let Ok(mut running) = self.running.lock()
            && let Some(activity) = running.get_mut(stage)
        {
            let number = |key: &str| fields.get(key).and_then(serde_json::Value::as_f64);
            let mut detail = match (number("step"), number("steps")) {
                (Some(step), Some(steps)) => format!("step {step}/{steps}"),
                (Some(step), None) => format!("step {step}"),
                _ => String::new(),
            };
            if let Some(loss) = number("loss") {
                detail.push_str(&format!(", loss {loss:.4}"));
            }
            if let Some(speed) = number("tokens_per_s") {
                detail.push_str(&format!(", {speed:.0} tokens/s"));
            }
            activity.detail = Some(detail);
        }
    }

    /// Records a stage event in the run's `logs.jsonl`, and logs it (`-v` shows them).
    fn event(&self, event: &str, fields: serde_json::Value) {
        tracing::info!(target: "trainyard::run", event, %fields);
        if let Some(recorder) = self.recorder {
            recorder.event(event, fields);
        }
    }

    /// Visits every stage in order, deciding and (unless dry) executing.
    fn walk(&self) -> Result<Vec<StageReport>, ExecError> {
        let count = self.pipeline.stages.len();
        let mut forced = BTreeSet::new();
        for name in &self.options.force {
            forced.insert(self.stage_index("--force", name)?);
        }
        if self.options.force_all {
            forced.extend(0..count);
        }
        let selected: BTreeSet<usize> = match (&self.options.only, &self.options.until) {
            (Some(only), _) => BTreeSet::from([self.stage_index("--only", only)?]),
            (None, Some(until)) => self
                .dag
                .ancestors_and_self(self.stage_index("--until", until)?),
            (None, None) => (0..count).collect(),
        };
        let needed: BTreeSet<usize> = selected
            .iter()
            .flat_map(|&index| self.dag.ancestors_and_self(index))
            .collect();

        let mut slots: Vec<Slot> = (0..count).map(|_| Slot::Pending).collect();
        let mut stopped_by: Option<String> = None;
        let jobs = self.options.jobs.max(1);
        // Each stage is decided once, when its last upstream stage is done, and the
        // decided jobs wait in file order for a free slot. (Rescanning every stage after
        // each launch, and deciding waiting stages again, made a run quadratic in the
        // number of stages.)
        let position: Vec<usize> = {
            let mut position = vec![0; count];
            for (at, &index) in self.dag.order.iter().enumerate() {
                position[index] = at;
            }
            position
        };
        let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); count];
        let mut waiting_for: Vec<usize> = (0..count)
            .map(|index| {
                let upstream = self.dag.upstream(index);
                for &up in &upstream {
                    downstream[up].push(index);
                }
                upstream.len()
            })
            .collect();
        // Stages whose upstream stages are all done, and decided jobs without a slot
        // yet, both by position in `dag.order`.
        let mut ready: BTreeSet<usize> = (0..count)
            .filter(|&index| waiting_for[index] == 0)
            .map(|index| position[index])
            .collect();
        let mut queued: BTreeMap<usize, Box<Job>> = BTreeMap::new();
        let done = |index: usize, ready: &mut BTreeSet<usize>, waiting_for: &mut Vec<usize>| {
            for &down in &downstream[index] {
                waiting_for[down] -= 1;
                if waiting_for[down] == 0 {
                    ready.insert(position[down]);
                }
            }
        };
        std::thread::scope(|scope| {
            let (sender, receiver) = mpsc::channel::<(usize, StageReport)>();
            let mut running = 0usize;
            loop {
                while let Some(at) = ready.pop_first() {
                    let index = self.dag.order[at];
                    let stage = &self.pipeline.stages[index];
                    if !needed.contains(&index) {
                        slots[index] = Slot::Done(Box::new(StageReport::new(
                            &stage.name,
                            stage.kind.name,
                            StageStatus::NotSelected,
                        )));
                        done(index, &mut ready, &mut waiting_for);
                        continue;
                    }
                    let decision = self.decide_after_upstream(
                        index,
                        &slots,
                        &forced,
                        &selected,
                        stopped_by.as_deref(),
                    );
                    match decision {
                        Decision::Done(report) => {
                            if report.status == StageStatus::Failed && !self.options.keep_going {
                                stopped_by.get_or_insert_with(|| stage.name.clone());
                            }
                            slots[index] = Slot::Done(report);
                            done(index, &mut ready, &mut waiting_for);
                        }
                        Decision::Execute(job) => {
                            queued.insert(at, job);
                        }
                    }
                }
                // A failure or an interrupt since a job was queued: decide it again,
                // which now skips it (and says why).
                if stopped_by.is_some() || self.cancel.is_cancelled() {
                    for (at, _) in std::mem::take(&mut queued) {
                        let index = self.dag.order[at];
                        let decision = self.decide_after_upstream(
                            index,
                            &slots,
                            &forced,
                            &selected,
                            stopped_by.as_deref(),
                        );
                        if let Decision::Done(report) = decision {
                            slots[index] = Slot::Done(report);
                            done(index, &mut ready, &mut waiting_for);
                        }
                    }
                    if !ready.is_empty() {
                        continue;
                    }
                }
                while running < jobs
                    && let Some((at, job)) = queued.pop_first()
                {
                    let index = self.dag.order[at];
                    let sender = sender.clone();
                    running += 1;
                    slots[index] = Slot::Running;
                    scope.spawn(move || {
                        let report = self.execute(*job);
                        let _ = sender.send((index, report));
                    });
                }
                self.flush_progress();
                if running == 0 {
                    break;
                }
                let Ok((index, report)) = receiver.recv() else {
                    break;
                };
                running -= 1;
                if matches!(
                    report.status,
                    StageStatus::Failed | StageStatus::Interrupted
                ) && !self.options.keep_going
                {
                    stopped_by.get_or_insert_with(|| report.name.clone());
                }
                slots[index] = Slot::Done(Box::new(report));
                done(index, &mut ready, &mut waiting_for);
            }
        });
        let mut reports = Vec::with_capacity(count);
        for &index in &self.dag.order {
            let stage = &self.pipeline.stages[index];
            match std::mem::replace(&mut slots[index], Slot::Pending) {
                Slot::Done(report) => reports.push(*report),
                _ => reports.push(StageReport::new(
                    &stage.name,
                    stage.kind.name,
                    StageStatus::Skipped,
                )),
            }
        }
        Ok(reports)
    }

    /// [`Self::decide`] for a stage whose upstream stages are all done.
    fn decide_after_upstream(
        &self,
        index: usize,
        slots: &[Slot],
        forced: &BTreeSet<usize>,
        selected: &BTreeSet<usize>,
        stopped_by: Option<&str>,
    ) -> Decision {
        let upstream: Vec<(usize, &StageReport)> = self
            .dag
            .upstream(index)
            .into_iter()
            .filter_map(|up| match &slots[up] {
                Slot::Done(report) => Some((up, report.as_ref())),
                _ => None,
            })
            .collect();
        self.decide(index, &upstream, forced, selected, stopped_by)
    }

    fn decide(
        &self,
        index: usize,
        upstream: &[(usize, &StageReport)],
        forced: &BTreeSet<usize>,
        selected: &BTreeSet<usize>,
        stopped_by: Option<&str>,
    ) -> Decision {
        let stage = &self.pipeline.stages[index];
        let mut report = StageReport::new(&stage.name, stage.kind.name, StageStatus::Skipped);
        let will_run: Vec<String> = upstream
            .iter()
            .filter(|(_, report)| report.status == StageStatus::WillRun)
            .map(|(_, report)| report.name.clone())
            .collect();
        if !will_run.is_empty() {
            report.status = StageStatus::WillRun;
            report
                .reasons
                .push(Reason::UpstreamWillRun { stages: will_run });
            return Decision::Done(Box::new(report));
        }
        if let Some((_, failed)) = upstream.iter().find(|(_, report)| !report.succeeded()) {
            report.error = Some(format!(
                "upstream stage `{}` {}",
                failed.name,
                failed.status.as_str()
            ));
            self.progress(format_args!(
                "  skipped  {} (upstream `{}` {})",
                stage.name,
                failed.name,
                failed.status.as_str()
            ));
            return Decision::Done(Box::new(report));
        }
        if self.cancel.is_cancelled() {
            report.error = Some("the run was interrupted".to_string());
            self.progress(format_args!(
                "  skipped  {} (the run was interrupted)",
                stage.name
            ));
            return Decision::Done(Box::new(report));
        }
        if let Some(failed) = stopped_by {
            report.error = Some(format!(
                "the run stopped after `{failed}` failed (use --keep-going to continue)"
            ));
            self.progress(format_args!(
                "  skipped  {} (not run: `{failed}` failed; --keep-going runs stages that do not depend on it)",
                stage.name
            ));
            return Decision::Done(Box::new(report));
        }
        let (identity, inputs) = match self.identity_of(index, upstream) {
            Ok(found) => found,
            Err(_) if self.cancel.is_cancelled() => {
                report.status = StageStatus::Interrupted;
                report.error = Some("interrupted".to_string());
                self.progress(format_args!(
                    "  stopped  {} (interrupted while hashing its inputs)",
                    stage.name
                ));
                return Decision::Done(Box::new(report));
            }
            Err(message) => {
                report.status = StageStatus::Failed;
                self.progress(format_args!("  FAILED   {}: {message}", stage.name));
                report.error = Some(message);
                return Decision::Done(Box::new(report));
            }
        };
        let fingerprint = identity.fingerprint();
        report.input_paths = self.external_paths(index);
        report.fingerprint = Some(fingerprint.clone());
        let is_forced = forced.contains(&index) && selected.contains(&index);
        let mut corrupted = None;
        let cached = if is_forced {
            None
        } else {
            let checked = match self.workspace.lookup(&stage.name, &fingerprint) {
                Ok(Some(manifest)) => self.check_stored(&stage.name, &fingerprint, manifest),
                Ok(None) => Ok(None),
                Err(problem) => Err(self.set_aside(&stage.name, &fingerprint, problem)),
            };
            match checked {
                Ok(intact) => intact,
                Err(detail) => {
                    corrupted = Some(Reason::OutputCorrupted { detail });
                    None
                }
            }
        };
        if let Some(manifest) = cached {
            report.status = StageStatus::Cached;
            report.output = Some((
                self.workspace.entry_dir(&stage.name, &fingerprint),
                manifest,
            ));
            self.progress_batched(format_args!(
                "  cached   {} ({}) {}",
                stage.name,
                stage.kind.name,
                &fingerprint[..12]
            ));
            self.after_use(&report, &identity);
            report.identity = Some(identity);
            return Decision::Done(Box::new(report));
        }
        report.reasons = if is_forced {
            vec![Reason::Forced]
        } else if let Some(reason) = corrupted {
            vec![reason]
        } else {
            match self.workspace.last_identity(&stage.name) {
                None => vec![Reason::NeverRan],
                Some(previous) => {
                    let reasons = fingerprint::explain(&previous, &identity);
                    if reasons.is_empty() {
                        vec![Reason::OutputMissing]
                    } else {
                        reasons
                    }
                }
            }
        };
        if !selected.contains(&index) {
            report.status = StageStatus::Failed;
            report.error = Some(format!(
                "stage `{}` has no cached output for its current settings and inputs ({}); run it first, or drop --only",
                stage.name,
                report
                    .reasons
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            self.progress(format_args!(
                "  FAILED   {}",
                report.error.as_deref().unwrap_or_default()
            ));
            return Decision::Done(Box::new(report));
        }
        report.identity = Some(identity.clone());
        if self.options.dry_run || self.plan_only {
            report.status = StageStatus::WillRun;
            return Decision::Done(Box::new(report));
        }
        Decision::Execute(Box::new(Job {
            index,
            identity,
            fingerprint,
            inputs,
            report,
        }))
    }

    /// `manifest`'s entry if its files still match it (their signatures, or their
    /// bytes when a signature changed or `--verify` was given). A corrupted entry is
    /// moved to quarantine (except in a dry run) and what was wrong returned.
    fn check_stored(
        &self,
        stage: &str,
        fingerprint: &str,
        manifest: Manifest,
    ) -> Result<Option<Manifest>, String> {
        let dir = self.workspace.entry_dir(stage, fingerprint);
        let problem = match store::check_entry(&self.hasher, &dir, &manifest) {
            Ok(None) => return Ok(Some(manifest)),
            Ok(Some(problem)) => problem,
            // Interrupted: the walk stops at the next stage; nothing is moved.
            Err(_) => return Ok(None),
        };
        Err(self.set_aside(stage, fingerprint, problem))
    }

    /// Moves the damaged entry of `stage` with `fingerprint` to quarantine (not in a dry
    /// run) and says what was wrong and where it went.
    fn set_aside(&self, stage: &str, fingerprint: &str, problem: String) -> String {
        if self.options.dry_run {
            format!("{problem}; the next run moves it aside and reruns the stage")
        } else {
            match self.workspace.quarantine(stage, fingerprint) {
                Ok(moved) => format!(
                    "{problem}; moved to {}",
                    moved
                        .strip_prefix(&self.workspace.root)
                        .unwrap_or(&moved)
                        .display()
                ),
                Err(error) => format!("{problem}; it could not be moved aside ({error})"),
            }
        }
    }

    /// Before a new output replaces the stored one (`--force`): a stored entry that no
    /// longer matches its manifest goes to quarantine, as it would have on a cached run,
    /// instead of being deleted.
    fn set_aside_if_damaged(&self, stage: &str, fingerprint: &str) {
        let dir = self.workspace.entry_dir(stage, fingerprint);
        if !dir.exists() {
            return;
        }
        let problem = match self.workspace.lookup(stage, fingerprint) {
            Ok(Some(manifest)) => store::check_entry(&self.hasher, &dir, &manifest)
                .ok()
                .flatten(),
            Ok(None) => None,
            Err(problem) => Some(problem),
        };
        if let Some(problem) = problem {
            let detail = self.set_aside(stage, fingerprint, problem);
            self.progress(format_args!(
                "  note     the stored output of `{stage}` being replaced was damaged: {detail}"
            ));
        }
    }

    /// Records that a run used `identity` for this stage (for `status` later) and
    /// links the output into the run directory.
    fn after_use(&self, report: &StageReport, identity: &StageIdentity) {
        let Some(recorder) = self.recorder else {
            return;
        };
        let fingerprint = match &report.fingerprint {
            Some(fingerprint) => fingerprint.clone(),
            None => identity.fingerprint(),
        };
        if let Err(error) =
            self.workspace
                .record_last_identity(&report.name, &fingerprint, identity)
        {
            tracing::warn!(
                "cannot record the last identity of `{}`: {error}",
                report.name
            );
        }
        if let Some((dir, _)) = &report.output
            && let Err(error) = recorder.link_output(self.workspace, &report.name, dir)
        {
            tracing::warn!("cannot link the output of `{}`: {error}", report.name);
        }
        self.event(
            if report.status == StageStatus::Cached {
                "stage_cached"
            } else {
                "stage_finished"
            },
            serde_json::json!({
                "stage": report.name,
                "fingerprint": report.fingerprint,
                "output_hash": report.output.as_ref().map(|(_, manifest)| &manifest.output_hash),
                "duration_s": report.duration_s,
            }),
        );
    }

    /// The portable name of every input of stage `index` (see
    /// [`crate::stages::portable_input_name`]).
    fn portable_names(
        &self,
        index: usize,
        inputs: &BTreeMap<String, PathBuf>,
    ) -> BTreeMap<String, String> {
        inputs
            .iter()
            .map(|(name, path)| {
                let hub = match self.dag.bindings[index].get(name) {
                    Some(Binding::External {
                        hub: Some(snapshot),
                        ..
                    }) => Some(snapshot.repo.as_str()),
                    _ => None,
                };
                let portable = crate::stages::portable_input_name(path, &self.workspace.root, hub);
                (name.clone(), portable)
            })
            .collect()
    }

    fn external_paths(&self, index: usize) -> BTreeMap<String, PathBuf> {
        self.dag.bindings[index]
            .iter()
            .filter_map(|(name, binding)| match binding {
                Binding::External { path, .. } => Some((name.clone(), path.clone())),
                Binding::Stage { .. } => None,
            })
            .collect()
    }

    /// The `hf:` inputs of stage `index`, with the snapshots they resolved to.
    fn hub_models(&self, index: usize) -> BTreeMap<String, Snapshot> {
        self.dag.bindings[index]
            .iter()
            .filter_map(|(input, binding)| match binding {
                Binding::External {
                    hub: Some(snapshot),
                    ..
                } => Some((input.clone(), (**snapshot).clone())),
                _ => None,
            })
            .collect()
    }

    /// The identity of stage `index` and the absolute path of each input. Upstream
    /// stages must already be done; their hashes come from their manifests.
    fn identity_of(
        &self,
        index: usize,
        upstream: &[(usize, &StageReport)],
    ) -> Result<(StageIdentity, BTreeMap<String, PathBuf>), String> {
        let stage = &self.pipeline.stages[index];
        let mut records = BTreeMap::new();
        let mut paths = BTreeMap::new();
        for (name, binding) in &self.dag.bindings[index] {
            let (record, path) = match binding {
                Binding::External { declared, path, .. } => {
                    let hash = self.hasher.hash_path(path).map_err(|error| {
                        format!("input `{name}`: cannot hash {}: {error}", path.display())
                    })?;
                    let source = InputSource::Path {
                        path: declared.clone(),
                    };
                    (InputRecord { source, hash }, path.clone())
                }
                Binding::Stage {
                    stage: upstream_index,
                    subpath,
                } => {
                    let upstream_name = &self.pipeline.stages[*upstream_index].name;
                    let (dir, manifest) = upstream
                        .iter()
                        .find(|(index, _)| index == upstream_index)
                        .and_then(|(_, report)| report.output.as_ref())
                        .ok_or_else(|| {
                            format!("input `{name}`: stage `{upstream_name}` has no output")
                        })?;
                    let hash = match subpath {
                        None => manifest.output_hash.clone(),
                        Some(subpath) => store::subpath_hash(&manifest.files, subpath).ok_or_else(|| {
                            format!(
                                "input `{name}`: stage `{upstream_name}` produced no `{subpath}`"
                            )
                        })?,
                    };
                    let path = subpath
                        .as_ref()
                        .map_or_else(|| dir.clone(), |subpath| dir.join(subpath));
                    let source = InputSource::Stage {
                        stage: upstream_name.clone(),
                        subpath: subpath.clone(),
                    };
                    (InputRecord { source, hash }, path)
                }
            };
            records.insert(name.clone(), record);
            paths.insert(name.clone(), path);
        }
        let identity = StageIdentity {
            kind: stage.kind.name.to_string(),
            kind_version: stage.kind.version,
            seed: self.pipeline.seed,
            settings: stage.settings.clone(),
            inputs: records,
        };
        Ok((identity, paths))
    }

    /// What happens to a checkpoint an interrupted run of a training stage left in
    /// `scratch`: announced as the resume point, or (with `--no-resume`) discarded.
    fn resume_note(&self, resumable: bool, scratch: &std::path::Path) -> Option<String> {
        if !resumable {
            return None;
        }
        let checkpoints = scratch.join(crate::train::trainer::CHECKPOINTS);
        let latest = crate::train::checkpoint::latest(&checkpoints)?;
        let name = latest
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if self.options.resume {
            return Some(format!(
                "resuming from checkpoint {name} of an interrupted run"
            ));
        }
        match std::fs::remove_dir_all(scratch) {
            Ok(()) => Some(format!(
                "starting over (--no-resume): checkpoint {name} discarded"
            )),
            Err(error) => Some(format!(
                "could not discard checkpoint {name} ({error}); resuming from it"
            )),
        }
    }

    /// Runs one stage into its scratch directory and publishes it.
    fn execute(&self, mut job: Job) -> StageReport {
        let stage = &self.pipeline.stages[job.index];
        let mut report = std::mem::replace(
            &mut job.report,
            StageReport::new(&stage.name, stage.kind.name, StageStatus::Skipped),
        );
        let scratch = if stage.kind.resumable {
            self.workspace.scratch_dir(&stage.name, &job.fingerprint)
        } else {
            self.workspace
                .attempt_scratch_dir(&stage.name, &job.fingerprint)
        };
        let mut reasons: Vec<String> = report.reasons.iter().map(ToString::to_string).collect();
        if let Some(note) = self.resume_note(stage.kind.resumable, &scratch) {
            reasons.push(note);
        }
        self.progress(format_args!(
            "  running  {} ({}): {}",
            stage.name,
            stage.kind.name,
            reasons.join("; ")
        ));
        self.event("stage_started", serde_json::json!({ "stage": stage.name, "fingerprint": job.fingerprint, "reasons": reasons }));
        let started_at = SystemTime::now();
        let clock = Instant::now();
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                stage.name.clone(),
                Activity {
                    since: clock,
                    detail: None,
                },
            );
        }
        let result = self.execute_in(stage, &job, &scratch, started_at, &clock);
        if let Ok(mut running) = self.running.lock() {
            running.remove(&stage.name);
        }
        report.duration_s = Some(clock.elapsed().as_secs_f64());
        report.execution = Some(StageExecution {
            executor: "local".to_string(),
            node: Some(runs::host_name()),
            ..StageExecution::default()
        });
        match result {
            Ok((dir, manifest)) => {
                report.status = StageStatus::Executed;
                self.progress(format_args!(
                    "  done     {} in {:.2}s",
                    stage.name,
                    clock.elapsed().as_secs_f64()
                ));
                report.output = Some((dir, manifest));
                self.after_use(&report, &job.identity);
            }
            Err(StageError::Interrupted) => {
                report.status = StageStatus::Interrupted;
                report.error = Some("interrupted".to_string());
                if !stage.kind.resumable {
                    prune_to_log(&scratch);
                }
                if stage.kind.resumable {
                    self.progress(format_args!(
                        "  stopped  {} (interrupted; its checkpoint is kept and the next run resumes from it)",
                        stage.name
                    ));
                } else {
                    self.progress(format_args!(
                        "  stopped  {} (interrupted; nothing was published)",
                        stage.name
                    ));
                }
                self.event(
                    "stage_interrupted",
                    serde_json::json!({ "stage": stage.name }),
                );
            }
            Err(error) => {
                report.status = StageStatus::Failed;
                if !stage.kind.resumable {
                    // A failed output is never used again: free its space (a disk-full
                    // failure must not keep the disk full) but keep the log to read.
                    prune_to_log(&scratch);
                }
                let message = format!("{error}\n(log: {})", scratch.join(STAGE_LOG).display());
                self.progress(format_args!(
                    "  FAILED   {} ({}): {message}",
                    stage.name, stage.kind.name
                ));
                self.event(
                    "stage_failed",
                    serde_json::json!({ "stage": stage.name, "error": error.to_string() }),
                );
                report.error = Some(message);
            }
        }
        report.identity = Some(job.identity);
        report
    }

    fn execute_in(
        &self,
        stage: &crate::config::ResolvedStage,
        job: &Job,
        scratch: &std::path::Path,
        started_at: SystemTime,
        clock: &Instant,
    ) -> Result<(PathBuf, Manifest), StageError> {
        if !stage.kind.resumable {
            // What failed or killed attempts left (their processes were killed when this
            // run started) is never reused: a fresh directory per attempt.
            for earlier in self
                .workspace
                .earlier_scratch_dirs(&stage.name, &job.fingerprint)
            {
                std::fs::remove_dir_all(&earlier).map_err(|error| {
                    StageError::io(format!("clearing {}", earlier.display()), error)
                })?;
            }
        }
        std::fs::create_dir_all(scratch).at(scratch)?;
        let log_path = scratch.join(STAGE_LOG);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .at(log_path)?;
        let input_names = self.portable_names(job.index, &job.inputs);
        let events = |event: &str, fields: serde_json::Value| {
            self.stage_event(&stage.name, event, fields);
        };
        let mut context = StageContext {
            stage: &stage.name,
            inputs: &job.inputs,
            input_names: &input_names,
            out_dir: scratch,
            seed: self.pipeline.seed,
            cancel: self.cancel,
            log: &mut log,
            events: &events,
        };
        let outcome = stage.kind.run(&stage.settings, &mut context)?;
        if scratch.join(MANIFEST).exists() {
            return Err(invalid(format!(
                "`{MANIFEST}` in the output directory is reserved for trainyard"
            )));
        }
        let hashed_at = SystemTime::now();
        let (output_hash, files) = store::hash_output(
            &ContentHasher::uncached().with_cancel(self.cancel),
            scratch,
            crate::stages::UNHASHED_OUTPUTS,
        )
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::Interrupted {
                return StageError::Interrupted;
            }
            StageError::io(
                format!("hashing the output in {}", scratch.display()),
                error,
            )
        })?;
        let manifest = Manifest {
            format: runs::RECORD_FORMAT,
            stage: stage.name.clone(),
            fingerprint: job.fingerprint.clone(),
            identity: job.identity.clone(),
            files,
            output_hash,
            started_at: runs::timestamp(started_at),
            finished_at: runs::timestamp(SystemTime::now()),
            duration_s: clock.elapsed().as_secs_f64(),
            exit_status: "succeeded".to_string(),
            metrics: outcome.metrics,
            trainyard_version: runs::VERSION.to_string(),
        };
        self.set_aside_if_damaged(&stage.name, &job.fingerprint);
        let dir = self
            .workspace
            .publish(scratch, &manifest)
            .map_err(|error| {
                StageError::io(format!("publishing the output of `{}`", stage.name), error)
            })?;
        for (relative, digest) in &manifest.files {
            self.hasher.remember(&dir.join(relative), digest, hashed_at);
        }
        Ok((dir, manifest))
    }

    /// The record of a run as it starts: `running`, no stages yet.
    fn run_record(&self, run_id: &str, started: SystemTime) -> RunRecord {
        RunRecord {
            format: runs::RECORD_FORMAT,
            run_id: run_id.to_string(),
            status: RunStatus::Running,
            started_at: runs::timestamp(started),
            finished_at: None,
            command_line: self.options.command_line.clone(),
            trainyard: runs::ToolRecord {
                version: runs::VERSION.to_string(),
                git_commit: runs::BUILD_COMMIT.to_string(),
            },
            workspace: runs::WorkspaceRecord {
                root: self.workspace.root.clone(),
                git_commit: runs::git_commit(&self.workspace.root),
            },
            pipeline: runs::PipelineRecord {
                name: self.pipeline.name.clone(),
                file: self.pipeline.file.clone(),
                absolute_path: std::path::absolute(&self.pipeline.file.path)
                    .unwrap_or_else(|_| self.pipeline.file.path.clone()),
            },
            profiles: self.pipeline.profiles.clone(),
            settings: self.pipeline.values_json(),
            origins: self
                .pipeline
                .origins
                .iter()
                .map(|(key, origin)| (key.clone(), origin.to_string()))
                .collect(),
            stages: BTreeMap::new(),
            machine: runs::MachineRecord::detect(),
        }
    }

    /// What happened to each stage, for the run record.
    fn stage_records(&self, reports: &[StageReport]) -> BTreeMap<String, StageRunRecord> {
        // By name once, not a search per stage: a record of thousands of stages would
        // otherwise cost quadratic time.
        let index_of: std::collections::HashMap<&str, usize> = self
            .pipeline
            .stages
            .iter()
            .enumerate()
            .map(|(index, stage)| (stage.name.as_str(), index))
            .collect();
        reports
            .iter()
            .map(|report| {
                let index = index_of.get(report.name.as_str()).copied();
                let stage = index.map(|index| &self.pipeline.stages[index]);
                let record = StageRunRecord {
                    kind: report.kind.to_string(),
                    kind_version: stage.map_or(0, |stage| stage.kind.version),
                    status: report.status,
                    fingerprint: report.fingerprint.clone(),
                    inputs: report
                        .identity
                        .as_ref()
                        .map(|identity| identity.inputs.clone())
                        .unwrap_or_default(),
                    input_paths: report.input_paths.clone(),
                    hub_models: index
                        .map(|index| self.hub_models(index))
                        .unwrap_or_default(),
                    output: report.output.as_ref().map(|(dir, _)| {
                        dir.strip_prefix(&self.workspace.root)
                            .unwrap_or(dir)
                            .to_path_buf()
                    }),
                    output_hash: report
                        .output
                        .as_ref()
                        .map(|(_, manifest)| manifest.output_hash.clone()),
                    duration_s: report.duration_s,
                    reasons: report.reasons.iter().map(ToString::to_string).collect(),
                    error: report.error.clone(),
                    execution: report.execution.clone(),
                };
                (report.name.clone(), record)
            })
            .collect()
    }
}

enum Decision {
    Done(Box<StageReport>),
    Execute(Box<Job>),
}

/// Removes everything in a failed stage's scratch but its log (best effort: the next
/// run of the stage clears it anyway, and `trainyard gc` removes it).
fn prune_to_log(scratch: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() == STAGE_LOG {
            continue;
        }
        let path = entry.path();
        let _ = if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}
