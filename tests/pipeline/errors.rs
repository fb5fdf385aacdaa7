//! Every configuration and run error names what is wrong and where.

use crate::common;

use common::Sandbox;

fn failing(pipeline: &str, args: &[&str]) -> String {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", pipeline);
    let mut all = vec!["run", "p.yaml"];
    all.extend_from_slice(args);
    sandbox.fails(&all)
}

#[test]
fn a_cycle_names_the_stages_on_it() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    inputs: { x: c }\n    with: { cmd: 'true' }\n  b:\n    kind: command\n    inputs: { x: a }\n    with: { cmd: 'true' }\n  c:\n    kind: command\n    inputs: { x: b/f.txt }\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(
        error.contains("p.yaml: dependency cycle: a → b → c → a"),
        "{error}"
    );
}

#[test]
fn an_unknown_reference_suggests_the_closest_stage() {
    let error = failing(
        "name: e\nstages:\n  tok:\n    kind: command\n    with: { cmd: 'true' }\n  cache:\n    kind: command\n    inputs: { t: tokz }\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(
        error.contains("stage `cache`, input `t` (p.yaml:8): `tokz` is not a stage"),
        "{error}"
    );
    assert!(error.contains("did you mean `tok`?"), "{error}");
}

#[test]
fn a_missing_external_input_names_the_file_and_the_stage() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    inputs: { data: data/corpus.txt }\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(error.contains("stage `a`, input `data`"), "{error}");
    assert!(error.contains("data/corpus.txt does not exist"), "{error}");
}

#[test]
fn an_unknown_setting_names_file_line_and_suggests() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    with:\n      cmd: 'true'\n      outptus: [x]\n",
        &[],
    );
    assert!(
        error.contains("unknown key `outptus` in `stages.a.with`"),
        "{error}"
    );
    assert!(error.contains("--> p.yaml:7:7"), "{error}");
    assert!(error.contains("7 |       outptus: [x]"), "{error}");
    assert!(error.contains("did you mean `outputs`?"), "{error}");
}

/// `pretrain` and `sft` flatten the shared training-loop settings into their own, so
/// serde cannot refuse unknown keys there: the configuration checks them against the
/// kind's schema, for the kind's own keys and the shared ones alike.
#[test]
fn an_unknown_training_setting_is_refused_like_any_other() {
    for (key, suggestion) in [
        ("lerning_rate", None),
        ("stepz", Some("steps")),
        ("contxt", Some("context")),
    ] {
        let error = failing(
            &format!(
                "name: e\nstages:\n  d:\n    kind: command\n    with: {{ cmd: 'true' }}\n  p:\n    kind: pretrain\n    inputs: {{ data: d }}\n    with:\n      steps: 3\n      {key}: 1\n"
            ),
            &[],
        );
        assert!(
            error.contains(&format!("unknown key `{key}` in `stages.p.with`")),
            "{error}"
        );
        assert!(error.contains("--> p.yaml:11:7"), "{error}");
        match suggestion {
            Some(known) => assert!(
                error.contains(&format!("did you mean `{known}`?")),
                "{error}"
            ),
            None => assert!(error.contains("expected one of: "), "{error}"),
        }
    }
    let error = failing(
        "name: e\nstages:\n  d:\n    kind: command\n    with: { cmd: 'true' }\n  s:\n    kind: sft\n    inputs: { data: d, base: d }\n    with: { epochs: 1 }\n",
        &["--set", "stages.s.with.weight_decai=0.1"],
    );
    assert!(
        error.contains("unknown key `weight_decai` in `stages.s.with`"),
        "{error}"
    );
    assert!(
        error.contains("--set stages.s.with.weight_decai=0.1"),
        "{error}"
    );
    assert!(error.contains("did you mean `weight_decay`?"), "{error}");
}

#[test]
fn an_unknown_top_level_or_stage_key_is_rejected_with_a_suggestion() {
    let error = failing(
        "name: e\nsed: 3\nstages:\n  a:\n    kind: command\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(error.contains("unknown key `sed`"), "{error}");
    assert!(error.contains("did you mean `seed`?"), "{error}");
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    inptus: {}\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(
        error.contains("unknown key `inptus` in `stages.a`"),
        "{error}"
    );
    assert!(error.contains("p.yaml:5:5"), "{error}");
}

#[test]
fn a_wrong_type_names_the_key_path_and_file() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    with:\n      cmd: [1, 2]\n",
        &[],
    );
    assert!(
        error.contains("`stages.a.with.cmd` has the wrong type: found sequence, expected a string"),
        "{error}"
    );
    assert!(error.contains("p.yaml:6:7"), "{error}");
}

#[test]
fn a_missing_required_setting_names_the_stage() {
    let error = failing("name: e\nstages:\n  a:\n    kind: command\n", &[]);
    assert!(
        error.contains("missing key `cmd` in `stages.a.with`"),
        "{error}"
    );
    assert!(error.contains("p.yaml:3:3"), "{error}");
}

#[test]
fn an_unknown_kind_suggests_the_closest() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: comand\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(
        error.contains("stage `a`: unknown kind `comand`"),
        "{error}"
    );
    assert!(error.contains("p.yaml:4:5"), "{error}");
    assert!(error.contains("did you mean `command`?"), "{error}");
}

#[test]
fn yaml_and_toml_syntax_errors_show_file_line_and_column() {
    let error = failing("name: e\nstages:\n  a: [1, 2\n  b: 3\n", &[]);
    assert!(error.contains("invalid YAML in p.yaml"), "{error}");
    assert!(error.contains("--> p.yaml:4:"), "{error}");

    let sandbox = Sandbox::new();
    sandbox.write("p.toml", "name = \"e\"\n[stages.a\nkind = \"command\"\n");
    let error = sandbox.fails(&["run", "p.toml"]);
    assert!(error.contains("invalid TOML in p.toml"), "{error}");
    assert!(error.contains("--> p.toml:2:"), "{error}");
}

#[test]
fn overrides_and_profiles_that_do_not_fit_are_explained() {
    let pipeline = "name: e\nstages:\n  train:\n    kind: command\n    with: { cmd: 'true' }\nprofiles:\n  dev: { stages: { train: { with: { cmd: 'false' } } } }\n";
    let error = failing(pipeline, &["--set", "stages.trian.with.cmd=x"]);
    assert!(
        error.contains("stage `trian` is not in pipeline p.yaml"),
        "{error}"
    );
    assert!(
        error.contains("set by --set stages.trian.with.cmd=x"),
        "{error}"
    );
    assert!(error.contains("did you mean `train`?"), "{error}");

    let error = failing(pipeline, &["--profile", "deev"]);
    assert!(error.contains("unknown profile `deev`"), "{error}");
    assert!(error.contains("did you mean `dev`?"), "{error}");

    let error = failing(pipeline, &["--set", "stages.train.with"]);
    assert!(error.contains("expected KEY=VALUE"), "{error}");
}

#[test]
fn a_failing_stage_shows_its_status_and_output_and_skips_dependents() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: e\nstages:\n  bad:\n    kind: command\n    with: { cmd: 'echo first line; echo last words >&2; exit 3' }\n  after:\n    kind: command\n    inputs: { x: bad }\n    with: { cmd: 'true' }\n  other:\n    kind: command\n    with: { cmd: 'echo ok > ok.txt' }\n",
    );
    let output = sandbox.trainyard(&["run", "p.yaml"]);
    let error = common::text(&output);
    assert_eq!(output.status.code(), Some(1), "{error}");
    assert!(
        error.contains("stage `bad` (command) failed: command exited with status 3"),
        "{error}"
    );
    assert!(error.contains("first line\nlast words"), "{error}");
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses["bad"], "failed");
    assert_eq!(statuses["after"], "skipped");
    assert_eq!(
        statuses["other"], "skipped",
        "without --keep-going the run stops"
    );
    assert!(
        error.contains("skipped  other (not run: `bad` failed; --keep-going runs"),
        "the console lists the stage the failure kept from running:\n{error}"
    );
    assert!(
        error.contains("skipped  after (upstream `bad` failed)"),
        "{error}"
    );
    assert!(
        sandbox.store_entries("bad").is_empty(),
        "a failed stage leaves the store as it was"
    );

    sandbox.fails(&["run", "p.yaml", "--keep-going"]);
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses["after"], "skipped");
    assert_eq!(statuses["other"], "executed");
    assert_eq!(sandbox.latest_record()["status"], "failed");
}

#[test]
fn a_command_that_forgets_a_declared_output_fails() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    with: { cmd: 'true', outputs: [model.bin] }\n",
        &[],
    );
    assert!(
        error.contains("did not create its declared outputs: model.bin"),
        "{error}"
    );
}

#[test]
fn unknown_stage_names_in_flags_are_rejected() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: e\nstages:\n  train:\n    kind: command\n    with: { cmd: 'true' }\n",
    );
    for flag in ["--force", "--only", "--until"] {
        let output = sandbox.trainyard(&["run", "p.yaml", flag, "trian"]);
        let error = common::text(&output);
        assert_eq!(output.status.code(), Some(2), "{error}");
        assert!(
            error.contains(&format!(
                "{flag} trian: no such stage; did you mean `train`?"
            )),
            "{error}"
        );
        // Refused before anything is recorded: no run directory that looks killed.
        assert!(!sandbox.path("runs").exists(), "{error}");
    }
}

/// Nothing written in the file is silently dropped: a repeated stage or key is an error
/// naming both lines, two input names that give one `TY_IN_` variable are refused, and
/// a profile is a name, not a path.
#[test]
fn settings_are_never_silently_lost() {
    let error = failing(
        "name: e\nstages:\n  s1:\n    kind: command\n    with: { cmd: 'echo a > a' }\n  s1:\n    kind: command\n    with: { cmd: 'echo b > b' }\n",
        &[],
    );
    assert!(
        error.contains("p.yaml: key `stages.s1` is given twice (lines 3 and 6)"),
        "{error}"
    );
    let error = failing(
        "name: e\nstages:\n  s1:\n    kind: command\n    with:\n      cmd: 'echo a > a'\n      cmd: 'echo b > b'\n",
        &[],
    );
    assert!(
        error.contains("`stages.s1.with.cmd` is given twice (lines 6 and 7)"),
        "{error}"
    );
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    with: { cmd: 'echo a > a' }\n  b:\n    kind: command\n    inputs: { a-b: a, a_b: a }\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(
        error.contains("inputs `a-b` and `a_b` would both be $TY_IN_A_B"),
        "{error}"
    );
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: e\nstages:\n  a:\n    kind: command\n    with: { cmd: 'echo a > a' }\n",
    );
    sandbox.write("outside.yaml", "seed: 9\n");
    sandbox.write("profiles/dev.yaml", "seed: 3\n");
    let error = sandbox.fails(&["run", "p.yaml", "--profile", "../outside"]);
    assert!(
        error.contains("`../outside` is not a profile name"),
        "{error}"
    );
    sandbox.ok(&["run", "p.yaml", "--profile", "dev"]);
}

/// A byte-order mark at the start of a pipeline (as some Windows editors write) is
/// accepted.
#[test]
fn a_byte_order_mark_is_accepted() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "\u{feff}name: e\nstages:\n  a:\n    kind: command\n    with: { cmd: 'echo a > a' }\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
}

/// `trainyard … | head -1` ends quietly when `head` stops reading: no panic message.
#[test]
fn a_broken_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    let sandbox = Sandbox::new();
    let mut pipeline = String::from("name: e\nstages:\n");
    for index in 0..600 {
        pipeline.push_str(&format!(
            "  s{index}:\n    kind: command\n    with: {{ cmd: 'echo {index} > a' }}\n"
        ));
    }
    sandbox.write("p.yaml", &pipeline);
    let mut child = sandbox
        .command(&["resolve", "p.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone: the next writes meet a closed pipe.
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!first.is_empty());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

/// Exit codes say what kind of failure it was (2 invalid pipeline, 4 I/O; 1, 3 and 130
/// are checked where stages fail, the lock is busy and runs are interrupted), and an OS
/// error is printed once.
#[test]
fn exit_codes_tell_invalid_pipelines_from_io_errors() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", "name: e\nstages:\n  a:\n    kind: nope\n");
    let invalid = sandbox.trainyard(&["run", "p.yaml"]);
    assert_eq!(invalid.status.code(), Some(2), "{}", common::text(&invalid));
    sandbox.write(
        "ok.yaml",
        "name: e\nstages:\n  a:\n    kind: command\n    with: { cmd: 'echo a > a' }\n",
    );
    sandbox.write("not-a-dir", "a file where the workspace should be\n");
    let workspace = sandbox.path("not-a-dir");
    let io = sandbox.trainyard(&[
        "--workspace",
        workspace.to_str().unwrap(),
        "run",
        sandbox.path("ok.yaml").to_str().unwrap(),
    ]);
    let message = common::text(&io);
    assert_eq!(io.status.code(), Some(4), "{message}");
    let os_error = "Not a directory (os error 20)";
    assert_eq!(message.matches(os_error).count(), 1, "{message}");
}

/// Cycles, a stage reading itself and an empty file name the pipeline file.
#[test]
fn graph_and_empty_file_errors_name_the_file() {
    let error = failing(
        "name: e\nstages:\n  a:\n    kind: command\n    inputs: { x: a }\n    with: { cmd: 'true' }\n",
        &[],
    );
    assert!(
        error.contains("p.yaml: stage `a` reads its own output"),
        "{error}"
    );
    let error = failing("", &[]);
    assert!(
        error.contains("missing key `name` in the pipeline p.yaml"),
        "{error}"
    );
}

/// Output that cannot be written (a full disk) is an I/O error, not a panic.
#[test]
fn an_unwritable_stdout_is_an_io_error_not_a_panic() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: e\nstages:\n  a:\n    kind: command\n    with: { cmd: 'true' }\n",
    );
    for args in [
        &["status", "p.yaml"][..],
        &["kinds"],
        &["resolve", "p.yaml"],
    ] {
        let output = sandbox
            .command(args)
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let error = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{args:?}: {error}");
        assert!(error.contains("error: cannot write to stdout"), "{error}");
        assert!(!error.contains("panicked"), "{error}");
    }
}
