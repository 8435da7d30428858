"""Zero-order optimizers that step from a :class:`~zo_kernels.seed_gradient.SeedGradient`.

``ZOSGD`` without momentum keeps no state at all: each step is the fused ``step`` kernel
``theta -= lr * sum_i w_i z_i``, so training needs the memory of inference plus N scalars (MeZO's
footprint). Momentum and Adam need per-parameter state, as their first-order versions do, and
materialize the gradient once per step.
"""

from __future__ import annotations

import math
from typing import Any, List

import torch
from torch.utils import _pytree as pytree

from .reference.noise import accumulation_dtype
from .seed_gradient import SeedGradient


def _leaves(params: Any) -> List[torch.Tensor]:
    leaves = list(params) if isinstance(params, (list, tuple)) else pytree.tree_leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one tensor")
    for k, p in enumerate(leaves):
        if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
            raise TypeError(f"params leaf {k} must be a floating-point tensor, got {type(p).__name__}")
    return leaves


def _check_lr(lr: float) -> float:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    return float(lr)


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
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.buffers: List[torch.Tensor] = []

    @torch.no_grad()
    def step(self, grad: SeedGradient) -> None:
        """``theta -= lr * g`` (or ``lr * buf`` with ``buf = momentum * buf + g``)."""
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
        """Restore what :meth:`state_dict` returned."""
        self.lr, self.momentum = _check_lr(state["lr"]), float(state["momentum"])
        self.buffers = [b.clone() for b in state["buffers"]]


class ZOAdam:
    """Adam (Kingma & Ba, 2015) on seed-compressed gradients, with bias correction.

    Args:
        params: the tensors the estimates are made for, in the same order.
        lr, betas, eps: as for ``torch.optim.Adam``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = _leaves(params)
        self.lr = _check_lr(lr)
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.t = 0
        self.m = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in self.params]
        self.v = [torch.zeros_like(m) for m in self.m]

    @torch.no_grad()
    def step(self, grad: SeedGradient) -> None:
        """One Adam update from the materialized estimate."""
        grad._check_layout(self.params)
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v, g in zip(self.params, self.m, self.v, grad.materialize(self.params[0].device)):
            g = g.to(device=m.device, dtype=m.dtype)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (m / c1) / ((v / c2).sqrt_().add_(self.eps))
            p.sub_(update.to(p.dtype), alpha=self.lr)

    def state_dict(self) -> dict:
        """Step count, hyper-parameters and moment estimates."""
        return {"t": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.t, self.lr, self.betas, self.eps = int(state["t"]), float(state["lr"]), tuple(state["betas"]), state["eps"]
        self.m = [t.clone() for t in state["m"]]
        self.v = [t.clone() for t in state["v"]]
