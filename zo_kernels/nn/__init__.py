"""Module API: ``ZeroOrderGradientModule`` (TorchOpt-compatible)."""

from .module import ZeroOrderGradientModule, enable_zero_order_gradients

__all__ = ["ZeroOrderGradientModule", "enable_zero_order_gradients"]
