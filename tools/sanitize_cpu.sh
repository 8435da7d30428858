#!/usr/bin/env bash
# The C++ CPU kernels (zo_kernels._C) under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash tools/sanitize_cpu.sh [PYTEST ARGS...]      (make sanitize; CI: tests/test_sanitizers.py)
#
# 1. Builds _C with -DZO_SANITIZE=ON (-fsanitize=address,undefined -fno-omit-frame-pointer
#    -fno-sanitize-recover=all, see CMakeLists.txt) in build/sanitize/ ($ZO_SANITIZE_BUILD), never
#    touching the dev install's in-place zo_kernels/_C*.so.
# 2. Stages a copy of the Python package with that _C (and no _C_cuda) in build/sanitize/site/.
# 3. Runs, with libasan (and libubsan) LD_PRELOADed into the uninstrumented Python:
#    - self-checks that must abort: an out-of-bounds write through the staged _C itself
#      (heap-buffer-overflow) and a signed overflow in a one-line library built with _C's flags, so
#      a silently uninstrumented build or a missing runtime cannot pass;
#    - the kernels on inputs large enough to run the OpenMP team (tools/sanitize_check.py openmp);
#    - pytest on the tests that reach _C (default: the cpu cases of tests/test_kernels.py,
#      tests/test_cpu_kernels.py, and the cpu-backend
#      cases (-k cpu) of test_batched, test_zero_order, test_inplace, test_seed_gradient and
#      test_errors), with a plugin that refuses to run unless the process imports the staged,
#      sanitized _C. Extra arguments replace the default pytest arguments.
# Prints "sanitize_cpu: PASS" last on success. Exit status 77: no ASan runtime in the compiler
# (the caller may skip); any other non-zero status is a failure.
#
# Sanitizer options: ASAN_OPTIONS=detect_leaks=0 (CPython and torch keep their allocations at exit:
# noise, not our leaks), abort_on_error=1; UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1. Options
# you set in the environment are appended, so they win. No suppressions are needed (none are used).
# OpenMP: libgomp is not instrumented, which ASan tolerates (its pthread and malloc interceptors
# cover the worker threads); the openmp step runs the kernels on 2 threads to show it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
CXX=${CXX:-g++}
BUILD=${ZO_SANITIZE_BUILD:-$ROOT/build/sanitize}
JOBS=${ZO_SANITIZE_JOBS:-2}
SITE=$BUILD/site
SELF=$BUILD/selfcheck
say() { printf 'sanitize_cpu: %s\n' "$*"; }
die() { printf 'sanitize_cpu: FAIL: %s\n' "$*" >&2; exit 1; }

# --- the sanitizer runtimes ------------------------------------------------------------------------
command -v "$CXX" >/dev/null 2>&1 || { say "SKIP: no C++ compiler ($CXX)"; exit 77; }
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX" -print-file-name=libubsan.so)
if [[ "$LIBASAN" != /* || ! -e "$LIBASAN" ]]; then
  say "SKIP: $CXX has no AddressSanitizer runtime (-print-file-name=libasan.so gave '$LIBASAN'; gcc's libasan is needed)"
  exit 77
fi
LIBASAN=$(readlink -f "$LIBASAN")
PRELOAD=$LIBASAN
if [[ "$LIBUBSAN" == /* && -e "$LIBUBSAN" ]]; then
  PRELOAD="$PRELOAD:$(readlink -f "$LIBUBSAN")"
fi
say "compiler: $("$CXX" --version | head -n 1)"
say "LD_PRELOAD=$PRELOAD"

# --- 1. build ----------------------------------------------------------------------------------------
start=$SECONDS
PYBIND11_DIR=$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')
EXT_SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# cmake and ninja: the ones beside $PY (the venv's, from requirements-dev.txt), else those on PATH.
PYBIN=$(dirname "$(command -v "$PY")")
CMAKE=$PYBIN/cmake
[[ -x "$CMAKE" ]] || CMAKE=$(command -v cmake) || die "no cmake (pip install cmake)"
NINJA=$PYBIN/ninja
[[ -x "$NINJA" ]] || NINJA=$(command -v ninja || true)
GEN=()
if [[ ! -f "$BUILD/CMakeCache.txt" && -n "$NINJA" ]]; then
  GEN=(-G Ninja "-DCMAKE_MAKE_PROGRAM=$NINJA")
fi
mkdir -p "$BUILD/lib"
"$CMAKE" -S "$ROOT" -B "$BUILD" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$(command -v "$CXX")" \
  -DZO_SANITIZE=ON -DZO_BUILD_CUDA=OFF \
  -DZO_OUTPUT_DIR="$BUILD/lib" \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DPYTHON_EXT_SUFFIX="$EXT_SUFFIX" >"$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; die "cmake configure failed"; }
"$CMAKE" --build "$BUILD" --target _C --parallel "$JOBS" >"$BUILD/build.log" 2>&1 || { cat "$BUILD/build.log"; die "build failed"; }
SO="$BUILD/lib/_C$EXT_SUFFIX"
[[ -f "$SO" ]] || die "the build left no $SO"
say "built $SO in $((SECONDS - start)) s"

# The module must call into both runtimes, and UB must abort (-fno-sanitize-recover): only the
# *_abort UBSan handlers (plus the always-fatal unreachable/missing-return ones) may appear.
SYMS=$(nm -D --undefined-only "$SO" | awk '{print $NF}')
grep -q '^__asan_init' <<<"$SYMS" || die "$SO does not call the ASan runtime (not instrumented)"
grep -q '^__ubsan_handle_.*_abort' <<<"$SYMS" || die "$SO has no aborting UBSan handlers (not instrumented)"
RECOVER=$(grep '^__ubsan_handle_' <<<"$SYMS" | grep -v -e '_abort$' -e 'builtin_unreachable' -e 'missing_return' || true)
[[ -z "$RECOVER" ]] || die "$SO has recoverable UBSan handlers (UB would not abort): $RECOVER"
say "instrumented: $(grep -c '^__asan_' <<<"$SYMS") ASan and $(grep -c '^__ubsan_' <<<"$SYMS") aborting UBSan entry points"

# --- 2. stage the package ----------------------------------------------------------------------------
rm -rf "$SITE"
mkdir -p "$SITE"
tar -C "$ROOT" --exclude='*.so' --exclude='__pycache__' -cf - zo_kernels | tar -C "$SITE" -xf -
cp "$SO" "$SITE/zo_kernels/"
cp "$ROOT/tools/sanitize_check.py" "$SITE/"

# --- 3. run ------------------------------------------------------------------------------------------
export ZO_SANITIZE_SITE=$SITE
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# Runs "$@" from the staging dir (so `import zo_kernels` finds the staged copy first, before the
# dev install's editable finder) with the sanitizer runtimes preloaded.
sanitized() { (cd "$SITE" && env PYTHONPATH="$SITE" LD_PRELOAD="$PRELOAD" "$@"); }

# Self-check 1 (ASan, through the staged _C): must abort with heap-buffer-overflow in _C's code.
set +e
out=$(sanitized "$PY" sanitize_check.py overflow 2>&1)
rc=$?
set -e
if [[ $rc -eq 0 ]] || ! grep -q 'ERROR: AddressSanitizer: heap-buffer-overflow' <<<"$out" \
   || ! grep -q 'philox_words' <<<"$out"; then
  printf '%s\n' "$out" | tail -n 40
  die "self-check: an out-of-bounds write through the sanitized _C was not caught (exit $rc)"
fi
say "self-check ASan: PASS (heap-buffer-overflow caught in _C's philox_words, exit $rc)"

# Self-check 2 (UBSan): a signed overflow in a library built with the same flags must abort.
mkdir -p "$SELF"
printf '%s\n' 'extern "C" int zo_ub_add(int a, int b) { return a + b; }' >"$SELF/ub.cpp"
"$CXX" -O1 -g -shared -fPIC -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
  -o "$SELF/libub.so" "$SELF/ub.cpp" || die "cannot build the UBSan self-check library"
set +e
out=$(sanitized "$PY" sanitize_check.py ubsan "$SELF/libub.so" 2>&1)
rc=$?
set -e
if [[ $rc -eq 0 ]] || ! grep -q 'runtime error: signed integer overflow' <<<"$out"; then
  printf '%s\n' "$out" | tail -n 40
  die "self-check: a signed integer overflow under UBSan did not abort (exit $rc)"
fi
say "self-check UBSan: PASS (signed integer overflow aborted, exit $rc)"

# The OpenMP team at work (the tests' small tensors run on the calling thread).
sanitized "$PY" sanitize_check.py openmp || die "the kernels failed under the sanitizers on the OpenMP path"
say "openmp: PASS"

# The tests.
if [[ $# -eq 0 ]]; then
  set -- "$ROOT"/tests/test_{kernels,cpu_kernels,batched,zero_order,inplace,seed_gradient,errors}.py -k cpu
fi
start=$SECONDS
sanitized "$PY" -m pytest -p sanitize_check -p no:cacheprovider -q -rs --rootdir="$ROOT" "$@" \
  || die "pytest failed under the sanitizers (exit $?; an ASan/UBSan report above means a native bug)"
say "tests: PASS in $((SECONDS - start)) s"
say "PASS"
