"""Backends that implement the fused noise operations, and the choice of one per call (public face).

The registry itself is :mod:`zo_kernels.ops.registry`; this module keeps the public names
(``zo_kernels.backends.available()``, ``get``, ``select``) that user code calls.
"""

from .ops.base import Backend  # noqa: F401  (the interface, for type hints; internal)
from .ops.registry import ENV_VAR, PREFERENCE, available, get, select

__all__ = ["ENV_VAR", "PREFERENCE", "available", "get", "select"]
