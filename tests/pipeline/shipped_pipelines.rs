//! End-to-end: the pipelines and profiles shipped in `pipelines/` and `profiles/`, run as
//! a newcomer would, each in a fresh workspace at the `smoke` profile.

use crate::common;
use trainyard::data::Split;

use std::path::{Path, PathBuf};

use common::Sandbox;

const PIPELINES: [&str; 5] = [
    "quickstart",
    "wiki-finetune",
    "pretrain-sft",
    "lora-export",
    "chat-lora",
];
const PROFILES: [&str; 3] = ["smoke", "dev", "prod"];

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn pipeline(name: &str) -> String {
    repo(&format!("pipelines/{name}.yaml"))
        .display()
        .to_string()
}

fn metrics(sandbox: &Sandbox, stage: &str) -> serde_json::Value {
    serde_json::from_str(&sandbox.read(&format!("runs/latest/outputs/{stage}/metrics.json")))
        .expect("metrics.json is JSON")
}

#[test]
fn every_shipped_pipeline_resolves_with_every_shipped_profile() {
    let sandbox = Sandbox::new();
    for name in PIPELINES {
        for profile in PROFILES {
            let text = sandbox.ok(&["resolve", &pipeline(name), "--profile", profile]);
            assert!(text.contains("stages."), "{name} {profile}:\n{text}");
            sandbox.ok(&["status", &pipeline(name), "--profile", profile]);
        }
    }
    let listed = sandbox.ok(&["profiles", &pipeline("quickstart")]);
    for profile in PROFILES {
        let line = listed
            .lines()
            .find(|line| line.starts_with(profile))
            .unwrap_or_else(|| panic!("{profile} not listed:\n{listed}"));
        assert!(line.len() > profile.len() + 20, "no description: {line}");
    }
}

#[test]
fn smoke_profile_shrinks_the_quickstart_and_names_where_values_come_from() {
    let sandbox = Sandbox::new();
    let text = sandbox.ok(&["resolve", &pipeline("quickstart"), "--profile", "smoke"]);
    let line = |key: &str| {
        text.lines()
            .find(|line| line.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key}:\n{text}"))
            .to_string()
    };
    let steps = line("stages.pretrain.with.steps");
    assert!(
        steps.contains("30") && steps.contains("smoke.yaml"),
        "{steps}"
    );
    let vocab = line("stages.tokenizer.with.vocab_size");
    assert!(
        vocab.contains("384") && vocab.contains("smoke.yaml"),
        "{vocab}"
    );
    let epochs = line("stages.sft.with.epochs");
    assert!(epochs.contains("null"), "{epochs}");
}

/// The quickstart at `smoke`: every stage runs, `audit` passes and a reproduction is
/// bit-identical, a second run runs nothing, changing the SFT learning rate reruns SFT and
/// only what is downstream of it, the exported model answers in `chat`, and `audit` fails
/// once an artifact is altered.
#[test]
fn quickstart_smoke_runs_caches_and_reruns_only_downstream() {
    let sandbox = Sandbox::new();
    let quickstart = pipeline("quickstart");
    sandbox.ok(&["run", &quickstart, "--profile", "smoke"]);
    let all = [
        "chat-cache",
        "chats",
        "docs",
        "evaluate",
        "evaluate-base",
        "export",
        "merge",
        "pretrain",
        "sft",
        "text-cache",
        "tokenizer",
    ];
    assert_eq!(sandbox.executed(), all);
    // Fingerprints outlive refactors: a workspace made by an older trainyard must find
    // its outputs cached. These were computed before the training settings became one
    // shared (flattened) type; the stages before pretrain are deterministic on any CPU.
    // Pretrain's changed once since, on purpose: its VERSION went to 2 when its numerics
    // changed (one vectorised exp).
    let record = sandbox.latest_record();
    for (stage, fingerprint) in [
        (
            "tokenizer",
            "a1ffdb4a243874b83a699be35e5676b3eef0b950f7a06c17c4753f5ad0fa3352",
        ),
        (
            "pretrain",
            "56c04260e39cb3736995f497ab2d658dc34347974e35a95cbad7f4f85964c408",
        ),
    ] {
        assert_eq!(
            record["stages"][stage]["fingerprint"], fingerprint,
            "the fingerprint of `{stage}` changed"
        );
    }

    let evaluation = metrics(&sandbox, "evaluate");
    for key in ["eval_loss", "exact_match", "contains_accuracy"] {
        assert!(evaluation[key].is_number(), "{key} missing: {evaluation}");
    }
    assert_eq!(evaluation["questions"], 16);
    let export = sandbox.path("runs/latest/outputs/export");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model-f16.gguf",
        "model-q8_0.gguf",
    ] {
        assert!(export.join(file).is_file(), "export lacks {file}");
    }

    let audit = sandbox.ok(&["audit", "runs/latest"]);
    assert!(audit.contains("audit passed: 11 stage(s)"), "{audit}");
    let reproduction = sandbox.ok(&["audit", "runs/latest", "--reproduce"]);
    assert!(
        reproduction.contains("reproduction passed: 11 stage(s) bit-identical"),
        "{reproduction}"
    );

    sandbox.ok(&["run", &quickstart, "--profile", "smoke"]);
    assert!(
        sandbox.executed().is_empty(),
        "{:?}",
        sandbox.latest_statuses()
    );

    sandbox.ok(&[
        "run",
        &quickstart,
        "--profile",
        "smoke",
        "--set",
        "stages.sft.with.lr=0.002",
    ]);
    assert_eq!(sandbox.executed(), ["evaluate", "export", "merge", "sft"]);

    let answer = sandbox.ok(&[
        "chat",
        "runs/latest/outputs/export",
        "--prompt",
        "Which river flows through the town?",
        "--max-new-tokens",
        "12",
    ]);
    assert!(!answer.trim().is_empty(), "no answer");

    let config = sandbox.path("runs/latest/outputs/export/tokenizer_config.json");
    let text = std::fs::read_to_string(&config).expect("tokenizer_config.json");
    std::fs::write(&config, text.replace("<|end|>", "<|stop|>")).expect("alter the export");
    let output = sandbox.trainyard(&["audit", "runs/latest"]);
    let report = common::text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("tokenizer_config.json"), "{report}");
    let export_line = report
        .lines()
        .find(|line| line.contains(" export "))
        .unwrap_or_else(|| panic!("no export line:\n{report}"));
    assert!(export_line.contains("DIFFERS"), "{report}");
}

#[test]
fn wiki_finetune_smoke_lowers_the_base_models_loss() {
    let sandbox = Sandbox::new();
    sandbox.ok(&["run", &pipeline("wiki-finetune"), "--profile", "smoke"]);
    let before = metrics(&sandbox, "evaluate-base")["eval_loss"]
        .as_f64()
        .expect("base loss");
    let after = metrics(&sandbox, "evaluate")["eval_loss"]
        .as_f64()
        .expect("tuned loss");
    assert!(
        after < before - 0.3,
        "fine-tuning on the chunks should lower their loss: {before} → {after}"
    );
}

#[test]
fn pretrain_sft_smoke_mixes_three_sources_and_exports() {
    let sandbox = Sandbox::new();
    sandbox.ok(&["run", &pipeline("pretrain-sft"), "--profile", "smoke"]);
    let log = sandbox.read("runs/latest/outputs/pretrain/stage.log");
    for line in [
        "data `data`: ",
        "weight 2 (33% of batches)",
        "data `data_dialogues`: ",
        "weight 1 (17% of batches)",
        "data `data_wiki`: ",
        "weight 3 (50% of batches)",
    ] {
        assert!(log.contains(line), "{line} not in the log:\n{log}");
    }
    let export = sandbox.path("runs/latest/outputs/export");
    assert!(export.join("model-q8_0.gguf").is_file());
    assert!(export.join("tokenizer_config.json").is_file());
}

#[test]
fn lora_export_smoke_trains_tool_calls_and_exports_the_merged_model() {
    let sandbox = Sandbox::new();
    sandbox.ok(&["run", &pipeline("lora-export"), "--profile", "smoke"]);
    let adapter = sandbox.path("runs/latest/outputs/adapter");
    let config: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/adapter/adapter_config.json"))
            .expect("adapter_config.json");
    assert_eq!(config["r"], 8);
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let export = sandbox.path("runs/latest/outputs/export");
    for file in ["model.safetensors", "model-f16.gguf", "model-q8_0.gguf"] {
        assert!(export.join(file).is_file(), "export lacks {file}");
    }
}

#[test]
fn chat_lora_smoke_trains_a_chatml_base_in_its_own_template_and_exports_it() {
    let sandbox = Sandbox::new();
    sandbox.ok(&["run", &pipeline("chat-lora"), "--profile", "smoke"]);
    assert_eq!(
        sandbox.executed(),
        ["adapter", "chat-cache", "chats", "export", "merge"]
    );
    // The cache holds ChatML, rendered by Qwen2.5's template from the base's
    // tokenizer_config.json, trained on the answers and their <|im_end|> only.
    let cache_dir = sandbox.path("runs/latest/outputs/chat-cache");
    let cache = trainyard::data::token_cache::TokenCache::open(&cache_dir).expect("cache");
    let examples = cache.examples(Split::Train).expect("train split");
    let tokenizer =
        tokenizers::Tokenizer::from_file(repo("data/models/tiny-qwen2/tokenizer.json")).unwrap();
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    let (ids, mask) = examples.example(0);
    let text = tokenizer.decode(&ids, false).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(
        !text.contains("<|user|>"),
        "trainyard's template leaked in: {text}"
    );
    let trained: Vec<u32> = ids
        .iter()
        .zip(mask)
        .filter(|(_, flag)| **flag == 1)
        .map(|(id, _)| *id)
        .collect();
    let trained_text = tokenizer.decode(&trained, false).unwrap();
    assert!(!trained_text.contains("<|im_start|>"), "{trained_text}");
    assert_eq!(trained.last(), Some(&im_end), "{trained_text}");
    // Tool calls are trained in the model's own <tool_call> format.
    let with_tools = (0..examples.len())
        .map(|index| tokenizer.decode(&examples.example(index).0, false).unwrap())
        .find(|text| text.contains("<tool_call>"))
        .expect("a conversation with a tool call");
    assert!(with_tools.contains("\"name\": \""), "{with_tools}");
    // `add_tokens` made the template's <tool_response> tags single special tokens, with
    // the ids after the base tokenizer's last, trained as the adapter's token rows.
    let extended =
        tokenizers::Tokenizer::from_file(cache_dir.join("tokenizer/tokenizer.json")).unwrap();
    assert_eq!(extended.token_to_id("<tool_response>"), Some(805));
    assert_eq!(extended.token_to_id("</tool_response>"), Some(806));
    assert!(
        (0..examples.len()).any(|index| examples.example(index).0.contains(&805)),
        "no tool response was tokenized with the new token"
    );
    let adapter_config: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/adapter/adapter_config.json"))
            .unwrap();
    assert_eq!(
        adapter_config["trainable_token_indices"],
        serde_json::json!({"embed_tokens": [805, 806]})
    );
    // The export keeps the base's template and stop tokens, in HF and in GGUF; its
    // tokenizer config is the base's with the two tokens listed, as transformers would.
    let export = sandbox.path("runs/latest/outputs/export");
    let mut base_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("data/models/tiny-qwen2/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    for (id, token) in [(805, "<tool_response>"), (806, "</tool_response>")] {
        base_config["added_tokens_decoder"][id.to_string()] = serde_json::json!({
            "content": token, "lstrip": false, "normalized": false, "rstrip": false,
            "single_word": false, "special": true
        });
        base_config["additional_special_tokens"]
            .as_array_mut()
            .unwrap()
            .push(token.into());
    }
    let export_config: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/export/tokenizer_config.json"))
            .unwrap();
    assert_eq!(export_config, base_config);
    let generation: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/export/generation_config.json"))
            .unwrap();
    assert!(
        generation["eos_token_id"]
            .as_array()
            .is_some_and(|ids| ids.contains(&im_end.into()))
    );
    let gguf = std::fs::read(export.join("model-f16.gguf")).unwrap();
    let needle = b"<|im_start|>assistant";
    assert!(
        gguf.windows(needle.len()).any(|window| window == needle),
        "the GGUF lacks the ChatML template"
    );
    // The merged model chats in ChatML and stops at <|im_end|>.
    let answer = sandbox.ok(&[
        "chat",
        "runs/latest/outputs/export",
        "--prompt",
        "What's the weather on Varro tomorrow?",
        "--max-new-tokens",
        "8",
    ]);
    assert!(!answer.contains("<|im_start|>"), "{answer}");
}
