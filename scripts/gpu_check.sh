#!/usr/bin/env bash
# The prepared GPU check (one short run on a lent CUDA machine, well under 10 minutes), in the order
# issue 19's targets need them, so a run cut short still leaves the most important results:
#   1. GemLite (optional extra `gpu`): installed with --no-deps if missing (the machine's CUDA torch and
#      its Triton stay as they are),
#   2. every `cuda`-marked test (int4 kernels against the reference, `auto`'s timed choice, the CUDA-graph
#      decode step against transformers, quantizing on CUDA against the CPU),
#   3. the embedded model's shapes end to end (random weights; fp16, bf16, int4 on tinygemm-cuda and on
#      gemlite, int4 + quantized LM head), without perplexity: transformers' forward a token ("decode") and
#      rpiq's CUDA-graphed lean step ("lean"); the target is int4 lean >= 1.3x bf16 lean and >= 2x int4
#      "decode" on tinygemm-cuda,
#   4. one decoder layer's projections at Llama-2-7B / Qwen2.5-0.5B shapes, batch 1: bf16 vs tinygemm-cuda
#      vs gemlite, eager and graphed (target: int4 >= 2.5x bf16 at 7B),
#   5. with FULL=1 also the layer part of benchmarks/decode.py and calibration memory per mode.
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
timeout 240 $PY -m pytest -q -m cuda tests 2>&1 | tail -25 | tee "$DEST/gpu_tests.txt"
# --synthetic: SmolLM2's shapes with random weights (a lent GPU reaches no registry to fetch the model)
timeout 300 $PY benchmarks/decode.py --device cuda --part model --synthetic --batches 1 \
  --out "$DEST/decode_cuda_model.json" 2>&1 | tee "$DEST/decode_cuda_model.txt"
timeout 120 $PY benchmarks/gpu_kernels.py --iters 200 --out "$DEST/gpu_kernels.json" 2>&1 | tee "$DEST/gpu_kernels.txt"
if [ "${FULL:-0}" = 1 ]; then
  $PY benchmarks/decode.py --device cuda --part layers --out "$DEST/decode_cuda_layers.json" 2>&1 | tee "$DEST/decode_cuda_layers.txt"
  $PY benchmarks/calib_memory.py --device cuda --out "$DEST/calib_memory_cuda.json" 2>&1 | tee "$DEST/calib_memory_cuda.txt"
fi
