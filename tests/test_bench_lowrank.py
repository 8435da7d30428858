"""`bench/lowrank.py --quick` (the low-rank section of `make bench`) prints every row, target and profile.

The run hides torchopt and torcheggroll (a package of that name first on the path that fails to
import, as in tests/test_bench_run.py): their rows say "not installed", the targets against them
are left unchecked, everything else is measured. `--gpu-dry-run` runs the GPU section's code on
the CPU at tiny sizes, so that code is exercised without a GPU.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "lowrank.py")
TIMEOUT_S = 60  # the quick run takes about 10 s on 2 cores; slack for a busy machine
HIDDEN = ("torchopt", "torcheggroll")
TIME = re.compile(r"^\d[\d,.]* (ms|s)$")
CPU_ROWS = (
    "zo_kernels Normal(), loop",
    "zo_kernels Normal(), batch_size=4",
    "zo_kernels LowRank(1), batch_size=8",
    "batched inference",
)
GPU_ROWS = ("zo_kernels Normal(), batch_size=8", "zo_kernels LowRank(1), batch_size=16", "batched inference")


def _run(tmp_path, *args, hidden=HIDDEN):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    shadow = tmp_path / "hidden-modules"
    for name in hidden:
        (shadow / name).mkdir(parents=True)
        hide = f"raise ModuleNotFoundError(\"No module named '{name}' (hidden by a test)\", name='{name}')\n"
        (shadow / name / "__init__.py").write_text(hide)
    if hidden:
        env["PYTHONPATH"] = str(shadow) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _section(text, heading):
    """The text of the section whose ``## `` heading starts with ``heading``, up to the next ``## ``."""
    start = text.index(f"\n## {heading}") + 1
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _rows(section):
    """The cells of the first markdown table in ``section`` (without header and separator)."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    table = []
    for line in lines[2:]:
        if set(line) <= set("|-"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lowrank")
    out = tmp / "lowrank-quick.md"
    return _run(tmp, "--quick", "--gpu-dry-run", "--out", str(out)), out


@pytest.mark.slow
def test_quick_run_prints_every_row_with_the_baselines_hidden(quick):
    result, out = quick
    text = out.read_text()
    assert text.strip() in result.stdout  # the report is printed and written
    for needle in ("- date:", "- device [cpu]:", "torch ", "zo_kernels ", "python ", "CPU use by other processes"):
        assert needle in text
    assert "torcheggroll not installed" in text and "torchopt not installed" in text  # the versions line
    for heading in ("1. CPU: MLP", "2. CPU: GPT-style model"):
        rows = _rows(_section(text, heading))
        labels = [row[0] for row in rows]
        for label in CPU_ROWS:
            mine = [row for row in rows if row[0].startswith(label)]
            assert mine, f"{heading}: no row {label!r} in {labels}"
            assert all(TIME.match(row[2]) for row in mine), mine  # measured
        assert [row[2] for row in rows if row[0].startswith("TorchOpt")] == ["torchopt not installed"]
        assert [row[2] for row in rows if row[0].startswith("torcheggroll")] == ["torcheggroll not installed"]
    mlp_labels = [row[0] for row in _rows(_section(text, "1. CPU: MLP"))]
    assert "zo_kernels LowRank(1), loop" in mlp_labels
    gpu = _section(text, "3. GPU: GPT-style model")
    assert "DRY RUN" in gpu
    gpu_rows = _rows(gpu)
    for label in GPU_ROWS:
        assert any(row[0].startswith(label) and TIME.match(row[2]) for row in gpu_rows), (label, gpu_rows)
    assert not any(row[0].startswith(("TorchOpt", "torcheggroll")) for row in gpu_rows)


@pytest.mark.slow
def test_targets_are_marked_and_the_hidden_baseline_is_not_checked(quick):
    _, out = quick
    rows = _rows(_section(out.read_text(), "Targets"))
    assert len(rows) == 3 + 3 + 2, rows  # mlp, gpt, gpu
    for section, what, measured, _, met in rows:
        if "torcheggroll" in what:
            assert measured == "–" and met == "not checked (torcheggroll not installed)", (section, what, met)
        else:
            assert met in ("met", "NOT met"), (section, what, met)
            assert re.fullmatch(r"\d+\.\d\dx|\d+%", measured), measured
    assert {row[0] for row in rows} == {"mlp", "gpt", "gpu"}


@pytest.mark.slow
def test_profile_of_a_lowrank_step_is_listed(quick):
    _, out = quick
    text = out.read_text()
    for key in ("mlp", "gpt", "gpu"):
        section = text.split(f"### Where a LowRank(1) step's time goes [{key}]", 1)[1]
        rows = _rows(section)
        assert len(rows) >= 5, (key, rows)
        assert any(row[0].startswith("aten::") for row in rows), rows


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note of a machine without a GPU")
def test_gpu_section_without_a_gpu_is_skipped_with_a_note(tmp_path):
    out = tmp_path / "gpu.md"
    _run(tmp_path, "--quick", "--sections", "gpu", "--out", str(out), hidden=())
    text = out.read_text()
    assert "GPU section (3.) not run: torch.cuda.is_available() is False" in text
    assert "## 3." not in text
