//! The weight matrices of the model's layers: a candle tensor (trainable, or a frozen
//! f32 base) or a frozen bf16/f16 matrix read in place from its file
//! ([`super::mapped`]). [`Linear`] and [`Embedding`] hide which, so the families' code
//! reads the same either way; on tensors they compute exactly as `candle_nn`'s layers.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::fused::{contiguous_f32, with_last_dim};
use super::mapped::{MappedMatrix, MappedSafetensors};
use super::vocab::TokenRows;

/// A weight matrix: a tensor, or a mapped bf16/f16 matrix (always computed in f32).
#[derive(Debug, Clone)]
pub enum Matrix {
    /// A candle tensor (a `Var`'s when trainable).
    Tensor(Tensor),
    /// Read in place from a safetensors file.
    Mapped(MappedMatrix),
}

impl Matrix {
    /// `{vb}.{name}` of shape `[rows, cols]`: mapped when `mapped` (a frozen base's
    /// files) holds that tensor in bf16/f16, else through the `VarBuilder`.
    pub fn load(
        mapped: Option<&MappedSafetensors>,
        vb: &VarBuilder<'_>,
        name: &str,
        shape: (usize, usize),
    ) -> Result<Matrix> {
        if let Some(mapped) = mapped
            && let Some(matrix) = mapped
                .matrix(&full_name(vb, name), shape)
                .map_err(|error| candle_core::Error::Msg(error.to_string()))?
        {
            return Ok(Matrix::Mapped(matrix));
        }
        Ok(Matrix::Tensor(vb.get(shape, name)?))
    }
}

/// `{vb's prefix}.{name}`.
fn full_name(vb: &VarBuilder<'_>, name: &str) -> String {
    match vb.prefix() {
        prefix if prefix.is_empty() => name.to_string(),
        prefix => format!("{prefix}.{name}"),
    }
}

/// `y = x·Wᵀ + b` with `W: [out, in]` (`nn.Linear`), or `y = x·W + b` with `W: [in, out]`
/// (HF's `Conv1D`, GPT-2's layers: see [`Linear::load_conv1d`]).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    /// Trainable token rows (a head over a grown vocabulary).
    rows: Option<TokenRows>,
    /// `weight` is `[in, out]` (a `Conv1D` kept in its stored layout).
    in_out: bool,
}

impl Linear {
    /// `{vb}.weight` `[out, in]` and, with `bias`, `{vb}.bias` `[out]` (biases are
    /// small and always loaded as tensors of the compute dtype).
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        mapped: Option<&MappedSafetensors>,
        vb: VarBuilder<'_>,
    ) -> Result<Linear> {
        let weight = Matrix::load(mapped, &vb, "weight", (out_dim, in_dim))?;
        let bias = match bias {
            true => Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?),
            false => None,
        };
        Ok(Linear {
            weight,
            bias,
            rows: None,
            in_out: false,
        })
    }

    /// HF's `Conv1D` `{vb}.weight` `[in, out]` and `{vb}.bias` `[out]`: `y = x·W + b`.
    /// The weight stays in its stored layout, so a trainable one has HF's name and
    /// shape; held quantized (a QLoRA base), it is the transpose `[out, in]`, as
    /// bitsandbytes quantizes a `Conv1D`.
    pub fn load_conv1d(
        in_dim: usize,
        out_dim: usize,
        mapped: Option<&MappedSafetensors>,
        vb: VarBuilder<'_>,
    ) -> Result<Linear> {
        let held = match mapped {
            Some(mapped) => mapped
                .conv1d_matrix(&full_name(&vb, "weight"), (in_dim, out_dim))
                .map_err(|error| candle_core::Error::Msg(error.to_string()))?,
            None => None,
        };
        let (weight, in_out) = match held {
            Some((matrix, transposed)) => (Matrix::Mapped(matrix), !transposed),
            None => (Matrix::Tensor(vb.get((in_dim, out_dim), "weight")?), true),
        };
        let bias = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Linear {
            weight,
            bias: Some(bias),
            rows: None,
            in_out,
        })
    }

    /// A bias-free layer over an existing matrix (a head tied to the embeddings).
    pub fn new(weight: Matrix) -> Linear {
        Linear {
            weight,
            bias: None,
            rows: None,
            in_out: false,
        }
    }

    /// The layer with the output rows of some tokens replaced or added by `rows` (a
    /// head over a vocabulary grown by `add_tokens`).
    pub fn with_token_rows(self, rows: Option<TokenRows>) -> Linear {
        Linear { rows, ..self }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_table(x)?;
        match &self.rows {
            Some(rows) => rows.logits(x, y),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// The gradient of the input of the frozen product `x·Wᵀ`: `g·W` for `g: […, out]`
    /// (`g·Wᵀ` for a `Conv1D`'s `x·W`).
    pub fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match (&self.weight, self.in_out) {
            (Matrix::Tensor(weight), false) => grad.broadcast_matmul(weight),
            (Matrix::Tensor(weight), true) => grad.broadcast_matmul(&weight.t()?),
            (Matrix::Mapped(matrix), false) => matrix.matmul(grad),
            (Matrix::Mapped(matrix), true) => matrix.matmul_t(grad),
        }
    }

    /// `x·W` (+ bias) of a `Conv1D` layer, `W: [in, out]`.
    fn forward_in_out(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // One 2-D product over every position (a batched one would run per row).
            Matrix::Tensor(weight) => {
                let width = x.dim(candle_core::D::Minus1)?;
                let leading = &x.dims()[..x.rank() - 1];
                let mut shape = leading.to_vec();
                shape.push(weight.dim(1)?);
                x.reshape(((), width))?.matmul(weight)?.reshape(shape)?
            }
            Matrix::Mapped(matrix) => matrix.matmul(x)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    fn forward_table(&self, x: &Tensor) -> Result<Tensor> {
        if self.in_out {
            return self.forward_in_out(x);
        }
        match &self.weight {
            Matrix::Tensor(weight) => match super::precision::bf16_unit() {
                Some(unit) if super::fused::applies(x) && super::fused::applies(weight) => {
                    let y = super::precision::linear(x, weight, unit)?;
                    match &self.bias {
                        Some(bias) => y.broadcast_add(bias),
                        None => Ok(y),
                    }
                }
                _ if few_rows(x, weight) => {
                    let y = x.contiguous()?.apply_op2(weight, FewRowProduct)?;
                    match &self.bias {
                        Some(bias) => y.broadcast_add(bias),
                        None => Ok(y),
                    }
                }
                _ => candle_nn::Linear::new(weight.clone(), self.bias.clone()).forward(x),
            },
            Matrix::Mapped(matrix) => {
                let y = matrix.matmul_t(x)?;
                match &self.bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
        }
    }
}

/// Whether `x·Wᵀ` is a product of a few rows (one-token decoding) that
/// [`FewRowProduct`] computes: f32 on the CPU. Trained or not, so that a model gives the
/// same numbers whether gradients are tracked (a zero adapter changes nothing).
fn few_rows(x: &Tensor, weight: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let (Ok((_, inner)), Some(&last)) = (weight.dims2(), x.dims().last()) else {
        return false;
    };
    f32_cpu(x)
        && f32_cpu(weight)
        && weight.is_contiguous()
        && last == inner
        && x.elem_count() <= inner * super::mapped::SMALL_M
}

/// `x·Wᵀ` for the few rows [`few_rows`] allows, spread over threads by weight rows
/// ([`super::mapped::few_row_product_t`]).
struct FewRowProduct;

impl CustomOp2 for FewRowProduct {
    fn name(&self) -> &'static str {
        "few-row-linear"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x_storage, x_layout, self.name())?;
        let w = contiguous_f32(w_storage, w_layout, self.name())?;
        let (n, k) = w_layout.shape().dims2()?;
        let y = super::mapped::few_row_product_t(x, x.len() / k.max(1), w, n, k);
        Ok((CpuStorage::F32(y), with_last_dim(x_layout.dims(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _result: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = weight.dims2()?;
        let grad_x = grad.broadcast_matmul(weight)?;
        let rows = x.elem_count() / k.max(1);
        let grad_weight = grad
            .reshape((rows, n))?
            .t()?
            .matmul(&x.reshape((rows, k))?)?;
        Ok((Some(grad_x), Some(grad_weight)))
    }
}

/// A lookup table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Matrix,
    hidden: usize,
    /// Trainable token rows (a vocabulary grown by `add_tokens`).
    rows: Option<TokenRows>,
}

impl Embedding {
    /// `{vb}.weight` `[count, hidden]`.
    pub fn load(
        count: usize,
        hidden: usize,
        mapped: Option<&MappedSafetensors>,
        vb: VarBuilder<'_>,
    ) -> Result<Embedding> {
        Ok(Embedding {
            weight: Matrix::load(mapped, &vb, "weight", (count, hidden))?,
            hidden,
            rows: None,
        })
    }

    /// The table with the rows of some tokens replaced or added by `rows`.
    pub fn with_token_rows(self, rows: Option<TokenRows>) -> Embedding {
        Embedding { rows, ..self }
    }

    /// The table itself.
    pub fn matrix(&self) -> &Matrix {
        &self.weight
    }

    /// The trainable token rows over the table, if any (a tied head shares them).
    pub fn token_rows(&self) -> Option<&TokenRows> {
        self.rows.as_ref()
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.rows {
            Some(rows) => rows.embed(ids, |ids| self.lookup(ids)),
            None => self.lookup(ids),
        }
    }
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Matrix::Tensor(weight) => {
                candle_nn::Embedding::new(weight.clone(), self.hidden).forward(ids)
            }
            Matrix::Mapped(matrix) => {
                let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let rows = matrix.gather_rows(&flat)?;
                let mut shape = ids.dims().to_vec();
                shape.push(self.hidden);
                Tensor::from_vec(rows, shape, ids.device())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, random};

    /// One-token products of f32 weights (spread over threads by weight rows) equal
    /// candle's `Linear` within a few ulps and give the same bits at any thread count;
    /// their gradients are candle's.
    #[test]
    fn few_row_products_match_candle_linear_at_any_thread_count() {
        // Not a multiple of the 64-value steps nor of the 16 lanes.
        let (rows, cols) = (150, 301);
        let weight = random(&[rows, cols], 1).as_tensor().detach();
        let bias = random(&[rows], 2).as_tensor().detach();
        let layer = Linear {
            weight: Matrix::Tensor(weight.clone()),
            bias: Some(bias.clone()),
            rows: None,
            in_out: false,
        };
        let reference = candle_nn::Linear::new(weight, Some(bias));
        for m in [1, 3, 8] {
            let x = random(&[1, m, cols], 10 + m as u64).as_tensor().detach();
            assert!(few_rows(&x, reference.weight()));
            let in_pool = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let y = pool.install(|| layer.forward(&x)).unwrap();
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let one = in_pool(1);
            assert_eq!(one, in_pool(2), "m={m}: sums depend on the thread count");
            let want = reference.forward(&x).unwrap();
            let got = Tensor::from_vec(one, want.shape(), want.device()).unwrap();
            // 301-term sums (|y| up to ~10) in another order: a few f32 ulps.
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5 * 10.0, "m={m}: off by {diff}");
        }
        // Trainable: the gradients of weight and input are candle's.
        let trainable = random(&[rows, cols], 3);
        let x = random(&[1, 3, cols], 4);
        let gradients = |y: Tensor| {
            let loss = (y.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            let of = |var: &candle_core::Var| grads.get(var.as_tensor()).unwrap().clone();
            (of(&trainable), of(&x))
        };
        let ours = gradients(
            Linear::new(Matrix::Tensor(trainable.as_tensor().clone()))
                .forward(x.as_tensor())
                .unwrap(),
        );
        let theirs = gradients(
            candle_nn::Linear::new(trainable.as_tensor().clone(), None)
                .forward(x.as_tensor())
                .unwrap(),
        );
        for (name, got, want) in [
            ("weight", &ours.0, &theirs.0),
            ("input", &ours.1, &theirs.1),
        ] {
            let diff = max_diff(got, want);
            assert!(diff < 1e-4 * 10.0, "{name} gradient off by {diff}");
        }
    }
}
