//! Settings resolution: defaults < pipeline < profiles < environment < --set, each
//! resolved value with its origin.

use crate::common;

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
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/profile.schema.json"
    ))
    .unwrap();
    assert!(
        committed == config::schema::profile_schema_text(),
        "schemas/profile.schema.json is stale: run `cargo run -- schema profile --output schemas/profile.schema.json`"
    );
}

/// Editors name the bad key only when `kind` is the discriminator: the stage declares its
/// keys once (closed) and gives `with:` each kind's settings in an `if`/`then`, never a
/// `oneOf` of whole stages.
#[test]
fn the_schema_keys_stages_on_their_kind() {
    let schema = config::schema::pipeline_schema();
    let stage = &schema["$defs"]["Stage"];
    assert!(stage.get("oneOf").is_none() && stage.get("anyOf").is_none());
    assert_eq!(stage["required"], serde_json::json!(["kind"]));
    assert_eq!(stage["additionalProperties"], false);
    let keys: Vec<&String> = stage["properties"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["kind", "description", "inputs", "with", "resources"]);
    assert_eq!(
        stage["properties"]["resources"]["$ref"], "#/$defs/Resources",
        "where its Slurm job runs"
    );
    assert_eq!(schema["$defs"]["Resources"]["additionalProperties"], false);
    let names: Vec<&str> = trainyard::stages::KINDS
        .iter()
        .map(|kind| kind.name)
        .collect();
    assert_eq!(
        stage["properties"]["kind"]["enum"],
        serde_json::json!(names)
    );
    let branches = stage["allOf"].as_array().unwrap();
    assert_eq!(branches.len(), names.len());
    for (branch, name) in branches.iter().zip(&names) {
        assert_eq!(branch["if"]["properties"]["kind"]["const"], *name);
        assert_eq!(branch["if"]["required"], serde_json::json!(["kind"]));
        let with = &branch["then"]["properties"]["with"]["$ref"];
        let settings = with.as_str().unwrap().trim_start_matches("#/$defs/");
        // Unknown keys in `with:` are still flagged: the settings object is closed.
        assert_eq!(
            schema["$defs"][settings]["additionalProperties"], false,
            "{name}"
        );
    }
    // A profile's `kinds:` names each kind, so a misspelt kind is reported.
    let profile = config::schema::profile_schema();
    let kinds = profile["properties"]["kinds"]["properties"]
        .as_object()
        .unwrap();
    assert_eq!(kinds.keys().count(), names.len());
    assert_eq!(
        profile["properties"]["kinds"]["additionalProperties"],
        false
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

// ---------------------------------------------------------------------------------------
// `hf:org/name[@revision]` inputs, from a fake Hugging Face cache (never the network).

const MAIN_COMMIT: &str = "1111111111111111111111111111111111111111";
const V1_COMMIT: &str = "2222222222222222222222222222222222222222";

/// Lays out `models--org--tiny` under `hub` as huggingface_hub does: `refs/main` and
/// `refs/v1` name commits, each snapshot's files are symlinks into `blobs/`. The
/// snapshot of each commit holds `config.json` = `{label}-{commit prefix}`.
fn fake_hub(hub: &std::path::Path, label: &str) {
    let repo = hub.join("models--org--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN_COMMIT).unwrap();
    std::fs::write(repo.join("refs/v1"), V1_COMMIT).unwrap();
    for commit in [MAIN_COMMIT, V1_COMMIT] {
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        for (file, content) in [
            ("config.json", format!("{label}-{}", &commit[..4])),
            ("tokenizer.json", "{}".to_string()),
        ] {
            let blob = blake3::hash(content.as_bytes()).to_hex().to_string();
            std::fs::write(repo.join("blobs").join(&blob), content).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(file)).unwrap();
        }
    }
}

const HUB_PIPELINE: &str = "name: hub
stages:
  other:
    kind: command
    with: { cmd: \"echo independent > o.txt\" }
  peek:
    kind: command
    inputs: { model: \"hf:org/tiny\" }
    with: { cmd: \"cat $TY_IN_MODEL/config.json > out.txt\" }
";

/// `trainyard ARGS` with exactly the given Hugging Face variables (and a HOME with no
/// cache in it, so the machine's own cache never leaks in).
fn with_hf(
    sandbox: &Sandbox,
    args: &[&str],
    vars: &[(&str, &std::path::Path)],
) -> std::process::Output {
    let mut command = sandbox.command(args);
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        command.env_remove(var);
    }
    command.env("HOME", sandbox.path("home"));
    for (var, value) in vars {
        command.env(var, value);
    }
    command.output().expect("run trainyard")
}

fn hf_ok(sandbox: &Sandbox, args: &[&str], vars: &[(&str, &std::path::Path)]) -> String {
    let output = with_hf(sandbox, args, vars);
    let text = common::text(&output);
    assert!(
        output.status.success(),
        "trainyard {args:?} failed:\n{text}"
    );
    text
}

fn peek_output(sandbox: &Sandbox) -> String {
    let record = sandbox.latest_record();
    let dir = sandbox.path(record["stages"]["peek"]["output"].as_str().unwrap());
    std::fs::read_to_string(dir.join("out.txt")).unwrap()
}

#[test]
fn hf_model_resolves_through_refs_main_and_is_recorded() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", HUB_PIPELINE);
    let hub = sandbox.path("hub");
    fake_hub(&hub, "hub");
    hf_ok(&sandbox, &["run", "p.yaml"], &[("HF_HUB_CACHE", &hub)]);
    assert_eq!(peek_output(&sandbox), "hub-1111");

    let record = sandbox.latest_record();
    let peek = &record["stages"]["peek"];
    let snapshot = hub.join("models--org--tiny/snapshots").join(MAIN_COMMIT);
    assert_eq!(peek["inputs"]["model"]["path"], "hf:org/tiny");
    assert_eq!(peek["input_paths"]["model"], snapshot.display().to_string());
    let hub_model = &peek["hub_models"]["model"];
    assert_eq!(hub_model["id"], "hf:org/tiny");
    assert_eq!(hub_model["repo"], "org/tiny");
    assert_eq!(hub_model["revision"], "main");
    assert_eq!(hub_model["commit"], MAIN_COMMIT);
    assert_eq!(hub_model["path"], snapshot.display().to_string());
    // Hashed by content, through the symlinks, like any directory input.
    let expected = trainyard::hashing::ContentHasher::uncached()
        .hash_path(&snapshot)
        .unwrap();
    assert_eq!(peek["inputs"]["model"]["hash"], expected);
    let blob_hash = blake3::hash(b"hub-1111").to_hex().to_string();
    let (_, files) = trainyard::hashing::ContentHasher::uncached()
        .hash_dir(&snapshot, &[], trainyard::hashing::Links::Follow)
        .unwrap();
    assert_eq!(files["config.json"].hash, blob_hash);

    // Inputs that read a model take it; the audit re-hashes the snapshot.
    sandbox.write(
        "export.yaml",
        "name: e\nstages:\n  out:\n    kind: export\n    inputs: { model: \"hf:org/tiny@v1\" }\n",
    );
    hf_ok(&sandbox, &["dag", "export.yaml"], &[("HF_HUB_CACHE", &hub)]);
    hf_ok(
        &sandbox,
        &["audit", "runs/latest"],
        &[("HF_HUB_CACHE", &hub)],
    );
}

#[test]
fn hf_revision_may_be_a_ref_or_a_commit_hash() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", HUB_PIPELINE);
    let hub = sandbox.path("hub");
    fake_hub(&hub, "hub");
    let env = [("HF_HUB_CACHE", hub.as_path())];
    hf_ok(
        &sandbox,
        &[
            "run",
            "p.yaml",
            "--set",
            "stages.peek.inputs.model=hf:org/tiny@v1",
        ],
        &env,
    );
    assert_eq!(peek_output(&sandbox), "hub-2222");
    let recorded = &sandbox.latest_record()["stages"]["peek"]["hub_models"]["model"];
    assert_eq!(recorded["revision"], "v1");
    assert_eq!(recorded["commit"], V1_COMMIT);

    let pinned = format!("stages.peek.inputs.model=hf:org/tiny@{V1_COMMIT}");
    hf_ok(&sandbox, &["run", "p.yaml", "--set", &pinned], &env);
    assert_eq!(peek_output(&sandbox), "hub-2222");
    // Same content, same fingerprint: it is the v1 run's output.
    assert_eq!(sandbox.latest_statuses()["peek"], "cached");
}

#[test]
fn hf_hub_cache_beats_hf_home() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", HUB_PIPELINE);
    let home = sandbox.path("hf-home");
    fake_hub(&home.join("hub"), "home");
    let hub = sandbox.path("hub");
    fake_hub(&hub, "hub");
    hf_ok(
        &sandbox,
        &["run", "p.yaml"],
        &[("HF_HOME", &home), ("HF_HUB_CACHE", &hub)],
    );
    assert_eq!(peek_output(&sandbox), "hub-1111");
    hf_ok(&sandbox, &["run", "p.yaml"], &[("HF_HOME", &home)]);
    assert_eq!(peek_output(&sandbox), "home-1111");
    // With neither, ~/.cache/huggingface/hub.
    fake_hub(&sandbox.path("home/.cache/huggingface/hub"), "default");
    hf_ok(&sandbox, &["run", "p.yaml"], &[]);
    assert_eq!(peek_output(&sandbox), "default-1111");
}

#[test]
fn missing_hf_model_names_the_path_and_the_download_command_and_nothing_runs() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", HUB_PIPELINE);
    let hub = sandbox.path("hub");
    let env = [("HF_HUB_CACHE", hub.as_path())];
    let fails = |args: &[&str]| {
        let output = with_hf(&sandbox, args, &env);
        assert!(!output.status.success(), "{args:?} should fail");
        common::text(&output)
    };
    let error = fails(&["run", "p.yaml"]);
    let missing = hub.join("models--org--tiny");
    assert!(
        error.contains("stage `peek`, input `model` (p.yaml:8)"),
        "{error}"
    );
    assert!(
        error.contains(&format!("{} does not exist", missing.display())),
        "{error}"
    );
    assert!(error.contains("`hf download org/tiny`"), "{error}");
    assert!(
        error.contains("`huggingface-cli download org/tiny`"),
        "{error}"
    );
    assert!(sandbox.store_entries("other").is_empty(), "nothing ran");
    assert!(!sandbox.path("runs/latest").exists(), "no run was recorded");

    fake_hub(&hub, "hub");
    let error = fails(&[
        "run",
        "p.yaml",
        "--set",
        "stages.peek.inputs.model=hf:org/tiny@v2",
    ]);
    assert!(
        error.contains(&format!(
            "{} does not exist",
            hub.join("models--org--tiny/refs/v2").display()
        )),
        "{error}"
    );
    assert!(
        error.contains("`hf download org/tiny --revision v2`"),
        "{error}"
    );
    let absent = "3333333333333333333333333333333333333333";
    let error = fails(&[
        "status",
        "p.yaml",
        "--set",
        &format!("stages.peek.inputs.model=hf:org/tiny@{absent}"),
    ]);
    assert!(
        error.contains(&format!("snapshots/{absent} does not exist")),
        "{error}"
    );
    assert!(sandbox.store_entries("other").is_empty(), "nothing ran");

    // An id where no model is read is refused by name.
    sandbox.write(
        "tok.yaml",
        "name: t\nstages:\n  tok:\n    kind: tokenizer\n    inputs: { text: \"hf:org/tiny\" }\n",
    );
    let error = fails(&["dag", "tok.yaml"]);
    assert!(
        error.contains("`hf:org/tiny` is a Hugging Face model, but `text` expects"),
        "{error}"
    );
}

#[test]
fn hf_blob_content_change_changes_the_fingerprint() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", HUB_PIPELINE);
    let hub = sandbox.path("hub");
    fake_hub(&hub, "hub");
    let env = [("HF_HUB_CACHE", hub.as_path())];
    hf_ok(&sandbox, &["run", "p.yaml"], &env);
    let first = sandbox.latest_record()["stages"]["peek"]["fingerprint"].clone();
    hf_ok(&sandbox, &["run", "p.yaml"], &env);
    assert_eq!(sandbox.latest_statuses()["peek"], "cached");

    // The snapshot's symlink is unchanged; the blob it points at is edited.
    let config = hub
        .join("models--org--tiny/snapshots")
        .join(MAIN_COMMIT)
        .join("config.json");
    let blob = std::fs::canonicalize(&config).unwrap();
    std::fs::write(&blob, "edited").unwrap();
    let status = hf_ok(&sandbox, &["status", "p.yaml"], &env);
    assert!(
        status.contains("input `model` changed (hf:org/tiny)"),
        "{status}"
    );
    hf_ok(&sandbox, &["run", "p.yaml"], &env);
    assert_eq!(sandbox.executed(), ["peek"]);
    assert_ne!(
        sandbox.latest_record()["stages"]["peek"]["fingerprint"],
        first
    );
    assert_eq!(peek_output(&sandbox), "edited");
}
