"""``ZeroOrderGradientModule``: an ``nn.Module`` whose ``forward`` is differentiated by zero-order estimation."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import weakref
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from ..api import decorate
from ..config import Config, make_config
from ..noise import Sampled

_ENABLED_FLAG = "__zero_order_gradients_enabled__"


def _parameter_slots(module: nn.Module) -> Tuple[List[nn.Parameter], List[List[Tuple[nn.Module, str]]]]:
    """Distinct parameters that require grad, in ``named_parameters`` order, each with every (module, name) holding it.

    Tied parameters appear once and are replaced at every place they are held, so tying survives
    perturbation. Frozen parameters (``requires_grad=False``) are neither perturbed nor estimated:
    their noise would only add variance to the trainable ones' estimate.
    """
    params: List[nn.Parameter] = []
    slots: List[List[Tuple[nn.Module, str]]] = []
    index: Dict[int, int] = {}
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is None or not p.requires_grad:
                continue
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
                slots.append([])
            slots[index[id(p)]].append((sub, name))
    return params, slots


@contextlib.contextmanager
def _swapped(slots: Sequence[Sequence[Tuple[nn.Module, str]]], tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily hold ``tensors`` in place of the parameters; always restores them."""
    saved = [[(sub, name, sub._parameters[name]) for sub, name in where] for where in slots]
    try:
        for where, t in zip(slots, tensors):
            for sub, name in where:
                sub._parameters[name] = t  # type: ignore[assignment]
        yield
    finally:
        for entries in saved:
            for sub, name, p in entries:
                sub._parameters[name] = p


def enable_zero_order_gradients(
    cls: type, method: str = "naive", num_samples: int = 1, sigma: float = 1.0, fitness_shaping: Any = None
) -> type:
    """Wrap ``cls.forward`` so that the module's parameters receive zero-order gradients.

    The module itself is the distribution: its ``sample(sample_shape)`` draws the noise.
    ``fitness_shaping`` is :func:`zo_kernels.zero_order`'s.
    Raises TypeError if ``cls`` (or a base class) already has zero-order gradients enabled.
    """
    if getattr(cls, _ENABLED_FLAG, False):
        raise TypeError("Zero-order gradient estimation is already enabled for the `forward` method.")
    # The keywords are checked once, here; each instance is its own distribution, so its config
    # (the same checked keywords with the instance as noise) is made once per instance, on first use.
    template = make_config(
        lambda shape: shape, method, num_samples, sigma, None, None, "copy", None, None, fitness_shaping
    )
    configs: weakref.WeakKeyDictionary[nn.Module, Config] = weakref.WeakKeyDictionary()
    original_forward = cls.forward

    @functools.wraps(original_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        params, slots = _parameter_slots(self)
        if len(params) == 0:
            raise RuntimeError("The module has no parameters.")
        for p, where in zip(params, slots):
            sub, name = where[0]
            if not p.dtype.is_floating_point:
                raise TypeError(
                    f"parameter {name!r} of {type(sub).__name__} must be a floating-point tensor to receive "
                    f"zero-order gradients, got dtype {p.dtype}"
                )
            if p.device.type == "meta":
                raise ValueError(f"parameter {name!r} of {type(sub).__name__} is on the meta device: it has no values")
        if self not in configs:
            configs[self] = dataclasses.replace(template, noise=Sampled(self))

        @decorate(configs[self], (0,))
        def loss(flat_params: Tuple[torch.Tensor, ...], *inner_args: Any, **inner_kwargs: Any) -> torch.Tensor:
            with _swapped(slots, flat_params):
                return original_forward(self, *inner_args, **inner_kwargs)

        return loss(tuple(params), *args, **kwargs)

    cls.forward = forward  # type: ignore[attr-defined]
    setattr(cls, _ENABLED_FLAG, True)
    return cls


class ZeroOrderGradientModule(nn.Module, metaclass=abc.ABCMeta):
    """Base class for modules trained with zero-order gradients.

    Subclass with class keywords and define ``forward`` (returning a scalar loss) and ``sample``::

        class Net(ZeroOrderGradientModule, method="antithetic", num_samples=100, sigma=0.01,
                  fitness_shaping="centered_ranks"):  # fitness_shaping optional, as in zero_order
            def forward(self, x, y): return F.mse_loss(self.fc(x), y)
            def sample(self, sample_shape): return torch.randn(sample_shape)

    ``loss = net(x, y); loss.backward()`` then fills ``.grad`` of every parameter. A module with
    no parameters raises RuntimeError at forward; subclassing an enabled class raises TypeError;
    a subclass missing ``forward`` or ``sample`` cannot be instantiated (TypeError).
    """

    def __init_subclass__(
        cls,
        method: str = "naive",
        num_samples: int = 1,
        sigma: float = 1.0,
        fitness_shaping: Any = None,
        **kwargs: Any,
    ) -> None:
        try:
            super().__init_subclass__(**kwargs)
        except TypeError as exc:
            if not kwargs:
                raise
            raise TypeError(
                f"{cls.__name__}: unexpected class keyword(s) {sorted(kwargs)}; ZeroOrderGradientModule takes "
                "method, num_samples, sigma and fitness_shaping"
            ) from exc
        enable_zero_order_gradients(
            cls, method=method, num_samples=num_samples, sigma=sigma, fitness_shaping=fitness_shaping
        )

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the scalar loss."""

    @abc.abstractmethod
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Draw one noise tensor of ``sample_shape``."""
