//! Caching and rerun rules, end to end through the binary.

use crate::common;

use common::{Sandbox, branches};

#[test]
fn first_run_executes_every_stage_and_second_run_none() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["join", "left", "right", "tail"]);
    assert_eq!(
        sandbox.read("runs/latest/outputs/join/joined.txt"),
        "LEFT INPUT\ntupni thgir\n"
    );

    sandbox.ok(&["run", "p.yaml"]);
    assert!(
        sandbox.executed().is_empty(),
        "{:?}",
        sandbox.latest_statuses()
    );
    assert!(
        sandbox
            .latest_statuses()
            .values()
            .all(|status| status == "cached")
    );
}

#[test]
fn changing_one_input_reruns_exactly_that_stage_and_its_downstream() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    sandbox.write("data/x.txt", "changed left\n");
    let status = sandbox.ok(&["status", "p.yaml"]);
    assert!(
        status.contains("input `src` changed (data/x.txt)"),
        "{status}"
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["join", "left"]);
    assert_eq!(
        sandbox.read("runs/latest/outputs/join/joined.txt"),
        "CHANGED LEFT\ntupni thgir\n"
    );
}

#[test]
fn touching_a_file_without_changing_it_reruns_nothing() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    let file = std::fs::File::options()
        .write(true)
        .open(sandbox.path("data/y.txt"))
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(file);
    sandbox.ok(&["run", "p.yaml"]);
    assert!(
        sandbox.executed().is_empty(),
        "{:?}",
        sandbox.latest_statuses()
    );
}

#[test]
fn upstream_rerun_with_identical_output_leaves_downstream_cached() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    // Same letters, different case: `left` reruns, but its upper-cased output is identical.
    sandbox.write("data/x.txt", "LEFT input\n");
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["left"]);
}

#[test]
fn changed_setting_shows_in_status_with_old_and_new_value_and_origin() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    let status = sandbox.ok(&[
        "status",
        "p.yaml",
        "--set",
        "stages.tail.with.cmd=wc -l < $TY_IN_R/out.txt > size.txt",
    ]);
    assert!(
        status.contains(r#"with.cmd: "wc -c < $TY_IN_R/out.txt > size.txt" → "wc -l < $TY_IN_R/out.txt > size.txt""#),
        "{status}"
    );
    assert!(status.contains("[--set stages.tail.with.cmd="), "{status}");
    let tail_line = status.lines().find(|line| line.contains(" tail ")).unwrap();
    assert!(tail_line.contains("will run"), "{status}");
    let left_line = status.lines().find(|line| line.contains(" left ")).unwrap();
    assert!(left_line.contains("cached"), "{status}");
}

#[test]
fn status_explains_never_run_and_upstream_changes() {
    let sandbox = branches();
    let status = sandbox.ok(&["status", "p.yaml"]);
    assert!(
        status.contains("never ran with these settings and inputs"),
        "{status}"
    );
    assert!(
        status.contains("upstream `left`, `right` will run"),
        "{status}"
    );
    assert!(
        !sandbox.path("runs").exists(),
        "status must not record a run"
    );
}

#[test]
fn switching_profile_and_back_is_a_cache_hit() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml", "--profile", "dev"]);
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["join"]);
    sandbox.ok(&["run", "p.yaml", "--profile", "dev"]);
    assert!(
        sandbox.executed().is_empty(),
        "{:?}",
        sandbox.latest_statuses()
    );
    assert_eq!(sandbox.store_entries("join").len(), 2);
}

#[test]
fn force_reruns_the_stage_and_only_changed_downstream() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    sandbox.ok(&["run", "p.yaml", "--force", "right"]);
    // `right` reruns; its output is identical, so `join` and `tail` stay cached.
    assert_eq!(sandbox.executed(), ["right"]);
    sandbox.ok(&["run", "p.yaml", "--force-all"]);
    assert_eq!(sandbox.executed(), ["join", "left", "right", "tail"]);
    assert_eq!(sandbox.store_entries("right").len(), 1);
}

#[test]
fn until_runs_ancestors_only_and_only_requires_cached_upstream() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml", "--until", "tail"]);
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses["right"], "executed");
    assert_eq!(statuses["tail"], "executed");
    assert_eq!(statuses["left"], "not_selected");
    assert_eq!(statuses["join"], "not_selected");

    let failure = sandbox.fails(&["run", "p.yaml", "--only", "join"]);
    assert!(
        failure.contains("stage `left` has no cached output"),
        "{failure}"
    );
    sandbox.ok(&["run", "p.yaml", "--only", "left"]);
    sandbox.ok(&["run", "p.yaml", "--only", "join"]);
    assert_eq!(sandbox.executed(), ["join"]);
}

#[test]
fn dry_run_reports_without_running_or_recording() {
    let sandbox = branches();
    let output = sandbox.ok(&["run", "p.yaml", "--dry-run"]);
    assert!(output.contains("will run"), "{output}");
    assert!(!sandbox.path("runs").exists());
    assert!(sandbox.store_entries("left").is_empty());
}

#[test]
fn independent_stages_run_side_by_side_with_jobs() {
    let sandbox = Sandbox::new();
    let rendezvous = sandbox.path("rendezvous");
    std::fs::create_dir(&rendezvous).unwrap();
    // Each stage announces itself and waits for the other: only concurrent runs finish.
    let wait = |me: &str, other: &str| {
        format!(
            "touch {dir}/{me}; for i in $(seq 400); do [ -f {dir}/{other} ] && exit 0; sleep 0.05; done; exit 1",
            dir = rendezvous.display()
        )
    };
    sandbox.write(
        "p.yaml",
        &format!(
            "name: pair\nstages:\n  a:\n    kind: command\n    with: {{ cmd: '{}' }}\n  b:\n    kind: command\n    with: {{ cmd: '{}' }}\n",
            wait("a", "b"),
            wait("b", "a")
        ),
    );
    sandbox.ok(&["run", "p.yaml", "--jobs", "2"]);
    assert_eq!(sandbox.executed(), ["a", "b"]);
}

#[test]
fn toml_pipelines_behave_like_yaml() {
    let sandbox = Sandbox::new();
    sandbox.write("data/x.txt", "hi\n");
    sandbox.write(
        "p.toml",
        "name = \"t\"\nseed = 3\n[stages.up]\nkind = \"command\"\ninputs = { src = \"data/x.txt\" }\n[stages.up.with]\ncmd = \"tr a-z A-Z < $TY_IN_SRC > o.txt\"\n",
    );
    sandbox.ok(&["run", "p.toml"]);
    assert_eq!(sandbox.read("runs/latest/outputs/up/o.txt"), "HI\n");
    let resolved = sandbox.ok(&["resolve", "p.toml"]);
    assert!(
        resolved.contains("stages.up.with.cmd = \"tr a-z A-Z < $TY_IN_SRC > o.txt\"  # p.toml:7"),
        "{resolved}"
    );
}

/// `-v` shows the run's stage events as log lines; `-q` and the default do not, and
/// `RUST_LOG` works like `TRAINYARD_LOG`.
#[test]
fn verbosity_flags_and_rust_log_choose_the_log_lines() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: v\nstages:\n  a:\n    kind: command\n    with: { cmd: 'echo a > a.txt' }\n",
    );
    let verbose = sandbox.ok(&["-v", "run", "p.yaml"]);
    assert!(verbose.contains("stage_started"), "{verbose}");
    let quiet = sandbox.ok(&["-q", "run", "p.yaml", "--force", "a"]);
    assert!(!quiet.contains("stage_started"), "{quiet}");
    assert!(quiet.contains("1 executed"), "{quiet}");
    let plain = sandbox.ok(&["run", "p.yaml", "--force", "a"]);
    assert!(!plain.contains("stage_started"), "{plain}");
    let output = sandbox
        .command(&["run", "p.yaml", "--force", "a"])
        .env("RUST_LOG", "trainyard::run=info")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("stage_finished"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
