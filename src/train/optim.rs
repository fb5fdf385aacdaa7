//! AdamW with bias correction and decoupled weight decay, written here because
//! candle's keeps its moments private: ours exposes them so a checkpoint can save and
//! restore them bit for bit, which exact resume needs.
//!
//! Update for parameter θ with gradient g (already scaled by gradient clipping), step t:
//! ```text
//! m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²
//! θ ← θ·(1 − lr·wd) − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε)
//! ```
//! Weight decay applies to matrices only (rank ≥ 2): norm weights and biases are excluded.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

/// Hyper-parameters other than the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// The optimizer over a fixed, named set of parameters.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

/// Name prefixes of the two moments in saved optimizer state.
const FIRST_MOMENT: &str = "exp_avg.";
const SECOND_MOMENT: &str = "exp_avg_sq.";

impl AdamW {
    /// An optimizer for `params` (name, variable), with zero moments.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> candle_core::Result<AdamW> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                let decay = var.as_tensor().rank() >= 2;
                Ok(ParamState {
                    name,
                    var,
                    decay,
                    m,
                    v,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Whether the parameter called `name` gets weight decay.
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.params
            .iter()
            .find(|param| param.name == name)
            .map(|param| param.decay)
    }

    /// The global L2 norm of the gradients of all parameters. CPU f32 gradients are
    /// summed in f64 over fixed chunks in parallel, the chunks' sums then added in
    /// order: the same value at any thread count, with no squared copy of each gradient.
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        let mut total = 0.0f64;
        for param in &self.params {
            let Some(grad) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            if grad.device().is_cpu() && grad.dtype() == DType::F32 && grad.is_contiguous() {
                let (storage, layout) = grad.storage_and_layout();
                let values = crate::model::fused::borrowed_f32(&storage, layout, "adamw")?;
                let partials: Vec<f64> = values
                    .par_chunks(CHUNK)
                    .map(|chunk| {
                        // Eight lanes: vectorised, and the same order on every CPU.
                        let mut lanes = [0f64; 8];
                        for block in chunk.chunks(8) {
                            for (lane, &g) in lanes.iter_mut().zip(block) {
                                *lane += f64::from(g) * f64::from(g);
                            }
                        }
                        lanes.iter().sum::<f64>()
                    })
                    .collect();
                total += partials.iter().sum::<f64>();
                continue;
            }
            total += grad
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`; every gradient is first multiplied by
    /// `grad_scale` (gradient clipping passes `min(1, clip / norm)`). A parameter
    /// without a gradient is an error: it would silently never train.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> candle_core::Result<()> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let correction1 = 1.0 - beta1.powi(self.step as i32);
        let correction2 = 1.0 - beta2.powi(self.step as i32);
        for param in &mut self.params {
            let theta = param.var.as_tensor();
            let grad = grads.get(theta).ok_or_else(|| {
                candle_core::Error::Msg(format!("parameter `{}` received no gradient", param.name))
            })?;
            if theta.device().is_cpu() && theta.dtype() == DType::F32 && theta.is_contiguous() {
                let update = InPlaceUpdate {
                    beta1: beta1 as f32,
                    beta2: beta2 as f32,
                    grad_scale: grad_scale as f32,
                    correction1: correction1 as f32,
                    correction2: correction2 as f32,
                    eps: eps as f32,
                    lr: lr as f32,
                    decay: match param.decay {
                        true => (1.0 - lr * weight_decay) as f32,
                        false => 1.0,
                    },
                };
                let grad = grad.contiguous()?;
                let (grad_storage, grad_layout) = grad.storage_and_layout();
                let grad = crate::model::fused::borrowed_f32(&grad_storage, grad_layout, "adamw")?;
                with_values_mut(&param.m, |m| {
                    with_values_mut(&param.v, |v| {
                        with_values_mut(theta, |theta| update.apply(theta, m, v, grad))
                    })
                })?;
                continue;
            }
            let grad = if grad_scale == 1.0 {
                grad.clone()
            } else {
                grad.affine(grad_scale, 0.0)?
            };
            param.m = ((&param.m * beta1)? + (&grad * (1.0 - beta1))?)?;
            param.v = ((&param.v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&param.m / correction1)?;
            let v_hat = (&param.v / correction2)?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let decayed = if param.decay && weight_decay != 0.0 {
                (theta * (1.0 - lr * weight_decay))?
            } else {
                theta.clone()
            };
            param.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments, named `exp_avg.<param>` and `exp_avg_sq.<param>`, for checkpoints
    /// (copies: the optimizer updates its own in place).
    pub fn state(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut state = Vec::with_capacity(2 * self.params.len());
        for param in &self.params {
            state.push((format!("{FIRST_MOMENT}{}", param.name), param.m.copy()?));
            state.push((format!("{SECOND_MOMENT}{}", param.name), param.v.copy()?));
        }
        Ok(state)
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
    ) -> candle_core::Result<()> {
        for param in &mut self.params {
            for (prefix, slot) in [(FIRST_MOMENT, &mut param.m), (SECOND_MOMENT, &mut param.v)] {
                let key = format!("{prefix}{}", param.name);
                let saved = tensors.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no `{key}`"))
                })?;
                if saved.shape() != slot.shape() {
                    return Err(candle_core::Error::Msg(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        saved.shape(),
                        slot.shape()
                    )));
                }
                // A copy of its own: the moments are updated in place.
                *slot = saved
                    .to_device(slot.device())?
                    .to_dtype(slot.dtype())?
                    .copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The coefficients of one AdamW step of one parameter, as f32.
#[derive(Clone, Copy)]
struct InPlaceUpdate {
    beta1: f32,
    beta2: f32,
    grad_scale: f32,
    correction1: f32,
    correction2: f32,
    eps: f32,
    lr: f32,
    /// `1 − lr·weight_decay`, or 1 for parameters without decay.
    decay: f32,
}

/// Rows of this many values per parallel task.
const CHUNK: usize = 1 << 14;

/// The values of a contiguous f32 CPU storage, for the in-place ops.
fn values_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&mut values[start..end]),
        _ => candle_core::bail!("adamw: contiguous f32 state only"),
    }
}

impl InPlaceUpdate {
    /// One step over a parameter's values in one pass: the moments from the gradient
    /// (`m = β₁·m + (1 − β₁)·g`, `v = β₂·v + (1 − β₂)·g²`, `g` the scaled gradient),
    /// then `θ = decay·θ − lr · m̂ / (√v̂ + ε)` from them.
    fn apply(
        &self,
        theta: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        grad: &[f32],
    ) -> candle_core::Result<()> {
        let len = theta.len();
        if m.len() != len || v.len() != len || grad.len() != len {
            candle_core::bail!(
                "adamw: {len} values, moments of {} and {}, gradient of {}",
                m.len(),
                v.len(),
                grad.len()
            );
        }
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(|((theta, m), (v, grad))| {
                for (((theta, m), v), &g) in theta.iter_mut().zip(m).zip(v).zip(grad) {
                    *m = *m * self.beta1 + g * self.grad_scale * (1.0 - self.beta1);
                    let g = g * self.grad_scale;
                    *v = *v * self.beta2 + g * g * (1.0 - self.beta2);
                    let m_hat = *m / self.correction1;
                    let v_hat = *v / self.correction2;
                    *theta = *theta * self.decay - self.lr * (m_hat / (v_hat.sqrt() + self.eps));
                }
            });
        Ok(())
    }
}

/// Runs `work` on the values of a contiguous f32 CPU tensor, writable: candle hands
/// out one tensor's storage mutably at a time (an in-place op), so the three of an
/// update nest.
fn with_values_mut<R>(
    tensor: &Tensor,
    work: impl FnOnce(&mut [f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let op = WithValuesMut {
        work: std::cell::Cell::new(Some(work)),
        result: std::cell::Cell::new(None),
    };
    tensor.inplace_op1(&op)?;
    op.result
        .take()
        .unwrap_or_else(|| candle_core::bail!("adamw: the in-place op did not run"))
}

/// The in-place op of [`with_values_mut`].
struct WithValuesMut<F, R> {
    work: std::cell::Cell<Option<F>>,
    result: std::cell::Cell<Option<candle_core::Result<R>>>,
}

impl<F: FnOnce(&mut [f32]) -> candle_core::Result<R>, R> InplaceOp1 for WithValuesMut<F, R> {
    fn name(&self) -> &'static str {
        "adamw-values"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let work = self
            .work
            .take()
            .ok_or_else(|| candle_core::Error::Msg("adamw: in-place op run twice".into()))?;
        self.result.set(Some(work(values_mut(storage, layout)?)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Runs `steps` updates of AdamW on f(θ) = Σ c·θ (gradient c) and returns θ.
    fn run(
        values: &[f32],
        shape: &[usize],
        coefficient: f32,
        steps: u64,
        lr: f64,
        config: AdamWConfig,
    ) -> Vec<f32> {
        let var = Var::from_slice(values, shape, &Device::Cpu).unwrap();
        let mut optimizer = AdamW::new(vec![("w".into(), var.clone())], config).unwrap();
        for _ in 0..steps {
            let loss = (var.as_tensor() * f64::from(coefficient))
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            optimizer.step(&grads, lr, 1.0).unwrap();
        }
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// f32 arithmetic against an f64 reference: equal to within a few ulps.
    fn assert_close(got: &[f32], expected: &[f64]) {
        for (got, expected) in got.iter().zip(expected) {
            assert!(
                (f64::from(*got) - expected).abs() < 1e-6,
                "{got} vs {expected}"
            );
        }
    }

    #[test]
    fn one_step_matches_the_hand_computed_update() {
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        // Matrix (decayed): g = 0.5, m̂ = 0.5, v̂ = 0.25, update = 0.5 / (0.5 + 1e-8).
        let theta = run(&[1.0, -2.0], &[1, 2], 0.5, 1, 0.01, config);
        let expected = |t: f64| t * (1.0 - 0.01 * 0.1) - 0.01 * 0.5 / (0.5 + 1e-8);
        assert_close(&theta, &[expected(1.0), expected(-2.0)]);
        // Vector (not decayed).
        let theta = run(&[1.0, -2.0], &[2], 0.5, 1, 0.01, config);
        let expected = |t: f64| t - 0.01 * 0.5 / (0.5 + 1e-8);
        assert_close(&theta, &[expected(1.0), expected(-2.0)]);
    }

    #[test]
    fn two_steps_follow_the_bias_corrected_moments() {
        let config = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let theta = run(&[0.0], &[1], 2.0, 2, 0.1, config);
        // Constant gradient: m̂ = g and v̂ = g² at every step, so each step moves lr·g/(|g|+ε).
        let step = 0.1 * 2.0 / (2.0 + 1e-8);
        assert!((f64::from(theta[0]) + 2.0 * step).abs() < 1e-6, "{theta:?}");
    }

    /// The norm of gradients spanning several parallel chunks is the f64 sum of
    /// squares, and the same bits on 1 and 3 threads.
    #[test]
    fn grad_norm_sums_every_chunk_in_a_fixed_order() {
        let count = 3 * CHUNK + 517;
        let values: Vec<f32> = (0..count)
            .map(|i| ((i % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let var = Var::from_slice(&values, count, &Device::Cpu).unwrap();
        let optimizer =
            AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        // The gradient of Σ θ²/2 is θ itself.
        let grads = (var.as_tensor().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let expected = values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| optimizer.grad_norm(&grads).unwrap())
        };
        let (one, three) = (on(1), on(3));
        assert!(
            (one - expected).abs() < 1e-9 * expected,
            "{one} vs {expected}"
        );
        assert_eq!(one.to_bits(), three.to_bits());
    }

    #[test]
    fn saved_state_resumes_bit_identically() {
        let config = AdamWConfig::default();
        let device = Device::Cpu;
        let make = || Var::from_slice(&[0.3f32, -0.7, 1.1, 0.2], (2, 2), &device).unwrap();
        let grad_of = |var: &Var, step: u64| {
            let weights = Tensor::new(&[[1.0f32, -2.0], [0.5, step as f32]], &device).unwrap();
            (var.as_tensor() * &weights)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let straight = make();
        let mut optimizer = AdamW::new(vec![("w".into(), straight.clone())], config).unwrap();
        for step in 0..6 {
            optimizer
                .step(&grad_of(&straight, step), 0.05, 1.0)
                .unwrap();
        }

        let resumed = make();
        let mut first = AdamW::new(vec![("w".into(), resumed.clone())], config).unwrap();
        for step in 0..3 {
            first.step(&grad_of(&resumed, step), 0.05, 1.0).unwrap();
        }
        let saved: HashMap<String, Tensor> = first.state().unwrap().into_iter().collect();
        let mut second = AdamW::new(vec![("w".into(), resumed.clone())], config).unwrap();
        second.load_state(&saved, first.step_count()).unwrap();
        for step in 3..6 {
            second.step(&grad_of(&resumed, step), 0.05, 1.0).unwrap();
        }
        let a = straight
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = resumed
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(straight.as_tensor().dtype(), DType::F32);
    }

    #[test]
    fn a_parameter_without_gradient_is_an_error() {
        let used = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let unused = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let mut optimizer = AdamW::new(
            vec![("used".into(), used.clone()), ("unused".into(), unused)],
            AdamWConfig::default(),
        )
        .unwrap();
        let grads = used.as_tensor().sum_all().unwrap().backward().unwrap();
        let error = optimizer.step(&grads, 0.1, 1.0).unwrap_err().to_string();
        assert!(error.contains("`unused` received no gradient"), "{error}");
        assert_eq!(optimizer.decays("used"), Some(false));
    }
}
