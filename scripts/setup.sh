#!/usr/bin/env bash
# README command 1: install everything, then run the main job on the embedded default model:
# quantize SmolLM2-135M-Instruct to 4 bits with RPIQ and print perplexity and size before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/rpiq quantize \
  --method rpiq --bits 4 --group-size 128 \
  --nsamples 16 --seqlen 512 \
  --eval heldout --eval-seqlen 512 --eval-windows 16 \
  --out out/SmolLM2-135M-Instruct-rpiq-w4g128 "$@"
