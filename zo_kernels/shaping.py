"""Fitness shaping: the perturbed losses of one estimate replaced by a function of all of them.

Public functions, as evosax's ``core/fitness_shaping.py``; ``fitness_shaping=`` is checked in
:mod:`zo_kernels.config` and applied in :mod:`zo_kernels.estimator.reduce`.

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

import torch


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


#: The named shapings by name (``fitness_shaping=<name>``).
BY_NAME = {"centered_ranks": centered_ranks, "standardize": standardize}


__all__ = ["BY_NAME", "centered_ranks", "standardize"]
