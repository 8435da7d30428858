"""The compiled C++ CPU backend (``zo_kernels._C``): validation of every tensor, then a raw-pointer call.

The extension takes addresses, element counts and dtype ids, not libtorch types, so nothing here
depends on the PyTorch version; in exchange, this module is the only guard between a Python
mistake and a wild pointer, and checks device, dtype, contiguity and sizes before every call.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

import torch

from ..reference.noise import STREAMS
from .base import Backend
from .checks import DTYPE_IDS, check_sample_id, check_stream_args, check_tensor

#: The ``zo_kernels._C`` entry points this module calls; bumped whenever csrc/bindings.cpp changes them.
ABI_VERSION = 2


def load_extension() -> Tuple[Optional[ModuleType], str]:
    """Import ``zo_kernels._C``; return ``(module, 'available')`` or ``(None, reason)``.

    torch is imported first, so its OpenMP runtime (``libgomp.so.1``) is the one the extension binds
    to: one thread pool serves both, and ``torch.set_num_threads`` bounds our kernels too.
    """
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (
            f"not built ({exc}); reinstall with a C++17 compiler (`pip install .`), "
            "or set ZO_KERNELS_REQUIRE_NATIVE=1 to see why the build failed"
        )
    if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
        return None, (
            f"stale build: zo_kernels._C has ABI version {getattr(_C, 'ABI_VERSION', None)}, this Python code needs "
            f"{ABI_VERSION}; reinstall the package (`pip install .`)"
        )
    return _C, "available"


def _check_tensor(t: torch.Tensor, name: str, dtype: Optional[torch.dtype] = None, numel: Optional[int] = None) -> None:
    check_tensor(t, name, "cpu", "cpu", dtype, numel)


def _check_ids(sample_ids: torch.Tensor, weights: torch.Tensor) -> None:
    _check_tensor(sample_ids, "sample_ids", torch.int64)
    _check_tensor(weights, "weights", torch.float64, sample_ids.numel())
    if sample_ids.numel() and (int(sample_ids.min()) < 0 or int(sample_ids.max()) >= 2**32):
        raise ValueError("sample_ids must be in [0, 2**32)")


class NativeCpuBackend(Backend):
    """Fused perturb / reduce / step on CPU tensors with the OpenMP C++ kernels.

    Uses ``torch.get_num_threads()`` threads, so ``torch.set_num_threads`` governs both PyTorch and
    these kernels. Results do not depend on the thread count.
    """

    name = "cpu"

    def __init__(self, ext: ModuleType) -> None:
        self._C = ext

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """CPU tensors of float32, float64, float16 or bfloat16."""
        return device.type == "cpu" and dtype in DTYPE_IDS

    @staticmethod
    def _threads() -> int:
        return max(1, torch.get_num_threads())

    def perturb(self, out, theta, stream, seed, sample_id, scale, offset):  # noqa: D102
        _check_tensor(theta, "theta")
        _check_tensor(out, "out", theta.dtype, theta.numel())
        check_sample_id(sample_id)
        s = check_stream_args(stream, seed, offset)
        self._C.perturb(
            out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed, sample_id,
            float(scale), offset, self._threads(),
        )  # fmt: skip

    def prepare_perturb(self, out, theta, stream, seed, offset, keep=None):  # noqa: D102
        _check_tensor(theta, "theta")
        _check_tensor(out, "out", theta.dtype, theta.numel())
        if keep is not None:
            _check_tensor(keep, "keep", torch.float32, theta.numel())
        s = check_stream_args(stream, seed, offset)
        args = (out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed)
        keep_ptr = 0 if keep is None else keep.data_ptr()
        kernel, threads = self._C.perturb, self._threads()

        def perturb(sample_id: int, scale: float) -> None:
            check_sample_id(sample_id)
            # The buffers were validated above and belong to the caller for the whole loop.
            kernel(*args, sample_id, float(scale), offset, threads, keep_ptr)

        return perturb

    def perturb_rows(self, out, theta, stream, seed, sample_ids, scales, offset, keep=None):  # noqa: D102
        _check_tensor(theta, "theta")
        ids = sample_ids.to(torch.int64).contiguous()
        _check_tensor(ids, "sample_ids", torch.int64)
        num = ids.numel()
        signs = scales.shape[1] if scales.dim() == 2 else 0
        _check_tensor(scales, "scales", torch.float64, num * signs)
        if scales.dim() != 2 or scales.shape[0] != num or signs < 1:
            raise ValueError(f"scales must be (num_samples, signs) = ({num}, >=1), got {tuple(scales.shape)}")
        _check_tensor(out, "out", theta.dtype, num * signs * theta.numel())
        if keep is not None:
            _check_tensor(keep, "keep", torch.float32, num * theta.numel())
        if num and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
            raise ValueError("sample_ids must be in [0, 2**32)")
        s = check_stream_args(stream, seed, offset)
        self._C.perturb_rows(
            out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed, ids.data_ptr(), num,
            scales.data_ptr(), signs, offset, 0 if keep is None else keep.data_ptr(), self._threads(),
        )  # fmt: skip

    #: Below this many elements, regenerating the noise in one ``reduce`` costs less than the
    #: accumulation calls that keeping it needs (about 30 us each, i.e. ~15k normals).
    KEEP_MIN_NUMEL = 1 << 15

    def prefers_kept_noise(self, stream: str, numel: int, rows: int = 1) -> bool:
        """True for the normal stream of large batches: Box-Muller costs ~4x more than an axpy.

        Measured (bench/results/cpu.md): regenerating normals in ``reduce`` made about half of the
        time beyond the bare evaluations on a 265k-parameter MLP, and keeping them one sample at a
        time made the 2k-parameter linear model slower; a batch of ``rows`` samples is accumulated
        in one matrix-vector product, so it counts as ``rows * numel`` elements. Rademacher signs
        regenerate at memory speed.
        """
        return stream == "normal" and numel * rows >= self.KEEP_MIN_NUMEL

    def _accumulate(self, fn, data, weights, sample_ids, stream, seed, offset, *extra):
        _check_tensor(data, "data")
        s = check_stream_args(stream, seed, offset)
        ids = sample_ids.to(torch.int64).contiguous()
        w = weights.to(torch.float64).contiguous()
        _check_ids(ids, w)
        fn(
            data.data_ptr(), data.numel(), DTYPE_IDS[data.dtype], w.data_ptr(), ids.data_ptr(), ids.numel(), s, seed,
            *extra, offset, self._threads(),
        )  # fmt: skip

    def reduce(self, grad, weights, sample_ids, stream, seed, offset):  # noqa: D102
        self._accumulate(self._C.reduce, grad, weights, sample_ids, stream, seed, offset)

    def step(self, theta, weights, sample_ids, stream, seed, lr, offset):  # noqa: D102
        self._accumulate(self._C.step, theta, weights, sample_ids, stream, seed, offset, float(lr))

    def squared_norms(self, stream, seed, sample_ids, numel):  # noqa: D102
        s = check_stream_args(stream, seed, 0)
        ids = sample_ids.to(device="cpu", dtype=torch.int64).contiguous()
        out = torch.empty(ids.numel(), dtype=torch.float64)
        self._C.squared_norms(out.data_ptr(), ids.data_ptr(), ids.numel(), numel, s, seed, self._threads())
        return out.to(sample_ids.device)

    def sample(self, stream, seed, sample_id, offset, numel, device="cpu"):  # noqa: D102
        if torch.device(device).type != "cpu":
            raise ValueError(f"device must be the CPU for the 'cpu' backend, got {device}")
        check_sample_id(sample_id)
        s = check_stream_args(stream, seed, offset)
        out = torch.empty(numel, dtype=torch.float32)
        self._C.fill(out.data_ptr(), numel, s, seed, sample_id, offset, self._threads())
        return out

    def philox_words(self, seed: int, sample_id: int, block0: int, blocks: int) -> torch.Tensor:
        """The uint32 words of ``blocks`` consecutive Philox blocks, as int64 of shape (blocks, 4)."""
        check_stream_args(STREAMS[0], seed, block0)
        out = torch.empty((blocks, 4), dtype=torch.int32)
        self._C.philox_words(out.data_ptr(), blocks, seed, sample_id, block0)
        return out.to(torch.int64) & 0xFFFFFFFF
