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

Two peer ES libraries, optional too (``requirements-bench.txt``; :func:`import_optional` gives the
module or None, the rows then say :data:`EVOTORCH_MISSING` / :data:`EGGROLL_MISSING`):

- :class:`EvoTorchPGPE`: EvoTorch 0.6.1's ``PGPE`` with symmetric sampling on a vectorized
  ``evotorch.Problem`` whose objective is the loss vmapped over a population of flat parameter
  vectors; one ``searcher.step()`` is one step. With ``ranking_method="raw"`` and no optimizer its
  center update is ``theta -= lr * g`` with ``g`` the raw antithetic estimate above.
- :func:`torcheggroll_step`: torcheggroll 0.2.0's ``TorchEggrollES(rank=1, pop_size=2N)``, one
  ``step``: 2N members vmapped on materialized low-rank-perturbed weights, z-scored fitness, its
  update included (``bench/run.py`` and ``bench/lowrank.py`` both call it through this).
"""

from __future__ import annotations

import copy
import logging
import random
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

LossFn = Callable[..., torch.Tensor]

#: What a TorchOpt cell says (and why its ratios are left out) when torchopt cannot be imported.
TORCHOPT_MISSING = "torchopt not installed"


#: What an EvoTorch cell says (and why its ratios are left out) when evotorch cannot be imported.
EVOTORCH_MISSING = "evotorch not installed"
#: What a torcheggroll cell says when torcheggroll cannot be imported.
EGGROLL_MISSING = "torcheggroll not installed"


def import_optional(name: str) -> Optional[ModuleType]:
    """The module ``name``, or None where it cannot be imported (an optional baseline or model library)."""
    try:
        return __import__(name)
    except ImportError:
        return None


def version_of(module: Optional[ModuleType], name: str, missing: str) -> str:
    """``'name X.Y'`` (the installed distribution's version) or ``missing``."""
    if module is None:
        return missing
    try:
        return f"{name} {metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return f"{name} {getattr(module, '__version__', '?')}"


def import_evotorch() -> Optional[ModuleType]:
    """``evotorch`` with ``evotorch.algorithms`` loaded and its INFO logging off, or None where it is missing.

    EvoTorch logs an INFO line per setting of every ``Problem`` it builds; a benchmark builds one per
    measured point, so only its warnings are kept.
    """
    evotorch = import_optional("evotorch")
    if evotorch is None:
        return None
    try:
        import evotorch.algorithms  # noqa: F401  (PGPE)
    except ImportError:
        return None
    logging.getLogger("evotorch").setLevel(logging.WARNING)
    return evotorch


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


class EvoTorchPGPE:
    """EvoTorch's PGPE (symmetric sampling) on ``loss(params, *args)``, configured as the same raw antithetic ES step.

    The problem is what an EvoTorch user writes for a PyTorch loss: ``evotorch.Problem("min",
    objective, solution_length=n, vectorized=True, device=...)`` whose objective takes the population
    as one ``(2N, n)`` tensor of flat parameter vectors and returns its ``2N`` losses, the loss of one
    member vmapped over the population (``torch.func.vmap``; every member's tensors are views of its
    row). The searcher is ``PGPE(problem, popsize=2N, symmetric=True, stdev_init=sigma,
    center_init=theta, ranking_method="raw", optimizer=None, center_learning_rate=lr / sigma**2,
    stdev_learning_rate=0)``:

    - ``symmetric=True``: ``N`` directions, members ``theta + sigma z_i`` and ``theta - sigma z_i``
      (``SymmetricSeparableGaussian``, gradients divided by the number of directions);
    - ``ranking_method="raw"`` (EvoTorch's default is ``"centered"``, rank-based fitness shaping):
      the utilities are ``-f``, so the center gradient is ``-1/(2N) sum_i (f(theta + sigma z_i) -
      f(theta - sigma z_i)) sigma z_i = -sigma^2 g``, ``g`` the raw antithetic estimate of
      :func:`torch_matmul_step` and zo_kernels;
    - ``optimizer=None`` (the default is ClipUp) and ``center_learning_rate = lr / sigma^2``: the
      center moves by ``-lr * g``, ``ZOSGD(lr)``'s update of that estimate;
    - ``stdev_learning_rate=0``: sigma stays (PGPE still computes its gradient, ``O(N n)``, and
      applies the zero update through its default ``stdev_max_change=0.2`` limiter).

    EvoTorch's ``step()`` follows the gradient of the population evaluated by the previous call,
    then samples and evaluates the next one; the first call only samples and evaluates, so it is
    run here once, and every :meth:`step` after it is a full one: gradient of 2N evaluations,
    update, sampling of N directions, 2N evaluations.
    """

    def __init__(
        self,
        evotorch: ModuleType,
        loss: LossFn,
        params: Sequence[torch.Tensor],
        *args: Any,
        num_samples: int,
        sigma: float,
        lr: float,
    ) -> None:
        like = [p.detach() for p in params]
        center = torch.cat([p.reshape(-1) for p in like])

        def member_loss(flat: torch.Tensor) -> torch.Tensor:
            return loss(_views(flat, like), *args)

        population_loss = torch.func.vmap(member_loss)  # (2N, n) -> (2N,)
        self.problem = evotorch.Problem(
            "min", population_loss, solution_length=center.numel(), vectorized=True, device=center.device,
            dtype=center.dtype,
        )  # fmt: skip
        self.searcher = evotorch.algorithms.PGPE(
            self.problem, popsize=2 * num_samples, center_learning_rate=lr / sigma**2, stdev_learning_rate=0.0,
            stdev_init=sigma, symmetric=True, optimizer=None, ranking_method="raw", center_init=center,
        )  # fmt: skip
        self.searcher.step()  # the first step samples and evaluates only (no gradient yet)

    def step(self) -> None:
        """One PGPE step: follow the last population's gradient, sample and evaluate the next population."""
        self.searcher.step()

    @property
    def center(self) -> torch.Tensor:
        """The current center of the search distribution (the flat parameters)."""
        return self.searcher.status["center"]


def torcheggroll_step(
    torcheggroll: ModuleType,
    module: torch.nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    *,
    num_samples: int,
    sigma: float,
    lr: float,
    rank: int = 1,
) -> Callable[[], float]:
    """One ``TorchEggrollES(rank, pop_size=2N, antithetic=True).step(x, loss_fn, y)`` per call, on a copy of ``module``.

    What one step does (torcheggroll 0.2.0): per member a seeded generator draws rank-``rank`` factors
    for every matrix (``A B^T sigma / sqrt(rank)``) and Gaussian noise for every other tensor, the N
    draws are mirrored into 2N members, every member's perturbed weights are materialized
    (``(2N, *shape)`` per tensor) and the population is evaluated in one vmapped ``functional_call``;
    fitness ``-loss_fn(outputs, y)`` is z-scored and the update is ``theta += lr * sqrt(2N) *
    mean_i(r_i eps_i)``. ``loss_fn`` maps one member's outputs and ``y`` to a scalar (it is vmapped).
    Returns the population's mean fitness.
    """
    es = torcheggroll.TorchEggrollES(
        copy.deepcopy(module), pop_size=2 * num_samples, sigma=sigma, lr=lr, rank=rank, antithetic=True
    )

    def step() -> float:
        return float(es.step(x, loss_fn, y))

    return step
