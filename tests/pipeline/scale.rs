//! Big and hostile pipelines: thousands of stages resolve and plan like a handful do,
//! and a file nested a million deep is refused at once. The timing targets live in
//! `bench/config_scale.sh`; these tests check behaviour (with bounds far above what the
//! code takes, only to catch a return of the quadratic or worse).

use std::time::Instant;

use crate::common::Sandbox;
use trainyard::config::{self, LoadOptions, Origin};
use trainyard::executor;
use trainyard::runs::StageStatus;
use trainyard::store::Workspace;

/// A fan-out of `stages` command stages: `s0`, and `sK` reading the output of
/// `s((K-1)/4)`, as `bench/config_scale.sh` generates them. Stage `sK` (K > 0) starts at
/// line `9 + 6 (K - 1)`; its `cmd` is four lines further.
fn fan_out(stages: usize) -> String {
    let mut text = String::from("name: fan-out\nseed: 1\nstages:\n");
    for index in 0..stages {
        text.push_str(&format!("  s{index}:\n    kind: command\n"));
        if index > 0 {
            text.push_str(&format!("    inputs: {{ up: s{} }}\n", (index - 1) / 4));
        }
        text.push_str(&format!(
            "    with:\n      cmd: \"echo {index} > out.txt\"\n      outputs: [out.txt]\n"
        ));
    }
    text
}

#[test]
fn a_megabyte_of_nesting_is_refused_at_once_naming_file_and_line() {
    let sandbox = Sandbox::new();
    for (name, opener) in [("seq.yaml", "["), ("map.yaml", "{a: ")] {
        let text = format!(
            "name: deep\nstages:\n  a: {}\n",
            opener.repeat((1 << 20) / opener.len())
        );
        sandbox.write(name, &text);
        let started = Instant::now();
        let error = sandbox.fails(&["resolve", name]);
        let elapsed = started.elapsed();
        assert!(
            error.contains(&format!("invalid YAML in {name}: nesting deeper than 128")),
            "{error}"
        );
        assert!(error.contains(&format!("--> {name}:3:")), "{error}");
        // The quote is a window around the column, not the megabyte line.
        assert!(error.len() < 1_000, "{} bytes of message", error.len());
        // The parser alone took minutes on such a file; the depth scan stops at once.
        assert!(
            elapsed.as_secs_f64() < 5.0,
            "{name}: rejected in {elapsed:?}"
        );
    }
}

#[test]
fn thousands_of_stages_resolve_in_file_order_with_their_lines() {
    let sandbox = Sandbox::new();
    let stages = 5_000;
    sandbox.write("p.yaml", &fan_out(stages));
    let options = LoadOptions {
        overrides: vec!["stages.s4998.with.cmd=echo changed".to_string()],
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let pipeline = config::load(&sandbox.path("p.yaml"), &options).unwrap();
    let dag = trainyard::dag::build(&pipeline).unwrap();
    let workspace = Workspace::new(sandbox.dir.path()).unwrap();
    let report = executor::status(&workspace, &pipeline, &dag).unwrap();
    let elapsed = started.elapsed();

    let names: Vec<String> = (0..stages).map(|index| format!("s{index}")).collect();
    let resolved: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(resolved, names);
    let last = &pipeline.stages[stages - 1];
    assert_eq!(last.settings["cmd"], "echo 4999 > out.txt");
    assert_eq!(last.inputs["up"], "s1249");
    assert_eq!(
        pipeline.origins["stages.s4999.with.cmd"],
        Origin::File {
            path: sandbox.path("p.yaml"),
            line: Some(9 + 6 * 4998 + 4),
            profile: None,
        }
    );
    assert_eq!(
        pipeline.stages[stages - 2].settings["cmd"],
        "echo changed",
        "an override still reaches one stage among thousands"
    );
    assert!(matches!(
        &pipeline.origins["stages.s4998.with.cmd"],
        Origin::Cli { arg } if arg == "stages.s4998.with.cmd=echo changed"
    ));

    // Every upstream stage comes first, in file order.
    assert_eq!(dag.order, (0..stages).collect::<Vec<_>>());
    assert_eq!(dag.upstream(stages - 1), vec![1249]);
    assert_eq!(report.stages.len(), stages);
    assert_eq!(report.stages[0].status, StageStatus::WillRun);
    assert!(
        report.stages[1..]
            .iter()
            .all(|stage| stage.status == StageStatus::WillRun
                && stage.reasons.len() == 1
                && stage.fingerprint.is_none())
    );
    // Quadratic resolution took minutes here; the linear one well under a second
    // (a debug build, so the bound is loose).
    assert!(elapsed.as_secs_f64() < 60.0, "took {elapsed:?}");
}

#[test]
fn many_stages_run_once_then_are_all_cached_with_their_links() {
    let sandbox = Sandbox::new();
    let stages = 60;
    sandbox.write("p.yaml", &fan_out(stages));
    let first = sandbox.ok(&["run", "p.yaml", "--jobs", "3"]);
    assert!(
        first.contains(&format!("{stages} executed, 0 cached")),
        "{first}"
    );
    let second = sandbox.ok(&["run", "p.yaml"]);
    assert!(
        second.contains(&format!("0 executed, {stages} cached")),
        "{second}"
    );
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses.len(), stages);
    assert!(statuses.values().all(|status| status == "cached"));
    assert_eq!(
        sandbox.read("runs/latest/outputs/s59/out.txt"),
        "59\n",
        "each stage's output is linked into the run"
    );
    // Through `outputs/.s`, so that the link fits in its inode (no block per stage).
    let link = std::fs::read_link(sandbox.path("runs/latest/outputs/s59")).unwrap();
    assert!(link.starts_with(".s/s59/"), "{}", link.display());
    assert!(link.as_os_str().len() < 60, "{}", link.display());
    let record = sandbox.latest_record();
    assert_eq!(record["stages"]["s59"]["inputs"]["up"]["stage"], "s14");
}

#[test]
fn queued_stages_are_skipped_once_a_stage_fails() {
    let sandbox = Sandbox::new();
    let mut pipeline = String::from(
        "name: q\nstages:\n  bad:\n    kind: command\n    with: { cmd: 'exit 3' }\n  slow:\n    kind: command\n    with: { cmd: 'sleep 0.5; echo done > out.txt' }\n",
    );
    for index in 0..8 {
        pipeline.push_str(&format!(
            "  c{index}:\n    kind: command\n    with: {{ cmd: 'echo {index} > out.txt' }}\n"
        ));
    }
    sandbox.write("p.yaml", &pipeline);
    let output = sandbox.fails(&["run", "p.yaml", "--jobs", "2"]);
    let statuses = sandbox.latest_statuses();
    assert_eq!(statuses["bad"], "failed");
    assert_eq!(statuses["slow"], "executed", "a running stage finishes");
    for index in 0..8 {
        assert_eq!(statuses[&format!("c{index}")], "skipped", "{output}");
        assert!(
            output.contains(&format!("skipped  c{index} (not run: `bad` failed")),
            "{output}"
        );
    }
}
