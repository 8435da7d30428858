"""The built-in full-rank distributions: ``Normal()``, ``Rademacher()``, ``Sphere()``, each its own noise.

Their samples are the counter-based stream of ``docs/noise.md``, generated inside the kernels from
``(seed, sample id, flat index)``; an estimate never stores them.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, List, Optional, Union

import torch

from ..ops import registry as _backends
from ..ops.spec import NORMAL, RADEMACHER, accumulation_dtype
from .base import Noise, Parts, Perturb, ShapeLike, as_size, sample_seed

if TYPE_CHECKING:
    from ..estimator.plan import Segment
    from ..ops.base import Backend
    from .shared_weights import SharedWeights


class _Use:
    """One leaf's perturbed values for one evaluation, written by the backend's perturb kernel on demand."""

    __slots__ = ("backend", "theta", "stream", "seed", "offset", "sample_id", "scale")

    def __init__(
        self, backend: Backend, theta: torch.Tensor, stream: str, seed: int, offset: int, sample_id: int, scale: float
    ) -> None:
        self.backend, self.theta, self.stream, self.seed = backend, theta, stream, seed
        self.offset, self.sample_id, self.scale = offset, sample_id, scale

    def fill(self, out: torch.Tensor) -> None:
        """``out = theta + scale * z`` over the whole leaf."""
        self.backend.perturb(out.view(-1), self.theta, self.stream, self.seed, self.sample_id, self.scale, self.offset)

    def rows(self, shape: torch.Size, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the leaf (a matrix of ``shape``): each row's stream elements are those of its place."""
        table = self.theta.view(shape[0], -1)
        width = table.shape[1]
        out = torch.empty((ids.numel(), width), dtype=table.dtype, device=table.device)
        for k, row in enumerate(ids.tolist()):
            offset = self.offset + row * width
            self.backend.perturb(out[k], table[row], self.stream, self.seed, self.sample_id, self.scale, offset)
        return out


class FusedDistribution(Noise):
    """Full-rank noise from one counter-based stream ``z(seed, i, j)`` (``'normal'`` or ``'rademacher'``).

    Passed to :func:`zo_kernels.zero_order`, it never materializes noise: the backends regenerate
    ``z(seed, i, j)`` inside their perturb and reduce kernels. It also behaves as an ordinary samplable
    object (``.sample(shape)``), so code written against TorchOpt's ``Samplable`` protocol accepts it.
    Subclasses set :attr:`stream`.
    """

    stream: str = NORMAL

    @property
    def name(self) -> str:  # type: ignore[override]
        """How errors name the noise: its stream."""
        return self.stream

    def keeps_noise(self, segment: Segment, rows: int) -> bool:
        """Whether to keep each sample's noise of ``segment`` and accumulate it at once (``rows`` per call)."""
        return segment.backend.prefers_kept_noise(self.stream, segment.theta.numel(), rows)

    def keep_buffer(self, segment: Segment, rows: Optional[int] = None) -> torch.Tensor:
        """A buffer for the kept noise of one sample (``rows=None``) or of ``rows`` samples."""
        shape = segment.theta.shape if rows is None else (rows, segment.theta.numel())
        return torch.empty(shape, dtype=torch.float32, device=segment.theta.device)

    def perturber(self, segment: Segment, seed: int, keep: Optional[torch.Tensor]) -> Perturb:
        """``(i, scale) -> None``: ``segment.out = theta + scale * z_i`` (also ``keep = z_i`` when given)."""
        return segment.backend.prepare_perturb(segment.out, segment.theta, self.stream, seed, segment.offset, keep=keep)

    def twin(self, segment: Segment, keep: torch.Tensor, scale: float) -> None:
        """``segment.out = theta + scale * z`` from the kept ``z`` (the antithetic ``-sigma z`` row).

        Rounded as the kernels round (``docs/noise.md``): the product ``scale * z`` in the
        accumulation dtype, then the sum, then the parameters' dtype; so the twin's values are the
        very ones a perturbation without kept noise (or ``perturb='on_use'``) gives.
        """
        out, acc = segment.out, accumulation_dtype(segment.theta.dtype)
        if out.dtype == acc:
            torch.mul(keep.to(acc), scale, out=out)
            out.add_(segment.theta)
        else:  # half precision: the float32 sum is rounded once, into the parameters' dtype
            out.copy_(torch.mul(keep, scale).add_(segment.theta))

    def serve(self, segment: Segment, seed: int, sample_id: int, scale: float, uses: SharedWeights) -> None:
        """Each use of a leaf is served ``theta + scale * z_{sample_id}``, written by the backend's perturb kernel."""
        for (lo, hi, _), leaf in zip(segment.parts, segment.views):
            use = _Use(segment.backend, segment.theta[lo:hi], self.stream, seed, segment.offset + lo, sample_id, scale)
            uses.track_values(leaf, use.fill, functools.partial(use.rows, leaf.shape) if leaf.ndim == 2 else None)

    def perturb_rows(
        self,
        segment: Segment,
        out: torch.Tensor,
        seed: int,
        ids: torch.Tensor,
        scales: torch.Tensor,
        keep: Optional[torch.Tensor],
    ) -> None:
        """Row ``i * signs + k`` of ``out`` gets ``theta + scales[i, k] * z_{ids[i]}`` (``keep[i] = z``)."""
        segment.backend.perturb_rows(out, segment.theta, self.stream, seed, ids, scales, segment.offset, keep=keep)

    def accumulate(self, acc: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> None:
        """``acc += weight * z`` for one sample's kept noise."""
        acc.addcmul_(keep, weight.to(acc.dtype))

    def accumulate_rows(self, acc: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor) -> None:
        """``acc += sum_i weights[i] * keep[i]`` for a block of kept rows."""
        acc.addmv_(keep.t().to(acc.dtype), weights.to(acc.dtype))

    def reduce(
        self,
        backend: Backend,
        grad: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        seed: int,
        offset: int,
        parts: Parts,
    ) -> None:
        """``grad += sum_k weights[k] * z_{ids[k]}`` over the flat elements from ``offset``.

        ``parts``: the ``(start, stop, shape)`` of each leaf inside ``grad`` (for families whose
        noise depends on a leaf's shape).
        """
        backend.reduce(grad, weights, ids, self.stream, seed, offset)

    def step(
        self,
        backend: Backend,
        theta: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        seed: int,
        lr: float,
        offset: int,
        parts: Parts,
    ) -> None:
        """``theta -= lr * sum_k weights[k] * z_{ids[k]}`` without writing the sum (``parts`` as for reduce)."""
        backend.step(theta, weights, ids, self.stream, seed, lr, offset)

    def sample(
        self,
        sample_shape: ShapeLike = torch.Size(),
        *,
        seed: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """Draw one float32 sample of ``sample_shape`` from the stream (sample id 0).

        ``seed`` defaults to one draw from PyTorch's default generator, so ``torch.manual_seed``
        makes the result reproducible.
        """
        shape = as_size(sample_shape)
        where = torch.device(device) if device is not None else torch.device("cpu")
        z = _backends.select(where, torch.float32).sample(self.stream, sample_seed(seed), 0, 0, shape.numel(), where)
        return z.reshape(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class Normal(FusedDistribution):
    """Standard normal noise, z ~ N(0, I) (Philox4x32-10 + Box-Muller)."""

    stream = NORMAL


class Rademacher(FusedDistribution):
    """Random signs, z in {-1, +1}^n with equal probability (one Philox bit per element)."""

    stream = RADEMACHER


class Sphere(FusedDistribution):
    """Uniform directions scaled to radius ``sqrt(n)``: z = sqrt(n) g / |g| with g ~ N(0, I).

    ``n`` is the size of the whole flattened parameter vector, so ``E[z_j**2] = 1`` exactly as for
    :class:`Normal`, and the estimator scale needs no change between the two.
    """

    stream = NORMAL

    def sample_scales(
        self, backend: Optional[Backend], seed: Optional[int], ids: torch.Tensor, numel: int, device: torch.device
    ) -> List[float]:
        """``sqrt(n) / |g_i|`` for each sample (``|g_i|`` from the backend's ``squared_norms``)."""
        if numel == 0 or backend is None:
            return [1.0] * ids.numel()
        norms = backend.squared_norms(self.stream, seed, ids.to(device), numel)
        return (math.sqrt(numel) / norms.sqrt()).tolist()

    def sample(
        self,
        sample_shape: ShapeLike = torch.Size(),
        *,
        seed: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """Draw one float32 sample of ``sample_shape`` (sample id 0), scaled to norm ``sqrt(numel)``."""
        z = super().sample(sample_shape, seed=seed, device=device)
        if z.numel() == 0:
            return z
        return z * (math.sqrt(z.numel()) / torch.linalg.vector_norm(z.double()).item())
