"""Python side of bench/qlora.sh: the shared commands of bench/sft_common.py (the random
Qwen2-shaped base, the chat data, the PEFT reference with --quant nf4, the measuring)
and the QLoRA report: ratios, and a memory account of the measured QLoRA run projected
to a 7B Qwen2 shape.

  python bench/qlora.py make-base | base-stamp | make-chats | peft | measure | trainyard-metrics
                                                       # bench/sft_common.py's commands
  python bench/qlora.py report RESULTS.json            # the table, the ratios, the account
  python bench/qlora.py account --config config.json [--quant nf4] [--rank 16]  # JSON

The account splits a QLoRA run's memory into what is known from the shape and what is
measured:
  quantized projections   every q/k/v/o/gate/up/down of every block, as trainyard holds
                          them (nf4: half a byte a value plus an f32 absmax per 64 values,
                          src/model/quant.rs; q4_0 18 and q8_0 34 bytes per 32 values)
  embeddings + head       as stored (bf16, read in place from the mapped shards: the head
                          is read whole every step; a tied head is the embedding)
  norms + biases          f32 (loaded, not mapped)
  adapter + optimizer     rank-r A and B of every projection: f32 weights, gradients and
                          AdamW's two moments, 16 bytes a parameter
  activations + buffers   measured: the run's largest anonymous RSS minus the three
                          anonymous terms above (the autograd graph's saved tensors, the
                          chunked loss, widened weight tiles, the runtime); projected by
                          layers × width at the same batch × seq, width scaled by the
                          larger of the hidden and intermediate ratios (conservative)
The measured run's file-backed RSS beyond the embeddings/head (pages of the bf16 shards
read to quantize the projections, which stay mapped) is shown separately.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

from sft_common import TARGETS, add_commands

GB = 1e9
MB = 1024 * 1024  # the RSS figures are MiB (ru_maxrss and /proc are KiB)

# Qwen/Qwen2.5-7B's config.json, the fields the account needs.
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def quantized_bytes(kind: str, n: int) -> int:
    """Bytes trainyard holds for an n-value matrix quantized as `kind` (Quantized::bytes)."""
    if kind == "nf4":
        return math.ceil(n / 2) + 4 * math.ceil(n / 64)
    if kind == "q4_0":
        return n // 32 * 18
    if kind == "q8_0":
        return n // 32 * 34
    raise ValueError(kind)


def account(config: dict, quant: str = "nf4", rank: int = 16, targets=tuple(TARGETS)) -> dict:
    """The shape-determined terms of a QLoRA run's memory, in bytes."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    vocab, tied = config["vocab_size"], config.get("tie_word_embeddings", False)
    # (out, in) of each projection, as nn.Linear holds them.
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    projection_values = layers * sum(o * i for o, i in shapes.values())
    quantized = layers * sum(quantized_bytes(quant, o * i) for o, i in shapes.values())
    adapter = layers * sum(rank * (o + i) for name, (o, i) in shapes.items() if name in targets)
    small = layers * (2 * h + h + 2 * kv) + h  # two norms and the q/k/v biases a block; the last norm
    embedding = vocab * h * (1 if tied else 2)
    return {
        "params": projection_values + small + embedding,
        "projection_params": projection_values,
        "adapter_params": adapter,
        "quantized_projections": quantized,
        "bf16_projections": 2 * projection_values,
        "embeddings_head": 2 * embedding,
        "norms_biases": 4 * small,
        "adapter_optimizer": 16 * adapter,
        "tied": tied,
    }


def activation_scale(measured: dict, target: dict) -> tuple[float, str]:
    """How activations grow from the measured shape to the target at the same batch × seq."""
    layers = target["num_hidden_layers"] / measured["num_hidden_layers"]
    hidden = target["hidden_size"] / measured["hidden_size"]
    inter = target["intermediate_size"] / measured["intermediate_size"]
    scale = layers * max(hidden, inter)
    return scale, (f"x{scale:.2f} = layers x{layers:.2f} times the larger of hidden x{hidden:.2f} "
                   f"and intermediate x{inter:.2f}")


def account_cmd(args) -> None:
    config = json.loads(pathlib.Path(args.config).read_text())
    print(json.dumps(account(config, args.quant, args.rank)))


# ---------------------------------------------------------------------------------------
# the report


def gb(value_bytes: float) -> str:
    return f"{value_bytes / GB:6.2f} GB"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def report(args) -> None:
    results = json.loads(pathlib.Path(args.results).read_text())
    config, quant, rank, seq, batch = (results[k] for k in ("config", "quant", "rank", "seq", "batch"))
    lora, qlora = results["trainyard"]["lora"], results["trainyard"]["qlora"]
    mine = account(config, quant, rank)
    print()
    print(f"QLoRA SFT, rank {rank} / alpha {results['alpha']} / dropout 0 on q,k,v,o,gate,up,down of a random "
          f"{results['size']} Qwen2-shaped base ({mine['params'] / 1e9:.2f}B parameters, bf16 shards), "
          f"batch {batch} x {seq}")
    print(f"{results['steps']} steps per side, the first {results['warmup']} not timed; AdamW lr 2e-4 constant, clip 1.0; "
          f"tokens/s = batch x seq positions per second; RSS in MB = MiB; GB = 10^9 bytes")
    print(f"trainyard computes in {results.get('precision', 'f32')} (`precision`)")
    print()
    head = f"  {'':26} {'tokens/s':>8} {'s/step':>7} {'peak RSS':>11} {'anon':>8} {'file':>8} {'1st loss':>9}  status"
    print(head)
    print("  " + "-" * (len(head) - 2))
    lora_ckpt = results["trainyard"].get("lora_ckpt")
    setting = str(results.get("qlora_checkpointing", "false")).lower()
    ckpt = {"false": "", "0": "", "true": " +ckpt", "1": " +ckpt"}.get(setting, f" +ckpt {setting} blocks")
    names = [("trainyard LoRA (bf16 base)", lora)]
    names += [("trainyard LoRA (bf16) +ckpt", lora_ckpt)] if lora_ckpt else []
    names += [(f"trainyard QLoRA ({quant}){ckpt}", qlora)]
    names += [(r["side"], r) for r in results["peft"]]
    for name, r in names:
        at = r.get("at_peak") or {}
        anon = f"{at['anon_mb']:6.0f}MB" if at.get("rss_mb") else f"{'-':>8}"
        file = f"{at['file_mb']:6.0f}MB" if at.get("rss_mb") else f"{'-':>8}"
        if r.get("tokens_per_s"):
            print(f"  {name:26} {r['tokens_per_s']:8.1f} {r['step_s']:7.1f} {r['peak_rss_mb']:8.0f} MB {anon} {file} "
                  f"{r['steps'][0]['loss']:9.4f}  ok")
        else:
            rss = r.get("peak_rss_mb")
            print(f"  {name:26} {'-':>8} {'-':>7} {(f'{rss:8.0f} MB' if rss else f'{chr(45):>11}')} {anon} {file} "
                  f"{'-':>9}  {r.get('status') or 'FAILED'}")
    print("  (+ckpt: gradient checkpointing, each block's activations recomputed in the backward pass; N blocks: the")
    print("  first N only)")
    print("  (anon / file: the largest VmRSS sample split into anonymous memory and mapped-file pages; 1st loss:")
    print("  the base's before any update, so the QLoRA sides agree when they hold the same NF4 codes)")
    if not results["peft"]:
        print(f"  PEFT + bitsandbytes: {results.get('peft_note') or 'not run'}")
    print()
    rss_ratio = ratio(qlora.get("peak_rss_mb"), lora.get("peak_rss_mb"))
    tps_ratio = ratio(qlora.get("tokens_per_s"), lora.get("tokens_per_s"))
    anon_ratio = ratio(qlora.get("max_anon_mb"), lora.get("max_anon_mb"))
    rows = []
    if rss_ratio:
        rows.append(("peak RSS, QLoRA / LoRA", rss_ratio, "<= 0.4", rss_ratio <= 0.4))
    if tps_ratio:
        rows.append(("tokens/s, QLoRA / LoRA", tps_ratio, ">= 0.7", tps_ratio >= 0.7))
    if lora_ckpt and lora_ckpt.get("peak_rss_mb") and qlora.get("peak_rss_mb"):
        rows.append(("peak RSS, QLoRA / LoRA, both +ckpt", qlora["peak_rss_mb"] / lora_ckpt["peak_rss_mb"], "", None))
    if lora_ckpt and lora_ckpt.get("tokens_per_s") and qlora.get("tokens_per_s"):
        rows.append(("tokens/s, QLoRA / LoRA, both +ckpt", qlora["tokens_per_s"] / lora_ckpt["tokens_per_s"], "", None))
    for ref in results["peft"]:
        if qlora.get("tokens_per_s") and ref.get("tokens_per_s"):
            rows.append((f"tokens/s, QLoRA / {ref['side']}", qlora["tokens_per_s"] / ref["tokens_per_s"], "", None))
        if qlora.get("peak_rss_mb") and ref.get("peak_rss_mb") and ref.get("tokens_per_s"):
            rows.append((f"peak RSS, QLoRA / {ref['side']}", qlora["peak_rss_mb"] / ref["peak_rss_mb"], "", None))
    print("ratios")
    for name, value, target, met in rows:
        verdict = "" if met is None else ("met" if met else "NOT met")
        print(f"  {name:42} {value:5.2f}x  {('target ' + target) if target else '':14} {verdict}")
    if rss_ratio and anon_ratio:
        print(f"  {'largest anonymous RSS, QLoRA / LoRA':42} {anon_ratio:5.2f}x  (no target: the heap alone, "
              f"without mapped-file pages)")

    # The account: the measured QLoRA run, and the 7B shape projected from it.
    print()
    if not qlora.get("max_anon_mb"):
        print("memory account: the QLoRA run did not finish, nothing to project")
    else:
        big = account(QWEN2_7B, quant, rank)
        anon = qlora["max_anon_mb"] * MB
        known_anon = mine["quantized_projections"] + mine["norms_biases"] + mine["adapter_optimizer"]
        activations = max(anon - known_anon, 0.0)
        scale, how = activation_scale(config, QWEN2_7B)
        terms = [
            (f"quantized projections ({quant})", mine["quantized_projections"], big["quantized_projections"], "from the shape"),
            ("embeddings + head as stored (bf16)", mine["embeddings_head"], big["embeddings_head"],
             "from the shape; the head is read whole each step; " + ("tied" if mine["tied"] else "untied")
             + " measured, " + ("tied" if big["tied"] else "untied") + " 7B"
             + ("" if big["tied"] else " (its embedding counted whole, though only looked-up rows are read)")),
            ("norms + biases (f32)", mine["norms_biases"], big["norms_biases"], "from the shape"),
            (f"adapter + grads + AdamW (rank {rank})", mine["adapter_optimizer"], big["adapter_optimizer"],
             f"{mine['adapter_params'] / 1e6:.1f}M / {big['adapter_params'] / 1e6:.1f}M params x 16 B"),
            ("activations + work buffers", activations, activations * scale,
             f"measured (largest anon RSS - the rows above); 7B {how}"),
        ]
        total, total_big = sum(t[1] for t in terms), sum(t[2] for t in terms)
        print(f"memory account (the measured QLoRA run; a 7B Qwen2 shape: hidden {QWEN2_7B['hidden_size']}, "
              f"intermediate {QWEN2_7B['intermediate_size']}, {QWEN2_7B['num_hidden_layers']} layers, "
              f"{QWEN2_7B['num_attention_heads']}/{QWEN2_7B['num_key_value_heads']} heads, vocab "
              f"{QWEN2_7B['vocab_size']}, {big['params'] / 1e9:.2f}B params; batch {batch} x {seq})")
        print(f"  {'':38} {'measured':>9} {'7B':>9}")
        for name, here, there, note in terms:
            print(f"  {name:38} {gb(here)} {gb(there)}  {note}")
        print(f"  {'= total':38} {gb(total)} {gb(total_big)}  7B target <= 8 GB: "
              f"{'met' if total_big <= 8 * GB else 'NOT met'}")
        peak = qlora["peak_rss_mb"] * MB
        file_at = qlora["at_peak"]["file_mb"] * MB
        runtime = qlora.get("min_file_mb", 0) * MB
        extra = max(file_at - runtime - mine["embeddings_head"], 0.0)
        print(f"  measured peak RSS {gb(peak).strip()} = anon {gb(qlora['at_peak']['anon_mb'] * MB).strip()} + "
              f"mapped-file pages {gb(file_at).strip()}, of which {gb(runtime).strip()} binary and libraries, "
              f"{gb(min(mine['embeddings_head'], file_at)).strip()} at most embeddings/head, {gb(extra).strip()} other "
              f"(the shards hold {gb(mine['bf16_projections']).strip()} of bf16 projections)")
        if extra > 0.5 * mine["bf16_projections"]:
            share = min(extra / mine["bf16_projections"], 1.0)
            print(f"  -> the shards' bf16 projection pages, read to quantize them, stay mapped and count in the run's "
                  f"RSS (clean page cache the kernel can reclaim, not counted above); held the same way, a 7B run "
                  f"would add {gb(share * big['bf16_projections']).strip()}, "
                  f"{gb(total_big + share * big['bf16_projections']).strip()} in all")
        elif extra > 0:
            print(f"  -> 'other': shard pages read while loading that stay mapped (the largest file-backed RSS, while "
                  f"quantizing, was {gb(qlora['max_file_mb'] * MB).strip()}; most of it was let go before the steps)")

    cpu = results["cpu"]
    print()
    print(f"cpu: {cpu['model']} ({cpu['cores']} cores; avx512_bf16 {'yes' if cpu['avx512_bf16'] else 'no'}, "
          f"amx_bf16 {'yes' if cpu['amx_bf16'] else 'no'}); {results['threads']} threads per side; "
          f"load average before / after: {results['load_before']} / {results['load_after']}")
    v = next((r["versions"] for r in results["peft"] if r.get("versions")), {})
    print(f"versions: {results['trainyard_version']} ({results['trainyard_commit']})"
          + ("; " + ", ".join(f"{k} {x}" for k, x in v.items()) if v else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = add_commands(sub)
    p = sub.add_parser("report")
    p.add_argument("results")
    p = sub.add_parser("account")
    p.add_argument("--config", required=True, help="a model's config.json")
    p.add_argument("--quant", choices=["nf4", "q4_0", "q8_0"], default="nf4")
    p.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    {**handlers, "report": report, "account": account_cmd}[args.command](args)


if __name__ == "__main__":
    main()
