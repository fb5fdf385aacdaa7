//! How a quantized base is stored: safetensors in bitsandbytes' 4-bit serialization,
//! the layout transformers writes when it saves a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True)`, so that such a directory loads in either
//! direction. A 4-bit matrix `W` is stored as
//!
//! | tensor | dtype, shape | what |
//! |---|---|---|
//! | `W` | u8 `[n/2, 1]` | two NF4 codes a byte, the earlier one in the high nibble |
//! | `W.absmax` | f32 `[blocks]` (u8 with double quantization) | each block's scale |
//! | `W.quant_map` | f32 `[16]` | the NF4 levels |
//! | `W.nested_absmax`, `W.nested_quant_map` | f32 | double quantization only |
//! | `W.quant_state.bitsandbytes__nf4` | u8 | JSON: `quant_type`, `blocksize`, `dtype`, `shape` (and `nested_*`) |
//!
//! and `config.json` carries `quantization_config` (`quant_method: bitsandbytes`).
//! ggml's `q4_0`/`q8_0` blocks, which bitsandbytes has no format for, follow the same
//! pattern under trainyard's name: `W` holds the blocks' bytes as ggml lays them out and
//! `W.quant_state.trainyard__q8_0` the JSON; the config's `quant_method` is `trainyard`,
//! which transformers refuses rather than misreads.

use serde_json::{Value, json};

use super::quant::{NESTED_BLOCK, NF4_CODE, NestedAbsmax, Nf4, QuantKind, QuantSpec, Quantized};
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ8_0, GgmlType};

/// The `config.json` key of a quantized model.
pub const CONFIG_KEY: &str = "quantization_config";

/// A stored tensor: safetensors dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    /// Its dtype.
    pub dtype: safetensors::Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// A stored tensor read in place (its shape is the quant state's business).
#[derive(Debug, Clone, Copy)]
pub struct StoredView<'a> {
    /// Its dtype.
    pub dtype: safetensors::Dtype,
    /// Its bytes.
    pub data: &'a [u8],
}

/// The `quantization_config` written for `base`.
pub fn config_entry(base: QuantSpec) -> Value {
    match base.kind {
        QuantKind::Nf4 => json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": base.double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes",
        }),
        kind => json!({ "quant_method": "trainyard", "quant_type": kind.as_str() }),
    }
}

/// What a `config.json`'s `quantization_config` says; `Ok(None)` without one, an error
/// (the message) for a quantization trainyard does not read.
pub fn read_config_entry(config: &Value) -> Result<Option<QuantSpec>, String> {
    let Some(entry) = config.get(CONFIG_KEY) else {
        return Ok(None);
    };
    let text = |key: &str| entry.get(key).and_then(Value::as_str);
    match text("quant_method") {
        Some("bitsandbytes") => {
            let four_bit = entry.get("load_in_4bit").and_then(Value::as_bool) == Some(true);
            match (four_bit, text("bnb_4bit_quant_type")) {
                (true, Some("nf4")) => Ok(Some(QuantSpec {
                    kind: QuantKind::Nf4,
                    double_quant: entry
                        .get("bnb_4bit_use_double_quant")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                })),
                (true, other) => Err(format!(
                    "bitsandbytes 4-bit type {} is not supported (trainyard reads nf4)",
                    other.unwrap_or("(none)")
                )),
                (false, _) => Err(
                    "bitsandbytes 8-bit (LLM.int8) weights are not supported (trainyard reads \
                     4-bit nf4, and its own q4_0/q8_0)"
                        .into(),
                ),
            }
        }
        Some("trainyard") => match text("quant_type") {
            Some("q4_0") => Ok(Some(QuantSpec {
                kind: QuantKind::Q4_0,
                double_quant: false,
            })),
            Some("q8_0") => Ok(Some(QuantSpec {
                kind: QuantKind::Q8_0,
                double_quant: false,
            })),
            other => Err(format!(
                "quant_type {} is not one trainyard writes (q4_0, q8_0)",
                other.unwrap_or("(none)")
            )),
        },
        other => Err(format!(
            "quant_method {} is not supported (trainyard reads bitsandbytes nf4 and its own \
             q4_0/q8_0)",
            other.unwrap_or("(none)")
        )),
    }
}

/// The name of the JSON state tensor of matrix `name` stored as `kind`.
pub fn state_name(name: &str, kind: QuantKind) -> String {
    match kind {
        QuantKind::Nf4 => format!("{name}.quant_state.bitsandbytes__nf4"),
        kind => format!("{name}.quant_state.trainyard__{}", kind.as_str()),
    }
}

/// The tensors that store `quantized`, the `[rows, cols]` matrix `name` first held in
/// `dtype` (torch's name: `bfloat16`, …); `nested` stores NF4's scales in 8 bits.
pub fn stored_tensors(
    name: &str,
    quantized: &Quantized,
    (rows, cols): (usize, usize),
    dtype: &str,
    nested: Option<&NestedAbsmax>,
) -> Vec<(String, StoredTensor)> {
    let u8_tensor = |data: Vec<u8>, shape: Vec<usize>| StoredTensor {
        dtype: safetensors::Dtype::U8,
        shape,
        data,
    };
    // A flat byte tensor: ggml blocks, the JSON state.
    let bytes_tensor = |data: Vec<u8>| {
        let len = data.len();
        u8_tensor(data, vec![len])
    };
    let f32_tensor = |values: &[f32]| StoredTensor {
        dtype: safetensors::Dtype::F32,
        shape: vec![values.len()],
        data: values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect(),
    };
    let mut state = json!({ "quant_type": kind_of(quantized).as_str() });
    let mut out = Vec::new();
    match quantized {
        Quantized::Nf4(codes) => {
            state["blocksize"] = json!(codes.block);
            out.push((
                name.to_string(),
                u8_tensor(codes.packed.clone(), vec![codes.packed.len(), 1]),
            ));
            match nested {
                Some(nested) => {
                    out.push((
                        format!("{name}.absmax"),
                        u8_tensor(nested.codes.clone(), vec![nested.codes.len()]),
                    ));
                    out.push((
                        format!("{name}.nested_absmax"),
                        f32_tensor(&nested.nested_absmax),
                    ));
                    out.push((format!("{name}.nested_quant_map"), f32_tensor(&nested.code)));
                }
                None => out.push((format!("{name}.absmax"), f32_tensor(&codes.absmax))),
            }
            out.push((format!("{name}.quant_map"), f32_tensor(&NF4_CODE)));
        }
        Quantized::Q4_0(blocks) => out.push((name.to_string(), bytes_tensor(block_bytes(blocks)))),
        Quantized::Q8_0(blocks) => out.push((name.to_string(), bytes_tensor(block_bytes(blocks)))),
    }
    state["dtype"] = json!(dtype);
    state["shape"] = json!([rows, cols]);
    if let Some(nested) = nested {
        state["nested_blocksize"] = json!(NESTED_BLOCK);
        state["nested_dtype"] = json!("float32");
        state["nested_offset"] = json!(f64::from(nested.offset));
    }
    out.push((
        state_name(name, kind_of(quantized)),
        bytes_tensor(state.to_string().into_bytes()),
    ));
    out
}

fn kind_of(quantized: &Quantized) -> QuantKind {
    match quantized {
        Quantized::Nf4(_) => QuantKind::Nf4,
        Quantized::Q4_0(_) => QuantKind::Q4_0,
        Quantized::Q8_0(_) => QuantKind::Q8_0,
    }
}

/// ggml blocks as the bytes ggml writes (`#[repr(C)]`, little-endian).
fn block_bytes<T: GgmlType>(blocks: &[T]) -> Vec<u8> {
    // SAFETY: ggml's block types are `#[repr(C)]` plain data (an f16 and bytes), so
    // their memory is exactly the bytes ggml stores, padding-free.
    let bytes = unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    };
    bytes.to_vec()
}

/// ggml blocks from their stored bytes; `None` when the length is not whole blocks.
fn blocks_from<T: GgmlType>(bytes: &[u8]) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    let mut blocks = vec![T::zeros(); bytes.len() / size];
    // SAFETY: as in `block_bytes`; every bit pattern is a valid block (an f16 and
    // integers), and `blocks` holds exactly `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            blocks.as_mut_ptr().cast::<u8>(),
            bytes.len(),
        );
    }
    Some(blocks)
}

/// The format, state tensor name and JSON state of matrix `name`; `Ok(None)` when it
/// has no state (it is not stored quantized).
fn read_state<'a>(
    name: &str,
    get: &impl Fn(&str) -> Option<StoredView<'a>>,
) -> Result<Option<(QuantKind, String, Value)>, String> {
    let Some(kind) = [QuantKind::Nf4, QuantKind::Q4_0, QuantKind::Q8_0]
        .into_iter()
        .find(|&kind| get(&state_name(name, kind)).is_some())
    else {
        return Ok(None);
    };
    let state_key = state_name(name, kind);
    let state: Value = get(&state_key)
        .map(|view| serde_json::from_slice(view.data))
        .transpose()
        .map_err(|error| format!("`{state_key}` is not JSON: {error}"))?
        .unwrap_or(Value::Null);
    Ok(Some((kind, state_key, state)))
}

/// Matrix `name` (`[rows, cols]`) restored from its stored tensors, which `get` finds by
/// name; `Ok(None)` when it is not stored quantized, an error (the message) when its
/// tensors are inconsistent.
pub fn read_matrix<'a>(
    name: &str,
    (rows, cols): (usize, usize),
    get: impl Fn(&str) -> Option<StoredView<'a>>,
) -> Result<Option<Quantized>, String> {
    let Some((kind, state_key, state)) = read_state(name, &get)? else {
        return Ok(None);
    };
    restore(name, (rows, cols), kind, (&state_key, &state), &get).map(Some)
}

/// Matrix `name` from its stored tensors and its parsed state, checked against the
/// `[rows, cols]` the caller expects.
fn restore<'a>(
    name: &str,
    (rows, cols): (usize, usize),
    kind: QuantKind,
    (state_key, state): (&str, &Value),
    get: &impl Fn(&str) -> Option<StoredView<'a>>,
) -> Result<Quantized, String> {
    let shape: Option<Vec<usize>> = state
        .get("shape")
        .and_then(|shape| serde_json::from_value(shape.clone()).ok());
    if shape.as_deref() != Some(&[rows, cols][..]) {
        return Err(format!(
            "`{state_key}` gives shape {}, the config needs [{rows}, {cols}]",
            state.get("shape").unwrap_or(&Value::Null)
        ));
    }
    let data = get(name)
        .ok_or_else(|| format!("`{name}` is missing (its quant state is there)"))?
        .data;
    let count = rows * cols;
    Ok(match kind {
        QuantKind::Nf4 => Quantized::Nf4(read_nf4(name, count, state, data, get)?),
        QuantKind::Q4_0 => Quantized::Q4_0(
            blocks_from::<BlockQ4_0>(data)
                .filter(|blocks| blocks.len() * BlockQ4_0::BLCK_SIZE == count)
                .ok_or_else(|| format!("`{name}` does not hold {count} values of q4_0"))?,
        ),
        QuantKind::Q8_0 => Quantized::Q8_0(
            blocks_from::<BlockQ8_0>(data)
                .filter(|blocks| blocks.len() * BlockQ8_0::BLCK_SIZE == count)
                .ok_or_else(|| format!("`{name}` does not hold {count} values of q8_0"))?,
        ),
    })
}

/// A quantized matrix read with what its state says of it.
#[derive(Debug, Clone)]
pub struct StoredMatrix {
    /// Its values.
    pub quantized: Quantized,
    /// `[rows, cols]`.
    pub dims: (usize, usize),
    /// The dtype it was quantized from (torch's name: `bfloat16`, …).
    pub dtype: String,
}

/// The quantized matrix `name` as stored, its shape and dtype read from its state;
/// `Ok(None)` when `name` is not stored quantized.
pub fn read_stored_matrix<'a>(
    name: &str,
    get: impl Fn(&str) -> Option<StoredView<'a>>,
) -> Result<Option<StoredMatrix>, String> {
    let Some((kind, state_key, state)) = read_state(name, &get)? else {
        return Ok(None);
    };
    let shape: Option<[usize; 2]> = state
        .get("shape")
        .and_then(|shape| serde_json::from_value(shape.clone()).ok());
    let Some([rows, cols]) = shape else {
        return Err(format!("`{state_key}` gives no 2-D shape"));
    };
    let dtype = state
        .get("dtype")
        .and_then(Value::as_str)
        .unwrap_or("float32")
        .to_string();
    Ok(Some(StoredMatrix {
        quantized: restore(name, (rows, cols), kind, (&state_key, &state), &get)?,
        dims: (rows, cols),
        dtype,
    }))
}

/// An f32 vector tensor's values.
fn f32_values(view: StoredView<'_>) -> Option<Vec<f32>> {
    (view.dtype == safetensors::Dtype::F32).then(|| {
        view.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

fn read_nf4<'a>(
    name: &str,
    count: usize,
    state: &Value,
    packed: &[u8],
    get: &impl Fn(&str) -> Option<StoredView<'a>>,
) -> Result<Nf4, String> {
    let block = state
        .get("blocksize")
        .and_then(Value::as_u64)
        .map(|block| block as usize)
        .filter(|&block| block > 0)
        .ok_or_else(|| format!("`{name}`'s quant state has no blocksize"))?;
    let quant_map = get(&format!("{name}.quant_map")).and_then(f32_values);
    if quant_map.as_deref().is_some_and(|map| map != NF4_CODE) {
        return Err(format!(
            "`{name}.quant_map` is not bitsandbytes' NF4 code (only nf4 is read)"
        ));
    }
    if packed.len() != count.div_ceil(2) {
        return Err(format!(
            "`{name}` holds {} bytes, {count} NF4 values need {}",
            packed.len(),
            count.div_ceil(2)
        ));
    }
    let blocks = count.div_ceil(block);
    let absmax_key = format!("{name}.absmax");
    let stored = get(&absmax_key).ok_or_else(|| format!("`{absmax_key}` is missing"))?;
    let absmax = match stored.dtype {
        safetensors::Dtype::F32 => f32_values(stored).unwrap_or_default(),
        safetensors::Dtype::U8 => {
            let nested_absmax = get(&format!("{name}.nested_absmax"))
                .and_then(f32_values)
                .ok_or_else(|| format!("`{name}.nested_absmax` (f32) is missing"))?;
            let code = get(&format!("{name}.nested_quant_map"))
                .and_then(f32_values)
                .filter(|code| code.len() == 256)
                .ok_or_else(|| format!("`{name}.nested_quant_map` (256 f32) is missing"))?;
            let nested_block = state.get("nested_blocksize").and_then(Value::as_u64);
            let offset = state.get("nested_offset").and_then(Value::as_f64);
            let (Some(nested_block), Some(offset)) = (nested_block, offset) else {
                return Err(format!(
                    "`{name}`'s quant state lacks nested_blocksize or nested_offset"
                ));
            };
            if nested_block as usize != NESTED_BLOCK
                || nested_absmax.len() != blocks.div_ceil(NESTED_BLOCK)
            {
                return Err(format!(
                    "`{name}`: nested blocks of {nested_block} with {} scales for {blocks} \
                     blocks (trainyard reads blocks of {NESTED_BLOCK})",
                    nested_absmax.len()
                ));
            }
            NestedAbsmax {
                codes: stored.data.to_vec(),
                nested_absmax,
                offset: offset as f32,
                code,
            }
            .restore()
        }
        other => return Err(format!("`{absmax_key}` is {other:?}, not f32 or u8")),
    };
    if absmax.len() != blocks {
        return Err(format!(
            "`{absmax_key}` holds {} scales, {count} values in blocks of {block} need {blocks}",
            absmax.len()
        ));
    }
    Ok(Nf4 {
        packed: packed.to_vec(),
        absmax,
        len: count,
        block,
    })
}

/// Whether `name` is one of the tensors that store a quantized matrix, other than the
/// codes themselves.
pub fn is_quant_part(name: &str) -> bool {
    [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
    ]
    .iter()
    .any(|suffix| name.ends_with(suffix))
        || name.contains(".quant_state.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::quantize_spec;

    /// Every kind (and NF4 with double quantization) reads back from the tensors it is
    /// stored as to the same restored values; a wrong shape is refused.
    #[test]
    fn stored_matrices_read_back_to_the_same_values() {
        let (rows, cols) = (6, 64);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let specs = [
            (QuantKind::Nf4, false),
            (QuantKind::Nf4, true),
            (QuantKind::Q4_0, false),
            (QuantKind::Q8_0, false),
        ];
        for (kind, double_quant) in specs {
            let spec = QuantSpec { kind, double_quant };
            let (quantized, nested) = quantize_spec(spec, &values, cols).unwrap();
            let stored = stored_tensors("w", &quantized, (rows, cols), "bfloat16", nested.as_ref());
            let get = |key: &str| {
                stored
                    .iter()
                    .find(|(name, _)| name == key)
                    .map(|(_, tensor)| StoredView {
                        dtype: tensor.dtype,
                        data: &tensor.data,
                    })
            };
            let read = read_stored_matrix("w", get).unwrap().unwrap();
            assert_eq!((read.dims, read.dtype.as_str()), ((rows, cols), "bfloat16"));
            let (mut want, mut got) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
            quantized.dequantize_into(0, &mut want);
            read.quantized.dequantize_into(0, &mut got);
            assert_eq!(want, got, "{spec:?}");
            assert!(read_matrix("w", (cols, rows), get).is_err(), "{spec:?}");
            assert!(read_matrix("v", (rows, cols), get).unwrap().is_none());
        }
    }
}
