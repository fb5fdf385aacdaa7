//! The language-modelling loss: mean next-token cross-entropy over the targets a
//! batch's weights select (all of them in pretraining, assistant tokens in SFT).
//!
//! Training computes it chunked, in the manner of Liger's fused linear cross-entropy
//! ([`loss_and_grads`]): the logits of a large vocabulary (Qwen2's 151,936 tokens are
//! 1.2 GB of f32 for 2,048 positions) are never held for the whole batch. Only the
//! positions that count go through the head, a few hundred rows at a time; each chunk's
//! softmax gradient is written by hand and pushed through the head at once, and the
//! hidden states' gradient then flows back through the body in one backward pass. The
//! memory of the loss is flat in the vocabulary, and masked positions (an SFT prompt)
//! cost no head product at all.
//! [`weighted_cross_entropy`] is the same loss from differentiable candle ops, the
//! reference the chunked one is tested against.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::data::token_cache::Batch;
use crate::model::Kernels;
use crate::model::body::Body;
use crate::model::exp::{exp_in_place, max_of};

/// A model seen by the loss: final hidden states for a batch, and the head's logits
/// for any rows of them.
pub trait LanguageModel {
    /// Final hidden states `[B, T, H]` for input ids `[B, T]`.
    fn hidden(&self, input_ids: &Tensor) -> candle_core::Result<Tensor>;
    /// Logits `[N, V]` of hidden states `[N, H]`. Training overwrites the returned
    /// tensor's storage with the loss's gradient, so the op that makes it must not
    /// read its own output in its backward pass (products, concatenation and padding
    /// do not; a soft cap by `tanh` would).
    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor>;
    /// `V`.
    fn vocab_size(&self) -> usize;
    /// The body over `input_ids` in pieces whose activations are recomputed in the
    /// backward pass (activation checkpointing); `None` runs it whole with
    /// [`LanguageModel::hidden`].
    fn body(&self, _input_ids: &Tensor) -> Option<Body<'_>> {
        None
    }
}

// The loss is the training path: only kernels with a backward pass.
impl LanguageModel for crate::model::CausalLm {
    fn hidden(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        crate::model::CausalLm::hidden(self, input_ids, None, Kernels::Differentiable)
    }

    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        crate::model::CausalLm::logits(self, hidden, Kernels::Differentiable)
    }

    fn vocab_size(&self) -> usize {
        crate::model::CausalLm::vocab_size(self)
    }
}

/// About this many logits are live per chunk (64 MB of f32), whatever the vocabulary.
const CHUNK_LOGITS: usize = 1 << 24;

/// The positions of a batch that count: flat indices, targets and weights.
struct Counted {
    rows: Vec<u32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    total: f64,
}

impl Counted {
    fn of(batch: &Batch) -> Counted {
        let mut counted = Counted {
            rows: Vec::new(),
            targets: Vec::new(),
            weights: Vec::new(),
            total: 0.0,
        };
        for (index, (&target, &weight)) in batch.targets.iter().zip(&batch.weights).enumerate() {
            if weight > 0.0 {
                counted.rows.push(index as u32);
                counted.targets.push(target);
                counted.weights.push(weight);
                counted.total += f64::from(weight);
            }
        }
        counted
    }

    fn chunk_rows(&self, vocab: usize, chunk_logits: usize) -> usize {
        (chunk_logits / vocab.max(1)).clamp(1, self.rows.len().max(1))
    }
}

/// Σ weight·(−log p(target)) over the rows of `logits` (`[rows, V]` row-major); the
/// logits are overwritten: with `coefficient` = Some(c), by the loss's gradient
/// `c·weight·(softmax − one_hot(target))`.
fn chunk_loss(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    weights: &[f32],
    coefficient: Option<f32>,
) -> candle_core::Result<f64> {
    if let Some(&bad) = targets.iter().find(|&&target| target as usize >= vocab) {
        candle_core::bail!("target id {bad} is past the model's vocabulary of {vocab}");
    }
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter().zip(weights))
        .map(|(row, (&target, &weight))| {
            let max = max_of(row);
            let target_logit = row[target as usize];
            // One exponential per logit, kept for the gradient: softmax = e / Σe.
            row.iter_mut().for_each(|value| *value -= max);
            exp_in_place(row);
            // Eight partial sums in a fixed order: vectorised, and the same on every CPU.
            let mut lanes = [0f64; 8];
            for chunk in row.chunks(8) {
                for (lane, &e) in lanes.iter_mut().zip(chunk) {
                    *lane += f64::from(e);
                }
            }
            let sum: f64 = lanes.iter().sum();
            let lse = f64::from(max) + sum.ln();
            let loss = lse - f64::from(target_logit);
            if let Some(coefficient) = coefficient {
                let scale = coefficient * weight;
                let factor = (f64::from(scale) / sum) as f32;
                for value in row.iter_mut() {
                    *value *= factor;
                }
                row[target as usize] -= scale;
            }
            loss * f64::from(weight)
        })
        .collect();
    Ok(losses.iter().sum())
}

/// [`chunk_loss`] with a coefficient, run on a CPU f32 logits tensor's own storage.
struct LossInPlace<'a> {
    vocab: usize,
    targets: &'a [u32],
    weights: &'a [f32],
    coefficient: f32,
    loss: std::sync::Mutex<Option<f64>>,
}

impl LossInPlace<'_> {
    /// The loss the op computed (an error if it did not run).
    fn take_loss(&self) -> candle_core::Result<f64> {
        self.loss
            .lock()
            .map_err(|_| candle_core::Error::Msg("chunk loss lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("chunk loss did not run".into()))
    }
}

impl candle_core::InplaceOp1 for LossInPlace<'_> {
    fn name(&self) -> &'static str {
        "chunk-loss-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(values) = storage else {
            candle_core::bail!("chunk loss in place: logits are not f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("chunk loss in place: logits are not contiguous");
        };
        if end - start != self.targets.len() * self.vocab {
            candle_core::bail!(
                "chunk loss in place: {} logits for {} rows of {}",
                end - start,
                self.targets.len(),
                self.vocab
            );
        }
        let loss = chunk_loss(
            &mut values[start..end],
            self.vocab,
            self.targets,
            self.weights,
            Some(self.coefficient),
        )?;
        *self
            .loss
            .lock()
            .map_err(|_| candle_core::Error::Msg("chunk loss lock poisoned".into()))? = Some(loss);
        Ok(())
    }
}

/// The mean weighted cross-entropy of `batch` under `model`, with no gradient: logits
/// are computed a chunk of counted positions at a time. `None` when nothing counts.
pub fn batch_loss(
    model: &dyn LanguageModel,
    batch: &Batch,
    device: &Device,
) -> candle_core::Result<Option<f64>> {
    let counted = Counted::of(batch);
    if counted.rows.is_empty() {
        return Ok(None);
    }
    let (inputs, _, _) = batch_tensors(batch, device)?;
    let hidden = model.hidden(&inputs)?.detach();
    let width = hidden.dim(D::Minus1)?;
    let hidden = hidden.reshape(((), width))?;
    let vocab = model.vocab_size();
    let chunk = counted.chunk_rows(vocab, CHUNK_LOGITS);
    let mut sum = 0.0;
    for start in (0..counted.rows.len()).step_by(chunk) {
        let end = (start + chunk).min(counted.rows.len());
        let rows = Tensor::from_slice(&counted.rows[start..end], end - start, device)?;
        let logits = model.logits(&hidden.index_select(&rows, 0)?)?.detach();
        let mut values = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        sum += chunk_loss(
            &mut values,
            vocab,
            &counted.targets[start..end],
            &counted.weights[start..end],
            None,
        )?;
    }
    Ok(Some(sum / counted.total))
}

/// The mean weighted cross-entropy of `batch` under `model` and the gradients of
/// `scale` × it for `params`, computed chunk by chunk (see the module's doc). `None`
/// when no position counts.
pub fn loss_and_grads(
    model: &dyn LanguageModel,
    batch: &Batch,
    scale: f64,
    params: &[Var],
    device: &Device,
) -> candle_core::Result<Option<(f64, GradStore)>> {
    let mut phases = Phases::default();
    chunked_loss_and_grads(
        model,
        batch,
        scale,
        params,
        device,
        CHUNK_LOGITS,
        &mut phases,
    )
}

/// Seconds spent in each phase of [`timed_loss_and_grads`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// The body's forward pass (hidden states).
    pub forward: f64,
    /// The head and the loss: each chunk's logits, softmax gradient and head backward.
    pub head: f64,
    /// The body's backward pass.
    pub backward: f64,
}

/// [`loss_and_grads`], adding the seconds of each phase to `phases` (benchmarks).
pub fn timed_loss_and_grads(
    model: &dyn LanguageModel,
    batch: &Batch,
    scale: f64,
    params: &[Var],
    device: &Device,
    phases: &mut Phases,
) -> candle_core::Result<Option<(f64, GradStore)>> {
    chunked_loss_and_grads(model, batch, scale, params, device, CHUNK_LOGITS, phases)
}

/// [`loss_and_grads`] with about `chunk_logits` logits per chunk.
fn chunked_loss_and_grads(
    model: &dyn LanguageModel,
    batch: &Batch,
    scale: f64,
    params: &[Var],
    device: &Device,
    chunk_logits: usize,
    phases: &mut Phases,
) -> candle_core::Result<Option<(f64, GradStore)>> {
    let counted = Counted::of(batch);
    if counted.rows.is_empty() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let (inputs, _, _) = batch_tensors(batch, device)?;
    let (hidden, checkpointed) = match model.body(&inputs) {
        Some(body) => {
            let (hidden, kept) = forward_keeping_piece_inputs(&body)?;
            (hidden, Some((body, kept)))
        }
        None => (model.hidden(&inputs)?, None),
    };
    let forward_done = std::time::Instant::now();
    phases.forward += (forward_done - started).as_secs_f64();
    let shape = hidden.shape().clone();
    let width = hidden.dim(D::Minus1)?;
    let flat = hidden.reshape(((), width))?;
    let all_rows = Tensor::from_slice(&counted.rows, counted.rows.len(), device)?;
    let selected = flat.index_select(&all_rows, 0)?.detach();
    let vocab = model.vocab_size();
    let chunk = counted.chunk_rows(vocab, chunk_logits);
    let coefficient = (scale / counted.total) as f32;
    let mut sum = 0.0;
    let mut hidden_grads = Vec::new();
    let mut head_grads: Vec<Option<Tensor>> = vec![None; params.len()];
    for start in (0..counted.rows.len()).step_by(chunk) {
        let end = (start + chunk).min(counted.rows.len());
        let x = Var::from_tensor(&selected.narrow(0, start, end - start)?)?;
        let logits = model.logits(x.as_tensor())?;
        let targets = &counted.targets[start..end];
        let weights = &counted.weights[start..end];
        let upstream = match logits.dtype() == DType::F32
            && logits.device().is_cpu()
            && logits.is_contiguous()
        {
            // The logits become their own gradient: no copy of a `[rows, V]` block
            // (serial, 1.2% of a step), and backward never reads them (see `logits`).
            true => {
                let in_place = LossInPlace {
                    vocab,
                    targets,
                    weights,
                    coefficient,
                    loss: std::sync::Mutex::new(None),
                };
                logits.inplace_op1(&in_place)?;
                sum += in_place.take_loss()?;
                logits.detach()
            }
            false => {
                let mut values = logits
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                sum += chunk_loss(&mut values, vocab, targets, weights, Some(coefficient))?;
                Tensor::from_vec(values, logits.shape(), device)?.to_dtype(logits.dtype())?
            }
        };
        // One backward pass through the head with `upstream` as the logits' gradient
        // gives this chunk's share for x and the head's parameters.
        let grads = backward_from(&logits, upstream)?;
        // Gradients are computed by tracked ops (g·W involves the head's weight):
        // detached, they neither carry that graph into the body's backward pass nor
        // keep this chunk's logits alive.
        hidden_grads.push(match grads.get(x.as_tensor()) {
            Some(grad) => grad.detach(),
            None => x.as_tensor().zeros_like()?,
        });
        for (param, total) in params.iter().zip(head_grads.iter_mut()) {
            if let Some(grad) = grads.get(param.as_tensor()) {
                let grad = grad.detach();
                *total = Some(match total.take() {
                    Some(previous) => (previous + grad)?,
                    None => grad,
                });
            }
        }
    }
    let head_done = std::time::Instant::now();
    phases.head += (head_done - forward_done).as_secs_f64();
    let selected_grad = Tensor::cat(&hidden_grads, 0)?;
    let hidden_grad = flat
        .detach()
        .zeros_like()?
        .index_add(&all_rows, &selected_grad, 0)?
        .reshape(shape)?;
    let mut grads = match checkpointed {
        Some((body, kept)) => backward_through_pieces(&body, &hidden, kept, hidden_grad, params)?,
        None => backward_from(&hidden, hidden_grad)?,
    };
    for (param, head) in params.iter().zip(head_grads) {
        if let Some(head) = head {
            let sum = match grads.get(param.as_tensor()) {
                Some(body) => (body + head)?,
                None => head,
            };
            grads.insert(param.as_tensor(), sum);
        }
    }
    phases.backward += head_done.elapsed().as_secs_f64();
    Ok(Some((sum / counted.total, grads)))
}

/// The gradients of `Σ output · upstream`: `upstream` pushed back from `output`.
fn backward_from(output: &Tensor, upstream: Tensor) -> candle_core::Result<GradStore> {
    match output.device().is_cpu() {
        true => output.apply_op1(Upstream(upstream))?.backward(),
        false => (output * upstream)?.sum_all()?.backward(),
    }
}

/// What the forward pass of a checkpointed body kept: the input of every recomputed
/// piece after the first (detached) and, when the last pieces keep their activations,
/// the variable their chain starts from.
struct Kept {
    piece_inputs: Vec<Tensor>,
    tail_input: Option<Var>,
}

/// Runs `body` piece by piece: the first [`Body::recomputed`] pieces without keeping
/// their activations (each output detached, dropping its graph), the rest as one
/// tracked chain. Returns the final hidden states (tracked when a tail was kept).
fn forward_keeping_piece_inputs(body: &Body) -> candle_core::Result<(Tensor, Kept)> {
    let recomputed = body.recomputed();
    let mut kept = Kept {
        piece_inputs: Vec::with_capacity(recomputed),
        tail_input: None,
    };
    let mut x = body.run(0, body.input_ids())?.detach();
    for index in 1..body.len() {
        if index < recomputed {
            kept.piece_inputs.push(x.clone());
            x = body.run(index, &x)?.detach();
            continue;
        }
        if kept.tail_input.is_none() {
            let input = Var::from_tensor(&x)?;
            x = input.as_tensor().clone();
            kept.tail_input = Some(input);
        }
        x = body.run(index, &x)?;
    }
    Ok((x, kept))
}

/// The backward pass of a body run by [`forward_keeping_piece_inputs`]: first through
/// the kept tail (its graph is there), then from the last recomputed piece to the first,
/// each run again from its kept input (now a variable) with the gradient of its output
/// pushed through it, giving the parameters' share and its input's gradient for the
/// piece before. The gradients are those of the one-pass backward: each is the same sum
/// of the same terms.
fn backward_through_pieces(
    body: &Body,
    hidden: &Tensor,
    kept: Kept,
    hidden_grad: Tensor,
    params: &[Var],
) -> candle_core::Result<GradStore> {
    let Kept {
        mut piece_inputs,
        tail_input,
    } = kept;
    // The gradient reaching a piece's input variable: the next upstream gradient.
    let input_grad = |grads: &mut GradStore, input: &Var| match grads.remove(input.as_tensor()) {
        Some(grad) => Ok(grad),
        None => input.as_tensor().zeros_like(),
    };
    let mut upstream = hidden_grad;
    let mut total: Option<GradStore> = None;
    if let Some(input) = &tail_input {
        let mut grads = backward_from(hidden, upstream)?;
        upstream = input_grad(&mut grads, input)?;
        total = Some(grads);
    }
    // Pieces recomputed after the first take their kept input as a variable; the first
    // reads the token ids and ends the chain.
    for index in (1..body.recomputed()).rev() {
        let input = match piece_inputs.pop() {
            Some(input) => Var::from_tensor(&input)?,
            None => candle_core::bail!("piece {index} of a body has no kept input"),
        };
        let mut grads = backward_from(&body.run(index, input.as_tensor())?, upstream)?;
        upstream = input_grad(&mut grads, &input)?;
        total = Some(add_param_grads(total, grads, params)?);
    }
    let grads = backward_from(&body.run(0, body.input_ids())?, upstream)?;
    add_param_grads(total, grads, params)
}

/// `grads` added into `total` for each of `params` (`total + grads`, in that order), or
/// `grads` itself when there is no total yet.
pub(crate) fn add_param_grads(
    total: Option<GradStore>,
    grads: GradStore,
    params: &[Var],
) -> candle_core::Result<GradStore> {
    let Some(mut total) = total else {
        return Ok(grads);
    };
    for param in params {
        let tensor = param.as_tensor();
        if let Some(grad) = grads.get(tensor) {
            let sum = match total.get(tensor) {
                Some(previous) => (previous + grad)?,
                None => grad.clone(),
            };
            total.insert(tensor, sum);
        }
    }
    Ok(total)
}

/// A scalar node whose input's gradient is the given tensor: `Σ x·g` without computing
/// the product (its value is never read), and `g` itself as the gradient where the
/// composition would allocate `1·g` and the product. CPU only.
struct Upstream(Tensor);

impl candle_core::CustomOp1 for Upstream {
    fn name(&self) -> &'static str {
        "upstream-gradient"
    }

    fn cpu_fwd(
        &self,
        _storage: &candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((
            candle_core::CpuStorage::F32(vec![0.0]),
            candle_core::Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _result: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

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

    /// The chunked loss and gradients equal those of the whole-batch composition, on a
    /// tiny llama with a tied head (a parameter used by the body and the head) and an
    /// untied one, some positions masked and chunks of three rows.
    #[test]
    fn chunked_loss_and_gradients_equal_the_composed_ones() {
        for tied in [true, false] {
            check_chunked_against_composed(tied);
        }
    }

    fn check_chunked_against_composed(tied: bool) {
        use crate::model::{self, LlamaConfig, LlamaFlavor, ModelConfig};
        let device = Device::Cpu;
        let config = ModelConfig::Llama(LlamaConfig::tiny(LlamaFlavor::Qwen2, tied));
        let (model, varmap) = model::new_trainable(&config, DType::F32, &device, 3).unwrap();
        let params: Vec<Var> = model::sorted_vars(&varmap)
            .into_iter()
            .map(|(_, var)| var)
            .collect();
        let vocab = config.vocab_size() as u32;
        let windows: Vec<Vec<u32>> = (0..3)
            .map(|row| (0..9).map(|i| (row * 37 + i * 11) % vocab).collect())
            .collect();
        let mut batch = Batch::from_windows(&windows);
        for (index, weight) in batch.weights.iter_mut().enumerate() {
            *weight = [0.0, 1.0, 1.0, 0.5][index % 4];
        }
        let (inputs, targets, weights) = batch_tensors(&batch, &device).unwrap();
        let reference = weighted_cross_entropy(
            &model
                .forward(&inputs, None, Kernels::Differentiable)
                .unwrap(),
            &targets,
            &weights,
        )
        .unwrap();
        let expected_loss = f64::from(reference.to_scalar::<f32>().unwrap());
        let expected = (reference * 0.5).unwrap().backward().unwrap();
        let (loss, grads) = chunked_loss_and_grads(
            &model,
            &batch,
            0.5,
            &params,
            &device,
            3 * vocab as usize,
            &mut Phases::default(),
        )
        .unwrap()
        .unwrap();
        assert!(
            (loss - expected_loss).abs() < 1e-5,
            "{loss} vs {expected_loss}"
        );
        let eval = batch_loss(&model, &batch, &device).unwrap().unwrap();
        assert!(
            (eval - expected_loss).abs() < 1e-5,
            "{eval} vs {expected_loss}"
        );
        for (name, var) in model::sorted_vars(&varmap) {
            let want = expected.get(var.as_tensor()).unwrap();
            let got = grads.get(var.as_tensor()).unwrap();
            let diff = (want - got)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let size = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-5 * size.max(1.0),
                "{name} (tied {tied}): {diff} (scale {size})"
            );
        }
    }

    /// A model whose body runs in checkpointed pieces, that many blocks recomputed.
    struct Pieces<'a>(&'a crate::model::CausalLm, usize);

    impl LanguageModel for Pieces<'_> {
        fn hidden(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
            LanguageModel::hidden(self.0, input_ids)
        }

        fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
            LanguageModel::logits(self.0, hidden)
        }

        fn vocab_size(&self) -> usize {
            self.0.vocab_size()
        }

        fn body(&self, input_ids: &Tensor) -> Option<Body<'_>> {
            Some(Body::new(self.0, input_ids, None, self.1))
        }
    }

    /// Activation checkpointing changes where activations live, not the numbers: loss
    /// and every gradient are bit-identical to the one-pass backward, for both families,
    /// tied and untied heads.
    #[test]
    fn checkpointed_gradients_are_bit_identical_to_one_pass() {
        use crate::model::{self, Gpt2Config, LlamaConfig, LlamaFlavor, ModelConfig};
        let device = Device::Cpu;
        let configs = [
            ModelConfig::Llama(LlamaConfig::tiny(LlamaFlavor::Qwen2, true)),
            ModelConfig::Llama(LlamaConfig::tiny(LlamaFlavor::Llama, false)),
            ModelConfig::Gpt2(Gpt2Config::tiny()),
        ];
        for config in configs {
            let (model, varmap) = model::new_trainable(&config, DType::F32, &device, 5).unwrap();
            let params: Vec<Var> = model::sorted_vars(&varmap)
                .into_iter()
                .map(|(_, var)| var)
                .collect();
            let vocab = config.vocab_size() as u32;
            let windows: Vec<Vec<u32>> = (0..2)
                .map(|row| (0..11).map(|i| (row * 29 + i * 7 + 1) % vocab).collect())
                .collect();
            let batch = Batch::from_windows(&windows);
            let run = |model: &dyn LanguageModel| {
                loss_and_grads(model, &batch, 1.0, &params, &device)
                    .unwrap()
                    .unwrap()
            };
            let (whole_loss, whole) = run(&model);
            // Every block recomputed, one of them, none (only the embedding).
            for blocks in [usize::MAX, 1, 0] {
                let (pieces_loss, pieces) = run(&Pieces(&model, blocks));
                assert_eq!(whole_loss.to_bits(), pieces_loss.to_bits());
                for (name, var) in model::sorted_vars(&varmap) {
                    let want = whole.get(var.as_tensor()).unwrap();
                    let got = pieces.get(var.as_tensor()).unwrap();
                    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                    assert!(
                        want.iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{} {name}, {blocks} blocks recomputed: gradients differ",
                        config.model_type()
                    );
                }
            }
        }
    }

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
