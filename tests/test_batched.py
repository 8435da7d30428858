"""batch_size=: vmapped evaluation equals the loop; functions vmap cannot run fall back once, with a warning."""

import warnings

import pytest
import torch

import zo_kernels
from zo_kernels import distributions

from helpers import assert_close

pytestmark = pytest.mark.usefixtures("each_cpu_backend")

METHODS = ["naive", "forward", "antithetic"]


def problem():
    g = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(5, generator=g)}
    x = torch.randn(9, 12, generator=g)

    def loss(p, x):
        return (x @ p["w"] + p["b"]).tanh().square().mean()

    return params, x, loss


def grads(fn, params, x):
    tree = {k: v.clone().requires_grad_() for k, v in params.items()}
    fn(tree, x).backward()
    return [tree[k].grad for k in tree]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dist", [distributions.Normal(), distributions.Rademacher(), distributions.Sphere()], ids=repr)
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_batched_equals_the_loop(method, dist, batch_size):
    params, x, loss = problem()
    kw = dict(method=method, num_samples=10, sigma=0.05, seed=8)
    loop = grads(zo_kernels.zero_order(dist, **kw)(loss), params, x)
    batched = grads(zo_kernels.zero_order(dist, batch_size=batch_size, **kw)(loss), params, x)
    for a, b in zip(batched, loop):
        assert_close(a, b, torch.float32, scale=10)


def test_estimate_batched_equals_estimate():
    params, x, loss = problem()
    a = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=6, sigma=0.05, seed=3)
    b = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=6, sigma=0.05, seed=3, batch_size=4)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-7)


def test_a_function_vmap_cannot_run_falls_back_once_with_a_warning():
    params, x, loss = problem()
    calls = []

    def uses_item(p, x):
        calls.append(1)
        value = loss(p, x)
        return value * (1.0 if value.item() >= 0 else -1.0)

    fn = zo_kernels.zero_order(distributions.Normal(), num_samples=6, sigma=0.05, seed=1, batch_size=3)(uses_item)
    reference = grads(zo_kernels.zero_order(distributions.Normal(), num_samples=6, sigma=0.05, seed=1)(loss), params, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = grads(fn, params, x)
        calls.clear()
        second = grads(fn, params, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "cannot run it" in messages[0] and ".item()" in messages[0]
    assert len(calls) == 1 + 6  # the second call goes straight to the loop: no vmap attempt
    for a, b, c in zip(first, second, reference):
        assert torch.equal(a, b)
        assert_close(a, c, torch.float32)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
        (dict(batch_size=2.5), TypeError, "batch_size must be an int >= 1"),
        (dict(batch_size=4, inplace=True), ValueError, "inplace"),
    ],
)
def test_batch_size_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        zo_kernels.zero_order(distributions.Normal(), **kwargs)
    with pytest.raises(ValueError, match="built-in distribution"):
        zo_kernels.zero_order(torch.distributions.Laplace(0.0, 1.0), batch_size=4)


@pytest.mark.parametrize("method", METHODS)
def test_batched_with_kept_noise_equals_the_loop(method):
    # 4,096 + 64 parameters and 16 samples per call: the cpu backend keeps the block's noise and
    # accumulates it with one matrix-vector product instead of regenerating it in `reduce`.
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(64, 64, generator=g) / 8, "b": torch.randn(64, generator=g)}
    x = torch.randn(16, 64, generator=g)

    def loss(p, x):
        return (x @ p["w"] + p["b"]).tanh().square().mean()

    kw = dict(method=method, num_samples=40, sigma=0.05, seed=11)
    loop = grads(zo_kernels.zero_order(distributions.Normal(), **kw)(loss), params, x)
    batched = grads(zo_kernels.zero_order(distributions.Normal(), batch_size=32, **kw)(loss), params, x)
    for a, b in zip(batched, loop):
        assert_close(a, b, torch.float32, scale=10)


def test_vmap_failing_on_a_later_batch_still_gives_the_loop_gradient():
    params, x, loss = problem()
    calls = []

    def fails_on_second_batch(p, x):
        calls.append(1)
        value = loss(p, x)
        if len(calls) == 3:  # the first call evaluates f(theta), then the batches
            value.item()
        return value

    kw = dict(method="antithetic", num_samples=10, sigma=0.05, seed=4)
    loop = grads(zo_kernels.zero_order(distributions.Normal(), **kw)(loss), params, x)
    fn = zo_kernels.zero_order(distributions.Normal(), batch_size=8, **kw)(fails_on_second_batch)
    with pytest.warns(RuntimeWarning, match="cannot run it"):
        batched = grads(fn, params, x)
    # f(theta), the first batch (4 samples), the failed batch, then the 6 remaining samples one sign at a time
    assert len(calls) == 1 + 1 + 1 + 6 * 2
    for a, b in zip(batched, loop):
        assert_close(a, b, torch.float32, scale=10)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_batched_equals_the_loop_on_a_gpu(method, backend):
    if zo_kernels.backends.available()[backend] != "available":
        pytest.skip(f"{backend}: {zo_kernels.backends.available()[backend]}")
    params, x, loss = problem()
    params, x = {k: v.cuda() for k, v in params.items()}, x.cuda()
    kw = dict(method=method, num_samples=10, sigma=0.05, seed=8, backend=backend)
    loop = grads(zo_kernels.zero_order(distributions.Normal(), **kw)(loss), params, x)
    batched = grads(zo_kernels.zero_order(distributions.Normal(), batch_size=8, **kw)(loss), params, x)
    for a, b in zip(batched, loop):
        assert_close(a, b, torch.float32, scale=10)
