#!/usr/bin/env bash
# QLoRA SFT benchmark (issue 16): trainyard's `sft` stage with `adapter: { kind: qlora,
# quant: nf4 }` against the same stage with `kind: lora` on the same random 1.5B
# Qwen2-shaped bf16 base (Qwen2.5-1.5B's config, made by bench/sft_common.py and shared
# with bench/lora_sft.sh), batch 1 × 512, rank 16, alpha 32, dropout 0 on
# q/k/v/o/gate/up/down, AdamW lr 2e-4 (constant, weight decay 0), clip 1.0; both in f32
# (trainyard's default precision; BENCH_PRECISION=bf16 below). Then PEFT +
# bitsandbytes QLoRA (BitsAndBytesConfig load_in_4bit, nf4, compute dtype float32 and
# bfloat16) on the same weights, token ids, masks and batch order, if it runs on this CPU.
# QLoRA runs with gradient checkpointing on both sides, as QLoRA is run (PEFT's
# prepare_model_for_kbit_training turns it on); LoRA runs without it (the baseline of the
# targets) and, for the same-settings ratio, with it on every block.
# Prints tokens/s and peak RSS of every side, the ratios against the issue's targets
# (QLoRA / LoRA: peak RSS ≤ 0.4×, tokens/s ≥ 0.7×), and a memory account of the measured
# QLoRA run projected to a 7B Qwen2 shape (target ≤ 8 GB; bench/qlora.py says how).
#
#   bash bench/qlora.sh          # venv, bases and results live in bench/.work/ (gitignored)
#
# Knobs: BENCH_STEPS (default 5), BENCH_WARMUP (first steps not timed, default 2),
# BENCH_BATCH (1), BENCH_SIZE (1.5b; 0.5b, or tiny: a 2-layer model with the same
# vocabulary, to try the script out), BENCH_QUANT (nf4; q4_0, q8_0: trainyard only),
# BENCH_PRECISION (f32, the default, or bf16: every trainyard side's products on the
# CPU's bf16 unit, a QLoRA base's tiles restored as bf16), BENCH_CHECKPOINTING (N, default 22: trainyard's QLoRA side recomputes the first N
# blocks only, PEFT's all of them, and a LoRA side recomputing all is added; 22 of the
# 1.5B shape's 28 blocks is where both targets held on a 2-core Xeon; true: every block;
# false: no side recomputes), BENCH_PEFT_DTYPES (the reference's compute dtypes, default
# float32,bfloat16; "none"
# skips PEFT), BENCH_THREADS (default nproc, every side), BENCH_RSS_LIMIT_MB (a measured
# process is stopped above it; default 85% of the memory), BENCH_SEED (pipeline seed, 7),
# BENCH_VENV (an existing venv with the pinned torch, transformers and peft, instead of
# bench/.work/venv-lora-sft, which bench/lora_sft.sh makes), TORCH_VERSION /
# TRANSFORMERS_VERSION / PEFT_VERSION / BITSANDBYTES_VERSION (pins, below; bitsandbytes is
# added to the venv when missing), TORCH_INDEX_URL, PYTHON, TRAINYARD_BIN (a built binary
# instead of `cargo build --release`).
#
# tokens/s counts batch × seq positions per second (trainyard's per-step seconds are
# derived from its metrics.jsonl). Peak RSS is ru_maxrss of the whole measured process:
# `trainyard run --only <stage>` (planning, loading and quantizing the base, the steps,
# saving the adapter) or the whole Python process (imports, from_pretrained with
# quantization, get_peft_model, the steps). Mapped shard pages count once read.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
PEFT_VERSION="${PEFT_VERSION:-0.21.2}"
BITSANDBYTES_VERSION="${BITSANDBYTES_VERSION:-0.50.2}"
PYTHON="${PYTHON:-python3}"
STEPS="${BENCH_STEPS:-5}"
WARMUP="${BENCH_WARMUP:-2}"
BATCH="${BENCH_BATCH:-1}"
SIZE="${BENCH_SIZE:-1.5b}"
QUANT="${BENCH_QUANT:-nf4}"
PEFT_DTYPES="${BENCH_PEFT_DTYPES:-float32,bfloat16}"
THREADS="${BENCH_THREADS:-$(nproc)}"
SEED="${BENCH_SEED:-7}"
PRECISION="${BENCH_PRECISION:-f32}"
CHECKPOINTING="${BENCH_CHECKPOINTING:-22}"
case "$CHECKPOINTING" in
    1) CHECKPOINTING=true ;; 0) CHECKPOINTING=false ;;
    true|false|[1-9]*) ;;
    *) echo "BENCH_CHECKPOINTING must be true, false or a number of blocks" >&2; exit 2 ;;
esac
checkpointing_on() { [[ "$CHECKPOINTING" != false ]]; }
LIMIT_MB="${BENCH_RSS_LIMIT_MB:-$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.85 }' /proc/meminfo)}"
SEQ=512
RANK=16
ALPHA=32

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/qlora"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"
# shellcheck source=bench/lib_sft.sh
source "$bench_dir/lib_sft.sh"
(( STEPS > WARMUP && WARMUP >= 1 )) || { echo "BENCH_STEPS must exceed BENCH_WARMUP (at least 1)" >&2; exit 2; }

sft_trainyard_binary "$work"

# The venv: bench/lora_sft.sh's (pinned torch, transformers, peft), plus bitsandbytes.
sft_venv
peft_note=""
IFS=, read -ra peft_dtypes <<<"$PEFT_DTYPES"
if [[ "$PEFT_DTYPES" == none || -z "$PEFT_DTYPES" ]]; then
    peft_dtypes=(); peft_note="not run (BENCH_PEFT_DTYPES=none)"
elif [[ "$QUANT" != nf4 ]]; then
    peft_dtypes=(); peft_note="not run: bitsandbytes' 4-bit formats are nf4 and fp4, not $QUANT"
elif [[ "$("$py" -c 'import bitsandbytes; print(bitsandbytes.__version__)' 2>/dev/null)" != "$BITSANDBYTES_VERSION" ]]; then
    say "installing bitsandbytes==$BITSANDBYTES_VERSION into $venv"
    if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "bitsandbytes==$BITSANDBYTES_VERSION" accelerate >&2; then
        peft_dtypes=(); peft_note="not run: bitsandbytes==$BITSANDBYTES_VERSION could not be installed"
    fi
fi

# The base: made once per size, shared with bench/lora_sft.sh (same directory and stamp).
make_base() {  # size → directory
    local dir="$bench_dir/.work/lora_sft/base-$1" stamp
    stamp="$("$py" "$bench_dir/qlora.py" base-stamp --size "$1") $want"
    if [[ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]]; then
        say "making the random $1 Qwen2-shaped base in $dir"
        mkdir -p "$(dirname "$dir")"
        "$py" "$bench_dir/qlora.py" make-base --size "$1" --out "$dir" >&2
        echo "$stamp" >"$dir/.stamp"
    fi
    echo "$dir"
}
base="$(make_base "$SIZE")"
chats="$work/chats-$((BATCH * STEPS)).jsonl"
"$py" "$bench_dir/qlora.py" make-chats --out "$chats" --count "$((BATCH * STEPS))"

# One workspace, one token cache, two SFT stages that differ only in the adapter kind.
ws="$(mktemp -d "$work/ws.XXXXXX")"
adapter_stage() {  # name adapter-kind adapter-extra checkpointing
    cat <<YAML
  $1:
    kind: sft
    inputs: { data: chat-cache, base: $base }
    with:
      adapter: { kind: $2, rank: $RANK, alpha: $ALPHA, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]$3 }
      steps: $STEPS
      batch_size: $BATCH
      grad_accum: 1
      context: $SEQ
      lr: 2.0e-4
      warmup: 0
      schedule: constant
      weight_decay: 0.0
      clip: 1.0
      eval_every: 0
      eval_batches: 0
      save_every: 0
      log_every: 1
      precision: $PRECISION
      gradient_checkpointing: $4
YAML
}
{
    cat <<YAML
name: bench-qlora
seed: $SEED
stages:
  chat-cache:
    kind: token-cache
    inputs: { train: $chats, tokenizer: $base }
    with: { mode: sft, chat_template: model, max_len: $SEQ, truncation: keep_start }
YAML
    adapter_stage lora lora "" false
    adapter_stage lora-ckpt lora "" true
    adapter_stage qlora qlora ", quant: $QUANT" "$CHECKPOINTING"
} >"$ws/pipeline.yaml"
"$trainyard" run "$ws/pipeline.yaml" --workspace "$ws" --until chat-cache >&2
cache="$(readlink -f "$ws/runs/latest/outputs/chat-cache")"

# One trainyard SFT stage in its own measured process; writes OUT (JSON: the measurement
# and the per-step figures, or the failure).
run_trainyard() {  # stage out
    local stage="$1" out="$2" measured metrics adapter status=""
    say "trainyard $stage: $STEPS steps of $BATCH × $SEQ on $base, $THREADS threads (load $(load))"
    if measured="$(RAYON_NUM_THREADS="$THREADS" "$py" "$bench_dir/qlora.py" measure --limit-mb "$LIMIT_MB" \
            --timeline "$ws/rss-$stage.tsv" "$trainyard" run "$ws/pipeline.yaml" --workspace "$ws" --only "$stage")"; then
        adapter="$(readlink -f "$ws/runs/latest/outputs/$stage")"
        metrics="$("$py" "$bench_dir/qlora.py" trainyard-metrics "$adapter/metrics.jsonl" --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP")"
        grep -h "step\|fine-tuning" "$adapter/stage.log" >&2 || true
    else
        metrics='{}'
        status="$(printf '%s' "$measured" | "$py" -c 'import json, sys
m = json.load(sys.stdin)
print(m["killed"] or ("killed by SIGKILL (the kernel OOM killer?) after %s s" % m["wall_s"] if m["exit"] == -9 else "exit %s" % m["exit"]))')"
        status="FAILED: $status; RSS timeline $ws/rss-$stage.tsv, log in $ws/.trainyard/work"
        say "trainyard $stage $status"
        find "$ws/.trainyard/work" -name stage.log -exec tail -n 5 {} + >&2 2>/dev/null || true
    fi
    "$py" -c 'import json, sys
m, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
json.dump({**m, **t, "status": sys.argv[3] or None}, open(sys.argv[4], "w"))' "$measured" "$metrics" "$status" "$out"
}

run_peft() {  # dtype out
    local measured last
    say "PEFT + bitsandbytes QLoRA ($QUANT, compute $1): $STEPS steps of $BATCH × $SEQ, $THREADS threads (load $(load)); log $ws/peft-$1.log"
    if ! measured="$(OMP_NUM_THREADS="$THREADS" "$py" "$bench_dir/qlora.py" measure --limit-mb "$LIMIT_MB" \
            --timeline "$ws/rss-peft-$1.tsv" \
            "$py" "$bench_dir/qlora.py" peft --quant "$QUANT" --base "$base" --cache "$cache" --steps "$STEPS" \
            --warmup "$WARMUP" --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --alpha "$ALPHA" --dtype "$1" \
            --threads "$THREADS" --order-seed "$SEED" --json "$2" "${peft_checkpointing[@]}" 2>"$ws/peft-$1.log")"; then
        last="$(grep -v '^\s*$' "$ws/peft-$1.log" | tail -n 1 | cut -c1-200)"
        say "PEFT $1 failed: $last"
        "$py" -c 'import json, sys
m = json.loads(sys.argv[1])
json.dump({"side": "PEFT+bnb %s %s" % (sys.argv[2], sys.argv[3]), "peak_rss_mb": m["peak_rss_mb"],
           "status": "did not run on this CPU: " + (m["killed"] or "exit %s after %s s: %s" % (m["exit"], m["wall_s"], sys.argv[4]))},
          open(sys.argv[5], "w"))' "$measured" "$QUANT" "$1" "$last" "$2"
    else
        grep -h "step " "$ws/peft-$1.log" >&2 || true
        "$py" -c 'import json, sys
m, r = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
json.dump({**r, "at_peak": m["at_peak"], "max_anon_mb": m["max_anon_mb"], "wall_s": m["wall_s"]}, open(sys.argv[2], "w"))' \
            "$measured" "$2"
    fi
}

busy="$(awk -v cores="$(nproc)" '$1 > 0.25 * cores { print $1 }' /proc/loadavg)"
[[ -z "$busy" ]] || say "warning: load average $busy before the runs: other work shares the cores, figures will be noisy"
load_before="$(load)"
peft_checkpointing=()
checkpointing_on && peft_checkpointing=(--gradient-checkpointing)
run_trainyard lora "$ws/lora.json"
if checkpointing_on; then
    run_trainyard lora-ckpt "$ws/lora-ckpt.json"
else
    echo '{"skipped": true}' >"$ws/lora-ckpt.json"
fi
run_trainyard qlora "$ws/qlora.json"
refs=()
for dtype in "${peft_dtypes[@]}"; do
    run_peft "$dtype" "$ws/peft-$dtype.json"
    refs+=("$ws/peft-$dtype.json")
done

results="$work/results.json"
dirty="$(git -C "$repo" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted src changes')"
"$py" - "$results" "$base" "$SIZE" "$QUANT" "$STEPS" "$WARMUP" "$BATCH" "$SEQ" "$RANK" "$ALPHA" "$THREADS" \
    "$load_before" "$(load)" "$("$trainyard" --version)" \
    "commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$dirty" "$peft_note" \
    "$ws/lora.json" "$ws/lora-ckpt.json" "$ws/qlora.json" "${refs[@]}" "$CHECKPOINTING" <<'PY'
import json, os, pathlib, sys
(out, base, size, quant, steps, warmup, batch, seq, rank, alpha, threads, before, after, version, commit, note,
 lora, lora_ckpt, qlora, *refs) = sys.argv[1:-1]
cpuinfo = open("/proc/cpuinfo").read()
model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
flags = cpuinfo.split("flags", 1)[1].split("\n", 1)[0].split()
json.dump({
    "size": size, "base": base, "config": json.loads((pathlib.Path(base) / "config.json").read_text()),
    "quant": quant, "steps": int(steps), "warmup": int(warmup), "batch": int(batch), "seq": int(seq),
    "rank": int(rank), "alpha": int(alpha), "threads": int(threads),
    "precision": os.environ.get("BENCH_PRECISION", "f32"),
    "trainyard": {"lora": json.load(open(lora)), "qlora": json.load(open(qlora)),
                  **({} if json.load(open(lora_ckpt)).get("skipped") else {"lora_ckpt": json.load(open(lora_ckpt))})},
    "qlora_checkpointing": sys.argv[-1],
    "peft": [json.load(open(r)) for r in refs], "peft_note": note or None,
    "trainyard_version": version, "trainyard_commit": commit,
    "cpu": {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags},
    "load_before": before, "load_after": after,
}, open(out, "w"), indent=1)
PY
echo "results: $results (workspace $ws)" >&2
"$py" "$bench_dir/qlora.py" report "$results"
