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

// ---------------------------------------------------------------------------------------
// Pipeline variables: `vars:` and `${vars.NAME}`.

const VARS: &str = "name: vars
vars:
  data: data/x.txt
  tag: v2
  vocab: 512
  env: { A: one }
stages:
  copy:
    kind: command
    inputs:
      src: ${vars.data}
    with:
      cmd: \"echo run-${vars.tag} $${HOME} ${HOME} > out.txt\"
      env: ${vars.env}
  tok:
    kind: tokenizer
    inputs: { text: \"${vars.data}\" }
    with: { vocab_size: \"${vars.vocab}\" }
";

#[test]
fn vars_substitute_into_inputs_and_settings() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", VARS);
    sandbox.write(
        "p.toml",
        "name = \"vars\"\n[vars]\ndata = \"data/x.txt\"\nvocab = 512\n[stages.tok]\nkind = \"tokenizer\"\ninputs = { text = \"${vars.data}\" }\nwith = { vocab_size = \"${vars.vocab}\" }\n",
    );
    let pipeline = config::load(&sandbox.path("p.yaml"), &LoadOptions::default()).unwrap();
    let copy = pipeline.stage("copy").unwrap();
    assert_eq!(copy.inputs["src"], "data/x.txt");
    // Inside text a variable is spliced in; `$${` is a literal `${`; other `${…}` stay.
    assert_eq!(
        copy.settings["cmd"],
        "echo run-v2 ${HOME} ${HOME} > out.txt"
    );
    // A whole value keeps the variable's type: a map stays a map, a number a number.
    assert_eq!(copy.settings["env"], serde_json::json!({ "A": "one" }));
    let tok = pipeline.stage("tok").unwrap();
    assert_eq!(tok.inputs["text"], "data/x.txt");
    assert_eq!(tok.settings["vocab_size"], serde_json::json!(512));
    assert_eq!(pipeline.values_json()["vars"]["vocab"], 512);

    let toml = config::load(&sandbox.path("p.toml"), &LoadOptions::default()).unwrap();
    assert_eq!(toml.stages[0].inputs["text"], "data/x.txt");
    assert_eq!(
        toml.stages[0].settings["vocab_size"],
        serde_json::json!(512)
    );

    // A number cannot be text where text is expected, and says where.
    let error = config::load(
        &sandbox.path("p.yaml"),
        &options(&[], &[], &["vars.tag={ a: 1 }"]),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("`${vars.tag}` is a map"), "{error}");
    assert!(error.contains("p.yaml:13"), "{error}");
}

#[test]
fn set_vars_changes_every_use() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: p
vars: { base: models/a }
stages:
  cache:
    kind: command
    inputs: { tokenizer: \"${vars.base}\" }
    with: { cmd: \"echo ${vars.base}\" }
  train:
    kind: command
    inputs: { base: \"${vars.base}\", tokenizer: \"${vars.base}\" }
    with: { cmd: 'true' }
profiles:
  dev:
    vars: { base: models/dev }
",
    );
    let uses = |pipeline: &config::ResolvedPipeline| {
        vec![
            pipeline.stage("cache").unwrap().inputs["tokenizer"].clone(),
            pipeline.stage("cache").unwrap().settings["cmd"]
                .as_str()
                .unwrap()
                .trim_start_matches("echo ")
                .to_string(),
            pipeline.stage("train").unwrap().inputs["base"].clone(),
            pipeline.stage("train").unwrap().inputs["tokenizer"].clone(),
        ]
    };
    let load = |profiles: &[&str], env: &[(&str, &str)], set: &[&str]| {
        config::load(&sandbox.path("p.yaml"), &options(profiles, env, set)).unwrap()
    };
    assert_eq!(uses(&load(&[], &[], &[])), ["models/a"; 4]);
    assert_eq!(uses(&load(&["dev"], &[], &[])), ["models/dev"; 4]);
    let env = [("TRAINYARD_VARS__BASE", "models/env")];
    assert_eq!(uses(&load(&["dev"], &env, &[])), ["models/env"; 4]);
    let set = ["vars.base=hf:Qwen/Qwen2.5-0.5B"];
    assert_eq!(
        uses(&load(&["dev"], &env, &set)),
        ["hf:Qwen/Qwen2.5-0.5B"; 4]
    );
    // A stage's own override still wins over the variable for that one use.
    let pipeline = load(&[], &[], &["vars.base=x", "stages.train.inputs.base=y"]);
    assert_eq!(uses(&pipeline), ["x", "x", "y", "x"]);
    assert_eq!(
        pipeline.origins["stages.train.inputs.base"].to_string(),
        "--set stages.train.inputs.base=y"
    );
}

#[test]
fn unknown_var_names_file_line_and_suggests() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: p\nvars:\n  base_model: m\nstages:\n  a:\n    kind: command\n    with:\n      cmd: \"echo ${vars.base_modle}\"\n",
    );
    let error = sandbox.fails(&["resolve", "p.yaml"]);
    assert!(
        error.contains("unknown variable `${vars.base_modle}` in `stages.a.with.cmd`"),
        "{error}"
    );
    assert!(error.contains("--> p.yaml:8:7"), "{error}");
    assert!(error.contains("did you mean `base_model`?"), "{error}");

    // A use from --set is named by its flag; a variable's own value is checked too.
    sandbox.write(
        "ok.yaml",
        "name: p\nvars:\n  base_model: m\nstages:\n  a:\n    kind: command\n    with:\n      cmd: \"echo ${vars.base_model}\"\n",
    );
    let error = sandbox.fails(&[
        "resolve",
        "ok.yaml",
        "--set",
        "stages.a.with.cmd=${vars.bse_model}",
    ]);
    assert!(
        error.contains("(set by --set stages.a.with.cmd=${vars.bse_model})"),
        "{error}"
    );
    assert!(error.contains("did you mean `base_model`?"), "{error}");
    sandbox.write(
        "q.yaml",
        "name: q\nvars:\n  a: \"${vars.b}\"\n  b: \"x-${vars.a}\"\nstages:\n  s:\n    kind: command\n    with: { cmd: \"${vars.a}\" }\n",
    );
    let error = sandbox.fails(&["resolve", "q.yaml"]);
    assert!(error.contains("refers to itself: a → b → a"), "{error}");
    assert!(error.contains("q.yaml:"), "{error}");
}

#[test]
fn var_origin_is_where_it_was_set() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: p
vars:
  base: models/a
  tag: t
stages:
  a:
    kind: command
    inputs: { base: \"${vars.base}\" }
    with: { cmd: \"echo ${vars.tag}-${vars.base}\" }
profiles:
  dev:
    vars: { tag: dev }
",
    );
    let pipeline = config::load(&sandbox.path("p.yaml"), &options(&["dev"], &[], &[])).unwrap();
    let file = sandbox.path("p.yaml").display().to_string();
    assert_eq!(
        pipeline.origins["stages.a.inputs.base"].to_string(),
        format!("from ${{vars.base}} set by {file}:3")
    );
    assert_eq!(
        pipeline.origins["stages.a.with.cmd"].to_string(),
        format!(
            "from ${{vars.tag}} set by {file}:12 (profile dev); ${{vars.base}} set by {file}:3"
        )
    );
    assert_eq!(
        pipeline.origins["vars.tag"].to_string(),
        format!("{file}:12 (profile dev)")
    );

    let shown = sandbox.ok(&["resolve", "p.yaml", "--set", "vars.base=hf:org/name"]);
    let line = shown
        .lines()
        .find(|line| line.starts_with("stages.a.inputs.base"))
        .unwrap();
    assert!(line.contains("\"hf:org/name\""), "{shown}");
    assert!(
        line.ends_with("# from ${vars.base} set by --set vars.base=hf:org/name"),
        "{shown}"
    );
}

#[test]
fn fingerprint_sees_resolved_value() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: p\nvars: { word: alpha }\nstages:\n  say:\n    kind: command\n    with: { cmd: \"echo ${vars.word} > out.txt\" }\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    let first = sandbox.latest_record();
    let output = |record: &serde_json::Value| {
        let dir = sandbox.path(record["stages"]["say"]["output"].as_str().unwrap());
        std::fs::read_to_string(dir.join("out.txt")).unwrap()
    };
    assert_eq!(output(&first), "alpha\n");
    assert_eq!(
        first["settings"]["stages"]["say"]["with"]["cmd"],
        "echo alpha > out.txt"
    );

    let status = sandbox.ok(&["status", "p.yaml", "--set", "vars.word=beta"]);
    assert!(
        status.contains("with.cmd: \"echo alpha > out.txt\" → \"echo beta > out.txt\""),
        "{status}"
    );
    sandbox.ok(&["run", "p.yaml", "--set", "vars.word=beta"]);
    let second = sandbox.latest_record();
    assert_eq!(sandbox.executed(), ["say"]);
    assert_ne!(
        first["stages"]["say"]["fingerprint"],
        second["stages"]["say"]["fingerprint"]
    );
    assert_eq!(output(&second), "beta\n");
    assert_eq!(
        second["origins"]["stages.say.with.cmd"],
        "from ${vars.word} set by --set vars.word=beta"
    );

    // The same resolved value written without a variable is the same stage.
    sandbox.write(
        "q.yaml",
        "name: p\nstages:\n  say:\n    kind: command\n    with: { cmd: \"echo alpha > out.txt\" }\n",
    );
    sandbox.ok(&["run", "q.yaml"]);
    assert_eq!(sandbox.latest_statuses()["say"], "cached");
}
