"""zo_kernels: fast, lean zero-order (evolution-strategy) gradient estimation for PyTorch."""

from . import backends, distributions
from ._estimator import NonFiniteLossError
from .api import zero_order
from .nn import ZeroOrderGradientModule
from . import diff, nn  # noqa: E402  (diff imports api and nn)

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
