//! The `sft` stage on the synthetic world: a small model pretrained on documents is
//! fine-tuned on conversations; the loss on the assistant's answers falls below the
//! base model's, and a run killed mid-way resumes to the same weights.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{Sandbox, file_hash};

fn pipeline(sft_with: &str) -> String {
    common::chat_pipeline(&format!(
        "  tuned:
    kind: sft
    inputs: {{ data: chat-cache, base: base }}
    with: {sft_with}
"
    ))
}

fn output(sandbox: &Sandbox, stage: &str) -> PathBuf {
    sandbox.path(&format!("runs/latest/outputs/{stage}"))
}

/// Mean assistant-token loss of the model in `dir` on held-out conversations.
fn assistant_loss(sandbox: &Sandbox, dir: &Path) -> f64 {
    let (model, _) = trainyard::model::load_pretrained(dir, DType::F32, &Device::Cpu).unwrap();
    common::assistant_loss(&model, &output(sandbox, "chat-cache"))
}

#[test]
fn full_fine_tuning_lowers_the_loss_on_assistant_answers() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        &pipeline("{ epochs: 2, batch_size: 8, lr: 0.002, eval_every: 10, context: 128 }"),
    );
    sandbox.ok(&["run", "p.yaml"]);
    let tuned = output(&sandbox, "tuned");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "loss_curve.svg",
    ] {
        assert!(tuned.join(file).is_file(), "{file} missing");
    }
    let before = assistant_loss(&sandbox, &output(&sandbox, "base"));
    let after = assistant_loss(&sandbox, &tuned);
    assert!(
        after < before - 0.5,
        "assistant-token loss should fall clearly: base {before}, tuned {after}"
    );
    assert_eq!(
        trainyard::model::load_config(&tuned).unwrap(),
        trainyard::model::load_config(&output(&sandbox, "base")).unwrap()
    );
}

#[test]
fn sft_killed_mid_way_resumes_bit_identically() {
    killed_mid_way_resumes_bit_identically(
        "{ steps: 24, batch_size: 4, lr: 0.002, eval_every: 8, save_every: 4, context: 128 }",
        "model.safetensors",
    );
}

/// LoRA dropout draws its masks from the step, so resuming keeps them identical too.
#[test]
fn lora_with_dropout_killed_mid_way_resumes_bit_identically() {
    killed_mid_way_resumes_bit_identically(
        "{ adapter: { kind: lora, rank: 4, alpha: 8, dropout: 0.2, modules_to_save: [embed_tokens, lm_head] }, steps: 24, batch_size: 4, lr: 0.003, eval_every: 8, save_every: 4, context: 128 }",
        "adapter_model.safetensors",
    );
}

/// QLoRA: the base is quantized again on resume, to the same codes, so the resumed run
/// is bit-identical too.
#[test]
fn qlora_killed_mid_way_resumes_bit_identically() {
    killed_mid_way_resumes_bit_identically(
        "{ adapter: { kind: qlora, quant: nf4, rank: 4, alpha: 8, dropout: 0.2 }, steps: 24, batch_size: 4, lr: 0.003, eval_every: 8, save_every: 4, context: 128 }",
        "adapter_model.safetensors",
    );
}

fn killed_mid_way_resumes_bit_identically(with: &str, weights: &str) {
    let straight = Sandbox::new();
    straight.write("p.yaml", &pipeline(with));
    straight.ok(&["run", "p.yaml"]);
    let expected = file_hash(&output(&straight, "tuned").join(weights));

    let killed = Sandbox::new();
    killed.write("p.yaml", &pipeline(with));
    let mut child = killed.spawn(&["run", "p.yaml"]);
    let checkpoint_seen = || {
        std::fs::read_dir(killed.path(".trainyard/work"))
            .ok()
            .is_some_and(|entries| {
                entries.flatten().any(|entry| {
                    entry.file_name().to_string_lossy().starts_with("tuned-")
                        && entry.path().join("checkpoints/step-00000008").exists()
                })
            })
    };
    for _ in 0..4800 {
        if checkpoint_seen() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(checkpoint_seen(), "no checkpoint appeared");
    child.kill().unwrap();
    let _ = child.wait();
    killed.ok(&["run", "p.yaml"]);
    let log = killed.read("runs/latest/outputs/tuned/stage.log");
    assert!(log.contains("resuming from"), "{log}");
    assert_eq!(file_hash(&output(&killed, "tuned").join(weights)), expected);
}
