"""Shared test helpers: dtype tolerances and small known-gradient problems."""

import torch

# (rtol, atol) for comparing a kernel's output with the reference's, by parameter dtype: one or two
# roundings of the output dtype, accumulation being in float32 (float64 for float64). The noise is
# float32 on every backend and its log/sin/cos may round differently (about 1e-6 absolute), which
# bounds float64 agreement too.
TOLERANCES = {
    torch.float64: (1e-6, 1e-6),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale)


def counting(fn):
    """``fn`` wrapped so that ``wrapped.calls`` grows by one entry per call (to count evaluations)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    wrapped.calls = calls
    return wrapped


def straddling_offset(n: int, aligned: bool = False) -> int:
    """A random offset at which an ``n``-element tensor crosses a tile boundary (a multiple of 8, or odd).

    ``2**13`` is a multiple of every tile size the Triton kernels use, so the middle of the tensor
    lies on a tile boundary. ``aligned`` offsets (multiples of 8) let the kernels move 16-byte vectors.
    """
    base = int(torch.randint(1, 2**21, ()).item()) * 2**13 - (n // 2)
    return base - base % 8 if aligned else base - 1 + base % 2
