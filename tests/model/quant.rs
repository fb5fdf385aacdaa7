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

/// The quantized model directory `ours` holds what bitsandbytes' `theirs` holds: the same
/// tensor names, codes and scales (the nested code within 1e-7: torch computes a few of
/// its entries otherwise), the same JSON states but for the source dtype, and the same
/// `quantization_config`.
fn assert_same_4bit_checkpoint(ours_dir: &std::path::Path, theirs_dir: &std::path::Path) {
    let variant = theirs_dir.display();
    let ours = stored(&ours_dir.join("model.safetensors"));
    let theirs = stored(&theirs_dir.join("model.safetensors"));
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
        } else if name.ends_with(".absmax") && dtype == "U8" {
            // Double quantization's 8-bit scales: ours are the nearest level of the
            // dynamic code. bitsandbytes' CPU kernel (a BinSearch "Direct2" lookup)
            // misses the nearest level for about 0.1% of values (1 of 640 here; a sweep
            // of 2^20 uniform values: 938), always by one level.
            assert_eq!((our_dtype, our_shape), (dtype, shape), "{variant} {name}");
            let steps: Vec<i32> = our_data
                .iter()
                .zip(data)
                .map(|(ours, theirs)| i32::from(*ours) - i32::from(*theirs))
                .collect();
            let off = steps.iter().filter(|step| **step != 0).count();
            assert!(
                steps.iter().all(|step| step.abs() <= 1) && off * 100 <= steps.len(),
                "{variant} {name}: {off} of {} 8-bit scales differ",
                steps.len()
            );
        } else if dtype == "U8" || our_dtype == "U8" {
            assert_eq!((our_dtype, our_shape), (dtype, shape), "{variant} {name}");
            assert!(our_data == data, "{variant} {name}: bytes differ");
        } else {
            // Copied as stored (bf16 here); the fixture holds them widened to f32.
            assert_eq!(our_shape, shape, "{variant} {name}");
        }
    }
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(
        config(ours_dir)["quantization_config"],
        config(theirs_dir)["quantization_config"],
        "{variant}"
    );
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
        assert_same_4bit_checkpoint(
            &sandbox.path(&format!("runs/latest/outputs/{variant}")),
            &bnb_fixture(variant),
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
        let worst = logits_diff(&model, &expected.input_ids[0], rows);
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

/// `tests/fixtures/quant/gpt2-4bit/`: a tiny random GPT-2 (Conv1D layers) as bf16, as
/// transformers + bitsandbytes save it in NF4 with double quantization, a PEFT LoRA
/// adapter on it, and transformers' logits for each (`make_gpt2_4bit.py`).
fn gpt2_fixture(part: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant/gpt2-4bit")
        .join(part)
}

/// The largest difference between `model`'s logits for `ids` (one row) and `expected`.
fn logits_diff(model: &trainyard::model::CausalLm, ids: &[u32], expected: &[Vec<f32>]) -> f32 {
    let ids = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&ids, None, Kernels::Differentiable)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(logits.len(), expected.len());
    logits
        .iter()
        .flatten()
        .zip(expected.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// GPT-2's Conv1D layers (`[in, out]` weights) under LoRA and QLoRA, against PEFT and
/// bitsandbytes: the quantize stage writes bitsandbytes' codes of the transposed weights;
/// a PEFT adapter (`fan_in_fan_out`) gives PEFT's logits on the bf16 base and on the
/// restored NF4 weights; merged (`W + s·(B·A)ᵀ`) it gives PEFT's merged model's.
#[test]
fn gpt2_conv1d_layers_take_peft_adapters_and_bitsandbytes_codes() {
    #[derive(serde::Deserialize)]
    struct Logits {
        input_ids: Vec<Vec<u32>>,
        logits: BTreeMap<String, Vec<Vec<f32>>>,
    }
    let expected: Logits =
        serde_json::from_str(&std::fs::read_to_string(gpt2_fixture("logits.json")).unwrap())
            .unwrap();
    let ids = &expected.input_ids[0];
    let (base, adapter) = (gpt2_fixture("base"), gpt2_fixture("adapter"));

    // The quantize stage quantizes each Conv1D weight's transpose, as bitsandbytes does;
    // lora-merge folds the adapter into the restored weights.
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        &format!(
            "name: q
stages:
  nf4-dq: {{ kind: quantize, inputs: {{ model: {base} }}, with: {{ double_quant: true }} }}
  merged: {{ kind: lora-merge, inputs: {{ base: {base}, adapter: {adapter} }} }}
  merged-dq:
    kind: lora-merge
    inputs: {{ base: nf4-dq, adapter: {adapter} }}
    with: {{ merge_into: dequantized }}
",
            base = base.display(),
            adapter = adapter.display()
        ),
    );
    sandbox.ok(&["run", "p.yaml"]);
    let output = |stage: &str| sandbox.path(&format!("runs/latest/outputs/{stage}"));
    assert_same_4bit_checkpoint(&output("nf4-dq"), &gpt2_fixture("nf4-dq"));

    // PEFT's adapter on the full-precision base, and on bitsandbytes' NF4 files (QLoRA).
    let (with_adapter, _) =
        trainyard::model::load_lora(&base, &adapter, DType::F32, &Device::Cpu).unwrap();
    let diff = logits_diff(&with_adapter, ids, &expected.logits["base_adapter"]);
    assert!(diff < 1e-4, "base + adapter: {diff}");
    for quantized in [gpt2_fixture("nf4-dq"), output("nf4-dq")] {
        let (qlora, _) =
            trainyard::model::load_lora(&quantized, &adapter, DType::F32, &Device::Cpu).unwrap();
        let diff = logits_diff(&qlora, ids, &expected.logits["nf4_adapter"]);
        assert!(
            diff < 1e-4,
            "{}: NF4 + adapter: {diff}",
            quantized.display()
        );
    }

    // Merged in f32, PEFT's merge_and_unload's logits; the stage stores bf16 (the
    // base's dtype), which rounds W + s·(B·A)ᵀ.
    let spec = trainyard::model::read_adapter_spec(&adapter)
        .unwrap()
        .for_family(true);
    let tensors = |path: std::path::PathBuf| {
        candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.to_dtype(DType::F32).unwrap()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let merged = trainyard::model::lora::merge(
        &tensors(base.join("model.safetensors")),
        &tensors(adapter.join("adapter_model.safetensors")),
        &spec,
    )
    .unwrap();
    let config = trainyard::model::load_config(&base).unwrap();
    let model = trainyard::model::CausalLm::new(
        &config,
        candle_nn::VarBuilder::from_tensors(merged.into_iter().collect(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    let diff = logits_diff(&model, ids, &expected.logits["merged"]);
    assert!(diff < 1e-4, "merged in f32: {diff}");
    let scale = expected.logits["merged"]
        .iter()
        .flatten()
        .fold(0f32, |m, v| m.max(v.abs()));
    for (stage, want) in [("merged", "merged"), ("merged-dq", "nf4_adapter")] {
        let (model, _) =
            trainyard::model::load_pretrained(&output(stage), DType::F32, &Device::Cpu).unwrap();
        let diff = logits_diff(&model, ids, &expected.logits[want]);
        assert!(
            diff < 2e-2 * scale,
            "{stage}: {diff} (logits up to {scale})"
        );
    }
    // Without fan_in_fan_out the update is not transposed, and the first Conv1D met
    // (c_attn, [64, 192] against B·A's [192, 64]) refuses it.
    let wrong = trainyard::model::lora::merge(
        &tensors(base.join("model.safetensors")),
        &tensors(adapter.join("adapter_model.safetensors")),
        &spec.clone().for_family(false),
    );
    assert!(
        wrong.is_err(),
        "c_attn's [64, 192] weight cannot take a [192, 64] update"
    );
}
