"""Fitness shaping: the perturbed losses of one estimate replaced by a function of all of them.

ES practice (OpenAI ES, EvoTorch, evosax, EGGROLL) rarely feeds raw returns into the update: it
ranks or standardizes them first, so the step is invariant to the scale and the outliers of the
objective. With shaping the estimate is no longer of the smoothed gradient ``grad f_sigma`` but of a
direction along it (for ranks, of a monotone transform's), and the chain rule scales the shaped
estimate by the upstream gradient as usual.

The shaped set is every perturbed loss of the estimate: the N losses ('naive'), the N differences
``f(theta + sigma z_i) - f(theta)`` ('forward': the baseline is subtracted first, so for ranks and
standardization, which remove any common shift, 'forward' then equals 'naive'), or all 2N losses
together ('antithetic': the pair's shaped values are then subtracted). Under ``process_group`` it is
applied after the gather, to every rank's losses, so every rank gets the same weights.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .._validate import all_finite

Shaping = Callable[[torch.Tensor], torch.Tensor]
#: The named shapings (``fitness_shaping=<name>``).
NAMED = ("centered_ranks", "standardize")


def centered_ranks(losses: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly onto ``[-0.5, 0.5]`` (Salimans et al. 2017); ties share their mean rank.

    One value (or all equal) maps to 0.
    """
    flat = losses.reshape(-1)
    k = flat.numel()
    if k < 2:
        return torch.zeros_like(losses)
    values, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # the rank of each distinct value's first occurrence
    mean_rank = first.to(losses.dtype) + (counts.to(losses.dtype) - 1) / 2
    return (mean_rank[inverse] / (k - 1) - 0.5).view_as(losses)


def standardize(losses: torch.Tensor) -> torch.Tensor:
    """``(f - mean) / std`` (population std); all zeros when the std is 0 (no division by zero)."""
    centered = losses - losses.mean()
    std = centered.square().mean().sqrt()
    # torch.where rather than an if: no data-dependent control flow, so it runs under torch.func.vmap
    positive = std > 0
    return torch.where(positive, centered / torch.where(positive, std, torch.ones_like(std)), 0.0)


_BY_NAME = {"centered_ranks": centered_ranks, "standardize": standardize}


def check_fitness_shaping(value: object) -> Optional[Shaping]:
    """The shaping function of ``fitness_shaping=value``: None, one of :data:`NAMED`, or a callable."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _BY_NAME:
            options = ", ".join(repr(n) for n in NAMED)
            raise ValueError(f"fitness_shaping must be None, {options} or a callable; got {value!r}")
        return _BY_NAME[value]
    if callable(value):
        return value  # type: ignore[return-value]
    raise TypeError(
        f"fitness_shaping must be None, {', '.join(repr(n) for n in NAMED)} or a callable "
        f"(losses -> shaped losses of the same shape); got {type(value).__name__}"
    )


def shape_losses(shaping: Union[Shaping, None], losses: torch.Tensor) -> torch.Tensor:
    """``shaping(losses)``, checked: a floating-point tensor of the same shape, every value finite.

    A user function's errors propagate (nothing has been written yet); its result is returned in
    ``losses``' dtype and device.
    """
    if shaping is None:
        return losses
    out = shaping(losses.clone())  # the caller's function cannot change the losses it was given
    name = getattr(shaping, "__name__", type(shaping).__name__)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fitness_shaping {name} must return a tensor, got {type(out).__name__}")
    if out.shape != losses.shape:
        raise ValueError(
            f"fitness_shaping {name} must return a tensor of the losses' shape {tuple(losses.shape)}, "
            f"got {tuple(out.shape)}"
        )
    if not out.dtype.is_floating_point:
        raise TypeError(f"fitness_shaping {name} must return a floating-point tensor, got {out.dtype}")
    out = out.to(device=losses.device, dtype=losses.dtype)
    if not all_finite(out):
        raise ValueError(f"fitness_shaping {name} returned non-finite values (NaN or inf); no gradient is written")
    return out
