"""bench/gpu_all.sh's stage machinery, with a fake `python` and `nvidia-smi` first on PATH (no GPU needed).

The fake python pretends a GPU is there, fails the build, hangs in the CUDA kernel tests, fails the
other GPU tests and passes everything else, so one run shows: a failing or timed-out stage never
stops the later ones, every stage leaves its log, summary.txt has one line per stage.
"""

import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_all.sh")
STAGES = [
    "device", "build", "backends", "sass", "tests-cuda", "tests-triton", "tests-gpu", "bench-gpu", "run-quick",
    "lowrank-gpu", "memory-gpu",
]  # fmt: skip
BUDGET_S = 360  # the stage timeouts add up to at most this (the device tool call: timeout_s=420 with start-up)
LINE = re.compile(r"^(\d\d)  (\S+) +(ok|FAILED rc=\d+|TIMEOUT after \S+ s|SKIPPED \(no GPU\)) +(\d+\.\d) s$")

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in for python: what gpu_all.sh's stages call, answered without torch or a GPU.
echo "fake python $*"
case "$*" in
  *"-m pip --version"*) echo "pip 0 (fake)"; exit 0 ;;
  *"-m pip install"*) echo "fake build error"; exit 3 ;;
  *"setup.py build_ext"*) echo "fake build error again"; exit 4 ;;
  *test_cuda_kernels.py*) sleep 30; exit 0 ;;
  *"-m gpu"*) echo "1 failed, 2 passed"; exit 1 ;;
  *"-m pytest"*) echo "3 passed"; exit 0 ;;
  *sass_report.py*) echo '{"kernels": []}' >"$OUT/sass.json"; exit 0 ;;
  *bench/reduce_kernels.py*) echo "# fake report, $*" >"$OUT/gpu.md"; exit 0 ;;
  *find_spec*) exit 0 ;;
  *"-c "*is_available*) echo "torch.cuda.is_available(): $FAKE_CUDA"; [[ $FAKE_CUDA == True ]]; exit ;;
esac
exit 0
"""


def _fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", "#!/usr/bin/env bash\necho 'fake GPU 0'\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _run(tmp_path, *stages, cuda="True"):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT", "GPU_ALL_SHARDS")}
    env.update(
        PATH=f"{_fake_bin(tmp_path)}{os.pathsep}{env.get('PATH', '')}",
        OUT=str(out),
        GPU_ALL_MAX_TIMEOUT="1",
        GPU_ALL_SHARDS="2",
        FAKE_CUDA=cuda,
    )
    result = subprocess.run(["bash", SCRIPT, *stages], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = (out / "summary.txt").read_text().splitlines() if (out / "summary.txt").exists() else []
    return result, out, lines


def _statuses(lines):
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    return {m.group(2): m.group(3) for m in parsed}


def test_failures_and_timeouts_do_not_stop_later_stages(tmp_path):
    result, out, lines = _run(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(lines) == len(STAGES), lines
    assert [LINE.match(line).group(1) for line in lines] == [f"{k:02d}" for k in range(1, len(STAGES) + 1)]
    assert _statuses(lines) == {
        "device": "ok",
        "build": "FAILED rc=4",
        "backends": "ok",
        "sass": "ok",
        "tests-cuda": "TIMEOUT after 1 s",
        "tests-triton": "ok",
        "tests-gpu": "FAILED rc=1",
        "bench-gpu": "ok",
        "run-quick": "ok",
        "lowrank-gpu": "ok",
        "memory-gpu": "ok",
    }
    for k, name in enumerate(STAGES, 1):
        log = (out / f"{k:02d}-{name}.log").read_text()
        assert log.startswith(f"=== [{k:02d} {name}]"), log
        assert re.search(rf"=== \[{k:02d} {name}\] .* in \d+\.\d s$", log.strip()), log  # its wall time
    build = (out / "02-build.log").read_text()  # the output is in the log
    assert "fake build error" in build and "pip install -e . failed (rc=3)" in build and "error again" in build
    assert f"--sass {out / 'sass.json'}" in (out / "gpu.md").read_text()  # the bounds of the sass stage
    for k in range(2):  # the sharded stage: a log per shard, and each shard's tail in the stage log
        assert "3 passed" in (out / f"06-tests-triton.shard{k}.log").read_text()
    assert "--- shard 1/2: exit 0" in (out / "06-tests-triton.log").read_text()
    assert result.stdout.rstrip().endswith("\n".join(lines))  # the summary is printed last


def test_without_a_gpu_the_gpu_stages_are_skipped_with_a_note(tmp_path):
    result, out, lines = _run(tmp_path, cuda="False")
    assert result.returncode == 1
    statuses = _statuses(lines)
    assert list(statuses) == STAGES
    assert statuses["device"] == "FAILED rc=1" and statuses["backends"] == "ok"
    gpu_stages = ("build", "sass", "tests-cuda", "tests-triton", "tests-gpu", "bench-gpu", "run-quick", "lowrank-gpu",
                  "memory-gpu")  # fmt: skip
    for name in gpu_stages:
        assert statuses[name] == "SKIPPED (no GPU)"
    assert "no CUDA device" in (out / "02-build.log").read_text()


def test_named_stages_only_and_unknown_stage_refused(tmp_path):
    result, out, lines = _run(tmp_path, "backends", "bench-gpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _statuses(lines) == {"backends": "ok", "bench-gpu": "ok"}
    assert sorted(p.name for p in out.glob("*.log")) == ["03-backends.log", "08-bench-gpu.log"]
    result, _, _ = _run(tmp_path / "again", "no-such-stage")
    assert result.returncode == 2 and "unknown stage 'no-such-stage'" in result.stderr


def test_shard_bounds_cover_every_item_once():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import pytest_shard
    finally:
        sys.path.pop(0)
    for total in (0, 1, 7, 100):
        for count in (1, 3, 8):
            kept = [i for k in range(count) for i in range(*pytest_shard.shard_bounds(total, k, count))]
            assert kept == list(range(total))
    assert pytest_shard.shard_spec("2/8") == (2, 8)
    with pytest.raises(ValueError):
        pytest_shard.shard_spec("8/8")


def test_stage_timeouts_fit_the_budget():
    text = open(SCRIPT).read()
    calls = re.findall(r"^(?:gpu_)?stage ([a-z-]+) (\d+) ", text, flags=re.M)
    assert [name for name, _ in calls] == STAGES
    total = sum(int(limit) for _, limit in calls)
    assert total <= BUDGET_S, calls
    assert f"the timeouts add up to {total} s" in text  # the header says so
    for k, (name, limit) in enumerate(calls, 1):  # and lists each stage with its timeout
        assert re.search(rf"^#   {k:02d} {re.escape(name)} +{limit}  ", text, flags=re.M), name
