//! Attention, as every family computes it: [`attend`] is the one place where the kernel
//! is chosen, by [`Kernels`], for training, evaluation and cached generation alike.
//!
//! Its fused causal attention for training on the CPU, [`causal_attention`], computes
//! `softmax(q·kᵀ·scale + causal)·v` row by row with an online softmax (flash-attention
//! style), forward and backward, as one candle custom op.
//!
//! Each block of 64 query rows is three or five `gemm` products (scores, output; in
//! the backward pass also the probabilities' and the inputs' gradients) around a
//! softmax over the block's causal keys.
//!
//! The composed version (`matmul`, scale, mask, `softmax`, `matmul`, with the key and
//! value heads repeated for grouped-query attention) keeps about five `[B, H, T, T]`
//! tensors per layer alive for the backward pass: 0.3 GB per layer of a Qwen2.5-0.5B at
//! batch 4 × 512. This op keeps the output and one log-sum-exp per query row; the
//! backward pass recomputes the probabilities from them. No mask tensor exists, the
//! key/value heads are read in place by every query head of their group, and the key
//! and value gradients of a group are summed by the one task that owns them.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{borrowed_f32, contiguous_f32};
use super::kv_cache::{KvRows, LayerKv};

/// Which kernels a forward pass may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Only ops with a backward pass: candle's composed primitives, or trainyard's fused
    /// ops with a hand-written backward where [`super::fused::applies`]. Training and
    /// evaluation take this path.
    Differentiable,
    /// Also candle's fused kernels (`ops::rms_norm`, `ops::layer_norm`,
    /// `rotary_emb::rope`, `softmax_last_dim`), which silently cut the gradient, and
    /// GPT-2's 2-D matmuls: for cached generation, never for training.
    Inference,
}

/// Attention of the queries `q: [B, H, T, D]` of `T` new positions over their keys and
/// values `k, v: [B, KV, T, D]` and, with a `cache`, those of the positions before them
/// (the cache then holds the new ones too), scaled by `scale`, with `mask` from
/// [`causal_mask`]. Query head `h` reads key/value head `h / (H / KV)`. `[B, H, T, D]`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    cache: Option<&mut LayerKv>,
    kernels: Kernels,
) -> Result<Tensor> {
    let (k, v) = match cache {
        Some(cache)
            if kernels == Kernels::Inference
                && q.dim(2)? <= DECODE_QUERIES
                && super::fused::applies(q)
                && cache.takes_rows(k, v) =>
        {
            return decode_attention(q, cache.append_rows(k, v)?, scale);
        }
        Some(cache) => cache.append(k, v)?,
        None => (k.clone(), v.clone()),
    };
    let composed = |k_t: Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&k_t)? * scale)?;
        match mask {
            Some(mask) => scores.broadcast_add(mask),
            None => Ok(scores),
        }
    };
    let group = q.dim(1)? / k.dim(1)?;
    // The kernel choice, for every family: fused attention for inference goes here.
    match kernels {
        // The fused op masks causally over as many keys as queries: no cached keys before.
        Kernels::Differentiable if super::fused::applies(q) && k.dim(2)? == q.dim(2)? => {
            causal_attention(q, &k, &v, scale)
        }
        Kernels::Differentiable => {
            let k_t = repeat_kv(&k, group)?.t()?.contiguous()?;
            let probs = candle_nn::ops::softmax(&composed(k_t)?, D::Minus1)?;
            probs.matmul(&repeat_kv(&v, group)?)
        }
        Kernels::Inference => {
            let k_t = repeat_kv(&k, group)?.t()?;
            let probs = candle_nn::ops::softmax_last_dim(&composed(k_t)?)?;
            probs.matmul(&repeat_kv(&v, group)?)
        }
    }
}

/// Up to this many new positions (one-token decoding), cached attention is computed
/// in one pass over the cache's rows ([`decode_attention`]); more (a prompt) take the
/// matrix products.
const DECODE_QUERIES: usize = 8;

/// Attention of the `T` newest positions `q: [B, H, T, D]` over every position the
/// cache `rows` holds (these `T` last), causally: new position `i` sees the cached ones
/// and the new ones up to itself. One pass per query row, heads spread over threads:
/// no score tensor, mask, softmax op, repeated key/value heads or concatenated cache.
fn decode_attention(q: &Tensor, rows: &KvRows, scale: f64) -> Result<Tensor> {
    let (batch, heads, new, dim) = q.dims4()?;
    let (kv_batch, kv_heads, kv_dim) = rows.dims();
    if (kv_batch, kv_dim) != (batch, dim)
        || kv_heads == 0
        || heads % kv_heads != 0
        || rows.len() < new
    {
        candle_core::bail!(
            "cached attention: q {:?} against a cache of [{kv_batch}, {kv_heads}, {}, {kv_dim}]",
            q.dims(),
            rows.len()
        );
    }
    let group = heads / kv_heads;
    let past = rows.len() - new;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let scale = scale as f32;
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(new * dim)
        .zip(q.par_chunks(new * dim))
        .enumerate()
        .for_each(|(index, (out, q))| {
            let (b, h) = (index / heads, index % heads);
            let (keys, values) = rows.head(b, h / group);
            let mut scores = vec![0f32; rows.len()];
            for (i, (out, q)) in out.chunks_mut(dim).zip(q.chunks(dim)).enumerate() {
                let visible = &mut scores[..past + i + 1];
                for (score, key) in visible.iter_mut().zip(keys.chunks(dim)) {
                    *score = dot(q, key) * scale;
                }
                let max = super::exp::max_of(visible);
                visible.iter_mut().for_each(|score| *score -= max);
                super::exp::exp_in_place(visible);
                let inverse = 1.0 / super::exp::sum_of(visible);
                for (weight, value) in visible.iter().zip(values.chunks(dim)) {
                    let weight = weight * inverse;
                    for (out, value) in out.iter_mut().zip(value) {
                        *out += weight * value;
                    }
                }
            }
        });
    Tensor::from_vec(out, (batch, heads, new, dim), &candle_core::Device::Cpu)
}

/// The additive mask `[T, P + T]` of `T` new positions after `P` cached ones: new
/// position `i` sees every cached position and the new ones up to itself (0), not those
/// after it (-inf). `None` for a single new position, which sees every key.
pub fn causal_mask(
    new: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    if new == 1 {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..new)
        .flat_map(|i| {
            (0..past + new).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(mask, (new, past + new), device)?.to_dtype(dtype)?,
    ))
}

/// Repeats each of the kv heads of `x: [B, KV, T, D]` `n_rep` times → `[B, KV·n_rep, T, D]`
/// (head `h` of the result is kv head `h / n_rep`, as HF's `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (batch, kv_heads, seq, head_dim) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((batch, kv_heads, n_rep, seq, head_dim))?
        .reshape((batch, kv_heads * n_rep, seq, head_dim))
}

/// Causal attention of `q: [B, H, T, D]` over `k, v: [B, KV, T, D]` (f32; query head `h`
/// reads key/value head `h / (H / KV)`), scaled by `scale`: `[B, H, T, D]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (batch, heads, seq, dim) = q.dims4()?;
    let (kv_batch, kv_heads, kv_seq, kv_dim) = k.dims4()?;
    if v.dims4()? != (kv_batch, kv_heads, kv_seq, kv_dim)
        || (kv_batch, kv_seq, kv_dim) != (batch, seq, dim)
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        candle_core::bail!(
            "causal attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            shape: Dims {
                batch,
                heads,
                kv_heads,
                seq,
                dim,
            },
            scale: scale as f32,
            log_sum_exp: Mutex::new(Vec::new()),
        },
    )
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    dim: usize,
}

impl Dims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The `[T, D]` block of query head `h` of row `b`, in a `[B, H, T, D]` buffer.
    fn q_block(&self, b: usize, h: usize) -> std::ops::Range<usize> {
        let size = self.seq * self.dim;
        let start = (b * self.heads + h) * size;
        start..start + size
    }

    /// The `[T, D]` block of key/value head `g` of row `b`, in a `[B, KV, T, D]` buffer.
    fn kv_block(&self, b: usize, g: usize) -> std::ops::Range<usize> {
        let size = self.seq * self.dim;
        let start = (b * self.kv_heads + g) * size;
        start..start + size
    }
}

struct CausalAttention {
    shape: Dims,
    scale: f32,
    /// The forward pass's log-sum-exp per query row `[B, H, T]`, for the backward pass.
    log_sum_exp: Mutex<Vec<f32>>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators let the compiler keep several vector lanes busy.
    let mut sums = [0f32; 4];
    let chunks = a.len() / 4 * 4;
    for (x, y) in a[..chunks].chunks_exact(4).zip(b[..chunks].chunks_exact(4)) {
        for lane in 0..4 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    sums.iter().sum::<f32>() + tail
}

/// Query rows per block: the scores of a block (`rows × keys`) are one `gemm` product.
const BLOCK_ROWS: usize = 64;

/// A row-major matrix operand of [`product`]: its data and row/column strides (a
/// transposed view swaps them).
#[derive(Clone, Copy)]
struct Operand {
    data: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Operand {
    /// `rows × cols` stored row-major with `cols` per row, from `offset`.
    fn rows(data: &[f32], offset: usize, cols: usize) -> Operand {
        Operand {
            data: data[offset..].as_ptr(),
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose of [`Operand::rows`].
    fn transposed(data: &[f32], offset: usize, cols: usize) -> Operand {
        Operand {
            data: data[offset..].as_ptr(),
            row_stride: 1,
            col_stride: cols as isize,
        }
    }
}

/// `dst[m × n] (row stride dst_stride) = (accumulate ? dst : 0) + scale · a[m × k] · b[k × n]`
/// by `gemm` on this thread (the heads are already spread over threads).
///
/// # Safety
/// `a` must address `m × k` valid values, `b` `k × n`, and `dst` `m` rows of `n` values
/// with row stride `dst_stride`, not overlapping `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
) {
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            a.data,
            a.col_stride,
            a.row_stride,
            b.data,
            b.col_stride,
            b.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl CausalAttention {
    /// The scaled scores `q[first..first + rows] · k[0..keys]ᵀ` of a block of query rows
    /// over its causal keys (`keys = first + rows`), into `out` (`rows × keys`).
    fn block_scores(
        &self,
        q: &[f32],
        k: &[f32],
        first: usize,
        rows: usize,
        dim: usize,
        out: &mut [f32],
    ) {
        let keys = first + rows;
        assert!(q.len() >= keys * dim && k.len() >= keys * dim && out.len() >= rows * keys);
        // SAFETY: the assertion above: q's rows first..keys and k's rows 0..keys exist
        // (D values each), and out holds rows × keys values.
        unsafe {
            product(
                rows,
                keys,
                dim,
                out.as_mut_ptr(),
                keys,
                false,
                Operand::rows(q, first * dim, dim),
                Operand::transposed(k, 0, dim),
                self.scale,
            );
        }
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(s1, l1, "causal attention (q)")?,
            contiguous_f32(s2, l2, "causal attention (k)")?,
            contiguous_f32(s3, l3, "causal attention (v)")?,
        );
        let dims = self.shape;
        let (seq, dim) = (dims.seq, dims.dim);
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; dims.batch * dims.heads * seq];
        out.par_chunks_mut(seq * dim)
            .zip(lse.par_chunks_mut(seq))
            .enumerate()
            .for_each(|(index, (out, lse))| {
                let (b, h) = (index / dims.heads, index % dims.heads);
                let q = &q[dims.q_block(b, h)];
                let kv = dims.kv_block(b, h / dims.group());
                let (k, v) = (&k[kv.clone()], &v[kv]);
                let mut probs = vec![0f32; BLOCK_ROWS * seq];
                for first in (0..seq).step_by(BLOCK_ROWS) {
                    let rows = BLOCK_ROWS.min(seq - first);
                    // Causal: the block's last query sees keys 0..=first + rows - 1.
                    let keys = first + rows;
                    self.block_scores(q, k, first, rows, dim, &mut probs);
                    for (r, row) in probs[..rows * keys].chunks_mut(keys).enumerate() {
                        let i = first + r;
                        let max = super::exp::max_of(&row[..=i]);
                        let live = &mut row[..=i];
                        live.iter_mut().for_each(|p| *p -= max);
                        super::exp::exp_in_place(live);
                        let sum = super::exp::sum_of(live);
                        let inverse = 1.0 / sum;
                        for p in &mut row[..=i] {
                            *p *= inverse;
                        }
                        row[i + 1..].fill(0.0);
                        lse[i] = max + sum.ln();
                    }
                    // SAFETY: out's rows first..keys, probs (rows × keys) and v's rows
                    // 0..keys exist.
                    unsafe {
                        product(
                            rows,
                            dim,
                            keys,
                            out[first * dim..].as_mut_ptr(),
                            dim,
                            false,
                            Operand::rows(&probs, 0, keys),
                            Operand::rows(v, 0, dim),
                            1.0,
                        );
                    }
                }
            });
        if let Ok(mut saved) = self.log_sum_exp.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.shape;
        let (seq, dim, group) = (dims.seq, dims.dim, dims.group());
        let grad = grad.contiguous()?;
        let guards = [q, k, v, out, &grad].map(|t| t.storage_and_layout());
        let [qv, kv, vv, ov, gv] = [0, 1, 2, 3, 4]
            .map(|i| borrowed_f32(&guards[i].0, guards[i].1, "causal attention (backward)"));
        let (qv, kv, vv, ov, gv) = (qv?, kv?, vv?, ov?, gv?);
        let lse = match self.log_sum_exp.lock() {
            Ok(saved) if saved.len() == dims.batch * dims.heads * seq => saved.clone(),
            _ => candle_core::bail!("causal attention: backward before forward"),
        };
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        // One task per key/value head: it owns that head's dk and dv and the dq of its
        // group's query heads.
        dq.par_chunks_mut(group * seq * dim)
            .zip(dk.par_chunks_mut(seq * dim))
            .zip(dv.par_chunks_mut(seq * dim))
            .enumerate()
            .for_each(|(index, ((dq, dk), dv))| {
                let (b, g) = (index / dims.kv_heads, index % dims.kv_heads);
                let kv_range = dims.kv_block(b, g);
                let (k, v) = (&kv[kv_range.clone()], &vv[kv_range]);
                let mut probs = vec![0f32; BLOCK_ROWS * seq];
                let mut d_scores = vec![0f32; BLOCK_ROWS * seq];
                for member in 0..group {
                    let h = g * group + member;
                    let range = dims.q_block(b, h);
                    let (q, o, d_o) = (&qv[range.clone()], &ov[range.clone()], &gv[range]);
                    let dq = &mut dq[member * seq * dim..(member + 1) * seq * dim];
                    let lse = &lse[(b * dims.heads + h) * seq..(b * dims.heads + h + 1) * seq];
                    for first in (0..seq).step_by(BLOCK_ROWS) {
                        let rows = BLOCK_ROWS.min(seq - first);
                        let keys = first + rows;
                        self.block_scores(q, k, first, rows, dim, &mut probs);
                        // SAFETY (every product below): the operands are rows of q, o,
                        // d_o, k, v, dq, dk, dv (D values each) below `keys`, and the
                        // block buffers of rows × keys values.
                        unsafe {
                            product(
                                rows,
                                keys,
                                dim,
                                d_scores.as_mut_ptr(),
                                keys,
                                false,
                                Operand::rows(d_o, first * dim, dim),
                                Operand::transposed(v, 0, dim),
                                1.0,
                            );
                        }
                        for (r, (p_row, d_row)) in probs[..rows * keys]
                            .chunks_mut(keys)
                            .zip(d_scores[..rows * keys].chunks_mut(keys))
                            .enumerate()
                        {
                            let i = first + r;
                            let delta =
                                dot(&d_o[i * dim..(i + 1) * dim], &o[i * dim..(i + 1) * dim]);
                            let live = &mut p_row[..=i];
                            live.iter_mut().for_each(|p| *p -= lse[i]);
                            super::exp::exp_in_place(live);
                            for (p, d) in p_row[..=i].iter().zip(&mut d_row[..=i]) {
                                *d = *p * (*d - delta) * self.scale;
                            }
                            p_row[i + 1..].fill(0.0);
                            d_row[i + 1..].fill(0.0);
                        }
                        unsafe {
                            // dV += Pᵀ·dO, dQ = dS·K, dK += dSᵀ·Q.
                            product(
                                keys,
                                dim,
                                rows,
                                dv.as_mut_ptr(),
                                dim,
                                true,
                                Operand::transposed(&probs, 0, keys),
                                Operand::rows(d_o, first * dim, dim),
                                1.0,
                            );
                            product(
                                rows,
                                dim,
                                keys,
                                dq[first * dim..].as_mut_ptr(),
                                dim,
                                false,
                                Operand::rows(&d_scores, 0, keys),
                                Operand::rows(k, 0, dim),
                                1.0,
                            );
                            product(
                                keys,
                                dim,
                                rows,
                                dk.as_mut_ptr(),
                                dim,
                                true,
                                Operand::transposed(&d_scores, 0, keys),
                                Operand::rows(q, first * dim, dim),
                                1.0,
                            );
                        }
                    }
                }
            });
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{
        assert_finite_differences, assert_same_op, linear_loss, max_diff, random,
    };

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (_, heads, seq, _) = q.dims4().unwrap();
        let group = heads / k.dims4().unwrap().1;
        let k = repeat_kv(k, group).unwrap();
        let v = repeat_kv(v, group).unwrap();
        let mask = causal_mask(seq, 0, q.dtype(), q.device()).unwrap().unwrap();
        let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
    }

    #[test]
    fn repeat_kv_gives_consecutive_query_heads_the_same_kv_head() {
        let x = random(&[1, 2, 3, 4], 4);
        let x = x.as_tensor();
        let repeated = repeat_kv(x, 3).unwrap();
        assert_eq!(repeated.dims(), [1, 6, 3, 4]);
        for head in 0..6 {
            let got = repeated.narrow(1, head, 1).unwrap();
            let want = x.narrow(1, head / 3, 1).unwrap();
            assert_eq!(max_diff(&got, &want), 0.0);
        }
    }

    /// Output and the gradients of q, k and v equal the composed version's, with
    /// grouped-query heads (4 query heads over 2 key/value heads), in one block of query
    /// rows and in several (the last one partial).
    #[test]
    fn equals_the_composed_attention_forward_and_backward() {
        for seq in [7, 150] {
            check_against_composed(seq);
        }
    }

    fn check_against_composed(seq: usize) {
        let (q, k, v) = (
            random(&[2, 4, seq, 8], 1),
            random(&[2, 2, seq, 8], 2),
            random(&[2, 2, seq, 8], 3),
        );
        let scale = 1.0 / 8f64.sqrt();
        assert_same_op(
            &[&q, &k, &v],
            1e-5,
            |t| causal_attention(&t[0], &t[1], &t[2], scale).unwrap(),
            |t| composed(&t[0], &t[1], &t[2], scale),
        );
    }

    /// The gradient of q agrees with central finite differences, in f64 on the composed
    /// reference's terms (the op itself is f32).
    #[test]
    fn gradients_agree_with_finite_differences() {
        let (q, k, v) = (
            random(&[1, 2, 5, 4], 5),
            random(&[1, 1, 5, 4], 6),
            random(&[1, 1, 5, 4], 7),
        );
        let weights = random(&[1, 2, 5, 4], 8);
        let scale = 0.5;
        let loss = |q: &Tensor, k: &Tensor| {
            let out = causal_attention(q, k, v.as_tensor(), scale).unwrap();
            linear_loss(&out, weights.as_tensor())
        };
        let out = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        let grads = (out * weights.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (dq, dk) = (grads.get(&q).unwrap(), grads.get(&k).unwrap());
        let indices = |x: &Tensor| [0, 3, 7, x.elem_count() - 1];
        assert_finite_differences("q", &q, dq, &indices(&q), |q| loss(q, &k));
        assert_finite_differences("k", &k, dk, &indices(&k), |k| loss(&q, k));
    }
}
