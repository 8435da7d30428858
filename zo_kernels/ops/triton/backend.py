"""The Triton backend: the launches of the kernels in :mod:`.ops` (``Backend`` validates first).

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
from typing import Callable, Optional, Tuple

import torch

from ..base import Backend
from ..spec import (
    MAX_INDEX,
    PARAMETER_DTYPES,
    Accumulate,
    LowRankAccumulate,
    LowRankPerturb,
    Perturb,
    PerturbRows,
    PhiloxWords,
    Placement,
    Sample,
    SquaredNorms,
    Traits,
)

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

    def __init__(self, ops: ModuleType) -> None:
        self._ops = ops
        cuda = torch.cuda.is_available()
        devices = tuple(kind for kind, usable in (("cuda", cuda), ("cpu", ops.INTERPRET)) if usable)
        where = "on a CUDA device (or the CPU with TRITON_INTERPRET=1)"
        default = "cpu" if ops.INTERPRET and not cuda else "cuda"
        self.traits = Traits(
            Placement("triton", devices, where, host_ids=True), lambda: torch.device(default), _weights_dtype
        )

    @staticmethod
    def _on(device: torch.device):
        """Launch on the tensors' GPU, not the current one."""
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    # -- the operations (arguments validated by kernels/operations.py) ----------------------------

    def run_perturb(self, op: Perturb) -> Callable[[int, float], None]:  # noqa: D102
        launch, on = self._ops.perturb, self._on(op.theta.device)
        out, theta, s, seed, offset = op.out, op.theta, op.stream_id, op.seed, op.offset

        def perturb(sample_id: int, scale: float) -> None:
            with on:
                launch(out, theta, s, seed, sample_id, scale, offset)

        return perturb

    def run_perturb_rows(self, op: PerturbRows) -> None:  # noqa: D102
        with self._on(op.theta.device):
            self._ops.perturb_rows(op.out, op.theta, op.stream_id, op.seed, op.ids, op.device_scales, op.offset)

    def run_accumulate(self, op: Accumulate) -> None:  # noqa: D102
        with self._on(op.data.device):
            self._ops.accumulate(op.data, op.weights, op.ids, op.stream_id, op.seed, op.offset, op.lr)

    def run_squared_norms(self, op: SquaredNorms) -> torch.Tensor:  # noqa: D102
        with self._on(op.device):
            return self._ops.squared_norms(op.ids, op.stream_id, op.seed, op.numel)

    def run_sample(self, op: Sample) -> torch.Tensor:  # noqa: D102
        zeros = torch.zeros(op.numel, dtype=torch.float32, device=op.device)
        out = torch.empty_like(zeros)
        perturb = Perturb(out, zeros, op.stream, op.stream_id, op.seed, op.offset, None)
        self.run_perturb(perturb)(op.sample_id, 1.0)  # 0 + 1 * z == z, exactly
        return out

    def run_philox_words(self, op: PhiloxWords) -> torch.Tensor:  # noqa: D102
        with self._on(op.device):
            return self._ops.philox_blocks(op.block0, op.blocks, op.sample_id, 0, op.seed, op.device)

    def run_lowrank_perturb(self, op: LowRankPerturb) -> None:
        """One fused pass of :func:`.lowrank.lowrank_perturb`: no ``m x n`` temporary, rounded once."""
        from . import lowrank  # here, not at the top: this module imports without Triton (load_backend says why)

        with self._on(op.theta.device):
            lowrank.lowrank_perturb(op.out, op.theta, op.a, op.b, op.scale)

    def run_lowrank_accumulate(self, op: LowRankAccumulate) -> None:
        """``data += alpha * a @ diag(weights) @ b.T`` as the tiled GEMM of :func:`.lowrank.lowrank_accumulate`."""
        from . import lowrank

        with self._on(op.data.device):
            lowrank.lowrank_accumulate(op.data, op.a, op.b, op.weights, op.alpha)


def _weights_dtype(data: torch.dtype, given: torch.dtype) -> torch.dtype:
    """float32 weights stay float32 (what the estimator passes for narrow dtypes); the rest is float64."""
    return given if given in (torch.float32, torch.float64) else torch.float64
