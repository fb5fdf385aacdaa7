//! Specifications of the transformer models: every parameter trains, analytic gradients
//! match finite differences, attention is causal, configs and checkpoints round-trip
//! through Hugging Face's formats, and initialisation is reproducible.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use trainyard::model::{
    self, CausalLm, Gpt2Config, Kernels, LlamaConfig, LlamaFlavor, ModelConfig, ModelError,
};

fn llama() -> ModelConfig {
    ModelConfig::Llama(LlamaConfig::tiny(LlamaFlavor::Llama, false))
}

fn llama_tied() -> ModelConfig {
    ModelConfig::Llama(LlamaConfig::tiny(LlamaFlavor::Llama, true))
}

fn qwen2() -> ModelConfig {
    ModelConfig::Llama(LlamaConfig::tiny(LlamaFlavor::Qwen2, true))
}

fn llama_all_biases() -> ModelConfig {
    let mut config = LlamaConfig::tiny(LlamaFlavor::Llama, false);
    config.qkv_bias = true;
    config.o_bias = true;
    config.mlp_bias = true;
    ModelConfig::Llama(config)
}

fn gpt2() -> ModelConfig {
    ModelConfig::Gpt2(Gpt2Config::tiny())
}

fn all_configs() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("llama", llama()),
        ("llama tied", llama_tied()),
        ("llama all biases", llama_all_biases()),
        ("qwen2", qwen2()),
        ("gpt2", gpt2()),
    ]
}

/// Deterministic pseudo-random token ids `[batch, seq]`.
fn tokens(batch: usize, seq: usize, vocab: usize, salt: u32) -> Vec<u32> {
    (0..batch * seq)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).rotate_left(7) ^ salt) % vocab as u32)
        .collect()
}

fn ids(values: &[u32], batch: usize, seq: usize) -> Tensor {
    Tensor::from_vec(values.to_vec(), (batch, seq), &Device::Cpu).unwrap()
}

/// Mean next-token cross-entropy of `model` on `input` with shifted targets.
fn loss(model: &CausalLm, input: &Tensor, targets: &Tensor) -> Tensor {
    let logits = model.forward(input, None, Kernels::Differentiable).unwrap();
    let (batch, seq, vocab) = logits.dims3().unwrap();
    candle_nn::loss::cross_entropy(
        &logits.reshape((batch * seq, vocab)).unwrap(),
        &targets.flatten_all().unwrap(),
    )
    .unwrap()
}

fn batch(config: &ModelConfig) -> (Tensor, Tensor) {
    let (b, t) = (2, 7);
    let vocab = config.vocab_size();
    (
        ids(&tokens(b, t, vocab, 1), b, t),
        ids(&tokens(b, t, vocab, 977), b, t),
    )
}

fn values(tensor: &Tensor) -> Vec<f64> {
    tensor
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_after_one_backward_pass() {
    for (label, config) in all_configs() {
        let (model, varmap) = model::new_trainable(&config, DType::F32, &Device::Cpu, 7).unwrap();
        let (input, targets) = batch(&config);
        let grads = loss(&model, &input, &targets).backward().unwrap();
        let vars = model::sorted_vars(&varmap);
        assert!(!vars.is_empty());
        for (name, var) in vars {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            let norm = grad
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{label}: zero gradient for {name}");
        }
    }
}

#[test]
fn parameter_names_are_hugging_faces() {
    let names = |config: &ModelConfig| -> Vec<String> {
        let (_, varmap) = model::new_trainable(config, DType::F32, &Device::Cpu, 1).unwrap();
        model::sorted_vars(&varmap)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    };
    let llama = names(&llama());
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(llama.contains(&name.to_string()), "missing {name}");
    }
    assert!(!llama.iter().any(|name| name.ends_with(".bias")));
    let qwen2 = names(&qwen2());
    assert!(qwen2.contains(&"model.layers.0.self_attn.k_proj.bias".to_string()));
    assert!(!qwen2.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
    assert!(!qwen2.contains(&"lm_head.weight".to_string()), "tied head");
    let gpt2 = names(&gpt2());
    for name in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.1.ln_2.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.bias",
    ] {
        assert!(gpt2.contains(&name.to_string()), "missing {name}");
    }
    assert_eq!(gpt2.len(), 2 + 12 * 2 + 2);
}

/// Central differences in f64 against the analytic gradient, for a few sampled entries
/// of every parameter.
fn check_gradients(label: &str, config: &ModelConfig) {
    let (model, varmap) = model::new_trainable(config, DType::F64, &Device::Cpu, 3).unwrap();
    let (input, targets) = batch(config);
    let scalar =
        |model: &CausalLm| -> f64 { loss(model, &input, &targets).to_scalar::<f64>().unwrap() };
    let grads = loss(&model, &input, &targets).backward().unwrap();
    let step = 1e-5;
    let mut checked = 0;
    for (name, var) in model::sorted_vars(&varmap) {
        let analytic = values(grads.get(var.as_tensor()).unwrap());
        let original = values(var.as_tensor());
        let count = original.len();
        // The largest-gradient entry plus a few spread out through the tensor.
        let largest = (0..count)
            .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
            .unwrap();
        for index in [largest, 0, count / 3, (2 * count) / 3, count - 1] {
            let set = |value: f64| {
                let mut data = original.clone();
                data[index] = value;
                let tensor = Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap();
                var.set(&tensor).unwrap();
            };
            set(original[index] + step);
            let plus = scalar(&model);
            set(original[index] - step);
            let minus = scalar(&model);
            set(original[index]);
            let numeric = (plus - minus) / (2.0 * step);
            let error = (numeric - analytic[index]).abs();
            let scale = numeric.abs().max(analytic[index].abs());
            assert!(
                error <= 1e-7 + 1e-4 * scale,
                "{label}: {name}[{index}]: numeric {numeric:e} vs analytic {:e}",
                analytic[index]
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn finite_differences_match_the_analytic_gradient_llama() {
    check_gradients("llama", &llama());
}

#[test]
fn finite_differences_match_the_analytic_gradient_qwen2_tied() {
    check_gradients("qwen2", &qwen2());
}

#[test]
fn finite_differences_match_the_analytic_gradient_llama_all_biases() {
    check_gradients("llama all biases", &llama_all_biases());
}

#[test]
fn finite_differences_match_the_analytic_gradient_gpt2() {
    check_gradients("gpt2", &gpt2());
}

#[test]
fn changing_a_token_never_changes_earlier_logits() {
    for (label, config) in all_configs() {
        let (model, _) = model::new_trainable(&config, DType::F32, &Device::Cpu, 5).unwrap();
        let (b, t) = (1, 9);
        let original = tokens(b, t, config.vocab_size(), 3);
        let before = model
            .forward(&ids(&original, b, t), None, Kernels::Differentiable)
            .unwrap();
        for changed in [0, 4, t - 1] {
            let mut edited = original.clone();
            edited[changed] = (edited[changed] + 1) % config.vocab_size() as u32;
            let after = model
                .forward(&ids(&edited, b, t), None, Kernels::Differentiable)
                .unwrap();
            let diff = (&before - &after)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (position, delta) in diff.iter().enumerate() {
                if position < changed {
                    assert_eq!(
                        *delta, 0.0,
                        "{label}: position {position} saw token {changed}"
                    );
                } else if position == changed {
                    assert!(*delta > 0.0, "{label}: token {changed} had no effect");
                }
            }
        }
    }
}

#[test]
fn config_round_trips_through_hf_json() {
    for (label, config) in all_configs() {
        let text = serde_json::to_string(&config.to_hf_json()).unwrap();
        let back = model::parse_config(&text, Path::new("config.json")).unwrap();
        assert_eq!(back, config, "{label}");
    }
    let dir = tempfile::tempdir().unwrap();
    qwen2().save(dir.path()).unwrap();
    assert_eq!(model::load_config(dir.path()).unwrap(), qwen2());
    let json = llama().to_hf_json();
    assert_eq!(json["architectures"][0], "LlamaForCausalLM");
    assert_eq!(qwen2().to_hf_json()["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(gpt2().to_hf_json()["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(json["torch_dtype"], "float32");
    assert_eq!(json["rope_theta"], 10000.0);
    assert_eq!(json["rope_parameters"]["rope_theta"], 10000.0);
}

fn theta_of(json: &str) -> f64 {
    match model::parse_config(json, Path::new("config.json")).unwrap() {
        ModelConfig::Llama(config) => config.rope_theta,
        ModelConfig::Gpt2(_) => unreachable!(),
    }
}

const BASE: &str = r#""model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4"#;

#[test]
fn rope_theta_is_read_in_both_forms_and_defaults_only_when_absent() {
    assert_eq!(
        theta_of(&format!(r#"{{{BASE}, "rope_theta": 1000000.0}}"#)),
        1e6
    );
    assert_eq!(
        theta_of(&format!(
            r#"{{{BASE}, "rope_parameters": {{"rope_type": "default", "rope_theta": 500000.0}}}}"#
        )),
        5e5
    );
    assert_eq!(
        theta_of(&format!(
            r#"{{{BASE}, "rope_parameters": {{"rope_type": "default"}}, "rope_theta": 250000.0}}"#
        )),
        2.5e5
    );
    assert_eq!(
        theta_of(&format!(r#"{{{BASE}}}"#)),
        model::DEFAULT_ROPE_THETA
    );
}

#[test]
fn bad_configs_name_the_key() {
    let error = |json: &str| {
        model::parse_config(json, Path::new("dir/config.json"))
            .unwrap_err()
            .to_string()
    };
    let message = error(r#"{"model_type": "mamba"}"#);
    assert!(
        message.contains("dir/config.json") && message.contains("model_type"),
        "{message}"
    );
    let message = error(r#"{"model_type": "llama", "vocab_size": 10, "num_attention_heads": 2}"#);
    assert!(message.contains("hidden_size"), "{message}");
    let message = error(&format!(
        r#"{{{BASE}, "rope_scaling": {{"type": "linear"}}}}"#
    ));
    assert!(message.contains("rope_scaling"), "{message}");
    let message = error(&format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#));
    assert!(message.contains("num_key_value_heads"), "{message}");
    let message = error(r#"{"model_type": "gpt2", "n_embd": "wide"}"#);
    assert!(message.contains("n_embd"), "{message}");
    assert!(matches!(
        model::load_config(Path::new("/nonexistent/model")),
        Err(ModelError::Io { .. })
    ));
}

#[test]
fn saved_checkpoints_load_back_with_identical_logits() {
    for (label, config) in all_configs() {
        let (model, varmap) = model::new_trainable(&config, DType::F32, &Device::Cpu, 11).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model::save_pretrained(&varmap, &config, dir.path()).unwrap();
        let input = ids(&tokens(2, 5, config.vocab_size(), 9), 2, 5);
        let expected = model
            .forward(&input, None, Kernels::Differentiable)
            .unwrap()
            .flatten_all()
            .unwrap();
        let expected = expected.to_vec1::<f32>().unwrap();

        let file = dir.path().join("model.safetensors");
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu).unwrap()
        };
        let loaded = CausalLm::new(&config, vb).unwrap();
        let got = loaded
            .forward(&input, None, Kernels::Differentiable)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), expected, "{label}: mmaped");

        let (frozen, read_config) =
            model::load_pretrained(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(read_config, config);
        let got = frozen
            .forward(&input, None, Kernels::Differentiable)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            expected,
            "{label}: load_pretrained"
        );

        let (trainable, _, _) =
            model::load_trainable(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let got = trainable
            .forward(&input, None, Kernels::Differentiable)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            expected,
            "{label}: load_trainable"
        );
    }
}

#[test]
fn gpt2_weights_are_stored_in_conv1d_layout() {
    let (_, varmap) = model::new_trainable(&gpt2(), DType::F32, &Device::Cpu, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    model::save_safetensors(&varmap, &file).unwrap();
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    // Conv1D: [in, out].
    assert_eq!(
        tensors["transformer.h.0.attn.c_attn.weight"].dims(),
        [32, 96]
    );
    assert_eq!(tensors["transformer.h.0.mlp.c_fc.weight"].dims(), [32, 128]);
    assert_eq!(
        tensors["transformer.h.0.mlp.c_proj.weight"].dims(),
        [128, 32]
    );
}

fn snapshot(varmap: &VarMap) -> Vec<(String, Vec<f64>)> {
    model::sorted_vars(varmap)
        .into_iter()
        .map(|(name, var)| (name, values(var.as_tensor())))
        .collect()
}

#[test]
fn init_is_bit_identical_for_a_seed_and_differs_for_another() {
    for (label, config) in all_configs() {
        let make = |seed| {
            model::new_trainable(&config, DType::F32, &Device::Cpu, seed)
                .unwrap()
                .1
        };
        let first = snapshot(&make(42));
        assert_eq!(first, snapshot(&make(42)), "{label}");
        let other = snapshot(&make(43));
        for ((name, a), (_, b)) in first.iter().zip(&other) {
            match model::init_rule(name, config.num_layers()) {
                model::InitRule::Normal(_) => assert_ne!(a, b, "{label}: {name}"),
                _ => assert_eq!(a, b, "{label}: {name}"),
            }
        }
    }
}

#[test]
fn init_follows_the_rules() {
    let config = llama_all_biases();
    let (_, varmap) = model::new_trainable(&config, DType::F64, &Device::Cpu, 9).unwrap();
    for (name, values) in snapshot(&varmap) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        if name.ends_with(".bias") {
            assert!(values.iter().all(|&v| v == 0.0), "{name}");
        } else if name.contains("norm") {
            assert!(values.iter().all(|&v| v == 1.0), "{name}");
        } else if name.contains("o_proj") || name.contains("down_proj") {
            assert!((std - 0.01).abs() < 0.002, "{name}: std {std}");
        } else {
            assert!((std - 0.02).abs() < 0.003, "{name}: std {std}");
        }
    }
}

#[test]
fn gpt2_files_without_the_transformer_prefix_load() {
    let config = gpt2();
    let (model, varmap) = model::new_trainable(&config, DType::F32, &Device::Cpu, 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    config.save(dir.path()).unwrap();
    // Rewrite the tensors the way openai-community/gpt2 names them, in bf16-free f32.
    let renamed: std::collections::HashMap<String, Tensor> = model::sorted_vars(&varmap)
        .into_iter()
        .map(|(name, var)| {
            let short = name.strip_prefix("transformer.").unwrap().to_string();
            (short, var.as_tensor().clone())
        })
        .collect();
    candle_core::safetensors::save(&renamed, dir.path().join("model.safetensors")).unwrap();
    let input = ids(&tokens(1, 6, config.vocab_size(), 2), 1, 6);
    let expected = model
        .forward(&input, None, Kernels::Differentiable)
        .unwrap()
        .flatten_all()
        .unwrap();
    let expected = expected.to_vec1::<f32>().unwrap();
    let (frozen, _) = model::load_pretrained(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let got = frozen
        .forward(&input, None, Kernels::Differentiable)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(got.to_vec1::<f32>().unwrap(), expected);
    let (trainable, _, _) = model::load_trainable(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let got = trainable
        .forward(&input, None, Kernels::Differentiable)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(got.to_vec1::<f32>().unwrap(), expected);
}

#[test]
fn a_checkpoint_missing_a_tensor_is_an_error_naming_it() {
    let config = llama();
    let (_, varmap) = model::new_trainable(&config, DType::F32, &Device::Cpu, 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    config.save(dir.path()).unwrap();
    let kept: std::collections::HashMap<String, Tensor> = model::sorted_vars(&varmap)
        .into_iter()
        .filter(|(name, _)| name != "model.norm.weight")
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&kept, dir.path().join("model.safetensors")).unwrap();
    let message = match model::load_trainable(dir.path(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("a tensor is missing"),
        Err(error) => error.to_string(),
    };
    assert!(message.contains("model.norm.weight"), "{message}");
    assert!(model::load_pretrained(dir.path(), DType::F32, &Device::Cpu).is_err());
}

#[test]
fn token_ids_outside_the_vocabulary_are_errors_not_panics() {
    for (label, config) in all_configs() {
        let (model, _) = model::new_trainable(&config, DType::F32, &Device::Cpu, 1).unwrap();
        let input = ids(&[1, 2, config.vocab_size() as u32], 1, 3);
        assert!(
            model
                .forward(&input, None, Kernels::Differentiable)
                .is_err(),
            "{label}"
        );
    }
    let (model, _) = model::new_trainable(&gpt2(), DType::F32, &Device::Cpu, 1).unwrap();
    let too_long = ids(&vec![0; 65], 1, 65);
    assert!(
        model
            .forward(&too_long, None, Kernels::Differentiable)
            .is_err(),
        "longer than n_positions"
    );
}

/// The bf16 sharded parity fixture.
fn bf16_sharded_fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama-bf16-sharded")
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(bf16_sharded_fixture()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    for result in [
        model::safetensors_files(dir.path()).map(|_| ()),
        model::load_pretrained(dir.path(), DType::F32, &Device::Cpu).map(|_| ()),
        model::load_trainable(dir.path(), DType::F32, &Device::Cpu).map(|_| ()),
    ] {
        let error = result.unwrap_err();
        assert!(matches!(error, ModelError::MissingShard { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains(&index.display().to_string())
                && message.contains("model-00002-of-00003.safetensors"),
            "{message}"
        );
    }
}

#[test]
fn unsupported_architecture_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    // Only config.json is read: there are no weights at all here.
    std::fs::write(
        &config,
        r#"{"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072}"#,
    )
    .unwrap();
    let message = model::check_architecture(dir.path())
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        format!(
            "{}: key `model_type`: `phi3` is not supported (trainyard supports llama, qwen2, mistral, gpt2)",
            config.display()
        )
    );
    assert_eq!(
        model::load_config(dir.path()).unwrap_err().to_string(),
        message
    );
    // A supported model_type with a head trainyard does not have is refused by that name.
    std::fs::write(
        &config,
        r#"{"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}"#,
    )
    .unwrap();
    let message = model::check_architecture(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("key `architectures`: `LlamaForSequenceClassification` is not supported")
            && message.contains("MistralForCausalLM"),
        "{message}"
    );
    for (model_type, architecture) in model::SUPPORTED_ARCHITECTURES {
        std::fs::write(
            &config,
            format!(r#"{{"model_type": "{model_type}", "architectures": ["{architecture}"]}}"#),
        )
        .unwrap();
        model::check_architecture(dir.path()).unwrap();
    }
}

#[test]
fn a_mistral_window_shorter_than_the_positions_limits_them() {
    let config = |window: &str| {
        model::parse_config(
            &format!(
                r#"{{"model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 4096,
                    "sliding_window": {window}}}"#
            ),
            Path::new("config.json"),
        )
        .unwrap()
    };
    assert_eq!(config("null").max_positions(), 4096);
    assert_eq!(config("8192").max_positions(), 4096);
    // Within the window Mistral's attention is plain causal attention: that far, and no
    // further, trainyard runs it exactly.
    assert_eq!(config("1024").max_positions(), 1024);
    assert_eq!(config("null").model_type(), "mistral");
}

#[test]
fn lora_on_a_bf16_base_gets_the_gradients_of_its_f32_widening() {
    // Gradients flow through the mapped bf16 projections to every adapter, and they are
    // those of the same adapter on the base widened to f32 tensors.
    let dir = bf16_sharded_fixture();
    let spec = model::lora::LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: model::lora::LLAMA_TARGETS
            .iter()
            .map(|t| t.to_string())
            .collect(),
        modules_to_save: Vec::new(),
        dropout: 0.0,
        trainable_tokens: Default::default(),
        quant: None,
        fan_in_fan_out: false,
    };
    let widened = tempfile::tempdir().unwrap();
    let (_, varmap, config) = model::load_trainable(&dir, DType::F32, &Device::Cpu).unwrap();
    model::save_pretrained(&varmap, &config, widened.path()).unwrap();
    let gradients = |base: &Path| {
        let (lora, varmap, _) = model::new_lora(base, &spec, DType::F32, &Device::Cpu, 3).unwrap();
        // B starts at zero, which would leave A without a gradient.
        for (name, var) in model::sorted_vars(&varmap) {
            if name.ends_with("lora_B.weight") {
                var.set(&(var.ones_like().unwrap() * 0.05).unwrap())
                    .unwrap();
            }
        }
        let ids = Tensor::new(&[[1u32, 17, 127, 0, 64, 5, 17]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[17u32, 127, 0, 64, 5, 17, 3]], &Device::Cpu).unwrap();
        let grads = loss(&lora, &ids, &targets).backward().unwrap();
        model::sorted_vars(&varmap)
            .into_iter()
            .map(|(name, var)| {
                let grad = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                (name, grad.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let mapped = gradients(&dir);
    let dense = gradients(widened.path());
    assert_eq!(mapped.len(), 2 * 7 * 2);
    for ((name, a), (_, b)) in mapped.iter().zip(&dense) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{name}: {diff:e} (scale {scale:e})"
        );
    }
}

/// The vendored candle's parallel copies (`contiguous()` of transposed matrices and of
/// block layouts, split over its thread pool when large) give exactly the elements a
/// plain index walk gives, offsets and odd sizes included.
#[test]
fn large_strided_copies_match_an_index_walk() {
    let (rows, cols) = (301, 517); // > 64k elements, not multiples of the 32-wide tiles
    let data: Vec<f32> = (0..(rows + 3) * cols).map(|i| i as f32).collect();
    let full = Tensor::from_vec(data.clone(), (rows + 3, cols), &Device::Cpu).unwrap();
    // A transposed view with a start offset: [cols, rows], strides [1, cols].
    let view = full.narrow(0, 3, rows).unwrap().t().unwrap();
    let copied: Vec<Vec<f32>> = view.contiguous().unwrap().to_vec2().unwrap();
    for (c, row) in copied.iter().enumerate() {
        for (r, value) in row.iter().enumerate() {
            assert_eq!(*value, data[(r + 3) * cols + c], "at [{c}, {r}]");
        }
    }
    // Blocks of 64 (attention heads): [B, T, H, D] -> [B, H, T, D].
    let (b, t, h, d) = (3, 129, 4, 64);
    let data: Vec<f32> = (0..b * t * h * d).map(|i| i as f32).collect();
    let x = Tensor::from_vec(data.clone(), (b, t, h, d), &Device::Cpu).unwrap();
    let heads = x.transpose(1, 2).unwrap().contiguous().unwrap();
    let heads: Vec<f32> = heads.flatten_all().unwrap().to_vec1().unwrap();
    let mut at = 0;
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    assert_eq!(heads[at], data[((bi * t + ti) * h + hi) * d + di]);
                    at += 1;
                }
            }
        }
    }
}

/// The vendored candle's products split over threads (each thread one single-threaded
/// gemm on its block of the output: a slice of rows or of columns, or whole batches)
/// cover every element exactly: checked against an f64 product on a 3-thread pool, with
/// sizes that do not divide evenly, transposed operands and batches.
#[test]
fn products_split_over_threads_match_a_plain_product() {
    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }
    // (batch, m, k, n, rhs stored transposed)
    let cases = [
        (1, 515, 300, 131, false),
        (1, 37, 300, 1029, false),
        (1, 515, 300, 131, true),
        (5, 70, 200, 90, false),
        (2, 150, 300, 77, true),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for (case, &(b, m, k, n, transposed)) in cases.iter().enumerate() {
        let a = values(b * m * k, case);
        let w = values(b * k * n, case + 10);
        let lhs = Tensor::from_vec(a.clone(), (b, m, k), &Device::Cpu).unwrap();
        // `w` holds rhs[batch][row][col] at batch·k·n + row·n + col either way.
        let rhs = if transposed {
            let mut stored = vec![0f32; b * k * n];
            for batch in 0..b {
                for row in 0..k {
                    for col in 0..n {
                        stored[batch * k * n + col * k + row] = w[batch * k * n + row * n + col];
                    }
                }
            }
            Tensor::from_vec(stored, (b, n, k), &Device::Cpu)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        } else {
            Tensor::from_vec(w.clone(), (b, k, n), &Device::Cpu).unwrap()
        };
        let product: Vec<f32> = pool
            .install(|| lhs.matmul(&rhs))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for batch in 0..b {
            for row in 0..m {
                for col in 0..n {
                    let expected: f64 = (0..k)
                        .map(|i| {
                            f64::from(a[batch * m * k + row * k + i])
                                * f64::from(w[batch * k * n + i * n + col])
                        })
                        .sum();
                    let got = f64::from(product[(batch * m + row) * n + col]);
                    assert!(
                        (got - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                        "case {case}: [{batch}, {row}, {col}] = {got}, expected {expected}"
                    );
                }
            }
        }
    }
}
