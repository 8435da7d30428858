"""The reducer: the weights ``w_i`` from the method, then ``sum_i w_i z_i`` by the noise's reduce (or the kept sums).

Also the checks that refuse non-finite losses and an overflowing estimate.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

from ..config import Config
from ..ops.spec import accumulation_dtype
from .plan import Plan


def values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s data with torch.func's wrappers peeled off (a vmapped batch: every element's), for checks.

    Under ``torch.func.vmap`` a check's ``bool(...)`` is data-dependent control flow, which vmap
    refuses; the estimate's checks read the plain data instead, so they hold for every element.
    """
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t.detach()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` (of every element of a vmapped batch) is finite: one device sync."""
    return bool(torch.isfinite(values(t)).all())


class NonFiniteLossError(FloatingPointError):
    """A loss evaluated for the estimate was NaN or infinite; the message names the sample and seed."""


def _coefficient(method: str, sigma: float, num_samples: int) -> float:
    return (0.5 if method == "antithetic" else 1.0) / (sigma * num_samples)


def method_weights(losses: torch.Tensor, f0: torch.Tensor, grad_out: torch.Tensor, s: Config) -> torch.Tensor:
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

    def __init__(self, f0: torch.Tensor, grad_out: torch.Tensor, s: Config) -> None:
        self.f0, self.grad_out, self.config = f0, grad_out, s

    def __call__(self, block: torch.Tensor, scales: Union[float, torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return method_weights(block, self.f0, self.grad_out, self.config) * scales


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
    """One gradient tensor per leaf: a kept sum where the evaluator formed it, else the noise's reduce.

    Raises :class:`NonFiniteLossError` if the estimate overflows (checked per segment, one sync).
    """
    if any(acc is None for acc in sums):
        weights = sample_weights(plan, losses, weigh)
    grads, flats = [], []
    for seg, acc in zip(plan.segments, sums):
        if acc is not None:
            g = acc.to(seg.theta.dtype)
        else:
            g = torch.zeros(seg.theta.shape, dtype=seg.theta.dtype, device=seg.theta.device)
            w = weights.to(device=g.device, dtype=accumulation_dtype(g.dtype))
            plan.noise.reduce(seg.backend, g, w, plan.sample_ids.to(g.device), plan.seed, seg.offset, seg.parts)
        flats.append(g)
        grads.extend(g[lo:hi].view(shape) for lo, hi, shape in seg.parts)
    raise_if_estimate_not_finite(flats, plan.config.sigma)
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


def shape_losses(shaping: Optional[Callable[[torch.Tensor], torch.Tensor]], losses: torch.Tensor) -> torch.Tensor:
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
