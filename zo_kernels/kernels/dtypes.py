"""Dtype facts every backend and the estimator share; no backend depends on another for them.

:func:`accumulation_dtype` lived in ``zo_kernels.reference.noise`` (which still re-exports it); it is
a property of the kernels' arithmetic, not of the reference implementation, so it lives here.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

#: The parameter dtypes the fused kernels take, with their ids in the bindings
#: (csrc/cpu/scalar_io.h, csrc/cuda/kernels.h).
DTYPE_IDS: Dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
#: The same dtypes, in id order.
PARAMETER_DTYPES: Tuple[torch.dtype, ...] = tuple(DTYPE_IDS)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 parameters, float32 for every narrower floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
