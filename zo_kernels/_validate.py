"""Checks of what a call passes and gets back (leaves, outputs, samples, aliasing); each error names it.

The checks of the estimator's settings (method, num_samples, sigma, seed, ...) are in
``zo_kernels/estimator/settings.py``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor


def resolve_argnums(argnums: Tuple[int, ...], num_args: int) -> Tuple[int, ...]:
    """Map (possibly negative) ``argnums`` onto ``range(num_args)``; ValueError when out of range or repeated."""
    resolved = []
    for a in argnums:
        if not -num_args <= a < num_args:
            raise ValueError(f"argnums={argnums!r} is out of range for a call with {num_args} positional argument(s)")
        resolved.append(a % num_args)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"argnums={argnums!r} names the same positional argument twice")
    return tuple(resolved)


def check_leaf(leaf: object, where: str) -> torch.Tensor:
    """Return ``leaf`` if it is a floating-point tensor with values; TypeError/ValueError naming ``where`` otherwise."""
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{where} must be a floating-point tensor, got {type(leaf).__name__}")
    if not leaf.dtype.is_floating_point:
        raise TypeError(f"{where} must be a floating-point tensor, got dtype {leaf.dtype}")
    if leaf.device.type == "meta":
        raise ValueError(f"{where} is on the meta device: it has no values to perturb or evaluate")
    return leaf


def check_disjoint(leaves: Sequence[torch.Tensor], what: str) -> None:
    """ValueError if two of ``leaves`` share memory (``what`` says why that is refused).

    Perturbing storage in place twice through two aliases would give the function ``theta + sigma
    (z_a + z_b)`` for both, and a wrong gradient; so ``inplace=True`` refuses aliased leaves.
    """
    spans = []
    for k, p in enumerate(leaves):
        if p.numel() == 0:
            continue
        start = p.storage_offset()
        stop = start + 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride()))
        size = p.element_size()
        spans.append((p.untyped_storage().data_ptr(), start * size, stop * size, k))
    spans.sort()
    for (ptr_a, _, stop_a, a), (ptr_b, start_b, _, b) in zip(spans, spans[1:]):
        if ptr_a == ptr_b and start_b < stop_a:
            raise ValueError(f"{what}, but leaves {min(a, b)} and {max(a, b)} share memory")


def check_output(output: object, where: str) -> torch.Tensor:
    """Return ``output`` if it is a floating-point scalar (0-dim) tensor."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{where} must return a floating-point scalar tensor, got {type(output).__name__}")
    if output.ndim != 0:
        raise RuntimeError(f"{where} must return a scalar (0-dim) tensor, got shape {tuple(output.shape)}")
    if not output.dtype.is_floating_point:
        raise TypeError(f"{where} must return a floating-point scalar tensor, got dtype {output.dtype}")
    return output


def check_sample(sample: object, like: torch.Tensor, where: str) -> torch.Tensor:
    """Return a distribution's ``sample`` as a tensor shaped, typed and placed like ``like``.

    Numbers and sequences are converted; a sample of another shape is a ValueError.
    """
    if not isinstance(sample, torch.Tensor):
        try:
            sample = torch.as_tensor(sample)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where} must be a tensor, got {type(sample).__name__}") from exc
    if sample.shape != like.shape:
        raise ValueError(f"{where} has shape {tuple(sample.shape)}, expected {tuple(like.shape)}")
    if sample.dtype.is_complex:
        raise TypeError(f"{where} must be real, got dtype {sample.dtype}")
    if sample.device.type == "meta" and like.device.type != "meta":
        raise ValueError(f"{where} is on the meta device (it has no values); expected a tensor like {like.device}")
    return sample.to(device=like.device, dtype=like.dtype)


#: Parameter dtypes that ``inplace=True`` accepts. Restoring ``theta + sigma z - sigma z`` rounds
#: twice per perturbation: about 1e-7 relative per cycle in float32, but up to 2**-8 in bfloat16 and
#: 2**-11 in float16 (tests/test_inplace.py measures both), which would visibly move the weights
#: after a few hundred samples. Half-precision parameters are refused rather than silently drifting.
INPLACE_DTYPES = (torch.float32, torch.float64)


def check_inplace_leaves(leaves: Sequence[torch.Tensor]) -> None:
    """Raise unless every leaf can be perturbed and restored in place."""
    for k, p in enumerate(leaves):
        if p.dtype not in INPLACE_DTYPES:
            raise TypeError(
                f"inplace=True needs float32 or float64 parameters, but leaf {k} is {p.dtype}: perturbing and "
                "restoring half-precision storage drifts by up to one rounding of that dtype per sample; "
                "use inplace=False (one scratch copy of the parameters) for such parameters"
            )
        if not p.is_contiguous():
            raise ValueError(f"inplace=True needs contiguous parameters, but leaf {k} is not contiguous")


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
