//! Training throughput of trainyard's llama model on CPU, phase by phase: the Rust side
//! of `bench/train.sh` (whose Python side, `bench/train.py`, runs the same model in
//! PyTorch eager).
//!
//! One step is what training runs (`train::loss::loss_and_grads`, as
//! `train::step::train_step` calls it): the body's forward pass (its fused attention,
//! norms, RoPE and SwiGLU included), the head and loss chunk by chunk (each chunk's
//! logits, softmax gradient and head backward), the body's backward pass, and the
//! optimizer (global grad norm, clipping factor, AdamW update, dropping the gradients).
//! The three loss phases are reported as "forward + loss" (body forward + head) and
//! "backward" (body backward) beside PyTorch's. `--composed-loss` takes the
//! whole-batch composed cross-entropy instead, whose phases split exactly as PyTorch's
//! do. Batches are
//! random token ids from SplitMix64 ([`trainyard::rng::Rng`]), the same ids `train.py`
//! draws. Prints one JSON object on stdout.
//!
//! ```text
//! cargo bench --bench train_throughput -- --warmup 1 --steps 2 --context 64
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use serde_json::json;
use trainyard::data::token_cache::Batch;
use trainyard::model::precision::{BF16Scope, Precision};
use trainyard::model::{
    Kernels, LlamaConfig, LlamaFlavor, ModelConfig, new_trainable, sorted_vars,
};
use trainyard::rng::Rng;
use trainyard::train::loss::{Phases, batch_tensors, timed_loss_and_grads, weighted_cross_entropy};
use trainyard::train::optim::{AdamW, AdamWConfig};

/// The RNG stream of the token batches (`train.py` uses the same).
const BATCH_STREAM: u64 = 0x6265_6e63_6862_6174;

/// Command-line arguments; the defaults are the issue's reference model.
#[derive(Debug, Parser)]
#[command(about = "trainyard training-step throughput (JSON on stdout)")]
struct Args {
    /// Untimed steps before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// The whole-batch composed cross-entropy instead of training's chunked loss.
    #[arg(long)]
    composed_loss: bool,
    /// Matrix products in bf16 (f32 master weights), as `precision: bf16` trains: needs
    /// a CPU with AMX-BF16 or AVX512-BF16.
    #[arg(long)]
    bf16: bool,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads (no GQA: as many kv heads).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Width of the SwiGLU hidden layer.
    #[arg(long, default_value_t = 688)]
    intermediate: usize,
    /// Seed of the weights and of the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW learning rate (constant).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), in MiB.
fn proc_status_mib(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib: f64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("bad {field} line: {line}"))?;
    Ok(kib / 1024.0)
}

/// CPU seconds (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` (in USER_HZ ticks, 100 per second on Linux).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .with_context(|| format!("bad /proc/self/stat: {stat}"))
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// One batch of `rows` windows of `context + 1` ids below `vocab`.
fn random_batch(rng: &mut Rng, rows: usize, context: usize, vocab: usize) -> Batch {
    let windows: Vec<Vec<u32>> = (0..rows)
        .map(|_| {
            (0..=context)
                .map(|_| rng.below(vocab as u64) as u32)
                .collect()
        })
        .collect();
    Batch::from_windows(&windows)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn main() -> Result<()> {
    trainyard::memory::keep_freed_memory(); // as the trainyard binary does
    let args = Args::parse();
    // On rayon's pool, as the trainer runs its steps (`trainyard::model::on_pool`).
    trainyard::model::on_pool(|| run(args))
}

fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    let rss_baseline_mib = proc_status_mib("VmRSS")?;
    let device = Device::Cpu;
    let config = ModelConfig::Llama(LlamaConfig {
        flavor: LlamaFlavor::Llama,
        vocab_size: args.vocab,
        hidden_size: args.hidden,
        intermediate_size: args.intermediate,
        num_hidden_layers: args.layers,
        num_attention_heads: args.heads,
        num_key_value_heads: args.heads,
        head_dim: args.hidden / args.heads.max(1),
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        sliding_window: None,
        max_position_embeddings: args.context,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
    });
    config.validate(std::path::Path::new("<bench>"))?;
    let (model, varmap) = new_trainable(&config, DType::F32, &device, args.seed)?;
    let params = sorted_vars(&varmap);
    let vars: Vec<_> = params.iter().map(|(_, var)| var.clone()).collect();
    let param_count: usize = params.iter().map(|(_, var)| var.elem_count()).sum();
    let mut optimizer = AdamW::new(params, AdamWConfig::default())?;

    let unit = match args.bf16 {
        true => Some(Precision::Bf16.resolve().map_err(anyhow::Error::msg)?),
        false => None,
    }
    .flatten();
    let _precision = BF16Scope::enter(unit);
    let mut rng = Rng::new(args.seed, BATCH_STREAM);
    let mut losses = Vec::new();
    let (mut forward_ms, mut backward_ms, mut optimizer_ms, mut step_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The chunked loss's own split: body forward, head + loss (with the head's backward).
    let (mut body_ms, mut head_ms) = (Vec::new(), Vec::new());
    let mut cpu_start = cpu_seconds()?;
    for step in 0..args.warmup + args.steps {
        if step == args.warmup {
            cpu_start = cpu_seconds()?;
        }
        let batch = random_batch(&mut rng, args.batch, args.context, args.vocab);
        let start = Instant::now();
        let (loss_value, grads, forward_end) = if args.composed_loss {
            let (inputs, targets, weights) = batch_tensors(&batch, &device)?;
            let loss = weighted_cross_entropy(
                &model.forward(&inputs, None, Kernels::Differentiable)?,
                &targets,
                &weights,
            )?;
            let loss_value = f64::from(loss.to_scalar::<f32>()?);
            let forward_end = Instant::now();
            let grads = loss.backward()?;
            drop(loss); // the graph: what PyTorch frees during its backward
            (loss_value, grads, forward_end)
        } else {
            let mut phases = Phases::default();
            let (loss, grads) =
                timed_loss_and_grads(&model, &batch, 1.0, &vars, &device, &mut phases)?
                    .context("no position counts")?;
            let forward_end = start + Duration::from_secs_f64(phases.forward + phases.head);
            if step >= args.warmup {
                body_ms.push(phases.forward * 1e3);
                head_ms.push(phases.head * 1e3);
            }
            (loss, grads, forward_end)
        };
        let backward_end = Instant::now();
        let norm = optimizer.grad_norm(&grads)?;
        anyhow::ensure!(
            loss_value.is_finite() && norm.is_finite(),
            "step {step}: loss {loss_value}, grad norm {norm}"
        );
        let scale = if norm > args.clip {
            args.clip / norm
        } else {
            1.0
        };
        optimizer.step(&grads, args.lr, scale)?;
        drop(grads);
        let end = Instant::now();
        losses.push(loss_value);
        if step >= args.warmup {
            let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1e3;
            forward_ms.push(ms(start, forward_end));
            backward_ms.push(ms(forward_end, backward_end));
            optimizer_ms.push(ms(backward_end, end));
            step_ms.push(ms(start, end));
        }
    }

    let cpu_busy = (cpu_seconds()? - cpu_start) / (step_ms.iter().sum::<f64>() / 1e3);
    let tokens_per_step = args.batch * args.context;
    let report = json!({
        "impl": "trainyard (candle 0.11)",
        "loss": if args.composed_loss { "composed" } else { "chunked (training's)" },
        "threads": candle_core::utils::get_num_threads(),
        "config": {
            "vocab": args.vocab, "layers": args.layers, "heads": args.heads,
            "hidden": args.hidden, "intermediate": args.intermediate,
            "batch": args.batch, "context": args.context,
            "dtype": unit.map_or("f32".to_string(), |unit| format!("bf16 ({})", unit.name())),
        },
        "params": param_count,
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step as f64 / (mean(&step_ms) / 1e3),
        "step_ms": {"mean": mean(&step_ms), "median": median(&step_ms)},
        "phase_ms": {
            "forward": mean(&forward_ms),
            "body_forward": mean(&body_ms),
            "head_and_loss": mean(&head_ms),
            "backward": mean(&backward_ms),
            "optimizer": mean(&optimizer_ms),
        },
        "cpu_cores_busy": cpu_busy,
        "losses": losses,
        "rss_baseline_mib": rss_baseline_mib,
        "peak_rss_mib": proc_status_mib("VmHWM")?,
    });
    println!("{report}");
    Ok(())
}
