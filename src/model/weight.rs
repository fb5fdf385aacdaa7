//! The weight matrices of the model's layers: a candle tensor (trainable, or a frozen
//! f32 base) or a frozen bf16/f16 matrix read in place from its file
//! ([`super::mapped`]). [`Linear`] and [`Embedding`] hide which, so the families' code
//! reads the same either way; on tensors they compute exactly as `candle_nn`'s layers.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

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
        if let Some(mapped) = mapped {
            let full = match vb.prefix() {
                prefix if prefix.is_empty() => name.to_string(),
                prefix => format!("{prefix}.{name}"),
            };
            if let Some(matrix) = mapped
                .matrix(&full, shape)
                .map_err(|error| candle_core::Error::Msg(error.to_string()))?
            {
                return Ok(Matrix::Mapped(matrix));
            }
        }
        Ok(Matrix::Tensor(vb.get(shape, name)?))
    }
}

/// `y = x·Wᵀ + b` with `W: [out, in]` (`nn.Linear`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    /// Trainable token rows (a head over a grown vocabulary).
    rows: Option<TokenRows>,
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
        })
    }

    /// A bias-free layer over an existing matrix (a head tied to the embeddings).
    pub fn new(weight: Matrix) -> Linear {
        Linear {
            weight,
            bias: None,
            rows: None,
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
    /// The gradient of the input of the frozen product `x·Wᵀ`: `g·W` for `g: […, out]`.
    pub fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Matrix::Tensor(weight) => grad.broadcast_matmul(weight),
            Matrix::Mapped(matrix) => matrix.matmul(grad),
        }
    }

    fn forward_table(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Matrix::Tensor(weight) => match super::precision::bf16_unit() {
                Some(unit) if super::fused::applies(x) && super::fused::applies(weight) => {
                    let y = super::precision::linear(x, weight, unit)?;
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
