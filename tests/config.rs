//! Settings resolution: defaults < pipeline < profiles < environment < --set, each
//! resolved value with its origin.

mod common;

use common::Sandbox;
use trainyard::config::{self, LoadOptions, Origin};

const PIPELINE: &str = "name: layered
seed: 1
stages:
  train:
    kind: command
    with:
      cmd: from-pipeline
      env: { A: pipeline, B: pipeline, C: pipeline, D: pipeline }
profiles:
  dev:
    description: laptop sized
    stages:
      train:
        with:
          env: { B: dev, C: dev, D: dev }
";

fn options(profiles: &[&str], env: &[(&str, &str)], overrides: &[&str]) -> LoadOptions {
    LoadOptions {
        profiles: profiles.iter().map(|name| name.to_string()).collect(),
        overrides: overrides.iter().map(|set| set.to_string()).collect(),
        env: env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        profile_dirs: Vec::new(),
    }
}

#[test]
fn later_layers_win_and_every_value_remembers_its_origin() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    let pipeline = config::load(
        &sandbox.path("p.yaml"),
        &options(
            &["dev"],
            &[
                ("TRAINYARD_STAGES__TRAIN__WITH__ENV__C", "env"),
                ("TRAINYARD_STAGES__TRAIN__WITH__ENV__D", "env"),
                ("TRAINYARD_LOG", "debug"),
            ],
            &["stages.train.with.env.D=cli", "seed=9"],
        ),
    )
    .unwrap();
    let env = &pipeline.stages[0].settings["env"];
    assert_eq!(
        env,
        &serde_json::json!({ "A": "pipeline", "B": "dev", "C": "env", "D": "cli" })
    );
    assert_eq!(pipeline.seed, 9);

    let origin = |key: &str| pipeline.origins[key].to_string();
    let file = sandbox.path("p.yaml").display().to_string();
    assert_eq!(origin("stages.train.with.env.A"), format!("{file}:8"));
    assert_eq!(
        origin("stages.train.with.env.B"),
        format!("{file}:15 (profile dev)")
    );
    assert_eq!(
        origin("stages.train.with.env.C"),
        "env TRAINYARD_STAGES__TRAIN__WITH__ENV__C"
    );
    assert_eq!(
        origin("stages.train.with.env.D"),
        "--set stages.train.with.env.D=cli"
    );
    assert_eq!(origin("seed"), "--set seed=9");
    assert_eq!(
        pipeline.origins["stages.train.with.outputs"],
        Origin::Default
    );
    assert_eq!(
        pipeline.profiles[0].description.as_deref(),
        Some("laptop sized")
    );
}

#[test]
fn profile_files_stack_in_order_and_kinds_apply_to_every_stage_of_a_kind() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "pipelines/p.yaml",
        "name: p\nstages:\n  one:\n    kind: command\n    with: { cmd: one }\n  two:\n    kind: command\n    with: { cmd: two }\n",
    );
    sandbox.write(
        "pipelines/profiles/smoke.yaml",
        "description: tiny\nkinds:\n  command:\n    env: { SIZE: tiny }\n",
    );
    sandbox.write("shared/cpu.toml", "[stages.two.with.env]\nSIZE = \"cpu\"\n");
    let mut options = options(&["smoke,cpu"], &[], &[]);
    options.profile_dirs.push(sandbox.path("shared"));
    let pipeline = config::load(&sandbox.path("pipelines/p.yaml"), &options).unwrap();
    assert_eq!(pipeline.stages[0].settings["env"]["SIZE"], "tiny");
    assert_eq!(pipeline.stages[1].settings["env"]["SIZE"], "cpu");
    let smoke_origin = pipeline.origins["stages.one.with.env.SIZE"].to_string();
    assert!(
        smoke_origin.ends_with("profiles/smoke.yaml:4 (profile smoke)"),
        "{smoke_origin}"
    );
    let names: Vec<&str> = pipeline
        .profiles
        .iter()
        .map(|profile| profile.name.as_str())
        .collect();
    assert_eq!(names, ["smoke", "cpu"]);
    assert_eq!(
        pipeline.profiles[1].file.hash,
        blake3::hash(sandbox.read("shared/cpu.toml").as_bytes())
            .to_hex()
            .to_string()
    );

    let listed =
        config::available_profiles(&sandbox.path("pipelines/p.yaml"), &[sandbox.path("shared")])
            .unwrap();
    let listed: Vec<(&str, Option<&str>)> = listed
        .iter()
        .map(|profile| (profile.name.as_str(), profile.description.as_deref()))
        .collect();
    assert_eq!(listed, [("smoke", Some("tiny")), ("cpu", None)]);
}

#[test]
fn a_profiles_pipelines_section_tunes_one_pipeline_over_its_kinds_defaults() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "pipelines/p.yaml",
        "name: p\nstages:\n  one:\n    kind: command\n    with: { cmd: one }\n  two:\n    kind: command\n    with: { cmd: two }\n",
    );
    // Beside the pipelines directory, as in a project with pipelines/ and profiles/.
    sandbox.write(
        "profiles/smoke.yaml",
        "kinds:\n  command:\n    env: { SIZE: kind, MODE: kind }\npipelines:\n  p:\n    stages:\n      two:\n        with:\n          env: { SIZE: pipeline }\n  other:\n    stages:\n      absent: { with: { cmd: never } }\nstages:\n  two:\n    with:\n      env: { MODE: top }\n",
    );
    let pipeline = config::load(
        &sandbox.path("pipelines/p.yaml"),
        &options(&["smoke"], &[], &[]),
    )
    .unwrap();
    let env = |stage: usize, key: &str| pipeline.stages[stage].settings["env"][key].clone();
    assert_eq!(env(0, "SIZE"), "kind");
    assert_eq!(env(1, "SIZE"), "pipeline", "pipelines.p wins over kinds");
    assert_eq!(env(1, "MODE"), "top", "top-level stages win over both");
    let origin = pipeline.origins["stages.two.with.env.SIZE"].to_string();
    assert!(
        origin.ends_with("profiles/smoke.yaml:9 (profile smoke)"),
        "{origin}"
    );
    let origin = pipeline.origins["stages.one.with.env.SIZE"].to_string();
    assert!(
        origin.ends_with("profiles/smoke.yaml:3 (profile smoke)"),
        "{origin}"
    );

    sandbox.write("profiles/bad.yaml", "pipelines: [p]\n");
    let error = config::load(
        &sandbox.path("pipelines/p.yaml"),
        &options(&["bad"], &[], &[]),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("`pipelines` must be a map"), "{error}");
    assert!(error.contains("bad.yaml:1"), "{error}");
}

#[test]
fn stage_order_follows_the_file_not_the_alphabet() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", "name: p\nstages:\n  zeta:\n    kind: command\n    with: { cmd: z }\n  alpha:\n    kind: command\n    with: { cmd: a }\n");
    let pipeline = config::load(&sandbox.path("p.yaml"), &LoadOptions::default()).unwrap();
    let names: Vec<&str> = pipeline
        .stages
        .iter()
        .map(|stage| stage.name.as_str())
        .collect();
    assert_eq!(names, ["zeta", "alpha"]);
    let dag = trainyard::dag::build(&pipeline).unwrap();
    assert_eq!(dag.order, [0, 1]);
}

#[test]
fn each_run_records_settings_origins_hashes_and_machine() {
    let sandbox = common::branches();
    sandbox.ok(&["run", "p.yaml", "--profile", "dev"]);
    let record = sandbox.latest_record();
    assert_eq!(record["status"], "succeeded");
    assert_eq!(
        record["pipeline"]["file"]["hash"],
        blake3::hash(sandbox.read("p.yaml").as_bytes())
            .to_hex()
            .to_string()
    );
    assert_eq!(record["profiles"][0]["name"], "dev");
    assert_eq!(
        record["settings"]["stages"]["join"]["with"]["cmd"],
        "cat $TY_IN_B $TY_IN_A > joined.txt"
    );
    assert_eq!(
        record["origins"]["stages.join.with.cmd"],
        "p.yaml:26 (profile dev)"
    );
    assert_eq!(record["trainyard"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        record["machine"]["cpu"]
            .as_str()
            .is_some_and(|cpu| !cpu.is_empty())
    );
    let left = &record["stages"]["left"];
    assert_eq!(
        left["inputs"]["src"]["hash"],
        blake3::hash(b"left input\n").to_hex().to_string()
    );
    assert_eq!(left["inputs"]["src"]["path"], "data/x.txt");
    let output = sandbox.path(left["output"].as_str().unwrap());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["output_hash"], left["output_hash"]);
    assert_eq!(manifest["fingerprint"], left["fingerprint"]);
    let events: Vec<serde_json::Value> = sandbox
        .read("runs/latest/logs.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["event"], "run_started");
    assert_eq!(events.last().unwrap()["event"], "run_finished");
    assert_eq!(
        events
            .iter()
            .filter(|event| event["event"] == "stage_finished")
            .count(),
        4
    );
}

#[test]
fn the_committed_schema_matches_the_code() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/pipeline.schema.json"
    ))
    .unwrap();
    assert!(
        committed == config::schema::pipeline_schema_text(),
        "schemas/pipeline.schema.json is stale: run `cargo run -- schema --output schemas/pipeline.schema.json`"
    );
}
