"""Noise families: how one kind of distribution perturbs the parameters and sums weighted noise.

A family says how to perturb one sample (into a scratch buffer or the parameters' own storage), a
batch of rows, how to form the antithetic twin from kept noise, and how to reduce and step from
``(seed, sample ids, weights)``. The plan, the evaluators and the reducer only call this interface;
a new family is one new module that subclasses :class:`NoiseFamily` and calls
:func:`register_family` for its distribution type.

Families here: :class:`StreamFamily` (the counter-based full-rank streams: ``Normal()``,
``Rademacher()``), :class:`SphereFamily` (normal stream, each sample scaled to norm ``sqrt(n)``) and
:class:`SampledFamily` (any user distribution, TorchOpt's contract: one ``.sample(shape)`` per
sample and per tensor, whose noise is kept, since it cannot be regenerated).
"""

from __future__ import annotations

import abc
import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import backends as _backends
from .._validate import check_sample
from ..distributions import FusedDistribution, as_fused, draw_seed

if TYPE_CHECKING:
    from ..kernels.base import Backend
    from .plan import Segment

Sampler = Callable[[torch.Size], Any]
#: ``perturb(i, scale)``: writes ``theta + scale * z_i`` into the segment's scratch (None), or returns
#: it as new tensors, one per leaf of the segment.
Perturb = Callable[[int, float], Optional[List[torch.Tensor]]]
#: ``(start, stop, shape)`` of each leaf inside a flat buffer.
Parts = Sequence[Tuple[int, int, torch.Size]]


def resolve_seed(seed: Any) -> int:
    """The 64-bit seed of one estimate: ``seed`` itself (an int), or one draw from the generator (default: torch's)."""
    if isinstance(seed, int):
        return seed
    return draw_seed(seed)


class NoiseFamily(abc.ABC):
    """The interface every noise family implements (the defaults suit a counter-based stream).

    Attributes:
        name: how errors name the family.
        regenerable: ``z_i`` is a function of ``(seed, i)``, so it can be regenerated in place of
            being kept: what ``inplace=True``, ``batch_size``, ``process_group`` and seed-compressed
            gradients need.
        joins_leaves: consecutive small leaves may be concatenated into one segment.
        uses_scratch: perturbations are written into a scratch buffer per segment (False: they
            are new tensors, and no scratch buffer is allocated).
        stream: the counter-based stream the backends generate (regenerable families).
    """

    name = "noise"
    regenerable = True
    joins_leaves = True
    uses_scratch = True
    stream = ""

    def validated(self) -> NoiseFamily:
        """The family, once the distribution it was made from is checked (at decoration time)."""
        return self

    @contextlib.contextmanager
    def session(self, seed: Any, leaves: Sequence[torch.Tensor]) -> Iterator[Optional[int]]:
        """Around one estimate: yields its seed (``seed`` is the checked ``seed=`` setting)."""
        yield resolve_seed(seed)

    def seed_text(self, seed: Optional[int]) -> str:
        """How error messages name the noise of the estimate with ``seed``."""
        return f"seed={seed}"

    def backend(self, device: torch.device, dtype: torch.dtype, requested: Optional[str]) -> Optional[Backend]:
        """The backend that perturbs and reduces a leaf of ``device`` and ``dtype`` (None: no kernels)."""
        return _backends.select(device, dtype, requested)

    def sample_scales(
        self, backend: Optional[Backend], seed: Optional[int], ids: torch.Tensor, numel: int, device: torch.device
    ) -> List[float]:
        """Per-sample noise scales (folded into the perturbation and the weights): 1 by default."""
        return [1.0] * ids.numel()

    @abc.abstractmethod
    def keeps_noise(self, segment: Segment, rows: int) -> bool:
        """Whether to keep each sample's noise of ``segment`` and accumulate it at once (``rows`` per call)."""

    @abc.abstractmethod
    def keep_buffer(self, segment: Segment, rows: Optional[int] = None) -> Any:
        """Where the kept noise of one sample (``rows=None``) or of ``rows`` samples goes (opaque to the evaluators)."""

    @abc.abstractmethod
    def perturber(self, segment: Segment, seed: Optional[int], keep: Any) -> Perturb:
        """A :data:`Perturb` for ``segment``: ``theta + scale * z_i``, also keeping ``z_i`` in ``keep`` when given.

        It writes ``segment.out`` (a scratch buffer, or in place ``theta`` itself: then ``scale`` is
        the change from the current perturbation, and the call must add exactly ``scale * z_i``),
        or returns new tensors, one per leaf of the segment.
        """

    @abc.abstractmethod
    def twin(self, segment: Segment, keep: Any, scale: float) -> Optional[List[torch.Tensor]]:
        """``theta + scale * z`` from the kept ``z`` (the antithetic ``-sigma z`` row), as :data:`Perturb` does."""

    @abc.abstractmethod
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

    # -- batched evaluation (``batch_size``): what one torch.func.vmap call maps over -------------

    def batch_buffer(self, segment: Segment, rows: int) -> Optional[torch.Tensor]:
        """A buffer for ``rows`` perturbed copies of the segment (reused by every vmapped call), or None."""
        return torch.empty((rows, segment.theta.numel()), dtype=segment.theta.dtype, device=segment.theta.device)

    def batch_inputs(
        self,
        segment: Segment,
        buffer: Optional[torch.Tensor],
        seed: int,
        ids: torch.Tensor,
        scales: torch.Tensor,
        keep: Optional[torch.Tensor],
    ) -> List[torch.Tensor]:
        """The tensors vmap maps over for ``segment`` (dim 0: the ``ids.numel() * signs`` rows of the call).

        By default the perturbed rows themselves (``perturb_rows`` into ``buffer``), one tensor per leaf.
        """
        self.perturb_rows(segment, buffer, seed, ids, scales, keep)
        rows = buffer.shape[0]
        return [buffer[:, a:b].view(rows, *shape) for a, b, shape in segment.parts]

    def member_leaves(self, segment: Segment, rows: Sequence[torch.Tensor], rewrites: Dict[int, Any]) -> List[Any]:
        """Inside vmap: the segment's leaves for one member, from its slices of :meth:`batch_inputs`.

        A family whose members share a tensor may register it in ``rewrites`` for :meth:`member_context`.
        """
        return list(rows)

    def member_context(self, rewrites: Dict[int, Any]) -> ContextManager:
        """Entered around each member's call inside vmap (nothing by default)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def accumulate(self, acc: torch.Tensor, keep: Any, weight: torch.Tensor) -> None:
        """``acc += weight * z`` for one sample's kept noise."""

    @abc.abstractmethod
    def accumulate_rows(self, acc: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor) -> None:
        """``acc += sum_i weights[i] * keep[i]`` for a block of kept rows."""

    @abc.abstractmethod
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

    @abc.abstractmethod
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


class StreamFamily(NoiseFamily):
    """Full-rank noise from one counter-based stream (``'normal'`` or ``'rademacher'``)."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.name = stream

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
        """``segment.out = theta + scale * z`` from the kept ``z`` (the antithetic ``-sigma z`` row)."""
        torch.add(segment.theta, keep, alpha=scale, out=segment.out)

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


class SphereFamily(StreamFamily):
    """Normal noise scaled per sample to norm ``sqrt(n)`` over the whole flattened parameter vector."""

    def sample_scales(
        self, backend: Optional[Backend], seed: Optional[int], ids: torch.Tensor, numel: int, device: torch.device
    ) -> List[float]:
        """``sqrt(n) / |g_i|`` for each sample (``|g_i|`` from the backend's ``squared_norms``)."""
        if numel == 0 or backend is None:
            return [1.0] * ids.numel()
        norms = backend.squared_norms(self.stream, seed, ids.to(device), numel)
        return (math.sqrt(numel) / norms.sqrt()).tolist()


def as_sampler(distribution: object) -> Sampler:
    """A function of the sample shape for ``distribution``: its ``.sample`` method, or itself if callable."""
    if isinstance(distribution, type) and hasattr(distribution, "sample"):
        raise TypeError(
            f"distribution must be an instance, got the class {distribution.__name__} "
            f"(did you mean {distribution.__name__}(...)?)"
        )
    sample = getattr(distribution, "sample", None)
    if callable(sample):
        return lambda shape: sample(shape)
    if callable(distribution):
        return distribution  # type: ignore[return-value]
    raise TypeError(
        "distribution must have a .sample(sample_shape) method (e.g. a torch.distributions.Distribution) "
        f"or be a function of the sample shape; got {type(distribution).__name__}"
    )


class _Kept:
    """One sample's noise from a user distribution (the tensor itself: it cannot be regenerated)."""

    __slots__ = ("z",)

    def __init__(self) -> None:
        self.z: Optional[torch.Tensor] = None


class SampledFamily(NoiseFamily):
    """Any user distribution, sampled per sample and per tensor (TorchOpt's contract); its noise is kept."""

    name = "sampled"
    regenerable = False
    joins_leaves = False
    uses_scratch = False

    def __init__(self, distribution: Any, sampler: Optional[Sampler] = None) -> None:
        self.distribution, self.sampler = distribution, sampler

    def validated(self) -> NoiseFamily:
        """The family with the distribution's sampler (TypeError if it has none)."""
        return SampledFamily(self.distribution, as_sampler(self.distribution))

    @contextlib.contextmanager
    def session(self, seed: Any, leaves: Sequence[torch.Tensor]) -> Iterator[Optional[int]]:
        """Run the user distribution under ``seed`` without disturbing torch's global RNG state."""
        if seed is None:
            yield None
            return
        value = resolve_seed(seed)
        devices = sorted({p.device.index or 0 for p in leaves if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(value)
            yield value

    def seed_text(self, seed: Optional[int]) -> str:
        """``seed=None`` names torch's global RNG."""
        return "seed=None (torch's global RNG)" if seed is None else f"seed={seed}"

    def backend(self, device: torch.device, dtype: torch.dtype, requested: Optional[str]) -> Optional[Backend]:
        """None: samples are drawn and added in PyTorch."""
        return None

    def keeps_noise(self, segment: Segment, rows: int) -> bool:
        """Always: the noise cannot be regenerated."""
        return True

    def keep_buffer(self, segment: Segment, rows: Optional[int] = None) -> Any:
        """A holder for one sample's noise, as the distribution returned it (cast like the leaf)."""
        return _Kept()

    def perturber(self, segment: Segment, seed: Optional[int], keep: Any) -> Perturb:
        """Draw ``z_i`` for the segment's one leaf, keep it, and return ``theta + scale * z_i``."""
        assert keep is not None and self.sampler is not None
        sampler, leaf = self.sampler, segment.leaves[0]

        def perturb(i: int, scale: float) -> List[torch.Tensor]:
            where = f"sample {i} of the distribution for a {tuple(leaf.shape)} tensor"
            keep.z = check_sample(sampler(leaf.shape), leaf, where)
            return self.twin(segment, keep, scale)

        return perturb

    def twin(self, segment: Segment, keep: Any, scale: float) -> List[torch.Tensor]:
        """A new tensor ``theta + scale * z`` (the product rounded first), per sample as TorchOpt does."""
        return [segment.leaves[0] + scale * keep.z]

    def accumulate(self, acc: torch.Tensor, keep: Any, weight: torch.Tensor) -> None:
        """``acc += z * weight`` in the accumulation dtype."""
        acc.view(keep.z.shape).add_(keep.z.to(acc.dtype) * weight.to(acc.dtype))

    def _not_regenerable(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"a {self.name} distribution's noise cannot be regenerated from a seed")

    perturb_rows = accumulate_rows = reduce = step = _not_regenerable  # type: ignore[assignment]


#: Distribution type -> the family made from an instance; looked up along the type's MRO.
_FAMILIES: Dict[type, Callable[[Any], NoiseFamily]] = {}


def register_family(kind: type, make: Callable[[Any], NoiseFamily]) -> None:
    """Route instances of ``kind`` (and its subclasses, unless they register their own) to ``make(instance)``."""
    _FAMILIES[kind] = make


def family_of(distribution: Any) -> NoiseFamily:
    """The noise family of ``distribution`` (not yet :meth:`~NoiseFamily.validated`)."""
    target = as_fused(distribution)
    if target is None:
        target = distribution
    for kind in type(target).__mro__:
        if kind in _FAMILIES:
            return _FAMILIES[kind](target)
    return SampledFamily(distribution)


def stream_family(stream: str, rank: Optional[int] = None) -> NoiseFamily:
    """The family a seed-compressed gradient reduces and steps with: ``stream``'s, or ``LowRank(rank)``'s."""
    if rank is not None:
        from ..distributions import LowRank

        return family_of(LowRank(rank))
    return StreamFamily(stream)


#: The built-in distributions (and a user subclass of FusedDistribution): one stream, Sphere-scaled or not.
register_family(FusedDistribution, lambda d: (SphereFamily if d.sphere else StreamFamily)(d.stream))
