"""Seed-compressed gradients: ``estimate()`` returns (seed, weights) instead of n gradient floats.

A zero-order estimate is ``g = sum_i w_i z(seed, i)``: the N weights and the seed describe it
completely, since every backend regenerates ``z`` from the seed. A :class:`SeedGradient` keeps just
that (plus the parameter layout), so it can be applied with the fused ``step`` kernel without ever
writing ``g``, materialized when needed, stored, sent between processes, or replayed.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree

from . import backends as _backends
from .config import as_params, check_real, check_sigma
from .distributions import FusedDistribution
from .noise import from_stream
from .ops.spec import STREAMS, accumulation_dtype

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_STATE_KEYS = ("seed", "sample_ids", "weights", "sigma", "stream", "shapes", "dtypes")
_IDS = "state['sample_ids']"
_SHORT_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (a view made by ``expand()`` or ``as_strided()``).

    The test is sufficient for no overlap (with its dimensions sorted by stride, each stride exceeds
    the span of the smaller ones); layouts that interleave without overlapping fail it too, but no
    view operation makes those.
    """
    span = 0
    for stride, size in sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


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


def _state_ids(value: Any) -> Union[range, torch.Tensor]:
    """``state['sample_ids']``: a range ``{'start': a, 'stop': b}``, a list of ints or an integer tensor.

    Every id must be in ``[0, 2**32)``. A range comes back as a ``range``, built into a tensor only
    once the rest of the state has been checked.
    """
    if isinstance(value, Mapping):
        if set(value) != {"start", "stop"}:
            raise ValueError(f"{_IDS} as a range must be {{'start': a, 'stop': b}}, got keys {sorted(map(str, value))}")
        start = _state_int(value["start"], f"{_IDS}['start']", 0, 2**32)
        stop = _state_int(value["stop"], f"{_IDS}['stop']", start, 2**64)
        if stop > 2**32:
            raise ValueError(f"{_IDS}['stop'] must be at most 2**32 (sample ids are < 2**32), got {stop}")
        return range(start, stop)
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{_IDS} entries must be an int in [0, 2**32), got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{_IDS} must be one-dimensional, got shape {tuple(value.shape)}")
        ids = value.detach().to(device="cpu", dtype=torch.int64, copy=True)
        bad = ids[(ids < 0) | (ids >= 2**32)]
        if bad.numel():
            raise ValueError(f"{_IDS} entries must be an int in [0, 2**32), got {bad[0].item()}")
        return ids
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{_IDS} must be a list, a range {{'start': a, 'stop': b}} or an integer tensor, got {type(value).__name__}"
        )
    return torch.tensor([_state_int(i, f"{_IDS} entries", 0, 2**32) for i in value], dtype=torch.int64)


def _state_weights(value: Any, count: int) -> torch.Tensor:
    """``state['weights']`` as float64: ``count`` finite real numbers (a list, or a real tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"state['weights'] must hold real numbers, got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"state['weights'] must be one-dimensional, got shape {tuple(value.shape)}")
        weights_t = value.detach().to(device="cpu", dtype=torch.float64, copy=True)
    else:
        weights = _state_list(value, "state['weights']")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise TypeError(f"state['weights'] must hold real numbers, got {type(w).__name__} {w!r}")
        weights_t = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if len(weights_t) != count:
        raise ValueError(f"state['weights'] must have one weight per sample id ({count}), got {len(weights_t)}")
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


def _id_range(ids: torch.Tensor) -> Optional[Dict[str, int]]:
    """``{'start': a, 'stop': b}`` if ``ids`` are ``a, a + 1, ..., b - 1`` (as estimate() draws them), else None."""
    if ids.dim() != 1 or ids.numel() == 0:
        return None
    ids = ids.detach().cpu()
    start = int(ids[0])
    if not torch.equal(ids, torch.arange(start, start + ids.numel(), dtype=ids.dtype)):
        return None
    return {"start": start, "stop": start + ids.numel()}


@dataclasses.dataclass
class SeedGradient:
    """The estimate ``g = sum_i weights[i] * z(seed, sample_ids[i])`` over a parameter layout.

    ``torch.save(sg, f)`` and ``torch.load(f, weights_only=True)`` round-trip it (the load checks it as
    :meth:`from_state_dict` does); ``==`` compares every field exactly.

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

    def __repr__(self) -> str:
        # Short whatever N and the number of tensors: the ids and weights themselves are in state_dict().
        noise = self.stream if self.rank is None else f"LowRank({self.rank})"
        numel = sum(torch.Size(s).numel() for s in self.shapes)
        kinds = ",".join(sorted({_SHORT_DTYPES.get(d, str(d)) for d in self.dtypes}))
        w = self.weights.detach().double()
        weights = f"w in [{w.min().item():.3g}, {w.max().item():.3g}]" if w.numel() else "no weights"
        loss = "" if self.loss is None else f", loss={self.loss:.4g}"
        tensors = f"{len(self.shapes)} tensor{'' if len(self.shapes) == 1 else 's'}"
        return (
            f"SeedGradient(seed={self.seed}, N={self.sample_ids.numel()}, {noise}, sigma={self.sigma:.3g}, "
            f"{tensors}/{numel} values ({kinds}), {weights}{loss})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeedGradient):
            return NotImplemented

        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

        return (
            (self.seed, self.sigma, self.stream, self.loss, self.rank)
            == (other.seed, other.sigma, other.stream, other.loss, other.rank)
            and [tuple(s) for s in self.shapes] == [tuple(s) for s in other.shapes]
            and list(self.dtypes) == list(other.dtypes)
            and same(self.sample_ids, other.sample_ids)
            and same(self.weights, other.weights)
        )

    def __reduce__(self) -> Tuple[Any, Tuple[Dict[str, Any]]]:
        # Pickled as its state and rebuilt through from_state_dict's checks: the one function pickle then calls
        # is registered below for torch.load(weights_only=True).
        return (_seed_gradient_from_state, (self._state(tensors=True),))

    def _check_params(self, leaves: Sequence[Any], caller: str) -> None:
        """Raise, naming ``caller``, unless ``leaves`` have this estimate's layout and can be updated in place."""
        for k, p in enumerate(leaves):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{caller}: params leaf {k} must be a tensor, got {type(p).__name__}")
        got = [(tuple(p.shape), p.dtype) for p in leaves]
        want = [(tuple(s), d) for s, d in zip(self.shapes, self.dtypes)]
        if got != want:
            raise ValueError(f"{caller}: params must have the layout of the estimate {want}, got {got}")
        for k, p in enumerate(leaves):
            if _overlapping(p):
                raise ValueError(
                    f"{caller} updates parameters in place: every parameter must be writable element by element, "
                    f"but leaf {k} is not: some of its elements share memory (a view from expand() or as_strided()); "
                    "pass a tensor with memory of its own (e.g. a clone())"
                )

    def _family(self) -> FusedDistribution:
        return from_stream(self.stream, self.rank)

    def _offsets(self) -> List[int]:
        """Where each parameter starts in the flat noise index (the parameters are concatenated in order)."""
        offsets, total = [], 0
        for shape in self.shapes:
            offsets.append(total)
            total += torch.Size(shape).numel()
        return offsets

    def _gradient(self, family: Any, k: int, offset: int, device: torch.device) -> torch.Tensor:
        """Parameter ``k``'s gradient, on ``device`` (its elements start at flat index ``offset``)."""
        g = torch.zeros(self.shapes[k], dtype=self.dtypes[k], device=device)
        w = self.weights.to(device=device, dtype=accumulation_dtype(g.dtype))
        backend = _backends.select(device, g.dtype)
        family.reduce(backend, g.view(-1), w, self.sample_ids.to(device), self.seed, offset, [(0, g.numel(), g.shape)])
        return g

    def _step_leaf(self, family: Any, p: torch.Tensor, offset: int, lr: float) -> None:
        """``p -= lr * g`` with the fused step kernel, for the parameter whose elements start at ``offset``."""
        w = self.weights.to(device=p.device, dtype=accumulation_dtype(p.dtype))
        backend = _backends.select(p.device, p.dtype)
        ids, parts = self.sample_ids.to(p.device), [(0, p.numel(), p.shape)]
        # The kernel walks flat memory: a strided parameter is stepped as a contiguous copy (the noise is indexed by
        # the logical, row-major position, so the values are those of a contiguous parameter) and copied back.
        strided = not p.is_contiguous()
        theta = p.data.contiguous() if strided else p.data
        family.step(backend, theta.view(-1), w, ids, self.seed, lr, offset, parts)
        if strided:
            p.data.copy_(theta)

    def materialize(self, device: Union[str, torch.device, None] = None) -> List[torch.Tensor]:
        """The gradient tensors, one per parameter (on ``device``, default the CPU)."""
        try:
            where = torch.device(device) if device is not None else torch.device("cpu")
        except (RuntimeError, TypeError, ValueError) as exc:
            raise TypeError(f"device must be a torch.device, a device string or None, got {device!r}") from exc
        family = self._family()
        return [self._gradient(family, k, offset, where) for k, offset in enumerate(self._offsets())]

    @torch.no_grad()
    def apply_(self, params: Any, lr: float) -> None:
        """``theta -= lr * g`` for every parameter, with the fused step kernel: ``g`` is never written.

        ``params`` holds the tensors the estimate was made for, in the same order: the same pytree (or
        list), or any iterable of them such as ``model.parameters()``. A non-contiguous tensor is
        stepped as a contiguous copy that is copied back (the same values as for a contiguous one, for
        one temporary copy of that tensor); a tensor whose elements share memory (``expand()``) is
        refused. ``lr`` is a finite real number. Every check runs before the first parameter is updated.
        """
        lr = check_real(lr, "lr")
        leaves = pytree.tree_leaves(as_params(params))
        self._check_params(leaves, "apply_")
        family = self._family()
        for p, offset in zip(leaves, self._offsets()):
            self._step_leaf(family, p, offset, lr)

    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values (JSON-serializable) from which :meth:`from_state_dict` rebuilds this.

        Consecutive sample ids (as :func:`estimate` draws them) are stored as a range
        ``{'start': a, 'stop': b}`` (ids ``a .. b-1``), other ids as a list; the weights as a list of
        floats (float64, exact through JSON).
        """
        return self._state(tensors=False)

    def _state(self, tensors: bool) -> Dict[str, Any]:
        """The state, with the ids (unless a range) and weights as CPU tensors if ``tensors``, else as lists."""
        ids = _id_range(self.sample_ids)
        if ids is None:
            ids = self.sample_ids.detach().to("cpu", copy=True) if tensors else self.sample_ids.tolist()
        weights = self.weights.detach().to("cpu", torch.float64, copy=True)
        return {
            "seed": self.seed,
            "sample_ids": ids,
            "weights": weights if tensors else weights.tolist(),
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
        differs, later. ``sample_ids`` may be a range ``{'start': a, 'stop': b}``, a list (what
        older versions stored) or an integer tensor; ``weights`` a list or a real tensor.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict (from SeedGradient.state_dict()), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state is missing {missing} (it must come from SeedGradient.state_dict())")
        seed = _state_int(state["seed"], "state['seed']", 0, 2**64)
        ids = _state_ids(state["sample_ids"])
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
            sample_ids=torch.arange(ids.start, ids.stop, dtype=torch.int64) if isinstance(ids, range) else ids,
            weights=weights_t,
            sigma=sigma,
            stream=stream,
            shapes=shapes,
            dtypes=dtypes,
            loss=None if loss is None else float(loss),
            rank=rank,
        )


def _seed_gradient_from_state(state: Dict[str, Any]) -> SeedGradient:
    """Unpickle a :class:`SeedGradient` (see its ``__reduce__``), checking ``state`` as from_state_dict does."""
    return SeedGradient.from_state_dict(state)


# torch.load(weights_only=True) calls only the functions it was told of; this one builds checked SeedGradients only.
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([_seed_gradient_from_state])
