"""Validation shared by the compiled backends, run before every raw-pointer call.

The C++ and CUDA bindings trust what they are given (addresses, counts, dtype ids), so these checks
are the only guard between a Python mistake and a wild pointer. Each error names the argument.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional

import torch

from ..reference.noise import STREAMS

#: dtype ids of the bindings (csrc/cpu/scalar_io.h, csrc/cuda/kernels.h).
DTYPE_IDS: Dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
#: stream ids of the bindings (csrc/philox.h).
STREAM_IDS: Dict[str, int] = {name: k for k, name in enumerate(STREAMS)}
#: Flat indices are int64 inside the kernels.
MAX_INDEX = 2**63 - 1

_WHERE = {"cpu": "on the CPU", "cuda": "a CUDA tensor"}


def check_tensor(
    t: torch.Tensor,
    name: str,
    backend: str,
    device_type: str,
    dtype: Optional[torch.dtype] = None,
    numel: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> None:
    """``t`` is a contiguous tensor of ``device_type`` (and of ``dtype``/``numel``/``device`` when given).

    Without ``dtype``, it must be one of the parameter dtypes of :data:`DTYPE_IDS`.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != device_type:
        raise ValueError(f"{name} must be {_WHERE[device_type]} for the '{backend}' backend, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other arguments, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if dtype is None and t.dtype not in DTYPE_IDS:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")


def check_stream_args(stream: str, seed: int, offset: int, numel: int = 0) -> int:
    """The stream id, after checking the stream name, the 64-bit seed and the flat index range."""
    if not isinstance(stream, str) or stream not in STREAM_IDS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    for name, value in (("seed", seed), ("offset", offset), ("numel", numel)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + numel > MAX_INDEX:
        raise ValueError(f"offset + numel must be < 2**63, got {offset} + {numel}")
    return STREAM_IDS[stream]


def check_sample_id(sample_id: int) -> None:
    """A sample id fits the counter's 32-bit word."""
    if isinstance(sample_id, bool) or not isinstance(sample_id, numbers.Integral):
        raise TypeError(f"sample_id must be an int, got {type(sample_id).__name__} {sample_id!r}")
    if not 0 <= sample_id < 2**32:
        raise ValueError(f"sample_id must be in [0, 2**32), got {sample_id}")
