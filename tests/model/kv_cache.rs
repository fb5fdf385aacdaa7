//! The inference path: feeding a sequence through the kv cache in pieces — a prompt,
//! then one token at a time — gives the logits of the training forward over the whole
//! sequence, and so transformers' logits, for every family's transformers-made fixture.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use trainyard::model::{self, CausalLm, Kernels};

/// Largest absolute logit difference accepted.
const TOLERANCE: f32 = 1e-4;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(family)
}

/// The fixture's input ids (2 × 7) and transformers' logits for them, flattened.
fn expected(family: &str) -> (Vec<Vec<u32>>, Vec<f32>) {
    let path = fixture(family).join("logits.json");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(value["input_ids"].clone()).unwrap();
    let logits: Vec<Vec<Vec<f32>>> = serde_json::from_value(value["logits"].clone()).unwrap();
    (ids, logits.into_iter().flatten().flatten().collect())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

/// Feeds `ids` through a fresh cache in pieces of the given lengths with `kernels` and
/// concatenates the logits along the sequence.
fn cached_logits(model: &CausalLm, ids: &Tensor, pieces: &[usize], kernels: Kernels) -> Tensor {
    let mut cache = model.new_cache();
    let mut start = 0;
    let mut parts = Vec::new();
    for &len in pieces {
        assert_eq!(cache.len(), start);
        let piece = ids.narrow(1, start, len).unwrap();
        parts.push(model.forward(&piece, Some(&mut cache), kernels).unwrap());
        start += len;
    }
    assert_eq!(start, ids.dim(1).unwrap(), "the pieces cover the sequence");
    assert_eq!(cache.len(), start);
    Tensor::cat(&parts, 1).unwrap()
}

fn check_cached_matches_full_forward(family: &str) {
    let (ids, transformers) = expected(family);
    let (model, _) = model::load_pretrained(&fixture(family), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let full = model.forward(&ids, None, Kernels::Differentiable).unwrap();
    let transformers = Tensor::from_vec(transformers, full.shape(), &Device::Cpu).unwrap();
    // Generation takes the inference kernels; the differentiable ones accept a cache too.
    for kernels in [Kernels::Inference, Kernels::Differentiable] {
        for pieces in [
            &[3, 1, 1, 1, 1][..],
            &[1, 1, 1, 1, 1, 1, 1],
            &[2, 3, 2],
            &[7],
        ] {
            let cached = cached_logits(&model, &ids, pieces, kernels);
            let diff = max_abs_diff(&cached, &full);
            assert!(
                diff <= TOLERANCE,
                "{family}, {kernels:?}, pieces {pieces:?}: cached logits differ from the full forward by {diff:e}"
            );
            let diff = max_abs_diff(&cached, &transformers);
            assert!(
                diff <= TOLERANCE,
                "{family}, {kernels:?}, pieces {pieces:?}: cached logits differ from transformers' by {diff:e}"
            );
        }
    }
}

#[test]
fn llama_cached_step_by_step_logits_equal_the_full_forward() {
    check_cached_matches_full_forward("llama");
}

#[test]
fn qwen2_cached_step_by_step_logits_equal_the_full_forward() {
    check_cached_matches_full_forward("qwen2");
}

#[test]
fn gpt2_cached_step_by_step_logits_equal_the_full_forward() {
    check_cached_matches_full_forward("gpt2");
}

#[test]
fn a_cleared_cache_starts_again_at_position_zero() {
    let (ids, _) = expected("llama");
    let (model, _) = model::load_pretrained(&fixture("llama"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let first = model
        .forward(&ids, Some(&mut cache), Kernels::Inference)
        .unwrap();
    cache.clear();
    assert!(cache.is_empty());
    let again = model
        .forward(&ids, Some(&mut cache), Kernels::Inference)
        .unwrap();
    assert_eq!(max_abs_diff(&first, &again), 0.0);
}

#[test]
fn gpt2_refuses_positions_past_n_positions() {
    let (model, config) =
        model::load_pretrained(&fixture("gpt2"), DType::F32, &Device::Cpu).unwrap();
    let limit = config.max_positions();
    let mut cache = model.new_cache();
    let ids = Tensor::zeros((1, limit), DType::U32, &Device::Cpu).unwrap();
    model
        .forward(&ids, Some(&mut cache), Kernels::Inference)
        .unwrap();
    let one = Tensor::zeros((1, 1), DType::U32, &Device::Cpu).unwrap();
    let error = model
        .forward(&one, Some(&mut cache), Kernels::Inference)
        .unwrap_err();
    assert!(error.to_string().contains("n_positions"), "{error}");
}
