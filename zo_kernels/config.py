"""Every check of what a user passes: the estimator's arguments, once, into one frozen :class:`Config`.

``zero_order``, ``estimate``, the module API and the optimizers validate their arguments with these
functions; each error names the argument and what was expected. :func:`make_config` checks them
all, in a fixed order, before anything is evaluated, and :class:`Config` is the frozen result. The
checks of a call's own arguments and results (its differentiated leaves, its output, aliasing) are
here too; the kernels' argument checks, which guard the bindings, are in :mod:`zo_kernels.ops`.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .noise import FusedDistribution, Noise, as_noise, standard_normal
from .ops.registry import get as _get_backend
from .shaping import BY_NAME

Shaping = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("naive", "forward", "antithetic")

#: Sample ids are the 32-bit word of the noise counter (docs/noise.md), so an estimate has at most
#: 2**32 samples; anything larger is refused before any allocation or evaluation is attempted.
MAX_NUM_SAMPLES = 2**32

Seed = Union[None, int, torch.Generator]


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


def check_seed(seed: object) -> Seed:
    """Return ``seed`` if it is None, an int in [0, 2**64) or a ``torch.Generator``."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int in [0, 2**64) or a torch.Generator, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
    return int(seed)


def check_backend(backend: Optional[str]) -> Optional[str]:
    """Return ``backend`` if it is None or the name of an available backend."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str) or None, got {type(backend).__name__}")
    _get_backend(backend)
    return backend


@dataclass(frozen=True)
class Config:
    """Everything about an estimate that is fixed when the decorator is applied."""

    method: str
    num_samples: int
    sigma: float
    seed: Seed
    backend: Optional[str]
    noise: Noise
    #: How each evaluation is given ``theta + s sigma z_i``: one of :data:`PERTURB_MODES`.
    perturb: str = "copy"
    #: A weak reference to the ``torch.distributed`` group: holding the group itself would keep a
    #: destroyed group's transport alive until interpreter exit, where gloo can abort the process.
    group_ref: Optional[Callable[[], Any]] = None
    batch_size: Optional[int] = None
    #: The function the perturbed losses of an estimate go through before the method's formula (None: raw).
    fitness_shaping: Optional[Shaping] = None

    @property
    def process_group(self) -> Any:
        """The process group the samples are spread over, or None."""
        if self.group_ref is None:
            return None
        group = self.group_ref()
        if group is None:
            raise RuntimeError(
                "process_group: the torch.distributed group given to the decorator no longer exists "
                "(destroy_process_group() was called); decorate the function again for a new group"
            )
        return group

    @property
    def signs(self) -> Tuple[float, ...]:
        """The signs of the evaluations per sample: ``(+1, -1)`` for 'antithetic', else ``(+1,)``."""
        return (1.0, -1.0) if self.method == "antithetic" else (1.0,)

    @property
    def inplace(self) -> bool:
        """Whether the parameters' own storage is perturbed (``perturb='inplace'``, MeZO's mode)."""
        return self.perturb == "inplace"

    @property
    def on_use(self) -> bool:
        """Whether each use of a parameter is served its perturbed values (``perturb='on_use'``)."""
        return self.perturb == "on_use"


def check_regenerable(distribution: Any) -> FusedDistribution:
    """The built-in distribution of ``distribution``, whose noise a seed-compressed gradient can regenerate."""
    fused = distribution if isinstance(distribution, FusedDistribution) else standard_normal(distribution)
    if fused is None:
        given = (
            f"the class {distribution.__name__} (pass an instance)"
            if isinstance(distribution, type)
            else type(distribution).__name__
        )
        raise TypeError(
            "distribution must be zo_kernels.distributions.Normal(), Rademacher(), Sphere() or LowRank() "
            f"(a seed-compressed gradient needs the counter-based stream), got {given}"
        )
    return distribution


#: How an evaluation sees ``theta + s sigma z_i`` (docs/memory.md): ``'copy'`` writes it into a scratch
#: copy of the parameters, ``'inplace'`` into their own storage (restored after each sample),
#: ``'on_use'`` serves it to each torch operation that reads a parameter, never writing either.
PERTURB_MODES = ("copy", "inplace", "on_use")


def check_perturb(perturb: object, inplace: object = False) -> str:
    """The perturbation mode of ``perturb=`` and its alias ``inplace=True`` (``perturb='inplace'``)."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not isinstance(perturb, str) or perturb not in PERTURB_MODES:
        options = ", ".join(repr(m) for m in PERTURB_MODES)
        kind = ValueError if isinstance(perturb, str) else TypeError
        raise kind(f"perturb must be one of {options}; got {perturb!r}")
    if inplace and perturb != "inplace":
        if perturb != "copy":
            raise ValueError(
                f"inplace=True is the alias of perturb='inplace' and contradicts perturb={perturb!r}; pass only perturb"
            )
        return "inplace"
    return perturb


def _check_regenerable_options(noise: Noise, perturb: str, process_group: Any, batch_size: Optional[int]) -> None:
    """The options that regenerate the noise from its seed need a family that can."""
    if not noise.regenerable:
        mode = None if perturb == "copy" else f"perturb={perturb!r}"
        for name, given in ((mode, mode), ("batch_size", batch_size), ("process_group", process_group)):
            if given is not None:
                raise ValueError(
                    f"{name} needs a built-in distribution (zo_kernels.distributions.Normal(), Rademacher(), "
                    "Sphere() or LowRank()): it relies on regenerating the noise from its seed"
                )
    if batch_size is not None:
        check_num_samples(batch_size, "batch_size")
        if perturb == "inplace":
            raise ValueError("batch_size cannot be combined with inplace=True (a batch needs batch_size copies)")
        if perturb == "on_use" and not noise.shares_weights:
            raise ValueError(
                f"batch_size cannot be combined with perturb='on_use' for {noise.name} noise: a full-rank batch needs "
                "batch_size perturbed copies of the parameters. Use LowRank() (whose members share the weights) or "
                "perturb='copy'"
            )


def make_config(
    distribution: Any,
    method: str,
    num_samples: int,
    sigma: float,
    seed: Seed,
    backend: Optional[str],
    perturb: str,
    process_group: Any,
    batch_size: Optional[int],
    fitness_shaping: Any = None,
) -> Config:
    """Validate every estimator argument (each error names it) into the settings of one estimator.

    ``perturb`` is a mode already checked by :func:`check_perturb` (which also resolves ``inplace=``).
    """
    noise = as_noise(distribution)
    _check_regenerable_options(noise, perturb, process_group, batch_size)
    shaping = check_fitness_shaping(fitness_shaping)
    config = Config(
        method=check_method(method),
        num_samples=check_num_samples(num_samples, maximum=MAX_NUM_SAMPLES),
        sigma=check_sigma(sigma),
        seed=check_seed(seed),
        backend=check_backend(backend),
        noise=noise,
        perturb=perturb,
        group_ref=None if process_group is None else weakref.ref(check_process_group(process_group)),
        batch_size=batch_size,
        fitness_shaping=shaping,
    )
    if isinstance(fitness_shaping, str) and config.num_samples == 1 and config.method != "antithetic":
        raise ValueError(
            f"fitness_shaping={fitness_shaping!r} with num_samples=1 and method={method!r} shapes a single loss, "
            "which is always 0: every estimate would be zero. Use num_samples >= 2, method='antithetic', or no "
            "fitness shaping"
        )
    return config


def check_process_group(group: Any) -> Any:
    """``group`` if it is None or usable: torch.distributed available and initialized."""
    if group is None:
        return None
    if not dist.is_available():
        raise RuntimeError("process_group was given, but this PyTorch build has no torch.distributed")
    if not isinstance(group, dist.ProcessGroup):
        kind = type(group).__name__
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD), got {kind}")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given, but torch.distributed.init_process_group() has not been called")
    return group


def check_fitness_shaping(value: object) -> Optional[Shaping]:
    """The shaping function of ``fitness_shaping=value``: None, one of :data:`NAMED`, or a callable."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in BY_NAME:
            options = ", ".join(repr(n) for n in BY_NAME)
            raise ValueError(f"fitness_shaping must be None, {options} or a callable; got {value!r}")
        return BY_NAME[value]
    if callable(value):
        return value  # type: ignore[return-value]
    raise TypeError(
        f"fitness_shaping must be None, {', '.join(repr(n) for n in BY_NAME)} or a callable "
        f"(losses -> shaped losses of the same shape); got {type(value).__name__}"
    )


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


def check_distinct(leaves: Sequence[torch.Tensor], what: str) -> None:
    """ValueError if the same tensor object is two of ``leaves`` (``what`` says why that is refused)."""
    seen = {}
    for k, p in enumerate(leaves):
        if id(p) in seen:
            raise ValueError(f"{what}, but leaves {seen[id(p)]} and {k} are the same tensor; pass it once")
        seen[id(p)] = k


def check_output(output: object, where: str) -> torch.Tensor:
    """Return ``output`` if it is a floating-point scalar (0-dim) tensor."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{where} must return a floating-point scalar tensor, got {type(output).__name__}")
    if output.ndim != 0:
        raise RuntimeError(f"{where} must return a scalar (0-dim) tensor, got shape {tuple(output.shape)}")
    if not output.dtype.is_floating_point:
        raise TypeError(f"{where} must return a floating-point scalar tensor, got dtype {output.dtype}")
    return output


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


def as_params(params: Any) -> Any:
    """``params`` itself, or the list of its items if it is an iterable that is not a pytree.

    Tensors, dicts, lists and tuples (nested) are pytrees and come back as they are; any other
    iterable (a generator such as ``model.parameters()``, ``dict.values()``) is read once into a list.
    Sets are refused: their order, which decides each tensor's noise, changes from run to run.
    """
    if isinstance(params, (torch.Tensor, str, bytes)) or not isinstance(params, Iterable):
        return params
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            "params must be an ordered collection of tensors (a list, tuple, dict or generator), got a set: "
            "its order, which decides the noise of each tensor, changes from run to run"
        )
    leaves, _ = pytree.tree_flatten(params)
    return list(params) if len(leaves) == 1 and leaves[0] is params else params
