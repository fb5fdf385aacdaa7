//! Block-wise 4-bit quantization of frozen weights, the base of QLoRA: NF4 ("4-bit
//! NormalFloat", Dettmers et al. 2023) exactly as bitsandbytes computes it, so that a
//! quantized base means the same numbers here as under PEFT + bitsandbytes.
//!
//! Each block of [`NF4_BLOCK`] consecutive values keeps its absolute maximum (f32) and
//! one 4-bit code per value: the index of the nearest of the sixteen [`NF4_CODE`] levels
//! to `value / absmax`. Two codes share a byte, the first in the high nibble. Following
//! bitsandbytes' reference (`backends/default/ops.py`, `quantize_4bit`), a value exactly
//! halfway between two levels takes the lower one, whole blocks are scaled by the
//! reciprocal of their absmax and a last partial block by dividing by it; restoring is
//! `code[q] · absmax` in f32.
//!
//! `q4_0` and `q8_0` are ggml's blocks of 32 (llama.cpp's formats, candle's code): one
//! f16 scale and 4- or 8-bit integers. [`Quantized`] holds any of the three and restores
//! ranges of whole rows.

use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ8_0, GgmlType};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a QLoRA base's projections are held (the `quant` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum QuantKind {
    /// bitsandbytes' 4-bit NormalFloat, blocks of 64 (QLoRA's).
    #[default]
    #[serde(rename = "nf4")]
    Nf4,
    /// ggml's 4-bit blocks of 32 with an f16 scale.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// ggml's 8-bit blocks of 32 with an f16 scale.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl QuantKind {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantKind::Nf4 => "nf4",
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q8_0 => "q8_0",
        }
    }
}

/// How a base's projections are quantized: the format and, for NF4, whether the block
/// scales are quantized too (QLoRA's double quantization).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuantSpec {
    /// The format.
    pub kind: QuantKind,
    /// NF4 only: block scales in 8 bits ([`NestedAbsmax`]).
    pub double_quant: bool,
}

/// `values` (rows of `cols`) quantized as `spec` says, with the compressed scales when
/// it asks for double quantization: the returned NF4 then holds the scales as they are
/// restored from those, the numbers bitsandbytes computes with.
pub fn quantize_spec(
    spec: QuantSpec,
    values: &[f32],
    cols: usize,
) -> Result<(Quantized, Option<NestedAbsmax>), QuantError> {
    let mut quantized = quantize(spec.kind, values, cols)?;
    let nested = match (&mut quantized, spec.double_quant) {
        (Quantized::Nf4(codes), true) => {
            let nested = NestedAbsmax::compress(&codes.absmax);
            codes.absmax = nested.restore();
            Some(nested)
        }
        _ => None,
    };
    Ok((quantized, nested))
}

/// Why a matrix cannot be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// ggml's blocks run along rows and cannot straddle two.
    #[error(
        "{kind} quantizes rows in blocks of 32 values; rows of {cols} are not a multiple of 32 (use nf4)"
    )]
    RaggedRows {
        /// `q4_0` or `q8_0`.
        kind: &'static str,
        /// The row length.
        cols: usize,
    },
}

/// A matrix's values in one of the [`QuantKind`]s.
#[derive(Debug, Clone)]
pub enum Quantized {
    /// NF4 codes and block scales.
    Nf4(Nf4),
    /// ggml q4_0 blocks.
    Q4_0(Vec<BlockQ4_0>),
    /// ggml q8_0 blocks.
    Q8_0(Vec<BlockQ8_0>),
}

/// Values per ggml block.
const GGML_BLOCK: usize = 32;

/// `values` (rows of `cols`) quantized as `kind`.
pub fn quantize(kind: QuantKind, values: &[f32], cols: usize) -> Result<Quantized, QuantError> {
    fn blocks<T: GgmlType>(values: &[f32]) -> Vec<T> {
        let mut out = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut out);
        out
    }
    if kind != QuantKind::Nf4 && !cols.is_multiple_of(GGML_BLOCK) {
        return Err(QuantError::RaggedRows {
            kind: kind.as_str(),
            cols,
        });
    }
    Ok(match kind {
        QuantKind::Nf4 => Quantized::Nf4(quantize_nf4(values, NF4_BLOCK)),
        QuantKind::Q4_0 => Quantized::Q4_0(blocks(values)),
        QuantKind::Q8_0 => Quantized::Q8_0(blocks(values)),
    })
}

impl Quantized {
    /// Values `start..start + out.len()` restored into `out`; for the ggml kinds both
    /// ends fall on block edges (whole rows do).
    ///
    /// # Panics
    /// If the range goes past the end, or (ggml kinds) cuts a block.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        fn blocks<T: GgmlType>(blocks: &[T], start: usize, out: &mut [f32]) {
            assert!(
                start.is_multiple_of(T::BLCK_SIZE) && out.len().is_multiple_of(T::BLCK_SIZE),
                "values {start}..{} cut a block of {}",
                start + out.len(),
                T::BLCK_SIZE
            );
            let first = start / T::BLCK_SIZE;
            T::to_float(&blocks[first..first + out.len() / T::BLCK_SIZE], out);
        }
        match self {
            Quantized::Nf4(codes) => codes.dequantize_into(start, out),
            Quantized::Q4_0(q) => blocks(q, start, out),
            Quantized::Q8_0(q) => blocks(q, start, out),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Quantized::Nf4(codes) => codes.bytes(),
            Quantized::Q4_0(q) => std::mem::size_of_val(q.as_slice()),
            Quantized::Q8_0(q) => std::mem::size_of_val(q.as_slice()),
        }
    }
}

/// The sixteen NF4 levels, bitsandbytes' table (quantiles of a standard normal,
/// normalised to [-1, 1], with an exact zero).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per NF4 block, QLoRA's (and bitsandbytes' default for 4-bit weights).
pub const NF4_BLOCK: usize = 64;

/// Values quantized to NF4, block by block.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// Two codes a byte, the earlier value in the high nibble.
    pub packed: Vec<u8>,
    /// Each block's absolute maximum.
    pub absmax: Vec<f32>,
    /// How many values (the last block may be partial).
    pub len: usize,
    /// Values per block.
    pub block: usize,
}

/// The fifteen boundaries between adjacent levels, halfway, computed in f32 as
/// bitsandbytes does.
fn boundaries() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The code of a scaled value in [-1, 1]: how many boundaries lie below it (a value on a
/// boundary takes the lower level).
fn code_of(scaled: f32, bounds: &[f32; 15]) -> u8 {
    bounds.iter().take_while(|&&bound| bound < scaled).count() as u8
}

/// `values` in NF4 with blocks of `block` values (`block` > 0).
///
/// # Panics
/// If `block` is 0.
pub fn quantize_nf4(values: &[f32], block: usize) -> Nf4 {
    assert!(block > 0, "an NF4 block holds at least one value");
    let bounds = boundaries();
    let mut codes = Vec::with_capacity(values.len() + 1);
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let max = chunk.iter().fold(0f32, |max, value| max.max(value.abs()));
        let scale = max.max(1e-38);
        if chunk.len() == block {
            let inverse = 1.0 / scale;
            codes.extend(
                chunk
                    .iter()
                    .map(|value| code_of((value * inverse).clamp(-1.0, 1.0), &bounds)),
            );
            absmax.push(max);
        } else {
            codes.extend(
                chunk
                    .iter()
                    .map(|value| code_of((value / scale).clamp(-1.0, 1.0), &bounds)),
            );
            absmax.push(scale);
        }
    }
    if !codes.len().is_multiple_of(2) {
        codes.push(code_of(0.0, &bounds));
    }
    Nf4 {
        packed: codes
            .chunks_exact(2)
            .map(|pair| (pair[0] << 4) | pair[1])
            .collect(),
        absmax,
        len: values.len(),
        block,
    }
}

impl Nf4 {
    /// Every value restored.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        self.dequantize_into(0, &mut out);
        out
    }

    /// Values `start..start + out.len()` restored into `out` (a tile of a matrix: the
    /// rows a product needs, never the whole of it).
    ///
    /// # Panics
    /// If the range goes past the last value.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        assert!(
            start + out.len() <= self.len,
            "values {start}..{} of {}",
            start + out.len(),
            self.len
        );
        // Block by block: one scale each, codes two a byte.
        let mut index = start;
        let mut rest = out;
        while !rest.is_empty() {
            let block = index / self.block;
            let take = (self.block - index % self.block).min(rest.len());
            let (run, tail) = rest.split_at_mut(take);
            let scale = self.absmax[block];
            let level = |code: u8| NF4_CODE[usize::from(code)] * scale;
            // An odd first value is its byte's low nibble; then whole bytes.
            let mut at = index;
            let mut values = &mut run[..];
            if !at.is_multiple_of(2) {
                values[0] = level(self.packed[at / 2] & 0x0f);
                values = &mut values[1..];
                at += 1;
            }
            let bytes = &self.packed[at / 2..];
            let count = values.len();
            let mut pairs = values.chunks_exact_mut(2);
            for (pair, byte) in (&mut pairs).zip(bytes) {
                pair[0] = level(byte >> 4);
                pair[1] = level(byte & 0x0f);
            }
            if let [last] = pairs.into_remainder() {
                *last = level(bytes[(count - 1) / 2] >> 4);
            }
            index += take;
            rest = tail;
        }
    }

    /// Bytes held: codes and scales.
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len()
    }
}

/// Scales per block of double quantization (bitsandbytes' `nested_blocksize`).
pub const NESTED_BLOCK: usize = 256;

/// bitsandbytes' signed 8-bit "dynamic" code (`create_dynamic_map(signed=True)`):
/// for each decade `10^-6 … 10^0`, the midpoints of `2^i + 1` points evenly spaced in
/// [0.1, 1] times the decade, both signs, then 0 and 1, sorted; computed in f32 as torch
/// does (`linspace`, the midpoints and the products), so the table is bit for bit the
/// one bitsandbytes saves as `nested_quant_map`.
pub fn dynamic_code() -> [f32; 256] {
    let mut code: Vec<f32> = Vec::with_capacity(256);
    for exponent in 0..7 {
        let items = (1usize << exponent) + 1;
        // torch.linspace(0.1, 1, items) in f32: start + i·step up to the middle, then from
        // the end back.
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (items - 1) as f32;
        let point = |i: usize| {
            if i < items / 2 {
                start + step * i as f32
            } else {
                end - step * (items - 1 - i) as f32
            }
        };
        let scale = 10f64.powi(exponent - 6);
        for i in 0..items - 1 {
            let mean = (point(i) + point(i + 1)) / 2.0;
            code.push(scale as f32 * mean);
            code.push(-scale as f32 * mean);
        }
    }
    code.push(0.0);
    code.push(1.0);
    code.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&code);
    out
}

/// Block scales stored in 8 bits (QLoRA's double quantization): the scales less their
/// mean, quantized block-wise with [`dynamic_code`], [`NESTED_BLOCK`] a block.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One code per scale.
    pub codes: Vec<u8>,
    /// Each block's absolute maximum of the centred scales.
    pub nested_absmax: Vec<f32>,
    /// The mean subtracted before quantizing.
    pub offset: f32,
    /// The code the codes index.
    pub code: Vec<f32>,
}

impl NestedAbsmax {
    /// `absmax` compressed as bitsandbytes' `quantize_4bit(compress_statistics=True)`
    /// does: nearest code to `(scale - mean) / block absmax`, ties to the lower one.
    pub fn compress(absmax: &[f32]) -> NestedAbsmax {
        NestedAbsmax::compress_with(absmax, &dynamic_code())
    }

    /// [`NestedAbsmax::compress`] with another sorted 256-entry `code` (bitsandbytes
    /// computes its table at run time with torch, whose `linspace` may round the last bit
    /// differently from one CPU to another; the table is saved with the scales).
    pub fn compress_with(absmax: &[f32], code: &[f32]) -> NestedAbsmax {
        let mean =
            absmax.iter().map(|&value| f64::from(value)).sum::<f64>() / absmax.len().max(1) as f64;
        let offset = mean as f32;
        let mut codes = Vec::with_capacity(absmax.len());
        let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
        for block in absmax.chunks(NESTED_BLOCK) {
            let centred: Vec<f32> = block.iter().map(|&value| value - offset).collect();
            let max = centred.iter().fold(0f32, |max, value| max.max(value.abs()));
            nested_absmax.push(max);
            codes.extend(centred.iter().map(|&value| nearest_code(code, value / max)));
        }
        NestedAbsmax {
            codes,
            nested_absmax,
            offset,
            code: code.to_vec(),
        }
    }

    /// The scales as bitsandbytes restores them: `code[q] · nested absmax + offset`, in
    /// f32.
    pub fn restore(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(index, &q)| {
                self.code[usize::from(q)] * self.nested_absmax[index / NESTED_BLOCK] + self.offset
            })
            .collect()
    }
}

/// The index of the entry of the sorted `code` nearest to `value`: the last entry not
/// above it, or the next one when that is strictly closer (bitsandbytes' CPU search).
fn nearest_code(code: &[f32], value: f32) -> u8 {
    let below = code
        .partition_point(|&level| level <= value)
        .saturating_sub(1);
    let index = match code.get(below + 1) {
        Some(&next) if (value - next).abs() < (value - code[below]).abs() => below + 1,
        _ => below,
    };
    index as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_and_ties_take_the_lower_level() {
        let bounds = boundaries();
        for (index, level) in NF4_CODE.iter().enumerate() {
            assert_eq!(usize::from(code_of(*level, &bounds)), index);
        }
        for (index, bound) in bounds.iter().enumerate() {
            assert_eq!(usize::from(code_of(*bound, &bounds)), index);
        }
        let values: Vec<f32> = (0..150).map(|i| (i as f32 * 0.37).sin() * 2.5).collect();
        let quantized = quantize_nf4(&values, NF4_BLOCK);
        assert_eq!(quantized.packed.len(), 75);
        assert_eq!(quantized.absmax.len(), 3);
        let mut middle = vec![0f32; 20];
        quantized.dequantize_into(60, &mut middle);
        assert_eq!(middle, quantized.dequantize()[60..80]);
        let whole = quantized.dequantize();
        for (start, len) in [(1, 5), (63, 3), (61, 70), (149, 1), (0, 150), (64, 64)] {
            let mut part = vec![0f32; len];
            quantized.dequantize_into(start, &mut part);
            assert_eq!(part, whole[start..start + len], "{start}+{len}");
        }
        // Within half the widest gap between levels (0.15) of each block's absmax.
        for (value, restored) in values.iter().zip(quantized.dequantize()) {
            assert!(
                (value - restored).abs() <= 0.16 * 2.5,
                "{value} → {restored}"
            );
        }
    }
    /// q4_0 and q8_0 restore rows to within their step (q8_0: half of absmax/127; q4_0:
    /// absmax/8, a whole step where its 16 levels reach only -8/8..7/8 of the absmax),
    /// refuse rows that are not whole blocks, and are the size ggml gives them.
    #[test]
    fn ggml_kinds_restore_rows_within_their_step() {
        let (rows, cols) = (3, 64);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.91).cos() * 3.0)
            .collect();
        for (kind, bound, bytes) in [
            (QuantKind::Q4_0, 1.0 / 8.0, 18 * 6),
            (QuantKind::Q8_0, 0.51 / 127.0, 34 * 6),
        ] {
            let quantized = quantize(kind, &values, cols).unwrap();
            assert_eq!(quantized.bytes(), bytes, "{kind:?}");
            let mut row = vec![0f32; cols];
            quantized.dequantize_into(cols, &mut row);
            for (block, restored) in values[cols..2 * cols].chunks(32).zip(row.chunks(32)) {
                let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (value, restored) in block.iter().zip(restored) {
                    assert!(
                        (value - restored).abs() <= absmax * bound + 1e-3,
                        "{kind:?}: {value} → {restored}"
                    );
                }
            }
            assert!(matches!(
                quantize(kind, &values[..90], 30),
                Err(QuantError::RaggedRows { .. })
            ));
        }
    }
}
