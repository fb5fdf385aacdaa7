#!/usr/bin/env bash
# LoRA SFT benchmark (issue 12): trainyard's `sft` stage with a LoRA adapter against
# PEFT + transformers on CPU, on the same random 0.5B Qwen2-shaped base (Qwen2.5-0.5B's
# config, bf16 shards written by transformers), the same token ids and masks (PEFT reads
# trainyard's own SFT cache, in trainyard's batch order) and the same settings: rank 16,
# alpha 32, dropout 0 on q/k/v/o/gate/up/down, batch 4 × 512 tokens, AdamW lr 2e-4
# (constant, weight decay 0), clip 1.0. Prints tokens/s and peak RSS with the ratios
# (targets: ≥ 1.0× the tokens/s, ≤ 0.6× the peak RSS), trainyard's peak RSS on a 1.5B
# Qwen2-shaped base, the CPU model and whether it has avx512_bf16 / amx_bf16.
#
#   bash bench/lora_sft.sh          # venv, models and results live in bench/.work/ (gitignored)
#
# Knobs: BENCH_STEPS (default 5; the first step of each side is warm-up, not timed),
# BENCH_BATCH (4), BENCH_FALLBACK_BATCH (1: when trainyard does not finish BENCH_BATCH,
# both sides run again at this batch, so that there is a ratio; 0 turns it off),
# BENCH_DTYPES (the reference's dtypes, default float32,bfloat16: float32 is what a PEFT
# user on CPU loads), BENCH_THREADS (default nproc, both sides), BENCH_BIG (1.5B steps for
# its RSS row, at the batch trainyard finished, default 2; 0 skips it), BENCH_RSS_LIMIT_MB
# (a measured process is stopped above it; default 85% of the memory), BENCH_SEED
# (pipeline seed, 7), BENCH_VENV (an existing venv with the pinned torch, transformers
# and peft, instead of installing into bench/.work/venv-lora-sft), TORCH_VERSION /
# TRANSFORMERS_VERSION / PEFT_VERSION (pins, below), TORCH_INDEX_URL (a pip index for
# torch, e.g. https://download.pytorch.org/whl/cpu), PYTHON (the interpreter for the venv),
# TRAINYARD_BIN (a built binary instead of `cargo build --release`), BENCH_SIZE /
# BENCH_BIG_SIZE (tiny: a 2-layer model with the same vocabulary, to try the script out).
#
# tokens/s counts batch × seq positions per second on both sides (trainyard's own
# metrics.jsonl logs tokens_per_s of loss targets only; per-step seconds are derived from
# it). Peak RSS is the maximum resident set of the process: the whole `trainyard run`
# (planning, hashing the inputs, loading, the steps, saving the adapter) and the whole
# Python process (imports, from_pretrained, get_peft_model, the steps). The base's
# mapped bf16 pages count in trainyard's RSS once read.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
PEFT_VERSION="${PEFT_VERSION:-0.21.2}"
PYTHON="${PYTHON:-python3}"
STEPS="${BENCH_STEPS:-5}"
DTYPES="${BENCH_DTYPES:-float32,bfloat16}"
THREADS="${BENCH_THREADS:-$(nproc)}"
BIG_STEPS="${BENCH_BIG:-2}"
SEED="${BENCH_SEED:-7}"
BATCH="${BENCH_BATCH:-4}"
FALLBACK="${BENCH_FALLBACK_BATCH:-1}"
# Each measured process is stopped above this RSS, so that an oversized run fails alone
# instead of taking a shared machine's memory (the kernel's OOM killer picks any process).
LIMIT_MB="${BENCH_RSS_LIMIT_MB:-$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.85 }' /proc/meminfo)}"
SIZE="${BENCH_SIZE:-0.5b}"        # tiny: a 2-layer model, to try the script out in seconds
BIG_SIZE="${BENCH_BIG_SIZE:-1.5b}"
SEQ=512

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/lora_sft"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"
# shellcheck source=bench/lib_sft.sh
source "$bench_dir/lib_sft.sh"
(( STEPS >= 4 )) || { echo "BENCH_STEPS must be at least 4 (the first step is warm-up)" >&2; exit 2; }

sft_trainyard_binary "$work"

# The reference's venv: pinned versions, reused when they match.
sft_venv

# The bases: made once per size (transformers' seeded random init, bf16 shards), reused
# while the generator, the tokenizer and the versions are unchanged.
# bench/qlora.sh makes and reuses the same directories.
make_base() {  # size → directory
    local dir="$work/base-$1" stamp
    stamp="$("$py" "$bench_dir/lora_sft.py" base-stamp --size "$1") $want"
    if [[ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]]; then
        say "making the random $1 Qwen2-shaped base in $dir"
        "$py" "$bench_dir/lora_sft.py" make-base --size "$1" --out "$dir" >&2
        echo "$stamp" >"$dir/.stamp"
    fi
    echo "$dir"
}
base="$(make_base "$SIZE")"
# One example per row: batch × steps conversations, one epoch, so both sides train on
# exactly these examples (a smaller fallback batch takes the first ones of the order).
chats="$work/chats-$((BATCH * STEPS)).jsonl"
"$py" "$bench_dir/lora_sft.py" make-chats --out "$chats" --count "$((BATCH * STEPS))"

pipeline() {  # base-dir steps batch → pipeline file in a fresh workspace
    local ws
    ws="$(mktemp -d "$work/ws.XXXXXX")"
    cat >"$ws/pipeline.yaml" <<YAML
name: bench-lora-sft
seed: $SEED
stages:
  chat-cache:
    kind: token-cache
    inputs: { train: $chats, tokenizer: $1 }
    with: { mode: sft, chat_template: model, max_len: $SEQ, truncation: keep_start }
  adapter:
    kind: sft
    inputs: { data: chat-cache, base: $1 }
    with:
      adapter: { kind: lora, rank: 16, alpha: 32, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
      steps: $2
      batch_size: $3
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
YAML
    echo "$ws/pipeline.yaml"
}

# One trainyard run: the token cache first (its own process), then the whole `trainyard
# run` measured. Writes OUT (JSON: the measurement and per-step figures, or the failure)
# and prints the cache directory.
run_trainyard() {  # pipeline batch out
    local file="$1" batch="$2" out="$3" ws adapter measured metrics status=""
    ws="$(dirname "$file")"
    "$trainyard" run "$file" --workspace "$ws" --until chat-cache >&2
    readlink -f "$ws/runs/latest/outputs/chat-cache"
    if measured="$(RAYON_NUM_THREADS="$THREADS" "$py" "$bench_dir/lora_sft.py" measure --limit-mb "$LIMIT_MB" \
            --timeline "$ws/rss.tsv" "$trainyard" run "$file" --workspace "$ws")"; then
        adapter="$(readlink -f "$ws/runs/latest/outputs/adapter")"
        metrics="$("$py" "$bench_dir/lora_sft.py" trainyard-metrics "$adapter/metrics.jsonl" --batch "$batch" --seq "$SEQ")"
        grep -h "step\|fine-tuning" "$adapter/stage.log" >&2 || true
    else
        metrics='{}'
        status="$(printf '%s' "$measured" | "$py" -c 'import json, sys
m = json.load(sys.stdin)
print(m["killed"] or ("killed by SIGKILL (the kernel OOM killer?) after %s s" % m["wall_s"] if m["exit"] == -9 else "exit %s" % m["exit"]))')"
        status="$status; RSS timeline $ws/rss.tsv, log in $ws/.trainyard/work"
        say "trainyard failed: $status"
        find "$ws/.trainyard/work" -name stage.log -exec tail -n 5 {} + >&2 2>/dev/null || true
    fi
    "$py" -c 'import json, sys
m, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
json.dump({**m, **t, "side": "trainyard", "status": sys.argv[3] or None}, open(sys.argv[4], "w"))' \
        "$measured" "$metrics" "$status" "$out"
}

run_peft() {  # cache batch dtype out
    local measured
    if ! measured="$(OMP_NUM_THREADS="$THREADS" "$py" "$bench_dir/lora_sft.py" measure --limit-mb "$LIMIT_MB" \
            "$py" "$bench_dir/lora_sft.py" peft --base "$base" --cache "$1" --steps "$STEPS" --batch "$2" --seq "$SEQ" \
            --dtype "$3" --threads "$THREADS" --order-seed "$SEED" --json "$4")"; then
        say "PEFT $3 failed: $measured"
        "$py" -c 'import json, sys
m = json.loads(sys.argv[1])
json.dump({"side": "PEFT " + sys.argv[2], "peak_rss_mb": m["peak_rss_mb"],
           "status": m["killed"] or "exit %s after %s s" % (m["exit"], m["wall_s"])}, open(sys.argv[3], "w"))' \
            "$measured" "$3" "$4"
    fi
}

compare() {  # batch note → prints the section's JSON file
    local batch="$1" note="$2" file ws cache dtype refs=()
    file="$(pipeline "$base" "$STEPS" "$batch")"
    ws="$(dirname "$file")"
    say "trainyard: $STEPS steps of $batch × $SEQ on $base, $THREADS threads (load $(load)); workspace $ws"
    cache="$(run_trainyard "$file" "$batch" "$ws/trainyard.json")"
    for dtype in "${dtypes[@]}"; do
        say "PEFT + transformers, $dtype, $STEPS steps of $batch × $SEQ, $THREADS threads (load $(load))"
        run_peft "$cache" "$batch" "$dtype" "$ws/peft-$dtype.json"
        refs+=("$ws/peft-$dtype.json")
    done
    "$py" -c 'import json, sys
batch, note, ty, *refs = sys.argv[1:]
print(json.dumps({"batch": int(batch), "note": note or None, "trainyard": json.load(open(ty)),
                  "peft": [json.load(open(r)) for r in refs]}))' \
        "$batch" "$note" "$ws/trainyard.json" "${refs[@]}" >"$ws/section.json"
    echo "$ws/section.json"
}

busy="$(awk -v cores="$(nproc)" '$1 > 0.25 * cores { print $1 }' /proc/loadavg)"
[[ -z "$busy" ]] || say "warning: load average $busy before the runs: other work shares the cores, figures will be noisy"
load_before="$(load)"
IFS=, read -ra dtypes <<<"$DTYPES"

sections=("$(compare "$BATCH" "")")
ok_batch="$BATCH"
if ! "$py" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["trainyard"].get("tokens_per_s") else 1)' "${sections[0]}"; then
    ok_batch=""
    if (( FALLBACK > 0 && FALLBACK < BATCH )); then
        say "trainyard did not finish batch $BATCH: both sides again at batch $FALLBACK"
        sections+=("$(compare "$FALLBACK" "fallback: trainyard did not finish batch $BATCH")")
        ok_batch="$FALLBACK"
    fi
fi

big="null"
if (( BIG_STEPS > 0 )); then
    base_big="$(make_base "$BIG_SIZE")"
    big_batch="${ok_batch:-$BATCH}"
    file_big="$(pipeline "$base_big" "$BIG_STEPS" "$big_batch")"
    say "trainyard on the $BIG_SIZE base: $BIG_STEPS steps of $big_batch × $SEQ (load $(load)); workspace $(dirname "$file_big")"
    run_trainyard "$file_big" "$big_batch" "$(dirname "$file_big")/trainyard.json" >/dev/null
    big="$("$py" -c 'import json, sys
t = json.load(open(sys.argv[1]))
print(json.dumps({"model": sys.argv[3] + "-shaped base (random, bf16 shards)", "batch": int(sys.argv[2]),
                  "peak_rss_mb": t.get("peak_rss_mb"), "wall_s": t.get("wall_s"), "step_s": t.get("step_s"),
                  "tokens_per_s": t.get("tokens_per_s"), "status": t.get("status")}))' \
        "$(dirname "$file_big")/trainyard.json" "$big_batch" "$BIG_SIZE")"
fi

results="$work/results.json"
dirty="$(git -C "$repo" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted src changes')"
"$py" - "$results" "$SIZE" "$big" "$STEPS" "$SEQ" "$THREADS" "$load_before" "$(load)" \
    "$("$trainyard" --version)" "commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$dirty" \
    "${sections[@]}" <<'PY'
import json, os, subprocess, sys
out, size, big, steps, seq, threads, before, after, version, commit, *sections = sys.argv[1:]
lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
json.dump({
    "model": {"0.5b": "Qwen2.5-0.5B-shaped base (494M parameters, random, bf16 shards)"}.get(size, size + "-shaped base"),
    "steps": int(steps), "seq": int(seq), "threads": int(threads),
    "sections": [json.load(open(s)) for s in sections],
    "big": json.loads(big),
    "trainyard_version": version, "trainyard_commit": commit,
    "cpu": {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags},
    "load_before": before, "load_after": after,
}, open(out, "w"), indent=1)
PY
echo "results: $results" >&2
"$py" "$bench_dir/lora_sft.py" report "$results"
