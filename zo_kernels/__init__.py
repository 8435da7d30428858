"""zo_kernels: fast, lean zero-order (evolution-strategy) gradient estimation for PyTorch."""

from . import backends, diff, distributions, journal, nn, optim, shaping
from ._version import __version__ as __version__  # the one source of the version (setup.py reads it too)
from .api import estimate, zero_order
from .estimator import NonFiniteLossError
from .nn import ZeroOrderGradientModule
from .seed_gradient import SeedGradient

__all__ = [
    "NonFiniteLossError",
    "SeedGradient",
    "ZeroOrderGradientModule",
    "backends",
    "diff",
    "distributions",
    "estimate",
    "journal",
    "nn",
    "optim",
    "shaping",
    "zero_order",
]
