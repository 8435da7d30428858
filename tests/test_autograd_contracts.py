"""The contracts zero_order owes its callers as a differentiation mode (issue 18).

1. Inputs modified in place between the call and backward are caught (autograd's message, naming
   the argument); unmodified inputs are neither copied nor changed.
2. ``create_graph=True`` gives a differentiable estimate (TorchOpt's semantics), equal to the fused
   estimate for the same seed, whose derivative is the Stein second-order estimate; the modes that
   cannot record it refuse.
3. ``torch.func``: grad, jacrev, vmap (a batch of calls), their compositions and batched upstream
   gradients work; forward mode says what to use instead.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import zo_kernels
from zo_kernels import distributions

METHODS = ["naive", "forward", "antithetic"]
BUILTINS = [distributions.Normal(), distributions.Rademacher(), distributions.Sphere(), distributions.LowRank()]
A = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def weighted_square(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum(a (t - c)^2): gradient 2 a (t - c), Hessian diag(2 a)."""
    return (A.to(t) * (t - c) ** 2).sum()


def es(fn, method="antithetic", num_samples=4000, sigma=1e-2, dist=None, **kw):
    return zo_kernels.zero_order(
        dist or distributions.Normal(),
        method=method,
        num_samples=num_samples,
        sigma=sigma,
        seed=kw.pop("seed", 7),
        **kw,
    )(fn)


# -- 1. inputs versioned -----------------------------------------------------------------------------


def test_the_issue_example_raises_instead_of_a_wrong_gradient():
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    f = es(lambda w, x: (x @ w).pow(2).sum(), num_samples=200, sigma=1e-3, seed=0)
    buf = torch.empty(1, 2)
    buf.copy_(torch.tensor([[1.0, 0.0]]))
    l1 = f(w, buf)
    buf.copy_(torch.tensor([[0.0, 1.0]]))
    l2 = f(w, buf)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: argument 1 of the zero_order function"):
        (l1 + l2).backward()
    assert w.grad is None


@pytest.mark.parametrize(
    "where, modify",
    [
        ("argument 1", lambda x, nest, kw, w: x.mul_(2)),
        ("leaf 1 of argument 2", lambda x, nest, kw, w: nest["b"][0].add_(1)),
        ("keyword argument 'scale'", lambda x, nest, kw, w: kw.fill_(3)),
        ("argument 0", lambda x, nest, kw, w: w.detach().add_(1)),
    ],
    ids=["positional", "nested-pytree", "keyword", "differentiated"],
)
def test_any_tensor_of_the_call_modified_before_backward_raises_naming_it(where, modify):
    w = torch.tensor([0.5, -0.25], requires_grad=True)
    x, nest, scale = torch.ones(2), {"a": torch.ones(2), "b": [torch.ones(2)]}, torch.tensor(2.0)

    def f(w, x, nest, scale):
        return (scale * (w * x + nest["a"] + nest["b"][0]) ** 2).sum()

    loss = es(f, num_samples=8)(w, x, nest, scale=scale)
    modify(x, nest, scale, w)
    with pytest.raises(RuntimeError, match=rf"modified by an inplace operation: {where} of the zero_order function"):
        loss.backward()
    assert w.grad is None


def test_unmodified_inputs_are_used_as_they_are_not_copied():
    """The evaluations see the very tensors of the call (no copy was made), and the gradient is right."""
    w = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    x1, x2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    seen = []

    def f(w, x):
        seen.append(x)
        return (x @ w).pow(2).sum()

    loss = es(f, num_samples=2000)(w, x1) + es(f, num_samples=2000)(w, x2)
    loss.backward()
    assert len(seen) == 2 + 2 * 2 * 2000 and all(s is x1 or s is x2 for s in seen)
    assert x1._version == 0 and x2._version == 0
    torch.testing.assert_close(w.grad, torch.tensor([2.0, -2.0], dtype=torch.float64), atol=0.1, rtol=0)


def test_inference_tensors_without_a_version_counter_are_accepted():
    with torch.inference_mode():
        x = torch.ones(3)
    theta = torch.zeros(3, requires_grad=True)
    es(lambda t, x: ((t - x) ** 2).sum(), num_samples=4)(theta, x).backward()
    assert theta.grad is not None


# -- 2. create_graph=True ------------------------------------------------------------------------------


@pytest.mark.usefixtures("each_cpu_backend")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "dist", [*BUILTINS, torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))], ids=repr
)
def test_the_recorded_estimate_equals_the_fused_one(method, dist):
    """Same seed, same noise: the differentiable estimate is the fused estimate, up to rounding."""
    theta = torch.randn(4, 3, requires_grad=True)
    c = torch.randn(4, 3)
    f = es(lambda t, c: (torch.sin(t) * c).sum() + (t**2).sum(), method=method, num_samples=64, sigma=0.1, dist=dist)
    (fused,) = torch.autograd.grad(f(theta, c), theta)
    (recorded,) = torch.autograd.grad(f(theta, c), theta, create_graph=True)
    assert recorded.requires_grad
    torch.testing.assert_close(recorded, fused, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_recorded_estimate_in_other_dtypes(dtype):
    theta = torch.randn(5, dtype=dtype, requires_grad=True)
    f = es(lambda t: (t.float() ** 2).sum(), num_samples=32, sigma=0.1)
    (fused,) = torch.autograd.grad(f(theta), theta)
    (recorded,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    assert recorded.dtype == dtype and recorded.requires_grad
    tol = {torch.float64: 1e-9}.get(dtype, 2e-2)
    torch.testing.assert_close(recorded, fused, rtol=tol, atol=tol * fused.abs().max().item())


def test_batched_recording_equals_the_loop():
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    loop = es(lambda t: (torch.tanh(t) ** 2).sum(), num_samples=33)
    batched = es(lambda t: (torch.tanh(t) ** 2).sum(), num_samples=33, batch_size=8)
    (g_loop,) = torch.autograd.grad(loop(theta), theta, create_graph=True)
    (g_batch,) = torch.autograd.grad(batched(theta), theta, create_graph=True)
    torch.testing.assert_close(g_batch, g_loop)
    (h_loop,) = torch.autograd.grad(g_loop.sum(), theta)
    (h_batch,) = torch.autograd.grad(g_batch.sum(), theta)
    torch.testing.assert_close(h_batch, h_loop)


@pytest.mark.parametrize("method", ["forward", "antithetic"])
@pytest.mark.parametrize("dist", BUILTINS[:3], ids=repr)
def test_hessian_of_a_quadratic_within_noise(method, dist):
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    c = torch.zeros(3, dtype=torch.float64)
    f = es(weighted_square, method=method, dist=dist)
    hessian = torch.autograd.functional.hessian(lambda t: f(t, c), x)
    exact = torch.diag(2 * A)
    # (1/N) sum z z^T - I has entries of standard error 1/sqrt(N) ~ 0.016 at N = 4000
    assert (hessian - exact).norm() / exact.norm() < 0.1, hessian


def test_meta_gradient_of_one_inner_es_step_matches_the_exact_one():
    """d/dphi L_out(phi - lr * g_ES(phi)) against autograd through the exact inner step, N = 4000."""
    diag = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)

    def inner(p):
        return 0.5 * (diag * p * p).sum() - b @ p

    def outer(p):
        return ((p - 1) ** 2).sum()

    lr = 0.3
    phi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(es(inner, seed=3)(phi), phi, create_graph=True)
    (meta,) = torch.autograd.grad(outer(phi - lr * g), phi)
    (g_exact,) = torch.autograd.grad(inner(phi), phi, create_graph=True)
    (exact,) = torch.autograd.grad(outer(phi - lr * g_exact), phi)
    assert (meta - exact).norm() / exact.norm() < 5e-2, (meta, exact)


def test_the_upstream_gradient_is_differentiable_too():
    theta = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    f = es(lambda t: (t**2).sum(), num_samples=16)
    out = f(theta)
    (g,) = torch.autograd.grad(out, theta, grad_outputs=scale, create_graph=True)
    (d_scale,) = torch.autograd.grad(g.sum(), scale)
    torch.testing.assert_close(d_scale, (g / scale).sum().detach())


def test_double_backward_through_zero_order_gradient_module():
    """Hessian-vector products of a linear regression's MSE: 2 X^T X v / n, exactly quadratic."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)

    class Net(zo_kernels.ZeroOrderGradientModule, method="antithetic", num_samples=4000, sigma=0.05):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1, bias=False)

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.fc(x), y)

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    net = Net()
    (grad,) = torch.autograd.grad(net(x, y), list(net.parameters()), create_graph=True)
    v = torch.tensor([[1.0, -1.0, 0.5]])
    (hvp,) = torch.autograd.grad((grad * v).sum(), list(net.parameters()))
    exact = 2 * v @ (x.T @ x) / x.shape[0]
    assert (hvp - exact).norm() / exact.norm() < 0.1, (hvp, exact)


def test_nan_loss_under_create_graph_raises():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    f = es(lambda t: torch.log(t).sum(), num_samples=16, sigma=10.0, method="naive")
    with pytest.raises(zo_kernels.NonFiniteLossError, match="sample"):
        torch.autograd.grad(f(theta), theta, create_graph=True)


def test_inplace_refuses_create_graph():
    theta = torch.randn(3, requires_grad=True)
    before = theta.detach().clone()
    loss = es(lambda t: (t**2).sum(), num_samples=4, inplace=True)(theta)
    with pytest.raises(RuntimeError, match=r"create_graph=True needs a differentiable estimate .* inplace=True"):
        torch.autograd.grad(loss, theta, create_graph=True)
    assert torch.equal(theta.detach(), before)
    with pytest.raises(RuntimeError, match=r"torch.func needs a differentiable estimate .* inplace=True"):
        torch.func.grad(es(lambda t: (t**2).sum(), num_samples=4, inplace=True))(theta.detach())


def test_process_group_refuses_create_graph():
    theta = torch.randn(3, requires_grad=True)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        loss = es(lambda t: (t**2).sum(), num_samples=4, process_group=dist.group.WORLD)(theta)
        with pytest.raises(RuntimeError, match=r"create_graph=True needs a differentiable estimate .* process_group"):
            torch.autograd.grad(loss, theta, create_graph=True)
    finally:
        dist.destroy_process_group()


# -- 3. torch.func ----------------------------------------------------------------------------------------


def fused_grad(f, *args):
    leaf = args[0].detach().requires_grad_()
    (g,) = torch.autograd.grad(f(leaf, *args[1:]), leaf)
    return g


def test_func_grad_and_jacrev_equal_the_fused_estimate():
    f = es(weighted_square, num_samples=256)
    x, c = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    expected = fused_grad(f, x, c)
    torch.testing.assert_close(torch.func.grad(f)(x, c), expected)
    torch.testing.assert_close(torch.func.jacrev(f)(x, c), expected)
    batched = es(weighted_square, num_samples=256, batch_size=16)
    torch.testing.assert_close(torch.func.grad(batched)(x, c), expected)


def test_vmap_over_a_batch_of_tasks_calls_zero_order_per_task():
    f = es(weighted_square, num_samples=256)
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    tasks = torch.randn(4, 3, dtype=torch.float64)
    values = torch.func.vmap(f, in_dims=(None, 0))(x, tasks)
    torch.testing.assert_close(values, torch.stack([weighted_square(x, c) for c in tasks]))
    per_task = torch.stack([fused_grad(f, x, c) for c in tasks])
    # the gradient of the batch's mean is the mean of each task's estimate
    mean_grad = torch.func.grad(lambda x: torch.func.vmap(f, in_dims=(None, 0))(x, tasks).mean())(x)
    torch.testing.assert_close(mean_grad, per_task.mean(0))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(x, tasks), per_task)
    leaf = x.clone().requires_grad_()
    torch.func.vmap(f, in_dims=(None, 0))(leaf, tasks).mean().backward()
    torch.testing.assert_close(leaf.grad, per_task.mean(0))


def test_jacrev_of_jacrev_is_the_hessian_estimate():
    f = es(weighted_square)
    x, c = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    hessian = torch.func.jacrev(torch.func.jacrev(f))(x, c)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(lambda t: f(t, c), x))
    assert (hessian - torch.diag(2 * A)).norm() / torch.diag(2 * A).norm() < 0.1


def test_batched_upstream_gradients():
    f = es(weighted_square, num_samples=64)
    x, c = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    upstream = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (batched,) = torch.autograd.grad(f(leaf, c), leaf, upstream, is_grads_batched=True)
    torch.testing.assert_close(batched, upstream[:, None] * fused_grad(f, x, c))


@pytest.mark.parametrize(
    "transform",
    [
        lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
        lambda f, x: torch.func.jacfwd(f)(x),
        lambda f, x: torch.func.hessian(f)(x),
    ],
    ids=["jvp", "jacfwd", "hessian"],
)
def test_forward_mode_says_what_to_use_instead(transform):
    f = es(lambda t: (t**2).sum(), num_samples=4)
    with pytest.raises(RuntimeError, match=r"zo_kernels.zero_order has no forward-mode derivative .*jacrev"):
        transform(f, torch.ones(3))


def test_estimates_stay_unbiased_in_magnitude():
    """Guard against a double application of the upstream gradient or sigma in the recorded path."""
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    g = torch.func.grad(es(weighted_square, num_samples=4000))(x, torch.zeros(3, dtype=torch.float64))
    assert math.isclose(g.norm().item(), (2 * A * x).norm().item(), rel_tol=0.05)
