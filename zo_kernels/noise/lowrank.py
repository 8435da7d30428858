"""Low-rank noise (``LowRank(rank)``, EGGROLL-style): matrices perturbed by ``A B^T / sqrt(r)``.

A differentiated tensor with ``ndim >= 2`` is a matrix ``(m, n) = (shape[0], numel // shape[0])``;
sample ``i`` perturbs it by ``z_i = A_i B_i^T / sqrt(r)``, with ``A_i`` ``(m, r)`` and ``B_i``
``(n, r)`` standard normal. Every entry of ``z_i`` has mean 0 and variance 1, and distinct entries
are uncorrelated (``E[z_jk z_j'k'] = 0`` unless ``(j, k) = (j', k')``): the covariance is the
identity, TorchOpt's contract for a distribution, so the three estimators keep their formulas.
Tensors with ``ndim < 2`` get full-rank normal noise, exactly as with ``Normal()``.

The factors are stream elements (``docs/noise.md``, normal stream) of the matrix's own *factor
range*: for a matrix at flat offset ``o`` (its first element's index in the concatenated
parameters), ``A_i`` (row-major) then ``B_i`` are the elements ``FACTOR_BASE + 2 r o + t``,
``t < r (m + n)``. Since ``r (m + n) <= 2 r m n``, the ranges of different matrices never overlap,
and they lie above every full-rank element a vector uses, so the noise depends on a tensor's place
in the parameter vector only, never on how tensors are grouped.

Reduce and step are one matrix product of the stacked factors per chunk of samples,
``g = A diag(w) B^T / sqrt(r)`` (``Backend.lowrank_accumulate``), so memory stays
``O(chunk * r * (m + n))``. Under ``batch_size`` the members of a call share the weights: vmap
runs over their factors and :class:`.lowrank_rewrite.SharedWeights` rewrites the uses of each
matrix (``F.linear``, matmul, ``addmm``, ``F.embedding``) into the shared product plus the member's
low-rank term (:mod:`.shared_weights`).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..ops import registry as backends
from ..ops.spec import accumulation_dtype
from .base import Parts, Perturb, ShapeLike, as_size, sample_seed
from .shared_weights import SharedWeights
from .stream import FusedDistribution

if TYPE_CHECKING:
    from ..estimator.plan import Segment
    from ..ops.base import Backend

#: The first stream element of the factor ranges: above any full-rank element (offsets < 2**62).
FACTOR_BASE = 1 << 62
#: Factor elements generated per chunk of samples in reduce/step (float32: 16 MiB).
CHUNK_ELEMENTS = 1 << 22


def matrix_shape(shape: torch.Size) -> Optional[Tuple[int, int]]:
    """``(m, n)`` of a tensor of ``shape`` perturbed by low-rank noise, or None (``ndim < 2``: full rank)."""
    if len(shape) < 2:
        return None
    m = shape[0]
    return m, (math.prod(shape) // m if m else 0)


def factor_offset(offset: int, rank: int) -> int:
    """The first stream element of the factors of the matrix at flat ``offset``."""
    return FACTOR_BASE + 2 * rank * offset


def factors(
    backend: Backend, seed: int, ids: torch.Tensor, offset: int, m: int, n: int, rank: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 ``A`` ``(num, m, r)`` and ``B`` ``(num, n, r)`` of samples ``ids`` of the matrix at ``offset``.

    One ``perturb_rows`` of a zero vector (``0 + 1 * z == z`` exactly) generates all of them on
    the backend's device in one call.
    """
    num, length = ids.numel(), rank * (m + n)
    zeros = torch.zeros(length, dtype=torch.float32, device=device)
    out = torch.empty((num, length), dtype=torch.float32, device=device)
    ones = torch.ones((num, 1), dtype=torch.float64)
    backend.perturb_rows(out, zeros, "normal", seed, ids.cpu(), ones, factor_offset(offset, rank))
    return out[:, : m * rank].view(num, m, rank), out[:, m * rank :].view(num, n, rank)


def lowrank_noise(rank: int, seed: int, sample_id: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The float32 noise ``A B^T / sqrt(r)`` of one sample of a tensor of ``shape`` at offset 0 (``LowRank.sample``)."""
    mn = matrix_shape(shape)
    backend = backends.select(device, torch.float32)
    if mn is None:
        return backend.sample("normal", seed, sample_id, 0, math.prod(shape), device).view(shape)
    a, b = factors(backend, seed, torch.tensor([sample_id]), 0, *mn, rank, device)
    return (a[0] @ b[0].t()).div_(math.sqrt(rank)).view(shape)


class LowRank(FusedDistribution):
    """Low-rank noise (EGGROLL, arXiv 2511.16652): each matrix perturbed by ``A B^T / sqrt(rank)``.

    A tensor with ``ndim >= 2`` is a matrix ``(shape[0], numel // shape[0])``; each sample draws
    standard normal factors ``A`` ``(m, rank)`` and ``B`` ``(n, rank)`` from the counter-based
    stream (their layout: ``docs/noise.md``) and perturbs it by ``A B^T / sqrt(rank)``, which has
    mean 0, variance 1 per element and identity covariance, so every method keeps its formula.
    Tensors with ``ndim < 2`` get standard normal noise as with :class:`Normal`.

    With ``batch_size``, the members of a vmapped call share the weights: ``F.linear``, matmul,
    ``addmm`` and ``F.embedding`` on a perturbed matrix become the shared product plus each
    member's low-rank term (``docs/lowrank.md``), so a population costs about one batched
    forward pass. A ``rank >= min(m, n)`` is allowed but wasteful: the factors then cost more than
    full-rank noise.

    Args:
        rank: the rank ``r`` of each matrix's perturbation, an int >= 1.
    """

    stream = "normal"
    #: Segments hold one leaf each, so a segment is a matrix or a vector; vectors take every method
    #: of :class:`~.stream.FusedDistribution` unchanged.
    joins_leaves = False
    shares_weights = True

    @property
    def name(self) -> str:  # type: ignore[override]
        """How errors name the noise."""
        return f"LowRank(rank={self.rank})"

    def __init__(self, rank: int = 1) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int >= 1, got {type(rank).__name__} {rank!r}")
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank}")
        self.rank = rank

    def sample(
        self,
        sample_shape: ShapeLike = torch.Size(),
        *,
        seed: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """One float32 sample (sample id 0) for a tensor of ``sample_shape`` at flat offset 0: ``A B^T / sqrt(r)``."""
        where = torch.device(device) if device is not None else torch.device("cpu")
        return lowrank_noise(self.rank, sample_seed(seed), 0, as_size(sample_shape), where)

    def __repr__(self) -> str:
        return f"LowRank(rank={self.rank})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.rank == other.rank  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.rank))

    def _matrix(self, segment: Segment) -> Optional[Tuple[int, int]]:
        return matrix_shape(segment.parts[0][2]) if len(segment.parts) == 1 else None

    def _factors(self, segment: Segment, seed: int, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        m, n = self._matrix(segment)
        device = segment.theta.device
        return factors(segment.backend, seed, ids, segment.offset, m, n, self.rank, device)

    # -- perturbing ---------------------------------------------------------------------------------

    def keeps_noise(self, segment: Segment, rows: int) -> bool:
        """Never for a matrix: its factors regenerate in a fraction of the matrix product's time."""
        return self._matrix(segment) is None and super().keeps_noise(segment, rows)

    def perturber(self, segment: Segment, seed: int, keep: Optional[torch.Tensor]) -> Perturb:
        """``(i, scale) -> None``: ``segment.out = theta + scale * A_i B_i^T / sqrt(r)`` for a matrix.

        In place (``out`` is ``theta``) the call adds exactly ``scale * z_i``; the factors of the
        last sample are reused, as in-place antithetic evaluation perturbs one sample three times.
        """
        mn = self._matrix(segment)
        if mn is None:
            return super().perturber(segment, seed, keep)
        theta, out = segment.theta.view(mn), segment.out.view(mn)
        backend, root, last = segment.backend, math.sqrt(self.rank), {}

        def perturb(i: int, scale: float) -> None:
            if last.get("id") != i:
                a, b = self._factors(segment, seed, torch.tensor([i]))
                last.update(id=i, a=a[0], b=b[0])
            backend.lowrank_perturb(out, theta, last["a"], last["b"], scale / root)

        return perturb

    def perturb_rows(
        self,
        segment: Segment,
        out: torch.Tensor,
        seed: int,
        ids: torch.Tensor,
        scales: torch.Tensor,
        keep: Optional[torch.Tensor],
    ) -> None:
        """Row ``i * signs + k`` of ``out`` gets ``theta + scales[i, k] * z_{ids[i]}`` (matrices materialized)."""
        mn = self._matrix(segment)
        if mn is None:
            return super().perturb_rows(segment, out, seed, ids, scales, keep)
        a, b = self._factors(segment, seed, ids)
        theta, signs, root = segment.theta.view(mn), scales.shape[1], math.sqrt(self.rank)
        for i in range(ids.numel()):
            for k in range(signs):
                row = out[i * signs + k].view(mn)
                segment.backend.lowrank_perturb(row, theta, a[i], b[i], float(scales[i, k]) / root)

    def serve(self, segment: Segment, seed: int, sample_id: int, scale: float, uses: SharedWeights) -> None:
        """A matrix's uses are rewritten with this sample's factors (no perturbed matrix); a vector's materialized."""
        if self._matrix(segment) is None:
            return super().serve(segment, seed, sample_id, scale, uses)
        a, b = self._factors(segment, seed, torch.tensor([sample_id]))
        acc = accumulation_dtype(segment.theta.dtype)
        # the scale folded into A in the accumulation dtype, as a batch member's (batch_inputs)
        uses.track(segment.views[0], a[0].to(acc) * (scale / math.sqrt(self.rank)), b[0].to(acc))

    # -- batched evaluation: vmap over the factors, the weights shared ----------------------------

    def batch_buffer(self, segment: Segment, rows: int) -> Optional[torch.Tensor]:
        """No parameter-sized rows for a matrix: its members are its factors."""
        return None if self._matrix(segment) is not None else super().batch_buffer(segment, rows)

    def batch_inputs(
        self,
        segment: Segment,
        buffer: Optional[torch.Tensor],
        seed: int,
        ids: torch.Tensor,
        scales: torch.Tensor,
        keep: Optional[torch.Tensor],
    ) -> List[torch.Tensor]:
        """For a matrix: each row's ``A * scale / sqrt(r)`` ``(rows, m, r)`` and ``B`` ``(rows, n, r)``."""
        if self._matrix(segment) is None:
            return super().batch_inputs(segment, buffer, seed, ids, scales, keep)
        a, b = self._factors(segment, seed, ids)
        signs, acc = scales.shape[1], accumulation_dtype(segment.theta.dtype)
        # the member's term is formed in the accumulation dtype, as the loop's perturbation is
        row_scales = (scales.reshape(-1) / math.sqrt(self.rank)).to(device=a.device, dtype=acc)
        a_rows = a.to(acc).repeat_interleave(signs, dim=0) * row_scales[:, None, None]
        return [a_rows, b.to(acc).repeat_interleave(signs, dim=0)]

    def member_leaves(self, segment: Segment, rows: Sequence[torch.Tensor], rewrites: Dict[int, Any]) -> List[Any]:
        """For a matrix: the shared leaf itself, its use rewritten with this member's ``(A, B)``."""
        if self._matrix(segment) is None:
            return super().member_leaves(segment, rows, rewrites)
        shared = segment.leaves[0]
        rewrites[id(shared)] = (shared, rows[0], rows[1])
        return [shared]

    def member_context(self, rewrites: Dict[int, Any]) -> ContextManager:
        """The mode that rewrites the members' uses of the shared matrices."""
        if not rewrites:
            return contextlib.nullcontext()
        return SharedWeights(rewrites)

    # -- reduce and step: one matrix product per chunk of samples ---------------------------------

    def _accumulate(
        self, backend: Backend, data: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, seed: int,
        offset: int, mn: Tuple[int, int], alpha: float,
    ) -> None:  # fmt: skip
        m, n = mn
        rank, device = self.rank, data.device
        chunk = max(1, CHUNK_ELEMENTS // max(1, rank * (m + n)))
        for lo in range(0, ids.numel(), chunk):
            a, b = factors(backend, seed, ids[lo : lo + chunk], offset, m, n, rank, device)
            num = a.shape[0]
            stacked_a = a.permute(1, 0, 2).reshape(m, num * rank).contiguous()
            stacked_b = b.permute(1, 0, 2).reshape(n, num * rank).contiguous()
            w = weights[lo : lo + chunk].to(device).repeat_interleave(rank)
            backend.lowrank_accumulate(data.view(m, n), stacked_a, stacked_b, w, alpha / math.sqrt(rank))

    def reduce(
        self, backend: Backend, grad: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, seed: int,
        offset: int, parts: Parts,
    ) -> None:  # fmt: skip
        """``grad += sum_k weights[k] * z_{ids[k]}``: ``A diag(w) B^T / sqrt(r)`` for a matrix."""
        mn = matrix_shape(parts[0][2]) if len(parts) == 1 else None
        if mn is None:
            return super().reduce(backend, grad, weights, ids, seed, offset, parts)
        self._accumulate(backend, grad, weights, ids, seed, offset, mn, 1.0)

    def step(
        self, backend: Backend, theta: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, seed: int,
        lr: float, offset: int, parts: Parts,
    ) -> None:  # fmt: skip
        """``theta -= lr * sum_k weights[k] * z_{ids[k]}``, the sum never written."""
        mn = matrix_shape(parts[0][2]) if len(parts) == 1 else None
        if mn is None:
            return super().step(backend, theta, weights, ids, seed, lr, offset, parts)
        self._accumulate(backend, theta, weights, ids, seed, offset, mn, -lr)
