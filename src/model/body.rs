//! The body of a model (embedding, blocks, final norm) as a chain of pieces, for
//! activation checkpointing: training keeps only each piece's input and recomputes a
//! piece's activations when its backward pass comes (see `train::loss`). Memory then
//! grows with the number of blocks by one `[B, T, H]` tensor each instead of by all of
//! a block's activations, for about one more forward pass of compute.

use std::cell::OnceCell;

use candle_core::{Result, Tensor};

use super::CausalLm;
use super::llama::Positions;

/// What every block of one forward pass shares, made once from the embedding's output.
enum Shared {
    Llama(Positions),
    Gpt2(Option<Tensor>),
}

/// A model's body over one batch of token ids, run piece by piece.
pub struct Body<'a> {
    model: &'a CausalLm,
    input_ids: Tensor,
    dropout_key: Option<u64>,
    recomputed_blocks: usize,
    shared: OnceCell<Shared>,
}

impl<'a> Body<'a> {
    /// The body of `model` over `input_ids` `[B, T]`; LoRA dropout masks keyed by
    /// `dropout_key` while a piece runs (`None`: no dropout), so that a piece recomputed
    /// for its backward pass draws the masks its first run drew. The first
    /// `recomputed_blocks` blocks (all of them when it is at least their number) are
    /// recomputed in the backward pass; the others keep their activations.
    pub fn new(
        model: &'a CausalLm,
        input_ids: &Tensor,
        dropout_key: Option<u64>,
        recomputed_blocks: usize,
    ) -> Body<'a> {
        Body {
            model,
            input_ids: input_ids.clone(),
            dropout_key,
            recomputed_blocks,
            shared: OnceCell::new(),
        }
    }

    /// How many leading pieces are recomputed: the embedding and the first
    /// `recomputed_blocks` blocks, and the final norm too when every block is.
    pub fn recomputed(&self) -> usize {
        let blocks = self.model.num_layers();
        match self.recomputed_blocks >= blocks {
            true => blocks + 2,
            false => 1 + self.recomputed_blocks,
        }
    }

    /// The number of pieces: the embedding, the blocks and the final norm.
    pub fn len(&self) -> usize {
        self.model.num_layers() + 2
    }

    /// Always false: a body has at least its embedding and final norm.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The token ids piece 0 reads.
    pub fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    /// Piece `index` applied to `input`: the token ids for piece 0, the output of piece
    /// `index - 1` for the others. Chained, the pieces give the model's final hidden
    /// states, exactly as its one-pass training forward does.
    pub fn run(&self, index: usize, input: &Tensor) -> Result<Tensor> {
        self.model.set_dropout_key(self.dropout_key);
        let output = self.run_piece(index, input);
        self.model.set_dropout_key(None);
        output
    }

    fn run_piece(&self, index: usize, input: &Tensor) -> Result<Tensor> {
        if index == 0 {
            return match self.model {
                CausalLm::Llama(model) => model.embed(input),
                CausalLm::Gpt2(model) => model.embed(input),
            };
        }
        match (self.model, self.shared_for(input)?) {
            (CausalLm::Llama(model), Shared::Llama(positions)) => {
                model.piece(index - 1, input, positions)
            }
            (CausalLm::Gpt2(model), Shared::Gpt2(mask)) => {
                model.piece(index - 1, input, mask.as_ref())
            }
            _ => candle_core::bail!("a body's shared state belongs to the other family"),
        }
    }

    /// The shared state, made on first use from a hidden state `[B, T, H]` (its length
    /// and dtype).
    fn shared_for(&self, hidden: &Tensor) -> Result<&Shared> {
        if let Some(shared) = self.shared.get() {
            return Ok(shared);
        }
        let (_batch, len) = self.input_ids.dims2()?;
        let (dtype, device) = (hidden.dtype(), hidden.device());
        let shared = match self.model {
            CausalLm::Llama(model) => Shared::Llama(model.training_positions(len, dtype, device)?),
            CausalLm::Gpt2(model) => Shared::Gpt2(model.training_mask(len, dtype, device)?),
        };
        Ok(self.shared.get_or_init(|| shared))
    }
}
