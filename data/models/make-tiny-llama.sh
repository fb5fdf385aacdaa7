#!/usr/bin/env bash
# Makes data/models/tiny-llama: the small llama-family model (2 layers, width 64,
# byte-level BPE vocabulary of 384, ~150 k parameters, ~0.6 MB) that the shipped
# pipelines wiki-finetune and lora-export use as their local base model. It is the
# `pretrain` output of the quickstart at the smoke profile: trained for a few steps on
# the synthetic world, in Hugging Face layout (config.json, model.safetensors,
# tokenizer.json). Deterministic: the same trainyard gives the same bytes.
#
# Run from the repository root: bash data/models/make-tiny-llama.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/trainyard --workspace "$work" run pipelines/quickstart.yaml --profile smoke --until pretrain
out=data/models/tiny-llama
mkdir -p "$out"
for file in config.json model.safetensors tokenizer.json; do
  install -m 644 "$work/runs/latest/outputs/pretrain/$file" "$out/$file"
done
ls -l "$out"
