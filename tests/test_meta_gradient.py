"""ES-MAML: the meta-gradient of a whole inner loop from forward passes only (issue 18).

The ES meta-gradient is checked against the exact one (autograd through the unrolled inner loop) on a
small few-shot sinusoid problem, with the inner loop written with ``torch.func.grad`` (in the loop and
under ``batch_size``) and with ``torch.autograd.grad`` inside ``torch.enable_grad()``; and a meta-learner
whose inner adaptation is not differentiable at all trains.
"""

import pytest
import torch

import zo_kernels
from zo_kernels.distributions import Normal

HIDDEN = 8
SHAPES = [(HIDDEN, 1), (HIDDEN,), (1, HIDDEN), (1,)]


def unflatten(flat: torch.Tensor):
    out, start = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        out.append(flat[start : start + n].view(shape))
        start += n
    return out


def mse(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A 1-8-1 tanh MLP over one flat parameter vector; x, y: (points, 1)."""
    w1, b1, w2, b2 = unflatten(flat)
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


def sinusoid_tasks(tasks: int, shots: int, seed: int):
    """Support and query sets of ``tasks`` sinusoids (MAML's ranges), each (tasks, shots, 1)."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.empty(tasks, 1, 1, dtype=torch.float64).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1, dtype=torch.float64).uniform_(0.0, torch.pi, generator=g)
    x = torch.empty(tasks, 2 * shots, 1, dtype=torch.float64).uniform_(-5.0, 5.0, generator=g)
    y = amp * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def func_inner_grads(q, xs, ys):
    """Each task's inner gradient by torch.func.grad, vmapped over the tasks (q: (tasks, n))."""
    return torch.func.vmap(torch.func.grad(mse))(q, xs, ys)


def autograd_inner_grads(q, xs, ys):
    """The same by torch.autograd.grad: it needs enable_grad (the estimator evaluates under no_grad)."""
    with torch.enable_grad():
        q = q.detach().requires_grad_()
        (g,) = torch.autograd.grad(torch.func.vmap(mse)(q, xs, ys).sum(), q)
    return g


def adapted_query_loss(flat, xs, ys, xq, yq, steps=2, lr=0.01, inner_grads=func_inner_grads):
    """Mean over tasks of the query loss after ``steps`` SGD steps on each task's support set."""
    q = flat.expand(xs.shape[0], -1)
    for _ in range(steps):
        q = q - lr * inner_grads(q, xs, ys)
    return torch.func.vmap(mse)(q, xq, yq).mean()


def init(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(torch.Size(s).numel() for s in SHAPES), generator=g, dtype=torch.float64) * 0.5


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize(
    "inner_grads, batch_size",
    # the loop with torch.autograd.grad (~3 ms per evaluation here), the batch with torch.func.grad
    [(autograd_inner_grads, None), (func_inner_grads, 512)],
    ids=["loop-autograd.grad-in-enable_grad", "batched-func.grad"],
)
def test_es_meta_gradient_points_along_the_exact_one(inner_grads, batch_size):
    data = sinusoid_tasks(tasks=3, shots=10, seed=1)
    theta = init()
    exact_theta = theta.clone().requires_grad_()
    (exact,) = torch.autograd.grad(adapted_query_loss(exact_theta, *data), exact_theta)

    meta = zo_kernels.zero_order(
        Normal(), method="antithetic", num_samples=2000, sigma=1e-3, seed=5, batch_size=batch_size
    )(lambda p, *d: adapted_query_loss(p, *d, inner_grads=inner_grads))
    es_theta = theta.clone().requires_grad_()
    meta(es_theta, *data).backward()
    assert cosine(es_theta.grad, exact) >= 0.9, cosine(es_theta.grad, exact)


def test_a_non_differentiable_inner_adaptation_trains():
    """Inner step: sign-SGD with a hard pick of the better of two step sizes (argmin): no useful gradient."""

    def meta_loss(p, xs, ys, xq, yq):
        q = p.expand(xs.shape[0], -1)
        step = torch.sign(func_inner_grads(q, xs, ys))
        candidates = torch.stack([q - 0.01 * step, q - 0.1 * step])  # (2, tasks, n)
        support = torch.func.vmap(torch.func.vmap(mse), in_dims=(0, None, None))(candidates, xs, ys)
        best = support.argmin(0)  # per task: which step size fits its support set better
        q = torch.where((best == 1)[:, None], candidates[1], candidates[0])
        return torch.func.vmap(mse)(q, xq, yq).mean()

    meta = zo_kernels.zero_order(Normal(), method="antithetic", num_samples=16, sigma=0.05, batch_size=32)(meta_loss)
    theta = init(1).requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    held_out = sinusoid_tasks(tasks=16, shots=10, seed=999)
    before = meta_loss(theta.detach(), *held_out).item()
    torch.manual_seed(0)
    for step in range(100):
        opt.zero_grad()
        meta(theta, *sinusoid_tasks(tasks=8, shots=10, seed=step)).backward()
        opt.step()
    after = meta_loss(theta.detach(), *held_out).item()
    assert after < 0.8 * before, (before, after)
