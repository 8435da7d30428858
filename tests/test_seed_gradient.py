"""estimate() / SeedGradient and the ZO optimizers."""

import dataclasses
import io
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
    assert not opt.state and opt.state_dict()["state"] == {}


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


# -- state_dict, torch.save, repr ------------------------------------------------------------------


def estimate_of(num_samples, **kw):
    params, x, loss = problem()
    return zo_kernels.estimate(loss, params, x, num_samples=num_samples, sigma=0.1, seed=7, **kw)


@pytest.mark.parametrize("num_samples", [1, 16, 100_000])
def test_state_dict_stores_consecutive_ids_as_a_range(num_samples):
    sg = estimate_of(min(num_samples, 16))  # the ids estimate() draws; then many more of them
    ids, weights = torch.arange(num_samples), torch.linspace(-1, 1, num_samples, dtype=torch.float64)
    sg = dataclasses.replace(sg, sample_ids=ids, weights=weights) if num_samples > 16 else sg
    state = sg.state_dict()
    assert state["sample_ids"] == {"start": 0, "stop": num_samples}
    again = zo_kernels.SeedGradient.from_state_dict(json.loads(json.dumps(state)))
    assert again == sg and again.sample_ids.dtype == torch.int64
    # What earlier versions stored (the ids as a list) still loads, to the same estimate.
    assert zo_kernels.SeedGradient.from_state_dict({**state, "sample_ids": list(range(num_samples))}) == sg


@pytest.mark.parametrize("ids", [[3, 4, 5], [0, 2, 3], [5, 4, 3]])
def test_state_dict_of_other_ids(ids):
    sg = dataclasses.replace(estimate_of(3), sample_ids=torch.tensor(ids))
    stored = sg.state_dict()["sample_ids"]
    assert stored == ({"start": 3, "stop": 6} if ids == [3, 4, 5] else ids)
    again = zo_kernels.SeedGradient.from_state_dict(json.loads(json.dumps(sg.state_dict())))
    assert again == sg
    for a, b in zip(again.materialize(), sg.materialize()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "ids, exc, match",
    [
        ({"start": -1, "stop": 2}, ValueError, r"\['sample_ids'\]\['start'\] must be an int in \[0, 2\*\*32\)"),
        ({"start": 2, "stop": 1}, ValueError, r"\['sample_ids'\]\['stop'\] must be an int in \[2, 2\*\*64\)"),
        ({"start": 0, "stop": 2**32 + 1}, ValueError, r"\['stop'\] must be at most 2\*\*32"),
        ({"start": 0.0, "stop": 3}, TypeError, r"\['sample_ids'\]\['start'\] must be an int"),
        ({"start": 0}, ValueError, r"as a range must be \{'start': a, 'stop': b\}, got keys \['start'\]"),
        ({"start": 0, "stop": 2}, ValueError, r"state\['weights'\] must have one weight per sample id \(2\)"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"state\['sample_ids'\] entries must be an int .* dtype"),
        (torch.tensor([0, 2**40, 1]), ValueError, r"state\['sample_ids'\] entries must be an int .* got 1099511627776"),
    ],
)
def test_corrupted_sample_ids(ids, exc, match):
    state = estimate_of(3).state_dict()
    with pytest.raises(exc, match=match):
        zo_kernels.SeedGradient.from_state_dict({**state, "sample_ids": ids})


@pytest.mark.parametrize("dist", [distributions.Normal(), distributions.LowRank(2)], ids=repr)
@pytest.mark.parametrize("ids", [None, [4, 0, 9]])
def test_torch_save_and_load_with_weights_only(dist, ids):
    sg = estimate_of(4 if ids is None else 3, distribution=dist)
    if ids is not None:
        sg = dataclasses.replace(sg, sample_ids=torch.tensor(ids))
    buf = io.BytesIO()
    torch.save({"estimate": sg, "step": 3}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["estimate"]
    assert isinstance(loaded, zo_kernels.SeedGradient) and loaded == sg and loaded.rank == sg.rank
    for a, b in zip(loaded.materialize(), sg.materialize()):
        assert torch.equal(a, b)


def test_loading_a_corrupted_pickle_is_checked():
    buf = io.BytesIO()
    torch.save(dataclasses.replace(estimate_of(2), seed=-1), buf)
    buf.seek(0)
    with pytest.raises(ValueError, match=r"state\['seed'\] must be an int in \[0, 2\*\*64\)"):
        torch.load(buf, weights_only=True)


def test_equality_compares_every_field():
    sg = estimate_of(3)
    assert sg == dataclasses.replace(sg, weights=sg.weights.clone())
    assert sg != dataclasses.replace(sg, weights=sg.weights * 2)
    assert sg != dataclasses.replace(sg, seed=sg.seed + 1)
    assert sg != dataclasses.replace(sg, shapes=sg.shapes[::-1])
    assert sg != "estimate"


@pytest.mark.parametrize("num_samples", [0, 1, 1000, 100_000])
def test_repr_is_short_whatever_n(num_samples):
    sg = zo_kernels.SeedGradient(
        seed=2**64 - 1,
        sample_ids=torch.arange(num_samples),
        weights=torch.linspace(-1.2345e-300, 9.8765e300, num_samples, dtype=torch.float64),
        sigma=1.2345e-5,
        stream="rademacher",
        shapes=[torch.Size([4096, 4096])] * 999 + [torch.Size([3])],
        dtypes=[torch.bfloat16, torch.float16, torch.float32] * 333 + [torch.float64],
        loss=-1.2345e300,
        rank=2**31 - 1,
    )
    text = repr(sg)
    assert len(text) < 200, text
    assert f"seed={2**64 - 1}" in text and f"N={num_samples}" in text and "LowRank(2147483647)" in text
    assert "1000 tensors" in text and "(bf16,f16,f32,f64)" in text


# -- params as any iterable of tensors ---------------------------------------------------------------


@pytest.mark.parametrize("form", ["generator", "dict.values()", "module.parameters()"])
def test_estimate_and_apply_take_any_iterable_of_tensors(form):
    params, x, loss = problem()
    tensors = list(params.values())
    make = {
        "generator": lambda: (p for p in tensors),
        "dict.values()": lambda: params.values(),
        "module.parameters()": lambda: torch.nn.ParameterList(tensors).parameters(),
    }[form]
    seen = []

    def on_a_list(p, x):
        seen.append(type(p))
        return loss({"w": p[0], "b": p[1]}, x)

    sg = zo_kernels.estimate(on_a_list, make(), x, num_samples=3, sigma=0.05, seed=4)
    assert set(seen) == {list}  # read once into a list, which fn receives
    reference = zo_kernels.estimate(on_a_list, tensors, x, num_samples=3, sigma=0.05, seed=4)
    assert sg == reference
    expected = [p.clone() for p in tensors]
    sg.apply_(expected, 0.5)
    sg.apply_(make(), 0.5)
    for p, e in zip(tensors, expected):
        assert torch.equal(p, e)
