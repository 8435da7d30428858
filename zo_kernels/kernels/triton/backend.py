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
import numbers
import operator
from types import ModuleType
from typing import Optional, Tuple

import torch

from ...reference.noise import STREAMS
from ..base import Backend

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Flat indices (offset + numel) stay below this, so int64 index math in the kernels cannot overflow.
MAX_INDEX = 2**62


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


def _check_int(value, name: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not lo <= value < hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}), got {value}")
    return value


def _check_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


class TritonBackend(Backend):
    """Fused perturb / reduce / step with Triton kernels, on CUDA tensors (CPU ones in the interpreter).

    Results are deterministic: each element's sum over samples runs in a fixed order, set by the
    sample split of :func:`.ops.sample_splits`, a function of the sizes alone.
    """

    name = "triton"

    def __init__(self, ops: ModuleType) -> None:
        self._ops = ops

    # -- devices and validation ------------------------------------------------------------------

    def _device_ok(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and self._ops.INTERPRET

    def _where(self) -> str:
        return "a CUDA device (or the CPU with TRITON_INTERPRET=1)"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """CUDA tensors of float32, float64, float16 or bfloat16; CPU ones too under ``TRITON_INTERPRET=1``."""
        return dtype in DTYPES and self._device_ok(torch.device(device))

    def _check_device(self, device) -> torch.device:
        """``device`` (default: the current CUDA device, or the CPU in the interpreter without CUDA), checked."""
        if device is None:
            device = "cpu" if self._ops.INTERPRET and not torch.cuda.is_available() else "cuda"
        device = torch.device(device)
        if not self._device_ok(device):
            raise ValueError(f"device must be {self._where()} for the 'triton' backend, got {device}")
        return device

    def _check_tensor(self, t, name: str, like: Optional[torch.Tensor] = None) -> None:
        """A contiguous float tensor on a device this backend runs on (and like ``like``: device, dtype, size)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not self._device_ok(t.device):
            raise ValueError(f"{name} must be on {self._where()} for the 'triton' backend, got {t.device}")
        if like is not None:
            if t.device != like.device:
                raise ValueError(f"{name} must be on {like.device} (the device of theta), got {t.device}")
            if t.dtype != like.dtype:
                raise TypeError(f"{name} must have dtype {like.dtype}, got {t.dtype}")
            if t.numel() != like.numel():
                raise ValueError(f"{name} must have {like.numel()} elements, got {t.numel()}")
        elif t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    @staticmethod
    def _check_stream_args(stream: str, seed: int, offset: int, numel: int) -> Tuple[int, int, int]:
        """``(stream id, seed, offset)`` as plain ints, after range checks."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        seed = _check_int(seed, "seed", 0, 2**64)
        offset = _check_int(offset, "offset", 0, MAX_INDEX)
        if offset + numel > MAX_INDEX:
            raise ValueError(f"offset + numel must be at most 2**62, got {offset} + {numel}")
        return STREAMS.index(stream), seed, offset

    @staticmethod
    def _ids(sample_ids, device: torch.device) -> torch.Tensor:
        """``sample_ids`` as a flat contiguous int64 tensor on ``device``, without a device sync."""
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
        if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
            raise TypeError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
        if sample_ids.device not in (device, torch.device("cpu")):
            raise ValueError(f"sample_ids must be on {device} (like the data) or the CPU, got {sample_ids.device}")
        ids = sample_ids.reshape(-1).to(torch.int64)
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
            raise ValueError("sample_ids must be in [0, 2**32)")
        return ids.to(device).contiguous()

    @staticmethod
    def _weights(weights, num: int, device: torch.device) -> torch.Tensor:
        """``weights`` as a flat contiguous float32 or float64 tensor of ``num`` elements on ``device``."""
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a tensor, got {type(weights).__name__}")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
        if weights.numel() != num:
            raise ValueError(f"weights must have {num} elements (one per sample id), got {weights.numel()}")
        if weights.device not in (device, torch.device("cpu")):
            raise ValueError(f"weights must be on {device} (like the data) or the CPU, got {weights.device}")
        w = weights.reshape(-1)
        if w.dtype not in (torch.float32, torch.float64):
            w = w.to(torch.float64)
        return w.to(device).contiguous()

    @staticmethod
    def _on(device: torch.device):
        """Launch on the tensors' GPU, not the current one."""
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    # -- the backend interface -------------------------------------------------------------------

    def perturb(self, out, theta, stream, seed, sample_id, scale, offset):  # noqa: D102
        self.prepare_perturb(out, theta, stream, seed, offset)(sample_id, scale)

    def prepare_perturb(self, out, theta, stream, seed, offset):  # noqa: D102
        self._check_tensor(theta, "theta")
        self._check_tensor(out, "out", like=theta)
        s, seed, offset = self._check_stream_args(stream, seed, offset, theta.numel())
        launch, on = self._ops.perturb, self._on(theta.device)

        def perturb(sample_id: int, scale: float) -> None:
            sample_id = _check_int(sample_id, "sample_id", 0, 2**32)
            scale = _check_float(scale, "scale")
            with on:  # the buffers were validated above and belong to the caller for the whole loop
                launch(out, theta, s, seed, sample_id, scale, offset)

        return perturb

    def perturb_rows(self, out, theta, stream, seed, sample_ids, scales, offset, keep=None):  # noqa: D102
        if keep is not None:  # regenerating in `reduce` is free on a GPU: nothing here keeps noise
            return super().perturb_rows(out, theta, stream, seed, sample_ids, scales, offset, keep)
        self._check_tensor(theta, "theta")
        if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or not 1 <= scales.shape[1] <= 2:
            raise ValueError(f"scales must be a (num_samples, 1 or 2) tensor, got {getattr(scales, 'shape', scales)}")
        ids = self._ids(sample_ids, theta.device)
        if ids.numel() != scales.shape[0]:
            raise ValueError(f"scales must have one row per sample id ({ids.numel()}), got {scales.shape[0]}")
        self._check_tensor(out, "out")
        if out.device != theta.device or out.dtype != theta.dtype:
            raise ValueError(f"out must be {theta.dtype} on {theta.device} like theta, got {out.dtype} on {out.device}")
        if out.numel() != scales.numel() * theta.numel():
            raise ValueError(f"out must have {scales.numel() * theta.numel()} elements (a row per sample and sign)")
        s, seed, offset = self._check_stream_args(stream, seed, offset, theta.numel())
        row_scales = scales.to(device=theta.device, dtype=torch.float64).contiguous()
        with self._on(theta.device):
            self._ops.perturb_rows(out, theta, s, seed, ids, row_scales, offset)

    def _accumulate(self, name, data, weights, sample_ids, stream, seed, offset, lr=None):
        self._check_tensor(data, name)
        s, seed, offset = self._check_stream_args(stream, seed, offset, data.numel())
        ids = self._ids(sample_ids, data.device)
        w = self._weights(weights, ids.numel(), data.device)
        with self._on(data.device):
            self._ops.accumulate(data, w, ids, s, seed, offset, lr)

    def reduce(self, grad, weights, sample_ids, stream, seed, offset):  # noqa: D102
        self._accumulate("grad", grad, weights, sample_ids, stream, seed, offset)

    def step(self, theta, weights, sample_ids, stream, seed, lr, offset):  # noqa: D102
        self._accumulate("theta", theta, weights, sample_ids, stream, seed, offset, _check_float(lr, "lr"))

    def squared_norms(self, stream, seed, sample_ids, numel):  # noqa: D102
        numel = _check_int(numel, "numel", 0, MAX_INDEX)
        s, seed, _ = self._check_stream_args(stream, seed, 0, numel)
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
        if not self._device_ok(sample_ids.device):
            raise ValueError(f"sample_ids must be on {self._where()} for the 'triton' backend, got {sample_ids.device}")
        ids = self._ids(sample_ids, sample_ids.device)
        with self._on(ids.device):
            return self._ops.squared_norms(ids, s, seed, numel)

    def sample(self, stream, seed, sample_id, offset, numel, device=None):  # noqa: D102
        device = self._check_device(device)
        numel = _check_int(numel, "numel", 0, MAX_INDEX)
        zeros = torch.zeros(numel, dtype=torch.float32, device=device)
        out = torch.empty_like(zeros)
        self.perturb(out, zeros, stream, seed, sample_id, 1.0, offset)  # 0 + 1 * z == z, exactly
        return out

    def philox_words(self, seed: int, sample_id: int, block0: int, blocks: int, device=None) -> torch.Tensor:
        """The uint32 words of ``blocks`` consecutive Philox blocks, as int64 of shape (blocks, 4)."""
        device = self._check_device(device)
        seed = _check_int(seed, "seed", 0, 2**64)
        sample_id = _check_int(sample_id, "sample_id", 0, 2**32)
        blocks = _check_int(blocks, "blocks", 0, MAX_INDEX)
        block0 = _check_int(block0, "block0", 0, MAX_INDEX - blocks)
        with self._on(device):
            return self._ops.philox_blocks(block0, blocks, sample_id, 0, seed, device)
