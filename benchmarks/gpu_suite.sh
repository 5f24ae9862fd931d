#!/usr/bin/env bash
# The one GPU run: build the extension, run the GPU tests (and a compute-sanitizer memcheck case),
# run every benchmark, and leave logs and JSON results under $OUT (default: ./gpu-out).
# Usage on the device machine:  bash benchmarks/gpu_suite.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stamp=$(date -u +%Y-%m-%d)
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo unknown)
mode=${1:-full}
# One log; the device tool returns at most 8 files: suite.log, 4 kernel JSONs, the e2e JSON/table/plot.
exec > >(tee "$OUT/suite.log") 2>&1

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step build
DPT_FAST_BUILD_CUDA=1 pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -40 \
  || echo "BUILD FAILED"

step versions
python - <<'PY'
import torch, triton, timm, dpt_fast
from dpt_fast.ops.rcu import cuda_kernel_registered
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "timm", timm.__version__)
print("device", torch.cuda.get_device_name(0), "rcu kernel registered", cuda_kernel_registered())
PY

step gpu tests
python -m pytest -q -m gpu -rs 2>&1 | tail -40

[ "$mode" = quick ] && exit 0

for bench in attention reassemble rcu train; do
  step "bench $bench"
  timeout 420 python "benchmarks/bench_${bench}.py" --out "$OUT/${bench}-${device}-${stamp}.json" 2>&1 | tail -40
done
step "end-to-end bench"
timeout 500 dpt-fast bench --out "$OUT" 2>&1 | tail -40
