"""Helpers that tools/sanitize_cpu.sh runs inside the sanitized process (LD_PRELOADed libasan).

- As a pytest plugin (``-p sanitize_check``): before any test runs, refuse to go on unless the
  process really tests the sanitized extension: the ASan runtime is mapped, ``zo_kernels._C`` is
  the one staged under ``$ZO_SANITIZE_SITE`` (not the dev install's in-place build) and the cpu
  backend is available (else tests/test_cpu_kernels.py would skip and pass vacuously).
- ``python sanitize_check.py overflow``: the negative control. Writes 32 bytes through
  ``zo_kernels._C.philox_words`` into a 16-byte ``malloc`` block; a process running an
  instrumented ``_C`` under ASan aborts with ``heap-buffer-overflow``. Exiting normally means the
  module is not instrumented (or ASan is not active), and the script fails.
- ``python sanitize_check.py openmp``: runs the kernels on inputs large enough to wake the OpenMP
  team (the test suite's small tensors run on the calling thread) and checks them against the
  PyTorch reference, so the parallel regions run under the sanitizers too.
- ``python sanitize_check.py ubsan LIB``: calls ``zo_ub_add(INT_MAX, 1)`` from LIB (a one-line
  library the script builds with the same flags as ``_C``); UBSan must abort the process.
"""

from __future__ import annotations

import ctypes
import os
import sys


def _asan_runtime() -> str:
    """The path of the ASan runtime mapped into this process, or '' when there is none."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            path = line.split()[-1]
            if "libasan" in os.path.basename(path) or "libclang_rt.asan" in os.path.basename(path):
                return path
    return ""


def _staged_extension():
    """Import zo_kernels._C and return (module, problem): problem is '' when it is the staged, sanitized one."""
    site = os.environ.get("ZO_SANITIZE_SITE", "")
    if not site:
        return None, "ZO_SANITIZE_SITE is not set (run tools/sanitize_cpu.sh, not this module)"
    if not _asan_runtime():
        return None, "the ASan runtime is not loaded in this process (LD_PRELOAD of libasan missing?)"
    from zo_kernels import _C, backends

    path = os.path.realpath(_C.__file__)
    if not path.startswith(os.path.realpath(site) + os.sep):
        return None, f"zo_kernels._C was imported from {path}, not from the sanitized staging dir {site}"
    if backends.available()["cpu"] != "available":
        return None, f"the cpu backend is not available: {backends.available()['cpu']}"
    return _C, ""


def pytest_configure(config) -> None:
    """Stop the session before any test when it would not test the sanitized _C."""
    import pytest

    ext, problem = _staged_extension()
    if problem:
        raise pytest.UsageError(f"sanitize_check: {problem}")


def pytest_report_header(config):
    """Name the sanitized module and the runtime in pytest's header."""
    from zo_kernels import _C

    return [f"sanitized zo_kernels._C: {_C.__file__}", f"ASan runtime: {_asan_runtime()}"]


def _overflow() -> int:
    ext, problem = _staged_extension()
    if problem:
        print(f"sanitize_check overflow: {problem}", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None)  # malloc resolves to ASan's interceptor (LD_PRELOAD), so the block has redzones
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    buf = libc.malloc(16)
    print("sanitize_check overflow: writing 2 Philox blocks (32 bytes) into a 16-byte block", flush=True)
    ext.philox_words(buf, 2, 1, 0, 0)
    print("sanitize_check overflow: NOT CAUGHT: the out-of-bounds write went unnoticed", flush=True)
    return 3


def _openmp() -> int:
    ext, problem = _staged_extension()
    if problem:
        print(f"sanitize_check openmp: {problem}", file=sys.stderr)
        return 2
    import torch

    from zo_kernels import backends
    from zo_kernels.ops import reference

    torch.set_num_threads(2)
    cpu = backends.get("cpu")
    n, seed, offset = (1 << 18) + 77, 1234, 5  # 2 * 2**16 values and more: both threads get work
    ids = torch.tensor([0, 7, 2**32 - 1])
    weights = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    scales = torch.tensor([[0.5, -0.5], [1.0, -1.0], [2.0, -2.0]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {"rtol": 1e-5, "atol": 1e-5}
        for stream in reference.STREAMS:
            theta = torch.randn(n, dtype=torch.float64).to(dtype)
            out, ref = torch.empty_like(theta), torch.empty_like(theta)
            cpu.perturb(out, theta, stream, seed, 7, -0.5, offset)
            reference.perturb(ref, theta, stream, seed, 7, -0.5, offset)
            torch.testing.assert_close(out.double(), ref.double(), **tol)
            rows, keep = torch.empty(6, n, dtype=dtype), torch.empty(3, n)
            cpu.perturb_rows(rows, theta, stream, seed, ids, scales, offset, keep=keep)
            torch.testing.assert_close(keep[1], cpu.sample(stream, seed, 7, offset, n), rtol=0, atol=0)
            reference.perturb(ref, theta, stream, seed, 7, -1.0, offset)
            torch.testing.assert_close(rows[3].double(), ref.double(), **tol)
            expected = reference.combine(weights, ids, stream, seed, offset, n, dtype)
            grad = torch.zeros(n, dtype=dtype)
            cpu.reduce(grad, weights, ids, stream, seed, offset)
            torch.testing.assert_close(grad.double(), expected.double(), **tol)
            cpu.step(theta, weights, ids, stream, seed, 0.5, offset)
            norms = cpu.squared_norms(stream, seed, ids, n)
            torch.testing.assert_close(norms, reference.squared_norms(stream, seed, ids, n), rtol=1e-6, atol=1e-6)
    print(
        f"sanitize_check openmp: perturb, perturb_rows, reduce, step, squared_norms on n={n}, "
        f"{torch.get_num_threads()} threads, _C.OPENMP={ext.OPENMP}"
    )
    return 0


def _ubsan(lib: str) -> int:
    if not _asan_runtime():
        print("sanitize_check ubsan: the ASan runtime is not loaded in this process", file=sys.stderr)
        return 2
    add = ctypes.CDLL(lib).zo_ub_add
    add.restype, add.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    print("sanitize_check ubsan: computing INT_MAX + 1", flush=True)
    print(f"sanitize_check ubsan: NOT CAUGHT: INT_MAX + 1 returned {add(2**31 - 1, 1)}", flush=True)
    return 3


def main(argv: list) -> int:
    """Dispatch the command-line modes (see the module docstring)."""
    if len(argv) == 2 and argv[1] == "overflow":
        return _overflow()
    if len(argv) == 2 and argv[1] == "openmp":
        return _openmp()
    if len(argv) == 3 and argv[1] == "ubsan":
        return _ubsan(argv[2])
    print("usage: sanitize_check.py overflow | openmp | ubsan LIB", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
