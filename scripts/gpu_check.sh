#!/usr/bin/env bash
# The prepared GPU check (one short run on a lent CUDA machine, a few minutes):
#   1. the `cuda`-marked tests (tinygemm-cuda vs the reference, quantize on CUDA vs CPU),
#   2. the int4 decode benchmark's layer part on CUDA (fp16/bf16 vs int4 at 0.5B/1.5B/7B shapes),
#   3. calibration memory per mode at 128 x 2048 tokens (SmolLM2 shapes, random weights),
#   4. the embedded model on CUDA (fp16, bf16, int4, int4 + quantized LM head), without perplexity.
# Results land in ${OUT:-benchmarks/results}; the machine's CUDA torch is used as installed.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
$PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
$PY -m pytest -q -m cuda tests 2>&1 | tail -15 | tee "$DEST/gpu_tests.txt"
$PY benchmarks/decode.py --device cuda --part layers --out "$DEST/decode_cuda_layers.json" 2>&1 | tee "$DEST/decode_cuda_layers.txt"
$PY benchmarks/calib_memory.py --device cuda --out "$DEST/calib_memory_cuda.json" 2>&1 | tee "$DEST/calib_memory_cuda.txt"
$PY benchmarks/decode.py --device cuda --part model --ppl-windows 0 --out "$DEST/decode_cuda_model.json" 2>&1 | tee "$DEST/decode_cuda_model.txt"
