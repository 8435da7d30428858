#!/usr/bin/env bash
# Everything GPU-side in one call, on a machine with a CUDA GPU (e.g. through the device tool):
# build the extensions in place, run the whole test suite (GPU tests included, no interpreter),
# then the GPU benchmark. Results land in $OUT (default bench/results/).
#
#   bash bench/gpu_all.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_device.txt"

# Build in place (no package registry needed): _C, and _C_cuda with nvcc; a failed build is an error here.
ZO_KERNELS_BUILD_CUDA=1 ZO_KERNELS_REQUIRE_NATIVE=1 $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5
$PY -c "import zo_kernels, json; print(json.dumps(zo_kernels.backends.available(), indent=1))" | tee "$OUT/gpu_backends.txt"

# The whole suite with real GPU kernels (TRITON_INTERPRET unset).
env -u TRITON_INTERPRET $PY -m pytest -q -rs tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -20

env -u TRITON_INTERPRET $PY bench/gpu_kernels.py "$@" --out "$OUT/gpu.md"
