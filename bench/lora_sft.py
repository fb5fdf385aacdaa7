"""Python side of bench/lora_sft.sh: makes the random Qwen2-shaped base and the chat data,
trains the PEFT + transformers reference on trainyard's own token cache, and prints the
side-by-side report.

  python bench/lora_sft.py make-base --size 0.5b --out DIR [--seed S]
  python bench/lora_sft.py make-chats --out FILE --count N [--seed S]
  python bench/lora_sft.py peft --base DIR --cache DIR --steps N --batch 4 --seq 512 \\
         --dtype float32|bfloat16 --threads T --order-seed SEED --json OUT
  python bench/lora_sft.py measure [--limit-mb MB] [--timeline FILE] CMD...   # wall, peak RSS
  python bench/lora_sft.py trainyard-metrics METRICS.jsonl --batch 4 --seq 512  # JSON
  python bench/lora_sft.py report RESULTS.json                          # the table

The base is transformers' own random initialisation of Qwen2.5-0.5B's (or -1.5B's)
config, seeded, cast to bfloat16 and written by save_pretrained in shards, with the
ChatML tokenizer of data/models/tiny-qwen2 (its 805 ids use the first rows of the
151,936-row embedding).

The reference reads trainyard's SFT cache (train/tokens.bin, mask.bin, offsets.bin and
meta.json, see src/data/token_cache.rs), so both sides see the same token ids and masks,
and batches them in trainyard's order: the SftBatcher's seeded Fisher-Yates shuffle
(src/rng.rs SplitMix64, seed = pipeline seed ^ ORDER_STREAM, stream 0x5f70000 + epoch).
Every example is exactly `seq` tokens, so a trainyard row (packed or not) is one example:
inputs tokens[..seq-1] plus one pad, targets tokens[1..], weight mask[1..]. The reference
gives transformers the example's `seq` tokens with labels = ids where mask is 1, else
-100 (transformers shifts them): the same `seq` positions go through the model, the same
targets count in the loss. With LoRA's B = 0 at the start, the first step's loss is the
base model's, so the two sides' first losses must agree (f32): the report shows both.

A reference step: forward with labels (loss.item()), backward, clip_grad_norm_(1.0) over
the adapter, AdamW(lr, weight decay 0) step, zero_grad(set_to_none=True). Tokens/s is
batch × seq positions per second, over the steps after the first. Peak memory is
ru_maxrss of this process (imports, model load and training).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import resource
import shutil
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_QWEN2 = ROOT / "data/models/tiny-qwen2"

# Qwen/Qwen2.5-0.5B and -1.5B config.json, field for field where it matters.
SIZES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_window_layers=24, shard="400MB"),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_window_layers=28, shard="1GB"),
    # For trying the script out in seconds (BENCH_SIZE=tiny BENCH_BIG_SIZE=tiny).
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_window_layers=2, shard="10MB"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
ORDER_STREAM = 0x7366_745F_6F72_6465  # src/stages/sft.rs
SHUFFLE_STREAM = 0x5F7_0000  # src/data/token_cache.rs SftBatcher::shuffle


# ---------------------------------------------------------------------------------------
# inputs


def make_base(args) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    size = dict(SIZES[args.size])
    shard = size.pop("shard")
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = json.loads((TINY_QWEN2 / "tokenizer_config.json").read_text())
    gen = json.loads((TINY_QWEN2 / "generation_config.json").read_text())
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"][0],
        hidden_act="silu",
        attention_dropout=0.0,
        use_cache=True,
        **size,
    )
    started = time.time()
    # Built in bf16 directly (transformers initialises in the default dtype): the 1.5B
    # shape then needs ~3 GB, not f32's 6 GB plus the copy.
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2ForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    assert model.dtype == torch.bfloat16
    model.save_pretrained(out, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_QWEN2 / name, out / name)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2, shards
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"size": args.size, "params": params, "shards": len(shards),
                      "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                      "seconds": round(time.time() - started, 1)}))


def words() -> list[str]:
    """A vocabulary of real words from data/samples (what the tokenizer was trained on)."""
    seen: dict[str, None] = {}
    for path in sorted((ROOT / "data/samples").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for message in json.loads(line).get("messages", []):
                if isinstance(message.get("content"), str):
                    for word in message["content"].split():
                        seen.setdefault(word.strip(".,?!:;\"'()"), None)
    return [w for w in seen if w.isalpha()]


def make_chats(args) -> None:
    """`count` conversations, each well over 512 tokens (a system line, a ~60-word
    question and a ~500-word answer), so that keep_start truncation makes every example
    exactly max_len tokens, most of them assistant tokens."""
    rng = random.Random(args.seed)
    vocab = words()
    assert len(vocab) > 100, len(vocab)

    def sentences(n_words: int) -> str:
        out, sentence = [], []
        for _ in range(n_words):
            sentence.append(rng.choice(vocab))
            if len(sentence) >= rng.randint(6, 14):
                out.append(" ".join(sentence).capitalize() + ".")
                sentence = []
        if sentence:
            out.append(" ".join(sentence).capitalize() + ".")
        return " ".join(out)

    with open(args.out, "w", encoding="utf-8") as f:
        for _ in range(args.count):
            messages = [
                {"role": "system", "content": "You answer questions about the outer archipelago."},
                {"role": "user", "content": sentences(60) + " Why?"},
                {"role": "assistant", "content": sentences(500)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def read_cache(cache: pathlib.Path, split: str = "train"):
    import numpy as np

    meta = json.loads((cache / "meta.json").read_text())
    dtype = {"u16": np.uint16, "u32": np.uint32}[meta["dtype"]]
    tokens = np.fromfile(cache / split / "tokens.bin", dtype=dtype).astype(np.int64)
    mask = np.fromfile(cache / split / "mask.bin", dtype=np.uint8)
    offsets = np.fromfile(cache / split / "offsets.bin", dtype="<u8").astype(np.int64)
    assert len(tokens) == len(mask) == offsets[-1], (len(tokens), len(mask), offsets[-1])
    return meta, [(tokens[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class Rng:
    """src/rng.rs, the parts the SFT batcher uses."""

    def __init__(self, seed: int, stream: int):
        self.state = mix64((seed + stream * GOLDEN) & MASK64)

    def next_u64(self) -> int:
        self.state = (self.state + GOLDEN) & MASK64
        return mix64(self.state)

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = (self.next_u64() * (i + 1)) >> 64
            items[i], items[j] = items[j], items[i]


def trainyard_order(n: int, seed: int, count: int) -> list[int]:
    """The first `count` example indices trainyard's SftBatcher takes (one per row)."""
    order: list[int] = []
    epoch = 0
    while len(order) < count:
        this = list(range(n))
        Rng((seed ^ ORDER_STREAM) & MASK64, SHUFFLE_STREAM + epoch).shuffle(this)
        order += this
        epoch += 1
    return order[:count]


# ---------------------------------------------------------------------------------------
# the reference


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_peft(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import_rss = peak_rss_mb()
    meta, examples = read_cache(pathlib.Path(args.cache))
    assert all(len(t) == args.seq for t, _ in examples), "every cached example must be exactly --seq tokens"
    order = trainyard_order(len(examples), args.order_seed, args.steps * args.batch)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    load_s = time.time() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps = []
    for step in range(args.steps):
        rows = [examples[i] for i in order[step * args.batch:(step + 1) * args.batch]]
        ids = torch.from_numpy(np.stack([t for t, _ in rows]))
        labels = torch.where(torch.from_numpy(np.stack([m for _, m in rows])).bool(), ids, torch.full_like(ids, -100))
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        value = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        steps.append({"step": step + 1, "loss": value, "seconds": seconds})
        print(f"peft {args.dtype} step {step + 1}/{args.steps} loss {value:.4f} {seconds:.2f} s", file=sys.stderr)
    measured = [s["seconds"] for s in steps[1:]]
    tokens = args.batch * args.seq
    pathlib.Path(args.json).write_text(json.dumps({
        "side": f"PEFT {args.dtype}",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "steps": steps,
        "step_s": statistics.mean(measured),
        "tokens_per_s": tokens * len(measured) / sum(measured),
        "loss_tokens_per_step": int(sum(int(m[1:].sum()) for _, m in [examples[i] for i in order[:args.batch]])),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": import_rss,
        "trainable": sum(p.numel() for p in trainable),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
    }))


def measure(args) -> None:
    """Runs a command; prints its wall time and peak RSS as JSON on stdout. Peak RSS is
    ru_maxrss of the child (`trainyard run` does all its work in one process); VmRSS is
    also sampled every 0.2 s, so that a run above --limit-mb (MB) is stopped (SIGKILL)
    before it takes the shared machine's memory, and --timeline FILE gets the samples."""
    import signal
    import subprocess

    started = time.time()
    child = subprocess.Popen(args.cmd, stdout=sys.stderr)
    samples, killed = [], None
    status = pathlib.Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            rss = next(int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            rss = 0.0
        samples.append((round(time.time() - started, 2), round(rss)))
        if args.limit_mb and rss > args.limit_mb and killed is None:
            killed = f"stopped by the benchmark at {rss:.0f} MB RSS (limit {args.limit_mb} MB) after {time.time() - started:.1f} s"
            print(f">> {killed}", file=sys.stderr)
            child.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    code = child.wait()
    wall = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if args.timeline:
        pathlib.Path(args.timeline).write_text("".join(f"{t}\t{r}\n" for t, r in samples))
    print(json.dumps({"exit": code, "wall_s": round(wall, 2), "peak_rss_mb": peak, "killed": killed}))
    sys.exit(0 if code == 0 else 1)


def trainyard_metrics(args) -> None:
    """Per-step seconds from trainyard's metrics.jsonl: `tokens` (cumulative loss
    targets) over `tokens_per_s` for each step."""
    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    train = [r for r in rows if r.get("type") == "train"]
    steps, before = [], 0
    for r in train:
        counted = r["tokens"] - before
        before = r["tokens"]
        steps.append({"step": r["step"], "loss": r["loss"], "seconds": counted / r["tokens_per_s"],
                      "logged_tokens_per_s": r["tokens_per_s"]})
    measured = [s["seconds"] for s in steps[1:]]
    print(json.dumps({
        "steps": steps,
        "step_s": statistics.mean(measured),
        "tokens_per_s": args.batch * args.seq * len(measured) / sum(measured),
        "logged_tokens_per_s": statistics.mean(s["logged_tokens_per_s"] for s in steps[1:]),
    }))


# ---------------------------------------------------------------------------------------
# the report


def per_step(r) -> str:
    return ", ".join(f"{x['seconds']:.1f}" for x in r["steps"])


def report(args) -> None:
    results = json.loads(pathlib.Path(args.results).read_text())
    print()
    print(f"LoRA SFT, rank 16 / alpha 32 / dropout 0 on q,k,v,o,gate,up,down of a {results['model']}")
    print(f"{results['steps']} steps per side (the first not timed), rows of {results['seq']} tokens, AdamW lr 2e-4 "
          f"constant, clip 1.0; tokens/s = batch x seq positions per second")
    for section in results["sections"]:
        batch = section["batch"]
        print()
        print(f"batch {batch} x {results['seq']}" + (f"  ({section['note']})" if section.get("note") else ""))
        head = f"  {'':24} {'tokens/s':>9} {'s/step':>8} {'peak RSS':>11} {'1st loss':>9}  status"
        print(head)
        print("  " + "-" * (len(head) - 2))
        sides = [("trainyard (bf16 mmap)", section["trainyard"])] + [(r["side"], r) for r in section["peft"]]
        for name, r in sides:
            if r.get("tokens_per_s"):
                print(f"  {name:24} {r['tokens_per_s']:9.1f} {r['step_s']:8.1f} {r['peak_rss_mb']:8.0f} MB "
                      f"{r['steps'][0]['loss']:9.4f}  ok")
            else:
                print(f"  {name:24} {'-':>9} {'-':>8} {r.get('peak_rss_mb', 0):8.0f} MB {'-':>9}  FAILED: {r.get('status')}")
        ty = section["trainyard"]
        for ref in section["peft"]:
            if ty.get("tokens_per_s") and ref.get("tokens_per_s"):
                print(f"  trainyard / {ref['side']:14} tokens/s {ty['tokens_per_s'] / ref['tokens_per_s']:5.2f}x (target >= 1.0)"
                      f"   peak RSS {ty['peak_rss_mb'] / ref['peak_rss_mb']:5.2f}x (target <= 0.6)")
            elif ref.get("peak_rss_mb") and ty.get("peak_rss_mb"):
                print(f"  trainyard / {ref['side']:14} no ratio: a side did not finish "
                      f"(peak RSS {ty['peak_rss_mb']:.0f} MB vs {ref['peak_rss_mb']:.0f} MB when it ended)")
        for ref in section["peft"]:
            if ref.get("rss_after_imports_mb"):
                print(f"  {ref['side']}: {ref['rss_after_imports_mb']:.0f} MB of its RSS is the process after importing "
                      f"torch, transformers, peft; from_pretrained + get_peft_model {ref['load_s']:.1f} s")
        if ty.get("wall_s"):
            print(f"  trainyard whole `run`: {ty['wall_s']:.1f} s wall"
                  + (f"; per-step s: {per_step(ty)}" if ty.get("steps") else ""))
        for ref in section["peft"]:
            if ref.get("steps"):
                print(f"  {ref['side']} per-step s: {per_step(ref)}")
    big = results.get("big")
    if big:
        print()
        line = f"trainyard on a {big['model']}, batch {big['batch']} x {results['seq']}: peak RSS {big['peak_rss_mb']:.0f} MB"
        if big.get("step_s"):
            line += f", {big['step_s']:.1f} s/step ({big['tokens_per_s']:.1f} tokens/s)"
        if big.get("status"):
            line += f"  [{big['status']}]"
        print(line)
    cpu = results["cpu"]
    print()
    print(f"cpu: {cpu['model']}, {cpu['cores']} cores; avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}, "
          f"amx_bf16: {'yes' if cpu['amx_bf16'] else 'no'}; threads: {results['threads']} per side "
          f"(RAYON_NUM_THREADS / torch.set_num_threads); load average before / after: {results['load_before']} / {results['load_after']}")
    v = next((r["versions"] for sec in results["sections"] for r in sec["peft"] if r.get("versions")), {})
    print(f"versions: {results['trainyard_version']} ({results['trainyard_commit']}); " + ", ".join(f"{k} {x}" for k, x in v.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-base")
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1205)
    p = sub.add_parser("make-chats")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=1205)
    p = sub.add_parser("peft")
    p.add_argument("--base", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--order-seed", type=int, required=True, help="the pipeline's seed")
    p.add_argument("--json", required=True, help="where the results go")
    p = sub.add_parser("trainyard-metrics")
    p.add_argument("metrics")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p = sub.add_parser("measure")
    p.add_argument("--limit-mb", type=float, default=0)
    p.add_argument("--timeline")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("report")
    p.add_argument("results")
    args = parser.parse_args()
    {"make-base": make_base, "make-chats": make_chats, "peft": run_peft,
     "trainyard-metrics": trainyard_metrics, "measure": measure, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
