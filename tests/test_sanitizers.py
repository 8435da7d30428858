"""Native code checks: the C++ CPU kernels under ASan + UBSan, and the GPU sanitizer script.

tools/sanitize_cpu.sh builds zo_kernels._C with -fsanitize=address,undefined into a build directory
of its own (never the dev install's in-place .so) and runs the CPU kernel tests against it with
libasan preloaded. Its self-checks must trip (an out-of-bounds write through the sanitized _C is
caught, a signed overflow aborts), so an uninstrumented build cannot pass. About two minutes on
two cores. tools/compute_sanitizer.sh runs compute-sanitizer on a GPU machine; here only its shell
is checked, and that it refuses cleanly where it cannot run.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_SCRIPT = os.path.join(ROOT, "tools", "sanitize_cpu.sh")
GPU_SCRIPT = os.path.join(ROOT, "tools", "compute_sanitizer.sh")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def sanitized_run(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not (os.path.isabs(libasan) and os.path.exists(libasan)):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime (-print-file-name=libasan.so gave {libasan!r})")
    # A build directory of this run's own: a concurrent `make sanitize` keeps build/sanitize.
    build = tmp_path_factory.mktemp("sanitize")
    env = _clean_env(PYTHON=sys.executable, ZO_SANITIZE_BUILD=str(build))
    result = subprocess.run(["bash", CPU_SCRIPT], capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    output = result.stdout + result.stderr
    if result.returncode == 77:
        pytest.skip(output.strip().splitlines()[-1])
    return result.returncode, output


@pytest.mark.slow
def test_cpu_kernel_tests_pass_under_asan_and_ubsan(sanitized_run):
    rc, output = sanitized_run
    assert rc == 0, f"tools/sanitize_cpu.sh failed (exit {rc}):\n{output[-12000:]}"
    assert output.rstrip().endswith("sanitize_cpu: PASS"), output[-4000:]
    summary = re.findall(r"^(\d+) passed", output, flags=re.M)
    assert summary and int(summary[-1]) >= 300, f"too few tests ran under the sanitizers:\n{output[-4000:]}"
    assert not re.search(r"\b\d+ failed\b|^FAILED", output, flags=re.M), output[-4000:]
    assert "sanitize_cpu: openmp: PASS" in output
    assert "ERROR: AddressSanitizer" not in output.split("self-check UBSan: PASS")[-1]


@pytest.mark.slow
def test_the_instrumentation_self_checks_tripped(sanitized_run):
    rc, output = sanitized_run
    assert rc == 0, output[-12000:]
    assert re.search(r"instrumented: [1-9]\d* ASan and [1-9]\d* aborting UBSan entry points", output), output
    assert "self-check ASan: PASS (heap-buffer-overflow caught in _C's philox_words" in output, output
    assert "self-check UBSan: PASS (signed integer overflow aborted" in output, output


@pytest.mark.parametrize("script", [CPU_SCRIPT, GPU_SCRIPT], ids=os.path.basename)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [CPU_SCRIPT, GPU_SCRIPT], ids=os.path.basename)
def test_scripts_are_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_script_refuses_clearly_without_compute_sanitizer(tmp_path):
    # COMPUTE_SANITIZER names a missing file, so this never starts a run, even on a GPU machine.
    env = _clean_env(PYTHON=sys.executable, COMPUTE_SANITIZER=str(tmp_path / "none"), OUT=str(tmp_path))
    result = subprocess.run(["bash", GPU_SCRIPT], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot run here: compute-sanitizer not found" in result.stderr
    assert not (tmp_path / "gpu-sanitizer.md").exists()
