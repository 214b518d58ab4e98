#!/usr/bin/env bash
# The GPU sweep: Qwen2.5-VL-7B-shaped (random bf16 weights), 1-8 images of
# 448-1344 px per request, Poisson arrivals, a rate sweep per deployment, SLOs stated here:
# TTFT <= 2 s and TPOT <= 50 ms (RESULTS also scores a relaxed 5 s / 100 ms with
# perf/gpu_sweep_report.py --relaxed 5000,100).
# Extra flags go to perf.gpu_sweep and win over these (e.g. --configs gpu4-aggregated,gpu4-3p1d,
# gpu4-2e1p1d on four GPUs; --deadline-s to stay inside a time limit).
#   OUT=/path/for/results [WHEELS=.wheels] bash perf/gpu_sweep.sh [flags]
# WHEELS holds py3.12 wheels installed first (the device image lacks pyzmq).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/epd-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/epd-site:$PWD
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm | tail -1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation: three processes share the GPU
exec python3 -m perf.gpu_sweep --out-dir "${OUT:-perf/out/gpu_sweep}" \
  --dataset random-mm --input-len 64-128 --output-len 64 --images-per-request 1-8 \
  --image-sizes 448x448,672x672,896x896,1120x1120,1344x1344,1344x896,896x1344 --image-format jpeg \
  --num-prompts 10 --request-rate 0.15,0.3,0.45 --warmup-requests 2 --slo-ttft-ms 2000 --slo-tpot-ms 50 \
  --no-progress "$@"
