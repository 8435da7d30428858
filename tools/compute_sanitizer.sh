#!/usr/bin/env bash
# The CUDA kernels (zo_kernels._C_cuda) under NVIDIA compute-sanitizer, on a machine with a CUDA GPU
# (e.g. through the device tool). Writes $OUT/gpu-sanitizer.md (default OUT=bench/results) and one
# log per step beside it.
#
#   bash tools/compute_sanitizer.sh [--quick] [--no-build]
#
#   --quick     memcheck over the float32 cases of tests/test_cuda_kernels.py (and the dtype-free tests)
#   --no-build  use the extensions already built in place
#
# Steps, each recorded in the report (PASS/FAIL, exit status, the tool's summary line, the log's tail):
#  1. build in place: ZO_KERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace, with
#     CUDAFLAGS=-lineinfo so reports name kernels.cu lines (a fresh CMake build dir reads it);
#  2. controls: a planted out-of-bounds write must be caught by memcheck and a planted shared-memory
#     race by racecheck, so a sanitizer that cannot watch this GPU cannot pass;
#  3. memcheck over tests/test_cuda_kernels.py (not the `slow` 2**31-element test), with
#     PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own cudaMalloc, so an access past a
#     tensor's end leaves the allocation memcheck knows (with the caching allocator it would land in
#     the same cached block, unseen);
#  4. racecheck and synccheck over the tests that run the kernels with shared memory and
#     __syncthreads (squared norms, via block_sum) plus a few others: racecheck is slow.
# --report-api-errors no: the tests provoke CUDA API errors on purpose
# (test_cuda_errors_become_python_exceptions: cudaSetDevice(1000)), and the bindings turn API errors
# into Python exceptions that fail the tests anyway. Each tool runs with --error-exitcode 99.
#
# Exit status: 0 all passed; 1 a step failed; 2 no GPU, no compute-sanitizer or no torch (clear
# message, no report written). Tunables: PYTHON, COMPUTE_SANITIZER (path), CS_TIMEOUT (seconds per
# tool run, default 420), RACECHECK_K (the -k expression for racecheck/synccheck).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT=${OUT:-bench/results}
REPORT=$OUT/gpu-sanitizer.md
CS_TIMEOUT=${CS_TIMEOUT:-420}
# dtype0 is float32 in the tests' parametrize ids.
RACECHECK_K=${RACECHECK_K:-squared_norms or deterministic_across_runs or philox_known_answers or (test_perturb and 5000 and (dtype0 or float32))}
QUICK=0
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "compute_sanitizer.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
unavailable() { echo "compute_sanitizer.sh: cannot run here: $*" >&2; exit 2; }

# --- what this machine has ---------------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
else
  PY=""
  for candidate in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      PY=$candidate
      break
    fi
  done
  [[ -n "$PY" ]] || unavailable "no python with torch (set PYTHON)"
fi
CS=${COMPUTE_SANITIZER:-}
if [[ -z "$CS" ]]; then
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
                   /usr/local/cuda-*/bin/compute-sanitizer; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      CS=$candidate
      break
    fi
  done
fi
[[ -n "$CS" && -x "$CS" ]] || unavailable "compute-sanitizer not found (install the CUDA toolkit or set COMPUTE_SANITIZER)"
command -v nvidia-smi >/dev/null 2>&1 || unavailable "no nvidia-smi: no NVIDIA driver on this machine"
nvidia-smi -L >/dev/null 2>&1 || unavailable "nvidia-smi sees no GPU"
env -u TRITON_INTERPRET "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || unavailable "torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
NVCC=${CUDACXX:-$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)}

mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
STATUS=0
ROWS=()
TAILS=()

# record NAME RC SUMMARY VERDICT LOG: one row of the table and the log's tail; rewrites the report,
# so a run cut short still leaves what it finished.
record() {
  local name=$1 rc=$2 summary=$3 verdict=$4 log=$5
  [[ "$verdict" == PASS ]] || STATUS=1
  ROWS+=("| $name | $verdict | $rc | ${summary//|//} | \`$(basename "$log")\` |")
  TAILS+=("### $name ($verdict)" "" '```' "$(tail -n 30 "$log" 2>/dev/null)" '```' "")
  write_report
  echo "compute_sanitizer.sh: $name: $verdict (exit $rc) $summary"
}

write_report() {
  {
    echo "# compute-sanitizer over the CUDA kernels"
    echo
    echo "Written by \`tools/compute_sanitizer.sh$([[ $QUICK -eq 1 ]] && echo ' --quick')\`; every line below is the script's output, none typed by hand."
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- csrc 2>/dev/null || echo ' (csrc/ modified)')"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "- compute-sanitizer: $("$CS" --version 2>/dev/null | grep -i version | head -n 1) ($CS)"
    echo "- nvcc: $("$NVCC" --version 2>/dev/null | grep -i release | head -n 1)"
    echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null); python: $("$PY" -c 'import platform; print(platform.python_version())')"
    echo "- result: $([[ $STATUS -eq 0 ]] && echo PASS || echo FAIL) (${#ROWS[@]} steps so far)"
    echo
    echo "| step | result | exit | summary | log |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "## Output tails"
    echo
    printf '%s\n' "${TAILS[@]}"
  } >"$REPORT"
}

# The tool's closing summary lines, joined ('' when it printed none).
summary_of() { grep -E '^========= (ERROR|RACECHECK|SYNCCHECK)? ?SUMMARY' "$1" | sed 's/^========= //' | paste -sd ';' -; }

# sanitize NAME TOOL LOG ARGS...: run "$PY -m pytest ARGS" under the tool and record the outcome.
sanitize() {
  local name=$1 tool=$2 log=$3
  shift 3
  local cmd=("$CS" --tool "$tool" --error-exitcode 99 --report-api-errors no --target-processes all --print-limit 100)
  [[ "$tool" == racecheck ]] && cmd+=(--racecheck-report all)
  echo "\$ ${cmd[*]} $PY -m pytest $*" >"$log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$CS_TIMEOUT" "${cmd[@]}" "$PY" -m pytest -q -p no:cacheprovider "$@" >>"$log" 2>&1
  local rc=$?
  local summary verdict=FAIL
  summary=$(summary_of "$log")
  local passed  # pytest's closing line, e.g. "11 passed, 386 deselected in 3.2s" or "1 failed, 10 passed ..."
  passed=$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1)
  if [[ $rc -eq 0 && "$summary" =~ (^|[^0-9])0\ errors && "$passed" =~ [0-9]+\ passed && "$passed" != *failed* ]]; then
    verdict=PASS
  fi
  [[ $rc -eq 124 ]] && summary="timed out after ${CS_TIMEOUT} s; $summary"
  record "$name" "$rc" "${passed:-no pytest result}; ${summary:-no summary line}" "$verdict" "$log"
}

# --- 1. build ----------------------------------------------------------------------------------------
if [[ $BUILD -eq 1 ]]; then
  log=$OUT/gpu-sanitizer-build.log
  CUDAFLAGS="${CUDAFLAGS:-} -lineinfo" ZO_KERNELS_BUILD_CUDA=1 ZO_KERNELS_REQUIRE_NATIVE=1 \
    "$PY" setup.py build_ext --inplace >"$log" 2>&1
  rc=$?
  record "build (setup.py build_ext --inplace)" "$rc" "$(tail -n 1 "$log")" "$([[ $rc -eq 0 ]] && echo PASS || echo FAIL)" "$log"
fi
log=$OUT/gpu-sanitizer-backends.log
"$PY" -c 'import json, sys, zo_kernels; a = zo_kernels.backends.available(); print(json.dumps(a)); sys.exit(a.get("cuda") != "available")' >"$log" 2>&1
rc=$?
record "cuda backend available" "$rc" "$(tail -n 1 "$log")" "$([[ $rc -eq 0 ]] && echo PASS || echo FAIL)" "$log"
if [[ $rc -ne 0 ]]; then
  echo "compute_sanitizer.sh: FAIL: the cuda backend is not available; see $REPORT" >&2
  exit 1
fi

# --- 2. controls: planted bugs the tools must catch --------------------------------------------------
log=$OUT/gpu-sanitizer-controls.log
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/planted.cu" <<'EOF'
// Planted bugs: 'oob' writes 32 ints past a 64-int allocation; 'race' has two warps write and read
// the same shared words with no __syncthreads in between.
#include <cstdio>
#include <cstring>
__global__ void oob(int* p, int n) { p[n + threadIdx.x] = 1; }
__global__ void race(int* out) {
  __shared__ int s[32];
  s[threadIdx.x % 32] = threadIdx.x;
  out[threadIdx.x] = s[(threadIdx.x + 1) % 32];
}
int main(int argc, char** argv) {
  int* p = nullptr;
  if (cudaMalloc(&p, 64 * sizeof(int)) != cudaSuccess) return 3;
  if (argc > 1 && std::strcmp(argv[1], "oob") == 0) oob<<<1, 32>>>(p, 64);
  else race<<<1, 64>>>(p);
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("planted: %s\n", cudaGetErrorString(e));
  return 0;
}
EOF
{
  echo "\$ $NVCC -arch=native -lineinfo -o planted planted.cu"
  "$NVCC" -arch=native -lineinfo -o "$work/planted" "$work/planted.cu" 2>&1
} >"$log"
if [[ ! -x "$work/planted" ]]; then
  record "controls (planted bugs)" 1 "nvcc could not build the planted program" FAIL "$log"
else
  echo "\$ compute-sanitizer --tool memcheck planted oob" >>"$log"
  timeout 300 "$CS" --tool memcheck --error-exitcode 99 "$work/planted" oob >>"$log" 2>&1
  rc=$?
  if [[ $rc -eq 99 ]] && grep -q 'Invalid __global__ write' "$log"; then verdict=PASS; else verdict=FAIL; fi
  record "control: memcheck catches a planted out-of-bounds write" "$rc" "$(summary_of "$log")" "$verdict" "$log"
  echo "\$ compute-sanitizer --tool racecheck planted race" >>"$log"
  timeout 300 "$CS" --tool racecheck --error-exitcode 99 "$work/planted" race >"$work/race.log" 2>&1
  rc=$?
  cat "$work/race.log" >>"$log"
  if [[ $rc -eq 99 ]] && grep -qiE 'race reported|hazard detected' "$work/race.log"; then verdict=PASS; else verdict=FAIL; fi
  record "control: racecheck catches a planted shared-memory race" "$rc" "$(summary_of "$work/race.log")" "$verdict" "$log"
fi

# --- 3. memcheck over the CUDA kernel tests ----------------------------------------------------------
# The cuda cases of the shared kernel suite and the CUDA-only tests (-k cuda matches both).
memcheck_args=(tests/test_cuda_kernels.py tests/test_kernels.py -m "not slow")
if [[ $QUICK -eq 1 ]]; then
  memcheck_args+=(-k "cuda and not (dtype1 or dtype2 or dtype3 or float64 or float16 or bfloat16)")
else
  memcheck_args+=(-k cuda)
fi
sanitize "memcheck: tests/test_cuda_kernels.py$([[ $QUICK -eq 1 ]] && echo ' (quick subset)')" memcheck \
  "$OUT/gpu-sanitizer-memcheck.log" "${memcheck_args[@]}"

# --- 4. racecheck and synccheck over the kernels with shared memory ----------------------------------
sanitize "racecheck: -k '$RACECHECK_K'" racecheck "$OUT/gpu-sanitizer-racecheck.log" \
  tests/test_cuda_kernels.py tests/test_kernels.py -m "not slow" -k "cuda and ($RACECHECK_K)"
sanitize "synccheck: -k '$RACECHECK_K'" synccheck "$OUT/gpu-sanitizer-synccheck.log" \
  tests/test_cuda_kernels.py tests/test_kernels.py -m "not slow" -k "cuda and ($RACECHECK_K)"

write_report
echo "compute_sanitizer.sh: $([[ $STATUS -eq 0 ]] && echo PASS || echo FAIL); report: $REPORT"
exit "$STATUS"
