//! `trainyard audit`: a run checked against its `resolved_settings.json`, and reproduced.

use crate::common;

use std::path::Path;

use common::{Sandbox, branches, text};

/// Runs `trainyard ARGS` in `sandbox`; returns the exit code and stdout + stderr.
fn trainyard(sandbox: &Sandbox, args: &[&str]) -> (i32, String) {
    let output = sandbox.trainyard(args);
    (output.status.code().unwrap_or(-1), text(&output))
}

/// The line of the audit report about `stage` (the first one naming it).
fn stage_line<'a>(report: &'a str, stage: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(stage))
        .unwrap_or_else(|| panic!("no line for `{stage}` in:\n{report}"))
}

/// Every file below `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

#[test]
fn audit_of_a_fresh_run_passes() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    let report = sandbox.ok(&["audit", "runs/latest"]);
    for stage in ["left", "right", "join", "tail"] {
        assert!(
            stage_line(&report, stage).trim_start().starts_with("ok"),
            "{report}"
        );
    }
    assert!(report.contains("pipeline "), "{report}");
    assert!(report.contains("audit passed: 4 stage(s)"), "{report}");
    // Auditing a cached run is the same: its outputs are the ones recorded.
    sandbox.ok(&["run", "p.yaml"]);
    sandbox.ok(&["audit", "runs/latest"]);
}

#[test]
fn altered_output_file_fails_naming_the_stage_and_the_file() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    let entry = &sandbox.store_entries("join")[0];
    std::fs::write(entry.join("joined.txt"), "tampered\n").unwrap();
    let (code, report) = trainyard(&sandbox, &["audit", "runs/latest"]);
    assert_eq!(code, 1, "{report}");
    let line = stage_line(&report, "join");
    assert!(line.contains("DIFFERS"), "{report}");
    assert!(line.contains("joined.txt"), "{report}");
    assert!(
        report.contains("join: output differs: expected "),
        "{report}"
    );
    assert!(
        report.contains("file joined.txt changed: expected "),
        "{report}"
    );
    assert!(
        stage_line(&report, "left").trim_start().starts_with("ok"),
        "{report}"
    );
    assert!(report.contains("audit FAILED: 1 of 4"), "{report}");
}

#[test]
fn changed_log_is_not_a_difference() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    let entry = &sandbox.store_entries("left")[0];
    std::fs::write(entry.join("stage.log"), "rewritten log\n").unwrap();
    sandbox.ok(&["audit", "runs/latest"]);
}

#[test]
fn changed_external_input_fails_naming_the_input_and_file() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    sandbox.write("data/x.txt", "changed left\n");
    let (code, report) = trainyard(&sandbox, &["audit", "runs/latest"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        stage_line(&report, "left").contains("input `src` differs"),
        "{report}"
    );
    assert!(
        report.contains("left: input `src` (data/x.txt) differs: expected "),
        "{report}"
    );
    assert!(
        stage_line(&report, "right").trim_start().starts_with("ok"),
        "{report}"
    );
}

#[test]
fn deleted_output_is_reported_missing_here_and_downstream() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    std::fs::remove_dir_all(&sandbox.store_entries("right")[0]).unwrap();
    let (code, report) = trainyard(&sandbox, &["audit", "runs/latest"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        stage_line(&report, "right").contains("output missing"),
        "{report}"
    );
    assert!(report.contains("right: output is missing: "), "{report}");
    // The stages that read it name the input they can no longer find.
    assert!(
        stage_line(&report, "tail").contains("input `r` missing"),
        "{report}"
    );
    assert!(
        stage_line(&report, "join").contains("input `b` missing"),
        "{report}"
    );
}

#[test]
fn missing_manifest_is_a_difference() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    std::fs::remove_file(sandbox.store_entries("tail")[0].join("manifest.json")).unwrap();
    let (code, report) = trainyard(&sandbox, &["audit", "runs/latest"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        stage_line(&report, "tail").contains("manifest unreadable"),
        "{report}"
    );
}

#[test]
fn unreadable_or_invalid_run_records_name_the_file() {
    let sandbox = branches();
    // Unreadable: an I/O error (exit 4); not a run record: invalid input (exit 2).
    let (code, report) = trainyard(&sandbox, &["audit", "runs/nothing-here"]);
    assert_eq!(code, 4, "{report}");
    assert!(report.contains("runs/nothing-here"), "{report}");

    sandbox.ok(&["run", "p.yaml"]);
    sandbox.write("runs/latest/resolved_settings.json", "{ not json");
    let (code, report) = trainyard(&sandbox, &["audit", "runs/latest"]);
    assert_eq!(code, 2, "{report}");
    assert!(
        report.contains("resolved_settings.json is not a valid run record"),
        "{report}"
    );
}

#[test]
fn stages_without_output_in_the_run_are_listed_but_not_audited() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml", "--until", "left"]);
    let report = sandbox.ok(&["audit", "runs/latest"]);
    assert!(
        stage_line(&report, "tail").contains("not audited (not selected in the run)"),
        "{report}"
    );
    assert!(report.contains("audit passed: 1 stage(s)"), "{report}");
}

#[test]
fn failed_and_skipped_stages_are_listed_upstream_first_but_not_audited() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        r#"
name: fails
stages:
  after:
    kind: command
    inputs: { b: bad }
    with: { cmd: "true" }
  bad:
    kind: command
    inputs: { g: good }
    with: { cmd: "exit 3" }
  good:
    kind: command
    with: { cmd: "echo hi > hi.txt" }
"#,
    );
    sandbox.fails(&["run", "p.yaml"]);
    let report = sandbox.ok(&["audit", "runs/latest"]);
    let position = |stage: &str| report.find(stage_line(&report, stage)).unwrap();
    assert!(position("good") < position("bad") && position("bad") < position("after"));
    assert!(
        stage_line(&report, "bad").contains("not audited (failed in the run)"),
        "{report}"
    );
    assert!(
        stage_line(&report, "after").contains("not audited (skipped in the run)"),
        "{report}"
    );
    assert!(report.contains("audit passed: 1 stage(s)"), "{report}");
}

#[test]
fn changed_pipeline_file_is_a_labelled_warning_only() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml", "--profile", "dev"]);
    sandbox.write("p.yaml", &format!("{}# edited\n", common::BRANCHES));
    let report = sandbox.ok(&["audit", "runs/latest"]);
    assert!(
        report.contains("warning: pipeline ") && report.contains("changed since the run"),
        "{report}"
    );
    assert!(report.contains("not counted as a difference"), "{report}");
}

#[test]
fn moved_workspace_is_audited_where_it_is_now() {
    let sandbox = Sandbox::new();
    sandbox.write("before/p.yaml", common::BRANCHES);
    sandbox.write("before/data/x.txt", "left input\n");
    sandbox.write("before/data/y.txt", "right input\n");
    let output = sandbox
        .command(&["run", "p.yaml"])
        .current_dir(sandbox.path("before"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    std::fs::rename(sandbox.path("before"), sandbox.path("after")).unwrap();
    let report = sandbox.ok(&["audit", "after/runs/latest"]);
    assert!(report.contains("(recorded at "), "{report}");
    assert!(report.contains("audit passed: 4 stage(s)"), "{report}");
    // External inputs are followed to the new place too.
    sandbox.write("after/data/y.txt", "moved and changed\n");
    let (code, report) = trainyard(&sandbox, &["audit", "after/runs/latest"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        stage_line(&report, "right").contains("input `src` differs"),
        "{report}"
    );
}

#[test]
fn reproduce_of_a_deterministic_pipeline_is_bit_identical_and_leaves_the_store_alone() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml", "--profile", "dev"]);
    let store_before = tree(&sandbox.path(".trainyard/store"));
    let runs_before = tree(&sandbox.path("runs"));
    let report = sandbox.ok(&["audit", "runs/latest", "--reproduce", "--into", "repro"]);
    for stage in ["left", "right", "join", "tail"] {
        let line = report
            .lines()
            .find(|line| line.trim_start().starts_with("identical") && line.contains(stage));
        assert!(line.is_some(), "{stage} not identical:\n{report}");
    }
    assert!(
        report.contains("reproduction passed: 4 stage(s) bit-identical"),
        "{report}"
    );
    assert_eq!(tree(&sandbox.path(".trainyard/store")), store_before);
    assert_eq!(tree(&sandbox.path("runs")), runs_before);
    // The reproduction is a workspace of its own, with the profile's settings baked in.
    assert_eq!(
        sandbox.read("repro/runs/latest/outputs/join/joined.txt"),
        "tupni thgir\nLEFT INPUT\n"
    );
    sandbox.ok(&["audit", "repro/runs/latest"]);
}

#[test]
fn reproduce_reports_a_stage_whose_output_is_not_deterministic() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        r#"
name: noisy
stages:
  stable:
    kind: command
    inputs: { src: data/in.txt }
    with: { cmd: "sort $TY_IN_SRC > sorted.txt" }
  noise:
    kind: command
    with: { cmd: "head -c 16 /dev/urandom | od -An -tx1 > noise.txt; date +%s%N > when.txt" }
  size:
    kind: command
    inputs: { n: noise/noise.txt }
    with: { cmd: "wc -c < $TY_IN_N > size.txt" }
"#,
    );
    sandbox.write("data/in.txt", "b\na\n");
    sandbox.ok(&["run", "p.yaml"]);
    // The outputs on disk are the recorded ones…
    sandbox.ok(&["audit", "runs/latest"]);
    // …but running the same settings again does not give the same bytes.
    let (code, report) = trainyard(&sandbox, &["audit", "runs/latest", "--reproduce"]);
    assert_eq!(code, 1, "{report}");
    let noise = report
        .lines()
        .find(|line| line.contains("DIFFERS") && line.contains("noise"))
        .unwrap_or_else(|| panic!("no difference reported for noise:\n{report}"));
    assert!(noise.contains("output: expected "), "{report}");
    assert!(report.contains("noise: file noise.txt changed"), "{report}");
    assert!(report.contains("noise: file when.txt changed"), "{report}");
    // `size` reads a different input, yet its output (a byte count) is the same.
    assert!(
        report.contains("size: fingerprint differs from the run's: input `n` changed"),
        "{report}"
    );
    for stage in ["stable", "size"] {
        assert!(
            report
                .lines()
                .any(|line| line.trim_start().starts_with("identical") && line.contains(stage)),
            "{stage}:\n{report}"
        );
    }
    assert!(report.contains("reproduction FAILED: 1 of 3"), "{report}");
    // Without --into the reproduction's workspace is temporary.
    assert!(
        report.contains("(removed; --into DIR keeps it)"),
        "{report}"
    );

    let (code, json) = trainyard(&sandbox, &["audit", "runs/latest", "--reproduce", "--json"]);
    assert_eq!(code, 1, "{json}");
    let start = json.find('{').unwrap();
    let document: serde_json::Value = serde_json::Deserializer::from_str(&json[start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(document["passed"], false);
    assert_eq!(
        document["audit"]["stages"][0]["findings"],
        serde_json::json!([])
    );
    let verdicts: Vec<(&str, &str)> = document["reproduction"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|stage| {
            (
                stage["name"].as_str().unwrap(),
                stage["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("noise", "differs"),
            ("stable", "identical"),
            ("size", "identical")
        ]
    );
}

#[test]
fn reproduce_refuses_a_directory_that_is_not_empty() {
    let sandbox = branches();
    sandbox.ok(&["run", "p.yaml"]);
    let (code, report) = trainyard(
        &sandbox,
        &["audit", "runs/latest", "--reproduce", "--into", "."],
    );
    assert_eq!(code, 2, "{report}");
    assert!(report.contains("not empty"), "{report}");
}

#[test]
fn reproduce_of_a_pipeline_with_variables_keeps_literal_dollar_braces() {
    let sandbox = Sandbox::new();
    // The run records resolved values; a `${vars.…}` that was escaped in the pipeline is
    // literal text there and must stay literal when the reproduction reads it back.
    sandbox.write(
        "p.yaml",
        "name: v\nvars: { word: hi, src: data/in.txt }\nstages:\n  say:\n    kind: command\n    inputs: { src: \"${vars.src}\" }\n    with: { cmd: \"echo '${vars.word} $${vars.word}' > out.txt; cat $TY_IN_SRC >> out.txt\" }\n",
    );
    sandbox.write("data/in.txt", "input\n");
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        sandbox.read("runs/latest/outputs/say/out.txt"),
        "hi ${vars.word}\ninput\n"
    );
    let report = sandbox.ok(&["audit", "runs/latest", "--reproduce", "--into", "repro"]);
    assert!(
        report.contains("reproduction passed: 1 stage(s) bit-identical"),
        "{report}"
    );
}
