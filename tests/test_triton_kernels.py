"""The Triton kernels against the PyTorch reference, on fresh random inputs.

With a GPU they run compiled on CUDA tensors; without one, conftest.py sets TRITON_INTERPRET=1 and
the same kernels run in Triton's interpreter on CPU tensors (slow: sizes stay small).
"""

import pytest
import torch

from zo_kernels.kernels.triton.backend import load_backend
from zo_kernels.reference import noise, philox

from helpers import assert_close
from test_noise_reference import KAT

TRITON, WHY = load_backend()
pytestmark = pytest.mark.skipif(TRITON is None, reason=f"triton backend: {WHY}")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 0, 1, odd, around a Rademacher block (128) and the tiles (normal 512, rademacher 4096; ops.CONFIGS),
# multiples of 16 bytes (vector loads) and not.
SIZES = [0, 1, 3, 127, 128, 129, 511, 513, 4095, 4097, 5000]
REDUCE_SIZES = [0, 1, 3, 129, 513, 4097, 5000]
OFFSETS = [0, 5, 2**31 + 3, 2**34 + 127]
SEEDS = [0, 1, 2**32 - 1, 2**32, 0xDEADBEEFCAFEF00D, 2**64 - 1]


def straddling_offset(n: int, aligned: bool = False) -> int:
    """A random offset at which an ``n``-element tensor crosses a tile boundary (a multiple of 8, or odd).

    ``2**13`` is a multiple of every tile size the kernels use, so the middle of the tensor lies on
    a tile boundary. ``aligned`` offsets (multiples of 8) let the kernels move 16-byte vectors.
    """
    base = int(torch.randint(1, 2**21, ()).item()) * 2**13 - (n // 2)
    return base - base % 8 if aligned else base - 1 + base % 2


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    block = ctr[0] | (ctr[1] << 32)
    words = TRITON._ops.philox_blocks(block, 1, ctr[2], ctr[3], key[0] | (key[1] << 32), DEVICE)
    assert tuple(words[0].tolist()) == expected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sample,block0", [(0, 0), (7, 123), (2**32 - 1, 2**32 - 2), (99, 2**40 + 5)])
def test_uint32_stream_is_bit_exact(seed, sample, block0):
    words = TRITON.philox_words(seed, sample, block0, 64, DEVICE)
    ref = philox.random_words(seed, torch.tensor([[sample]]), torch.arange(block0, block0 + 64)[None, :])[0]
    assert torch.equal(words.cpu(), ref)


@pytest.mark.parametrize("stream", noise.STREAMS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", [1, 131, 4099])
def test_stream_values_match_the_reference(stream, offset, n):
    seed = int(torch.randint(0, 2**62, ()).item()) | (2**63 if offset % 2 else 0)  # both halves of the range
    sample_id = 2**32 - 1 if n == 131 else 3
    got = TRITON.sample(stream, seed, sample_id, offset, n, DEVICE)
    assert got.dtype == torch.float32 and got.device.type == DEVICE.type and got.shape == (n,)
    ref = noise.noise(stream, seed, torch.tensor([sample_id]), offset, n)[0]
    if stream == "rademacher":
        assert torch.equal(got.cpu(), ref)
    else:
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stream", noise.STREAMS)
def test_perturb(dtype, n, stream, aligned):
    theta = torch.randn(n, dtype=torch.float64).to(dtype).to(DEVICE)
    offset = straddling_offset(n, aligned)
    out = torch.full_like(theta, float("nan"))  # poison: every element must be written
    TRITON.perturb(out, theta, stream, 42, 9, -0.37, offset)
    ref = torch.empty_like(theta)
    noise.perturb(ref, theta, stream, 42, 9, -0.37, offset)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 129, 4104])
@pytest.mark.parametrize("stream", noise.STREAMS)
@pytest.mark.parametrize("signs", [1, 2])
def test_perturb_rows(dtype, n, stream, signs):
    theta = torch.randn(n, dtype=torch.float64).to(dtype).to(DEVICE)
    offset = straddling_offset(n, aligned=n % 8 == 0)
    ids = torch.randperm(60)[:3]
    scales = torch.randn(3, signs, dtype=torch.float64)
    out = torch.full((3 * signs, n), float("nan"), dtype=dtype, device=DEVICE)  # poison: every row is written
    TRITON.perturb_rows(out, theta, stream, 42, ids, scales, offset)
    for i in range(3):
        for k in range(signs):
            ref = torch.empty_like(theta)
            noise.perturb(ref, theta, stream, 42, int(ids[i]), float(scales[i, k]), offset)
            assert_close(out[i * signs + k], ref, dtype)


def test_perturb_rows_refuses_mismatched_arguments():
    theta = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="out must have 32 elements"):
        TRITON.perturb_rows(torch.zeros(3, 8, device=DEVICE), theta, "normal", 0, torch.arange(2),
                            torch.ones(2, 2, dtype=torch.float64), 0)  # fmt: skip
    with pytest.raises(ValueError, match="one row per sample id"):
        TRITON.perturb_rows(torch.zeros(4, 8, device=DEVICE), theta, "normal", 0, torch.arange(3),
                            torch.ones(2, 2, dtype=torch.float64), 0)  # fmt: skip


def test_perturb_in_place_and_prepared_calls_match():
    theta = torch.randn(300, device=DEVICE)
    ref = torch.empty_like(theta)
    noise.perturb(ref, theta, "normal", 7, 2, 0.5, 11)
    prepared = torch.full_like(theta, float("nan"))
    TRITON.prepare_perturb(prepared, theta, "normal", 7, 11)(2, 0.5)
    in_place = theta.clone()
    TRITON.perturb(in_place, in_place, "normal", 7, 2, 0.5, 11)
    assert_close(prepared, ref, torch.float32)
    assert torch.equal(in_place, prepared)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", REDUCE_SIZES)
@pytest.mark.parametrize("stream", noise.STREAMS)
def test_reduce_and_step(dtype, n, stream, aligned):
    num, seed = 7, 5
    offset = straddling_offset(n, aligned)
    acc = noise.accumulation_dtype(dtype)
    weights = torch.randn(num, dtype=torch.float64).to(acc).to(DEVICE)  # as the estimator passes them
    ids = torch.randperm(40)[:num]
    ids[0] = 2**32 - 1
    ids = ids.to(DEVICE)
    start = torch.randn(n, dtype=torch.float64).to(dtype).to(DEVICE)
    expected = start.to(acc) + noise.combine(weights, ids, stream, seed, offset, n, dtype)

    grad = start.clone()
    TRITON.reduce(grad, weights, ids, stream, seed, offset)
    assert_close(grad, expected, dtype, scale=4)

    theta = start.clone()
    TRITON.step(theta, weights, ids, stream, seed, 0.5, offset)
    stepped = start.to(acc) - 0.5 * (expected - start.to(acc))
    assert_close(theta, stepped, dtype, scale=4)


def test_reduce_with_no_samples_leaves_the_gradient_alone():
    grad = torch.randn(10, device=DEVICE)
    before = grad.clone()
    TRITON.reduce(grad, torch.ones(0, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE), "normal", 1, 0)
    assert torch.equal(grad, before)


@pytest.mark.parametrize("stream", noise.STREAMS)
def test_squared_norms(stream):
    ids = torch.tensor([0, 17, 2**32 - 1], device=DEVICE)
    for n in (0, 1, 513, 5000):
        got = TRITON.squared_norms(stream, 3, ids, n)
        assert got.dtype == torch.float64 and got.device.type == DEVICE.type
        torch.testing.assert_close(got, noise.squared_norms(stream, 3, ids, n), rtol=1e-6, atol=1e-6)
        assert torch.equal(got, TRITON.squared_norms(stream, 3, ids, n))


@pytest.mark.parametrize("stream", noise.STREAMS)
def test_deterministic_and_independent_of_how_the_vector_is_cut(stream):
    n, num, cut = 3000, 8, 1100
    weights, ids = torch.randn(num, device=DEVICE), torch.arange(num, device=DEVICE)
    results = []
    for _ in range(2):
        grad = torch.zeros(n, device=DEVICE)
        TRITON.reduce(grad, weights, ids, stream, 77, 3)
        results.append(grad)
    halves = torch.zeros(n, device=DEVICE)
    TRITON.reduce(halves[:cut], weights, ids, stream, 77, 3)
    TRITON.reduce(halves[cut:], weights, ids, stream, 77, 3 + cut)
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], halves)  # other tiles, same per-element arithmetic


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b: b.perturb(_t(4), _t(5), "normal", 0, 0, 1.0, 0), "out must have 5 elements"),
        (lambda b: b.perturb(_t(4, dtype=torch.float64), _t(4), "normal", 0, 0, 1.0, 0), "out must have dtype"),
        (lambda b: b.perturb(_t(4), _t(4, 2).t(), "normal", 0, 0, 1.0, 0), "contiguous"),
        (lambda b: b.perturb(_t(4), _t(4), "uniform", 0, 0, 1.0, 0), "stream"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", -1, 0, 1.0, 0), "seed"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", 2**64, 0, 1.0, 0), "seed"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", 0.5, 0, 1.0, 0), "seed must be an int"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", 0, 2**32, 1.0, 0), "sample_id"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", 0, 0, "1.0", 0), "scale"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", 0, 0, 1.0, -1), "offset"),
        (lambda b: b.perturb(_t(4), _t(4), "normal", 0, 0, 1.0, 2**63 - 2), "offset"),
        (lambda b: b.perturb(_t(4), _t(4, dtype=torch.int32), "normal", 0, 0, 1.0, 0), "theta must be float32"),
        (lambda b: b.perturb(_t(4), _t(4, device="meta"), "normal", 0, 0, 1.0, 0), "theta must be on"),
        (lambda b: b.reduce(_t(4), torch.ones(3), torch.arange(2), "normal", 0, 0), "weights must have 2"),
        (lambda b: b.reduce(_t(4), torch.ones(1), torch.tensor([-1]), "normal", 0, 0), "sample_ids"),
        (lambda b: b.reduce(_t(4), torch.ones(1), torch.tensor([2**32]), "normal", 0, 0), "sample_ids"),
        (lambda b: b.reduce(_t(4), torch.ones(1), torch.tensor([0.0]), "normal", 0, 0), "integer"),
        (lambda b: b.reduce(_t(4), torch.ones(1, dtype=torch.int64), torch.tensor([0]), "normal", 0, 0), "weights"),
        (lambda b: b.reduce(_t(4, 2).t(), torch.ones(1), torch.tensor([0]), "normal", 0, 0), "grad must be contig"),
        (lambda b: b.step(_t(4), torch.ones(1), torch.tensor([0]), "normal", 0, None, 0), "lr"),
        (lambda b: b.squared_norms("normal", 0, torch.tensor([0], device=DEVICE), -1), "numel"),
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
STREAM_ID = {name: k for k, name in enumerate(noise.STREAMS)}


def _weights_ids(num, acc, bad=None):
    weights = torch.randn(num, dtype=torch.float64).to(acc).to(DEVICE)
    ids = torch.randperm(10 * num)[:num]
    if bad is not None:
        ids[num // 2] = bad
    return weights, ids.to(DEVICE)


def _chunked(data, weights, ids, stream, seed, offset, chunks, lr=None):
    """What a K-chunk reduce/step must give: each chunk's sums from its own one-chunk call into a zeroed
    buffer, the chunks added in order, then applied once (lr a power of two, so fma and torch agree)."""
    acc = noise.accumulation_dtype(data.dtype)
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
    from zo_kernels.kernels.native_cuda import load_extension

    ext, why = load_extension()
    if ext is None or not hasattr(ext, "sample_splits"):
        pytest.skip(f"the CUDA extension has no sample_splits ({why})")
    for num in (0, 1, 16, 31, 32, 1000, 10**5, 2**32):
        for n in (1, 5, 256, 3000, 2**16, 10**7):
            for stream, sid in STREAM_ID.items():
                assert OPS.sample_splits(num, n, sid) == ext.sample_splits(num, n, sid), (num, n, stream)


# Not bfloat16 here: Triton's interpreter rounds float32 -> bfloat16 toward zero (GPUs round to
# nearest even, like torch), so only the other dtypes can be compared bit for bit with torch.
@pytest.mark.parametrize("stream", noise.STREAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("chunks", [2, 5])
def test_split_equals_the_chunks_summed_in_order(stream, dtype, chunks):
    n, num, seed = 300, 33, 11
    offset = straddling_offset(n)
    weights, ids = _weights_ids(num, noise.accumulation_dtype(dtype))
    start = torch.randn(n, dtype=torch.float64).to(dtype).to(DEVICE)
    for lr in (None, 0.5):
        got = start.clone()
        OPS.accumulate(got, weights, ids, STREAM_ID[stream], seed, offset, lr=lr, splits=chunks)
        assert torch.equal(got, _chunked(start, weights, ids, stream, seed, offset, chunks, lr))
        again = start.clone()
        OPS.accumulate(again, weights, ids, STREAM_ID[stream], seed, offset, lr=lr, splits=chunks)
        assert torch.equal(got, again)  # run to run
        sums = noise.combine(weights, ids, stream, seed, offset, n, dtype)
        expected = start.to(sums.dtype) + sums if lr is None else start.to(sums.dtype) - lr * sums
        assert_close(got, expected, dtype, scale=4)


@pytest.mark.parametrize("stream", noise.STREAMS)
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


@pytest.mark.parametrize("stream", noise.STREAMS)
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
