"""zo_kernels: fast, lean zero-order (evolution-strategy) gradient estimation for PyTorch."""

from . import backends, diff, distributions, nn  # noqa: E402  (diff imports api and nn)
from ._estimator import NonFiniteLossError
from .api import zero_order
from .nn import ZeroOrderGradientModule

__version__ = "0.1.0"

__all__ = [
    "NonFiniteLossError",
    "ZeroOrderGradientModule",
    "backends",
    "diff",
    "distributions",
    "nn",
    "zero_order",
]
