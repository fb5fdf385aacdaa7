"""Driver of bench/token_cache.sh: corpus, tokenizer, Python reference, trainyard, report."""
import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|tool_call|>"]
SHARD_TOKENS = 1 << 24
BATCH = 4096


def make_corpus(path: pathlib.Path, megabytes: int) -> None:
    if path.exists() and path.stat().st_size >= megabytes * 1_000_000:
        return
    rng = random.Random(7)
    syllables = ["ta", "ro", "mi", "ven", "dul", "ka", "so", "ber", "lin", "ath", "or", "ei", "sul", "grim", "pa"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(5000)]
    words += "the a of and to in is was for on with by as at from that which".split() * 40
    with path.open("w") as out:
        written = 0
        while written < megabytes * 1_000_000:
            sentences = []
            for _ in range(rng.randint(2, 12)):
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
                sentences.append(sentence.capitalize() + rng.choice([".", ".", "?", "!"]))
            line = json.dumps({"text": " ".join(sentences), "source_url": f"bench://{written}"}) + "\n"
            out.write(line)
            written += len(line)


def make_tokenizer(corpus: pathlib.Path, path: pathlib.Path) -> None:
    if path.exists():
        return
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=2, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    sample = []
    with corpus.open() as lines:
        for index, line in enumerate(lines):
            if index >= 20000:
                break
            sample.append(json.loads(line)["text"])
    tokenizer.train_from_iterator(sample, trainer=trainer)
    tokenizer.save(str(path))


def python_reference(corpus: pathlib.Path, tokenizer_path: pathlib.Path, out: pathlib.Path) -> tuple[int, float]:
    """Read JSONL, encode_batch, append <|endoftext|>, write u16 shards: the same job."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos = tokenizer.token_to_id("<|endoftext|>")
    pending, shard_index, total = [], 0, 0
    pending_tokens = 0

    def flush(final: bool) -> None:
        nonlocal pending, pending_tokens, shard_index
        data = np.concatenate(pending) if pending else np.zeros(0, dtype=np.uint16)
        while len(data) >= SHARD_TOKENS or (final and len(data)):
            data[:SHARD_TOKENS].tofile(out / f"shard_{shard_index:05d}.bin")
            shard_index += 1
            data = data[SHARD_TOKENS:]
        pending, pending_tokens = ([data] if len(data) else []), len(data)

    with corpus.open() as lines:
        batch = []
        for line in lines:
            batch.append(json.loads(line)["text"])
            if len(batch) == BATCH:
                for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                    ids = np.array(encoding.ids + [eos], dtype=np.uint16)
                    pending.append(ids)
                    pending_tokens += len(ids)
                    total += len(ids)
                batch = []
                if pending_tokens >= SHARD_TOKENS:
                    flush(False)
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = np.array(encoding.ids + [eos], dtype=np.uint16)
            pending.append(ids)
            total += len(ids)
        flush(True)
    return total, time.perf_counter() - start


def trainyard_run(binary: str, corpus: pathlib.Path, tokenizer_path: pathlib.Path, workspace: pathlib.Path) -> tuple[int, float, pathlib.Path]:
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    (workspace / "p.yaml").write_text(
        "name: bench\nstages:\n  cache:\n    kind: token-cache\n"
        f"    inputs: {{ train: {corpus}, tokenizer: {tokenizer_path} }}\n"
        f"    with: {{ mode: pretrain, shard_tokens: {SHARD_TOKENS}, batch_records: {BATCH} }}\n"
    )
    start = time.perf_counter()
    subprocess.run([binary, "run", "p.yaml"], cwd=workspace, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    output = (workspace / "runs/latest/outputs/cache").resolve()
    meta = json.loads((output / "meta.json").read_text())
    return meta["splits"]["train"]["tokens"], elapsed, output


def concatenated(paths) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(paths))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainyard", required=True)
    parser.add_argument("--work", required=True, type=pathlib.Path)
    parser.add_argument("--corpus-mb", type=int, default=120)
    args = parser.parse_args()
    corpus = args.work / "train.jsonl"
    tokenizer_path = args.work / "tokenizer.json"
    print(">> corpus and tokenizer", flush=True)
    make_corpus(corpus, args.corpus_mb)
    make_tokenizer(corpus, tokenizer_path)
    subprocess.run(["cat", str(corpus)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

    print(">> python tokenizers encode_batch + numpy", flush=True)
    py_tokens, py_seconds = python_reference(corpus, tokenizer_path, args.work / "python_shards")
    print(">> trainyard token-cache", flush=True)
    ty_tokens, ty_seconds, output = trainyard_run(args.trainyard, corpus, tokenizer_path, args.work / "workspace")

    identical = concatenated((args.work / "python_shards").glob("shard_*.bin")) == concatenated((output / "train").glob("shard_*.bin"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown")
    print()
    print(f"cpu: {cpu}, {os.cpu_count()} cores; corpus {corpus.stat().st_size / 1e6:.0f} MB, {py_tokens:,} tokens")
    print(f"python tokenizers {__import__('tokenizers').__version__}: {py_seconds:7.2f} s  {py_tokens / py_seconds:12,.0f} tokens/s")
    print(f"trainyard token-cache:       {ty_seconds:7.2f} s  {ty_tokens / ty_seconds:12,.0f} tokens/s")
    ratio = (ty_tokens / ty_seconds) / (py_tokens / py_seconds)
    print(f"ratio trainyard/python: {ratio:.2f}x  (target >= 1.5x: {'PASS' if ratio >= 1.5 else 'MISS'})")
    print(f"identical token ids: {'yes' if identical and py_tokens == ty_tokens else 'NO'}")


if __name__ == "__main__":
    main()
