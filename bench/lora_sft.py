"""Python side of bench/lora_sft.sh: makes the random Qwen2-shaped base and the chat data,
trains the PEFT + transformers reference on trainyard's own token cache, and prints the
side-by-side report.

  python bench/lora_sft.py make-base | base-stamp | make-chats | measure | trainyard-metrics
  python bench/lora_sft.py peft --base DIR --cache DIR --steps N --batch 4 --seq 512 \\
         --dtype float32|bfloat16 --threads T --order-seed SEED --json OUT
                                                   # bench/sft_common.py's commands
  python bench/lora_sft.py report RESULTS.json                          # the table

The base (random, Qwen2-shaped, bf16), the chat data, the reference and the measuring
are bench/sft_common.py's (shared with bench/qlora.py). The reference reads trainyard's
SFT cache, so both sides see the same token ids and masks, and batches them in
trainyard's order (sft_common.trainyard_order).
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
import pathlib

from sft_common import add_commands


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
    handlers = add_commands(sub)
    p = sub.add_parser("report")
    p.add_argument("results")
    args = parser.parse_args()
    {**handlers, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
