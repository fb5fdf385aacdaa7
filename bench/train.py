"""PyTorch side of bench/train.sh: the reference llama model trained in PyTorch eager on
CPU, timed per phase like benches/train_throughput.rs, plus the side-by-side report.

  python bench/train.py run [--attention sdpa|manual] [--steps N] ...   # JSON on stdout
  python bench/train.py report trainyard.json torch-sdpa.json ...       # the table

The model is written by hand in plain torch with HF Llama's names and maths (RMSNorm,
rotate-half RoPE, SwiGLU, untied lm_head, no biases). Its weights are trainyard's own
initialisation reproduced bit for bit (SplitMix64 stream per parameter name, Box-Muller,
std 0.02, residual projections scaled by 1/sqrt(2L)), and the batches are the same
SplitMix64 token ids, so both sides start from the same loss: the report checks it.

A step: forward + cross-entropy up to loss.item(); backward; clip_grad_norm_(1.0) +
AdamW(lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only) +
zero_grad(set_to_none=True). Peak memory is ru_maxrss of this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
INIT_STREAM = 0x6D6F_6465_6C69_6E69  # trainyard::model::INIT_STREAM
BATCH_STREAM = 0x6265_6E63_6862_6174  # benches/train_throughput.rs
INIT_STD = 0.02


# ---------------------------------------------------------------------------------------
# trainyard's SplitMix64 (src/rng.rs) and weight initialisation (src/model/mod.rs)


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def rng_state(seed: int, stream: int) -> int:
    """The state of `Rng::new(seed, stream)`."""
    return mix64((seed + stream * GOLDEN) & MASK)


def item_state(seed: int, stream: int, index: int) -> int:
    """The state of `Rng::for_item(seed, stream, index)`."""
    return mix64((rng_state(seed, stream) + index) & MASK)


def outputs(state: int, start: int, count: int):
    """Outputs start+1 .. start+count of the generator whose state is `state` (numpy u64)."""
    import numpy as np

    k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z = np.uint64(state) + k * np.uint64(GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def name_key(name: str) -> int:
    """FNV-1a of the parameter name (trainyard's `name_key`)."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x00000100000001B3) & MASK
    return h


def init_values(name: str, shape: tuple[int, ...], num_layers: int, seed: int):
    """The f32 values trainyard's `init_weights` gives parameter `name`."""
    import numpy as np

    count = math.prod(shape)
    if name.endswith(".bias"):
        return np.zeros(shape, dtype=np.float32)
    if "norm." in name or "ln_" in name:
        return np.ones(shape, dtype=np.float32)
    std = INIT_STD
    if "o_proj." in name or "down_proj." in name or "c_proj." in name:
        std = INIT_STD / math.sqrt(2.0 * max(num_layers, 1))
    pairs = (count + 1) // 2
    bits = outputs(item_state(seed, INIT_STREAM, name_key(name)), 0, 2 * pairs)
    unit = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    radius = np.sqrt(-2.0 * np.log(1.0 - unit[0::2]))
    angle = math.tau * unit[1::2]
    normals = np.empty(2 * pairs, dtype=np.float64)
    normals[0::2] = radius * np.cos(angle)
    normals[1::2] = radius * np.sin(angle)
    return (normals[:count] * std).astype(np.float32).reshape(shape)


class Batches:
    """Token windows of `context + 1` ids, `Rng::below(vocab)` in trainyard's order."""

    def __init__(self, seed: int, vocab: int):
        self.state = rng_state(seed, BATCH_STREAM)
        self.drawn = 0
        self.vocab = vocab

    def next(self, rows: int, context: int):
        import torch

        count = rows * (context + 1)
        bits = outputs(self.state, self.drawn, count).tolist()
        self.drawn += count
        ids = [(int(x) * self.vocab) >> 64 for x in bits]
        windows = torch.tensor(ids, dtype=torch.long).view(rows, context + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------
# The model


def build_model(args):
    import torch
    import torch.nn.functional as F
    from torch import nn

    head_dim = args.hidden // args.heads

    class RMSNorm(nn.Module):
        def __init__(self, size: int, eps: float = 1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(args.hidden, args.hidden, bias=False)
            self.k_proj = nn.Linear(args.hidden, args.hidden, bias=False)
            self.v_proj = nn.Linear(args.hidden, args.hidden, bias=False)
            self.o_proj = nn.Linear(args.hidden, args.hidden, bias=False)

        def forward(self, x, cos, sin, mask):
            b, t, _ = x.shape
            q, k, v = (
                proj(x).view(b, t, args.heads, head_dim).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if args.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim) + mask
                y = torch.softmax(scores, dim=-1) @ v
            return self.o_proj(y.transpose(1, 2).reshape(b, t, args.hidden))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(args.hidden, args.intermediate, bias=False)
            self.up_proj = nn.Linear(args.hidden, args.intermediate, bias=False)
            self.down_proj = nn.Linear(args.intermediate, args.hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(args.hidden)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(args.hidden)
            self.mlp = Mlp()

        def forward(self, x, cos, sin, mask):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(args.vocab, args.hidden)
            self.layers = nn.ModuleList(Block() for _ in range(args.layers))
            self.norm = RMSNorm(args.hidden)

    class LlamaForCausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(args.hidden, args.vocab, bias=False)
            inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            angles = torch.outer(torch.arange(args.context, dtype=torch.float64), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self.register_buffer("cos", angles.cos().float(), persistent=False)
            self.register_buffer("sin", angles.sin().float(), persistent=False)
            mask = torch.full((args.context, args.context), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, ids):
            t = ids.shape[1]
            cos, sin, mask = self.cos[:t], self.sin[:t], self.mask[:t, :t]
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x, cos, sin, mask)
            return self.lm_head(self.model.norm(x))

    model = LlamaForCausalLM()
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = init_values(name, tuple(param.shape), args.layers, args.seed)
            param.copy_(torch.from_numpy(values))
    return model


# ---------------------------------------------------------------------------------------
# Run


def vm_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rss_baseline = vm_rss_mib()
    model = build_model(args)
    if args.compile:
        # torch.compile's default (inductor) backend; the warm-up steps pay the compile.
        model = torch.compile(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    batches = Batches(args.seed, args.vocab)
    losses, forward, backward, optim, steps = [], [], [], [], []
    cpu_start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            cpu_start = cpu_seconds()
        inputs, targets = batches.next(args.batch, args.context)
        start = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, args.vocab), targets.view(-1))
        loss_value = loss.item()
        forward_end = time.perf_counter()
        loss.backward()
        del logits, loss
        backward_end = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if not (math.isfinite(loss_value) and math.isfinite(float(norm))):
            sys.exit(f"step {step}: loss {loss_value}, grad norm {float(norm)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        losses.append(loss_value)
        if step >= args.warmup:
            forward.append((forward_end - start) * 1e3)
            backward.append((backward_end - forward_end) * 1e3)
            optim.append((end - backward_end) * 1e3)
            steps.append((end - start) * 1e3)
    cpu_busy = (cpu_seconds() - cpu_start) / (sum(steps) / 1e3)
    tokens_per_step = args.batch * args.context
    report = {
        "impl": f"PyTorch {torch.__version__} {'torch.compile' if args.compile else 'eager'}"
        f" ({args.attention}{' compiled' if args.compile else ''} attention)",
        "threads": torch.get_num_threads(),
        "config": {
            "vocab": args.vocab, "layers": args.layers, "heads": args.heads,
            "hidden": args.hidden, "intermediate": args.intermediate,
            "batch": args.batch, "context": args.context, "dtype": "f32",
        },
        "params": sum(p.numel() for p in model.parameters()),
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / (statistics.fmean(steps) / 1e3),
        "step_ms": {"mean": statistics.fmean(steps), "median": statistics.median(steps)},
        "phase_ms": {
            "forward": statistics.fmean(forward),
            "backward": statistics.fmean(backward),
            "optimizer": statistics.fmean(optim),
        },
        "cpu_cores_busy": cpu_busy,
        "losses": losses,
        "rss_baseline_mib": rss_baseline,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------
# Report


def per_cpu_second(result: dict) -> float:
    """Tokens per second of CPU time: less sensitive than tokens/s to other work on the
    machine, but it also hides how well a side keeps its threads busy."""
    return result["tokens_per_s"] / max(result["cpu_cores_busy"], 1e-9)


def report(args) -> None:
    results = []
    for path in args.results:
        with open(path) as file:
            results.append(json.load(file))
    mine = [r for r in results if r["impl"].startswith("trainyard")]
    others = [r for r in results if not r["impl"].startswith("trainyard")]
    results = mine + others
    ours = mine[0]
    our_names = [f"trainyard {r['config']['dtype'].split(' ')[0]}" for r in mine]
    names = our_names + [
        "torch " + r["impl"].split("(")[-1].rstrip(")").replace(" attention", "") for r in others
    ]
    width = max(14, *(len(name) for name in names)) + 2

    def row(label: str, values: list[str]) -> str:
        return f"{label:<26}" + "".join(f"{value:>{width}}" for value in values)

    lines = [row("", names)]
    lines.append(row("tokens/s", [f"{r['tokens_per_s']:,.0f}" for r in results]))
    lines.append(row("step ms (mean)", [f"{r['step_ms']['mean']:.1f}" for r in results]))
    for phase in ("forward", "backward", "optimizer"):
        label = f"  {phase}" + (" + loss" if phase == "forward" else "") + " ms"
        lines.append(
            row(label, [f"{r['phase_ms'][phase]:.1f} ({100 * r['phase_ms'][phase] / r['step_ms']['mean']:.0f}%)" for r in results])
        )
    if "body_forward" in ours["phase_ms"]:
        lines.append(row("    of which body forward", [
            f"{r['phase_ms']['body_forward']:.1f}" if "body_forward" in r["phase_ms"] else "" for r in results]))
        lines.append(row("    of which head + loss", [
            f"{r['phase_ms']['head_and_loss']:.1f}" if "head_and_loss" in r["phase_ms"] else "" for r in results]))
    lines.append(row("CPU cores busy", [f"{r['cpu_cores_busy']:.2f}" for r in results]))
    lines.append(row("tokens per CPU-second", [f"{per_cpu_second(r):,.0f}" for r in results]))
    lines.append(row("peak RSS MiB", [f"{r['peak_rss_mib']:.0f}" for r in results]))
    lines.append(row("  RSS before model MiB", [f"{r['rss_baseline_mib']:.0f}" for r in results]))
    lines.append(row("first loss", [f"{r['losses'][0]:.5f}" for r in results]))
    lines.append(row("last loss", [f"{r['losses'][-1]:.5f}" for r in results]))
    pairs = [(mine_r, our_name, other, name)
             for mine_r, our_name in zip(mine, our_names)
             for other, name in zip(others, names[len(mine):])]
    for pair_ours, our_name, other, name in pairs:
        lines.append("")
        lines.append(f"{our_name} / {name}:")
        lines.append(f"  throughput ratio        {pair_ours['tokens_per_s'] / other['tokens_per_s']:.2f}x")
        lines.append(f"  per CPU-second ratio    {per_cpu_second(pair_ours) / per_cpu_second(other):.2f}x")
        for phase in ("forward", "backward", "optimizer"):
            lines.append(f"  {phase + ' time ratio':<24}{pair_ours['phase_ms'][phase] / other['phase_ms'][phase]:.2f}x")
        lines.append(f"  peak RSS ratio          {pair_ours['peak_rss_mib'] / other['peak_rss_mib']:.2f}x")
        lines.append(
            f"  peak RSS above baseline {(pair_ours['peak_rss_mib'] - pair_ours['rss_baseline_mib']):.0f} vs "
            f"{(other['peak_rss_mib'] - other['rss_baseline_mib']):.0f} MiB "
            f"({(pair_ours['peak_rss_mib'] - pair_ours['rss_baseline_mib']) / (other['peak_rss_mib'] - other['rss_baseline_mib']):.2f}x)"
        )
        gap = abs(pair_ours["losses"][0] - other["losses"][0])
        verdict = "same model" if gap < 1e-3 else "MODELS DIFFER"
        lines.append(f"  first-step loss gap     {gap:.2e} ({verdict})")
    cfg = ours["config"]
    print(
        f"model: llama vocab {cfg['vocab']}, {cfg['layers']} layers, {cfg['heads']} heads, d_model {cfg['hidden']}, "
        f"intermediate {cfg['intermediate']}, {ours['params']:,} params; batch {cfg['batch']} x context {cfg['context']} "
        f"= {ours['tokens_per_step']} tokens/step; master weights f32, products "
        + ", ".join(f"{name}: {r['config']['dtype']}" for name, r in zip(our_names, mine))
        + f"; loss: {ours.get('loss', 'composed')}"
    )
    print(f"steps: {ours['warmup']} warm-up + {ours['steps']} timed; threads: trainyard {ours['threads']}, "
          + ", ".join(f"torch {r['threads']}" for r in others))
    print()
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="train the PyTorch model, JSON on stdout")
    runner.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa",
                        help="F.scaled_dot_product_attention, or matmul + mask + softmax as trainyard")
    runner.add_argument("--threads", type=int, default=2)
    runner.add_argument("--compile", action="store_true",
                        help="wrap the model in torch.compile (inductor)")
    for flag, default in [("warmup", 3), ("steps", 10), ("batch", 8), ("context", 256), ("vocab", 4096),
                          ("layers", 4), ("heads", 4), ("hidden", 256), ("intermediate", 688), ("seed", 0)]:
        runner.add_argument(f"--{flag}", type=int, default=default)
    runner.add_argument("--lr", type=float, default=3e-4)
    runner.add_argument("--clip", type=float, default=1.0)
    reporter = commands.add_parser("report", help="print the table of result files (trainyard's first)")
    reporter.add_argument("results", nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
