//! The durable job queue of `trainyard serve`: one SQLite database in the workspace
//! (`.trainyard/serve/queue.sqlite`, WAL mode), so jobs outlive the server, its workers
//! and the machine's restarts, and the CLI (`submit`, `jobs`, `cancel`) and the server
//! share it without a service in between.
//!
//! A job is a pipeline run: the pipeline file, profiles, `--set` values and run flags
//! ([`JobSpec`]). Its states: `queued` → `running` → `succeeded` | `failed` |
//! `cancelled`. A worker claims the oldest queued job in one transaction (so no job runs
//! twice) and beats a heartbeat while it runs it; a job whose worker stopped beating is
//! put back in the queue ([`Queue::requeue_stale`]) and continues through the store and
//! the exact resume every run has. A failed run is queued again while it has retries
//! left. Cancelling a queued job is immediate; a running one is flagged, and its worker
//! stops the run with SIGTERM (a training stage checkpoints first).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// A queue error: the database, or a request that does not fit the job's state.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// SQLite failed.
    #[error("job queue {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// No job has this id.
    #[error("no job {0}")]
    NoSuchJob(i64),
    /// The request does not apply to the job in its state.
    #[error("job {id} is {state}: {message}")]
    WrongState {
        /// The job.
        id: i64,
        /// Its state.
        state: JobState,
        /// Why the request does not apply.
        message: &'static str,
    },
    /// A stored job spec does not parse (written by another version?).
    #[error("job {id}: unreadable spec: {message}")]
    BadSpec {
        /// The job.
        id: i64,
        /// The parse error.
        message: String,
    },
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// A worker runs it.
    Running,
    /// Its run finished.
    Succeeded,
    /// Its run failed (and no retry is left).
    Failed,
    /// Cancelled before or while running.
    Cancelled,
}

impl JobState {
    /// The state's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|state| state.as_str() == name)
    }

    /// Whether the job is over (succeeded, failed or cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job runs: `trainyard run PIPELINE` with these profiles, overrides and flags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The pipeline file, relative to the workspace root (it must lie inside it).
    pub pipeline: String,
    /// Profiles, applied in order (`--profile`).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Overrides `KEY=VALUE` (`--set`).
    #[serde(default)]
    pub set: Vec<String>,
    /// Stages to rerun even if cached (`--force`).
    #[serde(default)]
    pub force: Vec<String>,
    /// Rerun every stage (`--force-all`).
    #[serde(default)]
    pub force_all: bool,
    /// Run only this stage (`--only`).
    #[serde(default)]
    pub only: Option<String>,
    /// Run this stage and its upstream (`--until`).
    #[serde(default)]
    pub until: Option<String>,
    /// Keep running independent stages after a failure (`--keep-going`).
    #[serde(default)]
    pub keep_going: bool,
    /// Start interrupted training over (`--no-resume`).
    #[serde(default)]
    pub no_resume: bool,
    /// Re-read every input and stored output (`--verify`).
    #[serde(default)]
    pub verify: bool,
    /// How many times a failed run is queued again before the job fails.
    #[serde(default)]
    pub retries: u32,
}

impl JobSpec {
    /// The arguments of `trainyard run` after the pipeline file.
    pub fn run_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for profile in &self.profiles {
            args.extend(["--profile".to_string(), profile.clone()]);
        }
        for set in &self.set {
            args.extend(["--set".to_string(), set.clone()]);
        }
        for stage in &self.force {
            args.extend(["--force".to_string(), stage.clone()]);
        }
        if self.force_all {
            args.push("--force-all".to_string());
        }
        if let Some(stage) = &self.only {
            args.extend(["--only".to_string(), stage.clone()]);
        }
        if let Some(stage) = &self.until {
            args.extend(["--until".to_string(), stage.clone()]);
        }
        for (flag, on) in [
            ("--keep-going", self.keep_going),
            ("--no-resume", self.no_resume),
            ("--verify", self.verify),
        ] {
            if on {
                args.push(flag.to_string());
            }
        }
        args
    }
}

/// A job as the queue holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    /// Its id (1, 2, …).
    pub id: i64,
    /// What it runs.
    pub spec: JobSpec,
    /// Where it is.
    pub state: JobState,
    /// Times a worker started it (restarts included).
    pub starts: u32,
    /// Failed runs so far.
    pub failures: u32,
    /// The run ids (`runs/<id>`) its runs recorded, oldest first.
    pub runs: Vec<String>,
    /// The worker running it.
    pub worker: Option<String>,
    /// Seconds since the epoch of the worker's last heartbeat.
    pub heartbeat: Option<f64>,
    /// A cancel was asked for while it ran.
    pub cancel_requested: bool,
    /// Why it failed (the end of its run's output).
    pub error: Option<String>,
    /// Seconds since the epoch: submitted, first started, finished.
    pub submitted_at: f64,
    /// First started.
    pub started_at: Option<f64>,
    /// Finished.
    pub finished_at: Option<f64>,
}

/// How a worker's run of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `trainyard run` succeeded.
    Succeeded,
    /// It failed; the message says why.
    Failed(String),
    /// It stopped because a cancel was asked for.
    Cancelled,
    /// The worker was stopped (the server going down): back to the queue.
    Requeue,
}

/// The job queue of a workspace.
pub struct Queue {
    connection: Connection,
    path: PathBuf,
}

/// The database file of the workspace at `root`.
pub fn queue_path(root: &Path) -> PathBuf {
    root.join(".trainyard").join("serve").join("queue.sqlite")
}

/// Seconds since the epoch, now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

const COLUMNS: &str = "id, spec, state, starts, failures, runs, worker, heartbeat, \
                       cancel_requested, error, submitted_at, started_at, finished_at";

impl Queue {
    /// Opens (creating it if needed) the queue of the workspace at `root`.
    pub fn open(root: &Path) -> Result<Queue, QueueError> {
        let path = queue_path(root);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| QueueError::Database {
                path: path.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(error)),
            })?;
        }
        let fail = |source| QueueError::Database {
            path: path.clone(),
            source,
        };
        let connection = Connection::open(&path).map_err(fail)?;
        // Writers wait for each other (workers, the server and CLI commands share the
        // file) rather than failing with SQLITE_BUSY.
        connection
            .busy_timeout(Duration::from_secs(30))
            .map_err(fail)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(fail)?;
        connection
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail)?;
        connection
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS jobs (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    spec TEXT NOT NULL,
                    state TEXT NOT NULL,
                    starts INTEGER NOT NULL DEFAULT 0,
                    failures INTEGER NOT NULL DEFAULT 0,
                    runs TEXT NOT NULL DEFAULT '[]',
                    worker TEXT,
                    heartbeat REAL,
                    cancel_requested INTEGER NOT NULL DEFAULT 0,
                    error TEXT,
                    submitted_at REAL NOT NULL,
                    started_at REAL,
                    finished_at REAL
                );
                CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);",
            )
            .map_err(fail)?;
        Ok(Queue { connection, path })
    }

    fn fail(&self) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
        |source| QueueError::Database {
            path: self.path.clone(),
            source,
        }
    }

    fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Job, String)> {
        let spec: String = row.get(1)?;
        let state: String = row.get(2)?;
        let runs: String = row.get(5)?;
        let job = Job {
            id: row.get(0)?,
            spec: JobSpec::default(),
            state: JobState::parse(&state).unwrap_or(JobState::Failed),
            starts: row.get(3)?,
            failures: row.get(4)?,
            runs: serde_json::from_str(&runs).unwrap_or_default(),
            worker: row.get(6)?,
            heartbeat: row.get(7)?,
            cancel_requested: row.get::<_, i64>(8)? != 0,
            error: row.get(9)?,
            submitted_at: row.get(10)?,
            started_at: row.get(11)?,
            finished_at: row.get(12)?,
        };
        Ok((job, spec))
    }

    fn with_spec((mut job, spec): (Job, String)) -> Result<Job, QueueError> {
        job.spec = serde_json::from_str(&spec).map_err(|error| QueueError::BadSpec {
            id: job.id,
            message: error.to_string(),
        })?;
        Ok(job)
    }

    /// Queues `spec`; returns the new job's id.
    pub fn submit(&self, spec: &JobSpec) -> Result<i64, QueueError> {
        let text = serde_json::to_string(spec).map_err(|error| QueueError::BadSpec {
            id: 0,
            message: error.to_string(),
        })?;
        self.connection
            .execute(
                "INSERT INTO jobs (spec, state, submitted_at) VALUES (?1, 'queued', ?2)",
                params![text, now()],
            )
            .map_err(self.fail())?;
        Ok(self.connection.last_insert_rowid())
    }

    /// The job `id`.
    pub fn get(&self, id: i64) -> Result<Job, QueueError> {
        let row = self
            .connection
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                Queue::read_row,
            )
            .optional()
            .map_err(self.fail())?
            .ok_or(QueueError::NoSuchJob(id))?;
        Queue::with_spec(row)
    }

    /// Every job (in `state`, when given), oldest first.
    pub fn list(&self, state: Option<JobState>) -> Result<Vec<Job>, QueueError> {
        let mut statement = self
            .connection
            .prepare(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE ?1 IS NULL OR state = ?1 ORDER BY id"
            ))
            .map_err(self.fail())?;
        let rows = statement
            .query_map(params![state.map(JobState::as_str)], Queue::read_row)
            .map_err(self.fail())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.fail())?;
        rows.into_iter().map(Queue::with_spec).collect()
    }

    /// Gives the oldest queued job to `worker` (now `running`), or `None`. One
    /// transaction: two workers never claim the same job.
    pub fn claim(&mut self, worker: &str) -> Result<Option<Job>, QueueError> {
        let path = self.path.clone();
        let fail = |source| QueueError::Database {
            path: path.clone(),
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(fail)?;
        let id: Option<i64> = transaction
            .query_row(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(fail)?;
        let Some(id) = id else {
            return Ok(None);
        };
        let now = now();
        transaction
            .execute(
                "UPDATE jobs SET state = 'running', worker = ?2, heartbeat = ?3,
                     starts = starts + 1, started_at = COALESCE(started_at, ?3)
                 WHERE id = ?1",
                params![id, worker, now],
            )
            .map_err(fail)?;
        transaction.commit().map_err(fail)?;
        self.get(id).map(Some)
    }

    /// Records that `worker` still runs job `id`; returns whether a cancel was asked
    /// for, or `None` when the job is no longer this worker's (requeued meanwhile).
    pub fn heartbeat(&self, id: i64, worker: &str) -> Result<Option<bool>, QueueError> {
        let changed = self
            .connection
            .execute(
                "UPDATE jobs SET heartbeat = ?3 WHERE id = ?1 AND worker = ?2 AND state = 'running'",
                params![id, worker, now()],
            )
            .map_err(self.fail())?;
        if changed == 0 {
            return Ok(None);
        }
        Ok(Some(self.get(id)?.cancel_requested))
    }

    /// Adds the run `run_id` (its `runs/<run_id>` directory) to job `id`.
    pub fn add_run(&self, id: i64, run_id: &str) -> Result<(), QueueError> {
        let mut runs = self.get(id)?.runs;
        if !runs.iter().any(|run| run == run_id) {
            runs.push(run_id.to_string());
        }
        let text = serde_json::to_string(&runs).unwrap_or_else(|_| "[]".to_string());
        self.connection
            .execute("UPDATE jobs SET runs = ?2 WHERE id = ?1", params![id, text])
            .map_err(self.fail())?;
        Ok(())
    }

    /// Records how `worker`'s run of job `id` ended: its final state, or back in the
    /// queue (a failure with retries left, or the worker stopped). Returns the job's
    /// state now.
    pub fn finish(&self, id: i64, worker: &str, outcome: &Outcome) -> Result<JobState, QueueError> {
        let job = self.get(id)?;
        if job.worker.as_deref() != Some(worker) || job.state != JobState::Running {
            // Requeued meanwhile (this worker was presumed dead): its run is not the job's.
            return Ok(job.state);
        }
        let (state, error, failures) = match outcome {
            Outcome::Succeeded => (JobState::Succeeded, None, job.failures),
            Outcome::Cancelled => (JobState::Cancelled, None, job.failures),
            Outcome::Requeue => (JobState::Queued, job.error.clone(), job.failures),
            Outcome::Failed(message) if job.failures < job.spec.retries => {
                (JobState::Queued, Some(message.clone()), job.failures + 1)
            }
            Outcome::Failed(message) => (JobState::Failed, Some(message.clone()), job.failures + 1),
        };
        let finished_at = state.is_final().then(now);
        self.connection
            .execute(
                "UPDATE jobs SET state = ?2, error = ?3, failures = ?4, finished_at = ?5,
                     worker = NULL, heartbeat = NULL
                 WHERE id = ?1",
                params![id, state.as_str(), error, failures, finished_at],
            )
            .map_err(self.fail())?;
        Ok(state)
    }

    /// Cancels job `id`: at once when queued; flagged for its worker (which stops the
    /// run with SIGTERM) when running. Returns the state it is now in.
    pub fn cancel(&self, id: i64) -> Result<JobState, QueueError> {
        let job = self.get(id)?;
        match job.state {
            JobState::Queued => {
                self.connection
                    .execute(
                        "UPDATE jobs SET state = 'cancelled', finished_at = ?2 WHERE id = ?1 AND state = 'queued'",
                        params![id, now()],
                    )
                    .map_err(self.fail())?;
            }
            JobState::Running => {
                self.connection
                    .execute(
                        "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1",
                        params![id],
                    )
                    .map_err(self.fail())?;
            }
            state => {
                return Err(QueueError::WrongState {
                    id,
                    state,
                    message: "only a queued or running job can be cancelled",
                });
            }
        }
        Ok(self.get(id)?.state)
    }

    /// Queues a failed or cancelled job `id` again (its retries count anew).
    pub fn retry(&self, id: i64) -> Result<JobState, QueueError> {
        let job = self.get(id)?;
        if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
            return Err(QueueError::WrongState {
                id,
                state: job.state,
                message: "only a failed or cancelled job can be retried",
            });
        }
        self.connection
            .execute(
                "UPDATE jobs SET state = 'queued', failures = 0, cancel_requested = 0,
                     error = NULL, finished_at = NULL
                 WHERE id = ?1",
                params![id],
            )
            .map_err(self.fail())?;
        Ok(JobState::Queued)
    }

    /// Puts back in the queue every running job whose worker has not beaten its
    /// heartbeat for `max_age` (when given), or whose worker is not among `alive` (when
    /// given: a server that restarted knows its old workers are gone). Returns their
    /// ids.
    pub fn requeue_stale(
        &self,
        max_age: Option<Duration>,
        alive: Option<&[String]>,
    ) -> Result<Vec<i64>, QueueError> {
        let limit = max_age.map(|age| now() - age.as_secs_f64());
        let mut requeued = Vec::new();
        for job in self.list(Some(JobState::Running))? {
            let silent = limit.is_some_and(|limit| job.heartbeat.is_none_or(|beat| beat < limit));
            let gone = alive.is_some_and(|alive| {
                job.worker
                    .as_ref()
                    .is_none_or(|worker| !alive.contains(worker))
            });
            if silent || gone {
                let changed = self
                    .connection
                    .execute(
                        "UPDATE jobs SET state = 'queued', worker = NULL, heartbeat = NULL
                         WHERE id = ?1 AND state = 'running' AND worker IS ?2",
                        params![job.id, job.worker],
                    )
                    .map_err(self.fail())?;
                if changed > 0 {
                    requeued.push(job.id);
                }
            }
        }
        Ok(requeued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pipeline: &str) -> JobSpec {
        JobSpec {
            pipeline: pipeline.to_string(),
            ..JobSpec::default()
        }
    }

    #[test]
    fn jobs_go_through_their_states_and_no_job_is_claimed_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path()).unwrap();
        let first = queue.submit(&spec("a.yaml")).unwrap();
        let second = queue
            .submit(&JobSpec {
                retries: 1,
                ..spec("b.yaml")
            })
            .unwrap();
        let mut other = Queue::open(dir.path()).unwrap();
        let claimed = queue.claim("w1").unwrap().unwrap();
        assert_eq!((claimed.id, claimed.state), (first, JobState::Running));
        assert_eq!(other.claim("w2").unwrap().unwrap().id, second);
        assert!(
            queue.claim("w1").unwrap().is_none(),
            "nothing left to claim"
        );

        assert_eq!(queue.heartbeat(first, "w1").unwrap(), Some(false));
        assert_eq!(queue.heartbeat(first, "w2").unwrap(), None, "not w2's job");
        queue.add_run(first, "2026-12-03T10-00-00Z-a").unwrap();
        assert_eq!(
            queue.finish(first, "w1", &Outcome::Succeeded).unwrap(),
            JobState::Succeeded
        );
        let done = queue.get(first).unwrap();
        assert_eq!(done.runs, ["2026-12-03T10-00-00Z-a"]);
        assert!(done.finished_at.is_some() && done.worker.is_none());

        // A failure with a retry left goes back to the queue; the next one fails it.
        let failed = Outcome::Failed("stage `lm` failed".to_string());
        assert_eq!(
            other.finish(second, "w2", &failed).unwrap(),
            JobState::Queued
        );
        assert_eq!(other.claim("w2").unwrap().unwrap().starts, 2);
        assert_eq!(
            other.finish(second, "w2", &failed).unwrap(),
            JobState::Failed
        );
        assert_eq!(
            queue.get(second).unwrap().error.as_deref(),
            Some("stage `lm` failed")
        );
        assert_eq!(queue.retry(second).unwrap(), JobState::Queued);
        assert!(
            queue.retry(first).is_err(),
            "a succeeded job is not retried"
        );
    }

    #[test]
    fn cancel_is_immediate_when_queued_and_flagged_when_running() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path()).unwrap();
        let running = queue.submit(&spec("a.yaml")).unwrap();
        let queued = queue.submit(&spec("b.yaml")).unwrap();
        queue.claim("w").unwrap();
        assert_eq!(queue.cancel(queued).unwrap(), JobState::Cancelled);
        assert_eq!(queue.cancel(running).unwrap(), JobState::Running);
        assert_eq!(queue.heartbeat(running, "w").unwrap(), Some(true));
        assert_eq!(
            queue.finish(running, "w", &Outcome::Cancelled).unwrap(),
            JobState::Cancelled
        );
        assert!(matches!(
            queue.cancel(running),
            Err(QueueError::WrongState { .. })
        ));
    }

    #[test]
    fn jobs_of_silent_or_gone_workers_go_back_to_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path()).unwrap();
        let first = queue.submit(&spec("a.yaml")).unwrap();
        let second = queue.submit(&spec("b.yaml")).unwrap();
        queue.claim("old").unwrap();
        queue.claim("live").unwrap();
        assert!(
            queue
                .requeue_stale(Some(Duration::from_secs(60)), None)
                .unwrap()
                .is_empty()
        );
        let requeued = queue
            .requeue_stale(Some(Duration::from_secs(60)), Some(&["live".to_string()]))
            .unwrap();
        assert_eq!(requeued, [first]);
        assert_eq!(queue.get(first).unwrap().state, JobState::Queued);
        // The presumed-dead worker's late report changes nothing.
        assert_eq!(
            queue.finish(first, "old", &Outcome::Succeeded).unwrap(),
            JobState::Queued
        );
        assert_eq!(queue.get(second).unwrap().state, JobState::Running);
    }

    #[test]
    fn run_arguments_follow_the_spec() {
        let spec = JobSpec {
            pipeline: "p.yaml".to_string(),
            profiles: vec!["smoke".to_string()],
            set: vec!["stages.lm.with.steps=5".to_string()],
            until: Some("lm".to_string()),
            verify: true,
            ..JobSpec::default()
        };
        assert_eq!(
            spec.run_args(),
            [
                "--profile",
                "smoke",
                "--set",
                "stages.lm.with.steps=5",
                "--until",
                "lm",
                "--verify"
            ]
        );
    }
}
