//! The Slurm executor against a real single-node Slurm on this machine
//! (`scripts/slurm-local.sh start`: Debian's slurm-wlm and munge, which `.ci/run`
//! installs): the quickstart on Slurm equals a local run, a failed job is reported
//! with its log, scancel and a rerun resume training bit-identically, `--detach` and
//! `status`, Ctrl-C scancels, resources reach sbatch. After every test nothing is
//! left in the queue.
//!
//! The tests take turns (one lock): the node has two CPUs, and "the queue is empty
//! at the end" must be about this test's jobs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::{Sandbox, file_hash, text};

/// Where `scripts/slurm-local.sh` writes its configuration.
const SLURM_CONF: &str = "/tmp/trainyard-slurm/slurm.conf";

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The cluster, started once if it is not up, and this test's turn on it.
fn cluster() -> MutexGuard<'static, ()> {
    static STARTED: OnceLock<()> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    STARTED.get_or_init(|| {
        if std::env::var_os("SLURM_CONF").is_none() {
            // SAFETY: set once, before any test of this module spawns a process that
            // reads it; other modules' tests do not read SLURM_CONF.
            unsafe { std::env::set_var("SLURM_CONF", SLURM_CONF) };
        }
        let up = Command::new("sinfo")
            .args(["--noheader", "--format=%T"])
            .output()
            .is_ok_and(|output| {
                output.status.success() && String::from_utf8_lossy(&output.stdout).contains("idle")
            });
        if !up {
            let output = Command::new("bash")
                .arg(repo("scripts/slurm-local.sh"))
                .arg("start")
                .output()
                .expect("run scripts/slurm-local.sh");
            assert!(
                output.status.success(),
                "these tests need a real Slurm: `bash scripts/slurm-local.sh start` (as root) failed:\n{}",
                text(&output)
            );
        }
    });
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    assert_queue_empty("before the test");
    turn
}

fn squeue() -> String {
    let output = Command::new("squeue")
        .args(["--noheader", "--format=%i %j %T"])
        .output()
        .expect("run squeue");
    assert!(output.status.success(), "squeue: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Waits (up to 60 s: a cancelled job gets KillWait to stop) for the queue to empty,
/// and fails naming what is left.
fn assert_queue_empty(when: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queue = squeue();
        if queue.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let _ = Command::new("scancel")
                .arg("--full")
                .arg("--user=root")
                .status();
            panic!("Slurm jobs left in the queue {when}:\n{queue}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks the queue is empty when the test ends, passed or failed.
struct EmptyQueueAtEnd;

impl Drop for EmptyQueueAtEnd {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_queue_empty("after the test");
        } else {
            let _ = Command::new("scancel")
                .arg("--full")
                .arg("--user=root")
                .status();
        }
    }
}

/// Stage name → output hash in the latest run's record.
fn output_hashes(sandbox: &Sandbox) -> Vec<(String, String)> {
    let record = sandbox.latest_record();
    record["stages"]
        .as_object()
        .expect("stages")
        .iter()
        .map(|(name, stage)| {
            (
                name.clone(),
                stage["output_hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn quickstart_smoke_on_slurm_equals_a_local_run_and_a_second_run_submits_nothing() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let quickstart = repo("pipelines/quickstart.yaml");
    let quickstart = quickstart.to_str().unwrap();

    let local = Sandbox::new();
    local.ok(&["run", quickstart, "--profile", "smoke"]);

    let slurm = Sandbox::new();
    let out = slurm.ok(&[
        "run",
        quickstart,
        "--profile",
        "smoke",
        "--executor",
        "slurm",
    ]);
    assert!(
        out.contains("submitted pretrain (pretrain) as Slurm job"),
        "{out}"
    );
    assert!(out.contains("11 executed, 0 cached"), "{out}");
    let hashes = output_hashes(&slurm);
    assert_eq!(hashes.len(), 11, "{hashes:?}");
    assert!(
        hashes.iter().all(|(_, hash)| hash.len() == 64),
        "{hashes:?}"
    );
    assert_eq!(
        hashes,
        output_hashes(&local),
        "Slurm and local outputs differ"
    );

    // The record says where each stage ran.
    let record = slurm.latest_record();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for (name, stage) in record["stages"].as_object().unwrap() {
        let execution = &stage["execution"];
        assert_eq!(execution["executor"], "slurm", "{name}: {stage}");
        assert!(
            execution["job_id"]
                .as_str()
                .is_some_and(|id| id.parse::<u64>().is_ok()),
            "{name}: {execution}"
        );
        assert_eq!(execution["node"], host.trim(), "{name}: {execution}");
        assert_eq!(
            execution["used"]["state"], "COMPLETED",
            "{name}: {execution}"
        );
        assert!(
            execution["used"]["max_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{name}: {execution}"
        );
    }
    let run_dir = slurm.path("runs/latest");
    let script = std::fs::read_to_string(run_dir.join("slurm/pretrain.sbatch")).unwrap();
    assert!(script.contains("exec-stage"), "{script}");
    let log = std::fs::read_to_string(run_dir.join("slurm/pretrain.log")).unwrap();
    assert!(log.contains("running  pretrain"), "{log}");

    // Nothing to do: nothing is submitted.
    let again = slurm.ok(&[
        "run",
        quickstart,
        "--profile",
        "smoke",
        "--executor",
        "slurm",
    ]);
    assert!(again.contains("0 executed, 11 cached"), "{again}");
    assert!(!again.contains("submitted"), "{again}");

    // The Slurm run replays locally (no job is submitted), bit for bit.
    let first_run = slurm
        .path("runs")
        .read_dir()
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.join("slurm").is_dir())
        .min()
        .unwrap();
    let report = slurm.ok(&[
        "audit",
        first_run.to_str().unwrap(),
        "--reproduce",
        "--into",
        "repro",
    ]);
    for (stage, _) in &hashes {
        assert!(
            report
                .lines()
                .any(|line| line.trim_start().starts_with("identical")
                    && line.contains(stage.as_str())),
            "{stage} not identical:\n{report}"
        );
    }
    assert!(!report.contains("submitted"), "{report}");
}

#[test]
fn a_failed_job_fails_its_stage_with_its_log_and_cancels_what_depends_on_it() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        r#"
name: failing
stages:
  good:
    kind: command
    with: { cmd: "echo fine > out.txt" }
  bad:
    kind: command
    inputs: { g: good }
    with: { cmd: "echo the-disk-is-on-fire >&2; exit 3" }
  after:
    kind: command
    inputs: { b: bad }
    with: { cmd: "echo never > out.txt" }
"#,
    );
    let out = sandbox.fails(&["run", "p.yaml", "--executor", "slurm", "--keep-going"]);
    assert!(out.contains("FAILED   bad"), "{out}");
    assert!(
        out.contains("the-disk-is-on-fire"),
        "the failure quotes the log: {out}"
    );
    assert!(out.contains("Slurm log"), "{out}");
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses["good"], "executed", "{statuses:?}");
    assert_eq!(statuses["bad"], "failed", "{statuses:?}");
    assert_eq!(statuses["after"], "skipped", "{statuses:?}");
    let record = sandbox.latest_record();
    assert_eq!(record["status"], "failed");
    assert!(
        record["stages"]["after"]["error"]
            .as_str()
            .is_some_and(|error| error.contains("upstream")),
        "{}",
        record["stages"]["after"]
    );
    assert_eq!(
        record["stages"]["bad"]["execution"]["used"]["state"],
        "FAILED"
    );
}

/// A small pretrain that runs long enough to be cancelled mid-way.
const TRAINING: &str = "
name: lm
seed: 7
stages:
  corpus:
    kind: ingest
    with: { source: { synthetic: { part: documents, documents: 400 } }, eval_ratio: 0.1 }
  tok:
    kind: tokenizer
    inputs: { text: corpus/train.jsonl }
    with: { vocab_size: 384 }
  cache:
    kind: token-cache
    inputs: { train: corpus/train.jsonl, eval: corpus/eval.jsonl, tokenizer: tok }
  lm:
    kind: pretrain
    inputs: { data: cache, tokenizer: tok }
    with: { model: { family: gpt2, layers: 2, heads: 2, dim: 32 }, context: 32, batch_size: 4, steps: 3000, lr: 0.002, eval_every: 0, save_every: 0 }
";

/// The Slurm job id of `stage` once its job runs and has logged a training step.
fn wait_until_training(sandbox: &Sandbox, stage: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let queue = squeue();
        let running = queue.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let (id, name, state) = (fields.next()?, fields.next()?, fields.next()?);
            (name.ends_with(&format!(":{stage}")) && state == "RUNNING").then(|| id.to_string())
        });
        // `runs/latest` moves only when a run ends: the newest run is this one.
        let newest = std::fs::read_dir(sandbox.path("runs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_dir() && !path.is_symlink())
            .max();
        let logs = newest
            .and_then(|dir| std::fs::read_to_string(dir.join("logs.jsonl")).ok())
            .unwrap_or_default();
        let stepped = logs
            .lines()
            .filter(|line| line.contains("\"train_step\""))
            .count()
            >= 3;
        if let (Some(id), true) = (running, stepped) {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "`{stage}` never started training:\n{queue}\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The weights of an uninterrupted local run of [`TRAINING`], computed once.
fn uninterrupted_weights() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let straight = Sandbox::new();
        straight.write("p.yaml", TRAINING);
        straight.ok(&["run", "p.yaml"]);
        file_hash(&straight.path("runs/latest/outputs/lm/model.safetensors"))
    })
}

#[test]
fn scancel_of_a_training_job_then_a_rerun_resumes_bit_identically() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let expected = uninterrupted_weights();
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", TRAINING);
    let submitter = sandbox.spawn(&["run", "p.yaml", "--executor", "slurm"]);
    let job = wait_until_training(&sandbox, "lm");
    let cancelled = Command::new("scancel").arg(&job).status().unwrap();
    assert!(cancelled.success());
    let first = submitter.wait_with_output().unwrap();
    let first_text = text(&first);
    assert_eq!(first.status.code(), Some(130), "{first_text}");
    assert!(first_text.contains("stopped  lm"), "{first_text}");
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses["lm"], "interrupted", "{statuses:?}");
    assert_eq!(sandbox.latest_record()["status"], "interrupted");

    let out = sandbox.ok(&["run", "p.yaml", "--executor", "slurm"]);
    assert!(out.contains("submitted lm"), "{out}");
    let log = std::fs::read_to_string(sandbox.path("runs/latest/outputs/lm/stage.log")).unwrap();
    assert!(log.contains("resuming from"), "{out}\n{log}");
    assert_eq!(
        file_hash(&sandbox.path("runs/latest/outputs/lm/model.safetensors")),
        expected,
        "resumed on Slurm = uninterrupted local run"
    );
}

#[test]
fn the_time_limit_warning_checkpoints_requeues_and_resumes_bit_identically() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let expected = uninterrupted_weights();
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", TRAINING);
    let submitter = sandbox.spawn(&[
        "run",
        "p.yaml",
        "--executor",
        "slurm",
        "--progress-every",
        "1",
    ]);
    let job = wait_until_training(&sandbox, "lm");
    // What `--signal=B:USR1@N` sends N seconds before the time limit.
    let signalled = Command::new("scancel")
        .args(["--signal=USR1", "--batch", &job])
        .status()
        .unwrap();
    assert!(signalled.success());
    // Slurm holds a requeued job back for a while; let it start again now.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queue = squeue();
        if queue.contains(&format!("{job} ")) && queue.contains("PENDING") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} was not requeued:\n{queue}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Slurm revokes the first run's job credential when it requeues the job, to the
    // second; a restart within that second is refused ("Job credential revoked") and
    // the job FAILS (seen once in CI). Slurm's own hold (BeginTime) exists for this.
    std::thread::sleep(Duration::from_secs(2));
    let released = Command::new("scontrol")
        .args(["update", &format!("JobId={job}"), "StartTime=now"])
        .status()
        .unwrap();
    assert!(released.success());
    let output = submitter.wait_with_output().unwrap();
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    // The submitter's progress line follows the job's training steps.
    assert!(
        out.lines()
            .any(|line| line.contains("running lm (") && line.contains("step ")),
        "{out}"
    );
    let slurm_log = sandbox.read("runs/latest/slurm/lm.log");
    assert!(slurm_log.contains("requeueing Slurm job"), "{slurm_log}");
    let log = sandbox.read("runs/latest/outputs/lm/stage.log");
    assert!(log.contains("resuming from"), "{out}\n{log}");
    assert_eq!(
        file_hash(&sandbox.path("runs/latest/outputs/lm/model.safetensors")),
        expected,
        "requeued and resumed = uninterrupted"
    );
    let record = sandbox.latest_record();
    assert_eq!(
        record["stages"]["lm"]["execution"]["used"]["starts"], 2,
        "{}",
        record["stages"]["lm"]
    );
}

#[test]
fn ctrl_c_on_the_submitter_scancels_its_jobs() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", TRAINING);
    let submitter = sandbox.spawn(&["run", "p.yaml", "--executor", "slurm"]);
    wait_until_training(&sandbox, "lm");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(submitter.id() as libc::pid_t, libc::SIGINT) };
    let output = submitter.wait_with_output().unwrap();
    let out = text(&output);
    assert_eq!(output.status.code(), Some(130), "{out}");
    assert!(out.contains("scancel"), "{out}");
    // Its job is gone from the queue once the submitter returns.
    let queue = squeue();
    assert!(queue.is_empty(), "{queue}");
    assert_eq!(sandbox.latest_statuses()["lm"], "interrupted");
}

#[test]
fn detach_returns_at_once_and_status_and_the_next_run_follow_the_jobs() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let sandbox = crate::common::branches();
    let out = sandbox.ok(&["run", "p.yaml", "--executor", "slurm", "--detach"]);
    assert!(out.contains("4 submitted to Slurm"), "{out}");
    let run_id = sandbox.latest_record()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sandbox.latest_record()["status"], "running");
    let status = sandbox.ok(&["status", "p.yaml"]);
    assert!(status.contains(&format!("Slurm run {run_id}")), "{status}");
    assert!(status.contains("join"), "{status}");

    // A run while the jobs are queued must not touch their stages.
    let busy = sandbox.fails(&["run", "p.yaml"]);
    assert!(busy.contains("still has Slurm jobs"), "{busy}");

    assert_queue_empty("after the detached jobs");
    let next = sandbox.ok(&["run", "p.yaml"]);
    assert!(
        next.contains(&format!(
            "the Slurm jobs of run {run_id} finished (succeeded)"
        )),
        "{next}"
    );
    assert!(next.contains("0 executed, 4 cached"), "{next}");
    let record: serde_json::Value =
        serde_json::from_str(&sandbox.read(&format!("runs/{run_id}/resolved_settings.json")))
            .unwrap();
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(record["stages"]["join"]["status"], "executed");
    assert_eq!(record["stages"]["join"]["execution"]["executor"], "slurm");
    assert_eq!(
        sandbox.read("runs/latest/outputs/join/joined.txt"),
        "LEFT INPUT\ntupni thgir\n"
    );
}

#[test]
fn a_killed_submitter_leaves_its_jobs_to_finish_and_the_next_run_settles_them() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let expected = uninterrupted_weights();
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", TRAINING);
    let mut submitter = sandbox.spawn(&["run", "p.yaml", "--executor", "slurm"]);
    wait_until_training(&sandbox, "lm");
    submitter.kill().unwrap();
    submitter.wait().unwrap();

    // Its job goes on; nothing may run or submit `lm` again meanwhile.
    let busy = sandbox
        .command(&["run", "p.yaml", "--executor", "slurm"])
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(3), "{}", text(&busy));
    assert!(
        text(&busy).contains("still has Slurm jobs queued or running (lm="),
        "{}",
        text(&busy)
    );
    let status = sandbox.ok(&["status", "p.yaml"]);
    assert!(
        status.contains("Slurm run") && status.contains("running"),
        "{status}"
    );

    assert_queue_empty("once the orphaned job is done");
    let next = sandbox.ok(&["run", "p.yaml", "--executor", "slurm"]);
    assert!(next.contains("finished (succeeded)"), "{next}");
    assert!(next.contains("0 executed, 4 cached"), "{next}");
    assert!(!next.contains("submitted"), "{next}");
    assert_eq!(
        file_hash(&sandbox.path("runs/latest/outputs/lm/model.safetensors")),
        expected
    );
    // The killed submitter's record now says what its jobs did.
    let first = std::fs::read_dir(sandbox.path("runs"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| !path.is_symlink())
        .min()
        .unwrap();
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(first.join("resolved_settings.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(record["stages"]["lm"]["status"], "executed", "{record}");
    assert_eq!(record["stages"]["lm"]["execution"]["executor"], "slurm");
}

#[test]
fn resources_from_the_stage_and_a_profile_reach_sbatch_and_the_record() {
    let _turn = cluster();
    let _end = EmptyQueueAtEnd;
    let sandbox = crate::common::branches();
    sandbox.write(
        "profiles/cluster.yaml",
        "executor: { kind: slurm, resources: { time: \"10:00\", mem: 300M } }\n\
         kinds:\n  command:\n    resources: { cpus: 2 }\n\
         stages:\n  join:\n    resources: { mem: 200M, extra: [\"--comment=joined\"] }\n",
    );
    sandbox.ok(&["run", "p.yaml", "--profile", "cluster"]);
    let script = sandbox.read("runs/latest/slurm/join.sbatch");
    for option in [
        "--cpus-per-task=2",
        "--mem=200M",
        "--time=10:00",
        "--comment=joined",
    ] {
        assert!(script.contains(&format!("#SBATCH {option}")), "{script}");
    }
    let left = sandbox.read("runs/latest/slurm/left.sbatch");
    assert!(left.contains("#SBATCH --mem=300M"), "{left}");
    let record = sandbox.latest_record();
    let join = &record["stages"]["join"]["execution"];
    assert_eq!(join["resources"]["mem"], "200M", "{join}");
    assert_eq!(join["used"]["cpus"], 2, "{join}");
    assert!(
        record["origins"]["stages.join.resources.mem"]
            .as_str()
            .is_some_and(|origin| origin.contains("cluster.yaml")),
        "{}",
        record["origins"]
    );

    // A value sbatch would reject is an error naming the file and key.
    sandbox.write(
        "profiles/bad.yaml",
        "stages:\n  join:\n    resources: { mem: lots }\n",
    );
    let bad = sandbox.fails(&["run", "p.yaml", "--profile", "bad", "--executor", "slurm"]);
    assert!(bad.contains("bad.yaml:3"), "{bad}");
    assert!(bad.contains("stages.join.resources.mem"), "{bad}");
}
