#!/usr/bin/env bash
# Everything GPU-side in one call of at most 6 minutes on a machine with a CUDA GPU (the device tool): build in
# place, the GPU tests (compiled kernels, no interpreter), the GPU benchmarks. bench/README.md has the call.
#
#   bash bench/gpu_all.sh [STAGE ...]        # no STAGE: all of them, in this order
#
# Stages (name, timeout in seconds; the timeouts add up to 360 s):
#   01 device        15  nvidia-smi, nvcc, python/torch/triton versions, torch.cuda.get_device_name
#   02 build         40  pip install -e . with CUDA (else setup.py build_ext --inplace), then import _C and _C_cuda
#   03 backends      15  json of zo_kernels.backends.available(); fails unless cpu, cuda and triton are available
#   04 sass          25  tools/sass_report.py --out $OUT/sass.md --json $OUT/sass.json (this machine's compilers)
#   05 tests-cuda    30  the cuda cases of tests/test_kernels.py, tests/test_cuda_kernels.py
#   06 tests-triton  60  the triton cases of $TRITON_FILES below, in parallel pytest shards (tools/pytest_shard.py)
#   07 tests-gpu     35  pytest -m gpu over every other test file that marks GPU tests
#   08 bench-gpu     55  bench/reduce_kernels.py --quick --out $OUT/gpu.md, bounds of $OUT/sass.json (else bench/results/)
#   09 run-quick     35  bench/run.py --quick --out-dir $OUT/run
#   10 lowrank-gpu   30  bench/lowrank.py --sections gpu --out $OUT/lowrank-gpu.md (GPT-2 small, 256 members)
#   11 memory-gpu    20  bench/memory.py --sections gpt100m --out $OUT/memory-gpu.md (perturb modes, GPT-2 small)
#
# Each stage tees $OUT/NN-NAME.log, stops at its timeout, never stops the later ones, and appends its status (ok,
# FAILED rc=N, TIMEOUT after N s, SKIPPED (no GPU) without a CUDA device) to $OUT/summary.txt, printed at the end (exit
# 0 when every stage that ran is ok). $OUT/run-info.txt: date, commit (GPU_ALL_COMMIT overrides git), python, CPUs.
# Environment: OUT (default bench/results/gpu-run), PYTHON (default: python or python3, whichever has torch),
# GPU_ALL_MAX_TIMEOUT (caps every timeout, for tests), GPU_ALL_SHARDS (tests-triton processes; nproc - 4, 1-12).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
if [[ -z "${PYTHON:-}" ]]; then  # the first python that has torch (a look-up, no import)
  for candidate in python python3; do
    "$candidate" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null &&
      PYTHON=$(command -v "$candidate") && break
  done
fi
PY=${PYTHON:-python}
MAX_TIMEOUT=${GPU_ALL_MAX_TIMEOUT:-}
NPROC=$(nproc 2>/dev/null || echo 2)
SHARDS=${GPU_ALL_SHARDS:-$((NPROC - 4 > 12 ? 12 : (NPROC - 4 < 1 ? 1 : NPROC - 4)))}
SUMMARY=$OUT/summary.txt
STAGE_NAMES=(device build backends sass tests-cuda tests-triton tests-gpu bench-gpu run-quick lowrank-gpu memory-gpu)
SELECTED=("$@")
for wanted in "${SELECTED[@]}"; do
  [[ " ${STAGE_NAMES[*]} " == *" $wanted "* ]] || { echo "gpu_all.sh: unknown stage '$wanted' (stages: ${STAGE_NAMES[*]})" >&2; exit 2; }
done
unset TRITON_INTERPRET  # the Triton kernels are compiled for the GPU, never interpreted
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the tree's package, even if the install fails
export ROOT OUT PY SHARDS
: >"$SUMMARY"
STAGE_NO=0 FAILURES=0 HAVE_GPU=0

now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
selected() { [[ ${#SELECTED[@]} -eq 0 || " ${SELECTED[*]} " == *" $1 "* ]]; }
# record NN NAME STATUS SECONDS: one line of the summary, written at once.
record() {
  printf '%s  %-13s %-26s %7s s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
  [[ "$3" == ok || "$3" == SKIPPED* ]] || FAILURES=$((FAILURES + 1))
}

# stage NAME TIMEOUT_S COMMAND...: COMMAND (a program or an exported function) under `timeout`, its output
# teed into $OUT/NN-NAME.log; records its status and wall time. gpu_stage: the same, SKIPPED without a GPU.
stage() {
  local name=$1 limit=$2 nn log start rc status secs
  shift 2
  STAGE_NO=$((STAGE_NO + 1))
  nn=$(printf '%02d' "$STAGE_NO")
  log=$OUT/$nn-$name.log
  selected "$name" || return 0
  if [[ ${NEEDS_GPU:-0} -eq 1 && $HAVE_GPU -ne 1 ]]; then
    echo "=== [$nn $name] SKIPPED: no CUDA device: torch.cuda.is_available() is not True (see 01-device.log)" | tee "$log"
    record "$nn" "$name" "SKIPPED (no GPU)" 0.0
    return 0
  fi
  [[ -n "$MAX_TIMEOUT" ]] && awk -v a="$MAX_TIMEOUT" -v b="$limit" 'BEGIN { exit !(a < b) }' && limit=$MAX_TIMEOUT
  echo "=== [$nn $name] $* (timeout ${limit} s, $(date -u '+%H:%M:%S UTC'))" | tee "$log"
  start=$(now)
  STAGE_LOG_STEM=$nn-$name timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" </dev/null 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  secs=$(seconds_since "$start")
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit} s" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  echo "=== [$nn $name] $status in $secs s" | tee -a "$log"
  record "$nn" "$name" "$status" "$secs"
}
gpu_stage() { NEEDS_GPU=1 stage "$@"; }

# --- what the stages run -------------------------------------------------------------------------
device_info() {
  nvidia-smi || echo "nvidia-smi failed (rc=$?)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "nproc: $(nproc)"
  "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton not importable"
  "$PY" -c '
import platform, sys, torch
print("python", platform.python_version(), sys.executable, "torch", torch.__version__, "CUDA", torch.version.cuda)
ok = torch.cuda.is_available()
print("torch.cuda.is_available():", ok)
print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0) if ok else "none")
sys.exit(0 if ok else 1)
'
}

build() {  # Ninja on every core; nvcc compiles the architectures of CMakeLists.txt in parallel (--threads 0)
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} ZO_KERNELS_BUILD_CUDA=1 ZO_KERNELS_REQUIRE_NATIVE=1
  local rc=1
  if "$PY" -m pip --version; then
    "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .
    rc=$?
    [[ $rc -eq 0 ]] || echo "WARNING: pip install -e . failed (rc=$rc); building in place with setup.py instead"
  fi
  [[ $rc -eq 0 ]] || "$PY" setup.py build_ext --inplace || return $?
  "$PY" -c 'import zo_kernels._C as c, zo_kernels._C_cuda as g; print("built:", c.__file__, g.__file__)'
}

backends_json() {
  "$PY" -c '
import json, sys
import zo_kernels
status = zo_kernels.backends.available()
print(json.dumps(status, indent=1))
missing = [name for name in ("cpu", "cuda", "triton") if status.get(name) != "available"]
sys.exit("not available: " + ", ".join(missing) if missing else 0)
'
}

# pytest_sharded ARGS...: pytest ARGS in $SHARDS processes at once, each a contiguous share of the tests,
# each logging to $OUT/NN-NAME.shardK.log; fails if one fails.
pytest_sharded() {
  local k pids=() rc=0 r logs=()
  for ((k = 0; k < SHARDS; k++)); do
    logs+=("$OUT/$STAGE_LOG_STEM.shard$k.log")
    PYTEST_SHARD="$k/$SHARDS" PYTHONPATH="$ROOT/tools:$PYTHONPATH" "$PY" -m pytest -p pytest_shard "$@" >"${logs[k]}" 2>&1 &
    pids+=($!)
  done
  echo "$SHARDS shards: ${logs[*]}"
  for ((k = 0; k < SHARDS; k++)); do
    wait "${pids[k]}"
    r=$?
    [[ $r -eq 5 ]] && r=0  # a shard that was given no test
    echo "--- shard $k/$SHARDS: exit $r"
    tail -n 25 "${logs[k]}"
    [[ $r -ne 0 ]] && rc=1
  done
  return $rc
}

gpu_bench() {
  local sass=bench/results/sass.json
  [[ -s "$OUT/sass.json" ]] && sass=$OUT/sass.json
  "$PY" bench/reduce_kernels.py --quick --out "$OUT/gpu.md" --sass "$sass"
}
export -f device_info build backends_json pytest_sharded gpu_bench

PYTEST=("$PY" -m pytest -p no:cacheprovider -rs --durations=15)
TRITON_FILES=(tests/test_kernels.py tests/test_triton_kernels.py tests/test_triton_compile.py)
GPU_FILES=()
for file in tests/test_*.py; do
  [[ " ${TRITON_FILES[*]} tests/test_cuda_kernels.py " == *" $file "* ]] && continue
  grep -qE 'mark\.gpu' "$file" && GPU_FILES+=("$file")
done

# --- the run ---------------------------------------------------------------------------------------
RUN_START=$(now)
DIRTY="unknown (no git)"
git rev-parse --git-dir >/dev/null 2>&1 && DIRTY=$(git status --porcelain | wc -l | tr -d ' ')
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: ${GPU_ALL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}${GPU_ALL_COMMIT:+ (from GPU_ALL_COMMIT)}; files differing from it here: $DIRTY"
  echo "python: $PY; CPUs: $NPROC; tests-triton shards: $SHARDS; stages: ${SELECTED[*]:-all}"
  echo "GPU_ALL_MAX_TIMEOUT: ${MAX_TIMEOUT:-(unset)}"
} | tee "$OUT/run-info.txt" | sed 's/^/gpu_all.sh: /'

stage device 15 device_info
# The GPU stages run when torch sees a CUDA device (also when only later stages are selected).
if grep -q '^torch.cuda.is_available(): True' "$OUT/01-device.log" 2>/dev/null ||
  { ! selected device && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }; then
  HAVE_GPU=1
fi
gpu_stage build 40 build
stage backends 15 backends_json
gpu_stage sass 25 "$PY" tools/sass_report.py --out "$OUT/sass.md" --json "$OUT/sass.json"
gpu_stage tests-cuda 30 env ZO_KERNELS_REQUIRE_NATIVE=1 "${PYTEST[@]}" tests/test_kernels.py tests/test_cuda_kernels.py -k cuda
gpu_stage tests-triton 60 pytest_sharded -p no:cacheprovider -rs --durations=15 -k triton "${TRITON_FILES[@]}"
gpu_stage tests-gpu 35 "${PYTEST[@]}" -m gpu "${GPU_FILES[@]}"
gpu_stage bench-gpu 55 gpu_bench
gpu_stage run-quick 35 "$PY" bench/run.py --quick --out-dir "$OUT/run"
gpu_stage lowrank-gpu 30 "$PY" bench/lowrank.py --sections gpu --out "$OUT/lowrank-gpu.md"
gpu_stage memory-gpu 20 "$PY" bench/memory.py --sections gpt100m --out "$OUT/memory-gpu.md"

echo
echo "gpu_all.sh: summary ($OUT/summary.txt), $(seconds_since "$RUN_START") s in all:"
cat "$SUMMARY"
[[ $FAILURES -eq 0 ]]
