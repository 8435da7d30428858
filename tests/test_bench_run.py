"""`bench/run.py --quick` (the smoke run of `make bench`) writes its report and three valid PNG plots.

It also runs without the optional torchopt, evotorch, torcheggroll and matplotlib (as on a GPU machine
without a package registry): their cells say so, the other ratios are still measured, the plots are
skipped. The peers' step functions of `bench/baselines.py` are checked where their package is installed.
"""

import importlib.util
import os
import re
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150  # the quick run takes about 30 s on 2 idle cores (100 s seen on a busy one)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASELINES = ("(a) TorchOpt", "(b) plain PyTorch", "(c) MeZO", "(d) EvoTorch", "(e) torcheggroll")
#: Optional baseline -> its package and what its cells say where that is missing.
OPTIONAL = {
    "(a) TorchOpt": ("torchopt", "torchopt not installed"),
    "(d) EvoTorch": ("evotorch", "evotorch not installed"),
    "(e) torcheggroll": ("torcheggroll", "torcheggroll not installed"),
}
HIDDEN = ("torchopt", "evotorch", "torcheggroll", "matplotlib")
PLOTS = ("time-vs-samples", "time-vs-params", "memory-vs-params")


def _quick(out_dir, hidden=()):
    """``bench/run.py --quick`` into ``out_dir``; the modules of ``hidden`` fail to import, as if not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if hidden:  # a package of that name first on the path (the memory workers inherit it too)
        shadow = out_dir / "hidden-modules"
        for name in hidden:
            (shadow / name).mkdir(parents=True)
            hide = f"raise ModuleNotFoundError(\"No module named '{name}' (hidden by a test)\", name='{name}')\n"
            (shadow / name / "__init__.py").write_text(hide)
        env["PYTHONPATH"] = str(shadow) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--out-dir", str(out_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    return out_dir, _quick(out_dir)


def summary_rows(text):
    """The rows of the summary table (the first markdown table after its heading)."""
    section = text.split("## Summary: ratios against the baselines", 1)[1]
    rows = []
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]  # without the header and the separator


@pytest.mark.slow
def test_report_has_a_ratio_row_for_each_baseline(quick_run):
    out_dir, result = quick_run
    reports = sorted(out_dir.glob("summary-*-quick.md"))
    assert len(reports) == 1, sorted(p.name for p in out_dir.iterdir())
    text = reports[0].read_text()
    for needle in ("- date:", "- device [cpu]:", "torch ", "zo_kernels ", "torchopt ", "python "):
        assert needle in text
    rows = summary_rows(text)
    assert rows
    for baseline in BASELINES:
        mine = [row for row in rows if row[1].startswith(baseline)]
        assert mine, f"no summary row for {baseline}"
        package, missing = OPTIONAL.get(baseline, (None, ""))
        for row in mine:
            if package is None or _installed(package):
                assert re.fullmatch(r"\d+\.\d\dx", row[8]), row  # the speed-up column: a measured ratio
            else:  # an optional baseline this environment lacks (make test does not install requirements-bench.txt)
                assert row[6] == missing and row[8] == "–", row
    assert any(re.fullmatch(r"\d+\.\d\dx", row[11]) for row in rows)  # some memory ratios too
    assert "## Summary: ratios against the baselines" in result.stdout  # the same table is printed
    assert "] " in result.stderr and "/" in result.stderr  # the progress bar


@pytest.mark.slow
def test_plots_are_non_empty_valid_pngs(quick_run):
    out_dir, _ = quick_run
    for name in PLOTS:
        paths = list(out_dir.glob(f"summary-*-quick-{name}.png"))
        assert len(paths) == 1, name
        data = paths[0].read_bytes()
        assert data[:8] == PNG_SIGNATURE
        length, chunk = struct.unpack(">I4s", data[8:16])
        assert chunk == b"IHDR" and length == 13
        width, height = struct.unpack(">II", data[16:24])
        assert width > 200 and height > 200
        assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")
        assert len(data) > 10_000  # a drawn figure, not a blank canvas
        report = out_dir / paths[0].name.replace(f"-{name}.png", ".md")
        assert f"({paths[0].name})" in report.read_text()  # the report shows the plot


@pytest.mark.slow
def test_quick_run_without_the_optional_packages(tmp_path):
    result = _quick(tmp_path, hidden=HIDDEN)
    text = (tmp_path / "summary-cpu-quick.md").read_text()
    versions = next(line for line in text.splitlines() if line.startswith("- versions:"))
    assert "evotorch not installed, torcheggroll not installed, zo_kernels " in versions
    assert versions.endswith(", torchopt not installed, python " + versions.rsplit("python ", 1)[1])
    rows = summary_rows(text)
    for baseline, (_, missing) in OPTIONAL.items():  # cells that say why, no ratio
        mine = [row for row in rows if row[1].startswith(baseline)]
        assert mine and all(row[6] == missing and row[8] == "–" for row in mine), mine
        params = [row for row in mine if row[3] == "params"]
        assert params and all(row[9] == missing and row[11] == "–" for row in params), params
    for baseline in ("(b) plain PyTorch", "(c) MeZO"):  # everything else is still measured
        mine = [row for row in rows if row[1].startswith(baseline)]
        assert mine and all(re.fullmatch(r"\d+\.\d\dx", row[8]) for row in mine), mine
    skip_note = "- Not measured here: torchopt not installed, evotorch not installed, torcheggroll not installed"
    assert skip_note in text and skip_note in result.stdout  # the note under the summary table
    assert "Plots not drawn: matplotlib not installed." in text
    assert not list(tmp_path.glob("*.png"))


def _installed(package):
    return importlib.util.find_spec(package) is not None


def _bench_module(name):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _quadratic(params, target):
    return sum(((p - t) ** 2).sum() for p, t in zip(params, target))


def test_torch_matmul_baseline_estimates_the_gradient():
    import torch

    baselines = _bench_module("baselines")
    params = (torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True))
    target = (torch.zeros(3, 4), torch.ones(5))
    loss = baselines.torch_matmul_step(_quadratic, params, target, num_samples=20_000, sigma=1e-2)
    assert torch.allclose(loss, _quadratic([p.detach() for p in params], target))
    for p, t in zip(params, target):
        assert torch.allclose(p.grad, 2 * (p.detach() - t), atol=0.15, rtol=0.05)


def test_mezo_baseline_restores_and_steps_along_minus_the_gradient():
    import torch

    baselines = _bench_module("baselines")
    params = [torch.randn(3, 4), torch.randn(5)]
    target = [torch.zeros(3, 4), torch.ones(5)]
    start = [p.clone() for p in params]
    baselines.MeZO(params, lr=0.0, eps=1e-3, num_samples=4).step(_quadratic, target)
    for p, s in zip(params, start):
        assert torch.allclose(p, s, atol=1e-5)  # +eps z, -2 eps z, +eps z: back where it started
    mezo = baselines.MeZO(params, lr=1e-3, eps=1e-3, num_samples=2000)
    mezo.step(_quadratic, target)
    moved = torch.cat([(p - s).reshape(-1) for p, s in zip(params, start)])
    expected = -1e-3 * torch.cat([2 * (s - t).reshape(-1) for s, t in zip(start, target)])
    assert torch.nn.functional.cosine_similarity(moved, expected, dim=0) > 0.95


def test_evotorch_pgpe_baseline_follows_the_raw_antithetic_estimate():
    """PGPE with raw fitness and no optimizer moves its center by ``-lr * g``, ``g`` the antithetic ES gradient."""
    pytest.importorskip("evotorch")
    import torch

    baselines = _bench_module("baselines")
    torch.manual_seed(0)
    params = (torch.randn(3, 4), torch.randn(5))
    target = (torch.zeros(3, 4), torch.ones(5))
    start = torch.cat([p.reshape(-1) for p in params])
    pgpe = baselines.EvoTorchPGPE(
        baselines.import_evotorch(), _quadratic, params, target, num_samples=20_000, sigma=1e-2, lr=1e-3
    )
    assert torch.equal(pgpe.center, start)  # the first step only sampled and evaluated
    pgpe.step()
    moved = torch.as_tensor(pgpe.center) - start
    expected = -1e-3 * torch.cat([2 * (p - t).reshape(-1) for p, t in zip(params, target)])
    assert torch.nn.functional.cosine_similarity(moved, expected, dim=0) > 0.99
    assert 0.9 < float(moved.norm() / expected.norm()) < 1.1  # -lr * g: the scale of ZOSGD(lr)'s update


def test_torcheggroll_baseline_steps_downhill():
    pytest.importorskip("torcheggroll")
    import torch

    baselines = _bench_module("baselines")
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 3)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    weight = module.weight.detach().clone()
    step = baselines.torcheggroll_step(
        baselines.import_optional("torcheggroll"), module, x, torch.nn.functional.mse_loss, y,
        num_samples=64, sigma=0.05, lr=0.02,
    )  # fmt: skip
    fitness = [step() for _ in range(30)]  # mean fitness = -loss of the population
    assert fitness[-1] > fitness[0]
    assert torch.equal(module.weight, weight)  # the helper trains a copy: the module itself is untouched
