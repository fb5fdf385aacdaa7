//! A worker process of `trainyard serve` (`trainyard worker`, started and supervised by
//! the server): claims the oldest queued job, runs it as `trainyard run` in a child
//! process, and beats the job's heartbeat until the run ends.
//!
//! - A cancel asked for while the job runs sends the run SIGTERM: a training stage
//!   writes a checkpoint, and the job is `cancelled`.
//! - A worker told to stop (SIGTERM, or its server died: the server starts workers with
//!   a parent-death signal) stops its run the same way and puts the job back in the
//!   queue, where the next worker continues it from the store and the checkpoint.
//! - A killed worker's run gets SIGTERM from the kernel (parent-death signal), and its
//!   job, its heartbeat silent, is requeued by the server.
//!
//! Each attempt's output goes to `.trainyard/serve/jobs/<id>/attempt-<n>.log`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::queue::{Job, Outcome, Queue, QueueError};
use crate::executor::RUN_ID_FILE_ENV;

/// How a worker paces itself.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The worker's name in the queue.
    pub name: String,
    /// How often the heartbeat is beaten (and the run checked).
    pub heartbeat: Duration,
    /// How long to wait between looks at an empty queue.
    pub poll: Duration,
    /// `--progress-every` of the runs (their periodic progress line, in the log).
    pub progress_every: Duration,
}

/// The directory of job `id`'s attempt logs.
pub fn job_dir(root: &Path, id: i64) -> PathBuf {
    root.join(".trainyard")
        .join("serve")
        .join("jobs")
        .join(id.to_string())
}

/// The pipeline file `pipeline` (relative to the workspace root, or absolute) as an
/// absolute path, if it lies inside the workspace at `root`; an error saying why not.
pub fn pipeline_in_workspace(root: &Path, pipeline: &str) -> Result<PathBuf, String> {
    let root = root
        .canonicalize()
        .map_err(|error| format!("workspace {}: {error}", root.display()))?;
    let path = root.join(pipeline);
    let resolved = path
        .canonicalize()
        .map_err(|error| format!("pipeline `{pipeline}`: {error}"))?;
    if !resolved.starts_with(&root) {
        return Err(format!(
            "pipeline `{pipeline}` is outside the workspace {}",
            root.display()
        ));
    }
    if !resolved.is_file() {
        return Err(format!("pipeline `{pipeline}` is not a file"));
    }
    Ok(resolved)
}

/// Runs jobs from the queue of the workspace at `root` until `stop` is set.
pub fn work(root: &Path, options: &WorkerOptions, stop: &AtomicBool) -> Result<(), QueueError> {
    let mut queue = Queue::open(root)?;
    while !stop.load(Ordering::Relaxed) {
        match queue.claim(&options.name)? {
            Some(job) => {
                let outcome = run_job(root, &queue, &job, options, stop)?;
                queue.finish(job.id, &options.name, &outcome)?;
            }
            None => sleep_unless(options.poll, stop),
        }
    }
    Ok(())
}

fn sleep_unless(pause: Duration, stop: &AtomicBool) {
    let until = Instant::now() + pause;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(pause));
    }
}

/// Runs one attempt of `job` and says how it ended.
fn run_job(
    root: &Path,
    queue: &Queue,
    job: &Job,
    options: &WorkerOptions,
    stop: &AtomicBool,
) -> Result<Outcome, QueueError> {
    let pipeline = match pipeline_in_workspace(root, &job.spec.pipeline) {
        Ok(pipeline) => pipeline,
        Err(message) => return Ok(Outcome::Failed(message)),
    };
    let dir = job_dir(root, job.id);
    if let Err(error) = std::fs::create_dir_all(&dir) {
        return Ok(Outcome::Failed(format!("{}: {error}", dir.display())));
    }
    let log_path = dir.join(format!("attempt-{}.log", job.starts));
    let run_id_path = dir.join(format!("attempt-{}.run", job.starts));
    let mut child = match spawn_run(root, &pipeline, job, options, &log_path, &run_id_path) {
        Ok(child) => child,
        Err(error) => {
            return Ok(Outcome::Failed(format!(
                "starting `trainyard run`: {error}"
            )));
        }
    };
    let mut recorded_run = false;
    let mut signalled: Option<Outcome> = None;
    let mut last_beat = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
        let stopping = stop.load(Ordering::Relaxed);
        if last_beat.elapsed() < options.heartbeat && !(stopping && signalled.is_none()) {
            continue;
        }
        last_beat = Instant::now();
        if !recorded_run && let Ok(id) = std::fs::read_to_string(&run_id_path) {
            let id = id.trim();
            if !id.is_empty() {
                queue.add_run(job.id, id)?;
                recorded_run = true;
            }
        }
        if signalled.is_none() {
            let reason = if stopping {
                Some(Outcome::Requeue)
            } else {
                match queue.heartbeat(job.id, &options.name)? {
                    // Requeued meanwhile (this worker was presumed dead): stop.
                    None => Some(Outcome::Requeue),
                    Some(true) => Some(Outcome::Cancelled),
                    Some(false) => None,
                }
            };
            if let Some(reason) = reason {
                terminate(&child);
                signalled = Some(reason);
            }
        } else {
            // Still ours while the run checkpoints and exits.
            let _ = queue.heartbeat(job.id, &options.name)?;
        }
    };
    if !recorded_run && let Ok(id) = std::fs::read_to_string(&run_id_path) {
        let id = id.trim();
        if !id.is_empty() {
            queue.add_run(job.id, id)?;
        }
    }
    Ok(match (signalled, status.success()) {
        (Some(outcome), _) => outcome,
        (None, true) => Outcome::Succeeded,
        (None, false) => Outcome::Failed(format!(
            "`trainyard run` exited with {status}:\n{}",
            crate::stages::command::tail_of(&log_path, 40)
        )),
    })
}

/// Starts `trainyard run` for `job`, its output into `log_path`.
fn spawn_run(
    root: &Path,
    pipeline: &Path,
    job: &Job,
    options: &WorkerOptions,
    log_path: &Path,
    run_id_path: &Path,
) -> std::io::Result<Child> {
    let log = std::fs::File::create(log_path)?;
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("--workspace")
        .arg(root)
        .arg("run")
        .arg(pipeline)
        .args(job.spec.run_args())
        .arg("--progress-every")
        .arg(options.progress_every.as_secs().max(1).to_string())
        .env(RUN_ID_FILE_ENV, run_id_path)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    stop_with_parent(&mut command);
    command.spawn()
}

/// Makes the child get SIGTERM when the process that started it dies (Linux's
/// parent-death signal), so no run outlives its worker nor a worker its server.
pub fn stop_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// SIGTERM to `child` (a run checkpoints and exits on it).
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}
