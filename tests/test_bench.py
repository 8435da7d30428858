"""One smoke run of each benchmark script in bench/ (its ``--quick`` mode), and what the baselines compute.

Each script runs once, in a fresh process as ``make bench`` runs it, into a temporary directory; the check is
that it finishes and writes a report with every row it promises (the numbers of a quick run mean nothing).
``bench/lowrank.py`` runs with torchopt and torcheggroll hidden (a package of that name first on the path that
fails to import), so the "not installed" rows are exercised too, and with ``--gpu-dry-run`` (the GPU section's
code on the CPU). ``bench/meta_gradient.py`` has its smoke run in tests/test_es_maml.py. The time limit is a
hang guard only: a quick run takes under a minute on 2 idle cores, several on busy ones.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 1200
RATIO = re.compile(r"^\d[\d,]*\.\d\dx$")


def run_script(tmp_path, script, *args, hidden=()):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in hidden:  # the memory workers inherit the path too
        (tmp_path / "hidden" / name).mkdir(parents=True)
        (tmp_path / "hidden" / name / "__init__.py").write_text(f"raise ModuleNotFoundError(name={name!r})\n")
    if hidden:
        env["PYTHONPATH"] = str(tmp_path / "hidden") + os.pathsep + env["PYTHONPATH"]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert done.returncode == 0, f"{script}: exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def rows(text, heading):
    """The cells of the first markdown table after the line ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    table = [line for line in lines[next(k for k, line in enumerate(lines) if line.startswith("|")):]]
    table = table[: next((k for k, line in enumerate(table) if not line.startswith("|")), len(table))]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def installed(name):
    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
def test_run_quick(tmp_path):
    """``make bench``'s summary: a ratio row per baseline and point, or the reason it is missing; the plots."""
    done = run_script(tmp_path, "run.py", "--out-dir", str(tmp_path))
    text = (tmp_path / "summary-cpu-quick.md").read_text()
    table = rows(text, "## Summary: ratios against the baselines")
    missing = {"(a)": "torchopt", "(d)": "evotorch", "(e)": "torcheggroll"}
    for baseline in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        mine = [row for row in table if row[1].startswith(baseline)]
        assert len(mine) == 4, (baseline, table)  # 2 points of the N sweep, 2 of the parameter sweep
        package = missing.get(baseline)
        if package is None or installed(package):
            assert all(RATIO.match(row[8]) for row in mine), mine
            assert all(RATIO.match(row[11]) for row in mine if row[3] == "params"), mine
        else:
            assert all(row[6] == f"{package} not installed" and row[8] == "–" for row in mine), mine
    assert "## Summary: ratios against the baselines" in done.stdout and "## Data behind the plots" in text
    if installed("matplotlib"):
        for plot in ("time-vs-samples", "time-vs-params", "memory-vs-params"):
            png = (tmp_path / f"summary-cpu-quick-{plot}.png").read_bytes()
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000 and f"-{plot}.png)" in text


@pytest.mark.slow
def test_lowrank_quick_without_the_optional_baselines(tmp_path):
    run_script(tmp_path, "lowrank.py", "--gpu-dry-run", "--out", str(tmp_path / "lowrank.md"),
               hidden=("torchopt", "torcheggroll"))  # fmt: skip
    text = (tmp_path / "lowrank.md").read_text()
    for heading in ("## 1. CPU: MLP", "## 2. CPU: GPT-style model", "## 3. GPU: GPT-style model (DRY RUN"):
        table = rows(text, heading)
        measured = [row[0] for row in table if re.match(r"^\d[\d,.]* m?s$", row[2])]
        assert any(label.startswith("zo_kernels LowRank(1), batch_size=") for label in measured), table
        assert any(label.startswith("zo_kernels Normal()") for label in measured), table
        assert any(label.startswith("batched inference") for label in measured), table
        assert all(row[2] in ("torchopt not installed", "torcheggroll not installed") for row in table
                   if row[0].startswith(("TorchOpt", "torcheggroll"))), table  # fmt: skip
    targets = rows(text, "\n## Targets\n")
    assert [row[0] for row in targets] == ["mlp"] * 3 + ["gpt"] * 3 + ["gpu"] * 2, targets
    for _, what, _, _, met in targets:
        expected = ("not checked (torcheggroll not installed)",) if "torcheggroll" in what else ("met", "NOT met")
        assert met in expected, (what, met)


@pytest.mark.slow
def test_scale_quick(tmp_path):
    run_script(tmp_path, "scale.py", "--out", str(tmp_path / "scale.md"))
    table = rows((tmp_path / "scale.md").read_text(), "- section 3 method")
    sections = {row[0].split(" [")[0].split(":")[0] for row in table}
    assert sections == {"0. cost per evaluation", "1. step time", "2. peak memory of one step", "3. distributed"}
    assert not [row for row in table if "FAILED" in row[2]], table
    overhead = [row for row in table if row[0].startswith("0.")]  # one plain evaluation, loop, batched, TorchOpt
    assert len(overhead) == 3 + installed("torchopt") and all(row[2].endswith(" µs") for row in overhead), overhead
    step = [row for row in table if row[0].startswith("1.")]
    assert len(step) == 3 * 3 + 2  # per method: TorchOpt, Normal, Rademacher; batched: 2 batch sizes
    assert any("bytes rank 0 of 2 sends" in row[1] for row in table)


@pytest.mark.slow
def test_memory_quick(tmp_path):
    """The three perturbation modes in both dtypes: 'inplace' refused in bfloat16, 'on_use' judged on its targets."""
    run_script(tmp_path, "memory.py", "--out", str(tmp_path / "memory.md"))
    table = rows((tmp_path / "memory.md").read_text(), "- step:")
    assert [(row[1], row[2]) for row in table] == [
        (dtype, mode) for dtype in ("float32", "bfloat16") for mode in ("copy", "inplace", "on_use")
    ]
    for row in table:
        if (row[1], row[2]) == ("bfloat16", "inplace"):
            assert row[5].startswith("refused"), row
        else:
            assert row[5].endswith(" MiB") and row[6].endswith(" ms") and RATIO.match(row[7]), row
        assert ("yes" in row[8] or "NO" in row[8]) == (row[2] == "on_use"), row


@pytest.mark.slow
def test_reduce_kernels_quick(tmp_path):
    run_script(tmp_path, "reduce_kernels.py", "--out", str(tmp_path / "cpu.md"))
    text = (tmp_path / "cpu.md").read_text()
    table = rows(text, "- timing")
    assert [(row[3], row[4]) for row in table] == [("normal", "cpu"), ("rademacher", "cpu")], table
    assert all(RATIO.match(row[10]) and RATIO.match(row[12]) for row in table), table
    assert re.search(r"Targets at N = 8, n = 1e5: [01] met, [01] NOT met, 0 not checked", text), text
    assert (tmp_path / "cpu.json").exists()


# --- what the baselines compute (bench/harness.py), as bench/README.md says ------------------------


def _quadratic(params, target):
    return sum(((p - t) ** 2).sum() for p, t in zip(params, target))


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    return harness


def test_plain_pytorch_and_mezo_baselines_estimate_the_gradient(harness):
    params = (torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True))
    target = (torch.zeros(3, 4), torch.ones(5))
    loss = harness.torch_matmul_step(_quadratic, params, target, num_samples=20_000, sigma=1e-2)
    assert torch.allclose(loss, _quadratic([p.detach() for p in params], target))
    for p, t in zip(params, target):
        assert torch.allclose(p.grad, 2 * (p.detach() - t), atol=0.15, rtol=0.05)
    plain = [p.detach().clone() for p in params]
    start = [p.clone() for p in plain]
    harness.MeZO(plain, lr=0.0, eps=1e-3, num_samples=4).step(_quadratic, target)
    assert all(torch.allclose(p, s, atol=1e-5) for p, s in zip(plain, start))  # +eps z, -2 eps z, +eps z
    harness.MeZO(plain, lr=1e-3, eps=1e-3, num_samples=2000).step(_quadratic, target)
    moved = torch.cat([(p - s).reshape(-1) for p, s in zip(plain, start)])
    expected = -1e-3 * torch.cat([2 * (s - t).reshape(-1) for s, t in zip(start, target)])
    assert torch.nn.functional.cosine_similarity(moved, expected, dim=0) > 0.95


def test_evotorch_pgpe_follows_the_raw_antithetic_estimate(harness):
    """PGPE with raw fitness and no optimizer moves its center by ``-lr * g``, as ``ZOSGD(lr)`` does."""
    evotorch = harness.optional("evotorch")
    if evotorch is None:
        pytest.skip("evotorch not installed (requirements-bench.txt)")
    params, target = (torch.randn(3, 4), torch.randn(5)), (torch.zeros(3, 4), torch.ones(5))
    start = torch.cat([p.reshape(-1) for p in params])
    pgpe = harness.EvoTorchPGPE(evotorch, _quadratic, params, target, num_samples=20_000, sigma=1e-2, lr=1e-3)
    assert torch.equal(pgpe.center, start)  # the first step only sampled and evaluated
    pgpe.step()
    moved = torch.as_tensor(pgpe.center) - start
    expected = -1e-3 * torch.cat([2 * (p - t).reshape(-1) for p, t in zip(params, target)])
    assert torch.nn.functional.cosine_similarity(moved, expected, dim=0) > 0.99
    assert 0.9 < float(moved.norm() / expected.norm()) < 1.1


def test_torcheggroll_baseline_steps_downhill_on_a_copy(harness):
    torcheggroll = pytest.importorskip("torcheggroll")
    module, x, y = torch.nn.Linear(6, 3), torch.randn(32, 6), torch.randn(32, 3)
    weight = module.weight.detach().clone()
    step = harness.torcheggroll_step(torcheggroll, module, x, torch.nn.functional.mse_loss, y, num_samples=64,
                                     sigma=0.05, lr=0.02)  # fmt: skip
    fitness = [step() for _ in range(30)]  # mean fitness = -loss of the population
    assert fitness[-1] > fitness[0] and torch.equal(module.weight, weight)
