"""The compiled CPU kernels against the PyTorch reference, on fresh random inputs."""

import pytest
import torch

from zo_kernels import backends
from zo_kernels.reference import noise, philox

from helpers import assert_close
from test_noise_reference import KAT

pytestmark = pytest.mark.skipif(
    backends.available()["cpu"] != "available", reason=f"cpu backend: {backends.available()['cpu']}"
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 127, 128, 129, 2047, 2049, 5000]
OFFSETS = [0, 5, 2**31 + 3, 2**34 + 127]


@pytest.fixture
def cpu():
    return backends.get("cpu")


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(cpu, ctr, key, expected):
    assert cpu._C.philox4x32_10(*ctr, *key) == expected


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 0xDEADBEEFCAFEF00D, 2**64 - 1])
@pytest.mark.parametrize("sample,block0", [(0, 0), (7, 123), (2**32 - 1, 2**32 - 2), (99, 2**40 + 5)])
def test_uint32_stream_is_bit_exact(cpu, seed, sample, block0):
    words = cpu.philox_words(seed, sample, block0, 64)
    ref = philox.random_words(seed, torch.tensor([[sample]]), torch.arange(block0, block0 + 64)[None, :])[0]
    assert torch.equal(words, ref)


@pytest.mark.parametrize("stream", noise.STREAMS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", [1, 131, 4099])
def test_stream_values_match_the_reference(cpu, stream, offset, n):
    seed = int(torch.randint(0, 2**62, ()).item())
    got = cpu.sample(stream, seed, 3, offset, n)
    ref = noise.noise(stream, seed, torch.tensor([3]), offset, n)[0]
    if stream == "rademacher":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stream", noise.STREAMS)
def test_perturb(cpu, dtype, n, stream):
    theta = torch.randn(n, dtype=torch.float64).to(dtype)
    offset = int(torch.randint(0, 2**33, ()).item())
    out = torch.full_like(theta, float("nan"))  # poison: every element must be written
    cpu.perturb(out, theta, stream, 42, 9, -0.37, offset)
    ref = torch.empty_like(theta)
    noise.perturb(ref, theta, stream, 42, 9, -0.37, offset)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 129, 2049, 5000])
@pytest.mark.parametrize("stream", noise.STREAMS)
@pytest.mark.parametrize("signs", [1, 2])
@pytest.mark.parametrize("keep", [False, True], ids=["regenerate", "keep"])
def test_perturb_rows(cpu, dtype, n, stream, signs, keep):
    theta = torch.randn(n, dtype=torch.float64).to(dtype)
    offset = int(torch.randint(0, 2**33, ()).item())
    seed = int(torch.randint(0, 2**62, ()).item())
    ids = torch.randperm(50)[:5]
    scales = torch.randn(5, signs, dtype=torch.float64)
    out = torch.full((5 * signs, n), float("nan"), dtype=dtype)  # poison: every row must be written
    kept = torch.full((5, n), float("nan")) if keep else None
    cpu.perturb_rows(out, theta, stream, seed, ids, scales, offset, keep=kept)
    z = noise.noise(stream, seed, ids, offset, n)
    for i in range(5):
        for k in range(signs):
            ref = torch.empty_like(theta)
            noise.perturb(ref, theta, stream, seed, int(ids[i]), float(scales[i, k]), offset)
            assert_close(out[i * signs + k], ref, dtype)
    if keep:
        torch.testing.assert_close(kept, z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stream", noise.STREAMS)
def test_reduce_and_step(cpu, dtype, n, stream):
    num = 13
    offset = int(torch.randint(0, 2**33, ()).item())
    weights = torch.randn(num, dtype=torch.float64)
    ids = torch.randperm(40)[:num]
    start = torch.randn(n, dtype=torch.float64).to(dtype)
    acc = noise.accumulation_dtype(dtype)
    expected = start.to(acc) + noise.combine(weights, ids, stream, 5, offset, n, dtype)

    grad = start.clone()
    cpu.reduce(grad, weights, ids, stream, 5, offset)
    assert_close(grad, expected, dtype, scale=4)

    for lr in (0.5, 1.0, -2.0):
        theta = start.clone()
        cpu.step(theta, weights, ids, stream, 5, lr, offset)
        stepped = start.to(acc) - lr * (expected - start.to(acc))
        assert_close(theta, stepped, dtype, scale=4 * max(1.0, abs(lr)))


def test_squared_norms(cpu):
    ids = torch.tensor([0, 4, 17])
    for n in (0, 1, 2049, 10_000):
        torch.testing.assert_close(cpu.squared_norms("normal", 3, ids, n), noise.squared_norms("normal", 3, ids, n))


@pytest.mark.parametrize("stream", noise.STREAMS)
def test_deterministic_across_runs_and_thread_counts(cpu, stream):
    n, num = 50_000, 32
    weights, ids = torch.randn(num, dtype=torch.float64), torch.arange(num)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2, 1):
            torch.set_num_threads(threads)
            grad = torch.zeros(n)
            cpu.reduce(grad, weights, ids, stream, 77, 3)
            results.append(grad)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(5), "normal", 0, 0, 1.0, 0), "out must have 5 elements"),
        (lambda b: b.perturb(torch.zeros(4).double(), torch.zeros(4), "normal", 0, 0, 1.0, 0), "out must have dtype"),
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(4, 2).t(), "normal", 0, 0, 1.0, 0), "contiguous"),
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(4), "uniform", 0, 0, 1.0, 0), "stream"),
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(4), "normal", -1, 0, 1.0, 0), "seed"),
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(4), "normal", 0, 2**32, 1.0, 0), "sample_id"),
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(4), "normal", 0, 0, 1.0, -1), "offset"),
        (lambda b: b.perturb(torch.zeros(4), torch.zeros(4, dtype=torch.int32), "normal", 0, 0, 1.0, 0), "float32"),
        (
            lambda b: b.perturb_rows(
                torch.zeros(3, 4), torch.zeros(4), "normal", 0, torch.arange(2), torch.ones(2, 2), 0
            ),
            "scales must have dtype",
        ),
        (
            lambda b: b.perturb_rows(
                torch.zeros(3, 4), torch.zeros(4), "normal", 0, torch.arange(2), torch.ones(2, 2).double(), 0
            ),
            "out must have 16 elements",
        ),
        (
            lambda b: b.perturb_rows(
                torch.zeros(2, 4), torch.zeros(4), "normal", 0, torch.tensor([0, 2**32]), torch.ones(2, 1).double(), 0
            ),
            "sample_ids",
        ),
        (lambda b: b.reduce(torch.zeros(4), torch.ones(3), torch.arange(2), "normal", 0, 0), "weights must have 2"),
        (lambda b: b.reduce(torch.zeros(4), torch.ones(1), torch.tensor([-1]), "normal", 0, 0), "sample_ids"),
    ],
)
def test_invalid_kernel_arguments_are_refused_before_the_call(cpu, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(cpu)


def test_selected_for_cpu_tensors_by_default(monkeypatch):
    monkeypatch.delenv("ZO_KERNELS_BACKEND", raising=False)
    assert backends.select(torch.device("cpu"), torch.float32).name == "cpu"
    assert backends.select(torch.device("cpu"), torch.float32, "reference").name == "reference"
    monkeypatch.setenv("ZO_KERNELS_BACKEND", "reference")
    assert backends.select(torch.device("cpu"), torch.bfloat16).name == "reference"


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
@pytest.mark.parametrize("dist", ["Normal", "Rademacher", "Sphere"])
def test_zero_order_on_cpu_matches_the_reference_backend(method, dist):
    """Same seed, same gradient: the cpu backend keeps normal noise instead of regenerating it in reduce."""
    import zo_kernels
    from zo_kernels import distributions

    # w is large enough for the cpu backend to keep its normals (KEEP_MIN_NUMEL); b and h are not.
    params = {"w": torch.randn(200, 200), "b": torch.randn(200, dtype=torch.float64), "h": torch.randn(9).bfloat16()}
    x = torch.randn(4, 200)

    def loss(p, x):
        return ((x @ p["w"]).double() + p["b"]).tanh().sum() + p["h"].double().square().sum()

    grads = {}
    for backend in ("reference", "cpu"):
        tree = {k: v.clone().requires_grad_() for k, v in params.items()}
        fn = zo_kernels.zero_order(
            getattr(distributions, dist)(), method=method, num_samples=12, sigma=0.1, seed=3, backend=backend
        )
        fn(loss)(tree, x).backward()
        grads[backend] = tree
    # The noise agrees to ~1e-6 between backends; the losses' differences divided by sigma amplify
    # that by about |grad f| / sigma, hence the wider tolerance than for a single kernel.
    for k in params:
        assert_close(grads["cpu"][k].grad, grads["reference"][k].grad, params[k].dtype, scale=50)
