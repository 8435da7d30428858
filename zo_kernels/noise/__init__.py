"""Noise: what perturbs the parameters in an estimate, and how its samples are regenerated and summed.

- :mod:`.base`: the interface (:class:`~.base.Noise`) and the seed and shape helpers;
- :mod:`.stream`: ``Normal()``, ``Rademacher()``, ``Sphere()`` (full rank, counter-based stream);
- :mod:`.lowrank`: ``LowRank(rank)`` (EGGROLL) and :mod:`.shared_weights`, its population rewrite;
- :mod:`.sampled`: any user distribution (TorchOpt's contract).

A built-in distribution *is* its noise; :func:`as_noise` wraps anything else. The public names are
re-exported by :mod:`zo_kernels.distributions`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .base import Noise
from .lowrank import LowRank
from .sampled import Sampled
from .stream import FusedDistribution, Normal, Rademacher, Sphere

__all__ = [
    "FusedDistribution",
    "LowRank",
    "Noise",
    "Normal",
    "Rademacher",
    "Sampled",
    "Sphere",
    "as_noise",
    "from_stream",
    "standard_normal",
]


def standard_normal(distribution: object) -> Optional[Normal]:
    """``Normal()`` for a scalar ``torch.distributions.Normal(0, 1)`` (same distribution, fused stream), else None."""
    if type(distribution) is torch.distributions.Normal and distribution.batch_shape == torch.Size():
        if float(distribution.loc) == 0.0 and float(distribution.scale) == 1.0:
            return Normal()
    return None


def as_noise(distribution: Any) -> Noise:
    """The noise of ``distribution``: a built-in one itself, ``Normal()`` for a standard scalar Normal, else wrapped.

    A user distribution is wrapped in :class:`Sampled` (TypeError if it cannot sample).
    """
    if isinstance(distribution, Noise):
        return distribution
    return standard_normal(distribution) or Sampled(distribution)


def from_stream(stream: str, rank: Optional[int] = None) -> FusedDistribution:
    """The noise a seed-compressed gradient regenerates: ``stream``'s full-rank one, or ``LowRank(rank)``."""
    if rank is not None:
        return LowRank(rank)
    by_stream = {Normal.stream: Normal, Rademacher.stream: Rademacher}
    if not isinstance(stream, str) or stream not in by_stream:
        raise ValueError(f"stream must be one of {tuple(by_stream)}, got {stream!r}")
    return by_stream[stream]()
