"""Every Triton kernel variant the launchers can produce compiles for sm_90 with Triton's own compiler.

No GPU needed: ``tools/triton_variants.py`` compiles each variant for an explicit target
and reads ``ptxas -v``. The interpreter accepts code the compiler rejects, so this is where a kernel
that only runs in CI's interpreter would first fail. The compilation runs in a subprocess without
``TRITON_INTERPRET`` (this session set it before zo_kernels was imported), its processes in
parallel; run with ``-s`` to see the table of registers, spills and the sample loop's barriers.
The variants the launchers really request are recorded here, in the interpreter, and must be
exactly those ``variants()`` enumerates.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from zo_kernels.ops.triton.backend import load_backend

TRITON, WHY = load_backend()
pytestmark = pytest.mark.skipif(TRITON is None, reason=f"triton backend: {WHY}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the development tools are not part of the package
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Registers per thread, by op and stream, with headroom over what sm_90 needs today (normal
# 29-48; rademacher reduce 46-70, 130-160 for float64 with its 32 double sums; perturb 32-124,
# perturb_rows with two signs up to ~180 for float64): a regression past these costs occupancy,
# and shows here first.
REGISTER_CAPS = {
    ("perturb", "normal"): 64, ("perturb_rows", "normal"): 64, ("reduce", "normal"): 64, ("step", "normal"): 64,
    ("reduce_partial", "normal"): 64, ("perturb", "rademacher"): 160, ("perturb_rows", "rademacher"): 224,
    ("reduce", "rademacher"): 176, ("step", "rademacher"): 176, ("reduce_partial", "rademacher"): 176,
    ("reduce_finish", None): 64, ("step_finish", None): 64, ("squared_norms", "normal"): 64,
    ("philox_blocks", None): 48,
    # The low-rank tiles (64 x 64 on 8 warps): 104-130 registers (float64 perturb 130), accumulate
    # 128-144; past 128 an SM holds one program instead of two, so these caps only catch a blow-up.
    ("lowrank_perturb", None): 160, ("lowrank_accumulate", None): 176,
}  # fmt: skip
#: The GEMM kernels (kernels/triton/lowrank.py): their K loop stages the factor tiles through shared
#: memory between barriers by design, so only the sample loops are held to no BAR/STS/LDS.
GEMM_OPS = ("lowrank_perturb", "lowrank_accumulate")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The rows of ``triton_variants.report()``, compiled in a fresh interpreter without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("triton-compile") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "triton_variants.py"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if not out.exists():
        pytest.fail(f"triton_variants failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print("\n" + proc.stdout)  # the table (pytest -s)
    return json.loads(out.read_text())


# ptxas may keep a kernel at 64 registers (eight blocks an SM) and spill a predicate or two
# instead: seen once, 4 bytes, in the epilogue of an unaligned (scalar-access) half-precision
# reduce, after the sample loop. That much is tolerated there; anything in a loop, or more, is not.
# A stack frame without spills is libdevice's: Triton 3.6 keeps the Payne-Hanek table of sin/cos
# (a path never taken here) in 32 bytes of local memory.
SMALL_SPILL = 8


def test_every_variant_compiles_without_spills(report):
    assert len(report) >= 100
    failed = {r["name"]: r["error"] for r in report if r["error"]}
    assert not failed, failed
    allowed = {r["name"]: SMALL_SPILL if r["align"] == 1 else 0 for r in report}
    spilling = {
        r["name"]: (r["spill_stores"], r["spill_loads"], r["stack"])
        for r in report
        if max(r["spill_stores"], r["spill_loads"]) > allowed[r["name"]]
    }
    assert not spilling, spilling
    assert not {r["name"]: r["loop_local"] for r in report if r.get("loop_local")}, "local memory in a hot loop"
    # The GEMM kernels are held to none at all: no spill, no stack frame, at either alignment.
    gemm = {r["name"]: (r["spill_stores"], r["spill_loads"], r["stack"]) for r in report if r["op"] in GEMM_OPS}
    assert len(gemm) == 16 and all(r.get("loop_instructions") for r in report if r["op"] in GEMM_OPS)
    assert not {name: spills for name, spills in gemm.items() if any(spills)}, gemm


def test_registers_stay_under_their_caps(report):
    over = {r["name"]: (r["registers"], REGISTER_CAPS[(r["op"], r["stream"])]) for r in report
            if r["registers"] > REGISTER_CAPS[(r["op"], r["stream"])]}  # fmt: skip
    assert not over, over


def test_no_block_barrier_or_shared_memory_in_the_sample_loops(report):
    loops = [r for r in report if "loop_barriers" in r and r["op"] not in GEMM_OPS]
    assert {r["op"] for r in loops} == {"reduce", "step", "reduce_partial", "reduce_finish", "step_finish"}
    assert all(r["loop_instructions"] > 0 for r in loops)
    synced = {r["name"]: (r["loop_barriers"], r["loop_shared"]) for r in loops
              if r["loop_barriers"] or r["loop_shared"]}  # fmt: skip
    assert not synced, synced


def test_accurate_transcendentals_only(report):
    assert not {r["name"]: r["approx"] for r in report if r["approx"]}


class _Recorder:
    """Stands in for a kernel: records each launch's pointer types, constexprs and warps, then launches."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen
        fn = kernel.fn
        self.params = fn.__code__.co_varnames[: fn.__code__.co_argcount]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import triton_variants

            types = {**triton_variants.POINTER_TYPES, torch.int64: "*i64"}
            pointers = {p: types[a.dtype] for p, a in zip(self.params, args) if isinstance(a, torch.Tensor)}
            consts = {k: str(v) for k, v in kwargs.items() if k not in ("num_warps", "enable_fp_fusion")}
            self.seen.add(_key(self.kernel.fn.__name__, pointers, consts, kwargs["num_warps"]))
            assert kwargs["enable_fp_fusion"] is True
            return self.kernel[grid](*args, **kwargs)

        return launch


def _key(kernel, pointers, consts, warps):
    return kernel, tuple(sorted(pointers.items())), tuple(sorted((k, str(v)) for k, v in consts.items())), warps


def _launch_everything(ops):
    """Every launcher with every dtype, stream, sign count, step flag, split and alignment."""
    for dtype in DTYPES:
        for n, offset in ((16, 32), (5, 3)):  # 16-byte aligned, and not
            theta = torch.randn(n).to(dtype)
            for stream in (0, 1):
                ops.perturb(torch.empty_like(theta), theta, stream, 1, 2, 0.5, offset)
                for signs in (1, 2):
                    out = torch.empty(3 * signs, n, dtype=dtype)
                    ops.perturb_rows(out, theta, stream, 1, torch.arange(3), torch.ones(3, signs, dtype=torch.float64),
                                     offset)  # fmt: skip
                for lr in (None, 0.5):
                    for splits in (1, 2):
                        weights = torch.ones(4, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                        ops.accumulate(theta.clone(), weights, torch.arange(4), stream, 1, offset, lr, splits)
    ops.squared_norms(torch.arange(2), 0, 1, 10)
    ops.philox_blocks(0, 3, 0, 0, 1, torch.device("cpu"))


def _launch_lowrank(lowrank):
    """Both low-rank launchers with every dtype, rows of 16 bytes' multiple (vector loads) and not."""
    for dtype in DTYPES:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for n in (16, 5):
            theta, a, b = torch.randn(3, n).to(dtype), torch.randn(3, 2), torch.randn(n, 2)
            lowrank.lowrank_perturb(torch.empty_like(theta), theta, a, b, 0.5)
            lowrank.lowrank_accumulate(theta, a, b, torch.ones(2, dtype=acc), 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the launches in the interpreter (CPU tensors)")
def test_variants_are_exactly_what_the_launchers_launch(monkeypatch):
    import triton_variants

    from zo_kernels.ops.triton import lowrank, ops

    expected = {_key(v.fn.__name__, dict(v.pointers), dict(v.constexprs), v.num_warps)
                for v in triton_variants.variants()}  # fmt: skip
    seen = set()
    for name in ("_perturb_kernel", "_accumulate_kernel", "_finish_kernel", "_squared_norms_kernel", "_words_kernel"):
        monkeypatch.setattr(ops, name, _Recorder(getattr(ops, name), seen))
    monkeypatch.setattr(lowrank, "_lowrank_kernel", _Recorder(lowrank._lowrank_kernel, seen))
    _launch_everything(ops)
    _launch_lowrank(lowrank)
    assert seen - expected == set(), "launched but not enumerated (so never compiled by the tests above)"
    assert expected - seen == set(), "enumerated but not reachable from the launchers"
