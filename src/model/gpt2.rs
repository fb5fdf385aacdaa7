//! GPT-2 (`GPT2LMHeadModel`), top to bottom.
//!
//! ```text
//! ids ─ wte + wpe ─ [ x + attn(ln_1(x)) ; x + mlp(ln_2(x)) ] × L ─ ln_f ─ wteᵀ ─ logits
//! attn: c_attn → q, k, v → causal softmax(qkᵀ/√d)·v → c_proj
//! mlp:  c_proj(gelu_new(c_fc(x)))
//! ```
//!
//! HF's GPT-2 uses `Conv1D` layers whose weight is `[in, out]` (the transpose of
//! `nn.Linear`). trainyard keeps that layout in memory too and computes `x·W + b`, so a
//! checkpoint loads and saves without any transposition and the parameters in a
//! `VarMap` have exactly HF's names and shapes (a QLoRA base holds the transpose
//! quantized, as bitsandbytes does; LoRA adapters are PEFT's, see [`super::lora`]). LayerNorm is composed from
//! differentiable primitives (`mean_keepdim`, `sqr`, `sqrt`, `broadcast_*`); GELU is
//! candle's tanh approximation, which is HF's `gelu_new`.
//!
//! One path serves training and inference, [`Gpt2::hidden`]: with
//! [`Kernels::Inference`] it takes candle's fused `layer_norm` and `softmax_last_dim`
//! (no backward pass) and 2-D matmuls, and usually a [`KvCache`].

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Value, json};

use super::ModelError;
use super::attention::{Kernels, attend, causal_mask};
use super::kv_cache::{KvCache, LayerKv};
use super::lora::{Builders, Proj};
use super::weight::{Embedding, Matrix};

/// Hyper-parameters of a GPT-2 model (HF key names).
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Number of learned positions (longest sequence).
    pub n_positions: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Width of the MLP hidden layer (HF's `n_inner`, default `4·n_embd`).
    pub n_inner: usize,
}

impl Gpt2Config {
    /// A tiny config for tests and smoke runs.
    pub fn tiny() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            n_positions: 64,
            layer_norm_epsilon: 1e-5,
            n_inner: 128,
        }
    }

    /// Checks that sizes are non-zero and heads divide the width.
    pub fn validate(&self, path: &std::path::Path) -> std::result::Result<(), ModelError> {
        let bad = |key: &str, message: &str| ModelError::unsupported(path, key, message);
        super::require_positive(
            path,
            &[
                ("vocab_size", self.vocab_size),
                ("n_embd", self.n_embd),
                ("n_layer", self.n_layer),
                ("n_head", self.n_head),
                ("n_positions", self.n_positions),
                ("n_inner", self.n_inner),
            ],
        )?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(bad("n_head", "must divide n_embd"));
        }
        Ok(())
    }

    /// The HF `config.json`.
    pub fn to_hf_json(&self) -> Value {
        let mut map = super::hf_header("GPT2LMHeadModel", "gpt2");
        let mut put = |key: &str, value: Value| {
            map.insert(key.to_string(), value);
        };
        put("vocab_size", json!(self.vocab_size));
        put("n_embd", json!(self.n_embd));
        put("n_layer", json!(self.n_layer));
        put("n_head", json!(self.n_head));
        put("n_positions", json!(self.n_positions));
        put("n_ctx", json!(self.n_positions));
        put("n_inner", json!(self.n_inner));
        put("layer_norm_epsilon", json!(self.layer_norm_epsilon));
        put("activation_function", json!("gelu_new"));
        put("scale_attn_weights", json!(true));
        put("scale_attn_by_inverse_layer_idx", json!(false));
        put("reorder_and_upcast_attn", json!(false));
        put("tie_word_embeddings", json!(true));
        put("use_cache", json!(true));
        Value::Object(map)
    }
}

/// LayerNorm with gain and bias: `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Fetches `{vb}.weight` and `{vb}.bias` of width `size`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    /// The norm of `x` over its last dimension.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels == Kernels::Inference {
            let x = x.contiguous()?;
            return candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32);
        }
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Causal multi-head self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    c_attn: Proj,
    c_proj: Proj,
    n_head: usize,
}

impl Attention {
    /// Fetches `{vb}.c_attn` and `{vb}.c_proj`.
    pub fn new(config: &Gpt2Config, vb: &Builders) -> Result<Attention> {
        let width = config.n_embd;
        Ok(Attention {
            c_attn: Proj::conv1d(width, 3 * width, vb, "c_attn")?,
            c_proj: Proj::conv1d(width, width, vb, "c_proj")?,
            n_head: config.n_head,
        })
    }

    /// `x: [B, T, C]` → `[B, T, C]`: the positions `x` holds attend causally to each
    /// other (`mask` from [`causal_mask`]) and, with a `cache`, to the earlier positions
    /// the cache holds (it then holds these too).
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerKv>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (batch, seq, width) = x.dims3()?;
        let head_dim = width / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        // [B, T, C] slice → [B, H, T, D]
        let heads = |index: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, index * width, width)?
                .reshape((batch, seq, self.n_head, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let y = attend(&q, &k, &v, mask, scale, cache, kernels)?;
        let y = y.transpose(1, 2)?.reshape((batch, seq, width))?;
        self.c_proj.forward(&y)
    }
}

/// The feed-forward network: `c_proj(gelu_new(c_fc(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    c_fc: Proj,
    c_proj: Proj,
}

impl Mlp {
    /// Fetches `{vb}.c_fc` and `{vb}.c_proj`.
    pub fn new(config: &Gpt2Config, vb: &Builders) -> Result<Mlp> {
        Ok(Mlp {
            c_fc: Proj::conv1d(config.n_embd, config.n_inner, vb, "c_fc")?,
            c_proj: Proj::conv1d(config.n_inner, config.n_embd, vb, "c_proj")?,
        })
    }

    /// `c_proj(gelu_new(c_fc(x)))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, i.e. HF's `gelu_new`.
        let hidden = self.c_fc.forward(x)?.gelu()?;
        self.c_proj.forward(&hidden)
    }
}

/// One pre-norm GPT-2 block.
#[derive(Debug, Clone)]
pub struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Fetches `{vb}.{ln_1,attn,ln_2,mlp}`.
    pub fn new(config: &Gpt2Config, vb: &Builders) -> Result<Block> {
        let (width, eps) = (config.n_embd, config.layer_norm_epsilon);
        Ok(Block {
            ln_1: LayerNorm::new(width, eps, vb.base.pp("ln_1"))?,
            attn: Attention::new(config, &vb.pp("attn"))?,
            ln_2: LayerNorm::new(width, eps, vb.base.pp("ln_2"))?,
            mlp: Mlp::new(config, &vb.pp("mlp"))?,
        })
    }

    /// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` (see [`Attention::forward`]).
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerKv>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let normed = self.ln_1.forward(x, kernels)?;
        let x = (x + self.attn.forward(&normed, mask, cache, kernels)?)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&x, kernels)?)?;
        x + mlp
    }
}

/// A GPT-2 causal language model with `lm_head` tied to `wte`.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    config: Gpt2Config,
    /// The LoRA adapter of the blocks' projections, if any.
    adapter: Option<std::sync::Arc<super::lora::Adapter>>,
}

impl Gpt2 {
    /// Fetches `transformer.{wte,wpe,h.N,ln_f}` through `vb`.
    pub fn new(config: &Gpt2Config, vb: VarBuilder) -> std::result::Result<Gpt2, ModelError> {
        Gpt2::with_builders(config, &Builders::plain(vb))
    }

    /// As [`Gpt2::new`], reading a frozen base's bf16/f16 matrices in place when
    /// `builders` maps them.
    pub fn with_builders(
        config: &Gpt2Config,
        builders: &Builders,
    ) -> std::result::Result<Gpt2, ModelError> {
        let vb = builders.pp("transformer");
        let (width, eps) = (config.n_embd, config.layer_norm_epsilon);
        let wte = Embedding::load(
            config.vocab_size,
            width,
            vb.mapped.as_deref(),
            vb.base.pp("wte"),
        )?;
        let wpe = Embedding::load(
            config.n_positions,
            width,
            vb.mapped.as_deref(),
            vb.base.pp("wpe"),
        )?;
        let h = (0..config.n_layer)
            .map(|index| Block::new(config, &vb.pp("h").pp(index)))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(width, eps, vb.base.pp("ln_f"))?;
        Ok(Gpt2 {
            wte,
            wpe,
            h,
            ln_f,
            config: config.clone(),
            adapter: builders.lora.as_ref().map(|(_, adapter)| adapter.clone()),
        })
    }

    /// The LoRA adapter of the blocks' projections, if any.
    pub fn adapter(&self) -> Option<&std::sync::Arc<super::lora::Adapter>> {
        self.adapter.as_ref()
    }

    /// The config the model was built with.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The causal mask of a training forward pass over `len` positions, for
    /// [`Gpt2::piece`].
    pub fn training_mask(
        &self,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        causal_mask(len, 0, dtype, device)
    }

    /// The token and position embeddings `[B, T, H]` of ids `[B, T]` at positions
    /// `0..T`: the first piece of the body (see [`crate::model::body::Body`]).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_after(input_ids, 0)
    }

    /// Token and position embeddings of ids `[B, T]` at positions `past..past + T`;
    /// positions past `n_positions` are an error.
    fn embed_after(&self, input_ids: &Tensor, past: usize) -> Result<Tensor> {
        let (_batch, seq) = input_ids.dims2()?;
        if past + seq > self.config.n_positions {
            candle_core::bail!(
                "{} positions are more than n_positions = {}",
                past + seq,
                self.config.n_positions
            );
        }
        let positions = Tensor::arange(past as u32, (past + seq) as u32, input_ids.device())?;
        self.wte
            .forward(input_ids)?
            .broadcast_add(&self.wpe.forward(&positions)?)
    }

    /// Block `index` of the body's training forward pass, or `ln_f` for `index == L`.
    /// After [`Gpt2::embed`], these chained compute exactly what [`Gpt2::hidden`] does
    /// without a cache.
    pub fn piece(&self, index: usize, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match self.h.get(index) {
            Some(block) => block.forward(x, mask, None, Kernels::Differentiable),
            None => self.ln_f.forward(x, Kernels::Differentiable),
        }
    }

    /// The final hidden states `[B, T, H]` (after `ln_f`) for token ids `[B, T]`:
    /// positions `0..T`, or with a `cache` the `T` positions after those it holds (it
    /// then holds these too; after an error it must be cleared). Positions past
    /// `n_positions` are an error.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (_batch, seq) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |cache| cache.len());
        let mut x = self.embed_after(input_ids, past)?;
        let mask = causal_mask(seq, past, x.dtype(), x.device())?;
        for (index, block) in self.h.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| c.layer(index)).transpose()?;
            x = block.forward(&x, mask.as_ref(), layer_cache, kernels)?;
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        self.ln_f.forward(&x, kernels)
    }

    /// Logits `[…, V]` of final hidden states `[…, H]`: the tied head, `x · wteᵀ`; for
    /// inference as one 2-D matmul over all positions.
    pub fn logits(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        match self.wte.matrix() {
            Matrix::Tensor(wte) if kernels == Kernels::Inference => {
                let (batch, seq, width) = x.dims3()?;
                x.reshape((batch * seq, width))?
                    .matmul(&wte.t()?)?
                    .reshape((batch, seq, ()))
            }
            Matrix::Tensor(wte) => x.broadcast_matmul(&wte.t()?),
            Matrix::Mapped(wte) => wte.matmul_t(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_candles_reference() {
        let x = crate::model::testing::random_f64(&[2, 3, 16], 5);
        let weight = Tensor::arange_step(0.5f64, 2.1, 0.1, &Device::Cpu)
            .unwrap()
            .narrow(0, 0, 16)
            .unwrap();
        let bias = (weight.clone() * 0.1).unwrap();
        let norm = LayerNorm {
            weight: weight.clone(),
            bias: bias.clone(),
            // Exactly representable in f32, which is what candle's reference takes.
            eps: 1.0 / 65536.0,
        };
        let reference = candle_nn::ops::layer_norm_slow(&x, &weight, &bias, 1.0 / 65536.0).unwrap();
        let normed = norm.forward(&x, Kernels::Differentiable).unwrap();
        let diff = crate::model::testing::max_diff(&normed, &reference);
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn candles_gelu_is_hfs_gelu_new() {
        let xs = [-3.0f64, -1.0, -0.25, 0.0, 0.5, 2.0];
        let got = Tensor::new(&xs, &Device::Cpu)
            .unwrap()
            .gelu()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (x, y) in xs.iter().zip(got) {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            let want = 0.5 * x * (1.0 + inner.tanh());
            assert!((y - want).abs() < 1e-12, "gelu({x}) = {y}, want {want}");
        }
    }
}
