#!/usr/bin/env bash
# Token-cache build throughput: trainyard's `token-cache` stage against a Python script
# doing the same job with the Python `tokenizers` package (encode_batch) and numpy u16
# shards, same tokenizer, same ≥100 MB corpus. Prints tokens/s for both and the ratio
# (target: trainyard ≥ 1.5× Python), and checks both wrote identical token ids.
#
#   bash bench/token_cache.sh          # everything lives in bench/.work/ (gitignored)
#
# Knobs: BENCH_CORPUS_MB (default 120), TOKENIZERS_VERSION (default below), PYTHON.
set -euo pipefail

TOKENIZERS_VERSION="${TOKENIZERS_VERSION:-0.22.2}"
PYTHON="${PYTHON:-python3}"
bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$bench_dir/.." && pwd)"
work="$bench_dir/.work/token_cache"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$work"
say() { printf '>> %s\n' "$*" >&2; }

say "building trainyard (release)"
(cd "$repo" && cargo build --release --quiet)
venv="$bench_dir/.work/venv-cache"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import tokenizers, numpy; assert tokenizers.__version__ == '$TOKENIZERS_VERSION'" 2>/dev/null; then
    say "installing tokenizers==$TOKENIZERS_VERSION and numpy into $venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "tokenizers==$TOKENIZERS_VERSION" numpy
fi
exec "$venv/bin/python" "$bench_dir/token_cache.py" --trainyard "$CARGO_TARGET_DIR/release/trainyard" --work "$work" --corpus-mb "${BENCH_CORPUS_MB:-120}"
