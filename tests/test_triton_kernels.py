"""What only the Triton backend has: its sample splits, forced splits, device-id poisoning, end-to-end runs.

With a GPU they run compiled on CUDA tensors; without one, conftest.py sets TRITON_INTERPRET=1 and
the same kernels run in Triton's interpreter on CPU tensors (slow: sizes stay small). The kernels'
tests against the reference run for every backend in test_kernels.py.
"""

import pytest
import torch

from zo_kernels.ops import reference
from zo_kernels.ops.triton.backend import load_backend

from helpers import assert_close, straddling_offset

TRITON, WHY = load_backend()
pytestmark = pytest.mark.skipif(TRITON is None, reason=f"triton backend: {WHY}")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b: b.perturb(_t(4), _t(4, device="meta"), "normal", 0, 0, 1.0, 0), "theta must be on"),
        (lambda b: b.reduce(_t(4, 2).t(), torch.ones(1), torch.tensor([0]), "normal", 0, 0), "grad must be contig"),
        (lambda b: b.squared_norms("normal", 0, torch.tensor([0], device="meta"), 1), "sample_ids must be on"),
    ],
)
def test_invalid_kernel_arguments_are_refused_before_the_call(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(TRITON)


def test_supports_and_availability():
    assert load_backend()[1] == "available"
    assert TRITON.name == "triton"
    for dtype in DTYPES:
        assert TRITON.supports(DEVICE, dtype)
    assert not TRITON.supports(DEVICE, torch.int32)
    assert not TRITON.supports(torch.device("meta"), torch.float32)


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
@pytest.mark.parametrize("dist", ["Normal", "Rademacher", "Sphere"])
def test_zero_order_end_to_end_matches_the_reference_backend(method, dist):
    """The decorator on the triton backend gives the reference backend's gradient for the same seed."""
    import zo_kernels
    from zo_kernels import distributions

    params = {"w": torch.randn(5, 7, device=DEVICE), "b": torch.randn(7, device=DEVICE, dtype=torch.float64)}
    x = torch.randn(4, 5, device=DEVICE)

    def loss(p, x):
        return ((x @ p["w"]).double() + p["b"]).tanh().sum()

    grads = {}
    for backend in ("reference", "triton"):
        tree = {k: v.clone().requires_grad_() for k, v in params.items()}
        fn = zo_kernels.zero_order(
            getattr(distributions, dist)(), method=method, num_samples=6, sigma=0.1, seed=3, backend=backend
        )
        fn(loss)(tree, x).backward()
        grads[backend] = tree
    for k in params:
        assert_close(grads["triton"][k].grad, grads["reference"][k].grad, params[k].dtype, scale=10)


@pytest.mark.parametrize("method", ["naive", "antithetic"])
def test_batched_zero_order_equals_the_loop(method):
    import zo_kernels
    from zo_kernels import distributions

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(10, 4, generator=g).to(DEVICE), torch.randn(6, 10, generator=g).to(DEVICE)

    def loss(w, x):
        return (x @ w).tanh().square().mean()

    kw = dict(method=method, num_samples=6, sigma=0.05, seed=5, backend="triton")
    grads = []
    for extra in ({}, {"batch_size": 4}):
        leaf = w.clone().requires_grad_()
        zo_kernels.zero_order(distributions.Normal(), **kw, **extra)(loss)(leaf, x).backward()
        grads.append(leaf.grad)
    assert_close(grads[1], grads[0], torch.float32, scale=10)


# -- sample splits (ops.sample_splits) and ids that the backend cannot range-check ---------------

OPS = TRITON._ops if TRITON is not None else None
STREAM_ID = {name: k for k, name in enumerate(reference.STREAMS)}


def _weights_ids(num, acc, bad=None):
    weights = torch.randn(num, dtype=torch.float64).to(acc).to(DEVICE)
    ids = torch.randperm(10 * num)[:num]
    if bad is not None:
        ids[num // 2] = bad
    return weights, ids.to(DEVICE)


def _chunked(data, weights, ids, stream, seed, offset, chunks, lr=None):
    """What a K-chunk reduce/step must give: each chunk's sums from its own one-chunk call into a zeroed
    buffer, the chunks added in order, then applied once (lr a power of two, so fma and torch agree)."""
    acc = reference.accumulation_dtype(data.dtype)
    total = None
    for c in range(chunks):
        lo, hi = OPS.chunk_bounds(ids.numel(), chunks, c)
        part = torch.zeros(data.numel(), dtype=acc, device=DEVICE)
        OPS.accumulate(part, weights[lo:hi], ids[lo:hi], STREAM_ID[stream], seed, offset, splits=1)
        total = part if total is None else total + part
    applied = data.to(acc) + total if lr is None else data.to(acc) - lr * total
    return applied.to(data.dtype)


def test_sample_splits_rule():
    normal, rademacher = STREAM_ID["normal"], STREAM_ID["rademacher"]
    assert OPS.sample_splits(0, 100, normal) == 0 and OPS.sample_splits(100, 0, normal) == 0
    assert OPS.sample_splits(15, 256, normal) == 1  # fewer than 2 chunks of 16 samples
    assert OPS.sample_splits(1000, 256, normal) == 62  # 1000 // 16
    assert OPS.sample_splits(10**6, 256, normal) == 132 * 2048 // 64  # threads: 64 groups of 4
    assert OPS.sample_splits(10**6, 256, rademacher) == 8 * 2**20 // 256  # the workspace cap
    assert OPS.sample_splits(2**32, 1, rademacher) == 65535  # the grid cap
    assert OPS.sample_splits(10**6, 10**7, normal) == 1  # the tensor alone fills the GPU
    for num, n in [(1000, 256), (37, 5), (10**5, 3000), (2**20, 2**16)]:
        k = OPS.sample_splits(num, n, normal)
        assert k * n <= OPS.MAX_WORKSPACE_ELEMENTS and num // k >= OPS.MIN_CHUNK_SAMPLES


def test_sample_splits_agree_with_the_cuda_backend():
    from zo_kernels.ops.native import load_extension

    ext, why = load_extension("cuda")
    if ext is None or not hasattr(ext, "sample_splits"):
        pytest.skip(f"the CUDA extension has no sample_splits ({why})")
    for num in (0, 1, 16, 31, 32, 1000, 10**5, 2**32):
        for n in (1, 5, 256, 3000, 2**16, 10**7):
            for stream, sid in STREAM_ID.items():
                assert OPS.sample_splits(num, n, sid) == ext.sample_splits(num, n, sid), (num, n, stream)


# Not bfloat16 here: Triton's interpreter rounds float32 -> bfloat16 toward zero (GPUs round to
# nearest even, like torch), so only the other dtypes can be compared bit for bit with torch.
@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("chunks", [2, 5])
def test_split_equals_the_chunks_summed_in_order(stream, dtype, chunks):
    n, num, seed = 300, 33, 11
    offset = straddling_offset(n)
    weights, ids = _weights_ids(num, reference.accumulation_dtype(dtype))
    start = torch.randn(n, dtype=torch.float64).to(dtype).to(DEVICE)
    for lr in (None, 0.5):
        got = start.clone()
        OPS.accumulate(got, weights, ids, STREAM_ID[stream], seed, offset, lr=lr, splits=chunks)
        assert torch.equal(got, _chunked(start, weights, ids, stream, seed, offset, chunks, lr))
        again = start.clone()
        OPS.accumulate(again, weights, ids, STREAM_ID[stream], seed, offset, lr=lr, splits=chunks)
        assert torch.equal(got, again)  # run to run
        sums = reference.combine(weights, ids, stream, seed, offset, n, dtype)
        expected = start.to(sums.dtype) + sums if lr is None else start.to(sums.dtype) - lr * sums
        assert_close(got, expected, dtype, scale=4)


@pytest.mark.parametrize("stream", reference.STREAMS)
def test_one_chunk_is_the_single_kernel_path(stream):
    n, num, seed, offset = 1000, 40, 3, 77
    weights, ids = _weights_ids(num, torch.float32)
    assert OPS.sample_splits(num, n, STREAM_ID[stream]) == 2  # what the backend would do
    one = torch.randn(n, device=DEVICE)
    split = one.clone()
    OPS.accumulate(one, weights, ids, STREAM_ID[stream], seed, offset, splits=1)
    TRITON.reduce(split, weights, ids, stream, seed, offset)
    assert_close(split, one, torch.float32, scale=4)
    single = torch.zeros(n, device=DEVICE)
    OPS.accumulate(single, weights[:8], ids[:8], STREAM_ID[stream], seed, offset, splits=1)
    backend = torch.zeros(n, device=DEVICE)
    TRITON.reduce(backend, weights[:8], ids[:8], stream, seed, offset)  # 8 samples: K = 1
    assert torch.equal(single, backend)


@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("bad", [-1, 2**32, 2**40])
@pytest.mark.parametrize("chunks", [1, 3])
def test_out_of_range_device_ids_poison(stream, bad, chunks):
    """Ids already on the device are not range-checked (that would sync): the kernels poison with NaN."""
    n, num = 300, 48
    weights, ids = _weights_ids(num, torch.float32, bad=bad)
    for lr in (None, 0.5):
        data = torch.zeros(n, device=DEVICE)
        OPS.accumulate(data, weights, ids, STREAM_ID[stream], 9, 5, lr=lr, splits=chunks)
        assert torch.isnan(data).all()
    norms = OPS.squared_norms(ids, STREAM_ID[stream], 9, n)
    assert torch.isnan(norms[num // 2]) and torch.isfinite(norms[: num // 2]).all()
    assert torch.isfinite(norms[num // 2 + 1 :]).all()
