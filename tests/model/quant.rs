//! NF4 against bitsandbytes: `tests/fixtures/quant/nf4.json`, written by bitsandbytes
//! itself (`tests/fixtures/quant/make_nf4.py`).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use trainyard::model::Kernels;
use trainyard::model::quant::{NF4_CODE, quantize_nf4};

use crate::common::Sandbox;

#[derive(serde::Deserialize)]
struct Fixture {
    block: usize,
    code: Vec<f32>,
    values: Vec<f32>,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dequantized: Vec<f32>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant/nf4.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn nf4_codes_scales_and_restored_values_are_bitsandbytes_own() {
    let fixture = fixture();
    assert_eq!(NF4_CODE.to_vec(), fixture.code, "the level table");
    let quantized = quantize_nf4(&fixture.values, fixture.block);
    assert_eq!(quantized.absmax, fixture.absmax, "block scales");
    for (index, (ours, theirs)) in quantized.packed.iter().zip(&fixture.packed).enumerate() {
        assert_eq!(
            ours,
            theirs,
            "byte {index} (values {} and {}: {} and {})",
            2 * index,
            2 * index + 1,
            fixture.values[2 * index],
            fixture.values.get(2 * index + 1).copied().unwrap_or(0.0)
        );
    }
    assert_eq!(quantized.packed.len(), fixture.packed.len());
    assert_eq!(
        quantized.dequantize(),
        fixture.dequantized,
        "restored values"
    );
}

/// `tests/fixtures/quant/bnb-4bit/`: a tiny random Qwen2 as bf16 shards, as transformers
/// and bitsandbytes save it in 4 bits (with and without double quantization), and the
/// logits transformers computes with each (`make_bnb_4bit.py`).
fn bnb_fixture(part: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant/bnb-4bit")
        .join(part)
}

/// The tensors of a safetensors file, by name: dtype, shape and bytes.
fn stored(path: &std::path::Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let key = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            (name, key)
        })
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A `quantize` stage writes the tensors transformers + bitsandbytes save for the same
/// weights: the same names, codes and scales (and with `double_quant`, the same nested
/// code and 8-bit scales), and a `quantization_config` that says what they are.
#[test]
fn the_quantize_stage_writes_bitsandbytes_own_4bit_checkpoint() {
    let sandbox = Sandbox::new();
    let base = bnb_fixture("base");
    sandbox.write(
        "p.yaml",
        &format!(
            "name: q
stages:
  nf4: {{ kind: quantize, inputs: {{ model: {base} }} }}
  nf4-dq: {{ kind: quantize, inputs: {{ model: {base} }}, with: {{ double_quant: true }} }}
",
            base = base.display()
        ),
    );
    sandbox.ok(&["run", "p.yaml"]);
    for variant in ["nf4", "nf4-dq"] {
        let ours =
            stored(&sandbox.path(&format!("runs/latest/outputs/{variant}/model.safetensors")));
        let theirs = stored(&bnb_fixture(variant).join("model.safetensors"));
        let names = |map: &BTreeMap<String, _>| map.keys().cloned().collect::<Vec<String>>();
        assert_eq!(names(&ours), names(&theirs), "{variant}: tensor names");
        for (name, (dtype, shape, data)) in &theirs {
            let (our_dtype, our_shape, our_data) = &ours[name];
            if name.ends_with(".nested_quant_map") {
                for (ours, theirs) in f32s(our_data).iter().zip(f32s(data)) {
                    assert!((ours - theirs).abs() <= 1e-7, "{name}: {ours} vs {theirs}");
                }
            } else if name.contains(".quant_state.") {
                let mut state: serde_json::Value = serde_json::from_slice(data).unwrap();
                let ours: serde_json::Value = serde_json::from_slice(our_data).unwrap();
                // bitsandbytes records the dtype it quantized from: the fixture loaded the
                // bf16 weights as f32 first.
                assert_eq!(ours["dtype"], "bfloat16", "{variant} {name}");
                state["dtype"] = ours["dtype"].clone();
                assert_eq!(ours, state, "{variant} {name}");
            } else if name.contains("proj.weight") || dtype == "U8" {
                assert_eq!((our_dtype, our_shape), (dtype, shape), "{variant} {name}");
                assert!(our_data == data, "{variant} {name}: bytes differ");
            } else {
                // Copied as stored (bf16 here); the fixture holds them widened to f32.
                assert_eq!(our_shape, shape, "{variant} {name}");
            }
        }
        let config: serde_json::Value = serde_json::from_str(
            &sandbox.read(&format!("runs/latest/outputs/{variant}/config.json")),
        )
        .unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(bnb_fixture(variant).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["quantization_config"], expected["quantization_config"],
            "{variant}"
        );
    }
    // Exported as it is, a quantized directory would be u8 codes posing as weights.
    sandbox.write(
        "export.yaml",
        &format!(
            "name: e
stages:
  out: {{ kind: export, inputs: {{ model: {} }}, with: {{ gguf: [] }} }}
",
            bnb_fixture("nf4").display()
        ),
    );
    let error = sandbox.fails(&["run", "export.yaml"]);
    assert!(
        error.contains("quantization_config") && error.contains("qlora"),
        "{error}"
    );
}

/// bitsandbytes' 4-bit checkpoints load as QLoRA bases: a fresh (zero) adapter on them
/// gives the logits transformers computes with the same files.
#[test]
fn bitsandbytes_4bit_checkpoints_give_transformers_logits() {
    #[derive(serde::Deserialize)]
    struct Logits {
        input_ids: Vec<Vec<u32>>,
        logits: BTreeMap<String, Vec<Vec<f32>>>,
    }
    let expected: Logits =
        serde_json::from_str(&std::fs::read_to_string(bnb_fixture("logits.json")).unwrap())
            .unwrap();
    for (variant, rows) in &expected.logits {
        let dir = bnb_fixture(variant);
        let quant = trainyard::model::quantized_base(&dir).unwrap();
        assert!(quant.is_some(), "{variant} reads as quantized");
        let spec = trainyard::model::lora::LoraSpec {
            quant,
            ..trainyard::model::lora::LoraSpec::from_adapter_config(&serde_json::json!({
                "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]
            }))
            .unwrap()
        };
        let (model, _, _) =
            trainyard::model::new_lora(&dir, &spec, DType::F32, &Device::Cpu, 1).unwrap();
        let ids = Tensor::new(expected.input_ids.clone(), &Device::Cpu).unwrap();
        let logits = model
            .forward(&ids, None, Kernels::Differentiable)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let worst = logits
            .iter()
            .flatten()
            .zip(rows.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{variant}: logits differ by {worst}");
        // A full-precision loader refuses the directory rather than misreading it.
        let error = trainyard::model::load_pretrained(&dir, DType::F32, &Device::Cpu)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(error.contains("qlora"), "{variant}: {error}");
    }
}

/// Double quantization's code is bitsandbytes' dynamic map, and scales restored from it
/// are those bitsandbytes restores.
#[test]
fn double_quantized_scales_restore_as_bitsandbytes_restores_them() {
    let theirs = stored(&bnb_fixture("nf4-dq").join("model.safetensors"));
    let name = "model.layers.0.mlp.down_proj.weight";
    let code = f32s(&theirs[&format!("{name}.nested_quant_map")].2);
    // torch computed bitsandbytes' table; ours rounds a few entries the other way.
    for (ours, theirs) in trainyard::model::quant::dynamic_code().iter().zip(&code) {
        assert!((ours - theirs).abs() <= 1e-7, "{ours} vs {theirs}");
    }
    let plain = stored(&bnb_fixture("nf4").join("model.safetensors"));
    let exact = f32s(&plain[&format!("{name}.absmax")].2);
    let nested = trainyard::model::quant::NestedAbsmax::compress_with(&exact, &code);
    assert_eq!(
        nested.codes,
        theirs[&format!("{name}.absmax")].2,
        "8-bit scales"
    );
    assert_eq!(
        nested.nested_absmax,
        f32s(&theirs[&format!("{name}.nested_absmax")].2)
    );
    for (ours, exact) in nested.restore().iter().zip(&exact) {
        assert!((ours - exact).abs() <= 0.02 * exact, "{ours} vs {exact}");
    }
}
