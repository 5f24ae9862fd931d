#!/usr/bin/env bash
# The GPU run, in stages that each fit one 10-minute call of the device machine (the machine keeps the
# build between calls while it stays warm):
#
#   bash benchmarks/gpu_suite.sh tests     build the extension, versions, GPU tests (incl. compute-sanitizer)
#   bash benchmarks/gpu_suite.sh kernels   attention, reassemble and RCU benchmarks  (~3 x 170 s)
#   bash benchmarks/gpu_suite.sh e2e       end-to-end inference benchmark + training-step benchmark
#   bash benchmarks/gpu_suite.sh all       everything, one after the other (a machine without a time limit)
#
# The GPU image has no nvidia-cutlass: carry its wheel. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0
# then name ".whl" in the device call's `carry`; the build takes the headers out of it.
#
# Everything goes under $OUT (default ./gpu-out): suite-<stage>.log plus each benchmark's JSON (the device
# tool returns at most 8 files a call). Results then go to benchmarks/results/ and benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage=${1:-tests}
exec > >(tee "$OUT/suite-$stage.log") 2>&1

stamp=$(date -u +%Y%m%d)
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo unknown)
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

build() {
  if python -c "from dpt_fast.ops.rcu import cuda_kernel_registered as r; raise SystemExit(0 if r() else 1)" 2>/dev/null; then
    echo "extension already built and registered"
    return
  fi
  step build
  wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ] && [ -z "${DPT_FAST_CUTLASS_INCLUDE:-}" ]; then
    python - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall("/tmp/cutlass", [n for n in z.namelist() if n.startswith("cutlass_library/source/include/")])
PY
    export DPT_FAST_CUTLASS_INCLUDE=/tmp/cutlass/cutlass_library/source/include
  fi
  DPT_FAST_BUILD_CUDA=1 MAX_JOBS=16 pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -40
  python -c "from dpt_fast.ops.rcu import cuda_kernel_registered as r; print('rcu kernel registered:', r())"
}

versions() {
  step versions
  python - <<'PY'
import torch, triton, timm, dpt_fast
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "timm", timm.__version__,
      "dpt_fast", dpt_fast.__version__)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>/dev/null
}

tests() {
  step "gpu tests"
  local timeout_flag=""
  python -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout=240"  # one hung test must not eat the call
  python -m pytest -q -m gpu -rs --durations=10 $timeout_flag 2>&1 | tail -80
}

kernels() {
  for bench in attention reassemble rcu; do
    step "bench $bench"
    timeout 190 python "benchmarks/bench_${bench}.py" --budget-s 150 \
      --out "$OUT/${bench}-${device}-${stamp}.json" 2>&1 | tail -40
  done
}

e2e() {
  step "end-to-end inference bench"
  timeout 330 dpt-fast bench --models large,hybrid --sizes 384,1536,4k --batch 16,1,1 --max-time 10 \
    --out "$OUT" 2>&1 | tail -40
  step "training-step bench"
  timeout 230 python benchmarks/bench_train.py --budget-s 200 --out "$OUT/train-${device}-${stamp}.json" 2>&1 | tail -30
}

build
case "$stage" in
  tests) versions; tests ;;
  kernels) kernels ;;
  e2e) e2e ;;
  all) versions; tests; kernels; e2e ;;
  *) echo "unknown stage $stage: tests | kernels | e2e | all"; exit 2 ;;
esac
