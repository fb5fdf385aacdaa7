#!/usr/bin/env bash
# GGUF exports checked by llama.cpp itself: exports four tiny random models (llama,
# llama with every bias, qwen2 with tied embeddings and [PAD] ids, gpt2) as f32, f16 and q8_0,
# then bench/gguf_llama_cpp.py has llama.cpp (through llama-cpp-python) run them against
# trainyard's logits, tokenizer and chat template, and gguf-py re-check the file layout
# and the f16/q8_0 bytes. Not part of `cargo test`: llama-cpp-python compiles llama.cpp
# from source when installed (about 20 minutes on 2 cores, once per venv).
#
#   bash bench/gguf_llama_cpp.sh       # everything lives in bench/.work/ (gitignored)
#
# Knobs: LLAMA_CPP_PYTHON_VERSION, GGUF_VERSION (defaults below), PYTHON.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
GGUF_VERSION="${GGUF_VERSION:-0.19.0}"
PYTHON="${PYTHON:-python3}"
bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/gguf_llama_cpp"
say() { printf '>> %s\n' "$*" >&2; }

venv="$bench_dir/.work/venv-llama-cpp"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "
import llama_cpp, importlib.metadata as m
assert llama_cpp.__version__ == '$LLAMA_CPP_PYTHON_VERSION'
assert m.version('gguf') == '$GGUF_VERSION'" 2>/dev/null; then
    say "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (builds llama.cpp) and gguf==$GGUF_VERSION into $venv"
    "$PYTHON" -m venv "$venv"
    # Only the library: no multimodal tools, tests, examples or OpenMP runtime.
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" "gguf==$GGUF_VERSION" numpy
fi

say "exporting the test models into $work"
rm -rf "$work"
mkdir -p "$work"
(cd "$repo" && TRAINYARD_GGUF_EXPORT="$work" cargo test --quiet --test model \
    gguf::exports_and_reference_logits_for_the_llama_cpp_check)
exec "$venv/bin/python" "$bench_dir/gguf_llama_cpp.py" "$work"
