#!/usr/bin/env bash
# Tokenizer benchmark: byte-level BPE training time of trainyard's `tokenizer` stage
# against Python `tokenizers` on the same corpus and settings (vocab 8192, min_frequency
# 2, byte-level, the same 8 special tokens). Not a test: it prints figures and PASS/MISS
# against the target (Python time / trainyard time >= 1.0).
#
#   bash bench/tokenizer_train.sh        # everything lives in bench/.work/ (gitignored)
#
# Python is timed around `train_from_iterator` only, over texts already in memory (its
# most favourable setting; `stream` mode, which parses the JSONL inside the timed call as
# trainyard does, is shown too). trainyard's time is `training_seconds` from the stage manifest's metrics:
# reading and parsing the JSONL, counting, and training.
#
# Environment knobs: BENCH_MB (corpus size, default 80), BENCH_REPEATS (runs of each,
# best taken, default 2), TOKENIZERS_VERSION (default below), PYTHON (interpreter for
# the venv, default python3).
set -euo pipefail

TOKENIZERS_VERSION="${TOKENIZERS_VERSION:-0.22.2}"
PYTHON="${PYTHON:-python3}"
MB="${BENCH_MB:-80}"
REPEATS="${BENCH_REPEATS:-2}"
VOCAB=8192
MIN_FREQUENCY=2

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"

say() { printf '>> %s\n' "$*" >&2; }

say "building trainyard (release)"
(cd "$repo" && cargo build --release -j1 --quiet)
trainyard="$CARGO_TARGET_DIR/release/trainyard"
[[ -x "$trainyard" ]] || { echo "no binary at $trainyard" >&2; exit 1; }

venv="$work/venv-tok"
if [[ "$("$venv/bin/python" -c 'import tokenizers; print(tokenizers.__version__)' 2>/dev/null)" != "$TOKENIZERS_VERSION" ]]; then
    say "installing tokenizers==$TOKENIZERS_VERSION into $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "tokenizers==$TOKENIZERS_VERSION"
fi

corpus="$work/tok-corpus-${MB}mb"
if [[ ! -f "$corpus/done" ]]; then
    say "generating a ${MB} MB corpus in $corpus"
    rm -rf "$corpus"
    "$PYTHON" "$bench_dir/tokenizer_corpus.py" "$corpus" --megabytes "$MB" --seed 1
    touch "$corpus/done"
fi

json_field() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
json_metric() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"][sys.argv[2]])' "$@"; }
best() { printf '%s\n' "$@" | sort -g | head -1; }

python_memory=()
python_stream=()
for run in $(seq "$REPEATS"); do
    say "python tokenizers, texts in memory (run $run/$REPEATS)"
    "$venv/bin/python" "$bench_dir/tokenizer_train.py" "$corpus/train.jsonl" "$work/tok-python.json" \
        --vocab-size "$VOCAB" --min-frequency "$MIN_FREQUENCY" --mode memory >"$work/tok-python-memory.out"
    python_memory+=("$(json_field "$work/tok-python-memory.out" training_seconds)")
done
say "python tokenizers, streaming the JSONL"
"$venv/bin/python" "$bench_dir/tokenizer_train.py" "$corpus/train.jsonl" "$work/tok-python-stream.json" \
    --vocab-size "$VOCAB" --min-frequency "$MIN_FREQUENCY" --mode stream >"$work/tok-python-stream.out"
python_stream+=("$(json_field "$work/tok-python-stream.out" training_seconds)")

pipeline_dir="$work/tok-pipeline"
mkdir -p "$pipeline_dir"
cat >"$pipeline_dir/p.yaml" <<EOF
name: tokenizer-bench
stages:
  tok:
    kind: tokenizer
    inputs: { text: $corpus/train.jsonl, eval: $corpus/eval.jsonl }
    with: { algorithm: bpe, vocab_size: $VOCAB, min_frequency: $MIN_FREQUENCY }
EOF
trainyard_times=()
for run in $(seq "$REPEATS"); do
    say "trainyard tokenizer stage (run $run/$REPEATS)"
    (cd "$pipeline_dir" && "$trainyard" run p.yaml --force-all >/dev/null 2>&1)
    trainyard_times+=("$(json_metric "$pipeline_dir/runs/latest/outputs/tok/manifest.json" training_seconds)")
done

stats="$pipeline_dir/runs/latest/outputs/tok/stats.json"
same_merges="$("$PYTHON" - "$pipeline_dir/runs/latest/outputs/tok/tokenizer.json" "$work/tok-python.json" <<'EOF'
import json, sys
ours, theirs = (json.load(open(path)) for path in sys.argv[1:3])
same = ours["model"]["vocab"] == theirs["model"]["vocab"] and ours["model"]["merges"] == theirs["model"]["merges"]
print("identical" if same else "different")
EOF
)"

py_best="$(best "${python_memory[@]}")"
py_stream="$(best "${python_stream[@]}")"
ty_best="$(best "${trainyard_times[@]}")"
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
"$PYTHON" - "$py_best" "$py_stream" "$ty_best" <<EOF
import sys
python_memory, python_stream, trainyard = (float(value) for value in sys.argv[1:4])
ratio = python_memory / trainyard
print()
print("tokenizer training benchmark: byte-level BPE, vocab $VOCAB, min_frequency $MIN_FREQUENCY")
print(f"  machine        ${cpu:-unknown CPU}, $(nproc) cores")
print(f"  corpus         $corpus/train.jsonl ($(du -m "$corpus/train.jsonl" | cut -f1) MB, $(wc -l <"$corpus/train.jsonl") documents)")
print(f"  python         tokenizers $TOKENIZERS_VERSION: {python_memory:.2f}s (texts in memory), {python_stream:.2f}s (streaming the JSONL)")
print(f"  trainyard      {trainyard:.2f}s (reading the JSONL, counting, training)")
print(f"  ratio          python/trainyard = {ratio:.2f}x (streaming: {python_stream / trainyard:.2f}x); target >= 1.0: {'PASS' if ratio >= 1.0 else 'MISS'}")
print(f"  vocab, merges  $same_merges to Python's")
EOF
