"""Every backend's kernels against the PyTorch reference, on fresh random inputs: one suite, all backends.

Each test runs once per backend: ``reference`` and ``cpu`` on CPU tensors, ``triton`` on CUDA
tensors (or, without a GPU, on CPU tensors in Triton's interpreter, where sizes stay small), and
``cuda`` on a GPU (the ``gpu`` marker: skipped without one). What differs between backends is
data, not code: :data:`CONFIG` holds each one's sizes and layouts (the interpreter is slow; the
CUDA kernels have vector and scalar paths chosen by alignment). Backend-specific tests (thread
counts, streams, sample splits, workspaces) live in test_cpu_kernels.py, test_triton_kernels.py
and test_cuda_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from zo_kernels import backends
from zo_kernels.ops import reference

from helpers import assert_close, straddling_offset
from test_noise_reference import KAT

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OFFSETS = [0, 5, 2**31 + 3, 2**34 + 127]
SEEDS = [0, 1, 2**32 - 1, 2**32, 0xDEADBEEFCAFEF00D, 2**64 - 1]
INTERPRETED = not torch.cuda.is_available()  # conftest runs Triton in its interpreter then


@dataclass(frozen=True)
class Config:
    """One backend's inputs: sizes per operation, and the layouts its kernels must handle."""

    device: str
    sizes: List[int]  # perturb
    rows_sizes: List[int]  # perturb_rows
    reduce_sizes: List[int]
    norm_sizes: List[int]
    layouts: List[str]  # see place()
    rows: int  # samples of a perturb_rows batch
    norm_tol: Optional[float]  # squared_norms against the reference (None: assert_close's float64 default)
    marks: List = field(default_factory=list)
    # reduce/step: samples, learning rates, and the weights' dtypes ("float64" and/or the accumulation
    # dtype, as the estimator passes them); the interpreter gets fewer launches.
    reduce_num: int = 13
    lrs: Tuple[float, ...] = (0.5, 1.0, -2.0)
    weight_dtypes: Tuple[str, ...] = ("float64", "acc")


CPU_SIZES = [0, 1, 3, 127, 128, 129, 2047, 2049, 5000]
CONFIG: Dict[str, Config] = {
    "reference": Config(
        "cpu", CPU_SIZES, [0, 1, 129, 2049, 5000], CPU_SIZES, [0, 1, 2049, 10_000], ["random"], 5, None
    ),
    "cpu": Config("cpu", CPU_SIZES, [0, 1, 129, 2049, 5000], CPU_SIZES, [0, 1, 2049, 10_000], ["random"], 5, None),
    # 0, 1, odd, around a Rademacher block (128) and the tiles (normal 512, rademacher 4096; ops.CONFIGS),
    # multiples of 16 bytes (vector loads) and not; offsets straddling a tile boundary.
    "triton": Config(
        "cpu" if INTERPRETED else "cuda",
        [0, 1, 3, 127, 128, 129, 511, 513, 4095, 4097, 5000],
        [1, 129, 4104],
        [0, 1, 3, 129, 513, 4097, 5000],
        [0, 1, 513, 5000],
        ["straddle", "straddle-aligned"],
        3,
        1e-6,
        reduce_num=7,
        lrs=(0.5,),
        weight_dtypes=("acc",),
    ),
    "cuda": Config(
        "cuda",
        CPU_SIZES,
        [1, 129, 2049, 5000],
        CPU_SIZES,
        [0, 1, 2049, 10_000, 2 * 65536 + 77, 300_001],
        ["aligned", "shifted"],
        7,
        1e-6,
        [pytest.mark.gpu],
    ),  # fmt: skip
}


@dataclass
class Kernels:
    """A backend under test, with the device its tensors live on."""

    name: str
    backend: backends.Backend
    device: torch.device
    config: Config

    def put(self, values: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """``values`` on the device, in a contiguous view ``shift`` elements into a NaN-filled storage.

        shift = 1 misaligns the base pointer, so the CUDA kernels take their scalar path instead of
        the vectorized one for the interior groups.
        """
        storage = torch.full((values.numel() + shift + 1,), float("nan"), dtype=values.dtype, device=self.device)
        view = storage[shift : shift + values.numel()].view(values.shape)
        view.copy_(values)
        return view


def _get(name: str) -> Tuple[Optional[backends.Backend], str]:
    why = backends.available()[name]
    return (backends.get(name), why) if why == "available" else (None, why)


_REQUIRED = os.environ.get("ZO_KERNELS_REQUIRE_NATIVE") == "1"


@pytest.fixture
def kb(request) -> Kernels:
    """The backend named by the test's ``kb`` parameter; skipped (with the reason) where it is not available."""
    name = request.param
    backend, why = _get(name)
    if backend is None:
        if _REQUIRED and name == "cuda":  # the GPU jobs build it: its absence there is a failure
            pytest.fail(f"{name} backend: {why}")
        pytest.skip(f"{name} backend: {why}")
    return Kernels(name, backend, torch.device(CONFIG[name].device), CONFIG[name])


def over(names=tuple(CONFIG), **per_backend: Callable[[Config], list]):
    """Parametrize ``kb`` over ``names`` and, per keyword, over that backend's list of values."""
    keys = list(per_backend)
    params = []
    for name in names:
        combos = [()]
        for key in keys:
            combos = [c + (v,) for c in combos for v in per_backend[key](CONFIG[name])]
        for combo in combos:
            ident = "-".join([name] + [str(v) for v in combo])
            params.append(pytest.param(name, *combo, id=ident, marks=CONFIG[name].marks))
    return pytest.mark.parametrize(",".join(["kb"] + keys), params, indirect=["kb"])


COMPILED = ("cpu", "triton", "cuda")


def random_offset() -> int:
    return int(torch.randint(0, 2**33, ()).item())


def place(layout: str, n: int) -> Tuple[int, int]:
    """``(storage shift, offset)`` of a layout: 'random' offsets; Triton's tile-straddling ones; CUDA's
    'aligned' (vectorized path for every interior group) and 'shifted' (the scalar one, or for some
    offsets the vectorized one with a different head)."""
    if layout == "random":
        return 0, random_offset()
    if layout.startswith("straddle"):
        return 0, straddling_offset(n, aligned=layout.endswith("aligned"))
    offset = random_offset()
    return (0, offset - offset % 16) if layout == "aligned" else (1, offset)


# -- the generator and the streams ----------------------------------------------------------------


def _known_answer(kb: Kernels, ctr, key) -> Tuple[int, ...]:
    """One Philox4x32-10 block through the backend's own entry point (the four counter words free)."""
    if kb.name == "reference":
        words = reference.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
        return tuple(int(w) for w in words)
    if kb.name == "cpu":
        return tuple(kb.backend._C.philox4x32_10(*ctr, *key))
    if kb.name == "triton":
        words = kb.backend._ops.philox_blocks(
            ctr[0] | (ctr[1] << 32), 1, ctr[2], ctr[3], key[0] | (key[1] << 32), kb.device
        )
        return tuple(words[0].tolist())
    out = torch.zeros(4, dtype=torch.int32, device="cuda")
    kb.backend._C.philox4x32_10(out.data_ptr(), *ctr, *key, (out.device.index, torch.cuda.current_stream().cuda_stream))
    return tuple((out.cpu().to(torch.int64) & 0xFFFFFFFF).tolist())


@over()
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(kb, ctr, key, expected):
    assert _known_answer(kb, ctr, key) == expected


@over()
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sample,block0", [(0, 0), (7, 123), (2**32 - 1, 2**32 - 2), (99, 2**40 + 5)])
def test_uint32_stream_is_bit_exact(kb, seed, sample, block0):
    words = kb.backend.philox_words(seed, sample, block0, 64, kb.device)
    assert words.device.type == kb.device.type and words.dtype == torch.int64
    ref = reference.random_words(seed, torch.tensor([[sample]]), torch.arange(block0, block0 + 64)[None, :])[0]
    assert torch.equal(words.cpu(), ref)


@over()
@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", [1, 131, 4099])
def test_stream_values_match_the_reference(kb, stream, offset, n):
    seed = int(torch.randint(0, 2**62, ()).item()) | (2**63 if offset % 2 else 0)  # both halves of the range
    for sample_id in (3, 2**32 - 1) if n == 131 else (3,):
        got = kb.backend.sample(stream, seed, sample_id, offset, n, kb.device)
        assert got.dtype == torch.float32 and got.device.type == kb.device.type and got.shape == (n,)
        ref = reference.noise(stream, seed, torch.tensor([sample_id]), offset, n)[0]
        if stream == "rademacher":
            assert torch.equal(got.cpu(), ref)
        else:
            torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-6)


@over(("cpu", "triton", "cuda"))
def test_sample_defaults_to_the_backends_device(kb):
    got = kb.backend.sample("normal", 5, 1, 0, 10)
    assert got.device.type == kb.device.type
    assert torch.equal(got.cpu(), kb.backend.sample("normal", 5, 1, 0, 10, kb.device).cpu())


@over(("cpu", "cuda", "triton"))
def test_normal_tail_values_match_the_reference(kb):
    if kb.name == "triton" and INTERPRETED:
        pytest.skip("a million normals are too slow in Triton's interpreter")
    # A million normals reach |z| ~ 5, where the float32 rounding of log/sin/cos weighs the most.
    got = kb.backend.sample("normal", 2024, 11, 7, 1 << 20, kb.device).cpu()
    ref = reference.noise("normal", 2024, torch.tensor([11]), 7, 1 << 20)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    assert float(got.abs().max()) <= 5.8


# -- perturb ---------------------------------------------------------------------------------------


@over(n=lambda c: c.sizes, layout=lambda c: c.layouts)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_perturb(kb, dtype, n, stream, layout):
    theta_cpu = torch.randn(n, dtype=torch.float64).to(dtype)
    shift, offset = place(layout, n)
    theta = kb.put(theta_cpu, shift)
    out = kb.put(torch.full_like(theta_cpu, float("nan")), shift)  # poison: every element must be written
    kb.backend.perturb(out, theta, stream, 42, 9, -0.37, offset)
    ref = torch.empty_like(theta_cpu)
    reference.perturb(ref, theta_cpu, stream, 42, 9, -0.37, offset)
    assert_close(out.cpu(), ref, dtype)
    assert torch.equal(theta.cpu(), theta_cpu)  # the input is left alone


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_prepared_perturb_matches_perturb(kb, dtype, stream):
    theta = kb.put(torch.randn(3001, dtype=torch.float64).to(dtype))
    out, expected = torch.empty_like(theta), torch.empty_like(theta)
    perturb = kb.backend.prepare_perturb(out, theta, stream, 12, 77)
    for sample_id, scale in ((0, 0.1), (5, -0.1), (2**32 - 1, 3.0)):
        perturb(sample_id, scale)
        kb.backend.perturb(expected, theta, stream, 12, sample_id, scale, 77)
        assert torch.equal(out, expected)


@over()
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_prepared_perturb_keeps_the_noise(kb, stream):
    """``keep`` (the ABC's contract on every backend): each call also leaves the unscaled noise there."""
    theta = kb.put(torch.randn(1001))
    out, expected = torch.empty_like(theta), torch.empty_like(theta)
    kept = torch.full_like(theta, float("nan"))
    perturb = kb.backend.prepare_perturb(out, theta, stream, 12, 77, keep=kept)
    for sample_id, scale in ((0, 0.1), (2**32 - 1, 3.0)):
        perturb(sample_id, scale)
        kb.backend.perturb(expected, theta, stream, 12, sample_id, scale, 77)
        assert torch.equal(out, expected)
        assert torch.equal(kept.cpu(), kb.backend.sample(stream, 12, sample_id, 77, 1001, kb.device).cpu())


@over()
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_in_place(kb, dtype):
    theta_cpu = torch.randn(1001, dtype=torch.float64).to(dtype)
    theta = kb.put(theta_cpu)
    out = torch.full_like(theta, float("nan"))
    kb.backend.perturb(out, theta, "normal", 3, 4, 0.5, 17)
    kb.backend.perturb(theta, theta, "normal", 3, 4, 0.5, 17)
    ref = torch.empty_like(theta_cpu)
    reference.perturb(ref, theta_cpu, "normal", 3, 4, 0.5, 17)
    assert_close(theta.cpu(), ref, dtype)
    assert torch.equal(theta, out)  # in place or not, the same arithmetic


@over(("cpu", "cuda", "triton"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_vector_and_scalar_paths_agree_bitwise(kb, dtype, stream):
    if kb.name == "triton" and INTERPRETED:
        pytest.skip("storage shifts only matter to compiled vector loads")
    n, num = 4099, 5
    theta_cpu = torch.randn(n, dtype=torch.float64).to(dtype)
    weights = torch.randn(num, dtype=torch.float64, device=kb.device)
    ids = torch.arange(num, device=kb.device)
    for offset in (0, 16, 131):
        outs, grads = [], []
        for shift in (0, 1, 2):
            out = kb.put(torch.zeros_like(theta_cpu), shift)
            kb.backend.perturb(out, kb.put(theta_cpu, shift), stream, 8, 1, 0.25, offset)
            outs.append(out.cpu())
            grad = kb.put(theta_cpu, shift)
            kb.backend.reduce(grad, weights, ids, stream, 8, offset)
            grads.append(grad.cpu())
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        assert all(torch.equal(grads[0], g) for g in grads[1:])


# -- perturb_rows ----------------------------------------------------------------------------------


@over(n=lambda c: c.rows_sizes)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("signs", [1, 2])
@pytest.mark.parametrize("keep", [False, True], ids=["regenerate", "keep"])
def test_perturb_rows(kb, dtype, n, stream, signs, keep):
    rows = kb.config.rows
    theta_cpu = torch.randn(n, dtype=torch.float64).to(dtype)
    offset = straddling_offset(n, aligned=n % 8 == 0) if kb.name == "triton" else random_offset()
    seed = int(torch.randint(0, 2**62, ()).item())
    ids = torch.randperm(10 * rows + 20)[:rows]
    scales = torch.randn(rows, signs, dtype=torch.float64)
    out = kb.put(torch.full((rows * signs, n), float("nan"), dtype=dtype))  # poison: every row must be written
    kept = kb.put(torch.full((rows, n), float("nan"))) if keep else None
    kb.backend.perturb_rows(out, kb.put(theta_cpu), stream, seed, ids, scales, offset, keep=kept)
    for i in range(rows):
        for k in range(signs):
            ref = torch.empty_like(theta_cpu)
            reference.perturb(ref, theta_cpu, stream, seed, int(ids[i]), float(scales[i, k]), offset)
            assert_close(out[i * signs + k].cpu(), ref, dtype)
    if keep:
        torch.testing.assert_close(kept.cpu(), reference.noise(stream, seed, ids, offset, n), rtol=0, atol=1e-6)


# -- reduce and step -------------------------------------------------------------------------------


@over(n=lambda c: c.reduce_sizes, layout=lambda c: c.layouts)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_reduce_and_step(kb, dtype, n, stream, layout):
    num, seed = kb.config.reduce_num, 5
    shift, offset = place(layout, n)
    acc = reference.accumulation_dtype(dtype)
    weights = torch.randn(num, dtype=torch.float64)
    ids = torch.randperm(40)[:num]
    ids[0] = 2**32 - 1  # the largest id
    start = torch.randn(n, dtype=torch.float64).to(dtype)
    expected = start.to(acc) + reference.combine(weights, ids, stream, seed, offset, n, dtype)
    ids = ids.to(kb.device)

    # float64 weights and weights already in the accumulation dtype, as the estimator passes them,
    # give the same result.
    ws = [weights.to(torch.float64 if kind == "float64" else acc).to(kb.device) for kind in kb.config.weight_dtypes]
    for w in ws:
        grad = kb.put(start, shift)
        kb.backend.reduce(grad, w, ids, stream, seed, offset)
        assert_close(grad.cpu(), expected, dtype, scale=4)

    for lr in kb.config.lrs:
        theta = kb.put(start, shift)
        kb.backend.step(theta, ws[0], ids, stream, seed, lr, offset)
        stepped = start.to(acc) - lr * (expected - start.to(acc))
        assert_close(theta.cpu(), stepped, dtype, scale=4 * max(1.0, abs(lr)))


@over()
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_and_step_with_no_samples_touch_nothing(kb, dtype):
    start = torch.randn(300, dtype=torch.float64).to(dtype)
    start[::3] = -0.0
    nothing = torch.empty(0, device=kb.device), torch.empty(0, dtype=torch.int64, device=kb.device)
    grad, theta = kb.put(start), kb.put(start)
    kb.backend.reduce(grad, *nothing, "normal", 1, 0)
    kb.backend.step(theta, *nothing, "rademacher", 1, 0.1, 0)
    for t in (grad.cpu(), theta.cpu()):
        assert torch.equal(t, start)
        if kb.name == "cuda":  # nothing is launched: a kernel adding the empty sum (+0.0) would make -0.0 +0.0
            assert bool(torch.signbit(t[::3]).all())


@over()
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_deterministic_and_independent_of_how_the_vector_is_cut(kb, stream):
    n, num, cut = 3000, 8, 1100
    weights, ids = torch.randn(num, device=kb.device), torch.arange(num, device=kb.device)
    results = []
    for _ in range(2):
        grad = torch.zeros(n, device=kb.device)
        kb.backend.reduce(grad, weights, ids, stream, 77, 3)
        results.append(grad)
    halves = torch.zeros(n, device=kb.device)
    kb.backend.reduce(halves[:cut], weights, ids, stream, 77, 3)
    kb.backend.reduce(halves[cut:], weights, ids, stream, 77, 3 + cut)
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], halves)  # other tiles, same per-element arithmetic


# -- squared_norms ---------------------------------------------------------------------------------


@over()
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_squared_norms(kb, stream):
    ids = torch.tensor([0, 4, 17, 2**32 - 1])
    tol = kb.config.norm_tol
    for n in kb.config.norm_sizes:
        got = kb.backend.squared_norms(stream, 3, ids.to(kb.device), n)
        assert got.dtype == torch.float64 and got.device.type == kb.device.type
        torch.testing.assert_close(got.cpu(), reference.squared_norms(stream, 3, ids, n), rtol=tol, atol=tol)
        assert torch.equal(got, kb.backend.squared_norms(stream, 3, ids.to(kb.device), n))
    # ids on the CPU: the result comes back there too (compiled Triton takes device ids only); no ids, no norms.
    if kb.name != "triton" or INTERPRETED:
        assert kb.backend.squared_norms("normal", 3, ids, 100).device.type == "cpu"
    assert kb.backend.squared_norms("normal", 3, ids[:0].to(kb.device), 100).numel() == 0


# -- low-rank operations --------------------------------------------------------------------------

#: (m, n, r): one element; m and n off the 64 x 64 tiles of the Triton kernels; r = 1, 3 and 17 (one
#: and two K blocks of 16); more row tiles than a launch group (8); an empty matrix.
LOWRANK_PERTURB_SHAPES = [(1, 1, 1), (3, 70, 3), (65, 129, 17), (520, 7, 1), (0, 5, 2)]
#: (m, n, K): as above, with K = 100 and 257 spanning several K blocks of 32.
LOWRANK_ACCUMULATE_SHAPES = [(1, 1, 1), (70, 3, 100), (65, 129, 257), (520, 7, 33), (0, 5, 2)]


def _factors(m: int, n: int, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 ``a`` ``(m, r)`` and ``b`` ``(n, r)`` on the CPU, scaled so that ``a @ b.T`` is about N(0, 1)."""
    return torch.randn(m, r), torch.randn(n, r) / r**0.5


def _assert_lowrank_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """float64 matrices sum the (exact) products of the float32 factors in float64: held to 1e-12, which
    a float32 accumulation (about 1e-7) would miss; the others to their dtype's tolerance."""
    if dtype == torch.float64:
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-12)
    else:
        assert_close(actual.cpu(), expected, dtype, scale=2)


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,r", LOWRANK_PERTURB_SHAPES)
def test_lowrank_perturb(kb, dtype, m, n, r):
    theta_cpu = torch.randn(m, n, dtype=torch.float64).to(dtype)
    a, b = _factors(m, n, r)
    expected = torch.empty_like(theta_cpu)
    reference.lowrank_perturb(expected, theta_cpu, a, b, -0.37)
    theta = kb.put(theta_cpu)
    out = kb.put(torch.full_like(theta_cpu, float("nan")))  # poison: every element must be written
    kb.backend.lowrank_perturb(out, theta, a.to(kb.device), b.to(kb.device), -0.37)
    _assert_lowrank_close(out, expected, dtype)
    assert torch.equal(theta.cpu(), theta_cpu)  # the input is left alone
    kb.backend.lowrank_perturb(theta, theta, a.to(kb.device), b.to(kb.device), -0.37)  # in place
    assert torch.equal(theta, out)  # in place or not, the same arithmetic


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", LOWRANK_ACCUMULATE_SHAPES)
def test_lowrank_accumulate(kb, dtype, m, n, k):
    start = torch.randn(m, n, dtype=torch.float64).to(dtype)
    a, b = _factors(m, n, k)
    weights = torch.randn(k, dtype=torch.float64)  # converted to the accumulation dtype by the check
    expected = start.clone()
    reference.lowrank_accumulate(expected, a, b, weights, -0.75)
    results = []
    for _ in range(2):
        data = kb.put(start)
        kb.backend.lowrank_accumulate(data, a.to(kb.device), b.to(kb.device), weights.to(kb.device), -0.75)
        results.append(data)
    _assert_lowrank_close(results[0], expected, dtype)
    assert torch.equal(results[0], results[1])  # deterministic


# -- argument checks (kernels/operations.py), the same on every backend ----------------------------


def _bad_calls(t: Callable[..., torch.Tensor]) -> list:
    """Calls every backend refuses before any kernel runs, with the error's text; ``t`` makes
    a zero tensor on the backend's device."""
    f64 = torch.float64
    return [
        (lambda b: b.perturb(t(4), t(5), "normal", 0, 0, 1.0, 0), "out must have 5 elements"),
        (lambda b: b.perturb(t(4, dtype=f64), t(4), "normal", 0, 0, 1.0, 0), "out must have dtype"),
        (lambda b: b.perturb(t(4), t(4, 2).t(), "normal", 0, 0, 1.0, 0), "contiguous"),
        (lambda b: b.perturb(t(4), t(4), "uniform", 0, 0, 1.0, 0), "stream"),
        (lambda b: b.perturb(t(4), t(4), "normal", -1, 0, 1.0, 0), "seed"),
        (lambda b: b.perturb(t(4), t(4), "normal", 2**64, 0, 1.0, 0), "seed"),
        (lambda b: b.perturb(t(4), t(4), "normal", 0.5, 0, 1.0, 0), "seed must be an int"),
        (lambda b: b.perturb(t(4), t(4), "normal", 0, 2**32, 1.0, 0), "sample_id"),
        (lambda b: b.perturb(t(4), t(4), "normal", 0, -1, 1.0, 0), "sample_id"),
        (lambda b: b.perturb(t(4), t(4), "normal", 0, 0, "1.0", 0), "scale"),
        (lambda b: b.perturb(t(4), t(4), "normal", 0, 0, 1.0, -1), "offset"),
        (lambda b: b.perturb(t(4), t(4), "normal", 0, 0, 1.0, 2**63 - 2), "offset"),
        (lambda b: b.perturb(t(4), t(4, dtype=torch.int32), "normal", 0, 0, 1.0, 0),
         r"theta must be (float32|a floating dtype)"),
        (lambda b: b.perturb_rows(t(3, 4), t(4), "normal", 0, torch.arange(2), torch.ones(2, 2), 0),
         "scales must have dtype"),
        (lambda b: b.perturb_rows(t(3, 4), t(4), "normal", 0, torch.arange(2), torch.ones(2, 2, dtype=f64), 0),
         "out must have 16 elements"),
        (lambda b: b.perturb_rows(t(2, 4), t(4), "normal", 0, torch.tensor([0, 2**32]), torch.ones(2, 1, dtype=f64),
                                  0), "sample_ids"),
        (lambda b: b.perturb_rows(t(4, 8), t(8), "normal", 0, torch.arange(3), torch.ones(2, 2, dtype=f64), 0),
         "one row per sample id"),
        (lambda b: b.reduce(t(4), t(3), t(2, dtype=torch.int64), "normal", 0, 0), "weights must have 2"),
        (lambda b: b.reduce(t(4), t(1), t(1), "normal", 0, 0), "integer"),
        (lambda b: b.reduce(t(4), t(1), torch.tensor([-1]), "normal", 0, 0), "sample_ids"),
        (lambda b: b.reduce(t(4), t(1), torch.tensor([2**32]), "normal", 0, 0), "sample_ids"),
        (lambda b: b.reduce(t(4), t(1, dtype=torch.int64), t(1, dtype=torch.int64), "normal", 0, 0), "weights"),
        (lambda b: b.reduce(t(4, dtype=torch.int64), t(1), t(1, dtype=torch.int64), "normal", 0, 0), "grad must be"),
        (lambda b: b.step(t(4), t(1), t(1, dtype=torch.int64), "normal", 0, None, 0), "lr"),
        (lambda b: b.step(t(4), t(1), t(1, dtype=torch.int64), "normal", 0, 0.1, -3), "offset"),
        (lambda b: b.squared_norms("normal", 0, t(1, dtype=torch.int64), -1), "numel"),
        (lambda b: b.sample("normal", 0, 2**32, 0, 10), "sample_id"),
        (lambda b: b.philox_words(0, 2**32, 0, 1), "sample_id"),
        (lambda b: b.philox_words(0, 0, -1, 1), "block0"),
        (lambda b: b.philox_words(0, 0, 0, -1), "blocks"),
        (lambda b: b.prepare_perturb(t(4), t(5), "normal", 0, 0), "out must have 5 elements"),
        (lambda b: b.prepare_perturb(t(4), t(4), "normal", 0, 0)(2**32, 1.0), "sample_id"),
        (lambda b: b.prepare_perturb(t(4), t(4), "normal", 0, 0, keep=t(3)), "keep"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(3, 2), t(5, 2), 1.0), r"a must be a \(4, r\) matrix"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4, 2), t(4, 2), 1.0), r"b must be a \(5, r\) matrix"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4), t(5, 1), 1.0), r"a must be a \(4, r\) matrix"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4, 0), t(5, 0), 1.0), "r >= 1"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4, 2), t(5, 3), 1.0), "same rank"),
        (lambda b: b.lowrank_perturb(t(20), t(20), t(20, 1), t(1, 1), 1.0), "theta must be a matrix"),
        (lambda b: b.lowrank_perturb(t(5, 4), t(4, 5), t(4, 2), t(5, 2), 1.0), "out must have theta's shape"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4, 2, dtype=f64), t(5, 2), 1.0),
         "a must have dtype torch.float32"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4, 2), t(5, 2, dtype=torch.float16), 1.0),
         "b must have dtype torch.float32"),
        (lambda b: b.lowrank_perturb(t(4, 5), t(4, 5), t(4, 2), t(5, 2), "1.0"), "scale"),
        (lambda b: b.lowrank_accumulate(t(4, 5), t(4, 2), t(5, 3), t(2), 1.0), "same number of columns"),
        (lambda b: b.lowrank_accumulate(t(4, 5), t(5, 2), t(5, 2), t(2), 1.0), r"a must be a \(4, r\) matrix"),
        (lambda b: b.lowrank_accumulate(t(20), t(20, 2), t(1, 2), t(2), 1.0), "data must be a matrix"),
        (lambda b: b.lowrank_accumulate(t(4, 5), t(4, 2, dtype=f64), t(5, 2), t(2), 1.0), "a must have dtype"),
        (lambda b: b.lowrank_accumulate(t(4, 5), t(4, 2), t(5, 2), t(3), 1.0), "weights must have 2"),
        (lambda b: b.lowrank_accumulate(t(4, 5), t(4, 2), t(5, 2), t(2), None), "alpha"),
    ]  # fmt: skip


@over(case=lambda c: list(range(len(_bad_calls(torch.zeros)))))
def test_invalid_kernel_arguments_are_refused_before_the_call(kb, case):
    call, match = _bad_calls(lambda *shape, **kw: torch.zeros(*shape, device=kb.device, **kw))[case]
    with pytest.raises((ValueError, TypeError), match=match):
        call(kb.backend)


# -- the interface ---------------------------------------------------------------------------------


def test_every_backend_runs_the_declared_operations_through_the_interface():
    """The public operations are the ABC's own (so their checks cannot be skipped); a backend only
    implements the ``run_`` methods, whose arguments the declarations of kernels/operations.py validated."""
    from zo_kernels.ops.base import Backend

    public = ("perturb", "prepare_perturb", "perturb_rows", "reduce", "step", "squared_norms", "sample",
              "philox_words")  # fmt: skip
    for name, status in backends.available().items():
        if status != "available":
            continue
        backend = type(backends.get(name))
        for method in public:
            assert getattr(backend, method) is getattr(Backend, method), (name, method)
        assert not getattr(backend, "__abstractmethods__", None), name


def test_importing_zo_kernels_queries_no_cuda_device():
    """Backends are probed on first use: ``import zo_kernels`` must not touch the CUDA driver."""
    code = (
        "import torch\n"
        "def refuse(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "torch.cuda.is_available = torch.cuda.device_count = torch.cuda.get_device_capability = refuse\n"
        "import zo_kernels\n"
        "from zo_kernels.ops.spec import accumulation_dtype\n"
        "assert accumulation_dtype(torch.float16) is torch.float32\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
