//! The precision of training's matrix products: `f32`, or `bf16` compute with f32
//! master weights and optimizer state (the inputs of each product rounded to bf16, the
//! sums kept in f32, as PyTorch's bf16 autocast does) on a CPU with a native bf16 unit
//! ([`super::bf16_gemm`]). `auto` picks bf16 only there.
//!
//! The choice is a scope on the training thread ([`BF16Scope`]): the layers' products
//! ask [`bf16_unit`] when they run, and the backward pass of a product computed in
//! bf16 is computed in bf16 too. Other threads (a concurrent stage, generation) are not
//! affected.

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::bf16_gemm::{self, Bf16Unit, MatRef};
use super::fused::{borrowed_f32, contiguous_f32, with_last_dim};

/// The `precision` setting of a training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Every product in f32.
    #[default]
    F32,
    /// Products in bf16 with f32 accumulation, master weights and optimizer state; an
    /// error on a CPU without a native bf16 unit (AMX or AVX512-BF16), where emulating
    /// it would be far slower than f32.
    Bf16,
    /// `bf16` where the CPU has a native bf16 unit, else `f32`.
    Auto,
}

impl Precision {
    /// Whether this is the default (`f32`), so settings leave it out of fingerprints.
    pub fn is_default(&self) -> bool {
        *self == Precision::F32
    }

    /// The bf16 unit the products will run on (`None`: f32), or why `bf16` cannot be had.
    pub fn resolve(self) -> std::result::Result<Option<Bf16Unit>, String> {
        match (self, bf16_gemm::unit()) {
            (Precision::F32, _) => Ok(None),
            (Precision::Auto, unit) => Ok(unit),
            (Precision::Bf16, Some(unit)) => Ok(Some(unit)),
            (Precision::Bf16, None) => Err(
                "`precision: bf16` needs a CPU with AMX-BF16 or AVX512-BF16, and this one has neither (use `auto` or `f32`)"
                    .to_string(),
            ),
        }
    }
}

thread_local! {
    static UNIT: Cell<Option<Bf16Unit>> = const { Cell::new(None) };
}

/// While alive, products on this thread run on `unit` (`None`: f32).
pub struct BF16Scope {
    previous: Option<Bf16Unit>,
}

impl BF16Scope {
    /// Starts the scope.
    pub fn enter(unit: Option<Bf16Unit>) -> BF16Scope {
        BF16Scope {
            previous: UNIT.with(|cell| cell.replace(unit)),
        }
    }
}

impl Drop for BF16Scope {
    fn drop(&mut self) {
        UNIT.with(|cell| cell.set(self.previous));
    }
}

/// The unit this thread's products run on, if a [`BF16Scope`] chose one.
pub fn bf16_unit() -> Option<Bf16Unit> {
    UNIT.with(Cell::get)
}

/// `x · wᵀ` for `x: [..., in]` and `w: [out, in]` (f32 tensors) computed on `unit`,
/// differentiable in both.
pub fn linear(x: &Tensor, w: &Tensor, unit: Bf16Unit) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, LinearOp { unit })
}

struct LinearOp {
    unit: Bf16Unit,
}

/// `c[m × n] = a · b` on `unit` for row-major `a: [m, k]` read as given or transposed.
fn product(
    unit: Bf16Unit,
    (m, n, k): (usize, usize, usize),
    a: MatRef<'_>,
    b: MatRef<'_>,
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    bf16_gemm::matmul(unit, (m, n, k), a, b, &mut c);
    c
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "linear-bf16")?;
        let w = contiguous_f32(s2, l2, "linear-bf16")?;
        let (out, inner) = l2.shape().dims2()?;
        let dims = l1.shape().dims();
        if dims.last() != Some(&inner) {
            candle_core::bail!("linear-bf16: input {dims:?} against weight [{out}, {inner}]");
        }
        let rows = x.len() / inner.max(1);
        // y = x · wᵀ: w [out, in] read transposed as [in, out].
        let y = product(
            self.unit,
            (rows, out, inner),
            MatRef::row_major(x, inner),
            MatRef::transposed(w, inner),
        );
        Ok((CpuStorage::F32(y), with_last_dim(dims, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inner) = w.dims2()?;
        let rows = x.elem_count() / inner.max(1);
        let grad = grad.contiguous()?;
        let guards = [&grad, x, w].map(|t| t.storage_and_layout());
        let [g, xs, ws] = [0, 1, 2].map(|i| borrowed_f32(&guards[i].0, guards[i].1, "linear-bf16"));
        let (g, xs, ws) = (g?, xs?, ws?);
        // dx = g · w: [rows, out] · [out, in].
        let dx = product(
            self.unit,
            (rows, inner, out),
            MatRef::row_major(g, out),
            MatRef::row_major(ws, inner),
        );
        // dw = gᵀ · x: [out, rows] · [rows, in].
        let dw = product(
            self.unit,
            (out, inner, rows),
            MatRef::transposed(g, out),
            MatRef::row_major(xs, inner),
        );
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, random};

    fn max_relative(got: &Tensor, want: &Tensor) -> f32 {
        let scale = want.abs().unwrap().max_all().unwrap();
        max_diff(got, want) / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// The bf16 product and both its gradients agree with the f32 composition to bf16's
    /// precision (inputs rounded to 8 bits of mantissa: ~0.4% per input).
    #[test]
    fn bf16_linear_and_its_gradients_match_the_f32_product() {
        let Some(unit) = bf16_gemm::unit() else {
            eprintln!("no bf16 unit on this CPU: nothing to compare");
            return;
        };
        let x = random(&[2, 7, 40], 1);
        let w = random(&[24, 40], 2);
        let upstream = random(&[2, 7, 24], 3).as_tensor().clone();
        let ours = linear(x.as_tensor(), w.as_tensor(), unit).unwrap();
        let reference = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        assert!(max_relative(&ours, &reference) < 2e-2);
        let ours_grads = (ours * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let reference_grads = (reference * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &w] {
            let got = ours_grads.get(var.as_tensor()).unwrap();
            let want = reference_grads.get(var.as_tensor()).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(
                max_relative(got, want) < 2e-2,
                "{}",
                max_relative(got, want)
            );
        }
    }

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(bf16_unit(), None);
        {
            let _outer = BF16Scope::enter(Some(Bf16Unit::Avx512));
            assert_eq!(bf16_unit(), Some(Bf16Unit::Avx512));
            {
                let _inner = BF16Scope::enter(None);
                assert_eq!(bf16_unit(), None);
            }
            assert_eq!(bf16_unit(), Some(Bf16Unit::Avx512));
        }
        assert_eq!(bf16_unit(), None);
    }
}
