"""The one place kernel arguments are validated, for every backend, before every kernel call.

The C++ and CUDA bindings trust what they are given (addresses, counts, dtype ids), and the Triton
launchers trust their tensors, so these checks are the only guard between a Python mistake and a
wild pointer. Each error names the argument. A backend chooses a :class:`Placement` (which devices
its tensors may live on, and whether small host-side id/weight tensors are accepted and copied
over); the rules themselves are the same for all.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..reference.noise import STREAMS
from .dtypes import DTYPE_IDS, PARAMETER_DTYPES

__all__ = [
    "DTYPE_IDS",
    "MAX_INDEX",
    "STREAM_IDS",
    "Placement",
    "check_float",
    "check_ids",
    "check_int",
    "check_numel",
    "check_philox_blocks",
    "check_sample_id",
    "check_scales",
    "check_stream_args",
    "check_tensor",
    "check_weights",
]

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
