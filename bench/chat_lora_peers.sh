#!/usr/bin/env bash
# pipelines/chat-lora.yaml checked against its peers. In a temporary workspace, runs
#   trainyard run pipelines/chat-lora.yaml --profile smoke                      (bf16 export, GGUF f16)
#   ... --set stages.export.with.dtype=f32 --set 'stages.export.with.gguf=[f32,f16]'
# then bench/chat_lora_peers.py checks, with Hugging Face PEFT + transformers:
#   - the chat cache's ids (and loss mask) of every training conversation = apply_chat_template;
#   - the merged weights = bf16(W + alpha/r·B·A), bit for bit;
#   - the LoRA adapter, loaded by PeftModel.from_pretrained onto data/models/tiny-qwen2, gives
#     the logits of the merged export (tests/fixtures/peft/generate.py; bf16 tolerance, argmax);
#   - trainyard's greedy text (`trainyard generate`) = transformers' on the merged export;
# and with llama.cpp (llama-cpp-python) + gguf-py, on model-f16.gguf (and model-f32.gguf):
#   - the GGUF's tokenizer.chat_template renders, through llama-cpp-python's Jinja2ChatFormatter,
#     transformers' text for conversations with and without tools (add_generation_prompt);
#   - llama.cpp's tokenizer gives transformers' ids; EOS/EOT are <|im_end|>;
#   - llama.cpp's logits = transformers' within f16 (f32) tolerance; greedy next tokens agree.
# Prints PASS/FAIL per check with the measured numbers (NOTE lines are informational) and
# exits non-zero if any check failed. Not part of `cargo test`.
#
#   bash bench/chat_lora_peers.sh
#
# Knobs:
#   TRAINYARD     the binary (default target/release/trainyard; built with cargo if missing)
#   HF_VENV       a venv with torch 2.15.0, transformers 5.23.0, peft 0.21.2 (default /tmp/hf-venv,
#                 as tests/fixtures/peft/README.md; installed there when missing)
#   LLAMA_VENV    a venv with llama-cpp-python + gguf (default bench/.work/venv-llama-cpp, shared
#                 with bench/gguf_llama_cpp.sh and bench/generate.sh through
#                 bench/lib_llama_cpp.sh; installed when missing: llama.cpp compiles from
#                 source, ~20 minutes on 2 cores, once)
#   LLAMA_CPP_PYTHON_VERSION, GGUF_VERSION (defaults in bench/lib_llama_cpp.sh), PYTHON,
#   KEEP=1 (keep the temporary workspace)
set -euo pipefail

TORCH_VERSION=2.15.0 TRANSFORMERS_VERSION=5.23.0 PEFT_VERSION=0.21.2
PYTHON="${PYTHON:-python3}"
bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
say() { printf '>> %s\n' "$*" >&2; }
# shellcheck source=bench/lib_llama_cpp.sh
source "$bench_dir/lib_llama_cpp.sh"

# --- the two reference environments (the llama.cpp one builds in the background) ---
llama_venv="${LLAMA_VENV:-$LLAMA_CPP_VENV}"
llama_log="$bench_dir/.work/venv-llama-cpp.install.log"
llama_pid=""
if ! llama_cpp_venv_ready "$llama_venv"; then
    say "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (builds llama.cpp) and gguf==$GGUF_VERSION into $llama_venv (log: $llama_log)"
    mkdir -p "$(dirname "$llama_log")"
    install_llama_cpp_venv "$llama_venv" >"$llama_log" 2>&1 &
    llama_pid=$!
fi

hf_venv="${HF_VENV:-/tmp/hf-venv}"
if [[ ! -x "$hf_venv/bin/python" ]] || ! "$hf_venv/bin/python" -c "
import torch, transformers, peft
assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__
assert transformers.__version__ == '$TRANSFORMERS_VERSION', transformers.__version__
assert peft.__version__ == '$PEFT_VERSION', peft.__version__" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION (CPU) transformers==$TRANSFORMERS_VERSION peft==$PEFT_VERSION into $hf_venv"
    [[ -x "$hf_venv/bin/python" ]] || "$PYTHON" -m venv "$hf_venv"
    "$hf_venv/bin/pip" install --quiet --disable-pip-version-check \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" "peft==$PEFT_VERSION" safetensors numpy
fi

# --- trainyard: the pipeline, twice, in a temporary workspace ---
trainyard="${TRAINYARD:-$repo/target/release/trainyard}"
if [[ ! -x "$trainyard" ]]; then
    say "building $trainyard"
    (cd "$repo" && cargo build --release --quiet)
fi
ws="$(mktemp -d "${TMPDIR:-/tmp}/chat-lora-peers.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then say "workspace kept: $ws"; else trap 'rm -rf "$ws"' EXIT; fi
say "trainyard run pipelines/chat-lora.yaml --profile smoke  (workspace $ws)"
"$trainyard" --workspace "$ws" run "$repo/pipelines/chat-lora.yaml" --profile smoke >"$ws/run-bf16.log" 2>&1 \
    || { cat "$ws/run-bf16.log"; exit 1; }
outputs="$ws/outputs-bf16"
cp -rL "$ws/runs/latest/outputs" "$outputs"  # runs/latest moves with the next run
say "trainyard run ... --set stages.export.with.dtype=f32 --set 'stages.export.with.gguf=[f32,f16]'"
"$trainyard" --workspace "$ws" run "$repo/pipelines/chat-lora.yaml" --profile smoke \
    --set stages.export.with.dtype=f32 --set 'stages.export.with.gguf=[f32,f16]' >"$ws/run-f32.log" 2>&1 \
    || { cat "$ws/run-f32.log"; exit 1; }
export_f32="$(readlink -f "$ws/runs/latest/outputs/export")"
tail -n 1 "$ws/run-bf16.log" "$ws/run-f32.log" >&2
grep -h "tokens/s\|^done" "$outputs/adapter/stage.log" | tail -n 1 | sed 's/^/>> sft: /' >&2

status=0
echo "== PEFT + transformers $TRANSFORMERS_VERSION (torch $TORCH_VERSION, peft $PEFT_VERSION)"
TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false \
    "$hf_venv/bin/python" -W ignore "$bench_dir/chat_lora_peers.py" hf --repo "$repo" --outputs "$outputs" \
    --f32-export "$export_f32" --trainyard "$trainyard" --work "$ws/peers" || status=1

if [[ -n "$llama_pid" ]]; then
    say "waiting for the llama-cpp-python build (pid $llama_pid; log $llama_log)"
    wait "$llama_pid" || { tail -n 30 "$llama_log"; echo "FAIL  llama-cpp-python did not install"; exit 1; }
fi
echo "== llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) + gguf-py $GGUF_VERSION"
if [[ -f "$ws/peers/reference.json" ]]; then
    "$llama_venv/bin/python" "$bench_dir/chat_lora_peers.py" llama --work "$ws/peers" \
        --gguf-dir "$outputs/export" --f32-gguf-dir "$export_f32" --base "$repo/data/models/tiny-qwen2" || status=1
else
    echo "FAIL  no reference from the transformers side"; status=1
fi
echo "== $( ((status == 0)) && echo "ALL PASS" || echo "SOME CHECKS FAILED" ): chat-lora (smoke) against PEFT, transformers and llama.cpp"
exit "$status"
