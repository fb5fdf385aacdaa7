"""What the SFT benchmarks share (bench/lora_sft.py, bench/qlora.py): the random
Qwen2-shaped base and the chat data they train on, trainyard's SFT cache and batch order
read back for a Python reference, the measuring of a whole process (wall time, peak RSS)
and trainyard's per-step figures. Each script's command line takes these as
subcommands (`add_commands`):

  make-base --size 0.5b|1.5b|tiny --out DIR [--seed S]    # the random bf16 base
  base-stamp --size SIZE                                   # what makes a base stale
  make-chats --out FILE --count N [--seed S]
  peft --base DIR --cache DIR --steps N [--warmup 1] --batch B --seq S --dtype float32|bfloat16
       [--quant none|nf4] --threads T --order-seed SEED --json OUT   # the PEFT reference
  measure [--limit-mb MB] [--timeline FILE] CMD...        # wall, peak RSS (JSON)
  trainyard-metrics METRICS.jsonl --batch B --seq S        # per-step figures (JSON)

The base is transformers' own random initialisation of Qwen2.5-0.5B's (or -1.5B's)
config, seeded, cast to bfloat16 and written by save_pretrained in shards, with the
ChatML tokenizer of data/models/tiny-qwen2 (its 805 ids use the first rows of the
151,936-row embedding).

trainyard's SFT cache (train/tokens.bin, mask.bin, offsets.bin and meta.json, see
src/data/token_cache.rs) is read back so that a reference sees the same token ids and
masks, batched in trainyard's order: the SftBatcher's seeded Fisher-Yates shuffle
(src/rng.rs SplitMix64, seed = pipeline seed ^ ORDER_STREAM, stream 0x5f70000 + epoch).
The reference is PEFT + transformers: LoRA on the base as loaded in --dtype, or with
--quant nf4 QLoRA, the base's projections loaded 4-bit by bitsandbytes (see run_peft and
bench/lora_sft.py's notes on what a step does).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
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
    # Qwen/Qwen2.5-7B: untied head, a larger vocabulary (15 GB of bf16; BENCH_SIZE=7b
    # BENCH_PEFT_DTYPES=none runs QLoRA at the size the issue projects to).
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, max_window_layers=28, shard="2GB", vocab_size=152064,
               tie_word_embeddings=False),
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
    size.setdefault("vocab_size", 151936)
    size.setdefault("tie_word_embeddings", True)
    config = Qwen2Config(
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
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


def base_stamp(args) -> None:
    """Prints what a made base depends on: make_base's code, the size's config and the
    tokenizer files it copies (the scripts add the library versions)."""
    digest = hashlib.sha256(inspect.getsource(make_base).encode())
    digest.update(repr(SIZES[args.size]).encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        digest.update((TINY_QWEN2 / name).read_bytes())
    print(digest.hexdigest()[:16])


# ---------------------------------------------------------------------------------------
# the PEFT + transformers reference


def run_peft(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if args.quant == "nf4":
        import bitsandbytes
        from transformers import BitsAndBytesConfig

    import_rss = peak_rss_mb()
    side = f"PEFT {args.dtype}" if args.quant == "none" else f"PEFT+bnb {args.quant} {args.dtype}"
    meta, examples = read_cache(pathlib.Path(args.cache))
    assert all(len(t) == args.seq for t, _ in examples), "every cached example must be exactly --seq tokens"
    order = trainyard_order(len(examples), args.order_seed, args.steps * args.batch)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    if args.quant == "nf4":
        # QLoRA as PEFT users load it: the block projections as bitsandbytes Linear4bit
        # (NF4, blocks of 64, f32 absmax, no double quantization), computing in `dtype`;
        # embeddings, norms and the head in `dtype`. No prepare_model_for_kbit_training (it
        # also upcasts the norms and embeddings to f32): gradient checkpointing is turned
        # on below, when the trainyard side has it.
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                   bnb_4bit_use_double_quant=False)
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype, quantization_config=quant,
                                                     device_map="cpu")
        footprint = model.get_memory_footprint()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
        footprint = None
    model.config.use_cache = False
    if args.gradient_checkpointing:
        # As trainyard's `gradient_checkpointing`: each decoder layer's input kept, its
        # activations recomputed in the backward pass.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        print(f"{side} step {step + 1}/{args.steps} loss {value:.4f} {seconds:.2f} s", file=sys.stderr)
    measured = [s["seconds"] for s in steps[args.warmup:]]
    tokens = args.batch * args.seq
    pathlib.Path(args.json).write_text(json.dumps({
        "side": side + (" +ckpt" if args.gradient_checkpointing else ""),
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": args.dtype,
        "quant": None if args.quant == "none" else args.quant,
        "warmup": args.warmup,
        "model_footprint_bytes": footprint,
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
                     **({"bitsandbytes": bitsandbytes.__version__} if args.quant == "nf4" else {}),
                     "python": platform.python_version()},
    }))


# ---------------------------------------------------------------------------------------
# measuring


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of a process (KiB), {} once it is gone."""
    try:
        lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    return {fields[l.split()[0]]: int(l.split()[1]) for l in lines if l.split() and l.split()[0] in fields}


def measure(args) -> None:
    """Runs a command; prints its wall time and peak RSS as JSON on stdout. Peak RSS is
    ru_maxrss of the child (`trainyard run` does all its work in one process); VmRSS is
    also sampled every 0.2 s, so that a run above --limit-mb (MB) is stopped (SIGKILL)
    before it takes the shared machine's memory, and --timeline FILE gets the samples
    (seconds, VmRSS, RssAnon, RssFile in MB). The samples also split the largest one into
    anonymous memory (the heap: what the process made) and file pages (mapped files read,
    e.g. safetensors shards): `at_peak`, the largest of each (`max_anon_mb`, `max_file_mb`)
    and the smallest file share (`min_file_mb`: the binary and libraries, before any data)."""
    import signal
    import subprocess

    started = time.time()
    child = subprocess.Popen(args.cmd, stdout=sys.stderr)
    samples, killed = [], None
    while child.poll() is None:
        kb = rss_kb(child.pid)
        rss, anon, file = (kb.get(k, 0) / 1024 for k in ("rss", "anon", "file"))
        samples.append((round(time.time() - started, 2), round(rss), round(anon), round(file)))
        if args.limit_mb and rss > args.limit_mb and killed is None:
            killed = f"stopped by the benchmark at {rss:.0f} MB RSS (limit {args.limit_mb} MB) after {time.time() - started:.1f} s"
            print(f">> {killed}", file=sys.stderr)
            child.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    code = child.wait()
    wall = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if args.timeline:
        pathlib.Path(args.timeline).write_text("".join("\t".join(map(str, s)) + "\n" for s in samples))
    top = max(samples, key=lambda s: s[1], default=(0, 0, 0, 0))
    print(json.dumps({"exit": code, "wall_s": round(wall, 2), "peak_rss_mb": peak, "killed": killed,
                      "at_peak": {"t_s": top[0], "rss_mb": top[1], "anon_mb": top[2], "file_mb": top[3]},
                      "max_anon_mb": max((s[2] for s in samples), default=0),
                      "max_file_mb": max((s[3] for s in samples), default=0),
                      "min_file_mb": min((s[3] for s in samples if s[3]), default=0)}))
    sys.exit(0 if code == 0 else 1)


def trainyard_metrics(args) -> None:
    """Per-step seconds from trainyard's metrics.jsonl: `tokens` (cumulative loss
    targets) over `tokens_per_s` for each step; the means leave out the first --warmup."""
    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    train = [r for r in rows if r.get("type") == "train"]
    steps, before = [], 0
    for r in train:
        counted = r["tokens"] - before
        before = r["tokens"]
        steps.append({"step": r["step"], "loss": r["loss"], "seconds": counted / r["tokens_per_s"],
                      "logged_tokens_per_s": r["tokens_per_s"]})
    timed = steps[args.warmup:]
    measured = [s["seconds"] for s in timed]
    print(json.dumps({
        "steps": steps,
        "warmup": args.warmup,
        "step_s": statistics.mean(measured),
        "tokens_per_s": args.batch * args.seq * len(measured) / sum(measured),
        "logged_tokens_per_s": statistics.mean(s["logged_tokens_per_s"] for s in timed),
    }))


def add_commands(sub) -> dict:
    """Adds the shared subcommands to an argparse subparsers object; returns their
    handlers by name."""
    p = sub.add_parser("make-base")
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1205)
    p = sub.add_parser("base-stamp")
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p = sub.add_parser("make-chats")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=1205)
    p = sub.add_parser("peft")
    p.add_argument("--base", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the means")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quant", choices=["none", "nf4"], default="none",
                   help="nf4: QLoRA, the base's projections loaded 4-bit by bitsandbytes")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--order-seed", type=int, required=True, help="the pipeline's seed")
    p.add_argument("--json", required=True, help="where the results go")
    p = sub.add_parser("trainyard-metrics")
    p.add_argument("metrics")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the means")
    p = sub.add_parser("measure")
    p.add_argument("--limit-mb", type=float, default=0)
    p.add_argument("--timeline")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    return {"make-base": make_base, "base-stamp": base_stamp, "make-chats": make_chats,
            "peft": run_peft, "trainyard-metrics": trainyard_metrics, "measure": measure}


