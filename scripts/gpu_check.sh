#!/usr/bin/env bash
# The prepared GPU check (one short run on a lent CUDA machine, a few minutes):
#   1. the `cuda`-marked tests (tinygemm-cuda vs the reference, quantize on CUDA vs CPU, CUDA-graph decode),
#   2. the int4 decode benchmark's layer part on CUDA (fp16/bf16 vs int4 at 0.5B/1.5B/7B shapes),
#   3. calibration memory per mode at 128 x 2048 tokens (SmolLM2 shapes, random weights),
#   4. the embedded model on CUDA (fp16, bf16, int4 on tinygemm-cuda and on gemlite, int4 + quantized LM head),
#      without perplexity: transformers' forward a token ("decode") and the CUDA-graphed lean step ("lean"),
#   5. GemLite (optional extra `gpu`): installed with --no-deps if missing (the machine's CUDA torch
#      and its Triton stay as they are), its `cuda` tests, and one decoder layer's projections at
#      Llama-2-7B / Qwen2.5-0.5B shapes, batch 1: bf16 vs tinygemm-cuda vs gemlite, eager and graphed.
# Results land in ${OUT:-benchmarks/results}; the machine's CUDA torch is used as installed.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
$PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
$PY -c 'import gemlite' 2>/dev/null || $PY -m pip install -q --no-deps "gemlite==0.6.0.post2" 2>&1 | tail -2
$PY -c 'import triton, gemlite; print("triton", triton.__version__, "gemlite", gemlite.__version__)' 2>&1 | tail -1
# The GemLite kernel first (its GEMM autotune is the slowest part), then everything else marked cuda.
timeout 300 $PY -m pytest -q -m cuda tests/test_int4_gpu_kernel.py 2>&1 | tail -15 | tee "$DEST/gpu_kernel_tests.txt"
timeout 240 $PY benchmarks/gpu_kernels.py --iters 200 --out "$DEST/gpu_kernels.json" 2>&1 | tee "$DEST/gpu_kernels.txt"
$PY -m pytest -q -m cuda tests --ignore=tests/test_int4_gpu_kernel.py 2>&1 | tail -15 | tee "$DEST/gpu_tests.txt"
$PY benchmarks/decode.py --device cuda --part layers --out "$DEST/decode_cuda_layers.json" 2>&1 | tee "$DEST/decode_cuda_layers.txt"
$PY benchmarks/calib_memory.py --device cuda --out "$DEST/calib_memory_cuda.json" 2>&1 | tee "$DEST/calib_memory_cuda.txt"
$PY benchmarks/decode.py --device cuda --part model --ppl-windows 0 --out "$DEST/decode_cuda_model.json" 2>&1 | tee "$DEST/decode_cuda_model.txt"
