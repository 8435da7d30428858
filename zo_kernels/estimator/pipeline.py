"""One estimate, end to end: plan, evaluate, reduce (the fused path; :mod:`.recorded` is the differentiable one).

Noise is never materialized as an ``N x n`` tensor: per sample, a backend writes ``theta + sigma
z_i`` into a scratch buffer (or the parameters themselves), and one ``reduce`` regenerates ``z_i``
at the end, unless the noise keeps each sample's while evaluating (user distributions, and where a
backend prefers it).
"""

from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import Config
from .evaluate import Evaluate, EvaluatorState, Sums, evaluate_share
from .plan import Plan, make_plan
from .reduce import Weigher, gradients, raise_if_not_finite, sample_weights, values


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
    _warn_if_constant(losses, f0, plan, state)
    return losses, sums


def _warn_once(state: EvaluatorState, key: str, message: str) -> None:
    if key not in state.warned:
        state.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _warn_if_constant(losses: torch.Tensor, f0: torch.Tensor, plan: Plan, state: EvaluatorState) -> None:
    """Every perturbed loss equal to f(theta) exactly: the estimate is zero; say why that is likely, once."""
    if "constant" in state.warned or not bool((values(losses) == values(f0).to(losses)).all()):
        return
    dtypes = sorted({str(seg.theta.dtype).replace("torch.", "") for seg in plan.segments}) or ["no parameters"]
    _warn_once(
        state,
        "constant",
        f"zo_kernels: every perturbed loss of this estimate equals the unperturbed loss f(theta) exactly, so "
        "the estimate carries no information about the gradient (it is zero for 'forward' and 'antithetic', "
        f"pure noise for 'naive'; {plan.seed_text}). Likely causes: sigma={plan.config.sigma} is below "
        f"the resolution of the parameters' dtype ({', '.join(dtypes)}) at their magnitude, so the perturbation "
        "rounds away; the function does not use the differentiated argument it is given (e.g. it calls "
        "model(x) instead of using the parameters passed in); or the loss is constant (or quantized) at this "
        "scale. Warned once per decorated function (per call of estimate()).",
    )


def warn_if_group_missing(s: Config, state: EvaluatorState) -> None:
    """torch.distributed initialized with several ranks but no ``process_group``: each rank estimates alone."""
    if s.group_ref is not None or "group" in state.warned or not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if world > 1:
        _warn_once(
            state,
            "group",
            f"zo_kernels: torch.distributed is initialized with {world} ranks, but this estimate was given no "
            "process_group, so each rank estimates alone with its own noise and the ranks' parameters drift "
            "apart. Pass process_group=dist.group.WORLD (note: dist.group.WORLD is None until "
            "init_process_group() has run, so decorate after it), or ignore this if independent ranks are "
            "intended. Warned once per decorated function (per call of estimate()).",
        )


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
    warn_if_group_missing(s, state)
    with s.noise.session(s.seed, leaves) as seed:
        # shaped weights need every loss first: regenerable noise is not kept and summed while
        # evaluating (the reducer regenerates it); a user distribution's is kept until the end
        keep = s.fitness_shaping is None or not s.noise.regenerable
        plan = make_plan(s, leaves, seed, state.vmap_failure is not None, accumulate=keep)
        losses, sums = _evaluate(plan, evaluate, weigh, state, f0)
    return gradients(plan, losses, sums, weigh)


def estimate_weights(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], f0: torch.Tensor, s: Config, state: EvaluatorState
) -> Tuple[Plan, torch.Tensor]:
    """The plan and the N float64 weights of a seed-compressed estimate (upstream gradient 1)."""
    weigh = Weigher(f0, torch.ones((), dtype=torch.float64), s)
    warn_if_group_missing(s, state)
    with s.noise.session(s.seed, leaves) as seed:
        plan = make_plan(s, leaves, seed, state.vmap_failure is not None, accumulate=False)
        losses, _ = _evaluate(plan, evaluate, weigh, state, f0)
    return plan, sample_weights(plan, losses, weigh)
