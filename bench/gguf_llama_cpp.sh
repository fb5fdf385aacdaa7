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
# Knobs: LLAMA_CPP_PYTHON_VERSION, GGUF_VERSION (defaults in bench/lib_llama_cpp.sh,
# which installs the venv that bench/generate.sh shares), PYTHON.
set -euo pipefail

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/gguf_llama_cpp"
say() { printf '>> %s\n' "$*" >&2; }

# shellcheck source=bench/lib_llama_cpp.sh
source "$bench_dir/lib_llama_cpp.sh"
ensure_llama_cpp_venv
venv="$LLAMA_CPP_VENV"

say "exporting the test models into $work"
rm -rf "$work"
mkdir -p "$work"
(cd "$repo" && TRAINYARD_GGUF_EXPORT="$work" cargo test --quiet --test model \
    gguf::exports_and_reference_logits_for_the_llama_cpp_check)
exec "$venv/bin/python" "$bench_dir/gguf_llama_cpp.py" "$work"
