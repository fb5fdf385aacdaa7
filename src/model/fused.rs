//! Fused element-wise ops for training on the CPU, each one candle custom op with a
//! hand-written backward: SwiGLU, RMSNorm and RoPE.
//!
//! Composed from candle ops, every intermediate (`x²`, the mean, its root, the
//! normalised `x`; `silu(gate)`; the rotated halves and their concatenation) stays
//! alive in the autograd graph until the backward pass: for a Qwen2.5-0.5B at batch 4 ×
//! 512 several gigabytes. A fused op keeps only its inputs, which the graph holds
//! anyway, and recomputes what its backward pass needs. Rows are spread over threads
//! with rayon; the inner loops are plain slices the compiler vectorises for the
//! instructions it may assume.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether the fused ops (these, causal attention and the LoRA projection) compute for
/// `x`: f32 on the CPU. Other dtypes and devices take the composed candle ops.
pub fn applies(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::F32 && x.device().is_cpu()
}

/// `len` values written by `fill`, chunk by chunk on rayon's threads, into memory that
/// is never zeroed first: `fill(index, chunk)` must write every element of chunk
/// `index` (`chunk_len` values; the last may be shorter). A zero-filled output cost a
/// `memset` pass per op: 6% of a small model's training step.
pub(crate) fn filled_par(
    len: usize,
    chunk_len: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk_len.max(1))
        .enumerate()
        .for_each(|(index, chunk)| fill(index, chunk));
    // SAFETY: every element of `..len` was written by `fill` (its contract); a panic
    // in it propagates before this line, leaving the vector empty.
    unsafe { out.set_len(len) };
    out
}

/// A raw pointer to an output's slots that several rayon tasks write, each its own
/// disjoint range.
struct SharedSlots(*mut std::mem::MaybeUninit<f32>);

// SAFETY: the tasks holding it write disjoint ranges (see its uses).
unsafe impl Send for SharedSlots {}
// SAFETY: as above.
unsafe impl Sync for SharedSlots {}

impl SharedSlots {
    fn get(&self) -> *mut std::mem::MaybeUninit<f32> {
        self.0
    }
}

/// Values per block of the element-wise ops' inner loops: `exp` fills a stack buffer
/// this long, and the results go straight to the output.
const ELEMENT_BLOCK: usize = 256;

/// `dims` with the last dimension replaced by `last`: the output shape of a product
/// `[…, in] → […, out]`.
pub(crate) fn with_last_dim(dims: &[usize], last: usize) -> Shape {
    let mut shape = dims.to_vec();
    if let Some(end) = shape.last_mut() {
        *end = last;
    }
    Shape::from(shape)
}

/// The values of a custom op's f32 input, which must be contiguous; errors name `op`.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op}: f32 inputs only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input is not contiguous");
    };
    Ok(&values[start..end])
}

/// The values of a contiguous f32 CPU tensor, borrowed from its storage guard
/// (`tensor.storage_and_layout()`): a backward pass reads its inputs without copying.
pub(crate) fn borrowed_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(storage) => contiguous_f32(storage, layout, op),
        _ => candle_core::bail!("{op}: CPU tensors only"),
    }
}

fn values(tensor: &Tensor) -> Result<Vec<f32>> {
    tensor.detach().flatten_all()?.to_vec1::<f32>()
}

/// `out[i] = e^(−gate[i])`, the denominator of the sigmoid, for a whole chunk at once.
fn exp_negated(gate: &[f32], out: &mut [f32]) {
    for (out, &g) in out.iter_mut().zip(gate) {
        *out = -g;
    }
    super::exp::exp_in_place(out);
}

/// `silu(gate) · up`, element-wise (the SwiGLU of llama-family MLPs).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (
            contiguous_f32(s1, l1, "swiglu")?,
            contiguous_f32(s2, l2, "swiglu")?,
        );
        const CHUNK: usize = 1 << 14;
        let out = filled_par(gate.len(), CHUNK, |index, out| {
            let start = index * CHUNK;
            let mut exps = [0f32; ELEMENT_BLOCK];
            for (block, out) in out.chunks_mut(ELEMENT_BLOCK).enumerate() {
                let from = start + block * ELEMENT_BLOCK;
                let (gate, up) = (&gate[from..from + out.len()], &up[from..from + out.len()]);
                let exps = &mut exps[..out.len()];
                exp_negated(gate, exps);
                for (((out, &e), &g), &u) in out.iter_mut().zip(exps.iter()).zip(gate).zip(up) {
                    let s = 1.0 / (1.0 + e);
                    out.write(g * s * u);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gate_storage, gate_layout) = gate.storage_and_layout();
        let (up_storage, up_layout) = up.storage_and_layout();
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let g = borrowed_f32(&gate_storage, gate_layout, "swiglu")?;
        let u = borrowed_f32(&up_storage, up_layout, "swiglu")?;
        let d = borrowed_f32(&grad_storage, grad_layout, "swiglu")?;
        // Both gradients in one pass: `d_up` into a second output the same chunks fill.
        const CHUNK: usize = 1 << 14;
        let mut d_up: Vec<f32> = Vec::with_capacity(g.len());
        let d_up_slots = SharedSlots(d_up.spare_capacity_mut()[..g.len()].as_mut_ptr());
        let d_gate = filled_par(g.len(), CHUNK, |index, d_gate| {
            let start = index * CHUNK;
            // SAFETY: chunk `index` of `d_up` is this closure's alone, as the same chunk
            // of `d_gate` is (`filled_par` hands each chunk to one call).
            let d_up = unsafe {
                std::slice::from_raw_parts_mut(d_up_slots.get().add(start), d_gate.len())
            };
            let mut exps = [0f32; ELEMENT_BLOCK];
            for (block, (d_gate, d_up)) in d_gate
                .chunks_mut(ELEMENT_BLOCK)
                .zip(d_up.chunks_mut(ELEMENT_BLOCK))
                .enumerate()
            {
                let from = start + block * ELEMENT_BLOCK;
                let len = d_gate.len();
                let (g, u, d) = (
                    &g[from..from + len],
                    &u[from..from + len],
                    &d[from..from + len],
                );
                let exps = &mut exps[..len];
                exp_negated(g, exps);
                for i in 0..len {
                    let s = 1.0 / (1.0 + exps[i]);
                    let silu = g[i] * s;
                    d_up[i].write(d[i] * silu);
                    d_gate[i].write(d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
                }
            }
        });
        // SAFETY: `filled_par` gave every chunk to the closure, which wrote all of
        // `d_up`'s elements in it.
        unsafe { d_up.set_len(g.len()) };
        let device = gate.device();
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), device)?),
            Some(Tensor::from_vec(d_up, up.shape(), device)?),
        ))
    }
}

/// `x / √(mean(x²) + eps) · weight` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let width = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [width] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {width}", weight.dims());
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn inverse_root(&self, row: &[f32]) -> f32 {
        let mean = super::exp::sum_of_squares(row) / row.len() as f32;
        1.0 / (mean + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, weight) = (
            contiguous_f32(s1, l1, "rms_norm")?,
            contiguous_f32(s2, l2, "rms_norm")?,
        );
        let width = weight.len();
        let out = filled_par(x.len(), width, |index, out| {
            let row = &x[index * width..(index + 1) * width];
            let r = self.inverse_root(row);
            for ((out, &v), &w) in out.iter_mut().zip(row).zip(weight) {
                out.write(v * r * w);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let xv = borrowed_f32(&x_storage, x_layout, "rms_norm")?;
        let w = borrowed_f32(&w_storage, w_layout, "rms_norm")?;
        let d = borrowed_f32(&grad_storage, grad_layout, "rms_norm")?;
        let width = w.len();
        let mut dx = vec![0f32; xv.len()];
        // Row blocks, each with its own partial sum of the weight's gradient.
        let block = 64 * width;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(block)
            .zip(xv.par_chunks(block).zip(d.par_chunks(block)))
            .map(|(dx, (x, d))| {
                let mut dw = vec![0f32; width];
                for ((dx, row), d) in dx
                    .chunks_mut(width)
                    .zip(x.chunks(width))
                    .zip(d.chunks(width))
                {
                    let r = self.inverse_root(row);
                    // dy·w projected on x̂: mean(g ⊙ x̂) with g = dy ⊙ w, x̂ = x·r.
                    let mut dot = 0f32;
                    for i in 0..width {
                        let normed = row[i] * r;
                        dw[i] += d[i] * normed;
                        dot += d[i] * w[i] * normed;
                    }
                    let mean = dot / width as f32;
                    for i in 0..width {
                        dx[i] = r * (d[i] * w[i] - row[i] * r * mean);
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; width];
        for partial in partials {
            for (total, value) in dw.iter_mut().zip(partial) {
                *total += value;
            }
        }
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dw, weight.shape(), device)?),
        ))
    }
}

/// Rotary embedding of `x: [B, H, T, D]` in HF's half-split layout: for `i < D/2`,
/// `(x_i, x_{i+D/2})` rotated by the angle whose cosine and sine are `cos[t, i]`,
/// `sin[t, i]` (tables `[T, D]` as [`super::llama::rope_tables`] makes them for
/// [`super::Kernels::Differentiable`]).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, seq, dim) = x.dims4()?;
    if cos.dims() != [seq, dim] || sin.dims() != [seq, dim] || dim % 2 != 0 {
        candle_core::bail!(
            "rope: x {:?} with tables {:?}, {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op1(Rope {
        cos: values(cos)?,
        sin: values(sin)?,
        seq,
        dim,
    })
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    seq: usize,
    dim: usize,
}

impl Rope {
    /// Rotates every `[T, D]` block of `x` by the tables; `inverse` applies the
    /// transposed map (the backward pass of this linear map).
    fn rotate(&self, x: &[f32], inverse: bool) -> Vec<f32> {
        let (seq, dim, half) = (self.seq, self.dim, self.dim / 2);
        filled_par(x.len(), seq * dim, |index, out| {
            let x = &x[index * seq * dim..(index + 1) * seq * dim];
            for t in 0..seq {
                let row = &x[t * dim..(t + 1) * dim];
                let out = &mut out[t * dim..(t + 1) * dim];
                let (cos, sin) = (
                    &self.cos[t * dim..(t + 1) * dim],
                    &self.sin[t * dim..(t + 1) * dim],
                );
                for i in 0..half {
                    let (a, b) = (row[i], row[i + half]);
                    if inverse {
                        out[i].write(a * cos[i] + b * sin[i + half]);
                        out[i + half].write(b * cos[i + half] - a * sin[i]);
                    } else {
                        out[i].write(a * cos[i] - b * sin[i]);
                        out[i + half].write(b * cos[i + half] + a * sin[i + half]);
                    }
                }
            }
        })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "rope")?;
        Ok((
            CpuStorage::F32(self.rotate(x, false)),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let rotated = self.rotate(borrowed_f32(&storage, layout, "rope")?, true);
        Ok(Some(Tensor::from_vec(rotated, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device};

    use super::*;
    use crate::model::testing::{assert_finite_differences, assert_same_op, linear_loss, random};

    #[test]
    fn swiglu_equals_silu_times_up() {
        let (gate, up) = (random(&[3, 5, 7], 1), random(&[3, 5, 7], 2));
        assert_same_op(
            &[&gate, &up],
            1e-5,
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }

    /// Several parallel chunks of 16,384 values, the last one and its last block of 256
    /// partial: every output element and gradient is written, in its place.
    #[test]
    fn swiglu_spanning_chunks_and_blocks_equals_silu_times_up() {
        let (gate, up) = (random(&[3, 13_333], 6), random(&[3, 13_333], 7));
        assert_same_op(
            &[&gate, &up],
            1e-5,
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn rms_norm_equals_the_composed_norm() {
        let (x, weight) = (random(&[4, 3, 9], 3), random(&[9], 4));
        assert_same_op(
            &[&x, &weight],
            1e-5,
            |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            |t| {
                let mean_square = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(mean_square + 1e-6).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
        );
    }

    #[test]
    fn rope_equals_the_rotate_half_formula() {
        let x = random(&[2, 3, 5, 8], 5);
        let inv_freqs: Vec<f64> = (0..4).map(|i| 1.0 / 100f64.powf(i as f64 / 4.0)).collect();
        let (cos, sin) = crate::model::llama::rope_tables(
            0,
            5,
            &inv_freqs,
            crate::model::Kernels::Differentiable,
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_same_op(
            &[&x],
            1e-5,
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| crate::model::llama::apply_rope(&t[0], &cos, &sin).unwrap(),
        );
    }

    /// Finite differences in f64 of the f32 ops, on a few coordinates: the hand-written
    /// backward passes agree with the functions they differentiate.
    #[test]
    fn gradients_agree_with_finite_differences() {
        let x = random(&[2, 6], 7);
        let weight = random(&[6], 8);
        let up = random(&[2, 6], 9);
        let probe = random(&[2, 6], 10);
        type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let ops: Vec<(&str, Op)> = vec![
            (
                "rms_norm",
                Box::new(|x| rms_norm(x, weight.as_tensor(), 1e-5).unwrap()),
            ),
            ("swiglu", Box::new(|x| swiglu(x, up.as_tensor()).unwrap())),
        ];
        for (name, op) in ops {
            let grads = (op(x.as_tensor()) * probe.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let analytic = grads.get(x.as_tensor()).unwrap();
            assert_finite_differences(name, x.as_tensor(), analytic, &[0, 4, 9, 11], |x| {
                linear_loss(&op(x), probe.as_tensor())
            });
        }
    }
}
