"""``zo_kernels.diff.zero_order``: a module that is also the ``zero_order`` decorator, like TorchOpt's."""

import sys
import types
from typing import Any

from .. import nn
from ..api import zero_order
from ..nn import ZeroOrderGradientModule, enable_zero_order_gradients

__all__ = ["zero_order", "nn", "ZeroOrderGradientModule", "enable_zero_order_gradients"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return zero_order(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
