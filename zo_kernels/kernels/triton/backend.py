"""The Triton backend: validation of every argument, then a launch of the kernels in :mod:`.ops`.

Tensors must be CUDA tensors (or CPU tensors when ``TRITON_INTERPRET=1``, where Triton's interpreter
runs the same kernels on the CPU), contiguous, of float32, float64, float16 or bfloat16, and on one
device; every check raises before anything is launched, naming the argument. Weights and sample ids
that live on the device are used where they are: nothing here synchronizes with the GPU, so ids
already on the device are not range-checked here (ids on the CPU are, before they are copied
over); the kernels turn what an id outside ``[0, 2**32)`` touches into NaN instead of wrapping it.

This module imports without Triton; :func:`load_backend` imports the kernels and says why it could not.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Optional, Tuple

import torch

from ..base import Backend
from ..checks import (
    MAX_INDEX,
    Placement,
    check_float,
    check_ids,
    check_numel,
    check_philox_blocks,
    check_sample_id,
    check_scales,
    check_stream_args,
    check_tensor,
    check_weights,
)
from ..dtypes import PARAMETER_DTYPES

__all__ = ["DTYPES", "MAX_INDEX", "TritonBackend", "load_backend"]

DTYPES = PARAMETER_DTYPES


def load_backend() -> Tuple[Optional[TritonBackend], str]:
    """``(TritonBackend, 'available')``, or ``(None, reason)`` when the kernels cannot run here."""
    try:
        from . import ops
    except ImportError as exc:
        return None, f"triton is not installed or too old ({exc}); install it with `pip install triton`"
    except Exception as exc:  # a Triton whose API does not fit: report, never fail the package import
        return None, f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    if not ops.INTERPRET and not torch.cuda.is_available():
        return None, (
            "no CUDA device (set TRITON_INTERPRET=1 before importing zo_kernels to run the Triton kernels "
            "on CPU tensors in Triton's interpreter)"
        )
    return TritonBackend(ops), "available"


class TritonBackend(Backend):
    """Fused perturb / reduce / step with Triton kernels, on CUDA tensors (CPU ones in the interpreter).

    Results are deterministic: each element's sum over samples runs in a fixed order, set by the
    sample split of :func:`.ops.sample_splits`, a function of the sizes alone.
    """

    name = "triton"

    # -- devices and validation ------------------------------------------------------------------

    def __init__(self, ops: ModuleType) -> None:
        self._ops = ops
        devices = ("cuda", "cpu") if ops.INTERPRET else ("cuda",)
        where = "on a CUDA device (or the CPU with TRITON_INTERPRET=1)"
        self._placement = Placement("triton", devices, where, host_ids=True)

    def _device_ok(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return torch.cuda.is_available()
        return self._placement.accepts(device)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """CUDA tensors of float32, float64, float16 or bfloat16; CPU ones too under ``TRITON_INTERPRET=1``."""
        return dtype in DTYPES and self._device_ok(torch.device(device))

    def _check_device(self, device) -> torch.device:
        """``device`` (default: the current CUDA device, or the CPU in the interpreter without CUDA), checked."""
        if device is None:
            device = "cpu" if self._ops.INTERPRET and not torch.cuda.is_available() else "cuda"
        device = torch.device(device)
        if not self._device_ok(device):
            raise ValueError(f"device must be {self._placement.where} for the 'triton' backend, got {device}")
        return device

    def _check(self, t, name: str, like: Optional[torch.Tensor] = None, rows: int = 1) -> None:
        """A contiguous float tensor of this backend (and like ``like``: device, dtype, ``rows`` times its size)."""
        if like is None:
            check_tensor(t, name, self._placement)
        else:
            check_tensor(t, name, self._placement, like.dtype, rows * like.numel(), like.device)

    @staticmethod
    def _on(device: torch.device):
        """Launch on the tensors' GPU, not the current one."""
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    # -- the backend interface -------------------------------------------------------------------

    def perturb(self, out, theta, stream, seed, sample_id, scale, offset):  # noqa: D102
        self.prepare_perturb(out, theta, stream, seed, offset)(sample_id, scale)

    def prepare_perturb(self, out, theta, stream, seed, offset, keep=None):  # noqa: D102
        if keep is not None:  # the kernel does not keep noise: the generic path perturbs, then samples
            return super().prepare_perturb(out, theta, stream, seed, offset, keep)
        self._check(theta, "theta")
        self._check(out, "out", like=theta)
        s = check_stream_args(stream, seed, offset, theta.numel())
        launch, on = self._ops.perturb, self._on(theta.device)

        def perturb(sample_id: int, scale: float) -> None:
            sample_id = check_sample_id(sample_id)
            scale = check_float(scale, "scale")
            with on:  # the buffers were validated above and belong to the caller for the whole loop
                launch(out, theta, s, int(seed), sample_id, scale, int(offset))

        return perturb

    def perturb_rows(self, out, theta, stream, seed, sample_ids, scales, offset, keep=None):  # noqa: D102
        if keep is not None:  # regenerating in `reduce` is free on a GPU: nothing here keeps noise
            return super().perturb_rows(out, theta, stream, seed, sample_ids, scales, offset, keep)
        self._check(theta, "theta")
        ids = check_ids(sample_ids, theta.device, host_ok=True)
        num, signs = check_scales(scales, ids.numel(), 2)
        self._check(out, "out", like=theta, rows=num * signs)
        s = check_stream_args(stream, seed, offset, theta.numel())
        row_scales = scales.to(device=theta.device).contiguous()
        with self._on(theta.device):
            self._ops.perturb_rows(out, theta, s, int(seed), ids, row_scales, int(offset))

    def _accumulate(self, name, data, weights, sample_ids, stream, seed, offset, lr=None):
        self._check(data, name)
        s = check_stream_args(stream, seed, offset, data.numel())
        ids = check_ids(sample_ids, data.device, host_ok=True)
        # float32 weights stay float32 (what the estimator passes for narrow dtypes); the rest is float64.
        w_dtype = weights.dtype if getattr(weights, "dtype", None) in (torch.float32, torch.float64) else torch.float64
        w = check_weights(weights, ids.numel(), data.device, w_dtype, host_ok=True)
        with self._on(data.device):
            self._ops.accumulate(data, w, ids, s, int(seed), int(offset), lr)

    def reduce(self, grad, weights, sample_ids, stream, seed, offset):  # noqa: D102
        self._accumulate("grad", grad, weights, sample_ids, stream, seed, offset)

    def step(self, theta, weights, sample_ids, stream, seed, lr, offset):  # noqa: D102
        self._accumulate("theta", theta, weights, sample_ids, stream, seed, offset, check_float(lr, "lr"))

    def squared_norms(self, stream, seed, sample_ids, numel):  # noqa: D102
        numel = check_numel(numel)
        s = check_stream_args(stream, seed, 0, numel)
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
        if not self._device_ok(sample_ids.device):
            where = self._placement.where
            raise ValueError(f"sample_ids must be {where} for the 'triton' backend, got {sample_ids.device}")
        ids = check_ids(sample_ids, sample_ids.device, host_ok=True)
        with self._on(ids.device):
            return self._ops.squared_norms(ids, s, int(seed), numel)

    def sample(self, stream, seed, sample_id, offset, numel, device=None):  # noqa: D102
        device = self._check_device(device)
        numel = check_numel(numel)
        zeros = torch.zeros(numel, dtype=torch.float32, device=device)
        out = torch.empty_like(zeros)
        self.perturb(out, zeros, stream, seed, sample_id, 1.0, offset)  # 0 + 1 * z == z, exactly
        return out

    def philox_words(self, seed, sample_id, block0, blocks, device=None):  # noqa: D102
        device = self._check_device(device)
        check_philox_blocks(seed, sample_id, block0, blocks)
        with self._on(device):
            return self._ops.philox_blocks(int(block0), int(blocks), int(sample_id), 0, int(seed), device)
