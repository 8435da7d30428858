"""Zero-order optimizers that step from a :class:`~zo_kernels.seed_gradient.SeedGradient`.

``ZOSGD`` without momentum keeps no state at all: each step is the fused ``step`` kernel
``theta -= lr * sum_i w_i z_i``, so training needs the memory of inference plus N scalars (MeZO's
footprint). Momentum and Adam need per-parameter state, as their first-order versions do, and
materialize the gradient once per step.
"""

from __future__ import annotations

from typing import Any, List

import torch
from torch.utils import _pytree as pytree

from .config import check_real
from .ops.spec import accumulation_dtype
from .seed_gradient import SeedGradient


def _leaves(params: Any) -> List[torch.Tensor]:
    leaves = list(params) if isinstance(params, (list, tuple)) else pytree.tree_leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one tensor")
    for k, p in enumerate(leaves):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params leaf {k} must be a floating-point tensor, got {type(p).__name__}")
        if not p.dtype.is_floating_point:
            raise TypeError(f"params leaf {k} must be a floating-point tensor, got dtype {p.dtype}")
    return leaves


def _check_lr(lr: float) -> float:
    return check_real(lr, "lr", lo=0.0)


def _check_grad(grad: Any) -> SeedGradient:
    if not isinstance(grad, SeedGradient):
        raise TypeError(f"step needs a SeedGradient (from zo_kernels.estimate), got {type(grad).__name__}")
    return grad


def _check_betas(betas: Any) -> tuple:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    try:
        return tuple(check_real(b, "betas", lo=0.0, hi=1.0) for b in betas)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"betas must be two numbers in [0, 1), got {betas!r}") from None


class ZOSGD:
    """Stochastic gradient descent on seed-compressed gradients, with optional (heavy-ball) momentum.

    Args:
        params: the tensors (a list, or any pytree) that the estimates are made for, in the same order.
        lr: learning rate.
        momentum: heavy-ball coefficient; 0 (the default) keeps no state.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.0) -> None:
        self.params = _leaves(params)
        self.lr = _check_lr(lr)
        self.momentum = check_real(momentum, "momentum", lo=0.0, hi=1.0)
        self.buffers: List[torch.Tensor] = []

    @torch.no_grad()
    def step(self, grad: SeedGradient) -> None:
        """``theta -= lr * g`` (or ``lr * buf`` with ``buf = momentum * buf + g``)."""
        _check_grad(grad)
        if self.momentum == 0.0:
            grad.apply_(self.params, self.lr)
            return
        grad._check_layout(self.params)
        g = grad.materialize(self.params[0].device)
        if not self.buffers:
            self.buffers = [gk.clone() for gk in g]
        else:
            for buf, gk in zip(self.buffers, g):
                buf.mul_(self.momentum).add_(gk)
        for p, buf in zip(self.params, self.buffers):
            p.sub_(buf.to(p.device), alpha=self.lr)

    def state_dict(self) -> dict:
        """Learning rate, momentum and momentum buffers."""
        return {"lr": self.lr, "momentum": self.momentum, "buffers": [b.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (checked before anything changes)."""
        lr, momentum = _check_lr(state["lr"]), check_real(state["momentum"], "momentum", lo=0.0, hi=1.0)
        buffers = [b.clone() for b in state["buffers"]]
        if buffers and [b.shape for b in buffers] != [p.shape for p in self.params]:
            raise ValueError("state['buffers'] must be empty or match the parameters' shapes")
        self.lr, self.momentum, self.buffers = lr, momentum, buffers


class ZOAdam:
    """Adam (Kingma & Ba, 2015) on seed-compressed gradients, with bias correction.

    Args:
        params: the tensors the estimates are made for, in the same order.
        lr, betas, eps: as for ``torch.optim.Adam``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = _leaves(params)
        self.lr = _check_lr(lr)
        self.betas = _check_betas(betas)
        self.eps = check_real(eps, "eps", lo=0.0)
        if self.eps == 0.0:
            raise ValueError(f"eps must be a finite real number > 0, got {eps!r}")
        self.t = 0
        self.m = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in self.params]
        self.v = [torch.zeros_like(m) for m in self.m]

    @torch.no_grad()
    def step(self, grad: SeedGradient) -> None:
        """One Adam update from the materialized estimate (nothing changes if the estimate is unusable)."""
        _check_grad(grad)._check_layout(self.params)
        grads = grad.materialize(self.params[0].device)
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v, g in zip(self.params, self.m, self.v, grads):
            g = g.to(device=m.device, dtype=m.dtype)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (m / c1) / ((v / c2).sqrt_().add_(self.eps))
            p.sub_(update.to(p.dtype), alpha=self.lr)

    def state_dict(self) -> dict:
        """Step count, hyper-parameters and moment estimates."""
        return {"t": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (checked before anything changes)."""
        t = state["t"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"state['t'] must be an int >= 0, got {t!r}")
        lr, betas, eps = _check_lr(state["lr"]), _check_betas(state["betas"]), check_real(state["eps"], "eps", lo=0.0)
        m, v = [x.clone() for x in state["m"]], [x.clone() for x in state["v"]]
        if [x.shape for x in m] != [p.shape for p in self.params] or [x.shape for x in v] != [x.shape for x in m]:
            raise ValueError("state['m'] and state['v'] must match the parameters' shapes")
        self.t, self.lr, self.betas, self.eps, self.m, self.v = t, lr, betas, eps, m, v
