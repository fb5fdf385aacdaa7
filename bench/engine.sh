#!/usr/bin/env bash
# Engine benchmark: a 10-stage chain of `command` stages over 1 GB of external input,
# trainyard against DVC on the equivalent dvc.yaml. Not a test: it prints figures and
# PASS/MISS against the targets (hashing >= 1 GB/s, no-op run <= 50 ms, DVC/trainyard
# no-op ratio >= 20x).
#
#   bash bench/engine.sh            # everything lives in bench/.work/ (gitignored)
#
# Environment knobs: BENCH_NOOP_RUNS (trainyard no-op repetitions, default 20),
# BENCH_DVC_RUNS (dvc no-op repetitions, default 5), DVC_VERSION (default below),
# PYTHON (interpreter for the venv, default python3).
set -euo pipefail

DVC_VERSION="${DVC_VERSION:-3.67.1}"
PYTHON="${PYTHON:-python3}"

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

venv="$work/venv"
if [[ ! -x "$venv/bin/dvc" ]] || [[ "$("$venv/bin/dvc" --version 2>/dev/null)" != "$DVC_VERSION" ]]; then
    say "installing dvc==$DVC_VERSION into $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "dvc==$DVC_VERSION"
fi
command -v git >/dev/null || { echo "git is needed (DVC workspace)" >&2; exit 1; }

exec "$PYTHON" "$bench_dir/engine.py" \
    --trainyard "$trainyard" \
    --dvc "$venv/bin/dvc" \
    --work "$work" \
    --noop-runs "${BENCH_NOOP_RUNS:-20}" \
    --dvc-runs "${BENCH_DVC_RUNS:-5}"
