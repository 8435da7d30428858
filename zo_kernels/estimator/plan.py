"""The plan of one estimate: seed, sample ids, parameter layout, backends, noise, kept noise.

The plan holds the seed, this rank's sample ids, the parameter layout in segments, a backend per
segment, the noise, and which segments keep their noise.

Nothing is evaluated here; the evaluators (``evaluate.py``) and the reducer (``reduce.py``) read
the plan and never change it, except the kept-noise sums an evaluator accumulates into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from ..config import Config, check_inplace_leaves
from ..noise import Noise
from ..ops.spec import accumulation_dtype
from .distributed import RankShare

if TYPE_CHECKING:
    from ..ops.base import Backend

#: Leaves are concatenated into one segment (one kernel call per sample) while the segment stays
#: below this many elements; the concatenation is a copy, so large tensors get their own segment
#: and are read in place: then the only parameter-sized allocation is the scratch buffer.
CONCAT_MAX_NUMEL = 1 << 20
#: The float32 elements of kept noise the loop holds per window (256 KiB): a window pays where the
#: per-sample weighing and accumulation calls cost more than the noise (small models); from 64k
#: parameters on, it is one sample, summed as it is kept, and costs no memory beyond that sample's noise.
WINDOW_ELEMENTS = 1 << 16


@dataclass
class Segment:
    """A contiguous range of the flat parameter vector that one kernel call perturbs or reduces."""

    backend: Optional[Backend]
    theta: torch.Tensor  # flat, contiguous, detached
    out: torch.Tensor  # flat scratch buffer of the same size (in place: theta itself)
    offset: int
    parts: List[Tuple[int, int, torch.Size]]  # (start, stop, shape) of each leaf inside the segment
    views: List[torch.Tensor]  # what the function sees of these leaves: views of ``out``, shaped like them
    leaves: List[torch.Tensor]  # the leaves themselves, detached


@dataclass
class Plan:
    """What one estimate evaluates and reduces; see the module docstring."""

    config: Config
    noise: Noise
    seed: Optional[int]
    share: RankShare
    sample_ids: torch.Tensor  # int64, CPU: all N ids (every rank reduces all of them)
    scales: List[float]  # per-sample noise scale (Sphere: sqrt(n)/|g_i|), indexed by sample id
    segments: List[Segment]
    scratch: List[torch.Tensor]  # every segment's ``views``, in leaf order
    sums: List[Optional[torch.Tensor]]  # per segment: sum_i w_i z_i accumulated while evaluating, or None
    batching: bool  # evaluate vmapped batches (batch_size given, and vmap has not failed on the function)
    window: int  # samples whose kept noise the loop holds before summing it at once

    @property
    def seed_text(self) -> str:
        """How error messages name the noise."""
        return self.noise.seed_text(self.seed)

    @property
    def signs(self) -> Tuple[float, ...]:
        """The signs of the evaluations of one sample."""
        return self.config.signs


def _groups(leaves: Sequence[torch.Tensor], chosen: Sequence[Optional[Backend]], join: bool) -> List[List[int]]:
    """Runs of consecutive leaves that share a device, dtype and backend and stay small together."""
    groups: List[List[int]] = []
    size = 0
    for k, p in enumerate(leaves):
        prev = leaves[groups[-1][0]] if groups else None
        joinable = (
            join
            and prev is not None
            and (prev.device, prev.dtype) == (p.device, p.dtype)
            and chosen[k] is chosen[groups[-1][0]]
            and size + p.numel() <= CONCAT_MAX_NUMEL
        )
        if joinable:
            groups[-1].append(k)
            size += p.numel()
        else:
            groups.append([k])
            size = p.numel()
    return groups


def scratch_segments(
    leaves: Sequence[torch.Tensor],
    offsets: Sequence[int],
    chosen: Sequence[Optional[Backend]],
    join: bool = True,
    scratch_buffers: bool = True,
) -> Tuple[List[Segment], List[torch.Tensor]]:
    """Group leaves into few kernel calls, and the perturbed views the function sees.

    Consecutive small leaves that share a device, dtype and backend are concatenated into one flat
    buffer (their flat offsets are consecutive by construction), so a model with hundreds of small
    tensors costs one perturb call per sample instead of hundreds.
    """
    segments: List[Segment] = []
    scratch: List[torch.Tensor] = []
    for group in _groups(leaves, chosen, join):
        base = offsets[group[0]]
        if len(group) == 1 and leaves[group[0]].is_contiguous():
            theta = leaves[group[0]].detach().view(-1)  # no copy
        else:
            theta = torch.cat([leaves[k].detach().reshape(-1) for k in group])
        out = torch.empty_like(theta) if scratch_buffers else theta  # without: views that are never written
        parts = [(offsets[k] - base, offsets[k + 1] - base, leaves[k].shape) for k in group]
        views = [out[lo:hi].view(shape) for lo, hi, shape in parts]
        segments.append(Segment(chosen[group[0]], theta, out, base, parts, views, [leaves[k].detach() for k in group]))
        scratch.extend(views)
    return segments, scratch


def inplace_segments(
    leaves: Sequence[torch.Tensor], offsets: Sequence[int], chosen: Sequence[Optional[Backend]]
) -> Tuple[List[Segment], List[torch.Tensor]]:
    """One segment per leaf over the parameters' own storage: no second copy exists.

    ``.data`` keeps autograd's version counters out of it (the values are restored before returning).
    """
    check_inplace_leaves(leaves)
    segments = [
        Segment(b, p.data.view(-1), p.data.view(-1), off, [(0, p.numel(), p.shape)], [p.data], [p.data])
        for b, p, off in zip(chosen, leaves, offsets)
    ]
    return segments, [p.data for p in leaves]


def on_use_segments(
    leaves: Sequence[torch.Tensor], offsets: Sequence[int], chosen: Sequence[Optional[Backend]]
) -> Tuple[List[Segment], List[torch.Tensor]]:
    """One segment per leaf, no buffer: the function receives the leaves themselves (``perturb='on_use'``).

    Leaves are never concatenated (that would copy them); a non-contiguous leaf is read through one
    contiguous copy, the only parameter-sized allocation of the mode.
    """
    segments = []
    for b, p, off in zip(chosen, leaves, offsets):
        flat = p.detach().reshape(-1)
        segments.append(Segment(b, flat, flat, off, [(0, p.numel(), p.shape)], [p], [p.detach()]))
    return segments, list(leaves)


def loop_window(numel: int, count: int) -> int:
    """Samples whose kept noise the loop holds (``numel`` floats each) before summing it in one product.

    Bounded by :data:`WINDOW_ELEMENTS`, so holding it costs at most 256 KiB beside the parameters.
    """
    return max(1, min(count, WINDOW_ELEMENTS // max(1, numel)))


def samples_per_call(config: Config, count: int) -> int:
    """Samples per vmapped call: ``batch_size`` evaluations, an antithetic pair never split."""
    return max(1, min(count, (config.batch_size or 1) // len(config.signs)))


def _kept_sums(
    s: Config, noise: Noise, segments: Sequence[Segment], rows: int, accumulate: bool, distributed: bool
) -> List[Optional[torch.Tensor]]:
    """Keep each sample's noise and accumulate it at once where that beats regenerating it in ``reduce``.

    Only into a scratch copy (``perturb='copy'``: the other modes hold no parameter-sized buffer),
    never across ranks (every rank rebuilds all N samples: nothing to keep).
    """
    keep = accumulate and s.perturb == "copy" and not distributed
    return [
        torch.zeros(seg.theta.shape, dtype=accumulation_dtype(seg.theta.dtype), device=seg.theta.device)
        if keep and noise.keeps_noise(seg, rows)
        else None
        for seg in segments
    ]


def make_plan(
    s: Config, leaves: Sequence[torch.Tensor], seed: Optional[int], vmap_failed: bool, accumulate: bool
) -> Plan:
    """The plan of one estimate of ``leaves`` with ``seed`` (from the noise's session).

    ``vmap_failed``: batched evaluation already failed on this function; ``accumulate``: keep noise
    where a backend prefers that (False when only the weights are wanted).
    """
    noise = s.noise
    device = leaves[0].device if leaves else torch.device("cpu")
    seed, share = RankShare.of(s.process_group, seed, s.num_samples, device)
    chosen = [noise.backend(p.device, p.dtype, s.backend) for p in leaves]
    offsets = [0]
    for p in leaves:
        offsets.append(offsets[-1] + p.numel())
    ids = torch.arange(s.num_samples, dtype=torch.int64)
    scales = noise.sample_scales(chosen[0] if leaves else None, seed, ids, offsets[-1], device)
    if s.inplace:
        segments, scratch = inplace_segments(leaves, offsets, chosen)
    elif s.on_use:
        segments, scratch = on_use_segments(leaves, offsets, chosen)
    else:
        segments, scratch = scratch_segments(leaves, offsets, chosen, noise.joins_leaves, noise.uses_scratch)
    batching = s.batch_size is not None and not vmap_failed
    window = loop_window(offsets[-1], share.count)
    rows = samples_per_call(s, share.count) if batching else window  # samples whose noise one accumulation reads
    sums = _kept_sums(s, noise, segments, rows, accumulate, share.group is not None)
    return Plan(s, noise, seed, share, ids, scales, segments, scratch, sums, batching, window)
