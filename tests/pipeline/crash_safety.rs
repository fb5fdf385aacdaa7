//! Crashes, interrupts and concurrent runs never leave a half-written output that
//! looks finished, and never corrupt the store.

use crate::common;

use std::time::Duration;

use common::{Sandbox, text, wait_for};

/// A stage that writes part of its output, then blocks while `gate` exists.
fn slow_pipeline(sandbox: &Sandbox) -> std::path::PathBuf {
    let gate = sandbox.path("gate");
    std::fs::write(&gate, "").unwrap();
    sandbox.write(
        "p.yaml",
        &format!(
            r#"name: slow
stages:
  first:
    kind: command
    with: {{ cmd: "echo one > one.txt" }}
  slow:
    kind: command
    inputs: {{ one: first/one.txt }}
    with:
      cmd: "echo partial > out.txt; touch started; while [ -f {gate} ]; do sleep 0.05; done; echo complete >> out.txt"
"#,
            gate = gate.display()
        ),
    );
    gate
}

fn scratch_file(sandbox: &Sandbox, name: &str) -> std::path::PathBuf {
    // The scratch directory is named after the fingerprint; find it by prefix.
    for _ in 0..600 {
        if let Ok(entries) = std::fs::read_dir(sandbox.path(".trainyard/work")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("slow-") && entry.path().is_dir()
                {
                    return entry.path().join(name);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no scratch directory for `slow`");
}

#[test]
fn stage_killed_with_sigkill_leaves_no_visible_output_and_next_run_redoes_it() {
    let sandbox = Sandbox::new();
    let gate = slow_pipeline(&sandbox);
    let mut child = sandbox.spawn(&["run", "p.yaml"]);
    wait_for(&scratch_file(&sandbox, "started"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert!(
        sandbox.store_entries("slow").is_empty(),
        "a killed stage must not appear in the store"
    );
    assert_eq!(
        sandbox.store_entries("first").len(),
        1,
        "finished work is kept"
    );
    let killed_id = std::fs::read_dir(sandbox.path("runs"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();
    let record_path = format!("runs/{killed_id}/resolved_settings.json");
    let record = sandbox.read(&record_path);
    assert!(
        record.contains("\"status\": \"running\""),
        "the crashed run's record says it never finished"
    );

    std::fs::remove_file(&gate).unwrap();
    let console = sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["slow"]);
    // The next run marks the killed run's record interrupted, and says so.
    assert!(
        console.contains(&format!("run {killed_id} was killed before it finished")),
        "{console}"
    );
    let record: serde_json::Value = serde_json::from_str(&sandbox.read(&record_path)).unwrap();
    assert_eq!(record["status"], "interrupted");
    // Its record lists no stage, which proves nothing: the audit says so and fails.
    let audit = sandbox.fails(&["audit", &format!("runs/{killed_id}")]);
    assert!(audit.contains("recorded no stage to check"), "{audit}");
    assert_eq!(
        sandbox.read("runs/latest/outputs/slow/out.txt"),
        "partial\ncomplete\n"
    );
}

#[test]
fn ctrl_c_stops_cleanly_and_publishes_nothing() {
    let sandbox = Sandbox::new();
    let _gate = slow_pipeline(&sandbox);
    let child = sandbox.spawn(&["run", "p.yaml"]);
    wait_for(&scratch_file(&sandbox, "started"));
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", text(&output));
    assert!(sandbox.store_entries("slow").is_empty());
    assert_eq!(sandbox.latest_record()["status"], "interrupted");
    assert_eq!(sandbox.latest_statuses()["slow"], "interrupted");
}

#[test]
fn a_second_run_waits_for_the_lock_and_then_finds_everything_cached() {
    let sandbox = Sandbox::new();
    let gate = slow_pipeline(&sandbox);
    let first = sandbox.spawn(&["run", "p.yaml"]);
    wait_for(&scratch_file(&sandbox, "started"));

    let busy = sandbox.trainyard(&["run", "p.yaml", "--no-wait"]);
    assert_eq!(busy.status.code(), Some(3), "{}", text(&busy));
    let busy = text(&busy);
    assert!(
        busy.contains("is locked by another trainyard run (pid"),
        "{busy}"
    );
    assert!(busy.contains(&format!("pid {}", first.id())), "{busy}");

    let second = sandbox.spawn(&["run", "p.yaml"]);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(&gate).unwrap();
    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("waiting for the workspace lock"),
        "{}",
        text(&second)
    );
    assert!(
        text(&second).contains("0 executed, 2 cached"),
        "{}",
        text(&second)
    );
    assert_eq!(sandbox.store_entries("slow").len(), 1);
}

#[test]
fn many_concurrent_runs_never_corrupt_the_store() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: busy\nstages:\n  a:\n    kind: command\n    with: { cmd: 'seq 1 20000 > n.txt' }\n  b:\n    kind: command\n    inputs: { n: a/n.txt }\n    with: { cmd: 'sort -r $TY_IN_N > r.txt' }\n",
    );
    let children: Vec<_> = (0..4).map(|_| sandbox.spawn(&["run", "p.yaml"])).collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
    }
    for stage in ["a", "b"] {
        let entries = sandbox.store_entries(stage);
        assert_eq!(entries.len(), 1, "{stage}: {entries:?}");
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(entries[0].join("manifest.json")).unwrap(),
        )
        .unwrap();
        for (file, digest) in manifest["files"].as_object().unwrap() {
            let bytes = std::fs::read(entries[0].join(file)).unwrap();
            assert_eq!(
                digest["hash"],
                blake3::hash(&bytes).to_hex().to_string(),
                "{stage}/{file}"
            );
        }
    }
    let runs = std::fs::read_dir(sandbox.path("runs")).unwrap().count();
    assert_eq!(runs, 5, "four runs and `latest`");
}

#[test]
fn a_backgrounded_process_cannot_alter_a_published_output() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        r#"name: late
stages:
  writer:
    kind: command
    with: { cmd: "(sleep 1; echo late >> a.txt) & (setsid sh -c 'sleep 1; echo later >> a.txt' &) ; echo early > a.txt" }
"#,
    );
    sandbox.ok(&["run", "p.yaml"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sandbox.read("runs/latest/outputs/writer/a.txt"), "early\n");
    assert!(
        sandbox
            .read("runs/latest/outputs/writer/stage.log")
            .contains("process(es) the command left running"),
        "{}",
        sandbox.read("runs/latest/outputs/writer/stage.log")
    );
    sandbox.ok(&["audit", "runs/latest"]);
}

#[test]
fn a_killed_runs_command_leftovers_never_write_into_the_next_run() {
    let sandbox = Sandbox::new();
    let gate = sandbox.path("gate");
    std::fs::write(&gate, "").unwrap();
    sandbox.write(
        "p.yaml",
        &format!(
            r#"name: leftovers
stages:
  slow:
    kind: command
    with:
      cmd: "if [ ! -f {once} ]; then touch {once}; (setsid sh -c 'while [ -f {gate} ]; do sleep 0.05; done; echo stray >> $TY_OUT/out.txt' &); echo run > out.txt; touch started; sleep 30; else echo run > out.txt; touch started; sleep 1; fi"
"#,
            gate = gate.display(),
            once = sandbox.path("once").display()
        ),
    );
    let mut child = sandbox.spawn(&["run", "p.yaml"]);
    wait_for(&scratch_file(&sandbox, "started"));
    child.kill().unwrap(); // SIGKILL: trainyard cannot clean up after itself
    child.wait().unwrap();

    // The next run kills the stray process first; only then is the gate lifted, as
    // late as it can be, while the next run's scratch exists.
    let killed_attempt = scratch_file(&sandbox, "started");
    std::fs::remove_file(&killed_attempt).unwrap();
    let next = sandbox.spawn(&["run", "p.yaml"]);
    let started = newer_scratch_file(&sandbox, &killed_attempt);
    wait_for(&started);
    std::fs::remove_file(&gate).unwrap();
    let output = next.wait_with_output().unwrap();
    let console = text(&output);
    assert!(output.status.success(), "{console}");
    assert!(
        console.contains("process(es) a killed run's command stages left running"),
        "{console}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let published = sandbox.path("runs/latest/outputs/slow/out.txt");
    assert_eq!(std::fs::read_to_string(&published).unwrap(), "run\n");
    // The killed attempt's directory is gone: nothing of it is reused.
    assert!(!killed_attempt.parent().unwrap().exists());
    sandbox.ok(&["audit", "runs/latest"]);
}

/// `started` in the scratch directory of a later attempt than `earlier`'s: a stage that
/// does not resume gets a fresh directory per attempt.
fn newer_scratch_file(sandbox: &Sandbox, earlier: &std::path::Path) -> std::path::PathBuf {
    for _ in 0..600 {
        let entries = std::fs::read_dir(sandbox.path(".trainyard/work")).unwrap();
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with("slow-")
                && path.is_dir()
                && Some(path.as_path()) != earlier.parent()
            {
                return path.join("started");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no new scratch directory for `slow`");
}

#[test]
fn ctrl_c_while_waiting_for_the_lock_stops_at_once() {
    let sandbox = Sandbox::new();
    let gate = slow_pipeline(&sandbox);
    let mut first = sandbox.spawn(&["run", "p.yaml"]);
    wait_for(&scratch_file(&sandbox, "started"));
    let waiting = sandbox.spawn(&["run", "p.yaml"]);
    std::thread::sleep(Duration::from_millis(500));
    let signalled = std::time::Instant::now();
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(waiting.id() as libc::pid_t, libc::SIGINT);
    }
    let output = waiting.wait_with_output().unwrap();
    let waited = signalled.elapsed();
    assert_eq!(output.status.code(), Some(130), "{}", text(&output));
    assert!(
        text(&output).contains("interrupted while waiting for the workspace lock"),
        "{}",
        text(&output)
    );
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
    std::fs::remove_file(&gate).unwrap();
    assert!(first.wait().unwrap().success());
}

/// A command that ignores SIGTERM (and SIGHUP, which closing the terminal sends to
/// trainyard, never to a command in its own process group) is killed after a short
/// grace: the run stops in about a second, records `interrupted`, leaves nothing behind.
#[test]
fn a_command_that_ignores_signals_is_killed_after_a_grace() {
    for signal in [libc::SIGINT, libc::SIGHUP] {
        let sandbox = Sandbox::new();
        sandbox.write(
            "p.yaml",
            "name: stubborn\nstages:\n  slow:\n    kind: command\n    with: { cmd: \"trap '' INT TERM HUP; touch started; echo $$ > pid; sleep 60\" }\n",
        );
        let child = sandbox.spawn(&["run", "p.yaml"]);
        let started = scratch_file(&sandbox, "started");
        wait_for(&started);
        let shell_pid: i32 = std::fs::read_to_string(started.with_file_name("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let signalled = std::time::Instant::now();
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let output = child.wait_with_output().unwrap();
        let took = signalled.elapsed();
        assert_eq!(output.status.code(), Some(130), "{}", text(&output));
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(sandbox.latest_record()["status"], "interrupted");
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(shell_pid, 0) } == 0;
        assert!(!alive, "the command outlived the run");
    }
}

/// `trainyard run … 2>&1 | head -1`: the reader goes away after one line; the run
/// finishes its work and records it instead of dying half-way.
#[test]
fn a_run_whose_console_reader_went_away_still_finishes() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: piped\nstages:\n  a:\n    kind: command\n    with: { cmd: \"sleep 0.3; echo a > a.txt\" }\n  b:\n    kind: command\n    inputs: { a: a }\n    with: { cmd: \"sleep 0.3; echo b > b.txt\" }\n",
    );
    let trainyard = env!("CARGO_BIN_EXE_trainyard");
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{trainyard}' run p.yaml 2>&1 | head -1"))
        .current_dir(sandbox.path(""))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(sandbox.latest_record()["status"], "succeeded");
    assert_eq!(sandbox.read("runs/latest/outputs/b/b.txt"), "b\n");
}

/// A process that clears its environment and leaves the process group escapes
/// containment (only a cgroup would catch it); what it writes through its working
/// directory after publication lands in the abandoned scratch, not in the store.
#[test]
fn an_escaped_leftover_cannot_write_into_the_published_output() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: escape\nstages:\n  envi:\n    kind: command\n    with:\n      cmd: 'setsid env -i /bin/sh -c \"sleep 0.5; echo late >> out.txt\" >/dev/null 2>&1 & echo early > out.txt'\n      outputs: [out.txt]\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(sandbox.read("runs/latest/outputs/envi/out.txt"), "early\n");
    sandbox.ok(&["audit", "runs/latest"]);
}
