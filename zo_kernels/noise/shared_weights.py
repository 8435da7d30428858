"""Perturbed parameters served where they are used: the one mechanism behind ``perturb='on_use'`` and LowRank batches.

:class:`SharedWeights` is a ``TorchFunctionMode``: while it is active, every torch operation that
reads one of its tracked tensors is given that tensor's perturbed values instead, and the tracked
tensor itself is never written. How a use is served is the noise family's decision:

- a full-rank family (:meth:`SharedWeights.track_values`) materializes the tensor's perturbed
  values (its backend's perturb kernel) into a transient for that one operation, released when
  the operation returns (``perturb='on_use'``: exact, at inference memory, for every dtype);
- ``LowRank`` (:meth:`SharedWeights.track`) serves the matrix uses listed below as the shared
  product plus the low-rank term, with no perturbed matrix at all (inside a ``batch_size`` vmap
  for a population of members, or for one sample under ``perturb='on_use'``).

Which tracked tensors an evaluation read is recorded (:attr:`SharedWeights.served`), so that a
tensor read behind the mode's back (a C++ extension given its data pointer, a compiled region
that captured it) or not at all can be named instead of silently evaluated unperturbed.

The low-rank rewriting:

``LowRank`` perturbs a matrix ``W`` (``m x n``; a tensor with ``ndim >= 3`` is viewed as
``(shape[0], numel // shape[0])``) per member ``i`` as ``W + A_i @ B_i.T``. A batch of members runs as
one ``torch.func.vmap`` over the members' factors, and inside the vmapped function the user's code
receives the *shared* ``W`` object. :class:`SharedWeights` is a ``TorchFunctionMode`` that rewrites
each use of ``W`` so that no member's weights exist:

- ``F.linear(x, W, b)`` -> ``F.linear(x, W, b) + (x @ B) @ A.T``;
- ``x @ W`` (``torch.matmul``, ``Tensor.matmul``, ``torch.mm``, either operand) -> ``x @ W + (x @ A) @ B.T``;
- ``torch.addmm(c, x, W, beta=, alpha=)`` (HF's GPT-2 ``Conv1D``) -> ``... + alpha * (x @ A) @ B.T``;
- ``F.embedding(ids, W, ...)`` -> ``F.embedding(ids, W, ...) + F.embedding(ids, A) @ B.T``;
- ``W.T``, ``W.t()``, ``W.mT``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``, ``W.swapaxes``, ``W.detach()``
  return real views of ``W`` that stay tracked (a transpose swaps the roles of ``A`` and ``B``);
- metadata queries (``shape``, ``dtype``, ``size()``, ``stride()``, ``len``, ...) pass through.

Any other use (``W.pow(2)``, ``W[0]``, ``W.reshape``, ``F.conv2d`` with a 4-D weight, ...) gets the
member's :func:`materialized` matrix for that one op, so results always equal a loop over
materialized members; such an op warns once per process, by name. Tensors with ``ndim != 2`` are
never rewritten.

Rounding: for float32/float64 ``W`` the low-rank term is computed in ``W``'s dtype and added to the
unperturbed product, so a rewritten op differs from the materialized one only by the order of
float32/float64 roundings. For float16/bfloat16 ``W`` the term ``(x @ B) @ A.T`` is computed in
``x``'s dtype (``A`` and ``B`` cast to it) and added to the half-precision product: this rounds the
unperturbed product and the term separately, where :func:`materialized` rounds ``W + A @ B.T`` once
before the product, so the two agree only to half-precision accuracy.

In-place ops on a tracked tensor act on the op's materialized copy, never on the tensor.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["FAST_OPS", "SharedWeights", "materialized", "reset_warnings"]

FAST_OPS: Tuple[str, ...] = (
    "torch.nn.functional.linear (nn.Linear)",
    "torch.matmul / Tensor.matmul / @ (the matrix on either side)",
    "torch.mm / Tensor.mm (the matrix on either side)",
    "torch.addmm / Tensor.addmm (the matrix as mat1 or mat2; HF transformers' Conv1D)",
    "torch.nn.functional.embedding without max_norm (nn.Embedding)",
    "transposed views: W.T, W.mT, W.t(), torch.t, W.transpose(0, 1), W.swapaxes/swapdims(0, 1), W.permute(1, 0)",
    "W.detach(), and W.contiguous() / W.to(...) where they return W itself",
    "metadata: shape, size(), dim(), ndim, dtype, device, numel(), stride(), is_contiguous(), len(), ...",
)

_WARNED: Set[str] = set()
#: What serving one row costs beyond its own elements, in elements of generation: a kernel call from Python
#: (~8 us) against the CPU backend's ~0.85 ns per normal element with 2 threads (docs/memory.md).
ROW_CALL_ELEMENTS = 16384


def reset_warnings() -> None:
    """Forget which ops have warned, so that each warns again once (for tests)."""
    _WARNED.clear()


def _warn_once(name: str) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(
        f"zo_kernels: LowRank: `{name}` uses a perturbed matrix in a way that is not rewritten; the member's "
        "weights are materialized for it (correct, but not at inference cost)",
        UserWarning,
        stacklevel=3,
    )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def materialized(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """One member's perturbed weights ``W + (A @ B.T).view(W.shape)``.

    Args:
        W: the unperturbed weights, any shape with ``W.numel() == A.shape[0] * B.shape[0]``.
        A: ``(m, r)``, the member's scale and sign already folded in.
        B: ``(n, r)``.

    Returns:
        A new tensor of ``W``'s shape and dtype. The sum is formed in float64 for float64 ``W`` and
        in float32 otherwise, and rounded once to ``W.dtype``.

    Raises:
        TypeError: ``W`` is not a real floating-point tensor.
    """
    if not W.is_floating_point():
        raise TypeError(f"LowRank perturbs floating-point tensors only, got {W.dtype}")
    acc = _accumulation_dtype(W.dtype)
    z = A.to(acc) @ B.to(acc).T
    return (W.to(acc) + z.view(W.shape)).to(W.dtype)


#: ``fill(out)``: writes a tracked tensor's perturbed values into ``out`` (a tensor of its shape and dtype).
Fill = Callable[[torch.Tensor], None]
#: ``rows(ids)``: the perturbed values of rows ``ids`` (distinct, 1-D int64) of a tracked matrix, ``(len(ids), n)``.
Rows = Callable[[torch.Tensor], torch.Tensor]

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


class Transients:
    """The buffers that served values are written into, reused from one operation to the next.

    A use gets a view of a flat buffer (the smallest free one that is large enough, else a new one)
    and gives it back when the operation has returned, if nothing else holds it (no view of it, no
    autograd node saved it, no Python reference left); else the buffer is dropped and lives as long
    as its holders. Free buffers and the buffers in use total at most ``max_bytes`` where the uses
    allow it (free ones are released first), so a function that reads one parameter at a time holds
    about one largest parameter beside inference, and one buffer of that size serves every smaller
    use. Reusing the memory saves the page faults of a fresh allocation per use, which cost about a
    third of the perturbation's own time on the CPU.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        self.in_use: Dict[int, torch.Tensor] = {}  # id(view) -> its buffer
        self.free_bytes = 0
        self.used_bytes = 0

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape``: a view of a free buffer, or of a new one (free ones released first to fit)."""
        numel, stack = shape.numel(), self.free.setdefault((dtype, device), [])
        fits = [k for k, buf in enumerate(stack) if buf.numel() >= numel]
        if fits:
            buf = stack.pop(min(fits, key=lambda k: stack[k].numel()))
            self.free_bytes -= _nbytes(buf)
        else:  # every free buffer is too small: the smallest go first
            self._shrink(numel * dtype.itemsize)
            buf = torch.empty(numel, dtype=dtype, device=device)
        view = buf[:numel].view(shape)
        self.in_use[id(view)] = buf
        self.used_bytes += _nbytes(buf)
        return view

    def give(self, view: torch.Tensor, holders: int) -> None:
        """Take ``view``'s buffer back where ``view`` is held only by the caller's ``holders`` references."""
        buf = self.in_use.pop(id(view))
        self.used_bytes -= _nbytes(buf)
        # torch.compile traces through the mode (a compiled region is served too) but not reference counts:
        # there a buffer is never taken back, where tracing would break the graph at every operation
        if _compiling():
            return
        # sys.getrefcount counts its argument and this frame's; the storage is held by ``buf``, ``view`` and the query
        if _storage_use_count is None or sys.getrefcount(view) > holders + 2:
            return
        if _storage_use_count(view.untyped_storage()._cdata) > 3:
            return
        self.free[(buf.dtype, buf.device)].append(buf)
        self.free_bytes += _nbytes(buf)
        self._shrink(0)

    def _shrink(self, more: int) -> None:
        """Release free buffers, the smallest first, until ``more`` bytes fit within the bound (or none is left).

        The smallest first: a large buffer serves every smaller use, and a small one is cheap to allocate again.
        """
        while self.free_bytes and self.free_bytes + self.used_bytes + more > self.max_bytes:
            stacks = [v for v in self.free.values() if v]
            stack = min(stacks, key=lambda v: min(_nbytes(b) for b in v))
            self.free_bytes -= _nbytes(stack.pop(min(range(len(stack)), key=lambda k: _nbytes(stack[k]))))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Tracked:
    """A tensor object the mode serves: ``W0 + A @ B.T`` (low rank; ``fast``: 2-D, rewritten) or ``fill``'s values."""

    __slots__ = ("tensor", "A", "B", "fast", "fill", "rows", "uses", "kept")

    def __init__(
        self,
        tensor: torch.Tensor,
        A: Optional[torch.Tensor] = None,
        B: Optional[torch.Tensor] = None,
        fill: Optional[Fill] = None,
        rows: Optional[Rows] = None,
    ) -> None:
        self.tensor = tensor
        self.A = A
        self.B = B
        self.fill = fill
        self.rows = rows
        self.fast = fill is None and tensor.ndim == 2
        self.uses = 0  # operations served by ``fill`` so far
        self.kept: Optional[torch.Tensor] = None  # the values, kept for the next uses (see SharedWeights)

    def factors(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.A.to(dtype), self.B.to(dtype)

    def term_dtype(self, x: torch.Tensor) -> torch.dtype:
        # float16/bfloat16 weights: the term follows the activations (see the module's rounding note).
        if self.tensor.dtype in (torch.float32, torch.float64) or not x.is_floating_point():
            return self.tensor.dtype
        return x.dtype


def _bind(
    args: Sequence[Any], kwargs: Mapping[str, Any], names: Sequence[str], defaults: Mapping[str, Any]
) -> Optional[Dict[str, Any]]:
    """``args``/``kwargs`` by parameter name, or None for anything unexpected (which then falls back).

    The op itself still runs with the caller's own arguments, so it reports genuine misuse.
    """
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names or key in bound:
            return None
        bound[key] = value
    for name in names:
        if name not in bound:
            if name not in defaults:
                return None
            bound[name] = defaults[name]
    return bound


Rule = Callable[["SharedWeights", Callable[..., Any], Tuple[Any, ...], Dict[str, Any]], Any]
_RULES: Dict[Any, Rule] = {}


def _rule(funcs: Sequence[Any], names: Sequence[str], defaults: Optional[Mapping[str, Any]] = None):
    """Register ``rule(mode, func, bound, args, kwargs)`` for ``funcs`` (``bound``: the arguments by name).

    A rule returns the rewritten result, or None to fall back to the materialized member.
    """
    defaults = defaults or {}

    def register(rule):
        def apply(mode: SharedWeights, func, args, kwargs):
            bound = _bind(args, kwargs, names, defaults)
            return None if bound is None else rule(mode, func, bound, args, kwargs)

        for func in funcs:
            _RULES[func] = apply
        return rule

    return register


def _plain(mode: SharedWeights, *values: Any) -> bool:
    """None of ``values`` is (or contains) a tracked tensor: the rewrite may use them as they are."""
    return not any(mode.lookup(v) is not None for v in tree_flatten(list(values))[0])


@_rule([F.linear], ("input", "weight", "bias"), {"bias": None})
def _linear(mode, func, p, args, kwargs):
    x, w = p["input"], p["weight"]
    t = mode.lookup(w)
    if t is None or not t.fast or not _plain(mode, x, p["bias"]):
        return None
    out = func(*args, **kwargs)
    A, B = t.factors(t.term_dtype(x))
    return _plus(out, _times(x.to(A.dtype), B), A.T)


def _times(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x @ factor`` for activations ``x`` ``(..., n)`` and a member's ``factor`` ``(n, r)``.

    Formed as ``(factor.T @ x.T).T``: when ``x`` is shared by the members (the first layer's
    input), vmap then folds the members into the rows of one matrix product, where ``x @ factor``
    would expand ``x`` once per member into a batched product with ``r`` output columns.
    """
    if x.ndim < 2:
        return x @ factor
    flat = x.reshape(-1, x.shape[-1])
    return (factor.mT @ flat.mT).mT.reshape(*x.shape[:-1], factor.shape[-1])


def _plus(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``out + left @ right`` for ``left`` ``(..., r)``, ``right`` ``(r, k)``.

    At rank 1 the term is an outer product: one broadcast multiply-add (``addcmul``) writes the
    result in a single pass, where a ``K = 1`` matmul and an add would pass over it twice (the
    members' activations are the largest tensors of the batch).
    """
    if left.shape[-1] == 1 and right.ndim == 2 and left.dtype == right.dtype == out.dtype:
        return torch.addcmul(out, left, right)
    return out + (left @ right).to(out.dtype)


def _product_term(
    mode: SharedWeights, left: Any, right: Any
) -> Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]]:
    """For ``left @ right`` with exactly one of them a fast tracked matrix: a thunk for the low-rank term's factors.

    A thunk, so that the op itself runs first and reports mismatched shapes in its own words.
    """
    tl, tr = mode.lookup(left), mode.lookup(right)
    if (tl is None) == (tr is None):
        return None
    t, x = (tr, left) if tr is not None else (tl, right)
    if not t.fast or not isinstance(x, torch.Tensor) or x.ndim == 0 or mode.lookup(x) is not None:
        return None

    def term() -> Tuple[torch.Tensor, torch.Tensor]:
        A, B = t.factors(t.term_dtype(x))
        xc = x.to(A.dtype)
        return (_times(xc, A), B.T) if t is tr else (A, B.T @ xc)

    return term


@_rule([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__], ("input", "other"))
@_rule([torch.mm, torch.Tensor.mm], ("input", "mat2"))
def _matmul(mode, func, p, args, kwargs):
    names = list(p)
    term = _product_term(mode, p[names[0]], p[names[1]])
    if term is None:
        return None
    out = func(*args, **kwargs)
    return _plus(out, *term())


@_rule([torch.Tensor.__rmatmul__], ("input", "other"))
def _rmatmul(mode, func, p, args, kwargs):
    term = _product_term(mode, p["other"], p["input"])
    if term is None:
        return None
    out = func(*args, **kwargs)
    return _plus(out, *term())


@_rule([torch.addmm, torch.Tensor.addmm], ("input", "mat1", "mat2", "beta", "alpha"), {"beta": 1, "alpha": 1})
def _addmm(mode, func, p, args, kwargs):
    term = _product_term(mode, p["mat1"], p["mat2"])
    if term is None or not _plain(mode, p["input"], p["beta"], p["alpha"]):
        return None
    out = func(*args, **kwargs)
    left, right = term()
    if not (isinstance(p["alpha"], (int, float)) and p["alpha"] == 1):
        left = left * p["alpha"]
    return _plus(out, left, right)


#: ``F.embedding``'s parameters and defaults (its rule below and the lookup of served rows bind them).
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_EMBEDDING_DEFAULTS = {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
                       "sparse": False}  # fmt: skip


@_rule([F.embedding], _EMBEDDING_ARGS, _EMBEDDING_DEFAULTS)
def _embedding(mode, func, p, args, kwargs):
    ids, w = p["input"], p["weight"]
    t = mode.lookup(w)
    # max_norm renormalizes the looked-up rows of the weight in place: only a materialized copy may see that.
    if t is None or not t.fast or p["max_norm"] is not None or not _plain(mode, ids):
        return None
    out = func(*args, **kwargs)
    A, B = t.factors(t.tensor.dtype)
    # padding_idx only shapes the gradient; the forward rows of A are looked up like any other.
    return _plus(out, F.embedding(ids, A), B.T)


def _view_rule(mode: SharedWeights, func, self_arg: Any, swap: Optional[bool], args, kwargs):
    """A 2-D view of a tracked matrix, tracked too: ``swap`` says it is the transpose (None: not a rewrite)."""
    t = mode.lookup(self_arg)
    if swap is None or t is None or not t.fast:
        return None
    view = func(*args, **kwargs)
    if view is t.tensor:
        return view
    return mode.track(view, t.B, t.A) if swap else mode.track(view, t.A, t.B)


def _swaps(d0: Any, d1: Any) -> Optional[bool]:
    if not (isinstance(d0, int) and isinstance(d1, int)) or not (-2 <= d0 < 2 and -2 <= d1 < 2):
        return None
    return d0 % 2 != d1 % 2


@_rule([torch.Tensor.t, torch.t], ("input",))
@_rule([torch.Tensor.T.__get__, torch.Tensor.mT.__get__], ("input",))
def _t(mode, func, p, args, kwargs):
    return _view_rule(mode, func, p["input"], True, args, kwargs)


@_rule([torch.Tensor.detach, torch.detach], ("input",))
def _detach(mode, func, p, args, kwargs):
    return _view_rule(mode, func, p["input"], False, args, kwargs)


@_rule([torch.Tensor.transpose, torch.transpose, torch.Tensor.swapdims, torch.swapdims], ("input", "dim0", "dim1"))
@_rule([torch.Tensor.swapaxes, torch.swapaxes], ("input", "axis0", "axis1"))
def _transpose(mode, func, p, args, kwargs):
    names = list(p)
    return _view_rule(mode, func, p["input"], _swaps(p[names[1]], p[names[2]]), args, kwargs)


def _permute(mode, func, args, kwargs):
    dims: Any = None
    if len(args) == 3 and not kwargs:
        dims = args[1:]
    elif len(args) == 2 and not kwargs:
        dims = args[1]
    elif len(args) == 1 and set(kwargs) == {"dims"}:
        dims = kwargs["dims"]
    if not isinstance(dims, (tuple, list, torch.Size)) or len(dims) != 2 or not args:
        return None
    return _view_rule(mode, func, args[0], _swaps(*dims), args, kwargs)


_RULES[torch.Tensor.permute] = _permute
_RULES[torch.permute] = _permute


def _identity_or_none(mode, func, args, kwargs):
    # W.contiguous() or W.to(W.dtype) is W itself, still tracked; a copy or a cast falls back.
    if not args or mode.lookup(args[0]) is None or not _plain(mode, args[1:], kwargs):
        return None
    out = func(*args, **kwargs)
    return out if out is args[0] else None


_RULES[torch.Tensor.contiguous] = _identity_or_none
_RULES[torch.Tensor.to] = _identity_or_none


def _metadata() -> frozenset:
    properties = (
        "shape dtype device ndim requires_grad is_leaf grad_fn layout names is_cuda is_cpu is_meta is_mps "
        "is_sparse is_quantized is_mkldnn is_nested itemsize nbytes _version output_nr"
    )
    methods = (
        "size dim ndimension numel nelement stride storage_offset is_contiguous __len__ is_floating_point "
        "is_complex is_signed element_size get_device data_ptr is_inference is_pinned is_shared __hash__ dim_order"
    )
    found: List[Any] = []
    for name in properties.split():
        prop = getattr(torch.Tensor, name, None)
        if prop is not None and hasattr(prop, "__get__"):
            found.append(prop.__get__)
    found += [getattr(torch.Tensor, name) for name in methods.split() if hasattr(torch.Tensor, name)]
    found += [getattr(torch, name) for name in ("numel", "is_floating_point", "is_complex") if hasattr(torch, name)]
    return frozenset(found)


_METADATA = _metadata()


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__"):  # a property: name the property, not its descriptor slot
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class SharedWeights(TorchFunctionMode):
    """Rewrites uses of perturbed matrices inside one vmapped population member.

    Enter it inside the function ``torch.func.vmap`` maps over the members' factors, then call the
    user's function with the shared ``W`` objects. Torch disables the mode while its handler runs, so
    the rewrites' own torch calls are not intercepted again.
    """

    def __init__(
        self,
        factors: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None,
        reuse_bytes: int = 0,
        transients: Optional[Transients] = None,
    ) -> None:
        """Track the shared matrices of one member (more with :meth:`track` and :meth:`track_values`).

        Args:
            factors: ``id(W) -> (W, A, B)``: ``W`` the shared matrix object the function receives,
                ``A`` ``(m, r)`` and ``B`` ``(n, r)`` this member's factors (inside vmap: per-member
                views of batched tensors), so that the member's weights are ``W + (A @ B.T).view(W.shape)``.
            reuse_bytes: a tensor served by :meth:`track_values` that an operation reads a second
                time keeps its values for the further uses (an RNN's weight at every time step),
                while the kept values total at most this many bytes; a tensor read once is never kept.
            transients: where served values are written (reused across operations, and across
                modes sharing it); by default a new tensor per use.

        Raises:
            ValueError: a key is not ``id(W)``, or the factors' shapes do not fit ``W``.
        """
        super().__init__()
        self._tracked: Dict[int, _Tracked] = {}
        #: ``id`` of every tracked tensor an operation has read (metadata queries aside).
        self.served: Set[int] = set()
        self._reuse_left = reuse_bytes
        self._transients = transients if transients is not None else Transients(0)
        for key, (W, A, B) in (factors or {}).items():
            if key != id(W):
                raise ValueError("SharedWeights: each key must be id(W) of the W it maps to")
            m = W.shape[0] if W.ndim else 0
            if (
                W.ndim < 2
                or A.ndim != 2
                or B.ndim != 2
                or A.shape[1] != B.shape[1]
                or A.shape[0] != m
                or A.shape[0] * B.shape[0] != W.numel()
            ):
                raise ValueError(
                    f"SharedWeights: factors {tuple(A.shape)} and {tuple(B.shape)} do not fit a weight of shape "
                    f"{tuple(W.shape)} (expected (shape[0], r) and (numel // shape[0], r))"
                )
            self.track(W, A, B)

    def track(self, tensor: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Rewrite ``tensor`` from now on as ``tensor + A @ B.T``; returns ``tensor``.

        The mode keeps a reference, so the ``id`` stays ``tensor``'s while the mode lives.
        """
        self._tracked[id(tensor)] = _Tracked(tensor, A, B)
        return tensor

    def track_values(self, tensor: torch.Tensor, fill: Fill, rows: Optional[Rows] = None) -> torch.Tensor:
        """Serve every use of ``tensor`` from now on with the values ``fill(out)`` writes; returns ``tensor``.

        With ``rows``, ``F.embedding`` of the matrix is served the looked-up rows only: a lookup of
        ``k`` distinct ids costs ``k`` rows, not the table (often the largest tensor of a model).
        """
        self._tracked[id(tensor)] = _Tracked(tensor, fill=fill, rows=rows)
        return tensor

    def __exit__(self, *exc: Any) -> None:
        """Leave the mode; the values kept for repeated uses go back to the transients."""
        super().__exit__(*exc)
        for t in self._tracked.values():
            if t.kept is not None:
                kept, t.kept = t.kept, None
                self._transients.give(kept, 1)

    def _values(self, t: _Tracked) -> Tuple[torch.Tensor, bool]:
        """The values of ``t`` for one operation, and whether they are a transient to give back after it.

        From ``t``'s second use in this mode on, the values are kept for the further uses, within the budget.
        """
        if t.kept is not None:
            return t.kept, False
        values = self._transients.take(t.tensor.shape, t.tensor.dtype, t.tensor.device)
        t.fill(values)
        t.uses += 1
        size = values.numel() * values.element_size()
        if t.uses >= 2 and size <= self._reuse_left:
            t.kept, self._reuse_left = values, self._reuse_left - size
            return values, False
        return values, True

    def lookup(self, value: Any) -> Optional[_Tracked]:
        """The tracking record of ``value`` if it is one of the tracked tensor objects, else None."""
        t = self._tracked.get(id(value))
        return t if t is not None and t.tensor is value else None

    def _mentions(self, values: Any) -> bool:
        """Whether a tracked tensor is among ``values`` (nested lists, tuples and dicts included)."""
        tracked = self._tracked
        for v in values:
            if isinstance(v, torch.Tensor):
                if id(v) in tracked:
                    return True
            elif isinstance(v, (list, tuple)):
                if self._mentions(v):
                    return True
            elif isinstance(v, dict) and self._mentions(v.values()):
                return True
        return False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        """Run ``func`` with tracked tensors rewritten, or substituted by their materialized members."""
        kwargs = kwargs or {}
        # Nearly every call of a forward pass touches no tracked tensor: a plain scan of the
        # arguments decides that far cheaper than flattening them into a pytree.
        if func in _METADATA or not (self._mentions(args) or self._mentions(kwargs.values())):
            return func(*args, **kwargs)
        nested = any(isinstance(v, (list, tuple, dict)) for v in (*args, *kwargs.values()))
        if nested:
            flat, spec = tree_flatten((args, kwargs))
        else:  # the common case, spared the pytree round trip: every argument is a leaf
            flat, spec = [*args, *kwargs.values()], None
        hits = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and self.lookup(v) is not None]
        if not hits:
            return func(*args, **kwargs)
        self.served.update(id(flat[i]) for i in hits)
        # Values served by materializing (full-rank noise) are substituted first, one per tensor
        # however often the op names it; the low-rank matrices left may then be rewritten.
        members: Dict[int, torch.Tensor] = {}
        transient: List[torch.Tensor] = []
        rewritable = []
        if func is F.embedding and len(hits) == 1:
            served = self._lookup_rows(args, kwargs)
            if served is not None:
                return served
        for i in hits:
            t = self._tracked[id(flat[i])]
            if t.fill is None:
                rewritable.append(i)
                continue
            if id(flat[i]) not in members:
                members[id(flat[i])], give_back = self._values(t)
                if give_back:
                    transient.append(members[id(flat[i])])
            flat[i] = members[id(flat[i])]
        if members:
            args, kwargs = self._rebuild(flat, spec, len(args), kwargs)
        out = self._run(func, args, kwargs, flat, spec, rewritable, members)
        del args, kwargs, flat, members
        while transient:
            self._transients.give(transient.pop(), 0)
        return out

    def _lookup_rows(self, args: Any, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """``F.embedding(ids, W)`` of a tracked ``W`` served from its looked-up rows (None: not such a lookup).

        The other keywords shape the gradient only, except ``max_norm``, which renormalizes rows in
        place: that falls back to the whole served table.
        """
        bound = _bind(args, kwargs, _EMBEDDING_ARGS, _EMBEDDING_DEFAULTS)
        t = None if bound is None else self.lookup(bound["weight"])
        ids = None if bound is None else bound["input"]
        if t is None or t.rows is None or t.kept is not None or bound["max_norm"] is not None:
            return None
        if not isinstance(ids, torch.Tensor) or t.tensor.ndim != 2 or self.lookup(ids) is not None:
            return None
        unique, inverse = torch.unique(ids, return_inverse=True)
        if unique.numel() * (t.tensor.shape[1] + ROW_CALL_ELEMENTS) >= t.tensor.numel():
            return None  # few rows of a small table: one call for the whole table costs less
        return F.embedding(inverse, t.rows(unique))

    def _run(self, func: Callable[..., Any], args: Any, kwargs: Dict[str, Any], flat: List[Any], spec: Any,
             rewritable: List[int], members: Dict[int, torch.Tensor]) -> Any:  # fmt: skip
        """``func`` on the served values, its low-rank matrices rewritten (or materialized where no rule applies)."""
        if not rewritable:
            return func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(self, func, args, kwargs)
            if out is not None:
                return out
        _warn_once(_op_name(func))
        for i in rewritable:
            if id(flat[i]) not in members:
                t = self._tracked[id(flat[i])]
                members[id(flat[i])] = materialized(t.tensor, t.A, t.B)
            flat[i] = members[id(flat[i])]
        args, kwargs = self._rebuild(flat, spec, len(args), kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _rebuild(flat: List[Any], spec: Any, num_args: int, kwargs: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
        """``(args, kwargs)`` from the flat list :meth:`__torch_function__` substituted into."""
        if spec is not None:
            return tree_unflatten(flat, spec)
        return tuple(flat[:num_args]), dict(zip(kwargs, flat[num_args:]))
