"""Seed-compressed gradients: ``estimate()`` returns (seed, weights) instead of n gradient floats.

A zero-order estimate is ``g = sum_i w_i z(seed, i)``: the N weights and the seed describe it
completely, since every backend regenerates ``z`` from the seed. A :class:`SeedGradient` keeps just
that (plus the parameter layout), so it can be applied with the fused ``step`` kernel without ever
writing ``g``, materialized when needed, stored, sent between processes, or replayed.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch.utils import _pytree as pytree

from . import backends as _backends
from . import config as v
from .config import check_real, check_regenerable, check_sigma, make_config
from .distributions import FusedDistribution, Normal
from .estimator import EvaluatorState, estimate_weights, raise_if_estimate_not_finite
from .noise import from_stream
from .ops.spec import STREAMS, accumulation_dtype

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_STATE_KEYS = ("seed", "sample_ids", "weights", "sigma", "stream", "shapes", "dtypes")


def _state_int(value: Any, label: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi)``; ``hi`` is a power of two."""
    bound = f"[{lo}, 2**{hi.bit_length() - 1})"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{label} must be an int in {bound}, got {type(value).__name__} {value!r}")
    if not lo <= value < hi:
        raise ValueError(f"{label} must be an int in {bound}, got {value}")
    return int(value)


def _state_list(value: Any, label: str) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{label} must be a list, got {type(value).__name__}")
    return list(value)


def _state_weights(value: Any, count: int) -> torch.Tensor:
    """``state['weights']`` as float64: ``count`` finite real numbers."""
    weights = _state_list(value, "state['weights']")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"state['weights'] must hold real numbers, got {type(w).__name__} {w!r}")
    if len(weights) != count:
        raise ValueError(f"state['weights'] must have one weight per sample id ({count}), got {len(weights)}")
    weights_t = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not bool(torch.isfinite(weights_t).all()):
        raise ValueError("state['weights'] must be finite, got NaN or inf")
    return weights_t


def _state_layout(shapes_value: Any, dtypes_value: Any) -> Tuple[List[torch.Size], List[torch.dtype]]:
    """``state['shapes']`` and ``state['dtypes']``: sizes >= 0 and one known dtype per shape."""
    shapes = []
    for shape in _state_list(shapes_value, "state['shapes']"):
        dims = _state_list(shape, "state['shapes'] entries")
        shapes.append(torch.Size([_state_int(d, "state['shapes'] sizes", 0, 2**63) for d in dims]))
    dtypes = []
    for d in _state_list(dtypes_value, "state['dtypes']"):
        if not isinstance(d, str) or d not in _DTYPES:
            raise ValueError(f"state['dtypes'] entries must be one of {sorted(_DTYPES)}, got {d!r}")
        dtypes.append(_DTYPES[d])
    if len(dtypes) != len(shapes):
        raise ValueError(f"state['dtypes'] must have one dtype per shape ({len(shapes)}), got {len(dtypes)}")
    return shapes, dtypes


@dataclasses.dataclass
class SeedGradient:
    """The estimate ``g = sum_i weights[i] * z(seed, sample_ids[i])`` over a parameter layout.

    Attributes:
        seed: the 64-bit seed of the noise stream.
        sample_ids: int64 tensor of the N sample ids.
        weights: float64 tensor of the N weights (sphere scales and 1/(sigma N), for 'antithetic'
            1/(2 sigma N), folded in).
        sigma: the smoothing scale the losses were evaluated with.
        stream: ``'normal'`` or ``'rademacher'``.
        shapes, dtypes: the layout of the flattened parameters.
        loss: the unperturbed loss ``f(theta)`` (a float), when it was evaluated.
        rank: for ``LowRank(rank)`` noise, its rank (matrices get ``A B^T / sqrt(rank)``); None: full rank.
    """

    seed: int
    sample_ids: torch.Tensor
    weights: torch.Tensor
    sigma: float
    stream: str
    shapes: List[torch.Size]
    dtypes: List[torch.dtype]
    loss: Optional[float] = None
    rank: Optional[int] = None

    def _check_layout(self, leaves: List[Any]) -> None:
        for k, p in enumerate(leaves):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params leaf {k} must be a tensor, got {type(p).__name__}")
        got = [(tuple(p.shape), p.dtype) for p in leaves]
        want = [(tuple(s), d) for s, d in zip(self.shapes, self.dtypes)]
        if got != want:
            raise ValueError(f"params must have the layout of the estimate {want}, got {got}")

    def materialize(self, device: Union[str, torch.device, None] = None) -> List[torch.Tensor]:
        """The gradient tensors, one per parameter (on ``device``, default the CPU)."""
        try:
            where = torch.device(device) if device is not None else torch.device("cpu")
        except (RuntimeError, TypeError, ValueError) as exc:
            raise TypeError(f"device must be a torch.device, a device string or None, got {device!r}") from exc
        grads, offset, family = [], 0, from_stream(self.stream, self.rank)
        for shape, dtype in zip(self.shapes, self.dtypes):
            g = torch.zeros(shape, dtype=dtype, device=where)
            w = self.weights.to(device=where, dtype=accumulation_dtype(dtype))
            backend = _backends.select(where, dtype)
            family.reduce(
                backend, g.view(-1), w, self.sample_ids.to(where), self.seed, offset, [(0, g.numel(), g.shape)]
            )
            grads.append(g)
            offset += g.numel()
        return grads

    @torch.no_grad()
    def apply_(self, params: Any, lr: float) -> None:
        """``theta -= lr * g`` for every parameter, with the fused step kernel: ``g`` is never written.

        ``params`` is the pytree (or list) the estimate was made for; its tensors must be contiguous.
        ``lr`` is a finite real number. Every check runs before the first parameter is updated.
        """
        lr = check_real(lr, "lr")
        leaves = pytree.tree_leaves(params)
        self._check_layout(leaves)
        for k, p in enumerate(leaves):
            if not p.is_contiguous():
                raise ValueError(
                    f"apply_ updates parameters in place: every parameter must be contiguous, but leaf {k} is not"
                )
        offset, family = 0, from_stream(self.stream, self.rank)
        for p in leaves:
            w = self.weights.to(device=p.device, dtype=accumulation_dtype(p.dtype))
            backend = _backends.select(p.device, p.dtype)
            ids, parts = self.sample_ids.to(p.device), [(0, p.numel(), p.shape)]
            family.step(backend, p.data.view(-1), w, ids, self.seed, float(lr), offset, parts)
            offset += p.numel()

    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values (JSON-serializable) from which :meth:`from_state_dict` rebuilds this."""
        return {
            "seed": self.seed,
            "sample_ids": self.sample_ids.tolist(),
            "weights": self.weights.double().tolist(),
            "sigma": self.sigma,
            "stream": self.stream,
            "shapes": [list(s) for s in self.shapes],
            "dtypes": [str(d) for d in self.dtypes],
            "loss": self.loss,
            "rank": self.rank,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace this estimate by the one ``state`` describes."""
        other = SeedGradient.from_state_dict(state)
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(other, field.name))

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> SeedGradient:
        """The estimate described by ``state`` (from :meth:`state_dict`).

        Every entry is checked (types, ranges, matching lengths) before anything is built, and each
        error names the entry: a corrupted state never yields an estimate that fails, or silently
        differs, later.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict (from SeedGradient.state_dict()), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state is missing {missing} (it must come from SeedGradient.state_dict())")
        seed = _state_int(state["seed"], "state['seed']", 0, 2**64)
        ids = [
            _state_int(i, "state['sample_ids'] entries", 0, 2**32)
            for i in _state_list(state["sample_ids"], "state['sample_ids']")
        ]
        weights_t = _state_weights(state["weights"], len(ids))
        try:
            sigma = check_sigma(state["sigma"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"state['sigma']: {exc}") from None
        stream = state["stream"]
        if not isinstance(stream, str) or stream not in STREAMS:
            raise ValueError(f"state['stream'] must be one of {STREAMS}, got {stream!r}")
        shapes, dtypes = _state_layout(state["shapes"], state["dtypes"])
        loss = state.get("loss")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, numbers.Real)):
            raise TypeError(f"state['loss'] must be a real number or None, got {type(loss).__name__} {loss!r}")
        rank = state.get("rank")
        if rank is not None:
            rank = _state_int(rank, "state['rank']", 1, 2**31)
        return cls(
            seed=seed,
            sample_ids=torch.tensor(ids, dtype=torch.int64),
            weights=weights_t,
            sigma=sigma,
            stream=stream,
            shapes=shapes,
            dtypes=dtypes,
            loss=None if loss is None else float(loss),
            rank=rank,
        )


@torch.no_grad()
def estimate(
    fn: Any,
    params: Any,
    *args: Any,
    distribution: Optional[FusedDistribution] = None,
    method: str = "naive",
    num_samples: int = 1,
    sigma: float = 1.0,
    seed: Union[None, int, torch.Generator] = None,
    backend: Optional[str] = None,
    inplace: bool = False,
    process_group: Any = None,
    batch_size: Optional[int] = None,
    fitness_shaping: Any = None,
    **kwargs: Any,
) -> SeedGradient:
    """Estimate the gradient of ``fn(params, *args, **kwargs)`` and return it seed-compressed.

    The same estimator as :func:`zo_kernels.zero_order` (same methods, same noise for the same
    seed, so ``estimate(...).materialize()`` equals the gradient ``zero_order`` would write), but
    without autograd: the result is ``(seed, N weights)``, never an n-element tensor.

    Args:
        fn: the loss, ``fn(params, *args, **kwargs) -> scalar tensor``.
        params: a tensor or a pytree of floating-point tensors.
        *args: further positional arguments of ``fn``, passed through.
        distribution: a built-in fused distribution (default ``Normal()``); a scalar
            ``torch.distributions.Normal(0, 1)`` is accepted too.
        method: ``'naive'``, ``'forward'`` or ``'antithetic'``, as for :func:`zo_kernels.zero_order`.
        num_samples: number of noise samples N.
        sigma: smoothing scale.
        seed: ``None`` (one draw from torch's generator), an int, or a ``torch.Generator``.
        backend: force a backend by name.
        inplace: perturb the parameters' storage instead of a copy (see :func:`zo_kernels.zero_order`).
        process_group: spread the samples over a ``torch.distributed`` group (see
            :func:`zo_kernels.zero_order`); every rank returns the same SeedGradient.
        batch_size: evaluate that many perturbed parameter sets per vmapped call (see
            :func:`zo_kernels.zero_order`).
        fitness_shaping: ``None``, ``'centered_ranks'``, ``'standardize'`` or a callable, as for
            :func:`zo_kernels.zero_order`; the weights are then the shaped ones.
        **kwargs: keyword arguments of ``fn``, passed through.

    Returns:
        The :class:`SeedGradient`; its ``loss`` is the unperturbed ``fn(params, ...)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a function (the loss), got {type(fn).__name__}")
    noise = check_regenerable(distribution if distribution is not None else Normal())
    settings = make_config(
        noise, method, num_samples, sigma, seed, backend, inplace, process_group, batch_size, fitness_shaping
    )
    leaves, spec = pytree.tree_flatten(params)
    for k, leaf in enumerate(leaves):
        v.check_leaf(leaf, f"leaf {k} of params")
    if settings.inplace:
        v.check_disjoint(leaves, "inplace=True perturbs each tensor of params in its own storage")

    def evaluate(tensors: Any) -> torch.Tensor:
        return fn(pytree.tree_unflatten(list(tensors), spec), *args, **kwargs)

    f0 = v.check_output(evaluate([p.detach() for p in leaves]), "fn").detach()
    done, weights = estimate_weights(evaluate, leaves, f0, settings, EvaluatorState())
    weights = weights.cpu()
    # The weights are float64; the parameters' accumulation dtype must hold them too.
    dtypes = {accumulation_dtype(p.dtype) for p in leaves}
    raise_if_estimate_not_finite([weights.to(dtype) for dtype in dtypes], settings.sigma)
    return SeedGradient(
        seed=done.seed,
        sample_ids=done.sample_ids.cpu(),
        weights=weights,
        sigma=settings.sigma,
        stream=settings.noise.stream,
        shapes=[p.shape for p in leaves],
        dtypes=[p.dtype for p in leaves],
        loss=float(f0),
        rank=getattr(settings.noise, "rank", None),
    )
