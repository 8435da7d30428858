"""The fused operations, declared once: the stream's constants, the dtype ids, the ABI number, the checks.

Every backend runs the same operations on the stream of ``docs/noise.md``. :class:`.base.Backend`
turns each public call into one of the declarations below through its ``check`` (which names the
offending argument), then hands the validated, normalized arguments to the backend's implementation
(``Backend.run_<operation>``). So an operation's argument list, its checks and its per-dtype rules
live here and nowhere else; a backend only says where its tensors may live (:class:`Traits`) and how
it launches.

The C++ and CUDA bindings trust what they are given (addresses, counts, dtype ids), and the Triton
launchers trust their tensors, so these checks are the only guard between a Python mistake and a
wild pointer. A backend chooses a :class:`Placement` (which devices its tensors may live on, and
whether small host-side id/weight tensors are accepted and copied over); the rules are the same for all.

Changing an operation means: its declaration here, each backend's ``run_`` method (and, for the
compiled backends, the kernel and ``csrc/bindings.h``), :data:`ABI_VERSION`, and its test in
``tests/test_kernels.py``.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

#: The ABI version of the compiled modules' bindings (csrc/bindings.h), the one place it is written.
#: CMakeLists.txt reads this line with a regular expression (keep it ``ABI_VERSION = <int>``) and
#: compiles the number into zo_kernels._C and zo_kernels._C_cuda; :func:`.native.load_extension`
#: refuses a module that reports another one (a stale build). Bump it whenever an operation's
#: arguments change.
ABI_VERSION = 4

NORMAL = "normal"
RADEMACHER = "rademacher"
STREAMS = (NORMAL, RADEMACHER)

#: How many consecutive flat elements one Philox call (four uint32 words) feeds, per stream.
ELEMENTS_PER_BLOCK = {NORMAL: 4, RADEMACHER: 128}

#: 2*pi rounded to float32, the constant every backend multiplies the second uniform by.
TWO_PI_F32 = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))

#: The parameter dtypes the fused kernels take, with their ids in the bindings
#: (csrc/dtypes.h, shared by the CPU and CUDA code).
DTYPE_IDS: Dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
#: The same dtypes, in id order.
PARAMETER_DTYPES: Tuple[torch.dtype, ...] = tuple(DTYPE_IDS)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 parameters, float32 for every narrower floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: stream ids of the bindings (csrc/philox.h).
STREAM_IDS: Dict[str, int] = {name: k for k, name in enumerate(STREAMS)}
#: Flat indices are int64 inside every backend's kernels: ``offset + numel`` stays at or below this.
MAX_INDEX = 2**63 - 1
#: Sample ids are the counter's 32-bit word.
SAMPLE_ID_LIMIT = 2**32

_DTYPE_NAMES = "float32, float64, float16 or bfloat16"


@dataclass(frozen=True)
class Placement:
    """Where a backend's tensors may live: the device types and dtypes, and how an error says so.

    ``where`` completes "``<name> must be ... for the '<backend>' backend``". With ``host_ids``,
    ``sample_ids``/``weights`` may also come from the CPU (range-checked there, then copied).
    ``device_types=None``: any device; ``dtypes=None``: any floating dtype (the reference's rule).
    """

    backend: str
    device_types: Optional[Tuple[str, ...]]
    where: str
    host_ids: bool = False
    dtypes: Optional[Tuple[torch.dtype, ...]] = PARAMETER_DTYPES

    def accepts(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` are this backend's."""
        return self.device_types is None or torch.device(device).type in self.device_types

    def takes(self, dtype: torch.dtype) -> bool:
        """Whether this backend's kernels take parameters of ``dtype``."""
        return dtype.is_floating_point if self.dtypes is None else dtype in self.dtypes


def _bound(value: int) -> str:
    """``2**k`` for the powers of two the limits are, so messages read like the docs."""
    if value >= 2**16 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return str(value)


def check_int(value: object, name: str, lo: int = 0, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi)`` (``hi=None``: no upper bound); bools are not ints here."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if hi is None:
        if value < lo:
            raise ValueError(f"{name} must be >= {lo}, got {value}")
    elif not lo <= value < hi:
        raise ValueError(f"{name} must be in [{_bound(lo)}, {_bound(hi)}), got {value}")
    return value


def check_float(value: object, name: str) -> float:
    """``value`` as a Python float; any real number but a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_numel(numel: object, name: str = "numel") -> int:
    """An element count: an int >= 0 that an int64 flat index can reach."""
    value = check_int(numel, name, 0)
    if value > MAX_INDEX:
        raise ValueError(f"{name} must be < 2**63, got {value}")
    return value


def check_stream_args(stream: str, seed: int, offset: int, numel: int = 0) -> int:
    """The stream id, after checking the stream name, the 64-bit seed and the flat index range."""
    if not isinstance(stream, str) or stream not in STREAM_IDS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    check_int(seed, "seed", 0, 2**64)
    offset = check_int(offset, "offset", 0)
    numel = check_int(numel, "numel", 0)
    if offset + numel > MAX_INDEX:
        raise ValueError(f"offset + numel must be < 2**63, got {offset} + {numel}")
    return STREAM_IDS[stream]


def check_sample_id(sample_id: object) -> int:
    """A sample id fits the counter's 32-bit word."""
    return check_int(sample_id, "sample_id", 0, SAMPLE_ID_LIMIT)


def check_philox_blocks(seed: int, sample_id: int, block0: int, blocks: int) -> None:
    """The arguments of ``philox_words``: a seed, a sample id and a run of int64 block counters."""
    check_int(seed, "seed", 0, 2**64)
    check_sample_id(sample_id)
    blocks = check_numel(blocks, "blocks")
    check_int(block0, "block0", 0, MAX_INDEX - blocks + 1)


def check_tensor(
    t: torch.Tensor,
    name: str,
    placement: Placement,
    dtype: Optional[torch.dtype] = None,
    numel: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> None:
    """``t`` is a contiguous tensor of ``placement`` (and of ``dtype``/``numel``/``device`` when given).

    Without ``dtype``, it must be one the placement takes (:meth:`Placement.takes`).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not placement.accepts(t.device):
        raise ValueError(f"{name} must be {placement.where} for the '{placement.backend}' backend, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other arguments, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if dtype is None and not placement.takes(t.dtype):
        names = "a floating dtype" if placement.dtypes is None else _DTYPE_NAMES
        raise TypeError(f"{name} must be {names}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")


def _check_where(t: torch.Tensor, name: str, device: torch.device, host_ok: bool) -> None:
    if t.device != device and not (host_ok and t.device.type == "cpu"):
        also = " (or the CPU)" if host_ok else ""
        raise ValueError(f"{name} must be on {device}{also} like the data, got {t.device}")


def check_ids(sample_ids: torch.Tensor, device: torch.device, host_ok: bool) -> torch.Tensor:
    """``sample_ids`` as a flat contiguous int64 tensor on ``device``, without a device sync.

    Ids on the CPU are range-checked (and copied over when ``device`` is a GPU); ids already on the
    device are not, as that would synchronize: the kernels poison what an out-of-range id touches.
    ``host_ok=False`` refuses ids that are not on ``device`` already.
    """
    if not isinstance(sample_ids, torch.Tensor):
        raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
    _check_where(sample_ids, "sample_ids", device, host_ok)
    if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
        raise TypeError(f"sample_ids must have an integer dtype, got {sample_ids.dtype}")
    ids = sample_ids.reshape(-1).to(torch.int64)
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= SAMPLE_ID_LIMIT):
        raise ValueError("sample_ids must be in [0, 2**32)")
    return ids.to(device, non_blocking=True).contiguous()


def check_weights(
    weights: torch.Tensor, num: int, device: torch.device, dtype: torch.dtype, host_ok: bool
) -> torch.Tensor:
    """``weights`` as a flat contiguous tensor of ``num`` elements of ``dtype`` on ``device``.

    The conversion runs where the weights are (on the current stream for GPU tensors): no sync.
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor, got {type(weights).__name__}")
    _check_where(weights, "weights", device, host_ok)
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if weights.numel() != num:
        raise ValueError(f"weights must have {num} elements (one per sample id), got {weights.numel()}")
    return weights.reshape(-1).to(dtype).to(device, non_blocking=True).contiguous()


def check_scales(scales: torch.Tensor, num: int, max_signs: Optional[int] = None) -> Tuple[int, int]:
    """``(num, signs)`` of perturb_rows' ``(num_samples, signs)`` float64 ``scales``."""
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a tensor, got {type(scales).__name__}")
    if scales.dtype != torch.float64:
        raise TypeError(f"scales must have dtype {torch.float64}, got {scales.dtype}")
    most = "" if max_signs is None else f" = 1..{max_signs}"
    if scales.dim() != 2 or scales.shape[1] < 1 or (max_signs is not None and scales.shape[1] > max_signs):
        raise ValueError(f"scales must be (num_samples, signs{most}), got {tuple(scales.shape)}")
    if scales.shape[0] != num:
        raise ValueError(f"scales must have one row per sample id ({num}), got {scales.shape[0]}")
    return num, scales.shape[1]


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
        if type(sample_id) is int and 0 <= sample_id < SAMPLE_ID_LIMIT and type(scale) is float:
            return sample_id, scale  # the estimator's own calls: checked in a few ns, once per evaluation
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
