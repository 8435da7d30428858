"""estimate() / SeedGradient and the ZO optimizers."""

import json

import pytest
import torch

import zo_kernels
from zo_kernels import distributions
from zo_kernels.optim import ZOSGD, ZOAdam

from helpers import assert_close

pytestmark = pytest.mark.usefixtures("each_cpu_backend")

METHODS = ["naive", "forward", "antithetic"]
DISTS = [distributions.Normal(), distributions.Rademacher(), distributions.Sphere(), distributions.LowRank(3)]


def problem():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(300, 120, generator=g), "b": torch.randn(120, generator=g, dtype=torch.float64)}
    x = torch.randn(8, 300, generator=g)

    def loss(p, x, scale=1.0):
        return scale * ((x @ p["w"]).double() + p["b"]).tanh().square().mean()

    return params, x, loss


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dist", DISTS, ids=repr)
def test_materialize_equals_the_zero_order_gradient(method, dist):
    params, x, loss = problem()
    kw = dict(method=method, num_samples=6, sigma=0.05, seed=42)
    sg = zo_kernels.estimate(loss, params, x, distribution=dist, scale=2.0, **kw)
    tree = {k: v.clone().requires_grad_() for k, v in params.items()}
    zo_kernels.zero_order(dist, **kw)(loss)(tree, x, scale=2.0).backward()
    got = sg.materialize()
    assert sg.loss == pytest.approx(loss(params, x, 2.0).item())
    assert [tuple(s) for s in sg.shapes] == [tuple(p.shape) for p in params.values()]
    # The decorator may accumulate kept noise where estimate() regenerates it: same sum, other rounding.
    for g, k in zip(got, params):
        assert_close(g, tree[k].grad, params[k].dtype, scale=10)


def test_apply_equals_theta_minus_lr_g():
    params, x, loss = problem()
    sg = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=5, sigma=0.05, seed=1)
    expected = [p - 0.3 * g for p, g in zip(params.values(), sg.materialize())]
    sg.apply_(params, 0.3)
    for p, e in zip(params.values(), expected):
        assert_close(p, e, p.dtype, scale=10)


def test_state_dict_round_trip_is_json_and_exact():
    params, x, loss = problem()
    sg = zo_kernels.estimate(loss, params, x, distribution=distributions.Sphere(), num_samples=4, sigma=0.1, seed=7)
    state = json.loads(json.dumps(sg.state_dict()))
    again = zo_kernels.SeedGradient.from_state_dict(state)
    for a, b in zip(sg.materialize(), again.materialize()):
        assert torch.equal(a, b)
    blank = zo_kernels.SeedGradient.from_state_dict(state)
    blank.load_state_dict(sg.state_dict())
    assert blank.seed == sg.seed and torch.equal(blank.weights, sg.weights)


def test_estimate_is_reproducible_and_seeded():
    params, x, loss = problem()
    a = zo_kernels.estimate(loss, params, x, num_samples=3, seed=5)
    b = zo_kernels.estimate(loss, params, x, num_samples=3, seed=5)
    assert a.seed == b.seed == 5 and torch.equal(a.weights, b.weights)
    torch.manual_seed(3)
    c = zo_kernels.estimate(loss, params, x, num_samples=3)
    torch.manual_seed(3)
    d = zo_kernels.estimate(loss, params, x, num_samples=3)
    assert c.seed == d.seed and torch.equal(c.weights, d.weights)


def test_estimate_errors():
    params, x, loss = problem()
    with pytest.raises(TypeError, match="counter-based stream"):
        zo_kernels.estimate(loss, params, x, distribution=torch.distributions.Laplace(0.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        zo_kernels.estimate(loss, params, x, method="sideways")
    with pytest.raises(TypeError, match="leaf 0 of params"):
        zo_kernels.estimate(loss, {"w": torch.ones(3, dtype=torch.int64)}, x)
    sg = zo_kernels.estimate(loss, params, x, num_samples=2, seed=1)
    with pytest.raises(ValueError, match="layout"):
        sg.apply_([torch.zeros(3)], 0.1)


def test_zosgd_without_momentum_is_apply_and_keeps_no_state():
    params, x, loss = problem()
    twin = {k: v.clone() for k, v in params.items()}
    opt = ZOSGD(list(params.values()), lr=0.2)
    sg = zo_kernels.estimate(loss, params, x, method="forward", num_samples=3, sigma=0.05, seed=9)
    opt.step(sg)
    sg.apply_(twin, 0.2)
    for p, q in zip(params.values(), twin.values()):
        assert torch.equal(p, q)
    assert opt.buffers == [] and opt.state_dict()["buffers"] == []


def test_zosgd_momentum_matches_the_formula():
    params, x, loss = problem()
    leaves = list(params.values())
    start = [p.clone() for p in leaves]
    opt = ZOSGD(leaves, lr=0.1, momentum=0.9)
    g1 = zo_kernels.estimate(loss, params, x, num_samples=2, sigma=0.05, seed=1)
    opt.step(g1)
    g2 = zo_kernels.estimate(loss, params, x, num_samples=2, sigma=0.05, seed=2)
    opt.step(g2)
    m1, m2 = g1.materialize(), g2.materialize()
    for p, p0, a, b in zip(leaves, start, m1, m2):
        expected = p0 - 0.1 * a - 0.1 * (0.9 * a + b)
        assert_close(p, expected, p.dtype, scale=10)


def test_zoadam_matches_the_formula_and_trains():
    params, x, loss = problem()
    leaves = list(params.values())
    start = [p.clone() for p in leaves]
    opt = ZOAdam(leaves, lr=0.01)
    g = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=4, sigma=0.05, seed=3)
    opt.step(g)
    for p, p0, gk in zip(leaves, start, g.materialize()):
        gk = gk.double()
        m, v = 0.1 * gk / 0.1, 0.001 * gk * gk / 0.001
        assert_close(p, p0 - 0.01 * m / (v.sqrt() + 1e-8), p.dtype, scale=10)
    target = torch.linspace(-1, 1, 20)
    theta = [torch.zeros(20)]

    def quadratic(p):
        return ((p[0] - target) ** 2).sum()

    adam = ZOAdam(theta, lr=0.05)
    for step in range(60):
        adam.step(zo_kernels.estimate(quadratic, theta, method="antithetic", num_samples=8, sigma=0.01, seed=step))
    assert quadratic(theta).item() < 0.2 * ((target**2).sum().item())


def test_optimizer_argument_errors():
    with pytest.raises(ValueError, match="lr"):
        ZOSGD([torch.zeros(2)], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        ZOSGD([torch.zeros(2)], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="betas"):
        ZOAdam([torch.zeros(2)], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="at least one tensor"):
        ZOSGD([], lr=0.1)
