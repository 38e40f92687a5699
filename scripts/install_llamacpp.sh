#!/usr/bin/env bash
# Installs llama.cpp's Python binding (llama-cpp-python) into its own venv ./.venv-llamacpp
# (idempotent), for benchmarks/vs_llamacpp.py only. Nothing of it enters rpiq's own install.
#
# llama-cpp-python is built from its sdist (there is no CPU wheel on PyPI), which compiles
# llama.cpp with the cmake/gcc/ninja of this machine: ~10-20 min on 2 cores. GGML_NATIVE=ON
# targets this very CPU (-march=native: AVX2/AVX-512/FMA as available), the same advantage
# torch's runtime-dispatched kernels get, so the comparison is fair. Override with CMAKE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

VENV=.venv-llamacpp
PIN=${RPIQ_LLAMACPP:-llama-cpp-python==0.3.36}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
want=${PIN#*==}
if ! "$VENV/bin/python" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$want')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # psutil: the benchmark worker measures its own peak RSS the same way rpiq's worker does.
  "$VENV/bin/python" -m pip install -v --no-binary llama-cpp-python "$PIN" psutil
fi
"$VENV/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "system info:", llama_cpp.llama_print_system_info().decode())'
echo "llama.cpp installed in $(pwd)/$VENV"
echo "run: .venv/bin/python benchmarks/vs_llamacpp.py --threads 2 --runs 3"
