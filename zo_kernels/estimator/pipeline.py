"""One estimate, end to end: plan, evaluate, reduce (the fused path; :mod:`.recorded` is the differentiable one).

Noise is never materialized as an ``N x n`` tensor: per sample, a backend writes ``theta + sigma
z_i`` into a scratch buffer (or the parameters themselves), and one ``reduce`` regenerates ``z_i``
at the end, unless the noise keeps each sample's while evaluating (user distributions, and where a
backend prefers it).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..config import Config
from .evaluate import Evaluate, EvaluatorState, Sums, evaluate_share
from .plan import Plan, make_plan
from .reduce import Weigher, gradients, raise_if_estimate_not_finite, raise_if_not_finite, sample_weights


def _evaluate(
    plan: Plan, evaluate: Evaluate, weigh: Weigher, state: EvaluatorState, f0: torch.Tensor
) -> Tuple[torch.Tensor, Sums]:
    """Every rank's losses ``(signs, N)`` (checked finite) and this rank's complete kept sums.

    A rank whose function raised still takes part in the exchange (``RankShare.attempt``), which
    then raises on every rank; so past ``gather`` the evaluation succeeded everywhere.
    """
    done, failure = plan.share.attempt(lambda: evaluate_share(plan, evaluate, weigh, state))
    blocks, sums = done if done is not None else (None, [])
    losses = plan.share.gather(blocks, failure, len(plan.signs), f0.device)
    raise_if_not_finite(losses, f0, plan.config.method, plan.seed_text)
    return losses, sums


def estimate_gradients(
    evaluate: Evaluate,
    leaves: Sequence[torch.Tensor],
    f0: torch.Tensor,
    grad_out: torch.Tensor,
    s: Config,
    state: EvaluatorState,
) -> List[torch.Tensor]:
    """The ES estimate of ``grad_out * d f / d leaves`` for the smoothed objective, one tensor per leaf.

    ``evaluate`` maps a list of tensors shaped like ``leaves`` to the scalar loss; ``f0`` is the
    unperturbed loss (the 'forward' method's baseline); ``state`` is the decorated function's.
    """
    weigh = Weigher(f0, grad_out, s)
    with s.noise.session(s.seed, leaves) as seed:
        # shaped weights need every loss first: regenerable noise is not kept and summed while
        # evaluating (the reducer regenerates it); a user distribution's is kept until the end
        keep = s.fitness_shaping is None or not s.noise.regenerable
        plan = make_plan(s, leaves, seed, state.vmap_failure is not None, accumulate=keep)
        losses, sums = _evaluate(plan, evaluate, weigh, state, f0)
    grads = gradients(plan, losses, sums, weigh)
    raise_if_estimate_not_finite(grads, s.sigma)
    return grads


def estimate_weights(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], f0: torch.Tensor, s: Config, state: EvaluatorState
) -> Tuple[Plan, torch.Tensor]:
    """The plan and the N float64 weights of a seed-compressed estimate (upstream gradient 1)."""
    weigh = Weigher(f0, torch.ones((), dtype=torch.float64), s)
    with s.noise.session(s.seed, leaves) as seed:
        plan = make_plan(s, leaves, seed, state.vmap_failure is not None, accumulate=False)
        losses, _ = _evaluate(plan, evaluate, weigh, state, f0)
    return plan, sample_weights(plan, losses, weigh)
