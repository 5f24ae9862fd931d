#!/usr/bin/env bash
# The GPU runs of dpt-fast, as stages that each stop within a wall-time budget (STAGE_BUDGET_S, default 420 s for
# tests and 480 s for the others, build included), so that each stage can be run, or rerun, on its own:
#
#   bash benchmarks/gpu_suite.sh quick     everything that matters in one pass of under ten minutes:
#                                          environment and ceilings, the kernels' GPU correctness tests, the CUDA extension
#                                          (built in the background, sm_90a) and its tests, the benchmark rows
#                                          that decide the targets, DPT-Large end to end
#                                          (benchmarks/gpu_quick.py; extra arguments are passed to it)
#   bash benchmarks/gpu_suite.sh tests     build the extension (or load a prebuilt one), versions, every GPU
#                                          test (incl. compute-sanitizer) with DPT_FAST_AUTOTUNE=quick: one
#                                          Triton config per kernel variant, no autotune benchmarking (the
#                                          every-config tests run each config once); copies the built
#                                          extension to $OUT. The benchmark stages autotune in full.
#   bash benchmarks/gpu_suite.sh kernels   attention, reassemble and RCU benchmarks (time shared adaptively)
#   bash benchmarks/gpu_suite.sh e2e       end-to-end inference (fused, reference, HF sdpa, reference under
#                                          torch.compile max-autotune, capped) + training-step benchmark
#   bash benchmarks/gpu_suite.sh compile   the compiled end-to-end variants (reference+compile,
#                                          fused+compile) with the whole stage budget
#   bash benchmarks/gpu_suite.sh all       tests, kernels, e2e one after the other (no time limit)
#   single benchmarks: attention | reassemble | rcu | infer | train
#
# The extension needs CUTLASS headers: an installed nvidia-cutlass, DPT_FAST_CUTLASS_INCLUDE, or (on a machine
# without network) its wheel in .whl/, fetched beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0
# The tests stage also leaves the built extension as $OUT/_C.<python tag>.so: copied to dpt_fast/, a later
# stage on another machine with the same Python, torch and CUDA versions loads it instead of building
# (2-4 minutes).
#
# Everything goes under $OUT (default ./gpu-out), a few files a stage: suite-<stage>.log,
# environment.json (versions, measured ceilings), each benchmark's JSON (rewritten after every row, so a
# stage cut short still keeps its measurements), the end-to-end bench's .md/.png, the tests' junit XML. Then:
#   python benchmarks/render_results.py <the stages' output folders>
# merges them into benchmarks/results/<device>-<date>.json and rewrites the tables of benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage=${1:-tests}
if [ "$stage" = quick ]; then  # one script with its own log, budget and file list
  shift
  exec python benchmarks/gpu_quick.py --out "$OUT" "$@"
fi
if [ "$stage" = tests ]; then BUDGET=${STAGE_BUDGET_S:-420}; else BUDGET=${STAGE_BUDGET_S:-480}; fi
RESERVE=15  # seconds kept for the end of the stage (copies, the summary)
T0=$SECONDS
left() { echo $(( BUDGET - (SECONDS - T0) )); }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), $(( SECONDS - T0 )) s into the stage, $(left) s left)"; }

registered() {
  python -c "import dpt_fast.kernels; from dpt_fast.ops.rcu import cuda_kernel_registered as r; raise SystemExit(0 if r() else 1)" 2>/dev/null
}

build() {
  if registered; then
    echo "dpt_fast importable, extension registered"
    return
  fi
  local so
  so=$(python -c "import sysconfig; print('dpt_fast/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
  if [ -f "$so" ]; then  # prebuilt by an earlier stage: install the package around it, no compile
    step "install (prebuilt $so)"
    DPT_FAST_BUILD_CUDA=0 pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
    if registered; then echo "prebuilt extension registered"; return; fi
    echo "the prebuilt $so does not load here: building"
  fi
  step build
  local wheel
  wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ] && [ -z "${DPT_FAST_CUTLASS_INCLUDE:-}" ]; then
    python - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall("/tmp/cutlass", [n for n in z.namelist() if n.startswith("cutlass_library/source/include/")])
PY
    export DPT_FAST_CUTLASS_INCLUDE=/tmp/cutlass/cutlass_library/source/include
  fi
  local cap=$(( $(left) - 60 ))
  (( cap < 120 )) && cap=120
  DPT_FAST_BUILD_CUDA=1 MAX_JOBS=16 timeout "$cap" \
    pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -40
  if ! registered; then  # without the kernel the RCU rows would time the reference: install pure Python
    echo "BUILD FAILED or extension not registered: installing without it (RCU rows will say 'reference ran')"
    python -c "import dpt_fast.kernels" 2>/dev/null || DPT_FAST_BUILD_CUDA=0 pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
  fi
  python -c "from dpt_fast.ops.rcu import cuda_kernel_registered as r; print('rcu kernel registered:', r())"
  echo "build finished $(( SECONDS - T0 )) s into the stage"
}

export_extension() {  # for later stages on another machine with the same versions
  local so
  so=$(python -c "import sysconfig; print('dpt_fast/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
  [ -f "$so" ] || return 0
  strip -g -o "$OUT/$(basename "$so")" "$so" 2>/dev/null || cp "$so" "$OUT/"
  ls -l "$OUT/$(basename "$so")"
}

versions() {  # also $OUT/environment.json: device, versions, measured ceilings (render_results.py reads it)
  step versions
  python - "$OUT/environment.json" <<'PY'
import json, sys
import torch
from dpt_fast.measure import environment, measure_ceilings, write_json
from dpt_fast.ops.rcu import cuda_kernel_registered
device = torch.device("cuda")
doc = {"benchmark": "environment", **environment(device, torch.bfloat16),
       "ceilings": measure_ceilings(device, torch.bfloat16), "rcu_cuda_kernel_registered": cuda_kernel_registered(),
       "capability": list(torch.cuda.get_device_capability(0))}
write_json(sys.argv[1], doc)
print(json.dumps(doc, indent=1))
PY
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>/dev/null
}

tests() {
  step "gpu tests"
  local per_test="" budget
  python -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=240"  # one hung test must not eat the stage
  budget=$(( $(left) - RESERVE ))
  if (( budget < 60 )); then echo "skipped gpu tests: only $budget s left"; return; fi
  # SIGINT at the budget: pytest stops like on Ctrl-C and still writes its summary and the junit XML.
  # DPT_FAST_AUTOTUNE=quick: every autotuned Triton kernel gets its first config only (compiled once per
  # variant, never benchmarked); the test_gpu_every_config_* tests pin and check each config of the full lists.
  DPT_FAST_AUTOTUNE=quick timeout -s INT -k 20 "$budget" python -m pytest -q -m gpu -rs --durations=15 -p no:cacheprovider $per_test \
    --junitxml="$OUT/junit-gpu-tests.xml" 2>&1
  local rc=$?
  (( rc == 124 || rc == 2 )) && echo "GPU tests stopped at the stage budget ($budget s) or interrupted: see the log"
  echo "pytest exit status $rc"
  python - "$OUT/environment.json" "$rc" "$budget" <<'PY' 2>/dev/null
import json, sys
from dpt_fast.measure import write_json
doc = json.load(open(sys.argv[1]))
doc.update(gpu_tests_exit_status=int(sys.argv[2]), gpu_tests_budget_s=int(sys.argv[3]))
write_json(sys.argv[1], doc)
PY
}

# run_bench NAME PERCENT ARGS...: give benchmark NAME that share of the time left (minus the reserve);
# --budget-s stops it starting new rows, `timeout` ends it for sure (its JSON holds every finished row).
run_bench() {
  local name=$1 pct=$2 avail b
  shift 2
  avail=$(( $(left) - RESERVE ))
  b=$(( avail * pct / 100 ))
  step "bench $name ($b s)"
  if (( b < 40 )); then echo "skipped $name: only $b s left"; return; fi
  timeout -k 10 "$b" "$@" --budget-s $(( b - 35 )) 2>&1
  local rc=$?
  (( rc == 124 )) && echo "$name stopped at its share of the stage ($b s); its JSON holds the finished rows"
  echo "$name exit status $rc"
}

kernels() {
  run_bench attention 33 python benchmarks/bench_attention.py --out "$OUT/attention.json"
  run_bench reassemble 55 python benchmarks/bench_reassemble.py --out "$OUT/reassemble.json" --compile-timeout-s 90
  run_bench rcu 100 python benchmarks/bench_rcu.py --out "$OUT/rcu.json" --compile-timeout-s 90
}

infer() {  # $1: share of the time left; $2: variants; $3: compile cap
  run_bench "infer" "$1" python -m dpt_fast.cli bench --models large,hybrid --sizes 384:16,1536:1,4k:1 \
    --skip hybrid@4k --variants "$2" --compile-mode max-autotune --compile-timeout-s "$3" --compile-fallback-mode default \
    --warmup 2 --runs 30 --max-time 3 --out "$OUT"
}

train() {
  run_bench train 100 python benchmarks/bench_train.py --out "$OUT/train.json" --compile-timeout-s 120
}

main() {
  echo "stage $stage, budget $BUDGET s, OUT=$OUT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  build
  case "$stage" in
    tests) export_extension; versions; tests ;;
    kernels) kernels ;;
    e2e) infer 60 fused,reference,hf-sdpa,reference+compile 100; train ;;
    compile) infer 100 reference+compile,fused+compile 240 ;;
    attention|reassemble|rcu) run_bench "$stage" 100 python "benchmarks/bench_$stage.py" --out "$OUT/$stage.json" ;;
    infer) infer 100 fused,reference,hf-sdpa,reference+compile,fused+compile 150 ;;
    train) train ;;
    all) BUDGET=100000; export_extension; versions; tests; kernels; infer 60 fused,reference,hf-sdpa,reference+compile,fused+compile 600; train ;;
    *) echo "unknown stage $stage: quick | tests | kernels | e2e | compile | all | attention | reassemble | rcu | infer | train"; return 2 ;;
  esac
  step "done"
  ls -l "$OUT"
}

main 2>&1 | tee "$OUT/suite-$stage.log"
