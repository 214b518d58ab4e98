#!/usr/bin/env bash
# The GPU fast-path figures in one device call: each part named on the command line runs under
# its own time limit and appends to $OUT/run.log; JSON results land in $OUT.
#   OUT=/tmp/out bash perf/gpu_fastpath.sh tests gpu gemv vision rolemem
# Parts:
#   tests    the CUDA tests: engine greedy equality with transformers (fp32), the decode lookahead,
#            our Triton kernels (attention, vision, GEMV)
#   gpu      perf/bench_gpu.py: decode steps (serial and with the lookahead) vs the floor, prefill
#   gemv     perf/bench_gemv.py: our skinny-matmul kernel vs cuBLAS at the 7B decode shapes
#   vision   perf/bench_vision.py: the vision tower and 4 x 1344^2 encode + prefill
#   rolemem  perf/bench_role_memory.py: what each role holds, 7B shapes
# Needs the 7B config directory at .q7b (python3 -m stages.models.make_model --family qwen2_5_vl
# --size 7b --config-only --out .q7b). Extra bench_gpu flags: GPU_FLAGS="...".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf/out/gpu_fastpath}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log="$OUT/run.log"
part() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$log"
  local t=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t))s" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$log"
for p in "$@"; do
  case $p in
    tests) files=(); for f in tests/test_lookahead.py tests/test_triton_attention.py tests/test_vision_attention.py tests/test_vision_fast.py \
                              tests/test_gemv_triton.py; do [ -f "$f" ] && files+=("$f"); done
           EPD_TEST_DEVICE=cuda part tests 170 python3 -m pytest -q -p no:cacheprovider "${files[@]}" \
             "tests/test_engine_equality.py::test_greedy_matches_transformers" ;;
    gpu) part gpu 200 python3 -m perf.bench_gpu --model .q7b --backends triton --no-transformers \
           --profile 1x512 ${GPU_FLAGS:-} --out "$OUT/bench_gpu.json" ;;
    gemv) part gemv 180 python3 -m perf.bench_gemv --out "$OUT/bench_gemv.json" ;;
    vision) part vision 240 python3 -m perf.bench_vision --model .q7b --out "$OUT/bench_vision.json" ;;
    rolemem) part rolemem 200 python3 -m perf.bench_role_memory --model .q7b --device cuda --load-format dummy --kv-gb 8 \
               --out "$OUT/role_memory.json" ;;
    *) echo "unknown part $p" | tee -a "$log" ;;
  esac
done
