#!/usr/bin/env bash
# Generation benchmark: decode tokens/s of `trainyard generate` (kv cache, batch 1,
# greedy, f32) against Hugging Face `transformers` `model.generate` on CPU for the same
# random weights (trainyard once more with `--bf16-weights`: f32 matrices kept as bf16),
# and against llama.cpp (llama-cpp-python built from source, bench/lib_llama_cpp.sh) on
# the same model's q8_0 GGUF, which trainyard's `export` kind writes (`trainyard run` of
# a one-stage pipeline in bench/.work/gguf-export):
# the design's reference model (llama, vocab 4096, 4 layers, 4 heads,
# d_model 256, context 256) and a ~58M-parameter llama (d 512, 8 layers, 8 heads, vocab
# 32000). Not a test: it prints a table with the ratios and the CPU model.
#
#   bash bench/generate.sh        # everything lives in bench/.work/ (gitignored)
#
# The models are written by transformers (bench/generate.py), so trainyard loads files
# it did not write. Environment knobs: BENCH_REPEATS (runs of each, best taken, default
# 5), BENCH_THREADS (thread counts, default 2,1), BENCH_TOKENS (max new tokens, default 128),
# TRANSFORMERS_VERSION (default below), TORCH_INDEX_URL (a pip index for torch, e.g. the
# CPU-only wheels; default: the ordinary index), PYTHON (interpreter for the venvs),
# BENCH_LLAMA_CPP (0 skips llama.cpp; default 1: the first run builds llama.cpp, about 20
# minutes on 2 cores), LLAMA_CPP_PYTHON_VERSION and GGUF_VERSION (bench/lib_llama_cpp.sh).
set -euo pipefail

TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
PYTHON="${PYTHON:-python3}"
REPEATS="${BENCH_REPEATS:-5}"
THREADS="${BENCH_THREADS:-2,1}"
TOKENS="${BENCH_TOKENS:-128}"
LLAMA_CPP="${BENCH_LLAMA_CPP:-1}"

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"

say() { printf '>> %s\n' "$*" >&2; }
# shellcheck source=bench/lib_llama_cpp.sh
source "$bench_dir/lib_llama_cpp.sh"

say "building trainyard (release)"
(cd "$repo" && cargo build --release -j1 --quiet)
built="$CARGO_TARGET_DIR/release/trainyard"
[[ -x "$built" ]] || { echo "no binary at $built" >&2; exit 1; }
# A copy: a shared target directory's binary may be rebuilt from another checkout.
trainyard="$work/trainyard"
cp "$built" "$trainyard"

venv="$work/venv-gen"
if [[ "$("$venv/bin/python" -c 'import transformers, torch; print(transformers.__version__)' 2>/dev/null)" != "$TRANSFORMERS_VERSION" ]]; then
    say "installing torch and transformers==$TRANSFORMERS_VERSION into $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        "$venv/bin/pip" install --quiet --disable-pip-version-check --index-url "$TORCH_INDEX_URL" torch
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch "transformers==$TRANSFORMERS_VERSION"
fi

llama_cpp_args=()
if [[ "$LLAMA_CPP" != 0 ]]; then
    ensure_llama_cpp_venv
    llama_cpp_args=(--llama-cpp-python "$LLAMA_CPP_VENV/bin/python")
else
    say "BENCH_LLAMA_CPP=0: llama.cpp skipped"
fi

"$venv/bin/python" "$bench_dir/generate.py" --trainyard "$trainyard" --work "$work" \
    --repeats "$REPEATS" --threads "$THREADS" --max-new-tokens "$TOKENS" \
    --json "$work/generate-results.json" ${llama_cpp_args[@]+"${llama_cpp_args[@]}"}
