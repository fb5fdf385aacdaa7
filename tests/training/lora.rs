//! LoRA end to end: `sft` with `adapter: lora` trains only a PEFT-layout adapter on a
//! frozen base and lowers the loss on assistant answers; `lora-merge` folds it in, and
//! the merged model's logits equal base + adapter.

use crate::common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::Sandbox;
use trainyard::model::Kernels;

const TAIL: &str = "  adapter:
    kind: sft
    inputs: { data: chat-cache, base: base }
    with: { adapter: { kind: lora, rank: 8, alpha: 16, modules_to_save: [embed_tokens, lm_head] }, epochs: 2, batch_size: 8, lr: 0.003, context: 128 }
  merged:
    kind: lora-merge
    inputs: { base: base, adapter: adapter }
";

fn output(sandbox: &Sandbox, stage: &str) -> PathBuf {
    sandbox.path(&format!("runs/latest/outputs/{stage}"))
}

/// A freshly initialised tiny llama-family model saved as a Hugging Face directory.
fn tiny_base(
    flavor: trainyard::model::LlamaFlavor,
    tied: bool,
) -> (tempfile::TempDir, trainyard::model::ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let config =
        trainyard::model::ModelConfig::Llama(trainyard::model::LlamaConfig::tiny(flavor, tied));
    let (_, varmap) =
        trainyard::model::new_trainable(&config, DType::F32, &Device::Cpu, 1).unwrap();
    trainyard::model::save_pretrained(&varmap, &config, dir.path()).unwrap();
    (dir, config)
}

/// A rank-4, α-8 adapter spec.
fn rank4_spec(
    targets: &[&str],
    modules_to_save: &[&str],
    dropout: f64,
) -> trainyard::model::lora::LoraSpec {
    trainyard::model::lora::LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: targets.iter().map(|name| name.to_string()).collect(),
        modules_to_save: modules_to_save
            .iter()
            .map(|name| name.to_string())
            .collect(),
        dropout,
        trainable_tokens: Default::default(),
        quant: None,
        fan_in_fan_out: false,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn lora_trains_a_peft_adapter_that_merges_into_identical_logits() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &common::chat_pipeline(TAIL));
    sandbox.ok(&["run", "p.yaml"]);

    // The adapter is PEFT's layout and nothing else of the model.
    let adapter = output(&sandbox, "adapter");
    assert!(
        !adapter.join("model.safetensors").exists(),
        "the base is not copied"
    );
    let config: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/adapter/adapter_config.json"))
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    // The base (an upstream stage) is named from the workspace root, never absolutely.
    let base = config["base_model_name_or_path"].as_str().unwrap();
    assert!(base.starts_with(".trainyard/store/"), "{base}");
    assert!(sandbox.path(base).join("config.json").exists());
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    let tensors =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    // 2 layers × 7 projections × (A, B), and the two saved modules.
    assert_eq!(tensors.len(), 30);
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
    assert!(tensors.contains_key("base_model.model.model.embed_tokens.weight"));
    assert!(tensors.contains_key("base_model.model.lm_head.weight"));
    let q_a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let q_b = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(q_a.dims(), [8, 64]);
    assert_eq!(q_b.dims(), [64, 8]);
    assert!(
        q_b.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0,
        "B starts at zero and must have been trained"
    );

    // It learned: the assistant-token loss falls below the base model's.
    let base_dir = output(&sandbox, "base");
    let (base, _) = trainyard::model::load_pretrained(&base_dir, DType::F32, &Device::Cpu).unwrap();
    let (with_adapter, _) =
        trainyard::model::load_lora(&base_dir, &adapter, DType::F32, &Device::Cpu).unwrap();
    let cache = output(&sandbox, "chat-cache");
    let before = common::assistant_loss(&base, &cache);
    let after = common::assistant_loss(&with_adapter, &cache);
    assert!(
        after < before - 0.3,
        "LoRA should lower the loss: {before} → {after}"
    );

    // Weights are readable like every other file written (0666 less the umask), not
    // the 0600 of the safetensors crate's temporary file.
    let merged_dir = output(&sandbox, "merged");
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))
        .map(|value| u32::from_str_radix(value.trim(), 8).unwrap())
        .unwrap();
    for file in [
        adapter.join("adapter_model.safetensors"),
        merged_dir.join("model.safetensors"),
        base_dir.join("model.safetensors"),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "{}", file.display());
    }

    // Merged = base + adapter, logit for logit.
    assert!(merged_dir.join("tokenizer.json").is_file());
    assert_eq!(
        trainyard::model::load_config(&merged_dir).unwrap(),
        trainyard::model::load_config(&base_dir).unwrap()
    );
    let (merged, _) =
        trainyard::model::load_pretrained(&merged_dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(
        &[
            [4u32, 30, 31, 200, 5, 17, 2],
            [1, 9, 100, 101, 102, 103, 104],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let expected = with_adapter
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap();
    let got = merged.forward(&ids, None, Kernels::Differentiable).unwrap();
    let diff = max_diff(&expected, &got);
    assert!(
        diff < 1e-5,
        "merged logits differ from base + adapter by {diff}"
    );
    assert!(
        max_diff(
            &base.forward(&ids, None, Kernels::Differentiable).unwrap(),
            &got
        ) > 1e-3,
        "the merge changed the model"
    );
}

/// QLoRA: the same adapter trained on a base whose projections are held in NF4 (and
/// q8_0) is a plain PEFT LoRA adapter, and on the full-precision base (as PEFT loads
/// it) it lowers the assistant-token loss about as much as LoRA does (within 10%).
#[test]
fn qlora_trains_a_peft_adapter_as_good_as_loras() {
    let sandbox = Sandbox::new();
    let stage = |name: &str, adapter: &str| {
        format!(
            "  {name}:
    kind: sft
    inputs: {{ data: chat-cache, base: base }}
    with: {{ adapter: {adapter}, epochs: 2, batch_size: 8, lr: 0.003, context: 128 }}
"
        )
    };
    let modules = "modules_to_save: [embed_tokens, lm_head]";
    let tail = [
        stage(
            "lora",
            &format!("{{ kind: lora, rank: 8, alpha: 16, {modules} }}"),
        ),
        stage(
            "nf4",
            &format!("{{ kind: qlora, rank: 8, alpha: 16, {modules} }}"),
        ),
        stage(
            "q8",
            &format!("{{ kind: qlora, quant: q8_0, rank: 8, alpha: 16, {modules} }}"),
        ),
        // A QLoRA base made once by a `quantize` stage: the same codes, read as stored.
        "  base-nf4: { kind: quantize, inputs: { model: base } }\n".to_string(),
        stage(
            "nf4-stored",
            &format!("{{ kind: qlora, rank: 8, alpha: 16, {modules} }}"),
        )
        .replace("base: base }", "base: base-nf4 }"),
        "  merged-dequantized:
    kind: lora-merge
    inputs: { base: base-nf4, adapter: nf4-stored }
    with: { merge_into: dequantized }
"
        .to_string(),
        stage(
            "nf4-dropout",
            "{ kind: qlora, rank: 8, alpha: 16, dropout: 0.1 }",
        ),
        stage(
            "nf4-dropout-recomputed",
            "{ kind: qlora, rank: 8, alpha: 16, dropout: 0.1 }, gradient_checkpointing: true",
        ),
    ]
    .concat();
    sandbox.write("p.yaml", &common::chat_pipeline(&tail));
    sandbox.ok(&["run", "p.yaml"]);

    let base_dir = output(&sandbox, "base");
    let cache = output(&sandbox, "chat-cache");
    let (base, _) = trainyard::model::load_pretrained(&base_dir, DType::F32, &Device::Cpu).unwrap();
    let before = common::assistant_loss(&base, &cache);
    let loss_of = |stage: &str| {
        let adapter = output(&sandbox, stage);
        let config: serde_json::Value = serde_json::from_str(
            &sandbox.read(&format!("runs/latest/outputs/{stage}/adapter_config.json")),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA", "{stage}");
        let (model, _) =
            trainyard::model::load_lora(&base_dir, &adapter, DType::F32, &Device::Cpu).unwrap();
        common::assistant_loss(&model, &cache)
    };
    let lora = loss_of("lora");
    for stage in ["nf4", "q8"] {
        let qlora = loss_of(stage);
        assert!(
            qlora < before - 0.3 && qlora <= lora * 1.1,
            "{stage}: base {before}, LoRA {lora}, QLoRA {qlora}"
        );
        // Trained against other (quantized) base weights: not LoRA's run again.
        assert_ne!(qlora, lora, "{stage}: the base was not quantized");
    }
    let weights = |stage: &str| {
        let path = output(&sandbox, stage).join("adapter_model.safetensors");
        std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    };
    // On the stored base the adapter is the one trained while quantizing on load.
    assert!(
        weights("nf4") == weights("nf4-stored"),
        "the stored NF4 base trained another adapter"
    );
    // Merged into the restored NF4 weights, the model computes what the quantized base
    // and the adapter compute together.
    let ids = Tensor::new(&[[3u32, 17, 42, 5, 9, 64, 11, 2]], &Device::Cpu).unwrap();
    let (qlora_model, _) = trainyard::model::load_lora(
        &output(&sandbox, "base-nf4"),
        &output(&sandbox, "nf4-stored"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (merged, _) = trainyard::model::load_pretrained(
        &output(&sandbox, "merged-dequantized"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let forward = |model: &trainyard::model::CausalLm| {
        model
            .forward(&ids, None, trainyard::model::Kernels::Differentiable)
            .unwrap()
    };
    let diff = max_diff(&forward(&qlora_model), &forward(&merged));
    assert!(diff < 1e-4, "merged into the dequantized base: {diff}");
    // Recomputing activations (with the dropout masks of the first pass) changes
    // nothing: the adapters are the same bytes.
    assert!(
        weights("nf4-dropout") == weights("nf4-dropout-recomputed"),
        "gradient checkpointing changed the trained adapter"
    );
    // Merging into the quantized base needs saying so (last: a new run becomes `latest`).
    sandbox.write(
        "merge.yaml",
        &format!(
            "name: m
stages:
  m: {{ kind: lora-merge, inputs: {{ base: {}, adapter: {} }} }}
",
            output(&sandbox, "base-nf4").display(),
            output(&sandbox, "nf4-stored").display()
        ),
    );
    let error = sandbox.fails(&["run", "merge.yaml"]);
    assert!(error.contains("merge_into: dequantized"), "{error}");
}

#[test]
fn only_the_adapter_is_trainable() {
    let (dir, _) = tiny_base(trainyard::model::LlamaFlavor::Qwen2, true);
    let spec = rank4_spec(&["q_proj", "v_proj", "down_proj"], &[], 0.0);
    let (model, adapter, _) =
        trainyard::model::new_lora(dir.path(), &spec, DType::F32, &Device::Cpu, 3).unwrap();
    let vars = trainyard::model::sorted_vars(&adapter);
    assert_eq!(vars.len(), 2 * 3 * 2, "A and B for 3 targets in 2 layers");
    assert!(
        vars.iter()
            .all(|(name, _)| name.starts_with("base_model.model.model.layers."))
    );
    // An untrained adapter (B = 0) changes nothing.
    let (plain, _) =
        trainyard::model::load_pretrained(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None, Kernels::Differentiable).unwrap();
    assert_eq!(
        max_diff(
            &logits,
            &plain.forward(&ids, None, Kernels::Differentiable).unwrap()
        ),
        0.0
    );
    // Gradients reach every adapter tensor after B moves off zero, and nothing else
    // is a variable at all.
    for (name, var) in &vars {
        if name.contains("lora_B") {
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                .unwrap();
        }
    }
    let loss = model
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(
            grad.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name} has a zero gradient"
        );
    }
}

#[test]
fn lora_settings_mistakes_are_reported() {
    for (adapter, expected) in [
        ("{ kind: lora, rank: 0 }", "`adapter.rank` must be positive"),
        (
            "{ kind: lora, targets: [qproj] }",
            "unknown projection `qproj`",
        ),
        (
            "{ kind: lora, dropout: 1.0 }",
            "`adapter.dropout` must be at least 0 and below 1",
        ),
        (
            "{ kind: lora, modules_to_save: [norm] }",
            "unknown module `norm`",
        ),
        ("{ kind: lora, rnak: 4 }", "rnak"),
        ("lorra", "unknown adapter `lorra`"),
        (
            "{ kind: lora, quant: nf4 }",
            "`adapter.quant` applies to `kind: qlora` only",
        ),
        ("{ kind: qlora, quant: nf5 }", "nf5"),
    ] {
        let sandbox = Sandbox::new();
        sandbox.write(
            "p.yaml",
            &common::chat_pipeline(&format!(
                "  adapter:
    kind: sft
    inputs: {{ data: chat-cache, base: base }}
    with: {{ adapter: {adapter}, steps: 2 }}
"
            )),
        );
        let out = sandbox.fails(&["run", "p.yaml"]);
        assert!(
            out.contains(expected),
            "{adapter}: expected `{expected}` in\n{out}"
        );
    }
}

/// `modules_to_save`: the embeddings and the head become adapter variables, starting
/// from the base's weights, take gradients, and replace the base's in the merge.
#[test]
fn saved_modules_train_from_the_base_and_replace_it_when_merged() {
    let (dir, config) = tiny_base(trainyard::model::LlamaFlavor::Llama, false);
    let spec = rank4_spec(&["q_proj", "up_proj"], &["embed_tokens", "lm_head"], 0.0);
    let (model, adapter, _) =
        trainyard::model::new_lora(dir.path(), &spec, DType::F32, &Device::Cpu, 3).unwrap();
    let vars = trainyard::model::sorted_vars(&adapter);
    let names: Vec<&str> = vars.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), 2 * 2 * 2 + 2, "{names:?}");
    assert!(names.contains(&"base_model.model.model.embed_tokens.weight"));
    assert!(names.contains(&"base_model.model.lm_head.weight"));

    // Untrained, it is the base model exactly.
    let (plain, _) =
        trainyard::model::load_pretrained(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &model.forward(&ids, None, Kernels::Differentiable).unwrap(),
            &plain.forward(&ids, None, Kernels::Differentiable).unwrap()
        ),
        0.0
    );

    // Gradients reach the saved modules; a step on every variable changes the model.
    let loss = model
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        if name.contains("lora_A") {
            continue; // B = 0 blocks A's gradient until B moves
        }
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        var.set(&(var.as_tensor() - (grad * 0.01).unwrap()).unwrap())
            .unwrap();
    }
    let trained = model.forward(&ids, None, Kernels::Differentiable).unwrap();
    assert!(
        max_diff(
            &trained,
            &plain.forward(&ids, None, Kernels::Differentiable).unwrap()
        ) > 1e-4
    );

    // The merge writes the saved modules over the base's and folds the pairs in.
    let base_weights =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let adapter_weights: std::collections::HashMap<String, Tensor> =
        trainyard::model::named_tensors(&adapter)
            .into_iter()
            .collect();
    let merged = trainyard::model::lora::merge(&base_weights, &adapter_weights, &spec).unwrap();
    let merged_dir = tempfile::tempdir().unwrap();
    trainyard::model::save_model_dir(merged_dir.path(), &config, &merged).unwrap();
    let (merged, _) =
        trainyard::model::load_pretrained(merged_dir.path(), DType::F32, &Device::Cpu).unwrap();
    let diff = max_diff(
        &merged.forward(&ids, None, Kernels::Differentiable).unwrap(),
        &trained,
    );
    assert!(diff < 1e-5, "merged differs from base + adapter by {diff}");
}

#[test]
fn a_tied_head_cannot_be_saved_apart_from_the_embeddings() {
    let (dir, _) = tiny_base(trainyard::model::LlamaFlavor::Qwen2, true);
    let spec = rank4_spec(&["q_proj"], &["lm_head"], 0.0);
    let error = trainyard::model::new_lora(dir.path(), &spec, DType::F32, &Device::Cpu, 3)
        .err()
        .expect("a tied lm_head is refused")
        .to_string();
    assert!(error.contains("list `embed_tokens` alone"), "{error}");
}

/// Dropout is on only while a key is set, and the same key draws the same masks.
#[test]
fn lora_dropout_masks_are_keyed_and_off_outside_training() {
    let (dir, _) = tiny_base(trainyard::model::LlamaFlavor::Llama, false);
    let spec = |dropout| rank4_spec(&["q_proj", "down_proj"], &[], dropout);
    let build = |dropout| {
        let (model, adapter, _) =
            trainyard::model::new_lora(dir.path(), &spec(dropout), DType::F32, &Device::Cpu, 3)
                .unwrap();
        for (name, var) in trainyard::model::sorted_vars(&adapter) {
            if name.contains("lora_B") {
                var.set(&(var.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                    .unwrap();
            }
        }
        model
    };
    let (dropping, plain) = (build(0.3), build(0.0));
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    let reference = plain.forward(&ids, None, Kernels::Differentiable).unwrap();
    assert_eq!(
        max_diff(
            &dropping
                .forward(&ids, None, Kernels::Differentiable)
                .unwrap(),
            &reference
        ),
        0.0
    );
    plain.set_dropout_key(Some(7));
    assert_eq!(
        max_diff(
            &plain.forward(&ids, None, Kernels::Differentiable).unwrap(),
            &reference
        ),
        0.0,
        "p = 0 never drops"
    );
    dropping.set_dropout_key(Some(7));
    let first = dropping
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap();
    let again = dropping
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap();
    dropping.set_dropout_key(Some(8));
    let other = dropping
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap();
    dropping.set_dropout_key(None);
    assert_eq!(max_diff(&first, &again), 0.0, "same key, same masks");
    assert!(
        max_diff(&first, &reference) > 1e-4,
        "dropout changed nothing"
    );
    assert!(max_diff(&first, &other) > 1e-4, "another key, other masks");
    assert_eq!(
        max_diff(
            &dropping
                .forward(&ids, None, Kernels::Differentiable)
                .unwrap(),
            &reference
        ),
        0.0
    );
}

#[test]
fn merging_a_whole_model_says_there_is_no_adapter() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        &common::chat_pipeline(
            "  adapter:
    kind: sft
    inputs: { data: chat-cache, base: base }
    with: { adapter: none, steps: 2, batch_size: 4, context: 128 }
  merged:
    kind: lora-merge
    inputs: { base: base, adapter: adapter }
",
        ),
    );
    let text = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        text.contains("is a whole model, not a LoRA adapter"),
        "{text}"
    );
}

/// Copies the directory `from` into `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn lora_merge_of_sharded_bf16_base_streams_and_matches() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama-bf16-sharded");
    let sandbox = Sandbox::new();
    let base = sandbox.path("models/base");
    copy_dir(&fixture, &base);
    // An adapter on every projection, with B far from zero so that the merge matters,
    // and a saved lm_head (it lives in the last shard).
    let spec = rank4_spec(&trainyard::model::lora::LLAMA_TARGETS, &["lm_head"], 0.0);
    let (_, varmap, _) =
        trainyard::model::new_lora(&base, &spec, DType::F32, &Device::Cpu, 5).unwrap();
    // Seeded: candle's `randn` draws from an unseeded generator, and with some draws the
    // merged model missed the tolerance below (one failure in ~14 runs).
    let mut rng = trainyard::rng::Rng::new(17, 0);
    for (name, var) in trainyard::model::sorted_vars(&varmap) {
        if name.ends_with("lora_B.weight") {
            // Uniform on ±0.52: standard deviation 0.3.
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * 0.52) as f32)
                .collect();
            let noise = Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        } else if name.ends_with("lm_head.weight") {
            var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
        }
    }
    let adapter = sandbox.path("models/adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    trainyard::model::save_safetensors(&varmap, &adapter.join("adapter_model.safetensors"))
        .unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        spec.adapter_config("../base").to_string(),
    )
    .unwrap();
    sandbox.write(
        "p.yaml",
        "name: merge
stages:
  merged:
    kind: lora-merge
    inputs: { base: models/base, adapter: models/adapter }
",
    );
    sandbox.ok(&["run", "p.yaml"]);

    // The output mirrors the base: the same three shards and an index, in bf16.
    let merged = output(&sandbox, "merged");
    let shard_names = |dir: &std::path::Path| {
        let mut names: Vec<String> = trainyard::model::safetensors_files(dir)
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(shard_names(&merged), shard_names(&base));
    assert_eq!(shard_names(&merged).len(), 3);
    let index = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(index(&merged)["weight_map"], index(&base)["weight_map"]);
    assert_eq!(
        index(&merged)["metadata"]["total_size"],
        index(&base)["metadata"]["total_size"]
    );
    let files = trainyard::model::safetensors_files(&merged).unwrap();
    let headers = trainyard::model::shards::read_headers(&files).unwrap();
    assert!(headers.iter().all(|header| header.dtype == DType::BF16));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["dtype"], "bfloat16");

    // Each merged weight is bf16(W + (α/r)·B·A) computed in f32.
    let load = |dir: &std::path::Path| {
        let files = trainyard::model::safetensors_files(dir).unwrap();
        let tensors =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.unwrap();
        move |name: &str| tensors.load(name, &Device::Cpu).unwrap()
    };
    let (base_tensor, merged_tensor) = (load(&base), load(&merged));
    let adapter_tensors =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let module = "model.layers.1.mlp.down_proj";
    let a = &adapter_tensors[&format!("base_model.model.{module}.lora_A.weight")];
    let b = &adapter_tensors[&format!("base_model.model.{module}.lora_B.weight")];
    let want = (base_tensor(&format!("{module}.weight"))
        .to_dtype(DType::F32)
        .unwrap()
        + (b.matmul(a).unwrap() * spec.scale()).unwrap())
    .unwrap()
    .to_dtype(DType::BF16)
    .unwrap();
    let got = merged_tensor(&format!("{module}.weight"));
    assert_eq!(got.dtype(), DType::BF16);
    assert_eq!(
        max_diff(
            &got.to_dtype(DType::F32).unwrap(),
            &want.to_dtype(DType::F32).unwrap()
        ),
        0.0
    );

    // Merged logits are base + adapter's, up to rounding the merged weights to bf16.
    let ids = Tensor::new(&[[1u32, 17, 127, 0, 64, 5, 17]], &Device::Cpu).unwrap();
    let (with_adapter, _) =
        trainyard::model::load_lora(&base, &adapter, DType::F32, &Device::Cpu).unwrap();
    let (base_model, _) =
        trainyard::model::load_pretrained(&base, DType::F32, &Device::Cpu).unwrap();
    let (merged_model, _) =
        trainyard::model::load_pretrained(&merged, DType::F32, &Device::Cpu).unwrap();
    let expected = with_adapter
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap();
    let change = max_diff(
        &base_model
            .forward(&ids, None, Kernels::Differentiable)
            .unwrap(),
        &expected,
    );
    let error = max_diff(
        &merged_model
            .forward(&ids, None, Kernels::Differentiable)
            .unwrap(),
        &expected,
    );
    println!("adapter moves logits by {change}, merged differs from base + adapter by {error}");
    assert!(change > 1.0, "the adapter changes the model: {change}");
    assert!(error < 0.02 * change, "merged {error} vs change {change}");
}

/// ChatML, a template whose turn tokens trainyard's tokenizer does not have.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const ADDED_TAIL: &str = "  chatml-cache:
    kind: token-cache
    inputs: { train: chats/train.jsonl, eval: chats/eval.jsonl, tokenizer: tok, chat_template: chatml.jinja }
    with: { max_len: 128, add_tokens: \"${vars.new_tokens}\" }
  adapter:
    kind: sft
    inputs: { data: chatml-cache, base: base }
    with: { adapter: { kind: lora, rank: 8, alpha: 16 }, add_tokens: \"${vars.new_tokens}\", epochs: 2, batch_size: 8, lr: 0.01, context: 128 }
  merged:
    kind: lora-merge
    inputs: { base: base, adapter: adapter }
  full:
    kind: sft
    inputs: { data: chatml-cache, base: base }
    with: { steps: 8, batch_size: 8, lr: 0.003, context: 128 }
";

/// `add_tokens`: the cache's tokenizer gains ChatML's turn tokens (ids past the base's
/// 384 rows); a LoRA adapter trains their rows as PEFT's `trainable_token_indices`, so
/// base + adapter answers over 386 tokens and learns to close its turns; the merge grows
/// the tables and gives the same logits; full fine-tuning grows the model itself.
#[test]
fn added_tokens_grow_the_vocabulary_and_train_their_rows() {
    let sandbox = Sandbox::new();
    sandbox.write("chatml.jinja", CHATML);
    let pipeline = common::chat_pipeline(ADDED_TAIL).replacen(
        "seed: 11\n",
        "seed: 11\nvars:\n  new_tokens: [\"<|im_start|>\", \"<|im_end|>\"]\n",
        1,
    );
    sandbox.write("p.yaml", &pipeline);
    sandbox.ok(&["run", "p.yaml"]);

    let meta: serde_json::Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/chatml-cache/meta.json")).unwrap();
    assert_eq!(meta["vocab_size"], 386);
    assert_eq!(
        meta["added_tokens"]["added"],
        serde_json::json!([{"content": "<|im_start|>", "id": 384}, {"content": "<|im_end|>", "id": 385}])
    );
    let extended = output(&sandbox, "chatml-cache").join("tokenizer/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&extended).unwrap();
    let ids = tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>", false)
        .unwrap();
    assert_eq!(ids.get_ids().first(), Some(&384));
    assert_eq!(ids.get_ids().last(), Some(&385));

    // The adapter: LoRA pairs plus the new rows, where PEFT keeps them.
    let base_dir = output(&sandbox, "base");
    let base_config = trainyard::model::load_config(&base_dir).unwrap();
    assert_eq!(base_config.vocab_size(), 384);
    let adapter = output(&sandbox, "adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut expected_indices = serde_json::json!({"embed_tokens": [384, 385]});
    if !base_config.tied_embeddings() {
        expected_indices["lm_head"] = serde_json::json!([384, 385]);
    }
    assert_eq!(config["trainable_token_indices"], expected_indices);
    let tensors =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let rows = &tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"];
    assert_eq!(rows.dims(), [2, 64]);
    assert!(
        std::fs::read_to_string(adapter.join("tokenizer.json"))
            .unwrap()
            .contains("<|im_end|>"),
        "the adapter carries the extended tokenizer"
    );

    // Trained: the assistant-token loss (answers and their `<|im_end|>`) falls from the
    // untrained adapter's, whose new rows are the mean of the old ones.
    let spec = trainyard::model::lora::LoraSpec::from_adapter_config(&config).unwrap();
    let (untrained, _, grown) =
        trainyard::model::new_lora(&base_dir, &spec, DType::F32, &Device::Cpu, 0).unwrap();
    assert_eq!(grown.vocab_size(), 386);
    let (with_adapter, _) =
        trainyard::model::load_lora(&base_dir, &adapter, DType::F32, &Device::Cpu).unwrap();
    let cache = output(&sandbox, "chatml-cache");
    let before = common::assistant_loss(&untrained, &cache);
    let after = common::assistant_loss(&with_adapter, &cache);
    assert!(
        after < before - 0.3,
        "training should lower the loss: {before} → {after}"
    );

    // Merged: tables grown to 386 rows, logits equal to base + adapter's.
    let merged_dir = output(&sandbox, "merged");
    assert_eq!(
        trainyard::model::load_config(&merged_dir)
            .unwrap()
            .vocab_size(),
        386
    );
    let (merged, _) =
        trainyard::model::load_pretrained(&merged_dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(
        &[
            [384u32, 30, 31, 385, 5, 384, 2],
            [1, 9, 385, 101, 102, 384, 104],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let expected = with_adapter
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap();
    assert_eq!(expected.dims(), [2, 7, 386]);
    let got = merged.forward(&ids, None, Kernels::Differentiable).unwrap();
    let diff = max_diff(&expected, &got);
    assert!(
        diff < 1e-5,
        "merged logits differ from base + adapter by {diff}"
    );

    // Full fine-tuning grows the model's own tables and trains the new rows.
    let full_dir = output(&sandbox, "full");
    assert_eq!(
        trainyard::model::load_config(&full_dir)
            .unwrap()
            .vocab_size(),
        386
    );
    let (full, _) = trainyard::model::load_pretrained(&full_dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        full.forward(&ids, None, Kernels::Differentiable)
            .unwrap()
            .dims(),
        [2, 7, 386]
    );
    assert!(
        std::fs::read_to_string(full_dir.join("tokenizer.json"))
            .unwrap()
            .contains("<|im_start|>")
    );
}

/// The two stages' lists must agree, and `sft` cannot add tokens by itself.
#[test]
fn add_tokens_mistakes_are_reported() {
    let sandbox = Sandbox::new();
    sandbox.write("chatml.jinja", CHATML);
    let pipeline = common::chat_pipeline(ADDED_TAIL).replacen(
        "seed: 11\n",
        "seed: 11\nvars:\n  new_tokens: [\"<|im_start|>\", \"<|im_end|>\"]\n",
        1,
    );
    sandbox.write("p.yaml", &pipeline);
    let message = sandbox.fails(&[
        "run",
        "p.yaml",
        "--until",
        "adapter",
        "--set",
        "stages.adapter.with.add_tokens=[\"<|im_end|>\"]",
    ]);
    assert!(
        message.contains("use one list for both stages"),
        "{message}"
    );
    let message = sandbox.fails(&[
        "run",
        "p.yaml",
        "--until",
        "adapter",
        "--set",
        "stages.chatml-cache.with.add_tokens=[]",
    ]);
    assert!(message.contains("was built without them"), "{message}");
}

/// GPT-2 (Conv1D layers): LoRA and QLoRA train PEFT adapters on `c_attn`, `c_proj` and
/// `c_fc` (the default targets, `fan_in_fan_out` as PEFT sets it), QLoRA about as well as
/// LoRA, and the merged model (`W + s·(B·A)ᵀ`) computes what base + adapter compute.
#[test]
fn gpt2_lora_and_qlora_train_peft_adapters_that_merge() {
    let sandbox = Sandbox::new();
    let tail = "  lora:
    kind: sft
    inputs: { data: chat-cache, base: base }
    with: { adapter: { kind: lora, rank: 8, alpha: 16 }, epochs: 2, batch_size: 8, lr: 0.003 }
  qlora:
    kind: sft
    inputs: { data: chat-cache, base: base }
    with: { adapter: { kind: qlora, rank: 8, alpha: 16 }, epochs: 2, batch_size: 8, lr: 0.003 }
  merged:
    kind: lora-merge
    inputs: { base: base, adapter: lora }
";
    // GPT-2's learned positions stop at the pretraining context: 128, as the SFT rows.
    let pipeline = common::chat_pipeline(tail).replace(
        "family: llama, layers: 2, heads: 4, dim: 64 }, context: 64",
        "family: gpt2, layers: 2, heads: 4, dim: 64 }, context: 128",
    );
    assert!(pipeline.contains("family: gpt2"));
    sandbox.write("p.yaml", &pipeline);
    sandbox.ok(&["run", "p.yaml"]);

    let base_dir = output(&sandbox, "base");
    let cache = output(&sandbox, "chat-cache");
    let (base, _) = trainyard::model::load_pretrained(&base_dir, DType::F32, &Device::Cpu).unwrap();
    let before = common::assistant_loss(&base, &cache);
    let mut losses = Vec::new();
    for stage in ["lora", "qlora"] {
        let config: serde_json::Value = serde_json::from_str(
            &sandbox.read(&format!("runs/latest/outputs/{stage}/adapter_config.json")),
        )
        .unwrap();
        assert_eq!(config["fan_in_fan_out"], true, "{stage}");
        assert_eq!(
            config["target_modules"],
            serde_json::json!(["c_attn", "c_proj", "c_fc"]),
            "{stage}"
        );
        let tensors = candle_core::safetensors::load(
            output(&sandbox, stage).join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        // 2 blocks × 4 Conv1D layers (`c_proj` in attention and MLP) × (A, B).
        assert_eq!(tensors.len(), 16, "{stage}");
        let c_fc_b = &tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"];
        assert_eq!(c_fc_b.dims(), [256, 8], "{stage}: B is [out, r]");
        let (model, _) = trainyard::model::load_lora(
            &base_dir,
            &output(&sandbox, stage),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        losses.push(common::assistant_loss(&model, &cache));
    }
    let (lora, qlora) = (losses[0], losses[1]);
    // Less than the llama test's 0.3: GPT-2 adapters cannot train the chat tokens'
    // untrained embeddings (no `modules_to_save`), only the projections.
    assert!(
        lora < before - 0.1 && qlora < before - 0.1 && qlora <= lora * 1.1,
        "base {before}, LoRA {lora}, QLoRA {qlora}"
    );
    assert_ne!(lora, qlora, "the QLoRA base was not quantized");

    let (with_adapter, _) = trainyard::model::load_lora(
        &base_dir,
        &output(&sandbox, "lora"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (merged, _) =
        trainyard::model::load_pretrained(&output(&sandbox, "merged"), DType::F32, &Device::Cpu)
            .unwrap();
    let ids = Tensor::new(&[[4u32, 30, 31, 200, 5, 17, 2]], &Device::Cpu).unwrap();
    let forward = |model: &trainyard::model::CausalLm| {
        model.forward(&ids, None, Kernels::Differentiable).unwrap()
    };
    let diff = max_diff(&forward(&with_adapter), &forward(&merged));
    assert!(
        diff < 1e-4,
        "merged logits differ from base + adapter by {diff}"
    );
    assert!(
        max_diff(&forward(&base), &forward(&merged)) > 1e-3,
        "the merge changed the model"
    );
}
