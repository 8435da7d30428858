"""Baselines that ``bench/run.py`` measures zo_kernels against (besides TorchOpt 0.7.3, optional).

Both estimate the antithetic (central-difference) ES gradient of a loss ``loss(params, *args)`` of a
sequence of parameter tensors, in plain PyTorch:

- :func:`torch_matmul_step`: what one writes with PyTorch alone when the noise may be materialized:
  ``Z = torch.randn(N, n)`` once, every evaluation perturbs a flat copy of the parameters with a row
  of ``Z``, and the estimate is one matrix-vector product ``w @ Z``.
- :class:`MeZO`: MeZO-SGD's step, a per-parameter ``torch.normal`` loop that perturbs the parameters
  in place and regenerates the noise from a seed instead of storing it (Malladi et al. 2023).

TorchOpt is an optional baseline: :func:`import_torchopt` gives the module or None, and every
benchmark prints :data:`TORCHOPT_MISSING` in its TorchOpt cells (and leaves out the ratios against
it) where it is not installed, as on a GPU machine without a package registry.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

LossFn = Callable[..., torch.Tensor]

#: What a TorchOpt cell says (and why its ratios are left out) when torchopt cannot be imported.
TORCHOPT_MISSING = "torchopt not installed"


def import_torchopt() -> Optional[ModuleType]:
    """The ``torchopt`` module, or None where it cannot be imported."""
    try:
        import torchopt
    except ImportError:
        return None
    return torchopt


def torchopt_version(torchopt: Optional[ModuleType]) -> str:
    """``'torchopt 0.7.3'`` for the versions line of a report, or :data:`TORCHOPT_MISSING`."""
    return f"torchopt {torchopt.__version__}" if torchopt is not None else TORCHOPT_MISSING


def torchopt_zero_order(
    torchopt: ModuleType, method: str, num_samples: int, sigma: float, device: torch.device, argnums: int = 0
) -> Callable[[LossFn], LossFn]:
    """TorchOpt's ``zero_order`` decorator with a standard Normal whose samples land on ``device``."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    normal = torch.distributions.Normal(zero, one)
    return torchopt.diff.zero_order(normal, method=method, argnums=argnums, num_samples=num_samples, sigma=sigma)


def _views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """``flat`` split into tensors shaped like ``like`` (views, no copy)."""
    parts = flat.split([p.numel() for p in like])
    return tuple(part.view(p.shape) for part, p in zip(parts, like))


def torch_matmul_step(
    loss: LossFn, params: Sequence[torch.Tensor], *args: Any, num_samples: int, sigma: float
) -> torch.Tensor:
    """One antithetic ES estimate in plain PyTorch with materialized noise; writes every ``p.grad``.

    ``g = 1/(2 sigma N) * sum_i (f(theta + sigma z_i) - f(theta - sigma z_i)) z_i`` with
    ``Z = torch.randn(N, n)`` (N x n floats held for the whole step), evaluated as ``w @ Z``.
    Returns the unperturbed loss ``f(theta)`` (detached), as a decorated loss would.
    """
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        noise = torch.randn(num_samples, flat.numel(), device=flat.device, dtype=flat.dtype)
        theta = torch.empty_like(flat)
        f0 = loss(tuple(p.detach() for p in params), *args)
        diffs = torch.empty(num_samples, device=flat.device, dtype=noise.dtype)
        for i in range(num_samples):
            torch.add(flat, noise[i], alpha=sigma, out=theta)
            plus = loss(_views(theta, params), *args)
            torch.add(flat, noise[i], alpha=-sigma, out=theta)
            minus = loss(_views(theta, params), *args)
            diffs[i] = plus - minus  # stays on the device: no synchronization per sample
        grad = (diffs / (2.0 * sigma * num_samples)) @ noise
        for p, g in zip(params, _views(grad, params)):
            p.grad = g
    return f0


class MeZO:
    """MeZO-SGD written from its paper's Algorithm 1, with N seeds per step ("n-SPSA").

    Reference: S. Malladi, T. Gao, E. Nichani, A. Damian, J. D. Lee, D. Chen, S. Arora,
    "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023, arXiv:2305.17333,
    Algorithm 1 (MeZO). Per step and per seed ``s``: reset the generator to ``s`` and, for every
    parameter ``p``, draw ``z = torch.normal(0, 1, p.shape)`` and move ``p += eps z`` in place;
    evaluate ``l+``; regenerate from ``s`` and move ``p -= 2 eps z``; evaluate ``l-``; regenerate and
    restore ``p += eps z``; ``projected_grad = (l+ - l-) / (2 eps)``, a Python float (``.item()``).
    The update regenerates ``z`` once more from ``s``: ``p -= lr * projected_grad * z``. With N > 1
    seeds the projected gradients are averaged (each update uses ``projected_grad / N``), the
    paper's n-SPSA estimate; N = 1 is Algorithm 1 exactly. No noise tensor outlives one parameter.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, eps: float, num_samples: int = 1, seed: int = 0):
        self.params: List[torch.Tensor] = list(params)
        self.lr, self.eps, self.num_samples = float(lr), float(eps), int(num_samples)
        self.generator = torch.Generator(device=self.params[0].device)
        self.seeds = random.Random(seed)  # one fresh seed per sample and step, as MeZO draws them

    def _perturb(self, seed: int, scale: float) -> None:
        """``p += scale * z`` for every parameter, ``z`` regenerated from ``seed`` parameter by parameter."""
        self.generator.manual_seed(seed)
        for p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, loss: LossFn, *args: Any) -> float:
        """One MeZO-SGD step on ``loss(params, *args)``; returns the last ``l+``."""
        seeds = [self.seeds.randrange(2**31) for _ in range(self.num_samples)]
        projected: List[float] = []
        plus = 0.0
        for seed in seeds:
            self._perturb(seed, self.eps)
            plus_t = loss(self.params, *args)
            self._perturb(seed, -2.0 * self.eps)
            minus_t = loss(self.params, *args)
            self._perturb(seed, self.eps)
            projected.append(((plus_t - minus_t) / (2.0 * self.eps)).item())
            plus = float(plus_t)
        for seed, g in zip(seeds, projected):
            self._perturb(seed, -self.lr * g / self.num_samples)
        return plus
