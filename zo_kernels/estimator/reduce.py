"""The reducer: the weights ``w_i`` from the method, then ``sum_i w_i z_i`` by the family's reduce (or the kept sums).

Also the checks that refuse non-finite losses and an overflowing estimate.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .._validate import all_finite, values
from ..reference.noise import accumulation_dtype
from .plan import Plan
from .settings import Settings
from .shaping import shape_losses


class NonFiniteLossError(FloatingPointError):
    """A loss evaluated for the estimate was NaN or infinite; the message names the sample and seed."""


def _coefficient(method: str, sigma: float, num_samples: int) -> float:
    return (0.5 if method == "antithetic" else 1.0) / (sigma * num_samples)


def method_weights(losses: torch.Tensor, f0: torch.Tensor, grad_out: torch.Tensor, s: Settings) -> torch.Tensor:
    """Per-sample weights ``w_i`` so that the estimate is ``sum_i w_i z_i`` (chain rule included).

    With fitness shaping, ``losses`` must be all of the estimate's (see :mod:`.shaping`).
    """
    shaping = s.fitness_shaping
    if s.method == "antithetic":
        shaped = shape_losses(shaping, losses)
        diffs = shaped[0] - shaped[1]
    elif s.method == "forward":
        diffs = shape_losses(shaping, losses[0] - f0.to(losses))
    else:
        diffs = shape_losses(shaping, losses[0])
    return diffs * (grad_out.detach().to(losses) * _coefficient(s.method, s.sigma, s.num_samples))


class Weigher:
    """``weigh(block, scales)``: the weights of a ``(signs, k)`` block of losses whose noise has ``scales``."""

    def __init__(self, f0: torch.Tensor, grad_out: torch.Tensor, s: Settings) -> None:
        self.f0, self.grad_out, self.settings = f0, grad_out, s

    def __call__(self, block: torch.Tensor, scales: Union[float, torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return method_weights(block, self.f0, self.grad_out, self.settings) * scales


def sample_weights(plan: Plan, losses: torch.Tensor, weigh: Weigher) -> torch.Tensor:
    """The float64 weights ``w_i`` of ``sum_i w_i z_i`` for all N samples, noise scales included."""
    scales = torch.tensor(plan.scales, dtype=torch.float64).to(losses.device)
    return weigh(losses, scales)


def raise_if_not_finite(losses: torch.Tensor, f0: Optional[torch.Tensor], method: str, seed_text: str) -> None:
    """One device sync for the whole estimate; name the first sample whose loss is NaN or inf."""
    if f0 is not None and method == "forward" and not all_finite(f0):
        raise NonFiniteLossError(
            f"zero_order: the unperturbed loss f(theta) is {values(f0).reshape(-1).tolist()} (method 'forward' uses "
            "it as baseline)"
        )
    if all_finite(losses):
        return
    losses = values(losses)
    finite = torch.isfinite(losses)
    flat = (~finite).reshape(-1).nonzero()[0].item()
    sign, index = divmod(flat, losses.shape[-1])
    raise NonFiniteLossError(
        f"zero_order: the loss at sample {index} ({'-' if sign else '+'}sigma*z) is "
        f"{losses.reshape(-1)[flat].item()}; {seed_text}. Lower sigma or check the function's domain."
    )


def gradients(
    plan: Plan, losses: torch.Tensor, sums: Sequence[Optional[torch.Tensor]], weigh: Weigher
) -> List[torch.Tensor]:
    """One gradient tensor per leaf: a kept sum where the evaluator formed it, else the family's reduce."""
    if any(acc is None for acc in sums):
        weights = sample_weights(plan, losses, weigh)
    grads = []
    for seg, acc in zip(plan.segments, sums):
        if acc is not None:
            g = acc.to(seg.theta.dtype)
        else:
            g = torch.zeros(seg.theta.shape, dtype=seg.theta.dtype, device=seg.theta.device)
            w = weights.to(device=g.device, dtype=accumulation_dtype(g.dtype))
            plan.family.reduce(seg.backend, g, w, plan.sample_ids.to(g.device), plan.seed, seg.offset, seg.parts)
        grads.extend(g[lo:hi].view(shape) for lo, hi, shape in seg.parts)
    return grads


def raise_if_estimate_not_finite(tensors: Sequence[torch.Tensor], sigma: float) -> None:
    """Every loss was finite, yet the estimate may overflow (weights ~ loss / (sigma N)): refuse to return it."""
    # max and min propagate NaN and see +-inf, without the n-byte mask torch.isfinite(t) would allocate.
    peeled = [values(t) for t in tensors]
    extremes = [torch.stack([t.amax(), t.amin()]).to(torch.float64) for t in peeled if t.numel()]
    if extremes and not all_finite(torch.cat([e.to(extremes[0].device) for e in extremes])):
        raise NonFiniteLossError(
            f"zero_order: every loss was finite but the gradient estimate overflows its dtype (its weights are "
            f"loss differences / (sigma * num_samples), with sigma={sigma}); raise sigma or scale the loss down"
        )
