#!/usr/bin/env bash
# Installs the reference GPTQ library (llm-compressor) into its own venv ./.venv-ref (idempotent),
# for benchmarks/reference_gptq.py. Separate from ./.venv because llmcompressor 0.14.0.1 pins
# transformers<=5.17 while the project runs 5.24.
#
# torch is installed FIRST and pinned to the 2.13.0 CPU wheel (an unpinned torch would pull a
# multi-GB CUDA build); every other package is pinned to the versions the published results used.
# The rpiq tree is not installed: reference_gptq.py puts the repo root on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"needs Python 3.11, found {sys.version}"'

VENV=.venv-ref
TORCH=${RPIQ_TORCH:-torch==2.13.0}
PINS=(
  "llmcompressor==0.14.0.1"
  "compressed-tensors==0.19.0"
  "transformers==5.17.0"
  "accelerate==1.15.0"
  "datasets==5.2.0"
  "filelock"  # models/embedded.py (already a torch dependency)
)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH"
fi
want=$(printf '%s\n' "${PINS[@]}" | grep '==' | tr '\n' ' ')
if ! "$VENV/bin/python" - "$want" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
for pin in sys.argv[1].split():
    name, v = pin.split("==")
    assert version(name) == v, pin
EOF
  # torch is pinned again so that pip cannot swap it for another build while resolving the rest.
  "$VENV/bin/python" -m pip install -q "$TORCH" "${PINS[@]}"
fi
"$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
echo "reference GPTQ (llm-compressor) installed in $(pwd)/$VENV"
echo "run: $VENV/bin/python benchmarks/reference_gptq.py --bits 4 --group-size 128 --out OUT.json"
