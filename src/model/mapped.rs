//! Frozen bf16/f16 weights read in place from memory-mapped safetensors files.
//!
//! A frozen base (LoRA training, evaluation, generation) never needs its matrices as
//! candle tensors: candle's CPU tensors own their storage, so loading a bf16 model
//! through a `VarBuilder` either widens it to f32 (twice the bytes) or copies it (as many
//! bytes again as the file). Instead a [`MappedMatrix`] points into the file's map, and
//! its products compute in f32 tile by tile: a block of rows is widened into a small
//! buffer (about 1 MiB) and multiplied with `gemm`, so the only copy of the weights is
//! the page cache's. The result equals an f32 matmul of the widened weights, which is
//! what transformers computes when it runs bf16 weights upcast to f32.
//!
//! The products are custom candle ops with a backward pass for the input (the weights
//! themselves get no gradient), so LoRA adapters upstream of a mapped projection train.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;

use super::ModelError;
use super::bf16_gemm::{self, Bf16Unit, MatRef};
use super::quant::{QuantError, QuantKind, QuantSpec, Quantized};
use super::quantized_files::{StoredView, read_matrix};
use crate::path_error::AtPath;

/// The element types a [`MappedMatrix`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfType {
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl HalfType {
    fn widen(self, bytes: [u8; 2]) -> f32 {
        let bits = u16::from_le_bytes(bytes);
        match self {
            // bf16 is the top half of an f32: widening is exact.
            HalfType::Bf16 => f32::from_bits(u32::from(bits) << 16),
            HalfType::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }
}

/// Where a matrix's bytes live: in a mapped file, or made at load (f32 weights kept as
/// bf16, see [`MappedSafetensors::with_f32_as_bf16`]).
#[derive(Debug, Clone)]
enum Bytes {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(bytes) => bytes,
        }
    }
}

/// A 2-D bf16/f16 tensor inside a mapped safetensors file.
#[derive(Debug, Clone)]
pub struct MappedMatrix {
    map: Bytes,
    offset: usize,
    rows: usize,
    cols: usize,
    kind: HalfType,
    name: String,
    /// Held quantized instead (a QLoRA base): `map`, `offset` and `kind` are unused,
    /// rows are restored from the blocks.
    quantized: Option<Arc<Quantized>>,
}

/// Weight rows per parallel task of a few-row product: enough to outweigh a task's cost.
const SMALL_TASK_ROWS: usize = 64;

/// Elements per widened tile: large enough for `gemm` to run at speed, small enough to
/// stay in cache and never matter next to the weights.
const TILE_ELEMENTS: usize = 1 << 18;

/// Elements per restored tile of a quantized matrix multiplied on the bf16 unit (8 MB
/// of bf16): a 1.5B model's `down_proj` in four tiles. A quarter of this was 16%
/// slower on the 1.5B QLoRA benchmark (per-tile packing and calls).
const QUANTIZED_BF16_TILE_ELEMENTS: usize = 1 << 22;

/// Elements per tile when every thread widens and multiplies its own tiles: small
/// enough that a tile stays in a core's L2 cache.
const PARALLEL_TILE_ELEMENTS: usize = 1 << 16;

/// From this many input rows on (a training batch), products widen large tiles (up to
/// [`BATCH_TILE_ELEMENTS`]: a whole projection of a 0.5B model, a slice of its head) and
/// hand each to one multi-threaded `gemm` call. Small tiles would make `gemm` pack the
/// whole input again for every few weight rows: with 13-row tiles of a `down_proj`
/// (4,864 columns) that was 69 passes over a 40 MB input per product.
const BATCH_M: usize = 64;

/// Elements per widened tile of a batch product (64 MB of f32).
const BATCH_TILE_ELEMENTS: usize = 1 << 24;

/// The output of a parallel product, written by disjoint tiles from several threads.
struct OutPtr(*mut f32);

// SAFETY: each thread writes only its own tile's columns (see `product_t`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Up to this many input rows (generation feeds one token at a time), `x · Wᵀ` reads each
/// weight row once and takes its dot products directly: widening whole tiles for a
/// product that small would cost more than the product.
pub(crate) const SMALL_M: usize = 8;

impl MappedMatrix {
    /// The row-major `[rows, cols]` matrix `values` held as `kind` (blocks along rows):
    /// a QLoRA base's projection. Its products restore tiles of rows as they go, as for
    /// bf16 weights.
    ///
    /// # Panics
    /// If `values` does not hold `rows × cols` values.
    pub fn quantized(
        name: &str,
        (rows, cols): (usize, usize),
        values: &[f32],
        kind: QuantKind,
    ) -> Result<MappedMatrix, QuantError> {
        assert_eq!(
            values.len(),
            rows * cols,
            "`{name}`: values for [{rows}, {cols}]"
        );
        Ok(MappedMatrix::from_quantized(
            name,
            (rows, cols),
            super::quant::quantize(kind, values, cols)?,
        ))
    }

    /// The `[rows, cols]` matrix held as `quantized` (a stored QLoRA base).
    pub fn from_quantized(
        name: &str,
        (rows, cols): (usize, usize),
        quantized: Quantized,
    ) -> MappedMatrix {
        MappedMatrix {
            map: Bytes::Owned(Arc::new(Vec::new())),
            offset: 0,
            rows,
            cols,
            kind: HalfType::F16,
            name: name.to_string(),
            quantized: Some(Arc::new(quantized)),
        }
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn tile_rows(&self) -> usize {
        (TILE_ELEMENTS / self.cols.max(1)).clamp(1, self.rows.max(1))
    }

    /// The stored bytes of rows `start..start + count`.
    fn row_bytes(&self, start: usize, count: usize) -> &[u8] {
        let row = self.cols * 2;
        &self.map[self.offset + start * row..self.offset + (start + count) * row]
    }

    /// Rows `start..start + count` widened to f32 into `out` (`count · cols` values),
    /// rows spread over threads.
    fn widen_rows(&self, start: usize, count: usize, out: &mut [f32]) {
        out[..count * self.cols]
            .par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(index, row)| self.widen_rows_here(start + index, 1, row));
    }

    /// [`MappedMatrix::widen_rows`] on this thread.
    fn widen_rows_here(&self, start: usize, count: usize, out: &mut [f32]) {
        let cols = self.cols;
        match &self.quantized {
            Some(codes) => codes.dequantize_into(start * cols, &mut out[..count * cols]),
            None => {
                for (row, source) in out
                    .chunks_mut(cols.max(1))
                    .zip(self.row_bytes(start, count).chunks(cols * 2))
                {
                    self.widen(source, row);
                }
            }
        }
    }

    /// One run of stored values widened to f32.
    fn widen(&self, source: &[u8], out: &mut [f32]) {
        // SAFETY: any two bytes are a valid u16; the aligned middle is used only when
        // it is the whole slice.
        let (head, values, tail) = unsafe { source.align_to::<u16>() };
        if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
            match self.kind {
                HalfType::Bf16 => kernels::widen_bf16(values, out),
                HalfType::F16 => {
                    for (value, bits) in out.iter_mut().zip(values) {
                        *value = half::f16::from_bits(*bits).to_f32();
                    }
                }
            }
        } else {
            for (value, pair) in out.iter_mut().zip(source.chunks_exact(2)) {
                *value = self.kind.widen([pair[0], pair[1]]);
            }
        }
    }

    /// The rows `ids` widened to f32, `[ids.len(), cols]` row-major (an embedding
    /// lookup); an id past the last row is an error, not a panic.
    pub fn gather_rows(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        let cols = self.cols;
        let mut out = vec![0f32; ids.len() * cols];
        for (row, &id) in out.chunks_mut(cols).zip(ids) {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!(
                    "index {id} is out of range for `{}` with {} rows",
                    self.name,
                    self.rows
                );
            }
            self.widen_rows(id, 1, row);
        }
        Ok(out)
    }

    /// The bf16 unit of this thread's `precision` scope, for a bf16 or quantized matrix
    /// (whose tiles are restored as bf16 for it, as bitsandbytes restores them for a bf16
    /// compute dtype).
    fn bf16_unit(&self) -> Option<Bf16Unit> {
        if self.quantized.is_some() {
            return super::precision::bf16_unit();
        }
        match self.kind {
            HalfType::Bf16 => super::precision::bf16_unit(),
            HalfType::F16 => None,
        }
    }

    /// `x·Wᵀ` (`transposed`) or `x·W` of a quantized matrix on the bf16 unit: tiles of
    /// rows restored to f32, rounded to bf16 and multiplied there (the sums in f32), so
    /// that no more than a tile is ever restored. `x` is `[m, cols]` or `[m, rows]`.
    fn quantized_bf16_product(
        &self,
        unit: Bf16Unit,
        x: &[f32],
        m: usize,
        transposed: bool,
    ) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let tile = (QUANTIZED_BF16_TILE_ELEMENTS / cols.max(1)).clamp(1, rows.max(1));
        let mut bits = vec![0u16; tile * cols];
        let mut y = vec![0f32; m * if transposed { rows } else { cols }];
        let mut part = vec![0f32; m * if transposed { tile } else { cols }];
        let mut start = 0;
        while start < rows {
            let count = tile.min(rows - start);
            let len = count * cols;
            // Each row restored into a thread's own cache-sized buffer and rounded from
            // there: one pass over the tile's memory.
            bits[..len]
                .par_chunks_mut(cols.max(1))
                .enumerate()
                .for_each_init(
                    || vec![0f32; cols],
                    |row, (index, bits)| {
                        self.widen_rows_here(start + index, 1, row);
                        for (bits, &value) in bits.iter_mut().zip(row.iter()) {
                            *bits = bf16_gemm::to_bf16(value);
                        }
                    },
                );
            if transposed {
                // Columns start..start+count of y.
                let part = &mut part[..m * count];
                let a = MatRef::row_major(x, cols);
                let b = MatRef::transposed(&bits[..len], cols);
                bf16_gemm::matmul(unit, (m, count, cols), a, b, part);
                for (row, values) in y.chunks_mut(rows).zip(part.chunks(count)) {
                    row[start..start + count].copy_from_slice(values);
                }
            } else {
                // The share of inputs start..start+count in every output.
                let a = MatRef {
                    data: &x[start..],
                    row_stride: rows,
                    col_stride: 1,
                };
                let b = MatRef::row_major(&bits[..len], cols);
                bf16_gemm::matmul(unit, (m, cols, count), a, b, &mut part);
                for (y, value) in y.iter_mut().zip(&part) {
                    *y += value;
                }
            }
            start += count;
        }
        y
    }

    /// The matrix's bf16 bits in place (row-major `[rows, cols]`), when it is bf16 and
    /// its offset in the file allows reading it as `u16` (safetensors aligns tensors).
    fn bf16_bits(&self) -> Option<&[u16]> {
        if self.kind != HalfType::Bf16 || self.quantized.is_some() || cfg!(target_endian = "big") {
            return None;
        }
        // SAFETY: any two bytes are a valid u16; align_to only reinterprets the aligned
        // middle, and we use it only when nothing is left over.
        let (head, bits, tail) = unsafe { self.row_bytes(0, self.rows).align_to::<u16>() };
        (head.is_empty() && tail.is_empty()).then_some(bits)
    }

    /// `x · Wᵀ` for `x: [..., cols]` (f32): the `nn.Linear` product with `W: [out, in]`.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    /// `x · W` for `x: [..., rows]` (f32): GPT-2's Conv1D product with `W: [in, out]`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }

    fn apply(&self, x: &Tensor, transposed: bool) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(Product {
            matrix: self.clone(),
            transposed,
            unit: self.bf16_unit(),
        })
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` for a few rows `m`: one dot product per weight row
    /// and input row, the weight row widened once, rows spread over threads.
    fn product_t_small(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        if let Some(bits) = self.bf16_bits() {
            // bf16 rows are widened inside the dot product (the same sums as widening
            // first): each weight byte is read once, and nothing is written back.
            return few_rows_by_dots(x, m, bits, k, kernels::dot_bf16);
        }
        let mut transposed = vec![0f32; n * m];
        transposed.par_chunks_mut(m).enumerate().for_each_init(
            || vec![0f32; k],
            |row, (index, out)| {
                self.widen_rows_here(index, 1, row);
                for (i, y) in out.iter_mut().enumerate() {
                    *y = kernels::dot(&x[i * k..(i + 1) * k], row);
                }
            },
        );
        untranspose(&transposed, m, n)
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`, one block of output columns per tile. Tiles are
    /// independent (disjoint columns of `y`), so each thread widens its own into a
    /// cache-sized buffer and multiplies it there.
    fn product_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        if m <= SMALL_M {
            return self.product_t_small(x, m);
        }
        if m >= BATCH_M {
            return self.product_t_batch(x, m);
        }
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let tile = (PARALLEL_TILE_ELEMENTS / k.max(1)).clamp(1, n.max(1));
        let out = OutPtr(y.as_mut_ptr());
        (0..n.div_ceil(tile)).into_par_iter().for_each_init(
            || vec![0f32; tile * k],
            |buffer, index| {
                let start = index * tile;
                let count = tile.min(n - start);
                self.widen_rows_here(start, count, buffer);
                // SAFETY: y's columns start..start+count are written by this tile alone,
                // and y outlives the parallel loop.
                unsafe {
                    tile_product_t(
                        (m, count, k),
                        out.get().add(start),
                        n,
                        x,
                        buffer,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        y
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` for many rows `m`: large tiles of weight rows,
    /// each widened in parallel and multiplied by one multi-threaded `gemm` call.
    fn product_t_batch(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let tile = (BATCH_TILE_ELEMENTS / k.max(1)).clamp(1, n.max(1));
        let mut buffer = vec![0f32; tile * k];
        let mut start = 0;
        while start < n {
            let count = tile.min(n - start);
            self.widen_rows(start, count, &mut buffer[..count * k]);
            // SAFETY: columns start..start+count of y (m rows of n).
            unsafe {
                tile_product_t(
                    (m, count, k),
                    y.as_mut_ptr().add(start),
                    n,
                    x,
                    &buffer,
                    parallelism(),
                );
            }
            start += count;
        }
        y
    }

    /// `y[m, cols] = x[m, rows] · W`, accumulating one block of the inner dimension per
    /// tile.
    fn product(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let tile = match m >= BATCH_M {
            true => (BATCH_TILE_ELEMENTS / n.max(1)).clamp(1, k.max(1)),
            false => self.tile_rows(),
        };
        let mut buffer = vec![0f32; tile * n];
        let mut start = 0;
        while start < k {
            let count = tile.min(k - start);
            self.widen_rows(start, count, &mut buffer[..count * n]);
            // SAFETY: dst is y (m × n, row stride n); lhs is x's columns start..start+count
            // (row stride k); rhs is the tile (count × n, row stride n).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    count,
                    y.as_mut_ptr(),
                    1,
                    n as isize,
                    start > 0,
                    x.as_ptr().add(start),
                    1,
                    k as isize,
                    buffer.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
            start += count;
        }
        y
    }
}

/// The two inner loops of the mapped products, compiled for the vector instructions
/// the CPU has, detected at run time (the crate is built for baseline x86-64, which
/// would leave them to SSE2). Both compute exactly in f32; bf16 dot-product instructions
/// (AVX512-BF16, AMX) would round the activations to bf16 and are not used.
mod kernels {
    use std::sync::OnceLock;

    /// Vector extensions worth a separate build of a loop.
    #[derive(Debug, Clone, Copy)]
    enum Isa {
        Avx512,
        Avx2,
        Baseline,
    }

    fn isa() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Baseline
        })
    }

    /// Defines `$name` running `$body` built for the best [`Isa`] available.
    macro_rules! dispatched {
        ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            pub(super) fn $name($($arg: $ty),*) -> $ret {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn avx512($($arg: $ty),*) -> $ret {
                        $body($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) -> $ret {
                        $body($($arg),*)
                    }
                    match isa() {
                        // SAFETY: the CPU has the features, checked by `isa`.
                        Isa::Avx512 => return unsafe { avx512($($arg),*) },
                        // SAFETY: as above.
                        Isa::Avx2 => return unsafe { avx2($($arg),*) },
                        Isa::Baseline => {}
                    }
                }
                $body($($arg),*)
            }
        };
    }

    /// A weight element the dot products read: f32, or bf16 bits widened on the fly.
    trait WeightElement: Copy {
        fn widen(self) -> f32;
    }

    impl WeightElement for f32 {
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }

    impl WeightElement for u16 {
        /// bf16 bits are the top half of the f32.
        #[inline(always)]
        fn widen(self) -> f32 {
            f32::from_bits(u32::from(self) << 16)
        }
    }

    /// How far ahead of the row being read (in bytes) the dot products ask for weights:
    /// rows are read once, one after another, and the hardware prefetcher alone left
    /// one-token decoding at ~70% of the memory bandwidth (2 threads: f32 14 → 19 GB/s).
    const PREFETCH_AHEAD: usize = 4096;

    /// `x · w`: four chains of sixteen partial sums (64 values a step, so the adds
    /// do not wait on each other), summed as a tree; weights are prefetched
    /// [`PREFETCH_AHEAD`] bytes ahead. f32 and bf16 weights give the same sums for the
    /// same widened values.
    #[inline(always)]
    fn dot_body<T: WeightElement>(x: &[f32], w: &[T]) -> f32 {
        let mut sums = [[0f32; 16]; 4];
        let whole = x.len().min(w.len()) / 64 * 64;
        let mut step_start = w.as_ptr().cast::<u8>();
        let step_bytes = 64 * std::mem::size_of::<T>();
        for (x, w) in x[..whole].chunks_exact(64).zip(w[..whole].chunks_exact(64)) {
            #[cfg(target_arch = "x86_64")]
            for line in (0..step_bytes).step_by(64) {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                // SAFETY: a prefetch is a hint that never faults, whatever the address.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(
                        step_start.wrapping_add(PREFETCH_AHEAD + line).cast::<i8>(),
                    )
                };
            }
            step_start = step_start.wrapping_add(step_bytes);
            for (chain, sums) in sums.iter_mut().enumerate() {
                for lane in 0..16 {
                    sums[lane] += x[chain * 16 + lane] * w[chain * 16 + lane].widen();
                }
            }
        }
        let mut total = [0f32; 16];
        for (lane, total) in total.iter_mut().enumerate() {
            *total = (sums[0][lane] + sums[1][lane]) + (sums[2][lane] + sums[3][lane]);
        }
        let (x, w) = (&x[whole..], &w[whole..]);
        let (x_chunks, w_chunks) = (x.chunks_exact(16), w.chunks_exact(16));
        let tail: f32 = x_chunks
            .remainder()
            .iter()
            .zip(w_chunks.remainder())
            .map(|(a, b)| a * b.widen())
            .sum();
        for (x, w) in x_chunks.zip(w_chunks) {
            for lane in 0..16 {
                total[lane] += x[lane] * w[lane].widen();
            }
        }
        let mut width = 8;
        while width > 0 {
            for lane in 0..width {
                total[lane] += total[lane + width];
            }
            width /= 2;
        }
        total[0] + tail
    }

    /// bf16 bits → f32.
    #[inline(always)]
    fn widen_bf16_body(values: &[u16], out: &mut [f32]) {
        for (value, bits) in out.iter_mut().zip(values) {
            *value = bits.widen();
        }
    }

    #[inline(always)]
    fn dot_f32_body(x: &[f32], w: &[f32]) -> f32 {
        dot_body(x, w)
    }

    #[inline(always)]
    fn dot_bf16_body(x: &[f32], w: &[u16]) -> f32 {
        dot_body(x, w)
    }

    dispatched!(widen_bf16, widen_bf16_body, (values: &[u16], out: &mut [f32]) -> ());
    dispatched!(dot, dot_f32_body, (x: &[f32], w: &[f32]) -> f32);
    dispatched!(dot_bf16, dot_bf16_body, (x: &[f32], w: &[u16]) -> f32);
}

/// `y[m, n]` from its transpose (`n × m`, one weight row's outputs together).
fn untranspose(transposed: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for (r, column) in transposed.chunks(m).enumerate() {
        for (i, value) in column.iter().enumerate() {
            y[i * n + r] = *value;
        }
    }
    y
}

/// `y[m, n] = x[m, k] · Wᵀ` for f32 weights `w` (`[n, k]`, row-major) and a few input
/// rows `m` (at most [`SMALL_M`]): one dot product per weight row and input row, weight
/// rows spread over threads. `gemm` multiplies a single row on one thread, so one-token
/// decoding would read the weights with one core; and these sums do not depend on the
/// thread count.
pub(crate) fn few_row_product_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert!(x.len() == m * k && w.len() == n * k);
    few_rows_by_dots(x, m, w, k, kernels::dot)
}

/// `y[m, n] = x[m, k] · Wᵀ` for weights `w` stored as rows of `k` (f32 or bf16 bits),
/// one `dot(x_row, w_row)` per pair, weight rows spread over threads.
fn few_rows_by_dots<T: Sync>(
    x: &[f32],
    m: usize,
    w: &[T],
    k: usize,
    dot: fn(&[f32], &[T]) -> f32,
) -> Vec<f32> {
    let n = w.len() / k.max(1);
    let mut transposed = vec![0f32; n * m];
    transposed
        .par_chunks_mut(m)
        .zip(w.par_chunks(k.max(1)))
        .with_min_len(SMALL_TASK_ROWS)
        .for_each(|(out, row)| {
            for (i, y) in out.iter_mut().enumerate() {
                *y = dot(&x[i * k..(i + 1) * k], row);
            }
        });
    untranspose(&transposed, m, n)
}

fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// `y[m × count] = x[m × k] · tileᵀ` for a widened tile of `count` weight rows
/// (`count × k`), written into `count` columns of `y`, whose rows are `row_stride` apart.
///
/// # Safety
/// `dst` must address `m` rows of `count` writable values `row_stride` apart, which no
/// other thread writes meanwhile; `x` must hold `m × k` values and `tile` `count × k`.
unsafe fn tile_product_t(
    (m, count, k): (usize, usize, usize),
    dst: *mut f32,
    row_stride: usize,
    x: &[f32],
    tile: &[f32],
    parallelism: gemm::Parallelism,
) {
    debug_assert!(x.len() >= m * k && tile.len() >= count * k);
    // SAFETY: lhs is x (m × k, row stride k); rhs is the tile read transposed (k × count:
    // element (r, c) at c·k + r); dst as the caller guarantees.
    unsafe {
        gemm::gemm(
            m,
            count,
            k,
            dst,
            1,
            row_stride as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            tile.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The custom op `x · Wᵀ` (`transposed`) or `x · W` over a mapped `W`.
struct Product {
    matrix: MappedMatrix,
    transposed: bool,
    /// Products on this bf16 unit, reading the bf16 weights as they are (a
    /// `precision: bf16` scope on a bf16 matrix), else widened to f32.
    unit: Option<Bf16Unit>,
}

impl CustomOp1 for Product {
    fn name(&self) -> &'static str {
        "mapped-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!(
                "{}: mapped weights multiply f32 inputs only",
                self.matrix.name
            );
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input is not contiguous", self.matrix.name);
        };
        let dims = layout.dims();
        let (inner, outer) = match self.transposed {
            true => (self.matrix.cols, self.matrix.rows),
            false => (self.matrix.rows, self.matrix.cols),
        };
        if dims.last() != Some(&inner) {
            candle_core::bail!(
                "{}: input of shape {dims:?} does not fit a [{}, {}] weight",
                self.matrix.name,
                self.matrix.rows,
                self.matrix.cols
            );
        }
        let x = &values[start..end];
        let m = x.len() / inner;
        let quantized_unit = self
            .unit
            .filter(|_| self.matrix.quantized.is_some() && m > SMALL_M);
        let y = match (self.unit.zip(self.matrix.bf16_bits()), self.transposed) {
            _ if let Some(unit) = quantized_unit => {
                self.matrix
                    .quantized_bf16_product(unit, x, m, self.transposed)
            }
            (Some((unit, w)), transposed) => {
                let cols = self.matrix.cols;
                // x·Wᵀ reads W [rows, cols] transposed; x·W reads it as stored.
                let b = match transposed {
                    true => MatRef::transposed(w, cols),
                    false => MatRef::row_major(w, cols),
                };
                let a = MatRef::row_major(x, inner);
                let mut y = vec![0f32; m * outer];
                bf16_gemm::matmul(unit, (m, outer, inner), a, b, &mut y);
                y
            }
            (None, true) => self.matrix.product_t(x, m),
            (None, false) => self.matrix.product(x, m),
        };
        Ok((CpuStorage::F32(y), super::fused::with_last_dim(dims, outer)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(x·Wᵀ)/dx = g·W and d(x·W)/dx = g·Wᵀ: the other product over the same map.
        let other = Product {
            matrix: self.matrix.clone(),
            transposed: !self.transposed,
            unit: self.unit,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&other)?))
    }
}

/// Where one tensor lies in a mapped file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    offset: usize,
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
}

impl Entry {
    /// The tensor's length in bytes.
    fn bytes(&self) -> usize {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize()).div_ceil(8)
    }
}

/// The tensors of a model's safetensors files, mapped read-only, by name.
#[derive(Debug, Clone, Default)]
pub struct MappedSafetensors {
    maps: Vec<Arc<Mmap>>,
    paths: Vec<PathBuf>,
    entries: BTreeMap<String, Entry>,
    /// Whether f32 matrices are served too, rounded to bf16 once at load.
    f32_as_bf16: bool,
    /// Those rounded matrices by name, made once (a tied head reads the embedding's).
    rounded: Arc<std::sync::Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
    /// Whether the blocks' projections are served quantized (a QLoRA base).
    quantize: Option<QuantSpec>,
}

impl MappedSafetensors {
    /// Maps `files` and reads their headers (nothing else is read until used).
    pub fn open(files: &[PathBuf]) -> Result<MappedSafetensors, ModelError> {
        let mut mapped = MappedSafetensors::default();
        for (index, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).at(path)?;
            // SAFETY: mapped read-only; trainyard never writes a model directory it is
            // reading (stage inputs are immutable store entries or the user's files).
            let map = unsafe { Mmap::map(&file) }.at(path)?;
            let tensors = safetensors::SafeTensors::deserialize(&map).map_err(|error| {
                ModelError::Safetensors {
                    path: path.clone(),
                    message: error.to_string(),
                }
            })?;
            for (name, view) in tensors.tensors() {
                let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
                mapped.entries.insert(
                    name,
                    Entry {
                        file: index,
                        offset,
                        shape: view.shape().to_vec(),
                        dtype: view.dtype(),
                    },
                );
            }
            drop(tensors);
            mapped.maps.push(Arc::new(map));
            mapped.paths.push(path.clone());
        }
        Ok(mapped)
    }

    /// Whether any tensor is stored as bf16 or f16 (then a frozen model reads those in
    /// place rather than widening them), or is an f32 matrix served as bf16.
    pub fn has_half_tensors(&self) -> bool {
        self.entries.values().any(|entry| match entry.dtype {
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 => true,
            safetensors::Dtype::F32 => self.f32_as_bf16 && entry.shape.len() == 2,
            _ => false,
        }) || (self.quantize.is_some() && self.entries.keys().any(|name| is_projection(name)))
            || self
                .entries
                .keys()
                .any(|name| name.contains(".quant_state."))
    }

    /// Tensor `name` read in place.
    fn view(&self, name: &str) -> Option<StoredView<'_>> {
        let entry = self.entries.get(name)?;
        let len = entry.bytes();
        Some(StoredView {
            dtype: entry.dtype,
            data: self.maps[entry.file].get(entry.offset..entry.offset + len)?,
        })
    }

    /// Lets the kernel drop the mapped pages of `entry` (read once to quantize or copy
    /// it): clean file pages, read again if ever needed, that would otherwise count in
    /// the process's memory for as long as the file stays mapped.
    fn release(&self, entry: &Entry) {
        const PAGE: usize = 4096;
        let bytes = entry.bytes();
        let start = entry.offset.next_multiple_of(PAGE);
        let end = (entry.offset + bytes) / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is read-only and private: dropping its pages only makes the
            // next read of them fetch the file again; a refused advice changes nothing.
            let _ = unsafe {
                self.maps[entry.file].unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// These files with the projections of their blocks (`….layers.N.….*_proj.weight`)
    /// served as `kind`, quantized one matrix at a time as the model loads; embeddings,
    /// norms and the head stay as stored (QLoRA's base).
    pub fn with_quantized_projections(mut self, kind: QuantSpec) -> MappedSafetensors {
        self.quantize = Some(kind);
        self
    }

    /// The values of tensor `name` (`count` of them at `entry`) as f32.
    fn values_f32(&self, entry: &Entry, count: usize) -> Result<Vec<f32>, String> {
        let width = match entry.dtype {
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 => 2,
            other => return Err(format!("{other:?} weights cannot be quantized")),
        };
        let bytes = &self.maps[entry.file][entry.offset..entry.offset + count * width];
        float_values(entry.dtype, bytes)
    }

    /// These files with their f32 matrices served as bf16 too, rounded (to nearest
    /// even) once when first asked for: half the bytes each product reads, which is what
    /// bounds one-token decoding; products still widen them and sum in f32.
    pub fn with_f32_as_bf16(mut self) -> MappedSafetensors {
        self.f32_as_bf16 = true;
        self
    }

    /// The f32 tensor `name` (`count` values at `entry`) as little-endian bf16 bytes.
    fn rounded(&self, name: &str, entry: &Entry, count: usize) -> Arc<Vec<u8>> {
        let mut rounded = self
            .rounded
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let made = rounded.entry(name.to_string()).or_insert_with(|| {
            let source = &self.maps[entry.file][entry.offset..entry.offset + count * 4];
            let mut bytes = vec![0u8; count * 2];
            bytes
                .par_chunks_mut(2 << 14)
                .zip(source.par_chunks(4 << 14))
                .for_each(|(out, values)| {
                    for (out, value) in out.chunks_exact_mut(2).zip(values.chunks_exact(4)) {
                        let value = f32::from_le_bytes([value[0], value[1], value[2], value[3]]);
                        out.copy_from_slice(&bf16_gemm::to_bf16(value).to_le_bytes());
                    }
                });
            Arc::new(bytes)
        });
        made.clone()
    }

    /// Also answers to `prefix` + every name (GPT-2 files from the Hub name the base
    /// model's tensors without `transformer.`).
    pub fn with_prefix_aliases(mut self, prefix: &str) -> MappedSafetensors {
        let aliases: Vec<(String, Entry)> = self
            .entries
            .iter()
            .map(|(name, entry)| (format!("{prefix}{name}"), entry.clone()))
            .collect();
        self.entries.extend(aliases);
        self
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The bf16/f16 matrix `name` of shape `[rows, cols]`; `Ok(None)` when it is stored
    /// in another dtype or absent (the caller then loads it the ordinary way), an error
    /// naming the file when its shape differs.
    pub fn matrix(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
    ) -> Result<Option<MappedMatrix>, ModelError> {
        if let Some(quantized) = self.quantized_matrix(name, (rows, cols), false)? {
            return Ok(Some(quantized));
        }
        self.half_matrix(name, (rows, cols))
    }

    /// GPT-2's `Conv1D` weight `name`, stored `[in_dim, out_dim]`: held quantized, it
    /// is the transpose `[out_dim, in_dim]` (`true`), as bitsandbytes quantizes it;
    /// otherwise as [`MappedSafetensors::matrix`] gives it (`false`).
    pub fn conv1d_matrix(
        &self,
        name: &str,
        (in_dim, out_dim): (usize, usize),
    ) -> Result<Option<(MappedMatrix, bool)>, ModelError> {
        if let Some(quantized) = self.quantized_matrix(name, (out_dim, in_dim), true)? {
            return Ok(Some((quantized, true)));
        }
        Ok(self
            .half_matrix(name, (in_dim, out_dim))?
            .map(|matrix| (matrix, false)))
    }

    /// Matrix `name` held quantized as `[rows, cols]`: its stored codes (a quantized
    /// base), or, when these files quantize their blocks' projections, quantized now
    /// from the stored values — which are `[cols, rows]` when `transposed` (Conv1D).
    /// `Ok(None)` when it is neither.
    fn quantized_matrix(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
        transposed: bool,
    ) -> Result<Option<MappedMatrix>, ModelError> {
        let Some(entry) = self.entries.get(name) else {
            return Ok(None);
        };
        let error = |message: String| ModelError::Safetensors {
            path: self.paths[entry.file].clone(),
            message,
        };
        if let Some(quantized) =
            read_matrix(name, (rows, cols), |key| self.view(key)).map_err(error)?
        {
            self.release(entry);
            return Ok(Some(MappedMatrix::from_quantized(
                name,
                (rows, cols),
                quantized,
            )));
        }
        let Some(quant) = self.quantize.filter(|_| is_projection(name)) else {
            return Ok(None);
        };
        let stored_shape = if transposed {
            [cols, rows]
        } else {
            [rows, cols]
        };
        if entry.shape != stored_shape {
            return Err(error(format!(
                "tensor `{name}` has shape {:?}, the config needs {stored_shape:?}",
                entry.shape
            )));
        }
        let mut values = self
            .values_f32(entry, rows * cols)
            .map_err(|message| error(format!("tensor `{name}`: {message}")))?;
        self.release(entry);
        if transposed {
            values = transpose(&values, (cols, rows));
        }
        let (quantized, _) = super::quant::quantize_spec(quant, &values, cols)
            .map_err(|quant_error| error(format!("tensor `{name}`: {quant_error}")))?;
        Ok(Some(MappedMatrix::from_quantized(
            name,
            (rows, cols),
            quantized,
        )))
    }

    /// Matrix `name` `[rows, cols]` read in place when stored as bf16/f16 (or rounded
    /// to bf16 from f32, see [`MappedSafetensors::with_f32_as_bf16`]).
    fn half_matrix(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
    ) -> Result<Option<MappedMatrix>, ModelError> {
        let Some(entry) = self.entries.get(name) else {
            return Ok(None);
        };
        let kind = match entry.dtype {
            safetensors::Dtype::BF16 => HalfType::Bf16,
            safetensors::Dtype::F16 => HalfType::F16,
            safetensors::Dtype::F32 if self.f32_as_bf16 => HalfType::Bf16,
            _ => return Ok(None),
        };
        if entry.shape != [rows, cols] {
            return Err(ModelError::Safetensors {
                path: self.paths[entry.file].clone(),
                message: format!(
                    "tensor `{name}` has shape {:?}, the config needs [{rows}, {cols}]",
                    entry.shape
                ),
            });
        }
        let (map, offset) = match entry.dtype {
            safetensors::Dtype::F32 => (Bytes::Owned(self.rounded(name, entry, rows * cols)), 0),
            _ => (Bytes::Mapped(self.maps[entry.file].clone()), entry.offset),
        };
        Ok(Some(MappedMatrix {
            map,
            offset,
            rows,
            cols,
            kind,
            name: name.to_string(),
            quantized: None,
        }))
    }
}

/// Little-endian f32, bf16 or f16 bytes as f32 values; an error naming any other dtype.
pub(crate) fn float_values(dtype: safetensors::Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    Ok(match dtype {
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| HalfType::Bf16.widen([b[0], b[1]]))
            .collect(),
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| HalfType::F16.widen([b[0], b[1]]))
            .collect(),
        other => return Err(format!("{other:?} weights cannot be quantized")),
    })
}

/// Whether `name` is a projection inside a transformer block (what a QLoRA base
/// quantizes): `….layers.N.self_attn.q_proj.weight`, `….layers.N.mlp.down_proj.weight`,
/// or GPT-2's Conv1D weights ([`is_conv1d`]).
pub(crate) fn is_projection(name: &str) -> bool {
    (name.contains(".layers.") && name.ends_with("_proj.weight")) || is_conv1d(name)
}

/// Whether `name` is a GPT-2 block's `Conv1D` weight, stored `[in, out]` (the transpose
/// of `nn.Linear`'s): `[transformer.]h.N.attn.c_attn.weight`, `….attn.c_proj.weight`,
/// `….mlp.c_fc.weight`, `….mlp.c_proj.weight`.
pub(crate) fn is_conv1d(name: &str) -> bool {
    let parts: Vec<&str> = name.rsplit('.').take(5).collect();
    matches!(
        parts.as_slice(),
        ["weight", "c_attn" | "c_proj", "attn", index, "h"]
            | ["weight", "c_fc" | "c_proj", "mlp", index, "h"]
            if index.parse::<usize>().is_ok()
    )
}

/// The `[rows, cols]` row-major `values` transposed (`[cols, rows]`).
pub(crate) fn transpose(values: &[f32], (rows, cols): (usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (row, chunk) in values.chunks_exact(cols).enumerate().take(rows) {
        for (col, &value) in chunk.iter().enumerate() {
            out[col * rows + row] = value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, random};
    use candle_core::{DType, Device};

    /// A random `[rows, cols]` matrix saved in `dtype`, mapped back, and the same values
    /// as an f32 tensor.
    fn mapped(
        rows: usize,
        cols: usize,
        dtype: DType,
        seed: u64,
    ) -> (tempfile::TempDir, MappedMatrix, Tensor) {
        let tensor = random(&[rows, cols], seed).to_dtype(dtype).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        super::super::save_tensors(&[("w".to_string(), tensor.clone())], &path).unwrap();
        let files = MappedSafetensors::open(&[path]).unwrap();
        let matrix = files.matrix("w", (rows, cols)).unwrap().unwrap();
        (dir, matrix, tensor.to_dtype(DType::F32).unwrap())
    }

    #[test]
    fn products_equal_f32_matmuls_of_the_widened_weights() {
        for (dtype, seed) in [(DType::BF16, 1), (DType::F16, 2)] {
            // Sizes that are not multiples of the vector or tile sizes, and several tiles
            // in both products.
            let (rows, cols) = (1500, 301);
            let (_dir, matrix, dense) = mapped(rows, cols, dtype, seed);
            for m in [1, 3, 8, 9, 40, 64, 130] {
                let x = (random(&[m, cols], 1000 * seed + m as u64).as_tensor() * 0.5).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let got = matrix.matmul_t(&x).unwrap();
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5, "{dtype:?} m={m}: x·Wᵀ off by {diff}");
                let g = (random(&[m, rows], 2000 * seed + m as u64).as_tensor() * 0.5).unwrap();
                let want = g.matmul(&dense).unwrap();
                let got = matrix.matmul(&g).unwrap();
                // 1500-term sums (|y| up to ~10) in another order: a few f32 ulps.
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5 * 10.0, "{dtype:?} m={m}: x·W off by {diff}");
            }
            let gathered = matrix.gather_rows(&[0, 1499, 5]).unwrap();
            let want: Vec<f32> = dense
                .index_select(&Tensor::new(&[0u32, 1499, 5], &Device::Cpu).unwrap(), 0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(gathered, want);
            assert!(matrix.gather_rows(&[1500]).is_err());
        }
    }

    /// A quantized matrix (each kind) multiplies as its restored values do, in both
    /// products and at every size path (few rows, tiles, batches), and the input
    /// gradient through it agrees with finite differences.
    #[test]
    fn quantized_products_equal_matmuls_of_the_restored_weights() {
        use crate::model::quant::{QuantKind, quantize};
        let (rows, cols) = (150, 320);
        let values = random(&[rows, cols], 21)
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for kind in [QuantKind::Nf4, QuantKind::Q4_0, QuantKind::Q8_0] {
            let matrix = MappedMatrix::quantized("w", (rows, cols), &values, kind).unwrap();
            let mut restored = vec![0f32; rows * cols];
            quantize(kind, &values, cols)
                .unwrap()
                .dequantize_into(0, &mut restored);
            let dense = Tensor::from_vec(restored, (rows, cols), &Device::Cpu).unwrap();
            for m in [1, 3, 9, 40, 130] {
                let x = (random(&[m, cols], 30 + m as u64).as_tensor() * 0.5).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let diff = max_diff(&matrix.matmul_t(&x).unwrap(), &want);
                assert!(diff < 1e-4, "{kind:?} m={m}: x·Wᵀ off by {diff}");
                let g = (random(&[m, rows], 60 + m as u64).as_tensor() * 0.5).unwrap();
                let want = g.matmul(&dense).unwrap();
                let diff = max_diff(&matrix.matmul(&g).unwrap(), &want);
                assert!(diff < 1e-4, "{kind:?} m={m}: x·W off by {diff}");
            }
            let x = random(&[3, cols], 90);
            let probe = random(&[3, rows], 91).as_tensor().clone();
            let loss = |x: &Tensor| {
                crate::model::testing::linear_loss(&matrix.matmul_t(x).unwrap(), &probe)
            };
            let y = matrix.matmul_t(x.as_tensor()).unwrap();
            let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            crate::model::testing::assert_finite_differences(
                "x",
                x.as_tensor(),
                grads.get(x.as_tensor()).unwrap(),
                &[0, 7, 300, 450, 902],
                loss,
            );
        }
        assert!(MappedMatrix::quantized("w", (3, 30), &values[..90], QuantKind::Q8_0).is_err());
    }

    /// In a `precision: bf16` scope a mapped bf16 matrix multiplies on the bf16 unit,
    /// reading its bits in place: forward and input gradient within bf16 rounding of the
    /// input (the weights are bf16 already) of the f32 products.
    #[test]
    fn bf16_scope_products_read_the_weights_in_place() {
        let Some(unit) = bf16_gemm::unit() else {
            eprintln!("no bf16 unit on this CPU: nothing to compare");
            return;
        };
        let (_dir, matrix, reference) = mapped(70, 45, DType::BF16, 3);
        let (x, grad) = (random(&[5, 45], 4), random(&[5, 70], 5));
        let (forward, backward) = {
            let _scope = super::super::precision::BF16Scope::enter(Some(unit));
            (matrix.matmul_t(&x).unwrap(), matrix.matmul(&grad).unwrap())
        };
        let expected_forward = x.matmul(&reference.t().unwrap()).unwrap();
        let expected_backward = grad.matmul(&reference).unwrap();
        // Inputs round to 8 bits of mantissa; sums of 45 and 70 terms below 1 in size.
        assert!(
            max_diff(&forward, &expected_forward) < 0.1,
            "{}",
            max_diff(&forward, &expected_forward)
        );
        assert!(max_diff(&backward, &expected_backward) < 0.1);
        // Outside the scope the f32 path is exact on the widened weights.
        let exact = matrix.matmul_t(&x).unwrap();
        assert!(max_diff(&exact, &expected_forward) < 1e-4);
        assert!(
            max_diff(&forward, &exact) > 0.0,
            "the bf16 path was not taken"
        );
    }

    /// Under a bf16 scope a quantized matrix multiplies on the unit, tile by tile (this
    /// one spans two tiles): both products equal those of the bf16-rounded input and
    /// restored weights, summed in f32.
    #[test]
    fn quantized_bf16_products_round_the_restored_tiles() {
        use crate::model::quant::{QuantKind, quantize};
        let Some(unit) = bf16_gemm::unit() else {
            eprintln!("no bf16 unit on this CPU: nothing to compare");
            return;
        };
        let (rows, cols) = (QUANTIZED_BF16_TILE_ELEMENTS / 320 + 50, 320);
        let values = random(&[rows, cols], 23)
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let matrix = MappedMatrix::quantized("w", (rows, cols), &values, QuantKind::Nf4).unwrap();
        let mut restored = vec![0f32; rows * cols];
        quantize(QuantKind::Nf4, &values, cols)
            .unwrap()
            .dequantize_into(0, &mut restored);
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let dense = round(&Tensor::from_vec(restored, (rows, cols), &Device::Cpu).unwrap());
        let m = 12;
        let x = (random(&[m, cols], 31).as_tensor() * 0.5).unwrap();
        let g = (random(&[m, rows], 32).as_tensor() * 0.5).unwrap();
        let (forward, backward) = {
            let _scope = super::super::precision::BF16Scope::enter(Some(unit));
            (matrix.matmul_t(&x).unwrap(), matrix.matmul(&g).unwrap())
        };
        let want = round(&x).matmul(&dense.t().unwrap()).unwrap();
        let diff = max_diff(&forward, &want);
        assert!(diff < 1e-3, "x·Wᵀ off by {diff}");
        let want = round(&g).matmul(&dense).unwrap();
        let diff = max_diff(&backward, &want);
        assert!(diff < 1e-3, "x·W off by {diff}");
    }

    /// f32 matrices served as bf16: absent without the option; with it, the values are
    /// the f32 ones rounded to bf16 (to nearest even), the same for a second reader (a
    /// tied head), and products use them.
    #[test]
    fn f32_matrices_are_served_rounded_to_bf16_when_asked() {
        let (rows, cols) = (40, 33);
        let tensor = random(&[rows, cols], 9).as_tensor().clone();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        super::super::save_tensors(&[("w".to_string(), tensor.clone())], &path).unwrap();
        let files = MappedSafetensors::open(std::slice::from_ref(&path)).unwrap();
        assert!(!files.has_half_tensors());
        assert!(files.matrix("w", (rows, cols)).unwrap().is_none());
        let files = files.with_f32_as_bf16();
        assert!(files.has_half_tensors());
        let matrix = files.matrix("w", (rows, cols)).unwrap().unwrap();
        let rounded = tensor
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let all: Vec<u32> = (0..rows as u32).collect();
        let values = Tensor::from_vec(
            matrix.gather_rows(&all).unwrap(),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(max_diff(&values, &rounded), 0.0);
        let again = files.matrix("w", (rows, cols)).unwrap().unwrap();
        assert_eq!(
            again.gather_rows(&[3]).unwrap(),
            matrix.gather_rows(&[3]).unwrap()
        );
        let x = random(&[2, cols], 10).as_tensor().clone();
        let want = x.matmul(&rounded.t().unwrap()).unwrap();
        assert!(max_diff(&matrix.matmul_t(&x).unwrap(), &want) < 1e-5);
        assert!(files.matrix("w", (rows, cols + 1)).is_err());
    }
}
