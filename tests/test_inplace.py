"""inplace=True (MeZO memory mode): same estimate, parameters restored, drift bounded, bad input refused."""

import pytest
import torch

import zo_kernels
from zo_kernels import distributions

from helpers import assert_close

pytestmark = pytest.mark.usefixtures("each_cpu_backend")

METHODS = ["naive", "forward", "antithetic"]
DISTS = [distributions.Normal(), distributions.Rademacher(), distributions.Sphere(), distributions.LowRank(2)]


def problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(64, 40, generator=g, dtype=dtype), "b": torch.randn(40, generator=g, dtype=dtype)}
    x = torch.randn(16, 64, generator=g, dtype=dtype)

    def loss(p, x):
        return (x @ p["w"] + p["b"]).tanh().square().mean()

    return params, x, loss


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dist", DISTS, ids=repr)
def test_inplace_gives_the_same_gradient_and_restores_the_parameters(method, dist):
    params, x, loss = problem()
    grads = {}
    for inplace in (False, True):
        tree = {k: v.clone().requires_grad_() for k, v in params.items()}
        fn = zo_kernels.zero_order(dist, method=method, num_samples=8, sigma=0.01, seed=4, inplace=inplace)
        fn(loss)(tree, x).backward()
        grads[inplace] = tree
        for k in params:
            # Restored up to the roundings of theta + s z - s z: at most one float32 rounding
            # (2**-24 relative) per in-place update, 3 per antithetic sample.
            bound = 8 * 3 * 2.0**-24
            torch.testing.assert_close(tree[k].detach(), params[k], rtol=bound, atol=1e-7)
    for k in params:
        # the losses differ by rounding of the perturbed parameters, which 1/sigma amplifies
        assert_close(grads[True][k].grad, grads[False][k].grad, torch.float32, scale=100)


@pytest.mark.parametrize("fail_at", [0, 3, 7])
def test_parameters_restored_when_the_function_raises(fail_at):
    params, x, loss = problem()
    before = {k: v.clone() for k, v in params.items()}
    calls = []

    def failing(p, x):
        calls.append(1)
        if len(calls) == fail_at + 2:  # call 1 is the unperturbed forward
            raise RuntimeError("boom")
        return loss(p, x)

    tree = {k: v.requires_grad_() for k, v in params.items()}
    out = zo_kernels.zero_order(distributions.Normal(), "antithetic", num_samples=8, sigma=0.1, inplace=True)(failing)(
        tree, x
    )
    with pytest.raises(RuntimeError, match="boom"):
        out.backward()
    for k in params:
        torch.testing.assert_close(tree[k].detach(), before[k], rtol=8 * 3 * 2.0**-24, atol=1e-7)
        assert tree[k].grad is None


def test_estimate_inplace_matches_estimate():
    params, x, loss = problem(torch.float64)
    a = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=6, sigma=0.01, seed=2)
    b = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=6, sigma=0.01, seed=2, inplace=True)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-6, atol=1e-9)


def test_float32_drift_after_many_cycles_is_bounded():
    """1000 perturb/restore cycles move float32 parameters by a random walk of roundings."""
    backend = zo_kernels.backends.select(torch.device("cpu"), torch.float32)
    theta = torch.randn(4096)
    start = theta.clone()
    for i in range(1000):
        backend.perturb(theta, theta, "normal", 9, i, 0.01, 0)
        backend.perturb(theta, theta, "normal", 9, i, -0.01, 0)
    drift = (theta - start).abs() / start.abs().clamp_min(1e-3)
    # Each cycle rounds twice (<= 2**-24 relative each); a random walk of 2000 such steps stays
    # far below the worst case 2000 * 2**-23 = 2.4e-4.
    assert drift.max().item() < 2.4e-4
    assert drift.mean().item() < 1e-5


def test_bfloat16_drift_justifies_refusing_inplace():
    """The same cycles in bfloat16 move the parameters by far more than the perturbation's own size."""
    theta = torch.randn(4096).bfloat16()
    start = theta.clone()
    for i in range(100):
        z = zo_kernels.distributions.Normal().sample((4096,), seed=i)
        theta = (theta.float() + 0.01 * z).bfloat16()
        theta = (theta.float() - 0.01 * z).bfloat16()
    assert ((theta.float() - start.float()).abs() / start.float().abs().clamp_min(1e-3)).mean().item() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_refused(dtype):
    params, x, loss = problem()
    tree = {k: v.to(dtype).requires_grad_() for k, v in params.items()}
    out = zo_kernels.zero_order(distributions.Normal(), inplace=True)(lambda p, x: loss(p, x.to(dtype)).float())(
        tree, x
    )
    with pytest.raises(TypeError, match="inplace=True needs float32 or float64"):
        out.backward()
    with pytest.raises(TypeError, match="inplace=True needs float32 or float64"):
        zo_kernels.estimate(lambda p, x: loss(p, x.to(dtype)).float(), tree, x, inplace=True)


def test_inplace_needs_a_builtin_distribution_and_a_bool():
    with pytest.raises(ValueError, match="built-in distribution"):
        zo_kernels.zero_order(torch.distributions.Laplace(0.0, 1.0), inplace=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        zo_kernels.zero_order(distributions.Normal(), inplace="yes")


def test_non_contiguous_parameters_are_refused():
    w = torch.randn(8, 6).t().requires_grad_()
    out = zo_kernels.zero_order(distributions.Normal(), inplace=True)(lambda p: p.sum())(w)
    with pytest.raises(ValueError, match="contiguous"):
        out.backward()
