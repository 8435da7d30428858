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
