"""What only the compiled CPU backend has: its thread count, its default selection, its kept noise.

The kernels' tests against the reference run for every backend in test_kernels.py.
"""

import pytest
import torch

from zo_kernels import backends
from zo_kernels.ops import reference

from helpers import assert_close

pytestmark = pytest.mark.skipif(
    backends.available()["cpu"] != "available", reason=f"cpu backend: {backends.available()['cpu']}"
)


@pytest.fixture
def cpu():
    return backends.get("cpu")


@pytest.mark.parametrize("stream", reference.STREAMS)
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


def test_the_bindings_refuse_what_the_cpu_has_no_use_for(cpu):
    """csrc/bindings.h gives both modules one signature; a workspace (CUDA's) must be 0 on the CPU."""
    t = torch.zeros(8)
    w, ids = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="workspace is not supported by the CPU kernels"):
        cpu._C.reduce(t.data_ptr(), 8, 0, w.data_ptr(), ids.data_ptr(), 1, 0, 0, 0, t.data_ptr(), (1,))
    words = torch.zeros(8, dtype=torch.int32)
    cpu._C.philox_words(words.data_ptr(), 2, 1, 0, 0)  # the launch tuple is optional for philox_words
    assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, cpu.philox_words(1, 0, 0, 2).reshape(-1))


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
