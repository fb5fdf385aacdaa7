//! The key/value cache of incremental decoding: per block, the keys and values of every
//! position seen so far, so that each new token costs one position's work instead of a
//! forward pass over the whole sequence.
//!
//! Keys are stored after RoPE and before grouped-query heads are repeated (so a cache
//! holds `num_key_value_heads` heads), as `[B, KV, T, D]`. The cache knows nothing of
//! the model family: [`super::CausalLm::forward`] fills it, and [`KvCache::len`]
//! is the position the next token will take.

use candle_core::{Result, Tensor};

/// Keys and values of one block, `[B, KV, T, D]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl LayerKv {
    /// Appends the keys and values of new positions (`[B, KV, T_new, D]`) and returns
    /// the keys and values of all positions so far.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let keys = match &self.keys {
            Some(past) => Tensor::cat(&[past, keys], 2)?,
            None => keys.contiguous()?,
        };
        let values = match &self.values {
            Some(past) => Tensor::cat(&[past, values], 2)?,
            None => values.contiguous()?,
        };
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        Ok((keys, values))
    }
}

/// The cache of a whole model: one [`LayerKv`] per block and the number of positions
/// already processed.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` blocks.
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }

    /// Positions already in the cache: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (the next token is position 0 again).
    pub fn clear(&mut self) {
        self.layers
            .iter_mut()
            .for_each(|layer| *layer = LayerKv::default());
        self.len = 0;
    }

    /// The cache of block `index`. Fails if the model has more blocks than the cache.
    pub fn layer(&mut self, index: usize) -> Result<&mut LayerKv> {
        let count = self.layers.len();
        self.layers.get_mut(index).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "the kv cache has {count} layers, the model asked for layer {index}"
            ))
        })
    }

    /// Records that `count` more positions were processed (after every block appended
    /// them).
    pub fn advance(&mut self, count: usize) {
        self.len += count;
    }
}
