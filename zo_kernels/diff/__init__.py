"""``zo_kernels.diff``: the layout of ``torchopt.diff``, for drop-in imports."""

from . import zero_order

__all__ = ["zero_order"]
