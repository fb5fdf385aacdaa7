//! `export` writes a Hugging Face directory (chat template, special tokens, generation
//! config) and GGUF files that load back to the same model; `evaluate` measures loss,
//! perplexity and question accuracy of greedy chat answers.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{Sandbox, file_hash};

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
    let diff = (a.forward(&ids).unwrap() - b.forward(&ids).unwrap())
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
