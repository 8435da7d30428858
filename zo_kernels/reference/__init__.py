"""Pure-PyTorch reference of the noise stream (``docs/noise.md``): the specification of every backend."""

from . import noise, philox

__all__ = ["noise", "philox"]
