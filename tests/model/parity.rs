//! Parity with Hugging Face `transformers`: tiny random models of each family, written
//! by transformers itself (tests/fixtures/models/generate.py, versions pinned there and
//! recorded in each `logits.json`), load with trainyard's loader and give transformers'
//! logits for the same token ids; exporting such a model and loading it back changes no
//! bit of the logits. generate_dtypes.py adds bf16/f16 weights (one model sharded), Llama
//! 3 rotary scaling and Mistral: a half-precision base is kept in its dtype and must give
//! the logits transformers computes in f32 from the same weights.
//!
//! Set `TRAINYARD_PARITY_EXPORT=DIR` to keep the exported checkpoints in `DIR/<family>`;
//! `generate.py --check-export DIR` then has transformers load them and compare.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use trainyard::model::{self, CausalLm, Kernels, ModelConfig};

/// Largest absolute logit difference accepted between trainyard and transformers.
const TOLERANCE: f32 = 1e-4;

const FAMILIES: [&str; 3] = ["llama", "qwen2", "gpt2"];

/// A fixture's `logits.json`.
#[derive(Deserialize)]
struct Expected {
    transformers: String,
    torch: String,
    input_ids: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(family)
}

fn expected(family: &str) -> Expected {
    let path = fixture(family).join("logits.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn input_ids(expected: &Expected) -> Tensor {
    Tensor::new(expected.input_ids.clone(), &Device::Cpu).unwrap()
}

fn load(dir: &Path) -> (CausalLm, ModelConfig) {
    model::load_pretrained(dir, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("load_pretrained {dir:?}: {e}"))
}

/// The logits of `model` for `ids`, flattened, checking their shape.
fn logits(model: &CausalLm, ids: &Tensor, vocab: usize) -> Vec<f32> {
    let logits = model.forward(ids, None, Kernels::Differentiable).unwrap();
    let (batch, seq) = ids.dims2().unwrap();
    assert_eq!(logits.dims(), [batch, seq, vocab]);
    assert_eq!(logits.dtype(), DType::F32);
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

/// Loads the fixture, compares its logits with transformers' and returns them.
fn check_parity(family: &str) -> Vec<f32> {
    check_fixture(family, family)
}

/// As [`check_parity`] for the fixture directory `name`, a `model_type` model.
fn check_fixture(name: &str, model_type: &str) -> Vec<f32> {
    let family = name;
    let expected = expected(family);
    let (model, config) = load(&fixture(family));
    assert_eq!(config.model_type(), model_type);
    let got = logits(&model, &input_ids(&expected), config.vocab_size());
    let want: Vec<f32> = expected
        .logits
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let diff = max_abs_diff(&got, &want);
    println!(
        "{family}: max |logit - transformers {} (torch {})| = {diff:e} over {} logits",
        expected.transformers,
        expected.torch,
        want.len()
    );
    assert!(
        diff <= TOLERANCE,
        "{family}: logits differ from transformers' by {diff:e} (tolerance {TOLERANCE:e})"
    );
    got
}

#[test]
fn llama_matches_transformers() {
    check_parity("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check_parity("qwen2");
}

#[test]
fn gpt2_matches_transformers() {
    check_parity("gpt2");
}

/// Every tensor of a safetensors file, by name.
fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Loads the fixture trainable, saves it, loads the export back: the export holds the
/// same tensors bit for bit and gives the same logits bit for bit.
fn check_export(family: &str) {
    let dir = fixture(family);
    let expected = expected(family);
    let ids = input_ids(&expected);
    let (frozen, config) = load(&dir);
    let vocab = config.vocab_size();
    let first = bits(&logits(&frozen, &ids, vocab));

    let (trainable, varmap, trainable_config) =
        model::load_trainable(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(trainable_config, config);
    assert_eq!(
        bits(&logits(&trainable, &ids, vocab)),
        first,
        "{family}: load_trainable"
    );

    let temp = tempfile::tempdir().unwrap();
    let out = match std::env::var_os("TRAINYARD_PARITY_EXPORT") {
        Some(root) => PathBuf::from(root).join(family),
        None => temp.path().join(family),
    };
    model::save_pretrained(&varmap, &config, &out).unwrap();

    let original = tensors(&dir.join("model.safetensors"));
    let exported = tensors(&out.join("model.safetensors"));
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>(),
        "{family}: exported tensor names"
    );
    for (name, tensor) in &original {
        let copy = &exported[name];
        assert_eq!(copy.dims(), tensor.dims(), "{family}: {name}");
        assert_eq!(copy.dtype(), DType::F32, "{family}: {name}");
        let a: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = copy.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bits(&a), bits(&b), "{family}: {name}");
    }

    let (reloaded, reloaded_config) = load(&out);
    assert_eq!(reloaded_config, config, "{family}: exported config.json");
    assert_eq!(
        bits(&logits(&reloaded, &ids, vocab)),
        first,
        "{family}: logits after export and reload"
    );
}

#[test]
fn llama_export_and_reload_is_bit_identical() {
    check_export("llama");
}

#[test]
fn qwen2_export_and_reload_is_bit_identical() {
    check_export("qwen2");
}

#[test]
fn gpt2_export_and_reload_is_bit_identical() {
    check_export("gpt2");
}

fn config_json(family: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixture(family).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn transformers_configs_are_read_with_every_hyper_parameter() {
    for family in FAMILIES {
        let expected = expected(family);
        assert!(
            expected.transformers.starts_with("5."),
            "{family}: fixture made by transformers {}; regenerate with the pinned version",
            expected.transformers
        );
    }
    // transformers 5 writes the rotary base only inside `rope_parameters`.
    for family in ["llama", "qwen2"] {
        let json = config_json(family);
        assert!(!json.contains_key("rope_theta"), "{family}");
        assert!(
            json["rope_parameters"]["rope_theta"].is_number(),
            "{family}"
        );
    }
    let ModelConfig::Llama(llama) = model::load_config(&fixture("llama")).unwrap() else {
        panic!("llama fixture is not a llama config");
    };
    assert_eq!(llama.rope_theta, 50_000.0);
    assert_eq!(llama.rms_norm_eps, 1e-5);
    assert_eq!(
        (llama.num_attention_heads, llama.num_key_value_heads),
        (4, 2)
    );
    assert_eq!(llama.head_dim, 8);
    assert!(!llama.tie_word_embeddings && !llama.qkv_bias && !llama.o_bias && !llama.mlp_bias);

    let ModelConfig::Llama(qwen2) = model::load_config(&fixture("qwen2")).unwrap() else {
        panic!("qwen2 fixture is not a llama-family config");
    };
    assert_eq!(qwen2.rope_theta, 1_000_000.0);
    assert_eq!(qwen2.rms_norm_eps, 1e-6);
    assert!(qwen2.tie_word_embeddings && qwen2.qkv_bias && !qwen2.o_bias);

    let ModelConfig::Gpt2(gpt2) = model::load_config(&fixture("gpt2")).unwrap() else {
        panic!("gpt2 fixture is not a gpt2 config");
    };
    assert_eq!((gpt2.n_positions, gpt2.n_inner), (64, 128));
    assert_eq!(gpt2.layer_norm_epsilon, 1e-5);
}

/// A copy of the llama fixture whose `config.json` is edited by `edit`.
fn edited_llama(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> tempfile::TempDir {
    let temp = tempfile::tempdir().unwrap();
    let mut json = config_json("llama");
    edit(&mut json);
    std::fs::write(
        temp.path().join("config.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        fixture("llama").join("model.safetensors"),
        temp.path().join("model.safetensors"),
    )
    .unwrap();
    temp
}

#[test]
fn the_pre_5_top_level_rope_theta_gives_the_same_logits() {
    let expected = expected("llama");
    let ids = input_ids(&expected);
    let (model, config) = load(&fixture("llama"));
    let want = bits(&logits(&model, &ids, config.vocab_size()));

    let old_style = edited_llama(|json| {
        let theta = json.remove("rope_parameters").unwrap()["rope_theta"].clone();
        json.insert("rope_theta".into(), theta);
    });
    let (old_model, old_config) = load(old_style.path());
    assert_eq!(old_config, config);
    assert_eq!(bits(&logits(&old_model, &ids, config.vocab_size())), want);
}

#[test]
fn the_fixture_would_catch_a_wrong_rotary_base() {
    // Without its rotary base the llama fixture falls back to the default 10000: the
    // logits must then be far off transformers', or the parity test could not tell.
    let expected = expected("llama");
    let without = edited_llama(|json| {
        json.remove("rope_parameters");
    });
    let (model, config) = load(without.path());
    let ModelConfig::Llama(llama) = &config else {
        unreachable!()
    };
    assert_eq!(llama.rope_theta, model::DEFAULT_ROPE_THETA);
    let got = logits(&model, &input_ids(&expected), config.vocab_size());
    let want: Vec<f32> = expected
        .logits
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let diff = max_abs_diff(&got, &want);
    println!("llama with rope_theta 10000 instead of 50000: max diff {diff:e}");
    assert!(diff > 1e-2, "{diff:e}");
}

/// The dtype of every tensor in a fixture's safetensors files.
fn stored_dtypes(name: &str) -> Vec<DType> {
    let files = model::safetensors_files(&fixture(name)).unwrap();
    model::shards::read_headers(&files)
        .unwrap()
        .into_iter()
        .map(|header| header.dtype)
        .collect()
}

#[test]
fn bf16_base_logits_match_transformers() {
    // Three bf16 shards with an index; transformers computed in f32 from the same weights.
    assert_eq!(
        model::safetensors_files(&fixture("llama-bf16-sharded"))
            .unwrap()
            .len(),
        3
    );
    assert!(
        stored_dtypes("llama-bf16-sharded")
            .iter()
            .all(|d| *d == DType::BF16)
    );
    check_fixture("llama-bf16-sharded", "llama");
}

#[test]
fn f16_base_with_tied_head_matches_transformers() {
    assert!(stored_dtypes("qwen2-f16").iter().all(|d| *d == DType::F16));
    check_fixture("qwen2-f16", "qwen2");
}

#[test]
fn bf16_gpt2_conv1d_weights_match_transformers() {
    assert!(stored_dtypes("gpt2-bf16").iter().all(|d| *d == DType::BF16));
    check_fixture("gpt2-bf16", "gpt2");
}

#[test]
fn a_bf16_base_gives_the_logits_of_its_f32_widening() {
    // The mapped bf16 path and the tensor path over the widened weights are the same model.
    let name = "llama-bf16-sharded";
    let expected = expected(name);
    let ids = input_ids(&expected);
    let (mapped, config) = load(&fixture(name));
    let (widened, _, _) = model::load_trainable(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let a = logits(&mapped, &ids, config.vocab_size());
    let b = logits(&widened, &ids, config.vocab_size());
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-5, "mapped vs widened: {diff:e}");
    // The kv-cache inference path reads the mapped weights too.
    let mut cache = mapped.new_cache();
    let cached = mapped
        .forward(&ids, Some(&mut cache), Kernels::Inference)
        .unwrap();
    let cached: Vec<f32> = cached.flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&cached, &a) < 1e-4);
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let ModelConfig::Llama(config) = model::load_config(&fixture("llama3-rope")).unwrap() else {
        panic!("llama3-rope is not a llama config");
    };
    let scaling = config.rope_scaling.expect("llama3 scaling is read");
    assert_eq!(
        (
            scaling.factor,
            scaling.low_freq_factor,
            scaling.high_freq_factor,
            scaling.original_max_position_embeddings
        ),
        (8.0, 1.0, 4.0, 256)
    );
    // The four frequencies of the fixture's 8-wide heads fall in all three bands:
    // kept, interpolated, divided by the factor.
    let plain = |i: usize| 1.0 / 50_000f64.powf((2 * i) as f64 / 8.0);
    assert_eq!(config.inv_freq(0), plain(0));
    assert!(config.inv_freq(1) < plain(1) && config.inv_freq(1) > plain(1) / 8.0);
    assert!((config.inv_freq(2) - plain(2) / 8.0).abs() < 1e-15);
    check_fixture("llama3-rope", "llama");

    // Without the scaling the logits are far off, so the test above can tell.
    let expected = expected("llama3-rope");
    let temp = tempfile::tempdir().unwrap();
    let mut json = config_json("llama3-rope");
    json.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "default", "rope_theta": 50000.0}),
    );
    std::fs::write(
        temp.path().join("config.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        fixture("llama3-rope").join("model.safetensors"),
        temp.path().join("model.safetensors"),
    )
    .unwrap();
    let (unscaled, config) = load(temp.path());
    let got = logits(&unscaled, &input_ids(&expected), config.vocab_size());
    let want: Vec<f32> = expected
        .logits
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let diff = max_abs_diff(&got, &want);
    println!("llama3-rope without its scaling: max diff {diff:e}");
    assert!(diff > 1e-2, "{diff:e}");
}

#[test]
fn the_older_rope_scaling_key_is_read_the_same() {
    // Files from before transformers 5 say `rope_scaling` (with `type` or `rope_type`)
    // and a top-level `rope_theta`.
    let mut json = config_json("llama3-rope");
    let parameters = json.remove("rope_parameters").unwrap();
    json.insert("rope_theta".into(), parameters["rope_theta"].clone());
    let mut legacy = parameters.as_object().unwrap().clone();
    legacy.remove("rope_theta");
    legacy.remove("rope_type");
    legacy.insert("type".into(), "llama3".into());
    json.insert("rope_scaling".into(), serde_json::Value::Object(legacy));
    let text = serde_json::to_string(&json).unwrap();
    let old = model::parse_config(&text, Path::new("config.json")).unwrap();
    assert_eq!(old, model::load_config(&fixture("llama3-rope")).unwrap());
    // And trainyard writes both forms back.
    let written = old.to_hf_json();
    assert_eq!(written["rope_parameters"]["rope_type"], "llama3");
    assert_eq!(written["rope_scaling"]["factor"], 8.0);
    assert_eq!(
        model::parse_config(&written.to_string(), Path::new("config.json")).unwrap(),
        old
    );
}

#[test]
fn mistral_matches_transformers() {
    let ModelConfig::Llama(config) = model::load_config(&fixture("mistral")).unwrap() else {
        panic!("mistral is not a llama-family config");
    };
    assert_eq!(config.flavor, model::LlamaFlavor::Mistral);
    assert_eq!(config.sliding_window, Some(4096));
    // A window wider than the positions does not limit them.
    assert_eq!(config.max_positions(), 64);
    assert_eq!(
        config.to_hf_json()["architectures"][0],
        "MistralForCausalLM"
    );
    check_fixture("mistral", "mistral");
}

#[test]
fn llama31_rope_scaling_of_the_prompt_fixtures_matches_transformers() {
    // An independent fixture (tests/fixtures/prompts, another generator): Llama 3.1's own
    // scaling parameters (θ 500000, original context 8192) over 64 positions.
    let name = "../prompts/llama-rope-scaling";
    let ModelConfig::Llama(config) = model::load_config(&fixture(name)).unwrap() else {
        panic!("{name} is not a llama config");
    };
    assert_eq!(
        config
            .rope_scaling
            .map(|s| s.original_max_position_embeddings),
        Some(8192)
    );
    check_fixture(name, "llama");
}

#[test]
fn mistral_of_the_prompt_fixtures_matches_transformers() {
    check_fixture("../prompts/mistral", "mistral");
}
