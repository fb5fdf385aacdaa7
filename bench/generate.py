"""Generation benchmark: decode tokens/s of `trainyard generate` (kv cache, batch 1,
greedy) against Hugging Face `transformers` `model.generate` on CPU, for the same
weights.

    python bench/generate.py --trainyard target/release/trainyard --work bench/.work

For each model it writes a random-weight `LlamaForCausalLM` with transformers
(`save_pretrained`, safetensors) plus a byte-level BPE `tokenizer.json` carrying
trainyard's special tokens at ids 0-7, then times, best of `--repeats` runs taken
alternately from each side:

- trainyard: `trainyard generate DIR --raw --temperature 0 --max-new-tokens N --stats`,
  whose `decode_tokens_per_s` counts the tokens after the first one over their time
  (prefill excluded, model loading excluded);
- transformers: `model.generate(input_ids, max_new_tokens=N, do_sample=False)` under
  `torch.inference_mode()` with `torch.set_num_threads(threads)`, timed the same way
  by a streamer that stamps each token: (tokens - 1) / (last token - first token).

Each side runs with 2 threads (the task's setting) and with 1: on a 2-core machine that
anything else is using, torch's 2-thread pool can be several times slower than its
1-thread one, and the 1-thread row shows how much of a ratio that is.

Both get the same prompt ids (`<|endoftext|>` then the prompt, as `generate --raw`
builds them), both ban the special tokens other than `<|end|>`/`<|endoftext|>` and stop
at those, so greedy decoding should produce the same text; the table says whether it
did.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|end|>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|tool|>", "<|tool_call|>"]
STOP_IDS = [1, 2]
BANNED_IDS = [0, 3, 4, 5, 6, 7]

MODELS = {
    # The reference model of the design: llama, vocab 4096, 4 layers, 4 heads, d 256.
    "reference": dict(vocab=4096, layers=4, heads=4, dim=256, context=256),
    # A ~58M-parameter llama (untied head): d 512, 8 layers, 8 heads, vocab 32000.
    "llama-58m": dict(vocab=32000, layers=8, heads=8, dim=512, context=1024),
}


def intermediate_size(dim):
    """trainyard's default SwiGLU width: 8/3 dim rounded up to a multiple of 64."""
    return (8 * dim // 3 + 63) // 64 * 64


def write_tokenizer(path, vocab_size):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: the special tokens,
    the 256 byte tokens, then made-up merges of lower-case letters (`Ġa`, `ab`, `Ġab`,
    `abc`, `Ġabc`, ...), enough to fill the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = bytes_to_unicode()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[byte_chars[byte]] = len(vocab)
    space = byte_chars[ord(" ")]
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = []

    def add(left, right):
        if len(vocab) < vocab_size and left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))

    for a in letters:
        add(space, a)
    for a in letters:
        for b in letters:
            add(a, b)
    for a in letters:
        for b in letters:
            add(space + a, b)
    for a in letters:
        for b in letters:
            for c in letters:
                add(a + b, c)
    for a in letters:
        for b in letters:
            for c in letters:
                add(space + a + b, c)
    if len(vocab) != vocab_size:
        raise SystemExit(f"could only make {len(vocab)} tokens, not {vocab_size}")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in SPECIAL_TOKENS])
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, token
    tokenizer.save(str(path))


def bytes_to_unicode():
    """GPT-2's byte → printable character table (byte-level BPE's alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def make_model(directory, spec, seed):
    """Writes the random-weight model and its tokenizer into `directory` (once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    done = directory / "done"
    if done.exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["dim"],
        intermediate_size=intermediate_size(spec["dim"]),
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=spec["context"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=STOP_IDS,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    write_tokenizer(directory / "tokenizer.json", spec["vocab"])
    done.write_text("")


def parameter_count(directory):
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(directory) / "model.safetensors"), framework="pt") as tensors:
        for name in tensors.keys():
            shape = tensors.get_slice(name).get_shape()
            count = 1
            for size in shape:
                count *= size
            total += count
    return total


def prompt_ids(directory, prompt):
    """`<|endoftext|>` then the prompt's ids: what `trainyard generate --raw` feeds."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    return [1] + tokenizer.encode(prompt, add_special_tokens=False).ids


def transformers_runner(directory, prompt, max_new_tokens, threads):
    """Loads the model into transformers once; returns a function timing one generation."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    ids = torch.tensor([prompt_ids(directory, prompt)])

    class Stamps(BaseStreamer):
        """Time of each generated token (the first `put` is the prompt)."""

        def __init__(self):
            self.prompt_seen = False
            self.stamps = []

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def run_once():
        torch.set_num_threads(threads)
        stamps = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=STOP_IDS,
                pad_token_id=0,
                bad_words_ids=[[token] for token in BANNED_IDS],
                streamer=stamps,
            )
        total = time.perf_counter() - start
        new = output[0, ids.shape[1]:].tolist()
        steps = len(stamps.stamps) - 1
        rate = steps / (stamps.stamps[-1] - stamps.stamps[0]) if steps > 0 else 0.0
        text = tokenizer.decode([token for token in new if token not in STOP_IDS],
                                skip_special_tokens=False)
        return dict(decode_tokens_per_s=rate,
                    generated=len([t for t in new if t not in STOP_IDS]),
                    prefill_s=stamps.stamps[0] - start, total_s=total, text=text)

    return run_once


def trainyard_once(binary, directory, prompt, max_new_tokens, threads, extra=()):
    """One `trainyard generate` process; its own `--stats` line gives the timings."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    start = time.perf_counter()
    result = subprocess.run(
        [binary, "generate", str(directory), "--raw", "--prompt", prompt,
         "--temperature", "0", "--max-new-tokens", str(max_new_tokens), "--stats", *extra],
        capture_output=True, text=True, env=env, check=False)
    total = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"trainyard generate failed:\n{result.stderr}")
    line = next(line for line in result.stderr.splitlines() if line.startswith("stats:"))
    stats = dict(pair.split("=", 1) for pair in line.split()[1:])
    return dict(decode_tokens_per_s=float(stats["decode_tokens_per_s"]),
                generated=int(stats["generated_tokens"]),
                prefill_s=float(stats["prefill_s"]), process_s=total,
                text=result.stdout[:-1] if result.stdout.endswith("\n") else result.stdout)


def best_of(runs):
    return max(runs, key=lambda run: run["decode_tokens_per_s"])


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainyard", required=True, help="the trainyard binary")
    parser.add_argument("--work", required=True, help="where the models are written")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--prompt", default="the quick brown fox")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", default="2,1",
                        help="thread counts to run each side with, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        directory = Path(args.work) / f"gen-{name}"
        print(f">> {name}: writing the model", file=sys.stderr)
        make_model(directory, spec, args.seed)
        for threads in [int(count) for count in args.threads.split(",")]:
            print(f">> {name}, {threads} thread(s): trainyard and transformers, alternating",
                  file=sys.stderr)
            hf_once = transformers_runner(directory, args.prompt, args.max_new_tokens, threads)
            ours_runs, theirs_runs, light_runs = [], [], []
            # Alternating, so that a burst of other work on the machine hits both sides.
            for _ in range(args.repeats):
                ours_runs.append(trainyard_once(args.trainyard, directory, args.prompt,
                                                args.max_new_tokens, threads))
                theirs_runs.append(hf_once())
                # f32 matrices kept as bf16 (`--bf16-weights`): half the bytes a token reads.
                light_runs.append(trainyard_once(args.trainyard, directory, args.prompt,
                                                 args.max_new_tokens, threads,
                                                 extra=["--bf16-weights"]))
            ours, theirs = best_of(ours_runs), best_of(theirs_runs)
            del hf_once
            rows.append(dict(model=name, threads=threads, parameters=parameter_count(directory),
                             spec=spec, trainyard=ours, transformers=theirs,
                             trainyard_bf16_weights=best_of(light_runs),
                             same_text=ours["text"] == theirs["text"]))

    print()
    print(f"generation benchmark: greedy, batch 1, kv cache, prompt {args.prompt!r}, "
          f"max_new_tokens {args.max_new_tokens}, f32, best of {args.repeats}")
    print(f"  machine       {cpu_model()}, {os.cpu_count()} cores; threads set by "
          f"torch.set_num_threads and RAYON_NUM_THREADS")
    print(f"  reference     transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"  load average  {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"(other work on the machine slows both sides, torch's thread pool most)")
    print()
    header = (f"  {'model':<11} {'params':>7} {'threads':>7} {'tokens':>9} {'trainyard tok/s':>16} "
              f"{'transformers tok/s':>19} {'ratio':>6}  {'prefill ms (ty/hf)':>18}  same text"
              f"  {'bf16-weights tok/s':>18} {'ratio':>6}")
    print(header)
    for row in rows:
        ours, theirs = row["trainyard"], row["transformers"]
        ratio = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        light = row["trainyard_bf16_weights"]
        light_ratio = light["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        tokens = f"{ours['generated']}/{theirs['generated']}"
        prefill = f"{ours['prefill_s'] * 1e3:.1f}/{theirs['prefill_s'] * 1e3:.1f}"
        print(f"  {row['model']:<11} {row['parameters'] / 1e6:>6.1f}M {row['threads']:>7} {tokens:>9} "
              f"{ours['decode_tokens_per_s']:>16.1f} {theirs['decode_tokens_per_s']:>19.1f} "
              f"{ratio:>5.2f}x  {prefill:>18}  {'yes' if row['same_text'] else 'no':>9}"
              f"  {light['decode_tokens_per_s']:>18.1f} {light_ratio:>5.2f}x")
    print()
    print("  tokens: generated by trainyard/transformers; tok/s: decode only (after the first "
          "token); ratio: trainyard/transformers; bf16-weights: trainyard generate "
          "--bf16-weights (f32 matrices kept as bf16, sums in f32) against the same f32 "
          "transformers run")
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(cpu=cpu_model(), load_average=[load_before, os.getloadavg()[0]], rows=rows),
            indent=2) + "\n")


if __name__ == "__main__":
    main()
