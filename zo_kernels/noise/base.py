"""The interface of noise in an estimate, and the seed and shape helpers every distribution shares.

A distribution says how to perturb one sample (into a scratch buffer or the parameters' own
storage), a batch of rows, how to form the antithetic twin from kept noise, and how to reduce and
step from ``(seed, sample ids, weights)``. The plan, the evaluators and the reducer only call this
interface. The built-in distributions (:mod:`.stream`, :mod:`.lowrank`) implement it themselves;
any other distribution is wrapped in :class:`.sampled.Sampled`.
"""

from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..ops import registry as _backends

if TYPE_CHECKING:
    from ..estimator.plan import Segment
    from ..ops.base import Backend
    from .shared_weights import SharedWeights

Sampler = Callable[[torch.Size], Any]
#: ``perturb(i, scale)``: writes ``theta + scale * z_i`` into the segment's scratch (None), or returns
#: it as new tensors, one per leaf of the segment.
Perturb = Callable[[int, float], Optional[List[torch.Tensor]]]
#: ``(start, stop, shape)`` of each leaf inside a flat buffer.
Parts = Sequence[Tuple[int, int, torch.Size]]
ShapeLike = Union[torch.Size, Sequence[int], int]


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """One 63-bit seed from ``generator`` (PyTorch's default CPU generator when None)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator).item())


def resolve_seed(seed: Any) -> int:
    """The 64-bit seed of one estimate: ``seed`` itself (an int), or one draw from the generator (default: torch's)."""
    if isinstance(seed, int):
        return seed
    return draw_seed(seed)


def as_size(sample_shape: ShapeLike) -> torch.Size:
    """``sample_shape`` as a ``torch.Size``; TypeError/ValueError naming it unless it is ints >= 0."""
    dims = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"sample_shape must be an int or a sequence of ints, got {sample_shape!r}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"sample_shape must be an int or a sequence of ints, got {sample_shape!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"sample_shape must not have negative sizes, got {tuple(dims)}")
    return torch.Size(dims)


def sample_seed(seed: Optional[int]) -> int:
    """``seed`` checked (an int in [0, 2**64)), or one draw from PyTorch's default generator when None."""
    if seed is None:
        return draw_seed()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**64) or None, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")
    return seed


class Noise(abc.ABC):
    """What a noise distribution does in an estimate (the defaults suit a counter-based stream).

    A built-in distribution *is* its noise: ``Normal()`` perturbs, regenerates and sums its own
    samples; a user distribution is wrapped in :class:`~zo_kernels.noise.sampled.Sampled`.

    Attributes:
        name: how errors name the family.
        regenerable: ``z_i`` is a function of ``(seed, i)``, so it can be regenerated in place of
            being kept: what ``inplace=True``, ``batch_size``, ``process_group`` and seed-compressed
            gradients need.
        joins_leaves: consecutive small leaves may be concatenated into one segment.
        uses_scratch: perturbations are written into a scratch buffer per segment (False: they
            are new tensors, and no scratch buffer is allocated).
        shares_weights: the members of a ``batch_size`` batch share the weights (their uses are
            rewritten), so a batch costs no perturbed copy of the matrices: ``perturb='on_use'`` allows it.
        stream: the counter-based stream the backends generate (regenerable families).
    """

    name = "noise"
    regenerable = True
    joins_leaves = True
    uses_scratch = True
    shares_weights = False
    stream = ""

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

    def serve(self, segment: Segment, seed: Optional[int], sample_id: int, scale: float, uses: SharedWeights) -> None:
        """Register in ``uses`` how each use of the segment's leaves is served ``theta + scale * z_{sample_id}``.

        ``perturb='on_use'``: the leaves are the parameter objects themselves (``segment.views``),
        never written; a family without kernels cannot serve them.
        """
        raise TypeError(f"perturb='on_use' needs a built-in distribution, got {self.name} noise")

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
