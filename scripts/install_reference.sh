#!/usr/bin/env bash
# Installs the reference GPTQ libraries into their own benchmark-only venvs (idempotent):
#
#   bash scripts/install_reference.sh                # llm-compressor -> ./.venv-ref      (benchmarks/reference_gptq.py)
#   bash scripts/install_reference.sh gptqmodel      # GPTQModel      -> ./.venv-gptqmodel (benchmarks/gptqmodel_worker.py)
#   bash scripts/install_reference.sh all            # both
#
# Separate from ./.venv, and from each other, because their pins conflict: llmcompressor 0.14.0.1
# pins transformers<=5.17 (the project runs 5.24); GPTQModel 7.7.0 declares transformers>=5.20.2 and
# a CUDA torch>=2.14.1 that it does not need on a CPU.
#
# torch is installed FIRST and pinned to the 2.13.0 CPU wheel (an unpinned torch would pull a
# multi-GB CUDA build); every other package is pinned to the versions the published results used.
# The rpiq tree is not installed: the worker scripts put the repo root on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${1:-llmcompressor}
case "$TARGET" in
  llmcompressor|gptqmodel|all) ;;
  *) echo "usage: $0 [llmcompressor|gptqmodel|all]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"needs Python 3.11, found {sys.version}"'
TORCH=${RPIQ_TORCH:-torch==2.13.0}

# install VENV NODEPS PINS... : torch first, then PINS (resolved by pip, torch pinned again so that it
# cannot swap the build); NODEPS (space-separated) are installed with --no-deps (their declared
# torch/transformers requirements are wrong for this CPU setup; PINS hold what they import).
install() {
  local venv=$1 nodeps=$2
  shift 2
  local pins=("$@")
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  # A venv that ignores itself: git never lists it, whatever the repository's .gitignore says.
  [ -f "$venv/.gitignore" ] || echo '*' >"$venv/.gitignore"
  if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$TORCH"
  fi
  local want
  want=$(printf '%s\n' "${pins[@]}" $nodeps | grep '==' | tr '\n' ' ')
  if ! "$venv/bin/python" - "$want" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
for pin in sys.argv[1].split():
    name, v = pin.split("==")
    assert version(name) == v, pin
EOF
    # shellcheck disable=SC2086 # NODEPS is a word list
    [ -z "$nodeps" ] || "$venv/bin/python" -m pip install -q --no-deps $nodeps
    "$venv/bin/python" -m pip install -q "$TORCH" "${pins[@]}"
  fi
  "$venv/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
}

if [ "$TARGET" = llmcompressor ] || [ "$TARGET" = all ]; then
  install .venv-ref "" \
    "llmcompressor==0.14.0.1" \
    "compressed-tensors==0.19.0" \
    "transformers==5.17.0" \
    "accelerate==1.15.0" \
    "datasets==5.2.0" \
    "filelock"  # models/embedded.py (already a torch dependency)
  echo "reference GPTQ (llm-compressor) installed in $(pwd)/.venv-ref"
  echo "run: .venv-ref/bin/python benchmarks/reference_gptq.py --bits 4 --group-size 128 --out OUT.json"
fi

if [ "$TARGET" = gptqmodel ] || [ "$TARGET" = all ]; then
  # GPTQModel's requirements.txt minus torch (CPU wheel above), ninja and maturin (build tools it does
  # not use here); transformers pinned to the project's version.
  install .venv-gptqmodel "gptqmodel==7.7.0" \
    "transformers==5.24.0" \
    "accelerate==1.15.0" \
    "numpy==2.4.6" \
    "safetensors==0.8.0" \
    "threadpoolctl==3.8.0" \
    "packaging==26.4" \
    "device-smi==0.5.7" \
    "protobuf==7.36.2" \
    "pillow==13.0.0" \
    "requests==2.34.2" \
    "pypcre==0.6.4" \
    "tokenicer==0.0.14" \
    "logbar==0.4.15" \
    "jinja2==3.1.6" \
    "datasets==5.2.0" \
    "pyarrow==26.0.1" \
    "dill==0.4.1" \
    "torchao==0.18.0" \
    "defuser==0.0.28" \
    "filelock"
  echo "reference GPTQ (GPTQModel v1 and v2 / GPTAQ) installed in $(pwd)/.venv-gptqmodel"
  echo "run: .venv-gptqmodel/bin/python benchmarks/gptqmodel_worker.py --variant v2 --bits 3 --out OUT.json"
fi
