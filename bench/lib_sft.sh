# Shared by bench/lora_sft.sh and bench/qlora.sh (sourced, not run): the trainyard binary
# they time and the reference's venv with pinned torch, transformers and peft.
# Expects bench_dir, repo, CARGO_TARGET_DIR, PYTHON and TORCH_VERSION /
# TRANSFORMERS_VERSION / PEFT_VERSION; honours TRAINYARD_BIN, BENCH_VENV, TORCH_INDEX_URL.

say() { printf '>> %s\n' "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

# Sets `trainyard` to a copy of the release binary in WORK (or of TRAINYARD_BIN): a shared
# target directory's binary may be rebuilt from another checkout meanwhile.
sft_trainyard_binary() {  # work
    trainyard="$1/trainyard"
    if [[ -n "${TRAINYARD_BIN:-}" ]]; then
        [[ "$(readlink -f "$TRAINYARD_BIN")" == "$(readlink -f "$trainyard")" ]] || cp "$TRAINYARD_BIN" "$trainyard"
    else
        say "building trainyard (release)"
        (cd "$repo" && cargo build --release --quiet)
        cp "$CARGO_TARGET_DIR/release/trainyard" "$trainyard"
    fi
}

# Sets `venv`, `want` (the pinned versions) and `py`: BENCH_VENV, or
# bench/.work/venv-lora-sft made or updated when its versions differ.
sft_venv() {
    venv="${BENCH_VENV:-$bench_dir/.work/venv-lora-sft}"
    want="$TORCH_VERSION $TRANSFORMERS_VERSION $PEFT_VERSION"
    local have
    have="$("$venv/bin/python" -c 'import torch, transformers, peft; print(torch.__version__.split("+")[0], transformers.__version__, peft.__version__)' 2>/dev/null || true)"
    if [[ "$have" != "$want" ]]; then
        [[ -z "${BENCH_VENV:-}" ]] || { echo "BENCH_VENV=$BENCH_VENV has '$have', not torch/transformers/peft $want" >&2; exit 2; }
        say "installing torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION peft==$PEFT_VERSION into $venv"
        [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
        local pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
        if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
            "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
        fi
        "${pip[@]}" numpy "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" "peft==$PEFT_VERSION"
    fi
    py="$venv/bin/python"
}
