"""The compiled CUDA backend (``zo_kernels._C_cuda``): :class:`.native.NativeBackend` on CUDA devices.

One adapter serves both compiled modules (see :mod:`.native`); this module keeps the CUDA entry
points under their old names.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

from .native import EXTENSIONS, NativeBackend, NativeCudaBackend
from .native import load_backend as _load_backend
from .native import load_extension as _load_extension

__all__ = ["ABI_VERSION", "NativeCudaBackend", "load_backend", "load_extension"]

#: The ABI version ``zo_kernels._C_cuda`` must report (the one of :mod:`.abi`, shared with ``_C``).
ABI_VERSION = EXTENSIONS["cuda"].abi


def load_extension() -> Tuple[Optional[ModuleType], str]:
    """Import ``zo_kernels._C_cuda``; return ``(module, 'available')`` or ``(None, reason)``."""
    return _load_extension("cuda")


def load_backend() -> Tuple[Optional[NativeBackend], str]:
    """``(backend, 'available')`` if ``_C_cuda`` imports and a capable CUDA device is visible, else ``(None, why)``."""
    return _load_backend("cuda")
