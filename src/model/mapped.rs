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
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;

use super::ModelError;

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

    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            HalfType::Bf16 => DType::BF16,
            HalfType::F16 => DType::F16,
        }
    }
}

/// A 2-D bf16/f16 tensor inside a mapped safetensors file.
#[derive(Debug, Clone)]
pub struct MappedMatrix {
    map: Arc<Mmap>,
    offset: usize,
    rows: usize,
    cols: usize,
    kind: HalfType,
    name: String,
}

/// Elements per widened tile: large enough for `gemm` to run at speed, small enough to
/// stay in cache and never matter next to the weights.
const TILE_ELEMENTS: usize = 1 << 18;

impl MappedMatrix {
    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The element type.
    pub fn kind(&self) -> HalfType {
        self.kind
    }

    fn tile_rows(&self) -> usize {
        (TILE_ELEMENTS / self.cols.max(1)).clamp(1, self.rows.max(1))
    }

    /// Rows `start..start + count` widened to f32 into `out` (`count · cols` values).
    fn widen_rows(&self, start: usize, count: usize, out: &mut [f32]) {
        let cols = self.cols;
        let bytes =
            &self.map[self.offset + start * cols * 2..self.offset + (start + count) * cols * 2];
        out.par_chunks_mut(cols)
            .zip(bytes.par_chunks(cols * 2))
            .for_each(|(row, source)| {
                for (value, pair) in row.iter_mut().zip(source.chunks_exact(2)) {
                    *value = self.kind.widen([pair[0], pair[1]]);
                }
            });
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

    /// The whole matrix as a tensor of its own dtype (a copy).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        let mut values = vec![0f32; self.rows * self.cols];
        self.widen_rows(0, self.rows, &mut values);
        Tensor::from_vec(values, (self.rows, self.cols), &candle_core::Device::Cpu)?
            .to_dtype(self.kind.dtype())
    }

    /// `x · Wᵀ` for `x: [..., cols]` (f32): the `nn.Linear` product with `W: [out, in]`.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(Product {
            matrix: self.clone(),
            transposed: true,
        })
    }

    /// `x · W` for `x: [..., rows]` (f32): GPT-2's Conv1D product with `W: [in, out]`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(Product {
            matrix: self.clone(),
            transposed: false,
        })
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`, one block of output columns per tile.
    fn product_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let tile = self.tile_rows();
        let mut buffer = vec![0f32; tile * k];
        let mut start = 0;
        while start < n {
            let count = tile.min(n - start);
            self.widen_rows(start, count, &mut buffer[..count * k]);
            // SAFETY: dst is y's columns start..start+count of m rows with row stride n;
            // lhs is x (m × k, row stride k); rhs is the tile read transposed (k × count:
            // element (r, c) at c·k + r). All three lie inside their buffers.
            unsafe {
                gemm::gemm(
                    m,
                    count,
                    k,
                    y.as_mut_ptr().add(start),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buffer.as_ptr(),
                    k as isize,
                    1,
                    0.0,
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

    /// `y[m, cols] = x[m, rows] · W`, accumulating one block of the inner dimension per
    /// tile.
    fn product(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let tile = self.tile_rows();
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

fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// The custom op `x · Wᵀ` (`transposed`) or `x · W` over a mapped `W`.
struct Product {
    matrix: MappedMatrix,
    transposed: bool,
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
        let y = match self.transposed {
            true => self.matrix.product_t(x, m),
            false => self.matrix.product(x, m),
        };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = outer;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
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

/// The tensors of a model's safetensors files, mapped read-only, by name.
#[derive(Debug, Clone, Default)]
pub struct MappedSafetensors {
    maps: Vec<Arc<Mmap>>,
    paths: Vec<PathBuf>,
    entries: BTreeMap<String, Entry>,
}

impl MappedSafetensors {
    /// Maps `files` and reads their headers (nothing else is read until used).
    pub fn open(files: &[PathBuf]) -> Result<MappedSafetensors, ModelError> {
        let mut mapped = MappedSafetensors::default();
        for (index, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: mapped read-only; trainyard never writes a model directory it is
            // reading (stage inputs are immutable store entries or the user's files).
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
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
    /// place rather than widening them).
    pub fn has_half_tensors(&self) -> bool {
        self.entries.values().any(|entry| {
            matches!(
                entry.dtype,
                safetensors::Dtype::BF16 | safetensors::Dtype::F16
            )
        })
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
        let Some(entry) = self.entries.get(name) else {
            return Ok(None);
        };
        let kind = match entry.dtype {
            safetensors::Dtype::BF16 => HalfType::Bf16,
            safetensors::Dtype::F16 => HalfType::F16,
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
        Ok(Some(MappedMatrix {
            map: self.maps[entry.file].clone(),
            offset: entry.offset,
            rows,
            cols,
            kind,
            name: name.to_string(),
        }))
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|entry| self.paths[entry.file].as_path())
    }
}
