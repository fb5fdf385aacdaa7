//! One optimizer step: forward and backward over the micro-batches of a step
//! (gradient accumulation), global-norm clipping, then AdamW.

use candle_core::backprop::GradStore;
use candle_core::{Device, Var};

use super::loss::{LanguageModel, add_param_grads, loss_and_grads};
use super::optim::AdamW;
use crate::data::token_cache::Batch;

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepOutcome {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens that counted in the loss.
    pub tokens: u64,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The loss or the gradients are NaN or infinite.
    #[error("the loss is not finite ({loss}); the weights were not updated")]
    NotFinite {
        /// The loss.
        loss: f64,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Runs forward/backward on every micro-batch (each loss scaled by 1/n so the
/// accumulated gradient is the mean), clips the global gradient norm to `clip` (if
/// given), and applies one AdamW update at `lr`. Nothing is updated when the loss or
/// the gradient norm is not finite.
pub fn train_step(
    model: &dyn LanguageModel,
    params: &[Var],
    optimizer: &mut AdamW,
    micro_batches: &[Batch],
    lr: f64,
    clip: Option<f64>,
    device: &Device,
) -> Result<StepOutcome, StepError> {
    let scale = 1.0 / micro_batches.len().max(1) as f64;
    let mut accumulated: Option<GradStore> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0u64;
    for batch in micro_batches {
        let Some((loss, grads)) = loss_and_grads(model, batch, scale, params, device)? else {
            continue;
        };
        loss_sum += loss;
        tokens += batch.weights.iter().filter(|&&weight| weight > 0.0).count() as u64;
        accumulated = Some(add_param_grads(accumulated, grads, params)?);
    }
    let loss = loss_sum * scale;
    let Some(grads) = accumulated else {
        return Ok(StepOutcome::default());
    };
    let grad_norm = optimizer.grad_norm(&grads)?;
    if !loss.is_finite() || !grad_norm.is_finite() {
        return Err(StepError::NotFinite { loss });
    }
    let grad_scale = match clip {
        Some(clip) if grad_norm > clip => clip / grad_norm,
        _ => 1.0,
    };
    optimizer.step(&grads, lr, grad_scale)?;
    Ok(StepOutcome {
        loss,
        grad_norm,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamWConfig;
    use candle_core::Tensor;

    /// A bigram "model": logits are a row of a learned table.
    fn bigram(vocab: usize) -> Var {
        Var::from_tensor(
            &Tensor::zeros((vocab, vocab), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap()
    }

    /// The bigram table as a language model: the hidden state is the table's row, the
    /// head the identity.
    struct Bigram<'a>(&'a Var);

    impl LanguageModel for Bigram<'_> {
        fn hidden(&self, inputs: &Tensor) -> candle_core::Result<Tensor> {
            let (rows, cols) = inputs.dims2()?;
            self.0
                .as_tensor()
                .index_select(&inputs.flatten_all()?, 0)?
                .reshape((rows, cols, ()))
        }

        fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
            Ok(hidden.clone())
        }

        fn vocab_size(&self) -> usize {
            self.0.dims()[1]
        }
    }

    fn optimizer(table: &Var) -> AdamW {
        AdamW::new(
            vec![("table".into(), table.clone())],
            AdamWConfig::default(),
        )
        .unwrap()
    }

    /// One [`train_step`] of the bigram `table` on `data`.
    fn step(
        table: &Var,
        optimizer: &mut AdamW,
        data: &[Batch],
        lr: f64,
        clip: Option<f64>,
    ) -> Result<StepOutcome, StepError> {
        let params = std::slice::from_ref(table);
        train_step(
            &Bigram(table),
            params,
            optimizer,
            data,
            lr,
            clip,
            &Device::Cpu,
        )
    }

    fn batch(rows: &[[u32; 5]]) -> Batch {
        let windows: Vec<Vec<u32>> = rows.iter().map(|row| row.to_vec()).collect();
        Batch::from_windows(&windows)
    }

    #[test]
    fn loss_falls_on_a_learnable_sequence() {
        let table = bigram(4);
        let mut optimizer = optimizer(&table);
        let data = [batch(&[[0, 1, 2, 3, 0], [1, 2, 3, 0, 1]])];
        let first = step(&table, &mut optimizer, &data, 0.1, Some(1.0)).unwrap();
        let mut last = first;
        for _ in 0..50 {
            last = step(&table, &mut optimizer, &data, 0.1, Some(1.0)).unwrap();
        }
        assert!(
            (first.loss - 4f64.ln()).abs() < 1e-6,
            "uniform start: {}",
            first.loss
        );
        assert!(last.loss < 0.1 * first.loss, "{first:?} → {last:?}");
        assert_eq!(first.tokens, 8);
    }

    #[test]
    fn accumulating_two_micro_batches_equals_one_batch_of_both() {
        let rows = [[0u32, 1, 2, 3, 0], [3, 2, 1, 0, 3]];
        let run = |micro: Vec<Batch>| {
            let table = bigram(4);
            let mut optimizer = optimizer(&table);
            for _ in 0..3 {
                step(&table, &mut optimizer, &micro, 0.05, None).unwrap();
            }
            table
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let whole = run(vec![batch(&rows)]);
        let split = run(vec![batch(&rows[..1]), batch(&rows[1..])]);
        for (a, b) in whole.iter().zip(&split) {
            assert!((a - b).abs() < 1e-6, "{whole:?} vs {split:?}");
        }
    }

    #[test]
    fn a_non_finite_loss_stops_without_touching_the_weights() {
        let table = bigram(4);
        table
            .set(&Tensor::full(f32::NAN, (4, 4), &Device::Cpu).unwrap())
            .unwrap();
        let mut optimizer = optimizer(&table);
        let error = step(
            &table,
            &mut optimizer,
            &[batch(&[[0, 1, 2, 3, 0]])],
            0.1,
            None,
        )
        .unwrap_err();
        assert!(matches!(error, StepError::NotFinite { .. }), "{error}");
        assert_eq!(optimizer.step_count(), 0);
    }
}
