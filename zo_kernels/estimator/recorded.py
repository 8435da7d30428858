"""The differentiable estimate: the perturbed evaluations recorded by autograd (``create_graph=True``).

The fused path (plan, evaluate, reduce) writes ``theta + sigma z_i`` into scratch buffers with the
kernels and regenerates ``z_i`` in the reducer: nothing it computes can be differentiated. When the
backward pass is itself differentiated (``torch.autograd.grad(..., create_graph=True)``,
``torch.autograd.functional.hessian``, ``torch.func.grad`` / ``jacrev``, which always record), the
estimate must be a differentiable function of the parameters, as TorchOpt's is. Here each sample's
noise is generated once by the noise (the same stream elements as the fused path, so the same
estimate for the same seed up to rounding), ``theta + s sigma z_i`` is formed by autograd ops on the
leaves, the function is evaluated with its graph recorded, and ``sum_i w_i z_i`` keeps the weights'
dependence on the leaves. For 'antithetic' the derivative of the estimate is the Stein second-order
estimate ``(1/2 sigma N) sum_i z_i (grad f(theta + sigma z_i) - grad f(theta - sigma z_i))^T``; for
'forward' the baseline ``f(theta)`` is evaluated once more, recorded, so its exact gradient enters.

Memory: every sample's noise and the N (antithetic: 2N) recorded evaluations are held until the
estimate is differentiated or released, as with TorchOpt.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from ..config import Config, check_output
from ..ops.spec import accumulation_dtype
from .evaluate import Evaluate, EvaluatorState, check_batched_output, evaluate_sample, record_vmap_failure
from .plan import Plan, make_plan, samples_per_call
from .reduce import method_weights, raise_if_estimate_not_finite, raise_if_not_finite

#: Rows of noise per leaf: ``(N, *leaf.shape)`` in the leaf's accumulation dtype, scale included.
Noise = List[torch.Tensor]


def check_recordable(s: Config, why: str) -> None:
    """RuntimeError if an estimate with ``s`` cannot be recorded by autograd (``why``: what asked for it)."""
    refused = (
        ("inplace=True", s.inplace, "it perturbs the parameters' own storage, which autograd cannot record"),
        (
            "perturb='on_use'",
            s.on_use,
            "it serves the perturbed values to each operation from the fused kernels, outside autograd's graph",
        ),
        ("process_group", s.group_ref is not None, "the other ranks' losses arrive as numbers, without a graph"),
    )
    for name, given, reason in refused:
        if given:
            raise RuntimeError(
                f"zo_kernels.zero_order: {why} needs a differentiable estimate (the perturbed evaluations recorded "
                f"by autograd), which {name} cannot give: {reason}. Decorate the function without {name} for "
                "this use, or differentiate it once (loss.backward() / torch.autograd.grad without create_graph)."
            )


def _noise(plan: Plan) -> Noise:
    """Every sample's noise for every leaf, regenerated (or drawn) once: ``z_i`` times the sample's scale.

    The plan is over zero tensors, so a perturbation ``0 + scale * z_i`` is exactly the scaled noise.
    """
    noise, ids = plan.noise, range(plan.share.first, plan.share.first + plan.share.count)
    rows = [
        torch.empty((len(ids), *p.shape), dtype=p.dtype, device=p.device) for seg in plan.segments for p in seg.leaves
    ]
    keeps = [None if noise.regenerable else noise.keep_buffer(seg) for seg in plan.segments]
    perturbers = [noise.perturber(seg, plan.seed, keep) for seg, keep in zip(plan.segments, keeps)]
    for i in ids:
        made: List[torch.Tensor] = []
        for perturb, seg in zip(perturbers, plan.segments):
            out = perturb(i, plan.scales[i])
            made.extend(seg.views if out is None else out)
        for row, z in zip(rows, made):
            row[i - plan.share.first].copy_(z)
    return rows


def _perturbed(leaves: Sequence[torch.Tensor], noise: Noise, i: int, scale: float) -> List[torch.Tensor]:
    """``theta + scale * z_i`` per leaf, recorded by autograd, rounded once to the leaf's dtype."""
    return [(p + scale * z[i]).to(p.dtype) for p, z in zip(leaves, noise)]


def _loop(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], noise: Noise, plan: Plan, ids: range
) -> List[torch.Tensor]:
    """The recorded losses of samples ``ids``, one call per evaluation: ``(signs,)`` per sample."""
    sigma = plan.config.sigma
    return [
        torch.stack(
            [
                evaluate_sample(evaluate, _perturbed(leaves, noise, i, sign * sigma), i, sign, plan.seed_text, True)
                for sign in plan.signs
            ]
        ).to(torch.float64)
        for i in ids
    ]


def _batched(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], noise: Noise, plan: Plan, state: EvaluatorState
) -> List[torch.Tensor]:
    """The recorded losses, ``batch_size`` evaluations per ``torch.func.vmap`` call; the loop where vmap fails."""
    signs, sigma, count = plan.signs, plan.config.sigma, plan.share.count
    width = samples_per_call(plan.config, count)
    batched = torch.func.vmap(lambda *tensors: evaluate(list(tensors)))
    losses: List[torch.Tensor] = []
    for lo in range(0, count, width):
        hi = min(lo + width, count)
        members = [_perturbed(leaves, noise, i, sign * sigma) for i in range(lo, hi) for sign in signs]
        rows = [torch.stack(column) for column in zip(*members)]  # per leaf, the call's members stacked
        try:
            out = batched(*rows)
        except (RuntimeError, NotImplementedError) as exc:  # what torch raises for what vmap cannot run
            record_vmap_failure(state, exc, plan.config.batch_size)
            return losses + _loop(evaluate, leaves, noise, plan, range(lo, count))
        out = check_batched_output(out, (hi - lo) * len(signs), lo, hi).to(torch.float64)
        losses.extend(out.view(hi - lo, len(signs)).unbind(0))
    return losses


def recorded_gradients(
    evaluate: Evaluate,
    leaves: Sequence[torch.Tensor],
    f0: torch.Tensor,
    s: Config,
    state: EvaluatorState,
    why: str,
) -> List[torch.Tensor]:
    """The ES estimate of ``d f / d leaves`` (upstream gradient 1) as a differentiable function of ``leaves``.

    ``f0`` is the unperturbed loss, detached (checked finite for 'forward', whose baseline is
    evaluated again with its graph); ``why`` names what asked for the recording, for errors.
    """
    check_recordable(s, why)
    # the noise is plain data: generated with torch.func's transforms (if any) set aside, as the kernels need
    with torch._C._DisableFuncTorch():
        zeros = [torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device) for p in leaves]
        with s.noise.session(s.seed, zeros) as seed:
            plan = make_plan(s, zeros, seed, vmap_failed=True, accumulate=False)
            noise = _noise(plan)
    batching = s.batch_size is not None and state.vmap_failure is None
    ids = range(plan.share.count)
    losses = torch.stack(
        _batched(evaluate, leaves, noise, plan, state) if batching else _loop(evaluate, leaves, noise, plan, ids), 1
    )
    raise_if_not_finite(losses.detach(), f0, s.method, plan.seed_text)
    baseline = check_output(evaluate(list(leaves)), "the function") if s.method == "forward" else f0
    weights = method_weights(losses, baseline, torch.ones((), dtype=torch.float64), s)
    grads = [(weights.to(z.dtype) @ z.view(z.shape[0], -1)).view(p.shape).to(p.dtype) for p, z in zip(leaves, noise)]
    raise_if_estimate_not_finite([g.detach() for g in grads], s.sigma)
    return grads
