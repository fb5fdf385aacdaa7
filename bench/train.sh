#!/usr/bin/env bash
# Training throughput: trainyard's llama model (candle, benches/train_throughput.rs)
# against the identical model in PyTorch eager on CPU (bench/train.py), same weights,
# same batches, same AdamW. Prints tokens/s, the trainyard/PyTorch ratio, per-phase ms
# (forward + loss / backward / optimizer), peak RSS and the CPU model. PyTorch runs twice:
# with F.scaled_dot_product_attention (what HF transformers uses) and with matmul + mask +
# softmax, the way trainyard computes attention; and once more under torch.compile (inductor,
# sdpa attention), reported beside eager.
#
#   bash bench/train.sh                # venv and results live in bench/.work/ (gitignored)
#
# Reference model (the issue's): vocab 4096, 4 layers, 4 heads, d_model 256, SwiGLU 688,
# f32. Knobs: BENCH_WARMUP (default 3), BENCH_STEPS (10), BENCH_BATCH (8), BENCH_CONTEXT
# (256), BENCH_THREADS ("1 2": a report per thread count, both sides), BENCH_REPEATS (3:
# rounds of every side, interleaved; each side's fastest round is reported), TORCH_VERSION
# (default below), PYTHON. Where the CPU has a bf16 unit, trainyard also runs with bf16
# products (`precision: bf16`).
# On a machine that other work keeps busy, both sides lose far more with 2 threads
# (OpenMP and candle's spinning pools wait on descheduled threads) than with 1:
# BENCH_THREADS=1 then gives the steadier comparison.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
PYTHON="${PYTHON:-python3}"
THREADS="${BENCH_THREADS:-1 2}"
REPEATS="${BENCH_REPEATS:-3}"
bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/train"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"
say() { printf '>> %s\n' "$*" >&2; }
shape=(--warmup "${BENCH_WARMUP:-3}" --steps "${BENCH_STEPS:-10}"
       --batch "${BENCH_BATCH:-8}" --context "${BENCH_CONTEXT:-256}")

say "building benches/train_throughput.rs (release)"
driver="$(cd "$repo" && cargo bench --bench train_throughput --no-run --quiet --message-format=json \
    | "$PYTHON" -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "train_throughput" and message.get("executable"):
        print(message["executable"])')"
[[ -x "$driver" ]] || { echo "no bench binary (got '$driver')" >&2; exit 1; }

venv="$bench_dir/.work/venv-train"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import numpy, torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION'" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION and numpy into $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check numpy
    # The CPU-only wheel when its index is reachable, else PyPI's (which pulls CUDA libraries).
    if ! "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 0 --timeout 20 \
            --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION" 2>/dev/null; then
        say "CPU wheel index unreachable: installing torch==$TORCH_VERSION from PyPI"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    fi
fi

load() { cut -d' ' -f1-3 /proc/loadavg; }
busy="$(awk -v cores="$(nproc)" '$1 > 0.25 * cores { print $1 }' /proc/loadavg)"
[[ -z "$busy" ]] || say "warning: load average $busy before the runs: other work shares the cores, figures will be noisy"
# One run of every side, each writing NAME-REPEAT.json (or nothing, with a note, when
# that side cannot run here: bf16 without a bf16 unit, torch.compile without a compiler).
run_round() { # threads repeat out
    local threads="$1" repeat="$2" out="$3"
    say "round $repeat, $threads thread(s): trainyard f32 (load $(load))"
    RAYON_NUM_THREADS="$threads" "$driver" "${shape[@]}" >"$out/trainyard-$repeat.json"
    # bf16 products where the CPU has a bf16 unit (AMX or AVX512-BF16; the driver refuses otherwise).
    if ! RAYON_NUM_THREADS="$threads" "$driver" "${shape[@]}" --bf16 >"$out/trainyard-bf16-$repeat.json" 2>"$out/trainyard-bf16.err"; then
        rm -f "$out/trainyard-bf16-$repeat.json"
        [[ "$repeat" != 1 ]] || say "no bf16 run: $(tail -1 "$out/trainyard-bf16.err")"
    fi
    for attention in sdpa manual; do
        say "round $repeat, $threads thread(s): PyTorch eager, $attention attention (load $(load))"
        OMP_NUM_THREADS="$threads" "$venv/bin/python" "$bench_dir/train.py" run \
            --attention "$attention" --threads "$threads" "${shape[@]}" >"$out/torch-$attention-$repeat.json"
    done
    say "round $repeat, $threads thread(s): PyTorch torch.compile (inductor), sdpa attention (load $(load))"
    if ! OMP_NUM_THREADS="$threads" "$venv/bin/python" "$bench_dir/train.py" run --compile \
            --attention sdpa --threads "$threads" "${shape[@]}" >"$out/torch-compiled-$repeat.json" 2>"$out/torch-compiled.err"; then
        rm -f "$out/torch-compiled-$repeat.json"
        [[ "$repeat" != 1 ]] || say "no torch.compile run: $(tail -1 "$out/torch-compiled.err")"
    fi
}

# The fastest of a side's rounds (the one least disturbed by other work on the machine).
best_of() { # files...
    "$PYTHON" -c 'import json, sys
print(max(sys.argv[1:], key=lambda path: json.load(open(path))["tokens_per_s"]))' "$@"
}

run_at() { # threads
    local threads="$1" out="$work/threads-$1"
    rm -rf "$out"
    mkdir -p "$out"
    # Rounds interleave the sides, so a burst of other work on the machine hits them alike.
    for ((repeat = 1; repeat <= REPEATS; repeat++)); do
        run_round "$threads" "$repeat" "$out"
    done
    local results=() side
    for side in trainyard trainyard-bf16 torch-sdpa torch-manual torch-compiled; do
        local files=("$out/$side"-[0-9]*.json)
        [[ -e "${files[0]}" ]] || continue
        results+=("$(best_of "${files[@]}")")
    done
    echo
    echo "=== $threads thread(s), best of $REPEATS round(s) per side"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores; load after: $(load)"
    "$venv/bin/python" "$bench_dir/train.py" report "${results[@]}"
}

for threads in $THREADS; do
    run_at "$threads"
done
