"""The examples in python/ run to completion: each in a fresh interpreter, a few steps, with a timeout."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 60


def run_example(script, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "python", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def check(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def losses(stdout):
    return [float(v) for v in re.findall(r"\bloss (-?[0-9.]+(?:e[-+]?[0-9]+)?)", stdout)]


@pytest.mark.slow
def test_mezo_finetune_runs_and_prints_a_finite_loss():
    result = run_example("mezo_finetune.py", "--device", "cpu", "--steps", "20", "--print-every", "10")
    check(result)
    values = losses(result.stdout)
    assert len(values) >= 3, result.stdout  # the initial held-out loss and the reports at steps 10 and 20
    assert all(0.0 < v < 10.0 for v in values), result.stdout
    assert "steps/s" in result.stdout and "peak memory" in result.stdout, result.stdout
    assert re.search(r"held-out loss: [0-9.]+ -> [0-9.]+", result.stdout), result.stdout


@pytest.mark.slow
def test_demo_runs_and_prints_a_finite_loss():
    result = run_example("demo.py", "--device", "cpu", "--steps", "5")
    check(result)
    values = losses(result.stdout)
    assert values, result.stdout
    assert all(0.0 <= v < 10.0 for v in values), result.stdout
    assert "time per step" in result.stdout, result.stdout
