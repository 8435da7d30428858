"""zero_order: estimator correctness (known gradients), autograd integration, pytrees, reproducibility."""

import math

import pytest
import torch

import zo_kernels
from zo_kernels import distributions

pytestmark = pytest.mark.usefixtures("each_cpu_backend")

METHODS = ["naive", "forward", "antithetic"]
BUILTINS = [distributions.Normal(), distributions.Rademacher(), distributions.Sphere(), distributions.LowRank()]


def quadratic(d: int = 6, offset: float = 0.0, seed: int = 0):
    """f(x) = 0.5 x'Ax + b'x + offset, with its exact gradient. Gaussian smoothing keeps the gradient."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    a = m @ m.T + 0.5 * torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(d, generator=g, dtype=torch.float64)

    def f(theta):
        return 0.5 * theta @ (a @ theta) + b @ theta + offset

    return f, x, a @ x + b


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dist", BUILTINS, ids=repr)
def test_unbiased_on_a_quadratic_fused(method, dist):
    # sigma=0.5: a gradient scaled by sigma**2 (TorchOpt 0.7.3's 'forward') would be off by 4x.
    # The offset makes a wrong baseline in 'forward' blow the variance up by orders of magnitude.
    f, x, true_grad = quadratic(offset=3.0 if method != "naive" else 0.0)
    loss_fn = zo_kernels.zero_order(dist, method=method, num_samples=1000, sigma=0.5, seed=11)(f)
    theta = x.clone().requires_grad_()
    loss = loss_fn(theta)
    assert torch.equal(loss.detach(), f(x))
    loss.backward()
    err = (theta.grad - true_grad).norm() / true_grad.norm()
    # About 3 standard errors of each estimator at N=1000; a sigma**2 scale error gives err >= 0.75.
    assert err < {"naive": 0.5, "forward": 0.3, "antithetic": 0.25}[method], err


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_on_a_quadratic_with_a_user_distribution(method):
    f, x, true_grad = quadratic(offset=3.0)
    dist = torch.distributions.Laplace(torch.tensor(0.0, dtype=torch.float64), math.sqrt(0.5))  # unit variance
    loss_fn = zo_kernels.zero_order(dist, method=method, num_samples=1000, sigma=0.5, seed=3)(f)
    theta = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(theta), theta)
    err = (grad - true_grad).norm() / true_grad.norm()
    assert err < {"naive": 0.5, "forward": 0.3, "antithetic": 0.25}[method], err


def test_forward_method_fixes_torchopt_scale_and_baseline():
    """On a linear f with a large constant, 'forward' is exact in expectation and low-variance."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(theta):
        return 100.0 + g @ theta

    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    loss_fn = zo_kernels.zero_order(distributions.Normal(), method="forward", num_samples=1000, sigma=0.1, seed=1)(f)
    loss_fn(theta).backward()
    # (f(θ+σz) - f(θ))/σ · z = (gᵀz) z exactly, so the estimate is the sample mean of z zᵀ g, whose
    # relative error is about sqrt((d+1)/N) = 0.06.
    assert (theta.grad - g).norm() / g.norm() < 0.2


def test_forward_method_disagrees_with_torchopt_073():
    torchopt = pytest.importorskip("torchopt")
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(theta):
        return 100.0 + g @ theta

    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    theirs_fn = torchopt.diff.zero_order(normal, method="forward", num_samples=1000, sigma=0.1)(f)
    (theirs,) = torch.autograd.grad(theirs_fn(theta), theta)
    ours_fn = zo_kernels.zero_order(normal, method="forward", num_samples=1000, sigma=0.1)(f)
    (ours,) = torch.autograd.grad(ours_fn(theta), theta)
    assert (ours - g).norm() / g.norm() < 0.2
    assert (theirs - g).norm() / g.norm() > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_chain_rule_scales_by_the_upstream_gradient(method):
    f, x, _ = quadratic()
    loss_fn = zo_kernels.zero_order(distributions.Normal(), method=method, num_samples=20, sigma=0.1, seed=5)(f)
    theta = x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(loss_fn(theta), theta)
    (g3,) = torch.autograd.grad(-3.0 * loss_fn(theta), theta)
    (g2,) = torch.autograd.grad(loss_fn(theta), theta, grad_outputs=torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(g3, -3 * g1)
    torch.testing.assert_close(g2, 2 * g1)


def test_pytree_leaves_share_the_flat_stream():
    """A dict/tuple/list split of the parameters gives exactly the gradient of the flat vector."""
    f, x, _ = quadratic(d=9)

    def f_tree(tree, scale):
        flat = torch.cat([tree["a"], tree["bc"][0].reshape(-1), tree["bc"][1][0]])
        return scale * f(flat)

    kwargs = dict(method="antithetic", num_samples=50, sigma=0.2, seed=123)
    flat = x.clone().requires_grad_()
    zo_kernels.zero_order(distributions.Normal(), **kwargs)(lambda t, s: s * f(t))(flat, 2.0).backward()
    tree = {"a": x[:2].clone(), "bc": (x[2:6].reshape(2, 2).clone(), [x[6:].clone()])}
    leaves = [tree["a"], tree["bc"][0], tree["bc"][1][0]]
    for leaf in leaves:
        leaf.requires_grad_()
    zo_kernels.zero_order(distributions.Normal(), **kwargs)(f_tree)(tree, 2.0).backward()
    got = torch.cat([leaf.grad.reshape(-1) for leaf in leaves])
    torch.testing.assert_close(got, flat.grad)


def test_argnums_tuple_and_passthrough_arguments():
    seen = []

    def f(a, data, b, note, missing):
        seen.append((note, missing))
        return ((a - data) ** 2).sum() + (b**2).sum()

    a = torch.ones(3, requires_grad=True)
    b = torch.full((2,), 2.0, requires_grad=True)
    data = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    loss_fn = zo_kernels.zero_order(distributions.Normal(), "antithetic", (0, 2), 1000, 0.1, seed=2)(f)
    loss = loss_fn(a, data, b, {"k": object()}, None)
    loss.backward()
    torch.testing.assert_close(a.grad, 2 * (a - data).detach(), atol=0.6, rtol=0)
    torch.testing.assert_close(b.grad, 2 * b.detach(), atol=0.6, rtol=0)
    assert data.grad is None
    assert all(missing is None and set(note) == {"k"} for note, missing in seen)


def test_int_argnums_and_negative_index():
    f, x, _ = quadratic()
    for argnums in (1, -1, (1,)):
        fn = zo_kernels.zero_order(distributions.Normal(), argnums=argnums, num_samples=5, seed=0)
        theta = x.clone().requires_grad_()
        fn(lambda unused, t: f(t))("ignored", theta).backward()
        assert theta.grad is not None and theta.grad.shape == x.shape


def test_keyword_arguments_pass_through():
    fn = zo_kernels.zero_order(distributions.Normal(), num_samples=3, seed=0)(lambda t, *, scale: scale * (t**2).sum())
    theta = torch.ones(2, requires_grad=True)
    loss = fn(theta, scale=2.0)
    assert loss.item() == 4.0
    loss.backward()
    assert theta.grad.shape == (2,)


def _draw_normal(shape):
    return torch.randn(shape)


class _Samplable:
    def sample(self, sample_shape=torch.Size()):
        return torch.randn(sample_shape)


@pytest.mark.parametrize(
    "dist",
    [
        distributions.Normal(),
        distributions.Rademacher(),
        distributions.Sphere(),
        torch.distributions.Normal(0.0, 1.0),
        torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0)),
        torch.distributions.Uniform(-math.sqrt(3.0), math.sqrt(3.0)),
        _Samplable(),
        _draw_normal,
    ],
    ids=["Normal", "Rademacher", "Sphere", "torch-Normal", "torch-Normal-tensors", "torch-Uniform", "samplable", "fn"],
)
def test_every_distribution_form(dist):
    f, x, true_grad = quadratic(d=4)
    theta = x.float().clone().requires_grad_()
    fn = zo_kernels.zero_order(dist, method="antithetic", num_samples=1000, sigma=0.1)(lambda t: f(t.double()).float())
    fn(theta).backward()
    assert theta.grad.dtype == torch.float32
    # Antithetic differences of a quadratic are exactly linear in z: error about sqrt((d+1)/N) = 0.07.
    assert (theta.grad.double() - true_grad).norm() / true_grad.norm() < 0.25


def test_standard_normal_routes_to_the_fused_stream():
    assert distributions.as_fused(torch.distributions.Normal(0.0, 1.0)) == distributions.Normal()
    assert distributions.as_fused(torch.distributions.Normal(0.0, 2.0)) is None
    assert distributions.as_fused(torch.distributions.Normal(torch.zeros(3), torch.ones(3))) is None


@pytest.mark.parametrize("dist", BUILTINS + [torch.distributions.Laplace(0.0, 1.0)], ids=repr)
def test_reproducible_with_seed_and_with_manual_seed(dist):
    f, x, _ = quadratic()

    def grad_of(**kw):
        theta = x.clone().requires_grad_()
        zo_kernels.zero_order(dist, method="forward", num_samples=16, sigma=0.1, **kw)(f)(theta).backward()
        return theta.grad

    torch.manual_seed(0)
    a = grad_of(seed=77)
    torch.manual_seed(1)
    b = grad_of(seed=77)
    assert torch.equal(a, b)
    torch.manual_seed(42)
    c = grad_of()
    torch.manual_seed(42)
    d = grad_of()
    assert torch.equal(c, d)
    assert not torch.equal(grad_of(), grad_of())
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    e1, e2 = grad_of(seed=g1), grad_of(seed=g2)
    assert torch.equal(e1, e2)
    assert not torch.equal(grad_of(seed=g1), e1)


def test_fixed_seed_does_not_disturb_the_global_rng():
    state = torch.random.get_rng_state()
    theta = torch.ones(3, requires_grad=True)
    zo_kernels.zero_order(torch.distributions.Laplace(0.0, 1.0), num_samples=4, seed=1)(lambda t: t.sum())(
        theta
    ).backward()
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gradient_dtype_follows_the_parameter(dtype):
    theta = torch.ones(5, dtype=dtype, requires_grad=True)
    fn = zo_kernels.zero_order(distributions.Normal(), method="antithetic", num_samples=8, sigma=0.1, seed=0)
    fn(lambda t: (t.float() ** 2).sum())(theta).backward()
    assert theta.grad.dtype == dtype and torch.isfinite(theta.grad.float()).all()


def test_only_requires_grad_leaves_receive_gradients():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2)
    fn = zo_kernels.zero_order(distributions.Normal(), num_samples=2, seed=0)(lambda p: (p[0] * p[1]).sum())
    fn((a, b)).backward()
    assert a.grad is not None and b.grad is None


def test_no_perturbation_leaks_into_the_parameters():
    theta = torch.randn(10, requires_grad=True)
    before = theta.detach().clone()
    for method in METHODS:
        zo_kernels.zero_order(distributions.Normal(), method=method, num_samples=5, seed=0)(lambda t: (t**2).sum())(
            theta
        ).backward()
    assert torch.equal(theta.detach(), before)


def test_diff_zero_order_is_the_same_callable_and_a_module():
    import types

    from zo_kernels.diff import zero_order as zo_module

    assert isinstance(zo_module, types.ModuleType)
    assert zo_module.zero_order is zo_kernels.zero_order
    assert zo_module.nn.ZeroOrderGradientModule is zo_kernels.ZeroOrderGradientModule
    theta = torch.ones(3, requires_grad=True)
    fn = zo_kernels.diff.zero_order(distributions.Normal(), method="antithetic", num_samples=3, seed=4)
    fn(lambda t: (t**2).sum())(theta).backward()
    ref = torch.ones(3, requires_grad=True)
    zo_kernels.zero_order(distributions.Normal(), method="antithetic", num_samples=3, seed=4)(lambda t: (t**2).sum())(
        ref
    ).backward()
    assert torch.equal(theta.grad, ref.grad)


def test_backward_twice_with_retain_graph_accumulates():
    theta = torch.ones(3, requires_grad=True)
    loss = zo_kernels.zero_order(distributions.Normal(), num_samples=3, seed=4)(lambda t: (t**2).sum())(theta)
    loss.backward(retain_graph=True)
    first = theta.grad.clone()
    loss.backward()
    torch.testing.assert_close(theta.grad, 2 * first)
