"""bench/gpu_kernels.py without a GPU: its report functions on a fake sass.json and fake timings, and its
measuring code (baselines included) on CPU tensors with a fake meter."""

import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
try:
    import gpu_kernels as gk
finally:
    sys.path.pop(0)

N, n = gk.TARGET_POINT
ELEMENTS = N * n


def _entry(backend, stream, bound, dtype="float32", op="reduce"):
    return dict(backend=backend, op=op, stream=stream, dtype=dtype, kernel=f"{backend}_{op}", registers=40, spills=0,
                instructions_per_element=3.345e13 / bound, bound_per_s=bound)  # fmt: skip


FAKE_SASS = {
    "issue_rate": 3.345e13,
    "kernels": [
        _entry("cuda", "normal", 4.6e11),
        _entry("cuda", "rademacher", 2.0e12),
        _entry("triton", "normal", 4.0e11),
        _entry("triton", "normal", 4.4e11),  # a second autotune variant: the higher bound counts
        _entry("cuda", "normal", 9e11, op="step"),  # another op: never used for reduce
    ],
}


def _ms(rate):
    """Milliseconds of a reduce at the target point that runs at ``rate`` elements/s."""
    return ELEMENTS / rate * 1e3


def _results():
    """Fake numbers at the target point: cuda normal at 90% of its bound and 0.95x the baseline, triton
    normal at 1.2x cuda's time; cuda rademacher at 80% of its bound but 6x the baseline; triton
    rademacher without a SASS entry and at 2x cuda's time."""
    normal, rademacher = gk.Case(N, n, "float32", "normal"), gk.Case(N, n, "float32", "rademacher")
    cuda_n = _ms(0.9 * 4.6e11)
    cuda_r = _ms(0.8 * 2.0e12)
    res = gk.ReduceResults()
    res.kernels[normal] = {"cuda": gk.Timing("cuda", cuda_n, 0), "triton": gk.Timing("triton", 1.2 * cuda_n, 1024)}
    res.kernels[rademacher] = {"cuda": gk.Timing("cuda", cuda_r, 0), "triton": gk.Timing("triton", 2 * cuda_r, 0)}
    res.baselines[normal] = gk.Timing("randn(26, n) + addmv_", 0.95 * cuda_n, 26 * n * 4)
    res.baselines[rademacher] = gk.Timing("bernoulli_(0.5) (26, n)·2−1 + addmv_", 6 * cuda_r, 26 * n * 4)
    return res


def _rows(lines):
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_sass_bound_matches_backend_op_stream_dtype_and_takes_the_best_variant():
    assert gk.sass_bound(FAKE_SASS, "triton", "reduce", "normal", "float32") == (4.4e11, 2)
    assert gk.sass_bound(FAKE_SASS, "cuda", "reduce", "normal", "float32") == (4.6e11, 1)
    assert gk.sass_bound(FAKE_SASS, "cuda", "reduce", "normal", "bfloat16") is None
    assert gk.sass_bound(None, "cuda", "reduce", "normal", "float32") is None


def test_load_sass_missing_or_broken_says_so(tmp_path):
    data, line = gk.load_sass(tmp_path / "sass.json")
    assert data is None and gk.NO_SASS in line and "not found" in line
    (tmp_path / "sass.json").write_text("{not json")
    data, line = gk.load_sass(tmp_path / "sass.json")
    assert data is None and "unreadable" in line
    (tmp_path / "sass.json").write_text(json.dumps(FAKE_SASS))
    data, line = gk.load_sass(tmp_path / "sass.json")
    assert data == FAKE_SASS and "5 kernels" in line and "3.345e+13" in line


def test_reduce_table_computes_every_ratio_and_target():
    lines, targets = gk.reduce_report(_results(), FAKE_SASS)
    rows = {(r["stream"], r["backend"]): r for r in _rows(lines)}
    assert len(rows) == 4

    cuda_n = rows["normal", "cuda"]
    assert cuda_n["% of SASS bound"] == "90%"
    assert cuda_n["speed vs baseline"] == "0.95x"
    assert cuda_n["peak mem ours"] == "0 B" and cuda_n["peak mem baseline"] == "991.8 MiB"
    assert cuda_n["triton / cuda time"] == "–"
    assert "≥ 85% of SASS bound: met (90%)" in cuda_n["targets (N = 1024, n = 1e7)"]
    assert "≥ 0.9x baseline: met (0.95x)" in cuda_n["targets (N = 1024, n = 1e7)"]
    assert "O(n) memory (≤ 4n bytes): met (0 B)" in cuda_n["targets (N = 1024, n = 1e7)"]

    triton_n = rows["normal", "triton"]
    assert triton_n["% of SASS bound"] == f"{0.9 * 4.6e11 / 1.2 / 4.4e11:.0%} (best of 2)"
    assert triton_n["triton / cuda time"] == "1.20x"
    assert "≤ 1.5x cuda time: met (1.20x)" in triton_n["targets (N = 1024, n = 1e7)"]
    assert "baseline" not in triton_n["targets (N = 1024, n = 1e7)"]  # the speed targets are the default backend's
    assert "NOT met" in triton_n["targets (N = 1024, n = 1e7)"]  # 78% of its bound

    cuda_r = rows["rademacher", "cuda"]
    assert cuda_r["% of SASS bound"] == "80%"
    assert "≥ 85% of SASS bound: NOT met (80%)" in cuda_r["targets (N = 1024, n = 1e7)"]
    assert "≥ 5x baseline: met (6.00x)" in cuda_r["targets (N = 1024, n = 1e7)"]

    triton_r = rows["rademacher", "triton"]
    assert triton_r["% of SASS bound"] == gk.NO_SASS
    assert f"not checked ({gk.NO_SASS})" in triton_r["targets (N = 1024, n = 1e7)"]
    assert "≤ 1.5x cuda time: NOT met (2.00x)" in triton_r["targets (N = 1024, n = 1e7)"]

    summary = gk.target_summary(targets)
    assert summary[0] == "Targets at N = 1024, n = 1e7: 8 met, 3 NOT met, 1 not checked."
    assert len(summary) == 1 + len(targets) == 13


def test_rows_off_the_target_point_have_no_targets_and_failures_are_shown():
    case = gk.Case(256, 10**6, "bfloat16", "normal")
    res = gk.ReduceResults()
    res.kernels[case] = {"cuda": gk.Timing("cuda", 0.5, 0), "triton": gk.Timing("triton", note="FAILED: boom")}
    res.baselines[case] = gk.Timing("", note="not run: N·n > 1e10")
    lines, targets = gk.reduce_report(res, None)
    rows = _rows(lines)
    assert not targets
    assert rows[0]["targets (N = 1024, n = 1e7)"] == "–" and rows[0]["% of SASS bound"] == gk.NO_SASS
    assert rows[0]["baseline time"] == "not run: N·n > 1e10"
    assert rows[1]["time"] == "FAILED: boom"


class FakeMeter:
    """Runs each call once; every call 'takes' 1 ms and allocates nothing."""

    def __init__(self):
        self.calls = 0

    def ms(self, fn):
        fn()
        self.calls += 1
        return 1.0

    def peak(self, fn):
        fn()
        return 0


@pytest.mark.parametrize("stream", gk.STREAMS)
def test_baselines_add_one_sample_of_the_right_noise(stream):
    grad = torch.zeros(200_000)
    for label, fn in gk.baseline_candidates(stream, grad, torch.ones(1)):
        grad.zero_()
        fn()
        if stream == "rademacher":
            assert set(grad.unique().tolist()) == {-1.0, 1.0}, label
            assert abs(grad.mean().item()) < 0.02, label
        else:
            assert abs(grad.mean().item()) < 0.02 and abs(grad.std().item() - 1) < 0.02, label
    bf16 = torch.zeros(1000, dtype=torch.bfloat16)
    gk.baseline_candidates(stream, bf16, torch.ones(3))[0][1]()  # accumulates in float32, adds once
    assert bf16.abs().max() > 0


def test_chunks_hold_at_most_a_gibibyte():
    assert gk.chunk_rows(1024, 10**7) == 26 and gk.chunk_rows(4, 10**7) == 4 and gk.chunk_rows(8, 10**9) == 1


def test_measuring_and_reporting_run_on_cpu_tensors():
    cases = [gk.Case(5, 3000, dtype, stream) for dtype in gk.DTYPES for stream in gk.STREAMS]
    meter = FakeMeter()
    names = [name for name in ("reference", "cpu") if gk.backends.available()[name] == "available"]
    res = gk.measure_reduce(cases, names, torch.device("cpu"), meter, lambda _: None)
    assert set(res.kernels) == set(cases)
    for case in cases:
        assert all(t.ms == 1.0 for t in res.kernels[case].values()), res.kernels[case]
        assert res.baselines[case].ms == 1.0 and res.baselines[case].label
    lines, _ = gk.reduce_report(res, None)
    assert len(lines) == 2 + len(names) * len(cases)

    models = {"tiny MLP": ((6, 4, 2), 8)}
    steps = gk.measure_steps(models, (3,), torch.device("cpu"), meter, lambda _: None)
    assert [s.method for s in steps] == list(gk.METHODS)
    for s in steps:
        assert s.ours.ms == 1.0 and s.params == 6 * 4 + 4 + 4 * 2 + 2
        assert (s.plain.ms is not None) == (s.method == "antithetic")
        assert s.torchopt.ms == 1.0 or s.torchopt.note == "torchopt not installed"
    table = gk.step_report(steps)
    assert len(table) == 2 + 3 and "antithetic only" in table[2]
    data = gk.results_json(res, steps)
    assert len(data["reduce"]) == (len(names) + 1) * len(cases) and len(data["step"]) == 3
    json.dumps(data)


def test_the_whole_script_runs_dry_on_the_cpu(tmp_path, capsys):
    (tmp_path / "sass.json").write_text(json.dumps(FAKE_SASS))
    assert gk.main(["--cpu-dry-run", "--out", str(tmp_path / "gpu.md"), "--sass", str(tmp_path / "sass.json")]) == 0
    text = (tmp_path / "gpu.md").read_text()
    assert "DRY RUN" in text and "SASS bounds: " in text and "5 kernels" in text
    assert "## 1. reduce" in text and "## 2. gradient step" in text and "Measured in" in text
    names = [name for name in ("reference", "cpu") if gk.backends.available()[name] == "available"]
    rows = [line for line in text.splitlines() if re.match(r"\|\s*8\s*\|\s*5e3\s*\|", line)]
    assert len(rows) == len(names) * len(gk.DTYPES) * len(gk.STREAMS)  # a row per backend and case
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["contender"] for r in data["reduce"]} >= {"cpu", "baseline"} and len(data["step"]) == 3
    assert "## 1. reduce" in capsys.readouterr().out


def test_main_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gk.main(["--quick"])
