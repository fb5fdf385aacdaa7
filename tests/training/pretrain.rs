//! The `pretrain` stage end to end on the built-in synthetic world: it learns (beats the
//! unigram baseline), is bit-reproducible, resumes bit-identically after SIGKILL and
//! Ctrl-C, and stops on a non-finite loss naming the step.

use crate::common;

use std::path::PathBuf;

use common::{Sandbox, file_hash, text};
use trainyard::model::Kernels;

/// Synthetic corpus → tokenizer → token cache → a small llama, with the model part of
/// the pretrain settings given by `with`.
fn pipeline(with: &str) -> String {
    format!(
        "name: lm
seed: 7
stages:
  corpus:
    kind: ingest
    with: {{ source: {{ synthetic: {{ part: documents, documents: 400 }} }}, eval_ratio: 0.1 }}
  tok:
    kind: tokenizer
    inputs: {{ text: corpus/train.jsonl }}
    with: {{ vocab_size: 384 }}
  cache:
    kind: token-cache
    inputs: {{ train: corpus/train.jsonl, eval: corpus/eval.jsonl, tokenizer: tok }}
  lm:
    kind: pretrain
    inputs: {{ data: cache, tokenizer: tok }}
    with: {with}
"
    )
}

const SMALL: &str = "{ model: { family: llama, layers: 2, heads: 4, kv_heads: 2, dim: 64 }, \
     context: 32, batch_size: 8, steps: 40, lr: 0.003, warmup: 4, eval_every: 10, \
     eval_batches: 4, save_every: 10, log_every: 5 }";

fn sandbox_with(with: &str) -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &pipeline(with));
    sandbox
}

fn output(sandbox: &Sandbox, stage: &str) -> PathBuf {
    sandbox.path(&format!("runs/latest/outputs/{stage}"))
}

fn stage_metrics(sandbox: &Sandbox, stage: &str) -> serde_json::Value {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output(sandbox, stage).join("manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["metrics"].clone()
}

fn metric(metrics: &serde_json::Value, key: &str) -> f64 {
    metrics[key]
        .as_f64()
        .unwrap_or_else(|| panic!("metric `{key}` missing in {metrics}"))
}

/// The stage's scratch directory (where checkpoints live while it trains).
fn work_dir(sandbox: &Sandbox, stage: &str) -> PathBuf {
    let root = sandbox.path(".trainyard/work");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().path())
                .filter(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with(&format!("{stage}-")))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no work dir for {stage} in {}", root.display()))
}

/// Waits until the stage has written a checkpoint directory.
fn wait_for_checkpoint(sandbox: &Sandbox, stage: &str, step: u64) -> PathBuf {
    for _ in 0..2400 {
        if let Ok(entries) = std::fs::read_dir(sandbox.path(".trainyard/work")) {
            for entry in entries {
                let dir = entry.unwrap().path();
                let checkpoint = dir.join(format!("checkpoints/step-{step:08}"));
                let name = dir.file_name().unwrap().to_string_lossy().to_string();
                if name.starts_with(&format!("{stage}-")) && checkpoint.exists() {
                    return checkpoint;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("no checkpoint at step {step} appeared");
}

#[test]
fn pretraining_learns_beats_the_unigram_baseline_and_writes_an_hf_checkpoint() {
    let sandbox = sandbox_with(SMALL);
    sandbox.ok(&["run", "p.yaml"]);
    let dir = output(&sandbox, "lm");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training.json",
        "metrics.jsonl",
        "loss_curve.svg",
        "best/config.json",
        "best/model.safetensors",
        "best/best.json",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing in the output");
    }
    assert!(
        !dir.join("checkpoints").exists(),
        "intermediate checkpoints are not output"
    );

    let metrics = stage_metrics(&sandbox, "lm");
    let eval = metric(&metrics, "eval_loss");
    let unigram = metric(&metrics, "unigram_eval_loss");
    assert!(
        eval < unigram - 0.3,
        "eval loss {eval} should be clearly below the unigram baseline {unigram}"
    );

    let rows: Vec<serde_json::Value> = sandbox
        .read("runs/latest/outputs/lm/metrics.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let train: Vec<&serde_json::Value> = rows.iter().filter(|row| row["type"] == "train").collect();
    let evals: Vec<&serde_json::Value> = rows.iter().filter(|row| row["type"] == "eval").collect();
    assert_eq!(train.len(), 40);
    assert_eq!(evals.len(), 4, "eval every 10 steps");
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    ] {
        assert!(train[0].get(key).is_some(), "metrics row lacks `{key}`");
    }
    let first = train[0]["loss"].as_f64().unwrap();
    let last = train[39]["loss"].as_f64().unwrap();
    assert!(
        last < first - 1.0,
        "train loss should fall: {first} → {last}"
    );
    assert!(
        (first - 384f64.ln()).abs() < 0.5,
        "initial loss {first} should be near ln(vocab)"
    );

    // The output is a valid HF model directory: it loads and predicts finite logits.
    let (model, config) =
        trainyard::model::load_pretrained(&dir, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(config.vocab_size(), 384);
    let ids = candle_core::Tensor::new(&[[1u32, 20, 30, 40]], &candle_core::Device::Cpu).unwrap();
    let logits = model.forward(&ids, None, Kernels::Differentiable).unwrap();
    assert_eq!(logits.dims(), [1, 4, 384]);
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("best/best.json")).unwrap())
            .unwrap();
    assert!(
        (best["eval_loss"].as_f64().unwrap() - metric(&metrics, "best_eval_loss")).abs() < 1e-12
    );

    // Nothing changed: nothing reruns.
    sandbox.ok(&["run", "p.yaml"]);
    assert!(sandbox.executed().is_empty());
}

#[test]
fn same_seed_and_settings_give_the_same_weights_and_sigkill_resume_is_bit_identical() {
    let with = "{ model: { family: llama, layers: 2, heads: 4, dim: 64 }, context: 32, \
                batch_size: 4, steps: 24, lr: 0.003, eval_every: 8, eval_batches: 2, \
                save_every: 4, keep_last: 2 }";
    let straight = sandbox_with(with);
    straight.ok(&["run", "p.yaml"]);
    let expected = file_hash(&output(&straight, "lm").join("model.safetensors"));

    // Again, recomputing every block's activations in the backward pass: the gradients,
    // and so the weights, are the same.
    let recomputing = with.replacen(
        "keep_last: 2 }",
        "keep_last: 2, gradient_checkpointing: true }",
        1,
    );
    assert_ne!(recomputing, with);
    let again = sandbox_with(&recomputing);
    again.ok(&["run", "p.yaml"]);
    let log = std::fs::read_to_string(output(&again, "lm").join("stage.log")).unwrap();
    assert!(
        log.contains("gradient checkpointing: 2 of 2 blocks"),
        "{log}"
    );
    assert_eq!(
        file_hash(&output(&again, "lm").join("model.safetensors")),
        expected,
        "same seed and settings, same weights"
    );
    assert_eq!(
        file_hash(&output(&again, "lm").join("best/model.safetensors")),
        file_hash(&output(&straight, "lm").join("best/model.safetensors"))
    );

    // Killed without warning after a checkpoint: the next run resumes from it.
    let killed = sandbox_with(with);
    let mut child = killed.spawn(&["run", "p.yaml"]);
    wait_for_checkpoint(&killed, "lm", 8);
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let work = work_dir(&killed, "lm");
    assert!(
        work.join("checkpoints").is_dir(),
        "the checkpoints survive the kill"
    );
    assert!(
        killed.store_entries("lm").is_empty(),
        "nothing was published"
    );
    let console = killed.ok(&["run", "p.yaml"]);
    assert!(
        console.contains("resuming from checkpoint step-"),
        "the console announces the resume:\n{console}"
    );
    let log = std::fs::read_to_string(output(&killed, "lm").join("stage.log")).unwrap();
    assert!(log.contains("resuming from"), "the rerun resumed:\n{log}");
    assert_eq!(
        file_hash(&output(&killed, "lm").join("model.safetensors")),
        expected,
        "a resumed run ends bit-identical to an uninterrupted one"
    );
    let metrics = killed.read("runs/latest/outputs/lm/metrics.jsonl");
    let steps: Vec<u64> = metrics
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|row| row["type"] == "train")
        .map(|row| row["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=24).collect::<Vec<_>>(),
        "one row per step, none repeated"
    );
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_the_next_run_resumes_to_the_same_weights() {
    let with = "{ model: { family: gpt2, layers: 2, heads: 2, dim: 32 }, context: 32, \
                batch_size: 4, steps: 400, lr: 0.002, eval_every: 0, save_every: 0 }";
    let straight = sandbox_with(with);
    straight.ok(&["run", "p.yaml"]);
    let expected = file_hash(&output(&straight, "lm").join("model.safetensors"));

    let stopped = sandbox_with(with);
    let child = stopped.spawn(&["run", "p.yaml"]);
    // Wait until training has started (metrics rows appear), then Ctrl-C.
    let metrics_seen = || {
        std::fs::read_dir(stopped.path(".trainyard/work"))
            .ok()
            .is_some_and(|entries| {
                entries.flatten().any(|entry| {
                    std::fs::metadata(entry.path().join("metrics.jsonl")).is_ok_and(|m| m.len() > 0)
                })
            })
    };
    for _ in 0..2400 {
        if metrics_seen() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(metrics_seen(), "training never started");
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait_with_output().unwrap();
    assert_eq!(status.status.code(), Some(130), "{}", text(&status));
    let work = work_dir(&stopped, "lm");
    let checkpoints: Vec<_> = std::fs::read_dir(work.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "Ctrl-C wrote one checkpoint (save_every is 0)"
    );
    let out = stopped.ok(&["run", "p.yaml"]);
    let log = std::fs::read_to_string(output(&stopped, "lm").join("stage.log")).unwrap();
    assert!(log.contains("resuming from"), "{out}\n{log}");
    assert_eq!(
        file_hash(&output(&stopped, "lm").join("model.safetensors")),
        expected
    );
}

#[test]
fn a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let with = "{ model: { family: llama, layers: 1, heads: 2, dim: 16 }, context: 16, \
                batch_size: 2, steps: 10, lr: 1.0e30, warmup: 0, schedule: constant, clip: null, \
                save_every: 1, eval_every: 0 }";
    let sandbox = sandbox_with(with);
    let out = sandbox.fails(&["run", "p.yaml"]);
    assert!(out.contains("not finite"), "{out}");
    let step: u64 = out
        .split("step ")
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .next()
        .unwrap_or_else(|| panic!("the error names the step: {out}"));
    assert!(step >= 2, "{out}");
    let kept = work_dir(&sandbox, "lm").join(format!("checkpoints/step-{:08}", step - 1));
    assert!(
        kept.join("model.safetensors").is_file(),
        "{} kept\n{out}",
        kept.display()
    );
    assert!(
        out.contains(&kept.display().to_string()),
        "the error names the checkpoint: {out}"
    );
    assert!(sandbox.store_entries("lm").is_empty());
    // `--no-resume` starts over, discarding the checkpoints, and says so.
    let again = sandbox.fails(&["run", "p.yaml", "--no-resume"]);
    assert!(
        again.contains(&format!(
            "starting over (--no-resume): checkpoint step-{:08} discarded",
            step - 1
        )),
        "{again}"
    );
    let log = std::fs::read_to_string(work_dir(&sandbox, "lm").join("stage.log")).unwrap();
    assert!(!log.contains("resuming from"), "{log}");
}

#[test]
fn continued_pretraining_from_a_base_model_and_a_weighted_mixture() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        &format!(
            "{}
  more:
    kind: ingest
    with: {{ source: {{ synthetic: {{ part: documents, documents: 200, entities: 20 }} }}, eval_ratio: 0.1 }}
  cache2:
    kind: token-cache
    inputs: {{ train: more/train.jsonl, tokenizer: tok }}
  continued:
    kind: pretrain
    inputs: {{ data: cache, data_more: cache2, tokenizer: tok, base: lm }}
    with: {{ context: 32, batch_size: 4, steps: 5, mixture: {{ data: 3, data_more: 1 }}, eval_every: 5 }}
",
            pipeline(
                "{ model: { family: qwen2, layers: 1, heads: 2, dim: 32, tie_embeddings: true }, \
                 context: 32, batch_size: 4, steps: 30, lr: 0.003 }"
            )
            .trim_end()
        ),
    );
    let out = sandbox.ok(&["run", "p.yaml"]);
    let base = trainyard::model::load_config(&output(&sandbox, "lm")).unwrap();
    let continued = trainyard::model::load_config(&output(&sandbox, "continued")).unwrap();
    assert_eq!(base, continued, "the base's architecture is kept\n{out}");
    assert_ne!(
        file_hash(&output(&sandbox, "lm").join("model.safetensors")),
        file_hash(&output(&sandbox, "continued").join("model.safetensors")),
        "training changed the weights"
    );
    // Continuing starts where the base ended, not from a fresh model: the first loss is
    // close to the base's last.
    let first_loss = |stage: &str, which: &str| -> f64 {
        let text = sandbox.read(&format!("runs/latest/outputs/{stage}/metrics.jsonl"));
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .filter(|row: &serde_json::Value| row["type"] == "train")
            .collect();
        let row = if which == "first" {
            rows.first()
        } else {
            rows.last()
        };
        row.unwrap()["loss"].as_f64().unwrap()
    };
    assert!(first_loss("continued", "first") < first_loss("lm", "first") - 0.2);
}

#[test]
fn settings_mistakes_are_reported_before_anything_runs() {
    for (with, expected) in [
        ("{ steps: 5 }", "`model` is required"),
        (
            "{ model: { family: llama, layers: 1, heads: 2, dim: 16 } }",
            "`steps` (or `tokens`) is required",
        ),
        (
            "{ model: { family: llama, layers: 1, heads: 2, dim: 16 }, steps: 3, tokens: 100 }",
            "not both",
        ),
        (
            "{ model: { family: llama, layers: 1, heads: 2, dim: 16 }, steps: 3, mixture: { wiki: 1 } }",
            "`mixture` names `wiki`",
        ),
        (
            "{ model: { family: llama, layers: 1, heads: 2, dims: 16 }, steps: 3 }",
            "dims",
        ),
    ] {
        let sandbox = sandbox_with(with);
        let out = sandbox.fails(&["run", "p.yaml"]);
        assert!(
            out.contains(expected),
            "{with}: expected `{expected}` in:\n{out}"
        );
        assert!(
            sandbox.store_entries("corpus").is_empty(),
            "nothing ran for {with}"
        );
    }
    let sandbox = sandbox_with(
        "{ model: { family: llama, layers: 1, heads: 3, dim: 16 }, steps: 3, context: 16 }",
    );
    let out = sandbox.fails(&["run", "p.yaml"]);
    assert!(out.contains("multiple of `model.heads`"), "{out}");
}

/// `precision: auto` trains in bf16 where the CPU has a bf16 unit (f32 elsewhere, and
/// `training.json` says which): it still beats the unigram baseline, and a run killed
/// after a checkpoint resumes to the same weights as an uninterrupted one.
#[test]
fn auto_precision_learns_records_its_choice_and_resumes_bit_identically() {
    let with = "{ model: { family: llama, layers: 2, heads: 4, dim: 64 }, context: 32, \
                batch_size: 8, steps: 40, lr: 0.003, warmup: 4, eval_every: 10, \
                eval_batches: 4, save_every: 4, precision: auto }";
    let straight = sandbox_with(with);
    straight.ok(&["run", "p.yaml"]);
    let metrics = stage_metrics(&straight, "lm");
    let (eval, unigram) = (
        metric(&metrics, "eval_loss"),
        metric(&metrics, "unigram_eval_loss"),
    );
    assert!(eval < unigram - 0.3, "eval {eval} vs unigram {unigram}");
    let summary: serde_json::Value =
        serde_json::from_str(&straight.read("runs/latest/outputs/lm/training.json")).unwrap();
    let expected_compute = match trainyard::model::bf16_gemm::unit() {
        Some(_) => "bf16",
        None => "f32",
    };
    assert_eq!(summary["precision"]["setting"], "auto");
    assert_eq!(summary["precision"]["compute"], expected_compute);
    let log = straight.read("runs/latest/outputs/lm/stage.log");
    assert!(
        log.contains(&format!("precision: {expected_compute}")),
        "{log}"
    );
    let expected = file_hash(&output(&straight, "lm").join("model.safetensors"));

    let killed = sandbox_with(with);
    let mut child = killed.spawn(&["run", "p.yaml"]);
    wait_for_checkpoint(&killed, "lm", 8);
    child.kill().unwrap();
    let _ = child.wait();
    let console = killed.ok(&["run", "p.yaml"]);
    assert!(
        console.contains("resuming from checkpoint step-"),
        "the rerun resumed:\n{console}"
    );
    assert_eq!(
        file_hash(&output(&killed, "lm").join("model.safetensors")),
        expected,
        "a resumed bf16 run ends bit-identical to an uninterrupted one"
    );
}

/// Without a terminal (a log file, a service), a run puts every training step and
/// evaluation in `logs.jsonl` as it happens, and prints a progress line every
/// `--progress-every` seconds naming the running stage and its last step.
#[test]
fn a_run_without_a_terminal_logs_every_step_and_prints_progress_lines() {
    let sandbox = sandbox_with(&SMALL.replace("steps: 40", "steps: 200"));
    let printed = sandbox.ok(&["run", "p.yaml", "--progress-every", "1"]);
    let events: Vec<serde_json::Value> = sandbox
        .read("runs/latest/logs.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let of = |name: &str| {
        events
            .iter()
            .filter(|event| event["event"] == name)
            .collect::<Vec<_>>()
    };
    let steps = of("train_step");
    assert_eq!(steps.len(), 200);
    for (index, event) in steps.iter().enumerate() {
        assert_eq!(event["stage"], "lm");
        assert_eq!(event["step"], index as u64 + 1);
        assert_eq!(event["steps"], 200);
        assert!(event["loss"].as_f64().unwrap().is_finite());
        assert!(event["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let evals: Vec<u64> = of("eval")
        .iter()
        .map(|event| event["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, (1..=20).map(|i| i * 10).collect::<Vec<_>>());
    // Between the training stage's start and its end, in order.
    let of_lm =
        |name: &str, event: &serde_json::Value| event["event"] == name && event["stage"] == "lm";
    let started = events
        .iter()
        .position(|e| of_lm("stage_started", e))
        .unwrap();
    let finished = events
        .iter()
        .position(|e| of_lm("stage_finished", e))
        .unwrap();
    let first_step = events.iter().position(|e| of_lm("train_step", e)).unwrap();
    let last_step = events.iter().rposition(|e| of_lm("train_step", e)).unwrap();
    assert!(started < first_step && last_step < finished);
    let line = printed
        .lines()
        .find(|line| line.contains("running lm (") && line.contains("step "))
        .unwrap_or_else(|| panic!("no progress line:\n{printed}"));
    assert!(line.contains("/200") && line.contains("loss "), "{line}");
}
