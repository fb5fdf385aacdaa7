//! The language-modelling loss: mean next-token cross-entropy over the targets a
//! batch's weights select (all of them in pretraining, assistant tokens in SFT).
//! Built from differentiable candle ops only (`log_softmax`, `gather`), so gradients
//! reach every logit.

use candle_core::{D, Device, Tensor};

use crate::data::token_cache::Batch;

/// Input ids `[B, T]` (u32), target ids `[B, T]` (u32) and loss weights `[B, T]` (f32).
pub fn batch_tensors(
    batch: &Batch,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let shape = (batch.batch, batch.seq);
    Ok((
        Tensor::from_slice(&batch.inputs, shape, device)?,
        Tensor::from_slice(&batch.targets, shape, device)?,
        Tensor::from_slice(&batch.weights, shape, device)?,
    ))
}

/// Σ weight · (−log p(target)) / Σ weight, for logits `[B, T, V]`. A batch whose
/// weights are all zero has loss 0.
pub fn weighted_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let weights = weights.to_dtype(picked.dtype())?;
    let total = weights.sum_all()?;
    let denominator = total.maximum(1e-12)?;
    (picked * &weights)?.sum_all()?.neg()?.div(&denominator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_the_hand_computed_loss_and_ignores_zero_weights() {
        let device = Device::Cpu;
        // One row, two positions, vocabulary 3.
        let logits = Tensor::new(&[[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]]], &device).unwrap();
        let targets = Tensor::new(&[[2u32, 1]], &device).unwrap();
        let log_sum = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let only_first = weighted_cross_entropy(
            &logits,
            &targets,
            &Tensor::new(&[[1.0f32, 0.0]], &device).unwrap(),
        )
        .unwrap();
        assert!((f64::from(only_first.to_scalar::<f32>().unwrap()) - (log_sum - 3.0)).abs() < 1e-6);
        let both = weighted_cross_entropy(
            &logits,
            &targets,
            &Tensor::new(&[[1.0f32, 1.0]], &device).unwrap(),
        )
        .unwrap();
        let expected = ((log_sum - 3.0) + 3f64.ln()) / 2.0;
        assert!((f64::from(both.to_scalar::<f32>().unwrap()) - expected).abs() < 1e-6);
        let none = weighted_cross_entropy(
            &logits,
            &targets,
            &Tensor::new(&[[0.0f32, 0.0]], &device).unwrap(),
        )
        .unwrap();
        assert_eq!(none.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn gradient_is_softmax_minus_one_hot_at_weighted_positions() {
        let device = Device::Cpu;
        let logits = Var::new(&[[[1.0f32, 2.0, 3.0], [0.5, 0.0, -0.5]]], &device).unwrap();
        let targets = Tensor::new(&[[0u32, 1]], &device).unwrap();
        let weights = Tensor::new(&[[1.0f32, 0.0]], &device).unwrap();
        let loss = weighted_cross_entropy(logits.as_tensor(), &targets, &weights).unwrap();
        let grads = loss.backward().unwrap();
        let grad = grads
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sum = 1f32.exp() + 2f32.exp() + 3f32.exp();
        let expected = [
            1f32.exp() / sum - 1.0,
            2f32.exp() / sum,
            3f32.exp() / sum,
            0.0,
            0.0,
            0.0,
        ];
        for (got, want) in grad.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{grad:?}");
        }
    }
}
