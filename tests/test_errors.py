"""Bad input gets a clear error naming the argument, before any evaluation; failures lose nothing."""

import math

import pytest
import torch

import zo_kernels
from zo_kernels import distributions

from helpers import counting

pytestmark = pytest.mark.usefixtures("each_cpu_backend")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(method="backward"), ValueError, "'naive', 'forward', 'antithetic'"),
        (dict(method=None), ValueError, "method must be one of"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(num_samples=-3), ValueError, "num_samples"),
        (dict(num_samples=2.0), TypeError, "num_samples"),
        (dict(num_samples=True), TypeError, "num_samples"),
        (dict(sigma=0.0), ValueError, "sigma"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(sigma=math.nan), ValueError, "sigma"),
        (dict(sigma=math.inf), ValueError, "sigma"),
        (dict(sigma="0.1"), TypeError, "sigma"),
        (dict(argnums=(0, 0)), ValueError, "argnums"),
        (dict(argnums=()), TypeError, "argnums"),
        (dict(argnums=1.5), TypeError, "argnums"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed="abc"), TypeError, "seed"),
        (dict(backend="fortran"), ValueError, "unknown backend .*available: .*reference"),
        (dict(backend=3), TypeError, "backend"),
    ],
)
def test_invalid_settings_fail_at_decoration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        zo_kernels.zero_order(distributions.Normal(), **kwargs)


def test_distribution_neither_samplable_nor_callable():
    with pytest.raises(TypeError, match="distribution must have a .sample"):
        zo_kernels.zero_order(42)


def test_sigma_accepts_a_one_element_tensor():
    zo_kernels.zero_order(distributions.Normal(), sigma=torch.tensor(0.1))


@pytest.mark.parametrize("argnums", [2, -3, (0, 5), (0, -2)])
def test_argnums_out_of_range_or_repeated_at_call(argnums):
    f = counting(lambda a, b: (a * b).sum())
    fn = zo_kernels.zero_order(distributions.Normal(), argnums=argnums)(f)
    with pytest.raises(ValueError, match="argnums"):
        fn(torch.ones(2, requires_grad=True), torch.ones(2))
    assert not f.calls


@pytest.mark.parametrize(
    "arg,match",
    [
        (torch.ones(3, dtype=torch.int64), "argument 0 must be a floating-point tensor, got dtype torch.int64"),
        ((torch.ones(2), torch.ones(2, dtype=torch.bool)), "leaf 1 of argument 0"),
        ({"w": torch.ones(2), "n": 3}, "leaf 1 of argument 0 must be a floating-point tensor, got int"),
        (1.0, "argument 0 must be a floating-point tensor, got float"),
    ],
)
def test_non_floating_differentiated_arguments(arg, match):
    f = counting(lambda p: torch.tensor(0.0))
    with pytest.raises(TypeError, match=match):
        zo_kernels.zero_order(distributions.Normal())(f)(arg)
    assert not f.calls


@pytest.mark.parametrize(
    "output,exc,match",
    [
        (3.0, TypeError, "must return a floating-point scalar tensor, got float"),
        (torch.ones(2), RuntimeError, r"scalar \(0-dim\) tensor, got shape \(2,\)"),
        (torch.tensor(3), TypeError, "got dtype torch.int64"),
    ],
)
def test_bad_outputs(output, exc, match):
    theta = torch.ones(2, requires_grad=True)
    with pytest.raises(exc, match=match):
        zo_kernels.zero_order(distributions.Normal())(lambda t: output)(theta)


def test_bad_output_of_a_perturbed_evaluation_names_the_sample():
    calls = []

    def f(t):
        calls.append(1)
        return t.sum() if len(calls) < 3 else t

    theta = torch.ones(2, requires_grad=True)
    loss = zo_kernels.zero_order(distributions.Normal(), num_samples=4, seed=1)(f)(theta)
    with pytest.raises(RuntimeError, match="sample 1"):
        loss.backward()
    assert theta.grad is None


@pytest.mark.parametrize(
    "sampler,exc,match",
    [
        (lambda shape: torch.randn(3), ValueError, r"has shape \(3,\), expected \(2, 2\)"),
        (lambda shape: torch.randn(*shape, 2), ValueError, "expected"),
        (lambda shape: "noise", TypeError, "must be a tensor"),
    ],
)
def test_samples_of_the_wrong_shape_or_type(sampler, exc, match):
    f = counting(lambda t: t.sum())
    theta = torch.ones(2, 2, requires_grad=True)
    loss = zo_kernels.zero_order(sampler, num_samples=2)(f)(theta)
    with pytest.raises(exc, match=match):
        loss.backward()
    assert len(f.calls) == 1  # only the unperturbed forward ran
    assert theta.grad is None


def test_batched_torch_distribution_is_a_shape_error():
    dist = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    theta = torch.ones(2, requires_grad=True)
    loss = zo_kernels.zero_order(dist)(lambda t: t.sum())(theta)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2,\)"):
        loss.backward()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dist", [distributions.Normal(), torch.distributions.Laplace(0.0, 1.0)], ids=repr)
def test_non_finite_losses_name_the_sample_and_the_seed(bad, dist):
    calls = []

    def f(t):
        calls.append(1)
        return t.sum() * (bad if len(calls) == 4 else 1.0)

    theta = torch.ones(3, requires_grad=True)
    loss = zo_kernels.zero_order(dist, num_samples=5, seed=99)(f)(theta)
    with pytest.raises(zo_kernels.NonFiniteLossError, match=r"sample 2 .*seed=99"):
        loss.backward()
    assert theta.grad is None


def test_non_finite_baseline_of_the_forward_method():
    theta = torch.ones(3, requires_grad=True)
    loss = zo_kernels.zero_order(distributions.Normal(), method="forward", num_samples=2)(lambda t: t.sum() / 0.0)(
        theta
    )
    with pytest.raises(zo_kernels.NonFiniteLossError, match="unperturbed loss"):
        loss.backward()


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
@pytest.mark.parametrize("dist", [distributions.Normal(), torch.distributions.Laplace(0.0, 1.0)], ids=repr)
def test_a_raising_function_leaves_everything_untouched(method, dist):
    calls = []

    def f(t, data):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("boom")
        return ((t - data) ** 2).sum()

    theta = torch.randn(4, requires_grad=True)
    data = torch.randn(4)
    before, data_before = theta.detach().clone(), data.clone()
    loss = zo_kernels.zero_order(dist, method=method, num_samples=4, seed=5)(f)(theta, data)
    with pytest.raises(KeyError, match="boom") as info:
        loss.backward()
    assert torch.equal(theta.detach(), before) and torch.equal(data, data_before)
    assert theta.grad is None
    notes = " ".join(getattr(info.value, "__notes__", []))
    if hasattr(info.value, "add_note"):
        assert "sample" in notes and "seed=5" in notes


def test_backend_forced_by_environment(monkeypatch):
    monkeypatch.setenv("ZO_KERNELS_BACKEND", "nope")
    theta = torch.ones(2, requires_grad=True)
    loss = zo_kernels.zero_order(distributions.Normal())(lambda t: t.sum())(theta)
    with pytest.raises(ValueError, match="unknown backend 'nope'; available: .*reference"):
        loss.backward()


def test_backends_available_says_why():
    status = zo_kernels.backends.available()
    assert status["reference"] == "available"
    assert set(status) >= {"reference", "cpu", "triton", "cuda"}
    assert all(isinstance(v, str) and v for v in status.values())
