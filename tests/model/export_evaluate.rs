//! `export` writes a Hugging Face directory (chat template, special tokens, generation
//! config) and GGUF files that load back to the same model; `evaluate` measures loss,
//! perplexity and question accuracy of greedy chat answers.

use crate::common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{Sandbox, file_hash};
use trainyard::model::Kernels;

const TAIL: &str = "  tuned:
    kind: sft
    inputs: { data: chat-cache, base: base }
    with: { steps: 10, batch_size: 8, lr: 0.002, context: 128 }
  release:
    kind: export
    inputs: { model: tuned }
    with: { gguf: [f32, q8_0] }
  eval:
    kind: evaluate
    inputs: { model: release, data: chat-cache, questions: chats/questions.jsonl }
    with: { max_questions: 12, max_new_tokens: 12, samples: 5 }
";

fn output(sandbox: &Sandbox, stage: &str) -> PathBuf {
    sandbox.path(&format!("runs/latest/outputs/{stage}"))
}

#[test]
fn export_writes_a_loadable_hf_directory_and_gguf_and_evaluate_scores_it() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &common::chat_pipeline(TAIL));
    sandbox.ok(&["run", "p.yaml"]);

    let release = output(&sandbox, "release");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model-f32.gguf",
        "model-q8_0.gguf",
    ] {
        assert!(release.join(file).is_file(), "{file} missing in the export");
    }
    let tuned = output(&sandbox, "tuned");
    assert_eq!(
        file_hash(&release.join("model.safetensors")),
        file_hash(&tuned.join("model.safetensors")),
        "the weights are exported as they are"
    );
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/release/tokenizer_config.json"))
            .unwrap();
    assert_eq!(
        tokenizer_config["chat_template"],
        trainyard::tokenize::chat::JINJA_TEMPLATE
    );
    assert_eq!(tokenizer_config["eos_token"], "<|end|>");
    assert_eq!(
        tokenizer_config["added_tokens_decoder"]["2"]["content"],
        "<|end|>"
    );
    let config: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/release/config.json")).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["eos_token_id"], 2);

    // The export loads as a model with the same logits.
    let ids = Tensor::new(&[[4u32, 30, 31, 200, 5]], &Device::Cpu).unwrap();
    let (a, _) = trainyard::model::load_pretrained(&tuned, DType::F32, &Device::Cpu).unwrap();
    let (b, _) = trainyard::model::load_pretrained(&release, DType::F32, &Device::Cpu).unwrap();
    let diff = (a.forward(&ids, None, Kernels::Differentiable).unwrap()
        - b.forward(&ids, None, Kernels::Differentiable).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .flatten_all()
    .unwrap()
    .max(0)
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert_eq!(diff, 0.0);

    // The GGUF file is readable, with llama.cpp's architecture key.
    let mut file = std::fs::File::open(release.join("model-q8_0.gguf")).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "llama"
    );

    // evaluate: loss, perplexity and question accuracy, with samples.
    let metrics: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/eval/metrics.json")).unwrap();
    let loss = metrics["eval_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{metrics}");
    assert!((metrics["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert_eq!(metrics["questions"], 12);
    for key in ["exact_match", "contains_accuracy"] {
        let value = metrics[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&value), "{key} = {value}");
    }
    let samples: Vec<serde_json::Value> = sandbox
        .read("runs/latest/outputs/eval/samples.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(samples.len(), 5);
    for sample in &samples {
        assert!(sample["question"].as_str().is_some_and(|q| !q.is_empty()));
        assert!(sample["expected"].as_str().is_some());
        let answer = sample["answer"].as_str().unwrap();
        assert!(
            !answer.contains("<|"),
            "special tokens never appear in answers: {answer}"
        );
    }
}

#[test]
fn evaluate_needs_something_to_evaluate() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        &common::chat_pipeline("  eval:\n    kind: evaluate\n    inputs: { model: base }\n"),
    );
    let out = sandbox.fails(&["run", "p.yaml"]);
    assert!(out.contains("nothing to evaluate"), "{out}");
}

/// The bf16 sharded parity fixture copied into the sandbox at `models/base`, with a
/// tokenizer beside it.
fn bf16_sharded_base(sandbox: &Sandbox) -> PathBuf {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama-bf16-sharded");
    let base = sandbox.path("models/base");
    std::fs::create_dir_all(&base).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    common::write_test_tokenizer(&base.join("tokenizer.json"), &["a few words"], 300);
    base
}

/// Every tensor of an HF directory as (name, dtype, f32 values).
fn weights(dir: &std::path::Path) -> Vec<(String, DType, Vec<f32>)> {
    let files = trainyard::model::safetensors_files(dir).unwrap();
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.unwrap();
    let mut names: Vec<String> = mapped.tensors().into_iter().map(|(name, _)| name).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let tensor = mapped.load(&name, &Device::Cpu).unwrap();
            let values = tensor
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (name, tensor.dtype(), values)
        })
        .collect()
}

fn json_of(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn export_keeps_a_bf16_base_sharded_in_its_dtype() {
    let sandbox = Sandbox::new();
    let base = bf16_sharded_base(&sandbox);
    sandbox.write(
        "p.yaml",
        "name: release
stages:
  release:
    kind: export
    inputs: { model: models/base }
    with: { gguf: [] }
",
    );
    sandbox.ok(&["run", "p.yaml"]);
    let release = output(&sandbox, "release");
    for k in 1..=3 {
        let name = format!("model-0000{k}-of-00003.safetensors");
        assert_eq!(
            file_hash(&release.join(&name)),
            file_hash(&base.join(&name)),
            "{name} is the base's"
        );
    }
    assert!(!release.join("model.safetensors").exists());
    assert_eq!(
        json_of(&release.join("model.safetensors.index.json")),
        json_of(&base.join("model.safetensors.index.json"))
    );
    let config = json_of(&release.join("config.json"));
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["dtype"], "bfloat16");
}

#[test]
fn export_dtype_and_max_shard_size_reshard_as_transformers_does() {
    let sandbox = Sandbox::new();
    let base = bf16_sharded_base(&sandbox);
    // The same model as one f32 file (about 108 kB of weights).
    let single = sandbox.path("models/single");
    let (_, varmap, config) =
        trainyard::model::load_trainable(&base, DType::F32, &Device::Cpu).unwrap();
    trainyard::model::save_pretrained(&varmap, &config, &single).unwrap();
    std::fs::copy(base.join("tokenizer.json"), single.join("tokenizer.json")).unwrap();
    sandbox.write(
        "p.yaml",
        "name: release
stages:
  wide:
    kind: export
    inputs: { model: models/base }
    with: { gguf: [], dtype: f32 }
  split:
    kind: export
    inputs: { model: models/single }
    with: { gguf: [], max_shard_size: 40KB }
  half:
    kind: export
    inputs: { model: models/single }
    with: { gguf: [], dtype: f16 }
",
    );
    sandbox.ok(&["run", "p.yaml"]);
    let original = weights(&base);

    // A sharded bf16 base to f32: the base's three shards, widened exactly.
    let wide = output(&sandbox, "wide");
    assert_eq!(trainyard::model::safetensors_files(&wide).unwrap().len(), 3);
    assert_eq!(json_of(&wide.join("config.json"))["torch_dtype"], "float32");
    let widened = weights(&wide);
    assert_eq!(widened.len(), original.len());
    for ((name, dtype, values), (_, _, want)) in widened.iter().zip(&original) {
        assert_eq!(*dtype, DType::F32, "{name}");
        assert_eq!(values, want, "{name}");
    }

    // One f32 file with a 40 kB limit: shards of at most 40 kB of tensor data (or one
    // tensor), named and indexed as transformers names and indexes them.
    let split = output(&sandbox, "split");
    assert!(!split.join("model.safetensors").exists());
    let files = trainyard::model::safetensors_files(&split).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let index = json_of(&split.join("model.safetensors.index.json"));
    let total: u64 = original
        .iter()
        .map(|(_, _, values)| 4 * values.len() as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let count = files.len();
    for (k, file) in files.iter().enumerate() {
        assert_eq!(
            file.file_name().unwrap().to_string_lossy(),
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        );
        let data: usize = weights_in(file);
        assert!(
            data <= 40_000 || file_tensor_count(file) == 1,
            "{file:?}: {data}"
        );
    }
    for (name, _, _) in &original {
        assert!(index["weight_map"][name].is_string(), "{name} not indexed");
    }

    // f16, below the default limit: one file.
    let half = output(&sandbox, "half");
    assert!(half.join("model.safetensors").is_file());
    assert!(!half.join("model.safetensors.index.json").exists());
    assert_eq!(json_of(&half.join("config.json"))["dtype"], "float16");
    assert!(
        weights(&half)
            .iter()
            .all(|(_, dtype, _)| *dtype == DType::F16)
    );

    // Each export loads with the logits of the base (f16 rounds some weights).
    let ids = Tensor::new(&[[1u32, 17, 127, 0, 64, 5, 17]], &Device::Cpu).unwrap();
    let logits = |dir: &std::path::Path| {
        let (model, _) = trainyard::model::load_pretrained(dir, DType::F32, &Device::Cpu).unwrap();
        model.forward(&ids, None, Kernels::Differentiable).unwrap()
    };
    let want = logits(&base);
    let diff = |dir: &std::path::Path| {
        (logits(dir) - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&wide) < 1e-5);
    assert!(diff(&split) < 1e-5);
    assert!(diff(&half) < 0.05, "{}", diff(&half));
}

/// Bytes of tensor data in one safetensors file.
fn weights_in(file: &std::path::Path) -> usize {
    let bytes = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .iter()
        .map(|(_, view)| view.data().len())
        .sum()
}

fn file_tensor_count(file: &std::path::Path) -> usize {
    let bytes = std::fs::read(file).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).unwrap().len()
}

#[test]
fn a_model_input_trainyard_cannot_load_is_refused_before_anything_runs() {
    let sandbox = Sandbox::new();
    let base = bf16_sharded_base(&sandbox);
    sandbox.write(
        "p.yaml",
        "name: release
stages:
  first:
    kind: command
    with: { cmd: 'echo ran > out.txt', outputs: [out.txt] }
  release:
    kind: export
    inputs: { model: models/base }
    with: { gguf: [] }
",
    );
    // Another architecture, named with the file, before the first stage runs.
    let config = base.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("\"model_type\": \"llama\"", "\"model_type\": \"phi3\""),
    )
    .unwrap();
    let text = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        text.contains(&format!(
            "{}: key `model_type`: `phi3` is not supported (trainyard supports llama, qwen2, mistral, gpt2)",
            config.display()
        )),
        "{text}"
    );
    assert!(sandbox.store_entries("first").is_empty(), "{text}");

    // A shard the index lists but the directory lacks, named with the index.
    std::fs::write(&config, original).unwrap();
    std::fs::remove_file(base.join("model-00003-of-00003.safetensors")).unwrap();
    let text = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        text.contains("model.safetensors.index.json")
            && text.contains("model-00003-of-00003.safetensors"),
        "{text}"
    );
    assert!(sandbox.store_entries("first").is_empty(), "{text}");
}

#[test]
fn an_hf_model_of_another_architecture_is_refused_before_anything_runs() {
    // A snapshot in a local Hugging Face cache is checked like a local directory.
    let sandbox = Sandbox::new();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = sandbox.path("hf/hub/models--acme--tiny-phi");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::write(
        snapshot.join("config.json"),
        r#"{"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}"#,
    )
    .unwrap();
    sandbox.write(
        "p.yaml",
        "name: release
stages:
  first:
    kind: command
    with: { cmd: 'echo ran > out.txt', outputs: [out.txt] }
  release:
    kind: export
    inputs: { model: 'hf:acme/tiny-phi' }
    with: { gguf: [] }
",
    );
    let output = sandbox
        .command(&["run", "p.yaml"])
        .env("HF_HOME", sandbox.path("hf"))
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let text = common::text(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("config.json: key `model_type`: `phi3` is not supported")
            && text.contains("models--acme--tiny-phi"),
        "{text}"
    );
    assert!(sandbox.store_entries("first").is_empty(), "{text}");
}
