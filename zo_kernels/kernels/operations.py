"""The kernel operations, each declared once: its arguments by name and type, and their checks.

Every backend runs the same operations on the stream of ``docs/noise.md``. :class:`.base.Backend`
turns each public call into one of the declarations below through its ``check`` (which names the
offending argument, see :mod:`.checks`), then hands the validated, normalized arguments to the
backend's implementation (``Backend.run_<operation>``). So an operation's argument list, its
checks and its per-dtype rules live here and nowhere else; a backend only says where its tensors
may live (:class:`Traits`) and how it launches.

Changing an operation means: its declaration here, each backend's ``run_`` method (and, for the
compiled backends, the kernel and ``csrc/bindings.h``), and its test in ``tests/test_kernels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .checks import (
    Placement,
    check_float,
    check_ids,
    check_numel,
    check_philox_blocks,
    check_sample_id,
    check_scales,
    check_stream_args,
    check_tensor,
    check_weights,
)
from .dtypes import accumulation_dtype


@dataclass(frozen=True)
class Traits:
    """What the checks need to know about a backend.

    ``max_signs``: the most rows per sample ``perturb_rows`` takes (None: any). ``weights_dtype``
    maps (data dtype, given weights dtype) to the dtype the sums' weights are converted to.
    ``default_device`` is where ``sample``/``philox_words``/``squared_norms`` run without one.
    """

    placement: Placement
    default_device: Callable[[], torch.device]
    weights_dtype: Callable[[torch.dtype, torch.dtype], torch.dtype]
    max_signs: Optional[int] = 2

    def device(self, device: Optional[torch.device]) -> torch.device:
        """``device`` (None: the default) as an explicit device of this backend; ValueError otherwise."""
        device = self.default_device() if device is None else torch.device(device)
        placement = self.placement
        if not placement.accepts(device):
            kinds = " or ".join(placement.device_types or ())
            raise ValueError(f"device must be a {kinds} device for the '{placement.backend}' backend, got {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def tensor(self, t: torch.Tensor, name: str, like: Optional[torch.Tensor] = None, rows: int = 1) -> None:
        """A contiguous tensor this backend takes; with ``like``: of its dtype and device, ``rows`` x its size."""
        if like is None:
            check_tensor(t, name, self.placement)
        else:
            check_tensor(t, name, self.placement, like.dtype, rows * like.numel(), like.device)


@dataclass(frozen=True)
class Perturb:
    """``out = theta + scale * z(seed, sample_id, offset + j)`` for a fixed buffer pair, per sample.

    ``keep``: None, or a float32 buffer of ``theta``'s size that also receives the unscaled ``z``.
    The per-call arguments (``sample_id``, ``scale``) are checked by :meth:`check_sample`.
    """

    out: torch.Tensor
    theta: torch.Tensor
    stream: str
    stream_id: int
    seed: int
    offset: int
    keep: Optional[torch.Tensor]

    @classmethod
    def check(cls, traits: Traits, out, theta, stream, seed, offset, keep=None) -> Perturb:  # noqa: D102
        traits.tensor(theta, "theta")
        traits.tensor(out, "out", like=theta)
        if keep is not None:
            check_tensor(keep, "keep", traits.placement, torch.float32, theta.numel(), theta.device)
        stream_id = check_stream_args(stream, seed, offset, theta.numel())
        return cls(out, theta, stream, stream_id, int(seed), int(offset), keep)

    @staticmethod
    def check_sample(sample_id: object, scale: object) -> tuple:
        """``(sample_id, scale)`` as (int in [0, 2**32), float)."""
        return check_sample_id(sample_id), check_float(scale, "scale")


@dataclass(frozen=True)
class PerturbRows:
    """Row ``i * signs + k`` of ``out`` = ``theta + scales[i, k] * z(seed, ids[i], offset + j)``.

    ``ids``: int64 ``(num,)`` on ``theta``'s device; ``scales``: float64 ``(num, signs)`` on the
    CPU as given, ``device_scales`` the same on ``theta``'s device; ``keep`` row ``i`` gets ``z_{ids[i]}``.
    """

    out: torch.Tensor
    theta: torch.Tensor
    stream: str
    stream_id: int
    seed: int
    ids: torch.Tensor
    scales: torch.Tensor
    num: int
    signs: int
    offset: int
    keep: Optional[torch.Tensor]

    @property
    def device_scales(self) -> torch.Tensor:
        """The scales on the data's device (a few hundred bytes, copied on the current stream)."""
        return self.scales.to(device=self.theta.device, non_blocking=True).contiguous()

    @classmethod
    def check(cls, traits: Traits, out, theta, stream, seed, sample_ids, scales, offset, keep=None) -> PerturbRows:  # noqa: D102
        traits.tensor(theta, "theta")
        ids = check_ids(sample_ids, theta.device, traits.placement.host_ids)
        num, signs = check_scales(scales, ids.numel(), traits.max_signs)
        traits.tensor(out, "out", like=theta, rows=num * signs)
        if keep is not None:
            check_tensor(keep, "keep", traits.placement, torch.float32, num * theta.numel(), theta.device)
        stream_id = check_stream_args(stream, seed, offset, theta.numel())
        return cls(out, theta, stream, stream_id, int(seed), ids, scales, num, signs, int(offset), keep)


@dataclass(frozen=True)
class Accumulate:
    """``data += sum_k weights[k] * z(seed, ids[k], offset + j)`` (reduce), or ``-= lr * ...`` (step).

    ``lr`` is None for ``reduce``; ``weights`` are converted to :attr:`Traits.weights_dtype`.
    """

    data: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    stream: str
    stream_id: int
    seed: int
    offset: int
    lr: Optional[float]

    @property
    def num(self) -> int:
        """The number of samples summed."""
        return self.ids.numel()

    @classmethod
    def check(cls, traits: Traits, name, data, weights, sample_ids, stream, seed, offset, lr=None) -> Accumulate:
        """The arguments of ``reduce`` (``name='grad'``, ``lr=None``) or ``step`` (``name='theta'``, ``lr`` checked)."""
        traits.tensor(data, name)
        stream_id = check_stream_args(stream, seed, offset, data.numel())
        host_ok = traits.placement.host_ids
        ids = check_ids(sample_ids, data.device, host_ok)
        given = getattr(weights, "dtype", torch.float64)
        w = check_weights(weights, ids.numel(), data.device, traits.weights_dtype(data.dtype, given), host_ok)
        return cls(data, w, ids, stream, stream_id, int(seed), int(offset), lr)


@dataclass(frozen=True)
class SquaredNorms:
    """float64 ``sum_{j < numel} z(seed, ids[k], j)**2`` per id, computed on ``device``, returned on ``home``."""

    stream: str
    stream_id: int
    seed: int
    ids: torch.Tensor
    numel: int
    device: torch.device
    home: torch.device

    @classmethod
    def check(cls, traits: Traits, stream, seed, sample_ids, numel) -> SquaredNorms:  # noqa: D102
        numel = check_numel(numel)
        stream_id = check_stream_args(stream, seed, 0, numel)
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
        placement = traits.placement
        ours = placement.accepts(sample_ids.device)
        if not ours and sample_ids.device.type != "cpu":
            raise ValueError(
                f"sample_ids must be {placement.where} (or on the CPU) for the '{placement.backend}' backend, "
                f"got {sample_ids.device}"
            )
        device = traits.device(sample_ids.device if ours else None)
        ids = check_ids(sample_ids.to(device), device, host_ok=True)
        # This call returns a tensor the caller reads anyway, so the range check may sync.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
            raise ValueError("sample_ids must be in [0, 2**32)")
        return cls(stream, stream_id, int(seed), ids, numel, device, sample_ids.device)


@dataclass(frozen=True)
class Sample:
    """float32 ``z(seed, sample_id, offset + j)`` for ``j < numel`` on ``device`` (materialized noise)."""

    stream: str
    stream_id: int
    seed: int
    sample_id: int
    offset: int
    numel: int
    device: torch.device

    @classmethod
    def check(cls, traits: Traits, stream, seed, sample_id, offset, numel, device=None) -> Sample:  # noqa: D102
        device = traits.device(device)
        sample_id = check_sample_id(sample_id)
        numel = check_numel(numel)
        stream_id = check_stream_args(stream, seed, offset, numel)
        return cls(stream, stream_id, int(seed), sample_id, int(offset), numel, device)


@dataclass(frozen=True)
class PhiloxWords:
    """The uint32 words of Philox blocks ``block0 .. block0 + blocks - 1`` (counter ``(block, sample_id, 0)``)."""

    seed: int
    sample_id: int
    block0: int
    blocks: int
    device: torch.device

    @classmethod
    def check(cls, traits: Traits, seed, sample_id, block0, blocks, device=None) -> PhiloxWords:  # noqa: D102
        check_philox_blocks(seed, sample_id, block0, blocks)
        return cls(int(seed), int(sample_id), int(block0), int(blocks), traits.device(device))


def _check_factor(t: torch.Tensor, name: str, traits: Traits, rows: int, like: torch.Tensor) -> int:
    """A float32 ``(rows, r)`` factor matrix on ``like``'s device; returns ``r``."""
    check_tensor(t, name, traits.placement, torch.float32, device=like.device)
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] < 1:
        raise ValueError(f"{name} must be a ({rows}, r) matrix with r >= 1, got {tuple(t.shape)}")
    return t.shape[1]


def _check_matrix(t: torch.Tensor, name: str, traits: Traits) -> None:
    traits.tensor(t, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {tuple(t.shape)}")


@dataclass(frozen=True)
class LowRankPerturb:
    """``out = theta + scale * (a @ b.T)``: a matrix perturbed by low-rank noise.

    ``theta`` and ``out`` are ``(m, n)`` (``out`` may be ``theta`` itself: in place); ``a``
    ``(m, r)`` and ``b`` ``(n, r)`` are float32 factors; the product is formed in the accumulation
    dtype and rounded once into ``out``.
    """

    out: torch.Tensor
    theta: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @classmethod
    def check(cls, traits: Traits, out, theta, a, b, scale) -> LowRankPerturb:  # noqa: D102
        _check_matrix(theta, "theta", traits)
        traits.tensor(out, "out", like=theta)
        if out.shape != theta.shape:
            raise ValueError(f"out must have theta's shape {tuple(theta.shape)}, got {tuple(out.shape)}")
        m, n = theta.shape
        r = _check_factor(a, "a", traits, m, theta)
        if _check_factor(b, "b", traits, n, theta) != r:
            raise ValueError(f"a and b must have the same rank (columns), got {r} and {b.shape[1]}")
        return cls(out, theta, a, b, check_float(scale, "scale"))


@dataclass(frozen=True)
class LowRankAccumulate:
    """``data += alpha * a @ diag(weights) @ b.T``: the reduce (``alpha > 0``) and step of low-rank noise.

    ``a`` ``(m, K)`` holds the factors of all samples side by side and ``b`` ``(n, K)`` theirs
    (float32), ``weights`` ``(K,)`` the weight of each column (a sample's weight, repeated over
    its rank), converted to the accumulation dtype: the sum over samples is one matrix product.
    """

    data: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    weights: torch.Tensor
    alpha: float

    @classmethod
    def check(cls, traits: Traits, name, data, a, b, weights, alpha) -> LowRankAccumulate:  # noqa: D102
        _check_matrix(data, name, traits)
        m, n = data.shape
        k = _check_factor(a, "a", traits, m, data)
        if _check_factor(b, "b", traits, n, data) != k:
            raise ValueError(f"a and b must have the same number of columns, got {k} and {b.shape[1]}")
        w = check_weights(weights, k, data.device, accumulation_dtype(data.dtype), host_ok=traits.placement.host_ids)
        return cls(data, a, b, w, check_float(alpha, "alpha"))
