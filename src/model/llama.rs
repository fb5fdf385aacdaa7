//! The llama family, top to bottom: Llama (`LlamaForCausalLM`, with Llama 3's rotary
//! scaling), Mistral (`MistralForCausalLM`, Llama under another name as long as its
//! sliding window covers the context) and Qwen2 (`Qwen2ForCausalLM`, which is Llama
//! with q/k/v biases).
//!
//! ```text
//! ids ─ embed_tokens ─┬─ [ x + attn(rms_norm(x)) ; x + mlp(rms_norm(x)) ] × L ─ norm ─ lm_head ─ logits
//! attn: q,k,v projections → RoPE on q,k → k,v heads repeated (GQA) → causal softmax(qkᵀ/√d)·v → o_proj
//! mlp:  down_proj(silu(gate_proj(x)) * up_proj(x))   (SwiGLU)
//! ```
//!
//! Everything is built from candle primitives that have a backward pass: RMSNorm is
//! `x / sqrt(mean(x²) + eps) * w` from `sqr`/`mean_keepdim`/`sqrt`/`broadcast_div`;
//! softmax is `candle_nn::ops::softmax` (max-subtract, `exp`, `sum`, divide); RoPE is HF's
//! rotate-half form `x·cos + rotate_half(x)·sin` with `narrow`/`neg`/`cat`. Tensor names
//! are exactly HF's.
//!
//! One path serves training and inference, [`Llama::hidden`]: with
//! [`Kernels::Inference`] it takes candle's fused kernels (`rms_norm`, `rope`,
//! `softmax_last_dim`), which have no backward pass, and usually a [`KvCache`].

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Value, json};

use super::ModelError;
use super::attention::{Kernels, attend, causal_mask};
use super::kv_cache::{KvCache, LayerKv};
use super::lora::{Builders, Proj};
use super::weight::{Embedding, Linear};

/// Which HF architecture a llama-family config is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFlavor {
    /// `LlamaForCausalLM`, `model_type: llama`.
    Llama,
    /// `Qwen2ForCausalLM`, `model_type: qwen2` (q/k/v biases).
    Qwen2,
    /// `MistralForCausalLM`, `model_type: mistral` (Llama's layers and rotary layout).
    Mistral,
}

impl LlamaFlavor {
    /// The HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFlavor::Llama => "llama",
            LlamaFlavor::Qwen2 => "qwen2",
            LlamaFlavor::Mistral => "mistral",
        }
    }

    /// The HF `architectures` entry.
    pub fn architecture(self) -> &'static str {
        match self {
            LlamaFlavor::Llama => "LlamaForCausalLM",
            LlamaFlavor::Qwen2 => "Qwen2ForCausalLM",
            LlamaFlavor::Mistral => "MistralForCausalLM",
        }
    }
}

/// Llama 3's rotary scaling (`rope_type: llama3`): low frequencies are divided by
/// `factor`, high ones kept, and those in between interpolated, so that a model trained
/// on `original_max_position_embeddings` positions reads longer contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// How much longer the context became (8 for Llama 3.1).
    pub factor: f64,
    /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was first trained on.
    pub original_max_position_embeddings: usize,
}

impl Llama3RopeScaling {
    /// transformers' `_compute_llama3_parameters` applied to one inverse frequency.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        let old_context = self.original_max_position_embeddings as f64;
        let low_freq_wavelen = old_context / self.low_freq_factor;
        let high_freq_wavelen = old_context / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        let scaled = if wavelen > low_freq_wavelen {
            inv_freq / self.factor
        } else {
            inv_freq
        };
        // transformers: `~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)`.
        if wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen {
            let smooth = (old_context / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * scaled / self.factor + smooth * scaled
        } else {
            scaled
        }
    }

    /// The `rope_parameters` entries besides `rope_type` and `rope_theta`.
    fn to_json(self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("factor".into(), json!(self.factor));
        map.insert("low_freq_factor".into(), json!(self.low_freq_factor));
        map.insert("high_freq_factor".into(), json!(self.high_freq_factor));
        map.insert(
            "original_max_position_embeddings".into(),
            json!(self.original_max_position_embeddings),
        );
        map
    }
}

/// Hyper-parameters of a llama-family model (HF key names).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Llama or Qwen2.
    pub flavor: LlamaFlavor,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (HF default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Llama 3's rotary scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Mistral's attention window; never shorter than the context trainyard runs
    /// (see [`LlamaConfig::max_positions`]).
    pub sliding_window: Option<usize>,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (always for Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on `o_proj` (Llama's `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// A tiny config for tests and smoke runs.
    pub fn tiny(flavor: LlamaFlavor, tie_word_embeddings: bool) -> LlamaConfig {
        LlamaConfig {
            flavor,
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            sliding_window: None,
            max_position_embeddings: 64,
            tie_word_embeddings,
            qkv_bias: flavor == LlamaFlavor::Qwen2,
            o_bias: false,
            mlp_bias: false,
        }
    }

    /// The longest sequence trainyard runs: `max_position_embeddings`, or a shorter
    /// sliding window (attention within the window is plain causal attention, so the
    /// model is exact up to there).
    pub fn max_positions(&self) -> usize {
        self.sliding_window
            .map_or(self.max_position_embeddings, |window| {
                window.min(self.max_position_embeddings)
            })
    }

    /// The inverse frequency of rotary pair `i` of `head_dim / 2`, scaled when the
    /// config says so.
    pub fn inv_freq(&self, i: usize) -> f64 {
        let inv_freq = 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64);
        match &self.rope_scaling {
            Some(scaling) => scaling.scale(inv_freq),
            None => inv_freq,
        }
    }

    /// Checks that sizes are non-zero and heads divide evenly.
    pub fn validate(&self, path: &std::path::Path) -> std::result::Result<(), ModelError> {
        let bad = |key: &str, message: &str| ModelError::unsupported(path, key, message);
        super::require_positive(
            path,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_key_value_heads),
                ("head_dim", self.head_dim),
            ],
        )?;
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        let biases_fit = match self.flavor {
            LlamaFlavor::Llama | LlamaFlavor::Mistral => self.qkv_bias == self.o_bias,
            LlamaFlavor::Qwen2 => self.qkv_bias && !self.o_bias && !self.mlp_bias,
        };
        if !biases_fit {
            return Err(bad(
                "attention_bias",
                "llama has biases on all of q/k/v/o or none; qwen2 on q/k/v only",
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", "must be even for rotary embeddings"));
        }
        Ok(())
    }

    /// The HF `config.json`, with the rotary base both as `rope_parameters.rope_theta`
    /// (transformers 5) and top-level `rope_theta` (older readers).
    pub fn to_hf_json(&self) -> Value {
        let mut map = super::hf_header(self.flavor.architecture(), self.flavor.model_type());
        let mut put = |key: &str, value: Value| {
            map.insert(key.to_string(), value);
        };
        put("vocab_size", json!(self.vocab_size));
        put("hidden_size", json!(self.hidden_size));
        put("intermediate_size", json!(self.intermediate_size));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("num_key_value_heads", json!(self.num_key_value_heads));
        put("head_dim", json!(self.head_dim));
        put("hidden_act", json!("silu"));
        put("rms_norm_eps", json!(self.rms_norm_eps));
        put("rope_theta", json!(self.rope_theta));
        match self.rope_scaling {
            None => put(
                "rope_parameters",
                json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            ),
            Some(scaling) => {
                let mut parameters = scaling.to_json();
                // Older readers take `rope_scaling` with `type`/`rope_type`.
                let mut legacy = parameters.clone();
                legacy.insert("rope_type".into(), json!("llama3"));
                put("rope_scaling", Value::Object(legacy));
                parameters.insert("rope_type".into(), json!("llama3"));
                parameters.insert("rope_theta".into(), json!(self.rope_theta));
                put("rope_parameters", Value::Object(parameters));
            }
        }
        put(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        put("tie_word_embeddings", json!(self.tie_word_embeddings));
        put("use_cache", json!(true));
        match self.flavor {
            LlamaFlavor::Llama => {
                put("attention_bias", json!(self.qkv_bias));
                put("mlp_bias", json!(self.mlp_bias));
            }
            LlamaFlavor::Qwen2 => {
                put("use_sliding_window", json!(false));
            }
            LlamaFlavor::Mistral => {
                put("sliding_window", json!(self.sliding_window));
            }
        }
        Value::Object(map)
    }
}

/// Root-mean-square norm with a learned gain: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Fetches `{vb}.weight` of width `size`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }

    /// The norm of `x` over its last dimension.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels == Kernels::Inference {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        if super::fused::applies(x) {
            return super::fused::rms_norm(x, &self.weight, self.eps);
        }
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)
    }
}

/// The inverse frequencies `1 / theta^(2i / head_dim)` of the `head_dim / 2` rotary
/// pairs (unscaled).
pub fn default_inv_freqs(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

/// The rotary tables `cos, sin` of positions `start..start + len` for the inverse
/// frequencies `inv_freqs` (see [`LlamaConfig::inv_freq`]), in the layout `kernels`
/// rotate with: `[T, head_dim / 2]` (one column per frequency) for candle's fused
/// `rotary_emb::rope`, else HF's `[T, head_dim]` (the frequencies repeated twice).
pub fn rope_tables(
    start: usize,
    len: usize,
    inv_freqs: &[f64],
    kernels: Kernels,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freqs.len();
    let angles: Vec<f64> = (start..start + len)
        .flat_map(|position| inv_freqs.iter().map(move |f| position as f64 * f))
        .collect();
    let cos: Vec<f64> = angles.iter().map(|angle| angle.cos()).collect();
    let sin: Vec<f64> = angles.iter().map(|angle| angle.sin()).collect();
    let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
    Ok(match kernels {
        Kernels::Inference => (cos, sin),
        Kernels::Differentiable => (
            Tensor::cat(&[&cos, &cos], 1)?,
            Tensor::cat(&[&sin, &sin], 1)?,
        ),
    })
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves along the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary position embedding of `x: [B, H, T, D]` with tables `[T, D]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// [`apply_rope`] by `kernels` (tables as [`rope_tables`] makes them for `kernels`):
/// candle's fused `rope`, trainyard's where it applies (f32 on the CPU), or composed.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Inference => candle_nn::rotary_emb::rope(x, cos, sin),
        Kernels::Differentiable if super::fused::applies(x) => super::fused::rope(x, cos, sin),
        Kernels::Differentiable => apply_rope(x, cos, sin),
    }
}

/// What attention needs of the positions one forward pass covers: their rotary tables
/// and their causal mask.
#[derive(Debug, Clone)]
pub struct Positions {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

impl Positions {
    /// The `len` positions after the `past` ones in a cache, for `kernels`.
    pub fn new(
        inv_freqs: &[f64],
        past: usize,
        len: usize,
        kernels: Kernels,
        dtype: DType,
        device: &Device,
    ) -> Result<Positions> {
        let (cos, sin) = rope_tables(past, len, inv_freqs, kernels, dtype, device)?;
        let mask = causal_mask(len, past, dtype, device)?;
        Ok(Positions { cos, sin, mask })
    }
}

/// Grouped-query self-attention with RoPE.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Fetches `{vb}.{q,k,v,o}_proj` (with their adapters, if any).
    pub fn new(config: &LlamaConfig, vb: &Builders) -> Result<Attention> {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim);
        let q_width = config.num_attention_heads * head_dim;
        let kv_width = config.num_key_value_heads * head_dim;
        Ok(Attention {
            q_proj: Proj::new(hidden, q_width, config.qkv_bias, vb, "q_proj")?,
            k_proj: Proj::new(hidden, kv_width, config.qkv_bias, vb, "k_proj")?,
            v_proj: Proj::new(hidden, kv_width, config.qkv_bias, vb, "v_proj")?,
            o_proj: Proj::new(q_width, hidden, config.o_bias, vb, "o_proj")?,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim,
        })
    }

    /// `x: [B, T, C]` → `[B, T, C]`: the positions `x` holds attend causally to each
    /// other and, with a `cache`, to the earlier positions the cache holds (it then
    /// holds these too).
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Positions,
        cache: Option<&mut LayerKv>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        // [B, T, H·D] → [B, H, T, D]
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((batch, seq, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let (cos, sin) = (&positions.cos, &positions.sin);
        let q = rope(&q, cos, sin, kernels)?;
        let k = rope(&k, cos, sin, kernels)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mask = positions.mask.as_ref();
        let y = attend(&q, &k, &v, mask, scale, cache, kernels)?; // [B, H, T, D]
        let y = y
            .transpose(1, 2)?
            .reshape((batch, seq, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

/// The SwiGLU feed-forward network.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    /// Fetches `{vb}.{gate,up,down}_proj` (with their adapters, if any).
    pub fn new(config: &LlamaConfig, vb: &Builders) -> Result<Mlp> {
        let (hidden, inner, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Mlp {
            gate_proj: Proj::new(hidden, inner, bias, vb, "gate_proj")?,
            up_proj: Proj::new(hidden, inner, bias, vb, "up_proj")?,
            down_proj: Proj::new(inner, hidden, bias, vb, "down_proj")?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let hidden = match super::fused::applies(&gate) {
            true => super::fused::swiglu(&gate, &up)?,
            false => (gate.silu()? * up)?,
        };
        self.down_proj.forward(&hidden)
    }
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Fetches `{vb}.{input_layernorm,self_attn,post_attention_layernorm,mlp}`.
    pub fn new(config: &LlamaConfig, vb: &Builders) -> Result<Block> {
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Block {
            input_layernorm: RmsNorm::new(hidden, eps, vb.base.pp("input_layernorm"))?,
            self_attn: Attention::new(config, &vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                hidden,
                eps,
                vb.base.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(config, &vb.pp("mlp"))?,
        })
    }

    /// `x + attn(norm(x))`, then `x + mlp(norm(x))` (see [`Attention::forward`]).
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Positions,
        cache: Option<&mut LayerKv>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x, kernels)?;
        let attn = self.self_attn.forward(&normed, positions, cache, kernels)?;
        let x = (x + attn)?;
        let normed = self.post_attention_layernorm.forward(&x, kernels)?;
        x + self.mlp.forward(&normed)?
    }
}

/// A Llama / Qwen2 causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    config: LlamaConfig,
    /// The rotary inverse frequencies, scaled as the config says.
    inv_freqs: Vec<f64>,
    adapter: Option<std::sync::Arc<super::lora::Adapter>>,
    /// The last training forward pass's positions (length, dtype): every step of a run
    /// has the same, and rebuilding the tables cost ~1% of a small model's step.
    training_positions: std::sync::Arc<std::sync::Mutex<Option<(usize, DType, Positions)>>>,
}

impl Llama {
    /// Fetches `model.embed_tokens`, `model.layers.N`, `model.norm` and (untied)
    /// `lm_head` through `vb`.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> std::result::Result<Llama, ModelError> {
        Llama::with_adapters(config, Builders::plain(vb))
    }

    /// As [`Llama::new`], with LoRA adapters on the projections `builders` names.
    pub fn with_adapters(
        config: &LlamaConfig,
        builders: Builders,
    ) -> std::result::Result<Llama, ModelError> {
        let vb = builders.base.clone();
        let blocks = builders.pp("model");
        let model = vb.pp("model");
        let embed_tokens = Embedding::load(
            config.vocab_size,
            config.hidden_size,
            builders.mapped.as_deref(),
            blocks.module("embed_tokens"),
        )?
        .with_token_rows(blocks.token_rows(
            "embed_tokens",
            config.vocab_size,
            config.hidden_size,
        )?);
        let layers = (0..config.num_hidden_layers)
            .map(|index| Block::new(config, &blocks.pp("layers").pp(index)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(config.hidden_size, config.rms_norm_eps, model.pp("norm"))?;
        let lm_head = if config.tie_word_embeddings {
            Linear::new(embed_tokens.matrix().clone())
                .with_token_rows(embed_tokens.token_rows().cloned())
        } else {
            Linear::load(
                config.hidden_size,
                config.vocab_size,
                false,
                builders.mapped.as_deref(),
                builders.module("lm_head"),
            )?
            .with_token_rows(builders.token_rows(
                "lm_head",
                config.vocab_size,
                config.hidden_size,
            )?)
        };
        // The vocabulary the model answers over: grown by trainable token rows.
        let mut config = config.clone();
        if let Some(rows) = embed_tokens.token_rows() {
            config.vocab_size = rows.vocab();
        }
        let inv_freqs = (0..config.head_dim / 2)
            .map(|i| config.inv_freq(i))
            .collect();
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
            inv_freqs,
            adapter: builders.lora.as_ref().map(|(_, adapter)| adapter.clone()),
            training_positions: Default::default(),
        })
    }

    /// The LoRA adapter the model was built with, if any.
    pub fn adapter(&self) -> Option<&std::sync::Arc<super::lora::Adapter>> {
        self.adapter.as_ref()
    }

    /// The config the model was built with.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits `[…, V]` of final hidden states `[…, H]` (the head).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// The positions `0..len` of a training forward pass, for [`Llama::piece`].
    pub fn training_positions(
        &self,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Positions> {
        self.positions(0, len, Kernels::Differentiable, dtype, device)
    }

    /// [`Positions::new`], reusing the last training pass's tables on the CPU.
    fn positions(
        &self,
        past: usize,
        len: usize,
        kernels: Kernels,
        dtype: DType,
        device: &Device,
    ) -> Result<Positions> {
        let reusable = past == 0 && kernels == Kernels::Differentiable && device.is_cpu();
        if !reusable {
            return Positions::new(&self.inv_freqs, past, len, kernels, dtype, device);
        }
        let mut cached = self
            .training_positions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some((cached_len, cached_dtype, positions)) = cached.as_ref()
            && *cached_len == len
            && *cached_dtype == dtype
        {
            return Ok(positions.clone());
        }
        let positions = Positions::new(&self.inv_freqs, 0, len, kernels, dtype, device)?;
        *cached = Some((len, dtype, positions.clone()));
        Ok(positions)
    }

    /// The token embeddings `[B, T, H]` of ids `[B, T]`: the first piece of the body
    /// (see [`crate::model::body::Body`]).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Block `index` of the body's training forward pass, or the final norm for
    /// `index == L`. After [`Llama::embed`], these chained compute exactly what
    /// [`Llama::hidden`] does without a cache.
    pub fn piece(&self, index: usize, x: &Tensor, positions: &Positions) -> Result<Tensor> {
        match self.layers.get(index) {
            Some(layer) => layer.forward(x, positions, None, Kernels::Differentiable),
            None => self.norm.forward(x, Kernels::Differentiable),
        }
    }

    /// The final hidden states `[B, T, H]` (after the last norm) for token ids `[B, T]`:
    /// positions `0..T`, or with a `cache` the `T` positions after those it holds (it
    /// then holds these too; after an error it must be cleared).
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (_batch, seq) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |cache| cache.len());
        let mut x = self.embed(input_ids)?;
        let (dtype, device) = (x.dtype(), x.device().clone());
        let positions = self.positions(past, seq, kernels, dtype, &device)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| c.layer(index)).transpose()?;
            x = layer.forward(&x, &positions, layer_cache, kernels)?;
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        self.norm.forward(&x, kernels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, random_f64 as random};

    #[test]
    fn rms_norm_matches_candles_reference() {
        let x = random(&[2, 3, 16], 1);
        let weight = random(&[16], 2);
        let norm = RmsNorm {
            weight: weight.clone(),
            eps: 1e-6,
        };
        let reference = candle_nn::ops::rms_norm_slow(&x, &weight, 1e-6).unwrap();
        let normed = norm.forward(&x, Kernels::Differentiable).unwrap();
        assert!(max_diff(&normed, &reference) < 1e-12);
    }

    #[test]
    fn rope_matches_candles_rotate_half_reference() {
        let (seq, head_dim) = (5, 8);
        let x = random(&[2, 3, seq, head_dim], 3);
        let inv_freqs = default_inv_freqs(head_dim, 10_000.0);
        let (cos, sin) = rope_tables(
            0,
            seq,
            &inv_freqs,
            Kernels::Differentiable,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        // candle's reference takes the half tables and repeats them itself.
        let half_cos = cos.narrow(1, 0, head_dim / 2).unwrap();
        let half_sin = sin.narrow(1, 0, head_dim / 2).unwrap();
        let reference = candle_nn::rotary_emb::rope_slow(&x, &half_cos, &half_sin).unwrap();
        let ours = apply_rope(&x, &cos, &sin).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-12);
        // Position 0 is the identity; rotation preserves each pair's norm.
        let first = ours.narrow(2, 0, 1).unwrap();
        assert!(max_diff(&first, &x.narrow(2, 0, 1).unwrap()) < 1e-15);
    }
}
