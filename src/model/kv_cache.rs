//! The key/value cache of incremental decoding: per block, the keys and values of every
//! position seen so far, so that each new token costs one position's work instead of a
//! forward pass over the whole sequence.
//!
//! Keys are stored after RoPE and before grouped-query heads are repeated (so a cache
//! holds `num_key_value_heads` heads), as `[B, KV, T, D]`. The cache knows nothing of
//! the model family: [`super::CausalLm::forward`] fills it, and [`KvCache::len`]
//! is the position the next token will take.

use candle_core::{Result, Tensor};

/// Keys and values of one block, `[B, KV, T, D]` each: candle tensors, or for f32 on
/// the CPU [`KvRows`], buffers that grow without copying what they hold at every token.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    rows: Option<KvRows>,
}

impl LayerKv {
    /// Appends the keys and values of new positions (`[B, KV, T_new, D]`) and returns
    /// the keys and values of all positions so far.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.takes_rows(keys, values) {
            let rows = self.append_rows(keys, values)?;
            let shape = (rows.batch, rows.kv_heads, rows.len, rows.dim);
            let gather = |buffer: &[f32]| -> Vec<f32> {
                buffer
                    .chunks(rows.capacity * rows.dim)
                    .flat_map(|head| &head[..rows.len * rows.dim])
                    .copied()
                    .collect()
            };
            return Ok((
                Tensor::from_vec(gather(&rows.keys), shape, keys.device())?,
                Tensor::from_vec(gather(&rows.values), shape, keys.device())?,
            ));
        }
        if self.rows.is_some() {
            candle_core::bail!("kv cache: f32 CPU keys were cached, now {:?}", keys.dtype());
        }
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

    /// Whether [`LayerKv::append_rows`] takes these keys and values: f32 on the CPU, and
    /// nothing cached as tensors.
    pub fn takes_rows(&self, keys: &Tensor, values: &Tensor) -> bool {
        self.keys.is_none() && super::fused::applies(keys) && super::fused::applies(values)
    }

    /// Appends new positions' f32 keys and values (`[B, KV, T_new, D]`, on the CPU) to
    /// the row buffers and returns them.
    pub fn append_rows(&mut self, keys: &Tensor, values: &Tensor) -> Result<&KvRows> {
        let (batch, kv_heads, new, dim) = keys.dims4()?;
        if values.dims4()? != (batch, kv_heads, new, dim) {
            candle_core::bail!(
                "kv cache: keys {:?} and values {:?} differ",
                keys.dims(),
                values.dims()
            );
        }
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (keys, values) = (flat(keys)?, flat(values)?);
        let rows = self.rows.get_or_insert_with(|| KvRows {
            keys: Vec::new(),
            values: Vec::new(),
            batch,
            kv_heads,
            dim,
            len: 0,
            capacity: 0,
        });
        if (rows.batch, rows.kv_heads, rows.dim) != (batch, kv_heads, dim) {
            candle_core::bail!(
                "kv cache holds [{}, {}, _, {}], new keys are {:?}",
                rows.batch,
                rows.kv_heads,
                rows.dim,
                (batch, kv_heads, new, dim)
            );
        }
        rows.push(&keys, &values, new);
        Ok(rows)
    }
}

/// The f32 keys and values of one block, `[B, KV, capacity, D]` with the first `len`
/// positions of each head filled. The capacity doubles when full, so a token costs one
/// position's copy rather than the whole cache's.
#[derive(Debug, Clone)]
pub struct KvRows {
    keys: Vec<f32>,
    values: Vec<f32>,
    batch: usize,
    kv_heads: usize,
    dim: usize,
    len: usize,
    capacity: usize,
}

impl KvRows {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[B, KV, D]`: rows, key/value heads and the width of a head.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.batch, self.kv_heads, self.dim)
    }

    /// The keys and values (`len × D` each, row-major) of key/value head `head` of row `b`.
    pub fn head(&self, b: usize, head: usize) -> (&[f32], &[f32]) {
        let start = (b * self.kv_heads + head) * self.capacity * self.dim;
        let end = start + self.len * self.dim;
        (&self.keys[start..end], &self.values[start..end])
    }

    fn push(&mut self, keys: &[f32], values: &[f32], new: usize) {
        let dim = self.dim;
        if self.len + new > self.capacity {
            let capacity = (self.len + new).max(2 * self.capacity).max(16);
            let regrow = |old: &[f32]| -> Vec<f32> {
                let mut grown = vec![0f32; self.batch * self.kv_heads * capacity * dim];
                for (head, to) in grown.chunks_mut(capacity * dim).enumerate() {
                    let from = head * self.capacity * dim;
                    to[..self.len * dim].copy_from_slice(&old[from..from + self.len * dim]);
                }
                grown
            };
            self.keys = regrow(&self.keys);
            self.values = regrow(&self.values);
            self.capacity = capacity;
        }
        for head in 0..self.batch * self.kv_heads {
            let to = (head * self.capacity + self.len) * dim;
            let from = head * new * dim;
            self.keys[to..to + new * dim].copy_from_slice(&keys[from..from + new * dim]);
            self.values[to..to + new * dim].copy_from_slice(&values[from..from + new * dim]);
        }
        self.len += new;
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
