//! LoRA adapters for both families, in PEFT's layout.
//!
//! A targeted projection `y = x·Wᵀ + b` becomes `y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ` with
//! `A: [r, in]` (uniform ±1/√in, as PEFT's Kaiming init) and `B: [out, r]` (zeros, so an
//! untrained adapter changes nothing). The base weights are plain tensors — no
//! gradient, no optimizer state — and only `A` and `B` live in a [`VarMap`] under
//! PEFT's names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so
//! `adapter_model.safetensors` is written without renaming and other tools read it.
//! [`merge`] folds an adapter into the base: `W' = W + (α/r)·B·A`.
//!
//! GPT-2's `Conv1D` layers compute `x·W + b` with `W: [in, out]`: the adapter is the same
//! (`A: [r, in]`, `B: [out, r]`), and PEFT marks it `fan_in_fan_out`, so a merge adds the
//! transpose, `W' = W + (α/r)·(B·A)ᵀ`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{Value, json};

use super::mapped::MappedSafetensors;
use super::weight::Linear;
use crate::rng::Rng;

/// The prefix PEFT puts before the base model's parameter names.
pub const PEFT_PREFIX: &str = "base_model.model";
/// The adapter weights file of a PEFT adapter directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter config file of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Every projection of a llama-family block an adapter can target.
pub const LLAMA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Every projection of a GPT-2 block an adapter can target (`c_proj` names both the
/// attention's output and the MLP's, as in PEFT's suffix matching).
pub const GPT2_TARGETS: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// The whole modules an adapter may train and save alongside its LoRA pairs (PEFT's
/// `modules_to_save`): the embeddings and the output head, which a chat fine-tune needs
/// when the base never saw the chat template's special tokens.
pub const SAVABLE_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

/// The RNG stream of adapter initialisation.
const LORA_STREAM: u64 = 0x6c6f_7261_696e_6974;
/// Mixed into the seed of dropout masks.
const DROPOUT_STREAM: u64 = 0x6472_6f70_6f75_7421;

/// Shape of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank `r`.
    pub rank: usize,
    /// Scale numerator `α` (the update is scaled by α/r).
    pub alpha: f64,
    /// Projection names adapted (`q_proj`, …).
    pub targets: Vec<String>,
    /// Whole modules trained and saved with the adapter (some of [`SAVABLE_MODULES`]),
    /// starting from the base's weights.
    pub modules_to_save: Vec<String>,
    /// Dropout probability on each adapter's input while training (PEFT's
    /// `lora_dropout`); 0 turns it off.
    pub dropout: f64,
    /// Token rows trained and saved with the adapter, by module (`embed_tokens`, and
    /// `lm_head` when the head is not tied): PEFT's `trainable_token_indices`, for the
    /// tokens `add_tokens` added.
    pub trainable_tokens: BTreeMap<String, Vec<u32>>,
    /// QLoRA: the base's block projections held quantized this way while training
    /// (`None`: as stored). The adapter written is the same PEFT LoRA adapter.
    pub quant: Option<super::quant::QuantSpec>,
    /// The adapted weights are stored `[in, out]` (GPT-2's `Conv1D`; PEFT's
    /// `fan_in_fan_out`): a merge adds `(B·A)ᵀ`. PEFT sets it from the layer type, and
    /// so does trainyard ([`LoraSpec::for_family`]), whatever a config file says.
    pub fan_in_fan_out: bool,
}

/// The adapter tensor holding a module's trainable token rows (PEFT's name).
pub const TOKEN_ROWS: &str = "token_adapter.trainable_tokens_delta";

impl LoraSpec {
    /// α/r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The spec for a model whose blocks are GPT-2's `Conv1D` layers (`conv1d`) or
    /// `nn.Linear` ones: `fan_in_fan_out` follows the layers, as PEFT makes it.
    pub fn for_family(self, conv1d: bool) -> LoraSpec {
        LoraSpec {
            fan_in_fan_out: conv1d,
            ..self
        }
    }

    /// PEFT's `adapter_config.json` for this adapter on the base model `base`.
    pub fn adapter_config(&self, base: &str) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": (!self.modules_to_save.is_empty()).then_some(&self.modules_to_save),
            "use_rslora": false,
            "use_dora": false,
            "trainable_token_indices": (!self.trainable_tokens.is_empty()).then_some(&self.trainable_tokens),
        })
    }

    /// Reads PEFT's `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
    /// `modules_to_save`).
    pub fn from_adapter_config(value: &Value) -> std::result::Result<LoraSpec, String> {
        let rank = value
            .get("r")
            .and_then(Value::as_u64)
            .ok_or("missing or invalid key `r`")?;
        let alpha = value
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or("missing or invalid key `lora_alpha`")?;
        let targets = value
            .get("target_modules")
            .and_then(Value::as_array)
            .ok_or("missing or invalid key `target_modules` (a list is expected)")?
            .iter()
            .map(|target| target.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("`target_modules` must be a list of names")?;
        let modules_to_save = match value.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("`modules_to_save` must be a list of names")?,
            Some(_) => return Err("`modules_to_save` must be a list of names or null".to_string()),
        };
        let fan_in_fan_out = match value.get("fan_in_fan_out") {
            None | Some(Value::Null) => false,
            Some(value) => value
                .as_bool()
                .ok_or("`fan_in_fan_out` must be true or false")?,
        };
        let dropout = match value.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(value) => value.as_f64().ok_or("`lora_dropout` must be a number")?,
        };
        let ids = |value: &Value| {
            value
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok()))
                        .collect::<Option<Vec<u32>>>()
                })
                .ok_or("`trainable_token_indices` must list token ids")
        };
        // A bare list targets the input embeddings, as PEFT reads it.
        let trainable_tokens = match value.get("trainable_token_indices") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(modules)) => modules
                .iter()
                .map(|(module, list)| Ok((module.clone(), ids(list)?)))
                .collect::<std::result::Result<_, &str>>()?,
            Some(list) => BTreeMap::from([("embed_tokens".to_string(), ids(list)?)]),
        };
        if rank == 0 {
            return Err("`r` must be positive".to_string());
        }
        Ok(LoraSpec {
            rank: rank as usize,
            alpha,
            targets,
            modules_to_save,
            dropout,
            trainable_tokens,
            quant: None,
            fan_in_fan_out,
        })
    }
}

/// An adapter's spec and its dropout switch, shared by every adapted projection of one
/// model.
///
/// Dropout masks are drawn from (seed, key, projection name) alone, so a training step
/// draws the same masks whether or not the run was resumed in between: the trainer sets
/// the key from the step and micro-batch before each training forward pass
/// ([`Adapter::set_dropout_key`]) and clears it after, so evaluation never drops.
#[derive(Debug)]
pub struct Adapter {
    /// The adapter's shape.
    pub spec: LoraSpec,
    /// Seed of the dropout masks.
    pub seed: u64,
    /// The current dropout key; [`NO_DROPOUT`] when off.
    key: AtomicU64,
}

/// The value of [`Adapter`]'s key when dropout is off.
const NO_DROPOUT: u64 = u64::MAX;

impl Adapter {
    /// An adapter with dropout off.
    pub fn new(spec: LoraSpec, seed: u64) -> Adapter {
        Adapter {
            spec,
            seed,
            key: AtomicU64::new(NO_DROPOUT),
        }
    }

    /// Turns dropout on with masks keyed by `key` (distinct per training micro-batch), or
    /// off with `None`.
    pub fn set_dropout_key(&self, key: Option<u64>) {
        let key = key.map_or(NO_DROPOUT, |key| key.min(NO_DROPOUT - 1));
        self.key.store(key, Ordering::Relaxed);
    }

    fn dropout_key(&self) -> Option<u64> {
        let key = self.key.load(Ordering::Relaxed);
        (key != NO_DROPOUT && self.spec.dropout > 0.0).then_some(key)
    }
}

/// Where a model's parameters come from: the base weights, the frozen base's bf16/f16
/// matrices read in place (when it has any), and, optionally, adapter variables (under
/// PEFT's prefix) with their spec. Walked down the module tree in step, like a
/// [`VarBuilder`].
#[derive(Clone)]
pub struct Builders<'a> {
    /// Base weights.
    pub base: VarBuilder<'a>,
    /// A frozen base's mapped files: its bf16/f16 matrices are read from there, not
    /// through `base`.
    pub mapped: Option<Arc<MappedSafetensors>>,
    /// Adapter variables and the adapter.
    pub lora: Option<(VarBuilder<'a>, Arc<Adapter>)>,
}

impl<'a> Builders<'a> {
    /// Base weights only.
    pub fn plain(base: VarBuilder<'a>) -> Builders<'a> {
        Builders {
            base,
            mapped: None,
            lora: None,
        }
    }

    /// The builder of the whole module `name`: the adapter's when the spec trains and saves
    /// it (`modules_to_save`), else the base's.
    pub fn module(&self, name: &str) -> VarBuilder<'a> {
        match &self.lora {
            Some((vb, adapter)) if adapter.spec.modules_to_save.iter().any(|m| m == name) => {
                vb.pp(name)
            }
            _ => self.base.pp(name),
        }
    }

    /// The trainable token rows of the table `name` (`[rows, hidden]`) when the adapter
    /// trains some (`trainable_token_indices`), under PEFT's name
    /// `{name}.token_adapter.trainable_tokens_delta`.
    pub fn token_rows(
        &self,
        name: &str,
        rows: usize,
        hidden: usize,
    ) -> Result<Option<super::vocab::TokenRows>> {
        let Some((vb, adapter)) = &self.lora else {
            return Ok(None);
        };
        let Some(ids) = adapter.spec.trainable_tokens.get(name) else {
            return Ok(None);
        };
        let values = vb.pp(name).get_with_hints(
            (ids.len(), hidden),
            TOKEN_ROWS,
            candle_nn::Init::Const(0.0),
        )?;
        super::vocab::TokenRows::new(ids.clone(), values, rows).map(Some)
    }

    /// Both builders one level down.
    pub fn pp(&self, name: impl ToString) -> Builders<'a> {
        let name = name.to_string();
        Builders {
            base: self.base.pp(&name),
            mapped: self.mapped.clone(),
            lora: self
                .lora
                .as_ref()
                .map(|(vb, adapter)| (vb.pp(&name), adapter.clone())),
        }
    }
}

/// The LoRA branch of a projection.
#[derive(Debug, Clone)]
struct Branch {
    a: Tensor,
    b: Tensor,
    adapter: Arc<Adapter>,
    /// Hash of the projection's name: its dropout masks' stream.
    name_key: u64,
}

/// A projection, with a LoRA branch when it is targeted.
#[derive(Debug, Clone)]
pub struct Proj {
    linear: Linear,
    lora: Option<Branch>,
}

impl Proj {
    /// `{name}.weight`/`{name}.bias` `[out, in]` from the base; `lora_A`/`lora_B` from
    /// the adapter builder when `name` is a target.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        builders: &Builders<'_>,
        name: &str,
    ) -> Result<Proj> {
        let linear = Linear::load(
            in_dim,
            out_dim,
            bias,
            builders.mapped.as_deref(),
            builders.base.pp(name),
        )?;
        Proj::with_branch(linear, in_dim, out_dim, builders, name)
    }

    /// GPT-2's `Conv1D` `{name}.weight` `[in, out]` and `{name}.bias` from the base
    /// (see [`Linear::load_conv1d`]); `lora_A`/`lora_B` as for [`Proj::new`].
    pub fn conv1d(
        in_dim: usize,
        out_dim: usize,
        builders: &Builders<'_>,
        name: &str,
    ) -> Result<Proj> {
        let linear = Linear::load_conv1d(
            in_dim,
            out_dim,
            builders.mapped.as_deref(),
            builders.base.pp(name),
        )?;
        Proj::with_branch(linear, in_dim, out_dim, builders, name)
    }

    /// `linear` with a LoRA branch when the adapter targets `name`.
    fn with_branch(
        linear: Linear,
        in_dim: usize,
        out_dim: usize,
        builders: &Builders<'_>,
        name: &str,
    ) -> Result<Proj> {
        let lora = match &builders.lora {
            Some((vb, adapter)) if adapter.spec.targets.iter().any(|target| target == name) => {
                let vb = vb.pp(name);
                let zeros = candle_nn::Init::Const(0.0);
                let rank = adapter.spec.rank;
                Some(Branch {
                    a: vb.get_with_hints((rank, in_dim), "lora_A.weight", zeros)?,
                    b: vb.get_with_hints((out_dim, rank), "lora_B.weight", zeros)?,
                    adapter: adapter.clone(),
                    name_key: super::name_key(&vb.prefix()),
                })
            }
            _ => None,
        };
        Ok(Proj { linear, lora })
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(branch) = &self.lora else {
            return self.linear.forward(x);
        };
        let mask = match branch.adapter.dropout_key() {
            Some(key) => Some(dropout_mask(
                x,
                branch.adapter.spec.dropout,
                &branch.adapter,
                key,
                branch.name_key,
            )?),
            None => None,
        };
        if super::fused::applies(x) {
            return x.contiguous()?.apply_op3(
                &branch.a,
                &branch.b,
                LoraProduct {
                    linear: self.linear.clone(),
                    scale: branch.adapter.spec.scale(),
                    mask,
                },
            );
        }
        let y = self.linear.forward(x)?;
        let input = match &mask {
            Some(mask) => (x * mask)?,
            None => x.clone(),
        };
        let update = input
            .broadcast_matmul(&branch.a.t()?)?
            .broadcast_matmul(&branch.b.t()?)?;
        y + (update * branch.adapter.spec.scale())?
    }
}

/// A projection with its LoRA branch as one op over `(x, A, B)`:
/// `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` for the frozen `W`, `b`.
///
/// Composed from candle ops, the branch keeps three `[…, out]` tensors (the base's
/// product, the update, its scaled copy) alive for the backward pass in every adapted
/// projection: for a Qwen2.5-0.5B at batch 4 × 512 that is most of the training memory.
/// The fused op keeps only its output; the backward pass recomputes the small `x·Aᵀ`:
/// `dx = g·W + s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`.
struct LoraProduct {
    linear: Linear,
    scale: f64,
    /// The dropout mask of the branch's input (0 or 1/(1-p) per element), when training
    /// with dropout.
    mask: Option<Tensor>,
}

impl LoraProduct {
    fn tensor(storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<Tensor> {
        let values = super::fused::contiguous_f32(storage, layout, "LoRA projection")?;
        Tensor::from_slice(values, layout.shape(), &candle_core::Device::Cpu)
    }
}

impl candle_core::CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = Self::tensor(s1, l1)?;
        let (a, b) = (Self::tensor(s2, l2)?, Self::tensor(s3, l3)?);
        let input = match &self.mask {
            Some(mask) => (&x * mask)?,
            None => x.clone(),
        };
        let update = input.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        let y = (self.linear.forward(&x)? + (update * self.scale)?)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: the gradients are values, not graph nodes (see train::loss).
        let (x, a, b, grad) = (x.detach(), a.detach(), b.detach(), grad.detach());
        let (rank, in_dim) = a.dims2()?;
        let out_dim = b.dim(0)?;
        let x2 = x.reshape(((), in_dim))?;
        let g2 = grad.reshape(((), out_dim))?;
        let mask = match &self.mask {
            Some(mask) => Some(mask.reshape(((), in_dim))?),
            None => None,
        };
        let input = match &mask {
            Some(mask) => (&x2 * mask)?,
            None => x2.clone(),
        };
        let projected = input.matmul(&a.t()?)?; // [N, r]
        let back = g2.matmul(&b)?; // [N, r]
        let grad_b = (g2.t()?.matmul(&projected)? * self.scale)?;
        let grad_a = (back.t()?.matmul(&input)? * self.scale)?;
        let mut branch_grad = (back.matmul(&a)? * self.scale)?;
        if let Some(mask) = &mask {
            branch_grad = (branch_grad * mask)?;
        }
        let grad_x = (self.linear.input_grad(&g2)? + branch_grad)?.reshape(x.shape())?;
        debug_assert_eq!(grad_a.dims(), [rank, in_dim]);
        Ok((Some(grad_x), Some(grad_a), Some(grad_b)))
    }
}

/// The inverted-dropout mask for `x` with probability `p`: each element 0 with
/// probability `p`, else 1/(1-p). The mask depends on the adapter's seed, `key` and the
/// projection alone.
fn dropout_mask(x: &Tensor, p: f64, adapter: &Adapter, key: u64, name_key: u64) -> Result<Tensor> {
    let mut rng = Rng::for_item(adapter.seed ^ DROPOUT_STREAM, key, name_key);
    let (keep, scale) = (1.0 - p, (1.0 / (1.0 - p)) as f32);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < keep { scale } else { 0.0 })
        .collect();
    Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// Initialises a fresh adapter: every `lora_A` uniform in ±1/√in from a seeded stream
/// per name, every `lora_B` zero, every saved whole module a copy of the base's weight,
/// every trainable token row the mean of the base table's rows.
pub fn init_adapter(varmap: &VarMap, seed: u64, base: &VarBuilder) -> Result<()> {
    for (name, var) in super::sorted_vars(varmap) {
        let tensor = if let Some(module) = name.strip_suffix(&format!(".{TOKEN_ROWS}")) {
            let module = module
                .strip_prefix(&format!("{PEFT_PREFIX}."))
                .unwrap_or(module);
            let table = base.get_unchecked(&format!("{module}.weight"))?;
            super::vocab::mean_row(&table)?
                .broadcast_as(var.shape())?
                .to_dtype(var.dtype())?
        } else if name.ends_with("lora_B.weight") {
            var.as_tensor().zeros_like()?
        } else if name.ends_with("lora_A.weight") {
            let (_, in_dim) = var.dims2()?;
            let bound = 1.0 / (in_dim as f64).sqrt();
            let mut rng = Rng::for_item(seed, LORA_STREAM, super::name_key(&name));
            let values: Vec<f64> = (0..var.elem_count())
                .map(|_| (rng.next_f64() * 2.0 - 1.0) * bound)
                .collect();
            Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?
        } else {
            let base_name = name
                .strip_prefix(&format!("{PEFT_PREFIX}."))
                .unwrap_or(&name);
            base.get(var.shape(), base_name)?.copy()?
        };
        var.set(&tensor)?;
    }
    Ok(())
}

/// How an adapter tensor changes its base tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A LoRA pair, named by its `lora_A`: `W + (α/r)·B·A`.
    Pair,
    /// A saved whole module replaces the base's weight.
    Whole,
    /// Trainable token rows replace (or add) rows of the base's table.
    TokenRows,
}

/// The base tensor an adapter tensor changes and how, or `None` for a `lora_B` (handled
/// with its `lora_A`).
fn merge_target(name: &str) -> std::result::Result<Option<(String, Change)>, String> {
    let strip = |module: &str| {
        module
            .strip_prefix(&format!("{PEFT_PREFIX}."))
            .unwrap_or(module)
            .to_string()
    };
    if let Some(module) = name.strip_suffix(".lora_A.weight") {
        return Ok(Some((format!("{}.weight", strip(module)), Change::Pair)));
    }
    if name.ends_with(".lora_B.weight") {
        return Ok(None);
    }
    if let Some(module) = name.strip_suffix(&format!(".{TOKEN_ROWS}")) {
        return Ok(Some((
            format!("{}.weight", strip(module)),
            Change::TokenRows,
        )));
    }
    let base_name = name
        .strip_prefix(&format!("{PEFT_PREFIX}."))
        .ok_or_else(|| format!("unexpected adapter tensor `{name}`"))?;
    Ok(Some((base_name.to_string(), Change::Whole)))
}

/// The name the base's files give `base_name`: itself, or without GPT-2's
/// `transformer.` prefix (the original GPT-2 files on the Hub store `h.0.…`, while
/// PEFT names the module tree, `transformer.h.0.…`).
fn stored_name(base_name: &str, stored: impl Fn(&str) -> bool) -> Option<&str> {
    if stored(base_name) {
        return Some(base_name);
    }
    base_name
        .strip_prefix("transformer.")
        .filter(|unprefixed| stored(unprefixed))
}

/// The token ids of the trainable rows of the base tensor `base_name`
/// (`model.embed_tokens.weight`): the spec's list for its module's last name part.
fn token_ids<'s>(spec: &'s LoraSpec, base_name: &str) -> std::result::Result<&'s [u32], String> {
    let module = base_name
        .strip_suffix(".weight")
        .and_then(|module| module.rsplit('.').next())
        .unwrap_or(base_name);
    spec.trainable_tokens
        .iter()
        .find(|(name, _)| name.rsplit('.').next() == Some(module))
        .map(|(_, ids)| ids.as_slice())
        .ok_or_else(|| {
            format!("the adapter trains token rows of `{base_name}` but its config's `trainable_token_indices` has no `{module}`")
        })
}

/// The vocabulary after merging `spec`'s token rows into a table of `rows` rows.
pub fn merged_vocab(spec: &LoraSpec, rows: usize) -> usize {
    super::vocab::grown_vocab(rows, spec.trainable_tokens.values().flatten())
}

/// Checks, before anything is merged, that every tensor of `adapter` (PEFT names) has
/// its base weight among `base_names` (HF names) and a partner (`lora_A` with
/// `lora_B`), and that there is at least one LoRA pair.
pub fn check_merge<'n>(
    base_names: impl Fn(&str) -> bool + 'n,
    adapter: &HashMap<String, Tensor>,
) -> std::result::Result<(), String> {
    let mut names: Vec<&String> = adapter.keys().collect();
    names.sort();
    let mut pairs = 0;
    for name in names {
        let Some((base_name, change)) = merge_target(name)? else {
            continue;
        };
        if stored_name(&base_name, &base_names).is_none() {
            return Err(format!(
                "the base model has no `{base_name}` for adapter tensor `{name}`"
            ));
        }
        if change == Change::Pair {
            let module = name.trim_end_matches(".lora_A.weight");
            let b_name = format!("{module}.lora_B.weight");
            if !adapter.contains_key(&b_name) {
                return Err(format!("adapter has `{name}` but no `{b_name}`"));
            }
            pairs += 1;
        }
    }
    if pairs == 0 {
        return Err("the adapter holds no lora_A/lora_B pairs".to_string());
    }
    Ok(())
}

/// Merges `adapter` into the base tensors of one shard, in place: `W + (α/r)·B·A`
/// computed in f32 and stored back in `W`'s dtype, trainable token rows written over
/// (or appended to) their table, and saved whole modules
/// (`modules_to_save`) replacing the base's weight. Adapter tensors whose base weight is
/// in another shard are left for that shard. Returns how many base tensors changed.
pub fn merge_shard(
    shard: &mut HashMap<String, Tensor>,
    adapter: &HashMap<String, Tensor>,
    spec: &LoraSpec,
) -> std::result::Result<usize, String> {
    let mut names: Vec<&String> = adapter.keys().collect();
    names.sort();
    let mut changed = 0;
    for name in names {
        let Some((base_name, change)) = merge_target(name)? else {
            continue;
        };
        let Some(base_name) = stored_name(&base_name, |name| shard.contains_key(name)) else {
            continue;
        };
        let base_name = base_name.to_string();
        let weight = &shard[&base_name];
        let updated = if change == Change::TokenRows {
            let ids = token_ids(spec, &base_name)?;
            let rows = weight
                .dim(0)
                .map_err(|error| format!("`{base_name}`: {error}"))?;
            let vocab = merged_vocab(spec, rows);
            super::vocab::grown_rows(weight, vocab, &[])
                .and_then(|grown| super::vocab::replace_rows(&grown, ids, &adapter[name]))
                .map_err(|error| format!("`{name}`: {error}"))?
        } else if change == Change::Pair {
            let module = name.trim_end_matches(".lora_A.weight");
            let b_name = format!("{module}.lora_B.weight");
            let b = adapter
                .get(&b_name)
                .ok_or_else(|| format!("adapter has `{name}` but no `{b_name}`"))?;
            let a = &adapter[name];
            let f32 = candle_core::DType::F32;
            (b.to_dtype(f32)
                .and_then(|b| b.matmul(&a.to_dtype(f32)?))
                .and_then(|delta| match spec.fan_in_fan_out {
                    true => delta.t(),
                    false => Ok(delta),
                })
                .and_then(|delta| delta * spec.scale())
                .and_then(|delta| weight.to_dtype(f32)? + delta)
                .and_then(|sum| sum.to_dtype(weight.dtype())))
            .map_err(|error| format!("`{module}`: {error}"))?
        } else {
            let saved = &adapter[name];
            if saved.dims() != weight.dims() {
                return Err(format!(
                    "adapter tensor `{name}` has shape {:?}, the base's `{base_name}` {:?}",
                    saved.dims(),
                    weight.dims()
                ));
            }
            saved
                .to_dtype(weight.dtype())
                .map_err(|error| format!("`{name}`: {error}"))?
        };
        shard.insert(base_name, updated);
        changed += 1;
    }
    Ok(changed)
}

/// The merged weights `W + (α/r)·B·A` of `base` (HF names) with `adapter` (PEFT
/// names); a saved whole module (`modules_to_save`) replaces the base's weight. Every
/// adapter tensor must match a base weight. (The whole model at once; `lora-merge`
/// goes shard by shard with [`check_merge`] and [`merge_shard`].)
pub fn merge(
    base: &HashMap<String, Tensor>,
    adapter: &HashMap<String, Tensor>,
    spec: &LoraSpec,
) -> std::result::Result<Vec<(String, Tensor)>, String> {
    check_merge(|name| base.contains_key(name), adapter)?;
    let mut merged = base.clone();
    merge_shard(&mut merged, adapter, spec)?;
    let mut merged: Vec<(String, Tensor)> = merged.into_iter().collect();
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::testing::{assert_same_op, random};

    /// The fused projection gives the composed one's output and gradients (x, A, B),
    /// without and with a dropout mask on the branch's input.
    #[test]
    fn fused_projection_equals_the_composed_one() {
        let mask = random(&[4, 5], 7)
            .ge(0.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .affine(2.0, 0.0)
            .unwrap()
            .reshape((2, 2, 5))
            .unwrap();
        check_fused_projection(None);
        check_fused_projection(Some(mask));
    }

    fn check_fused_projection(mask: Option<Tensor>) {
        let w = random(&[6, 5], 1).into_inner();
        let bias = random(&[6], 2).into_inner();
        let linear = Linear::load(
            5,
            6,
            true,
            None,
            VarBuilder::from_tensors(
                HashMap::from([("weight".to_string(), w), ("bias".to_string(), bias)]),
                candle_core::DType::F32,
                &Device::Cpu,
            ),
        )
        .unwrap();
        let (x, a, b) = (
            random(&[2, 2, 5], 3),
            random(&[3, 5], 4),
            random(&[6, 3], 5),
        );
        let scale = 2.5;
        let fused = |t: &[Tensor]| {
            let op = LoraProduct {
                linear: linear.clone(),
                scale,
                mask: mask.clone(),
            };
            t[0].apply_op3(&t[1], &t[2], op).unwrap()
        };
        let composed = |t: &[Tensor]| {
            let input = match &mask {
                Some(mask) => (&t[0] * mask).unwrap(),
                None => t[0].clone(),
            };
            let update = input
                .broadcast_matmul(&t[1].t().unwrap())
                .unwrap()
                .broadcast_matmul(&t[2].t().unwrap())
                .unwrap();
            (linear.forward(&t[0]).unwrap() + (update * scale).unwrap()).unwrap()
        };
        assert_same_op(&[&x, &a, &b], 1e-6, fused, composed);
    }
}
