"""bench/harness.py's pieces: tables, numbers, header, timing, problems, progress, and the spawned workers."""

import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))  # once: the spawned workers import harness and this module too
import harness  # noqa: E402


def test_table_is_github_markdown_with_dashes_and_escaped_pipes():
    lines = harness.table(["a", "long header"], [["x|y", ""], ["1", "→"]])
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["a", "long header"]
    assert set(lines[1]) <= {"|", "-"}
    assert "x\\|y" in lines[2] and "–" in lines[2] and "→" in lines[3]
    assert all(line.startswith("| ") or line.startswith("|-") for line in lines)


def test_rows_table_takes_the_fields_in_order():
    from dataclasses import dataclass

    @dataclass
    class Row:
        first: str
        second: str = ""

    lines = harness.rows_table(("one", "two"), [Row("a"), Row("b", "c")])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells == [["a", "–"], ["b", "c"]]


def test_number_formats():
    assert harness.fmt_ms(0.0123) == "12.3 ms" and harness.fmt_ms(12.0) == "12.0 s"
    assert harness.fmt_time(0.000512) == "0.512 ms" and harness.fmt_time(0.25) == "250 ms"
    assert harness.fmt_ratio(2.0) == "2.00x" and harness.fmt_overhead(1.5, 1.0) == "+50%"
    assert harness.fmt_bytes(None) == "" and harness.fmt_bytes(0) == "0 B" and harness.fmt_bytes(2048) == "2.0 KiB"
    assert harness.fmt_mib(3 * 2**20) == "3.0 MiB" and harness.fmt_mem(2**19) == "0.5 MiB"
    assert harness.verdict([("a", True), ("b", False)]) == "NO: b" and harness.verdict([("a", True)]) == "yes"


def test_header_lines():
    lines = harness.header("title", [("date", "today"), ("", "a note")])
    assert lines == ["# title", "", "- date: today", "- a note", ""]
    assert harness.versions(None).startswith(f"torch {torch.__version__}, zo_kernels ")
    assert "torchopt not installed" in harness.versions(None)


def test_cpu_time_is_the_time_per_call_and_keeps_the_threads():
    threads = torch.get_num_threads()
    seconds = harness.cpu_time(lambda: time.sleep(0.002), max_run_time=0.3)
    assert 0.0015 < seconds < 0.05
    assert torch.get_num_threads() == threads


def test_problems():
    torch.manual_seed(0)
    linear, mlp = harness.make_problem("linear"), harness.make_problem("mlp")
    assert linear.numel == 2049 and mlp.numel == 264_970
    wide = harness.wide_mlp(16, torch.device("cpu"))
    assert wide.numel == harness.wide_mlp_numel(16) and torch.equal(wide.x, harness.wide_mlp(16, torch.device("cpu")).x)
    params, loss = harness.mlp((6, 4, 2), torch.device("cpu"))
    assert loss(params, torch.randn(3, 6), torch.randn(3, 2)).ndim == 0
    harness.grad_step(linear, linear.loss)()  # autograd: writes every .grad
    harness.check_grads(linear, "autograd")
    with pytest.raises(RuntimeError, match="missing or non-finite"):
        harness.check_grads(mlp, "nothing ran")


def test_progress_bar_on_stderr(capsys):
    bar = harness.Progress(2)
    bar.show("first")
    bar.advance()
    bar.close()
    err = capsys.readouterr().err
    assert "] " in err and "/2" in err and "first" in err


def _build(device, numel, fail=False):
    """A memory job's build for the test: a step that allocates ``numel`` float32 (or raises)."""
    if fail:
        raise ValueError("planted failure")
    params = [torch.zeros(numel, device=device)]

    def step():
        torch.ones(numel, device=device).add_(1.0)

    return step, params


@pytest.mark.slow
def test_memory_jobs_in_fresh_processes_and_failures_reported():
    jobs = [
        harness.MemoryJob(_build, dict(numel=1 << 20)),
        harness.MemoryJob(_build, dict(numel=10, fail=True)),
    ]
    ok, failed = harness.run_memory_jobs(jobs, at_once=1, timeout_s=120)
    assert ok["params"] == 4 << 20 and ok["numel"] == 1 << 20 and ok["peak"] >= ok["params"]
    assert ok["method"].startswith("VmHWM")
    assert "planted failure" in failed["error"]
