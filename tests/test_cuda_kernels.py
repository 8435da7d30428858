"""What only the compiled CUDA backend (zo_kernels._C_cuda) has: splits and workspaces, streams, no syncs,
device-id poisoning, >2**31 elements, CUDA errors, its default selection.

Needs a CUDA device (the `gpu` marker: conftest skips these tests without one). The kernels' tests
against the reference run for every backend in test_kernels.py.
"""

import os

import pytest
import torch

from zo_kernels import backends
from zo_kernels.ops import reference
from zo_kernels.ops.native import load_backend
from zo_kernels.ops.spec import STREAM_IDS

from helpers import assert_close

_BACKEND, _WHY = load_backend("cuda")
_REQUIRED = os.environ.get("ZO_KERNELS_REQUIRE_NATIVE") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_BACKEND is None and not _REQUIRED, reason=f"cuda backend: {_WHY}"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def cuda():
    assert _BACKEND is not None, f"cuda backend: {_WHY}"
    return _BACKEND


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _random_offset():
    return int(torch.randint(0, 2**33, ()).item())


def _shifted(values: torch.Tensor, shift: int) -> torch.Tensor:
    """``values`` on the GPU in a contiguous view that starts `shift` elements into its storage.

    shift = 1 misaligns the base pointer, so the kernels take their scalar path instead of the
    vectorized one for the interior groups.
    """
    storage = torch.full((values.numel() + shift + 1,), float("nan"), dtype=values.dtype, device="cuda")
    view = storage[shift : shift + values.numel()]
    view.copy_(values)
    return view


def _layout(layout: str):
    """(shift, offset): 'aligned' takes the vectorized path for every interior group, 'shifted' the scalar one
    (or, for some offsets, the vectorized one with a different head)."""
    offset = _random_offset()
    return (0, offset - offset % 16) if layout == "aligned" else (1, offset)


def test_perturb_rows_poisons_the_rows_of_out_of_range_ids(cuda):
    out = torch.zeros(4, 64, device="cuda")
    ids = torch.tensor([3, 2**32], device="cuda")
    cuda.perturb_rows(out, torch.zeros(64, device="cuda"), "normal", 0, ids, torch.ones(2, 2, dtype=torch.float64), 0)
    assert not bool(torch.isnan(out[:2]).any()) and bool(torch.isnan(out[2:]).all())


def test_out_of_range_sample_ids_poison_the_result_instead_of_wrapping(cuda):
    # Checking GPU-resident ids on the host would need a sync, so the kernels make the misuse visible.
    grad = torch.zeros(64, device="cuda")
    cuda.reduce(grad, torch.ones(2, device="cuda"), torch.tensor([1, 2**32], device="cuda"), "normal", 0, 0)
    assert bool(torch.isnan(grad).all())
    theta = torch.zeros(64, dtype=torch.float64, device="cuda")
    cuda.step(theta, torch.ones(1, device="cuda"), torch.tensor([-1], device="cuda"), "rademacher", 0, 0.1, 0)
    assert bool(torch.isnan(theta).all())
    # The split path too: one bad id in one chunk poisons every element's sum of the chunks.
    ids = torch.arange(1000, device="cuda")
    ids[500] = 2**32
    bias = torch.zeros(256, device="cuda")
    assert cuda._C.sample_splits(1000, 256, STREAM_IDS["normal"]) > 1
    cuda.reduce(bias, torch.ones(1000, device="cuda"), ids, "normal", 0, 0)
    assert bool(torch.isnan(bias).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("layout", ["aligned", "shifted"])
def test_split_reduce_and_step_of_a_small_bias(cuda, dtype, stream, layout):
    # A 256-element bias at N = 1000 would be one block looping over all samples; the split runs 62
    # chunks of 16 samples over gridDim.y and sums their partial sums in chunk order.
    n, num = 256, 1000
    assert cuda._C.sample_splits(num, n, STREAM_IDS[stream]) == 62
    assert cuda._C.reduce_workspace(num, n, STREAM_IDS[stream]) == 62 * n
    shift, offset = _layout(layout)
    weights = torch.randn(num, dtype=torch.float64) / num  # the estimator's scale: a mean over the samples
    ids = torch.randperm(4 * num)[:num]
    start = torch.randn(n, dtype=torch.float64).to(dtype)
    acc = reference.accumulation_dtype(dtype)
    total = reference.combine(weights, ids, stream, 5, offset, n, dtype)
    grads = []
    for _ in range(3):
        grad = _shifted(start, shift)
        cuda.reduce(grad, weights.cuda(), ids.cuda(), stream, 5, offset)
        grads.append(grad.cpu())
    assert_close(grads[0], start.to(acc) + total, dtype, scale=4)
    assert all(torch.equal(grads[0], g) for g in grads[1:])  # bitwise run to run
    theta = _shifted(start, shift)
    cuda.step(theta, weights.cuda(), ids.cuda(), stream, 5, 0.5, offset)
    assert_close(theta.cpu(), start.to(acc) - 0.5 * total, dtype, scale=4)


@pytest.mark.parametrize("stream", reference.STREAMS)
def test_deterministic_across_runs_and_streams(cuda, stream):
    n, num = 50_000, 32
    weights, ids = torch.randn(num, dtype=torch.float64, device="cuda"), torch.arange(num, device="cuda")
    results = []
    for s in (torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.current_stream()):
        with torch.cuda.stream(s):
            grad = torch.zeros(n, device="cuda")
            cuda.reduce(grad, weights, ids, stream, 77, 3)
            results.append(grad.cpu())
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_kernels_run_on_the_current_stream(cuda):
    """On a side stream busy with a long kernel, the launches must wait for it like PyTorch ops do.

    Were they issued on another stream, they would read `theta` / `grad` before the side stream
    fills them (non-default PyTorch streams do not synchronize with the legacy default stream).
    """
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available")
    n = 1 << 16
    src = torch.randn(n, device="cuda")
    theta, out = torch.zeros(n, device="cuda"), torch.full((n,), float("nan"), device="cuda")
    grad = torch.zeros(n, device="cuda")
    prepared_out = torch.full((n,), float("nan"), device="cuda")
    stepped = torch.zeros(n, device="cuda")
    weights, ids = torch.randn(4, device="cuda"), torch.arange(4, device="cuda")
    bias = torch.zeros(256, device="cuda")  # with 1000 samples: the split path and its workspace
    bias_weights, bias_ids = torch.randn(1000, device="cuda") / 1000, torch.arange(1000, device="cuda")
    prepared = cuda.prepare_perturb(prepared_out, theta, "normal", 1, 0)  # prepared outside, called inside
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of spinning before the inputs are written
        theta.copy_(src)
        grad.copy_(src)
        stepped.copy_(src)
        bias.copy_(src[:256])
        cuda.perturb(out, theta, "normal", 1, 2, 0.1, 0)
        prepared(2, 0.1)
        cuda.reduce(grad, weights, ids, "normal", 1, 0)
        cuda.step(stepped, weights, ids, "normal", 1, 0.5, 0)
        cuda.reduce(bias, bias_weights, bias_ids, "normal", 1, 0)
    side.synchronize()
    src_cpu = src.cpu()
    ref = torch.empty_like(src_cpu)
    reference.perturb(ref, src_cpu, "normal", 1, 2, 0.1, 0)
    assert_close(out.cpu(), ref, torch.float32)
    assert torch.equal(prepared_out.cpu(), out.cpu())
    total = reference.combine(weights.cpu(), ids.cpu(), "normal", 1, 0, n, torch.float32)
    assert_close(grad.cpu(), src_cpu + total, torch.float32, scale=4)
    assert_close(stepped.cpu(), src_cpu - 0.5 * total, torch.float32, scale=4)
    bias_total = reference.combine(bias_weights.cpu(), bias_ids.cpu(), "normal", 1, 0, 256, torch.float32)
    assert_close(bias.cpu(), src_cpu[:256] + bias_total, torch.float32, scale=4)


def test_no_host_sync_in_perturb_reduce_step(cuda):
    theta = torch.randn(1000, device="cuda")
    out = torch.empty_like(theta)
    weights, ids = torch.randn(8, dtype=torch.float64, device="cuda"), torch.arange(8, device="cuda")
    bias, many = torch.zeros(256, device="cuda"), torch.arange(1000, device="cuda")  # the split path
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing PyTorch call raises
    try:
        cuda.perturb(out, theta, "normal", 1, 0, 0.1, 0)
        cuda.reduce(out, weights, ids, "normal", 1, 0)
        cuda.step(theta, weights, ids, "rademacher", 1, 0.01, 0)
        cuda.reduce(bias, many.double(), many, "normal", 1, 0)
        cuda.step(bias, many.double(), many, "rademacher", 1, 0.01, 0)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@pytest.mark.slow
def test_more_than_2_31_elements(cuda):
    n = 2**31 + 5
    try:
        theta = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
        grad = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 2 x 4 GiB")
    offset = 3
    cuda.perturb(theta, theta, "normal", 9, 1, 1.0, offset)
    weights, ids = torch.tensor([0.5, -2.0], device="cuda"), torch.tensor([3, 8], device="cuda")
    cuda.reduce(grad, weights, ids, "rademacher", 9, offset)
    for lo in (0, 2**31 - 1000, n - 1000):
        length = min(2000, n - lo)
        z = reference.noise("normal", 9, torch.tensor([1]), offset + lo, length)[0]
        assert_close(theta[lo : lo + length].cpu(), z.to(torch.bfloat16).float(), torch.bfloat16)
        expected = reference.combine(weights.cpu(), ids.cpu(), "rademacher", 9, offset + lo, length, torch.bfloat16)
        assert_close(grad[lo : lo + length].cpu(), expected, torch.bfloat16)


def _t(*shape, **kw):
    return torch.zeros(*shape, device="cuda", **kw)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b: b.perturb(_t(4), torch.zeros(4), "normal", 0, 0, 1.0, 0), "CUDA tensor"),
        (lambda b: b.perturb(torch.zeros(4), _t(4), "normal", 0, 0, 1.0, 0), "CUDA tensor"),
        (lambda b: b.reduce(_t(4), torch.ones(1), _t(1, dtype=torch.int64), "normal", 0, 0), "weights must be on"),
        (lambda b: b.reduce(_t(4), _t(1), torch.zeros(1, dtype=torch.int64), "normal", 0, 0), "sample_ids must be on"),
        (lambda b: b.reduce(torch.zeros(4), _t(1), _t(1, dtype=torch.int64), "normal", 0, 0), "CUDA tensor"),
        (lambda b: b.squared_norms("normal", 0, torch.tensor([-1], device="cuda"), 10), "sample_ids"),
        (lambda b: b.squared_norms("normal", 0, torch.tensor([2**32], device="cuda"), 10), "sample_ids"),
        (lambda b: b.sample("normal", 0, 0, 0, 10, "cpu"), "CUDA device"),
    ],
)
def test_invalid_kernel_arguments_are_refused_before_the_call(cuda, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(cuda)


def test_cuda_errors_become_python_exceptions(cuda):
    t = _t(8)
    launch = (t.device.index, _stream())
    with pytest.raises(RuntimeError, match="zo_kernels._C_cuda: cudaSetDevice failed"):
        cuda._C.perturb(t.data_ptr(), t.data_ptr(), 8, 0, 0, 0, 0, 1.0, 0, 0, (1000, _stream()))
    with pytest.raises(ValueError, match="dtype id"):
        cuda._C.perturb(t.data_ptr(), t.data_ptr(), 8, 9, 0, 0, 0, 1.0, 0, 0, launch)
    with pytest.raises(ValueError, match="stream id"):
        cuda._C.reduce(t.data_ptr(), 8, 0, 0, 0, 0, 5, 0, 0, 0, launch)
    with pytest.raises(ValueError, match="keep is not supported"):  # the shared binding's keep, refused on CUDA
        cuda._C.perturb(t.data_ptr(), t.data_ptr(), 8, 0, 0, 0, 0, 1.0, 0, t.data_ptr(), launch)
    with pytest.raises(ValueError, match="launch must hold"):
        cuda._C.fill(t.data_ptr(), 8, 0, 0, 0, 0, (t.device.index,))
    bias, weights, ids = _t(256), _t(1000), _t(1000, dtype=torch.int64)
    with pytest.raises(ValueError, match="workspace"):  # a split without its workspace, refused before launching
        cuda._C.reduce(bias.data_ptr(), 256, 0, weights.data_ptr(), ids.data_ptr(), 1000, 0, 0, 0, 0, launch)
    # The device is still usable afterwards.
    cuda.perturb(t, t, "normal", 0, 0, 1.0, 0)
    assert bool(torch.isfinite(t).all())


def test_selected_for_cuda_tensors_by_default(monkeypatch):
    monkeypatch.delenv("ZO_KERNELS_BACKEND", raising=False)
    device = torch.device("cuda", torch.cuda.current_device())
    assert backends.available().get("cuda") == "available", backends.available()
    assert backends.select(device, torch.float32).name == "cuda"
    assert backends.select(device, torch.bfloat16, "reference").name == "reference"
