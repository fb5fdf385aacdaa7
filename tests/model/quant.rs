//! NF4 against bitsandbytes: `tests/fixtures/quant/nf4.json`, written by bitsandbytes
//! itself (`tests/fixtures/quant/make_nf4.py`).

use trainyard::model::quant::{NF4_CODE, quantize_nf4};

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
