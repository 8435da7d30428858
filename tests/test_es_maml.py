"""ES-MAML (`python/es_maml.py`) learns, its meta-gradients agree with MAML's, and `bench/meta_gradient.py` runs.

The scripts run in fresh interpreters with their smoke-run settings (`--quick`); the meta-gradient
checks import `python/es_maml.py` and compare its three meta-losses on a tiny task batch.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # the quick runs take ~5 s and ~20 s on 2 idle cores; a busy machine can be 10x slower
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEARNERS = ("ES-MAML (zo_kernels)", "MAML (TorchOpt)", "FO-MAML")
METHODS = ("(a) zo_kernels ES", "(a') zo_kernels ES", "(b) TorchOpt explicit MAML", "(c) TorchOpt implicit")


def _run(*args, hidden=(), tmp_path=None):
    """``python <args>`` from the repository root, one thread; the modules of ``hidden`` fail to import."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if hidden:  # a package of that name first on the path, as in tests/test_bench_run.py
        shadow = tmp_path / "hidden-modules"
        for name in hidden:
            (shadow / name).mkdir(parents=True)
            hide = f"raise ModuleNotFoundError(\"No module named '{name}' (hidden by a test)\", name='{name}')\n"
            (shadow / name / "__init__.py").write_text(hide)
        env["PYTHONPATH"] = str(shadow) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _es_maml():
    """``python/es_maml.py`` imported by path."""
    if "es_maml" not in sys.modules:
        spec = importlib.util.spec_from_file_location("es_maml", os.path.join(ROOT, "python", "es_maml.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["es_maml"] = module
        spec.loader.exec_module(module)
    return sys.modules["es_maml"]


def _table_rows(text, first_cell):
    """The cells of the markdown table rows whose first cell starts with ``first_cell``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return [row for row in rows if row[0].startswith(first_cell)]


@pytest.mark.slow
def test_es_maml_quick_lowers_the_post_adaptation_mse(tmp_path):
    out = tmp_path / "es_maml.md"
    result = _run(os.path.join("python", "es_maml.py"), "--quick", "--out", str(out))
    final = re.search(r"ES-MAML post-adaptation MSE: ([0-9.]+) -> ([0-9.]+) in 60 meta-steps", result.stdout)
    assert final, result.stdout
    start, end = float(final.group(1)), float(final.group(2))
    assert end < 0.95 * start, result.stdout  # 3.97 -> 3.4 measured (held-out tasks, after adaptation)
    steps = re.findall(r"meta-step +(\d+) +test MSE", result.stdout)
    assert steps == ["0", "20", "40", "60"], result.stdout
    text = out.read_text()
    for name in LEARNERS:
        (row,) = _table_rows(text, name)
        assert row[1] == f"{start:.3f}", row  # every learner starts from the same initialisation
        assert float(row[2]) > 0.0 and row[4].endswith(" s"), row
    (es,) = _table_rows(text, LEARNERS[0])
    assert float(es[2]) == end
    assert "RuntimeWarning" not in result.stderr, result.stderr  # the inner loop ran under vmap (batch_size)


@pytest.mark.slow
def test_es_maml_runs_without_torchopt(tmp_path):
    result = _run(os.path.join("python", "es_maml.py"), "--quick", "--meta-steps", "5", hidden=("torchopt",),
                  tmp_path=tmp_path)  # fmt: skip
    assert "MAML (TorchOpt) torchopt not installed" in result.stdout, result.stdout
    assert re.search(r"\| MAML \(TorchOpt\) +\| torchopt not installed", result.stdout), result.stdout
    assert re.search(r"ES-MAML post-adaptation MSE: [0-9.]+ -> [0-9.]+ in 5 meta-steps", result.stdout)


def test_meta_gradients_agree():
    torchopt = pytest.importorskip("torchopt")
    m = _es_maml()
    gen = torch.Generator().manual_seed(0)
    theta = m.init_params(gen).requires_grad_()
    tasks = m.sample_tasks(4, m.SHOTS, gen).tensors()

    def grad_of(meta_loss):
        theta.grad = None
        meta_loss(theta, *tasks).backward()
        return theta.grad.clone()

    maml = grad_of(m.maml_meta_loss(2, m.INNER_LR, torchopt))
    # TorchOpt's differentiable SGD is the same computation as adapt()'s torch.func.grad loop, backpropagated
    exact = grad_of(lambda p, xs, ys, xq, yq: m.task_losses(m.adapt(p, xs, ys, 2, m.INNER_LR), xq, yq).mean())
    torch.testing.assert_close(maml, exact)
    cos = torch.nn.functional.cosine_similarity
    assert cos(grad_of(m.fomaml_meta_loss(2, m.INNER_LR)), maml, dim=0) > 0.9
    # ES with N = 512 pairs in 1,761 dimensions: E[cos] ~ 1 / sqrt(1 + d / N) ~ 0.47 for a smooth loss
    torch.manual_seed(0)
    es = grad_of(m.es_meta_loss(2, m.INNER_LR, num_samples=512, sigma=0.01))
    assert cos(es, maml, dim=0) > 0.3
    assert grad_of(m.imaml_meta_loss(2, m.INNER_LR, 1.0, 5, torchopt)).isfinite().all()


@pytest.mark.slow
def test_meta_gradient_bench_quick_writes_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = _run(os.path.join("bench", "meta_gradient.py"), "--quick", "--out-dir", str(tmp_path))
    text = (tmp_path / "meta_gradient-cpu-quick.md").read_text()
    assert text in result.stdout
    for needle in ("- date:", "- device:", "torch ", "zo_kernels ", "torchopt ", "- mode: quick", "Measured in"):
        assert needle in text, needle
    for method in METHODS:
        rows = _table_rows(text.split("## Growth")[0], method)
        assert [row[1] for row in rows] == ["1", "3"], rows  # --quick: k in {1, 3}
        for row in rows:
            assert re.fullmatch(r"[0-9.,]+ (ms|s)", row[2]), row
            assert re.fullmatch(r"[0-9.,]+ MiB", row[3]), row
        (growth,) = _table_rows(text.split("## Growth")[1], method)
        assert re.fullmatch(r"[0-9.,]+x", growth[1]), growth  # time k=3 / k=1
        assert growth[-1] == "n/a" or growth[-1].startswith(("yes", "no")), growth
    png = (tmp_path / "meta_gradient-cpu-quick.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
