"""Argument checks shared by the public entry points: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

METHODS = ("naive", "forward", "antithetic")

#: Sample ids are the 32-bit word of the noise counter (docs/noise.md), so an estimate has at most
#: 2**32 samples; anything larger is refused before any allocation or evaluation is attempted.
MAX_NUM_SAMPLES = 2**32

Sampler = Callable[[torch.Size], Any]


def check_method(method: object) -> str:
    """Return ``method`` if it is one of :data:`METHODS`; ValueError listing them otherwise."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    return method


def check_num_samples(num_samples: object, name: str = "num_samples", maximum: Optional[int] = None) -> int:
    """Return ``num_samples`` (or the count called ``name``) as an int >= 1 (and <= ``maximum`` when given)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(num_samples).__name__} {num_samples!r}")
    if num_samples < 1:
        raise ValueError(f"{name} must be an int >= 1, got {num_samples}")
    if maximum is not None and num_samples > maximum:
        raise ValueError(
            f"{name} must be an int in [1, {maximum}] (sample ids are 32-bit counters of the noise stream), "
            f"got {num_samples}"
        )
    return int(num_samples)


def check_sigma(sigma: object) -> float:
    """Return ``sigma`` as a positive finite float (Python number or one-element tensor).

    ``1 / sigma`` must be finite too: the estimate divides by sigma, and a subnormal sigma would
    silently turn every gradient into inf or NaN.
    """
    if isinstance(sigma, torch.Tensor) and sigma.device.type == "meta":
        raise TypeError("sigma must be a positive finite real number, got a meta tensor (it has no value)")
    if isinstance(sigma, torch.Tensor) and sigma.numel() == 1 and not sigma.dtype.is_complex:
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a positive finite real number, got {type(sigma).__name__} {sigma!r}")
    value = float(sigma)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"sigma must be a positive finite real number, got {sigma!r}")
    if not math.isfinite(1.0 / value):
        raise ValueError(f"sigma must be a positive finite real number whose inverse is finite, got {sigma!r}")
    return value


def check_real(value: object, name: str, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    """Return ``value`` as a finite float (in ``[lo, hi)`` where given): a real number, not a bool.

    A one-element real tensor is read as its value.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
        if not (value.dtype.is_complex or value.dtype == torch.bool):
            value = value.item()
    expected = "a finite real number" + (
        f" in [{lo}, {hi})" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result) or (lo is not None and result < lo) or (hi is not None and result >= hi):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return result


def check_argnums(argnums: object) -> Tuple[int, ...]:
    """Return ``argnums`` as a non-empty tuple of distinct ints (an int means a 1-tuple)."""
    items: Sequence[object] = (argnums,) if isinstance(argnums, numbers.Integral) else argnums  # type: ignore[assignment]
    if not isinstance(items, (tuple, list)) or len(items) == 0:
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    for a in items:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    result = tuple(int(a) for a in items)
    if len(set(result)) != len(result):
        raise ValueError(f"argnums must not repeat an argument, got {argnums!r}")
    return result


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


def check_seed(seed: object) -> Union[None, int, torch.Generator]:
    """Return ``seed`` if it is None, an int in [0, 2**64) or a ``torch.Generator``."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int in [0, 2**64) or a torch.Generator, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
    return int(seed)


def as_sampler(distribution: object) -> Sampler:
    """A function of the sample shape for ``distribution``: its ``.sample`` method, or itself if callable."""
    if isinstance(distribution, type) and hasattr(distribution, "sample"):
        raise TypeError(
            f"distribution must be an instance, got the class {distribution.__name__} "
            f"(did you mean {distribution.__name__}(...)?)"
        )
    sample = getattr(distribution, "sample", None)
    if callable(sample):
        return lambda shape: sample(shape)
    if callable(distribution):
        return distribution  # type: ignore[return-value]
    raise TypeError(
        "distribution must have a .sample(sample_shape) method (e.g. a torch.distributions.Distribution) "
        f"or be a function of the sample shape; got {type(distribution).__name__}"
    )


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
