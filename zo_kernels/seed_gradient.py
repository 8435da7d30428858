"""Seed-compressed gradients: ``estimate()`` returns (seed, weights) instead of n gradient floats.

A zero-order estimate is ``g = sum_i w_i z(seed, i)``: the N weights and the seed describe it
completely, since every backend regenerates ``z`` from the seed. A :class:`SeedGradient` keeps just
that (plus the parameter layout), so it can be applied with the fused ``step`` kernel without ever
writing ``g``, materialized when needed, stored, sent between processes, or replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Union

import torch
from torch.utils import _pytree as pytree

from . import _validate as v
from . import backends as _backends
from ._estimator import fused_pass
from .api import make_settings
from .distributions import FusedDistribution, Normal, as_fused
from .reference.noise import accumulation_dtype

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


@dataclasses.dataclass
class SeedGradient:
    """The estimate ``g = sum_i weights[i] * z(seed, sample_ids[i])`` over a parameter layout.

    Attributes:
        seed: the 64-bit seed of the noise stream.
        sample_ids: int64 tensor of the N sample ids.
        weights: float64 tensor of the N weights (sphere scales and 1/(sigma N) folded in).
        sigma: the smoothing scale the losses were evaluated with.
        stream: ``'normal'`` or ``'rademacher'``.
        shapes, dtypes: the layout of the flattened parameters.
        loss: the unperturbed loss ``f(theta)`` (a float), when it was evaluated.
    """

    seed: int
    sample_ids: torch.Tensor
    weights: torch.Tensor
    sigma: float
    stream: str
    shapes: List[torch.Size]
    dtypes: List[torch.dtype]
    loss: Optional[float] = None

    def _check_layout(self, leaves: List[torch.Tensor]) -> None:
        got = [(tuple(p.shape), p.dtype) for p in leaves]
        want = [(tuple(s), d) for s, d in zip(self.shapes, self.dtypes)]
        if got != want:
            raise ValueError(f"params must have the layout of the estimate {want}, got {got}")

    def materialize(self, device: Union[str, torch.device, None] = None) -> List[torch.Tensor]:
        """The gradient tensors, one per parameter (on ``device``, default the CPU)."""
        where = torch.device(device) if device is not None else torch.device("cpu")
        grads, offset = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            g = torch.zeros(shape, dtype=dtype, device=where)
            w = self.weights.to(device=where, dtype=accumulation_dtype(dtype))
            backend = _backends.select(where, dtype)
            backend.reduce(g.view(-1), w, self.sample_ids.to(where), self.stream, self.seed, offset)
            grads.append(g)
            offset += g.numel()
        return grads

    @torch.no_grad()
    def apply_(self, params: Any, lr: float) -> None:
        """``theta -= lr * g`` for every parameter, with the fused step kernel: ``g`` is never written.

        ``params`` is the pytree (or list) the estimate was made for; its tensors must be contiguous.
        """
        leaves = pytree.tree_leaves(params)
        self._check_layout(leaves)
        offset = 0
        for p in leaves:
            if not p.is_contiguous():
                raise ValueError("apply_ updates parameters in place: every parameter must be contiguous")
            w = self.weights.to(device=p.device, dtype=accumulation_dtype(p.dtype))
            backend = _backends.select(p.device, p.dtype)
            backend.step(p.data.view(-1), w, self.sample_ids.to(p.device), self.stream, self.seed, float(lr), offset)
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
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace this estimate by the one ``state`` describes."""
        other = SeedGradient.from_state_dict(state)
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(other, field.name))

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> SeedGradient:
        """The estimate described by ``state`` (from :meth:`state_dict`)."""
        return cls(
            seed=int(state["seed"]),
            sample_ids=torch.tensor(state["sample_ids"], dtype=torch.int64),
            weights=torch.tensor(state["weights"], dtype=torch.float64),
            sigma=float(state["sigma"]),
            stream=str(state["stream"]),
            shapes=[torch.Size(s) for s in state["shapes"]],
            dtypes=[_DTYPES[d] for d in state["dtypes"]],
            loss=state.get("loss"),
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
        **kwargs: keyword arguments of ``fn``, passed through.

    Returns:
        The :class:`SeedGradient`; its ``loss`` is the unperturbed ``fn(params, ...)``.
    """
    fused = as_fused(distribution if distribution is not None else Normal())
    if fused is None:
        raise TypeError(
            "distribution must be zo_kernels.distributions.Normal(), Rademacher() or Sphere() "
            f"(a seed-compressed gradient needs the counter-based stream), got {type(distribution).__name__}"
        )
    settings = make_settings(fused, method, num_samples, sigma, seed, backend, inplace, process_group, batch_size)
    leaves, spec = pytree.tree_flatten(params)
    for k, leaf in enumerate(leaves):
        v.check_leaf(leaf, f"leaf {k} of params")

    def evaluate(tensors: Any) -> torch.Tensor:
        return fn(pytree.tree_unflatten(list(tensors), spec), *args, **kwargs)

    f0 = v.check_output(evaluate([p.detach() for p in leaves]), "fn").detach()
    one = torch.ones((), dtype=torch.float64)
    done = fused_pass(evaluate, leaves, f0, one, settings, accumulate=False)
    weights = done.weights(f0, one, settings).cpu()
    return SeedGradient(
        seed=done.seed,
        sample_ids=done.sample_ids.cpu(),
        weights=weights,
        sigma=settings.sigma,
        stream=fused.stream,
        shapes=[p.shape for p in leaves],
        dtypes=[p.dtype for p in leaves],
        loss=float(f0),
    )
