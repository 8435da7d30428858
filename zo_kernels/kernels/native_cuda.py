"""The compiled CUDA backend (``zo_kernels._C_cuda``): validation of every tensor, then a raw-pointer launch.

Like the CPU backend (:mod:`.native`), the extension takes device addresses, element counts, dtype ids,
the device index and the CUDA stream handle, never libtorch types, so it works with any PyTorch
version. This module is the only guard between a Python mistake and a wild device pointer: it checks
device, dtype, contiguity and sizes of every tensor before the call. Kernels run on the current
stream of the tensors' device (``torch.cuda.current_stream(device)``), so they order with the
surrounding PyTorch work exactly like a PyTorch op; ``perturb``, ``reduce`` and ``step`` never
synchronize the host.

One check cannot be made without a device sync: whether the ``sample_ids`` of ``reduce``/``step``
lie in ``[0, 2**32)`` when they live on the GPU. The kernels turn the result into NaN instead of
silently wrapping such an id (``squared_norms``, which returns a tensor anyway, raises).
"""

from __future__ import annotations

from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from ..reference.noise import STREAMS, accumulation_dtype
from .base import Backend
from .checks import DTYPE_IDS, check_sample_id, check_stream_args, check_tensor


def _min_capability(ext: ModuleType) -> Tuple[int, int]:
    """The lowest compute capability the module has code for (by default sm_80 and sm_90, compute_90 PTX)."""
    arch = int(getattr(ext, "MIN_ARCH", 800))
    return arch // 100, (arch % 100) // 10


#: The ``zo_kernels._C_cuda`` entry points this module calls; bumped whenever csrc/cuda/bindings_cuda.cpp changes.
ABI_VERSION = 3


def load_extension() -> Tuple[Optional[ModuleType], str]:
    """Import ``zo_kernels._C_cuda``; return ``(module, 'available')`` or ``(None, 'not built: ...')``."""
    try:
        from .. import _C_cuda  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (
            f"not built ({exc}); reinstall with nvcc on PATH (`ZO_KERNELS_BUILD_CUDA=1 pip install .`), "
            "or set ZO_KERNELS_REQUIRE_NATIVE=1 to see why the build failed"
        )
    if getattr(_C_cuda, "ABI_VERSION", None) != ABI_VERSION:
        return None, (
            f"stale build: zo_kernels._C_cuda has ABI version {getattr(_C_cuda, 'ABI_VERSION', None)}, this Python "
            f"code needs {ABI_VERSION}; reinstall the package (`pip install .`)"
        )
    return _C_cuda, "available"


def load_backend() -> Tuple[Optional[NativeCudaBackend], str]:
    """``(backend, 'available')`` if ``_C_cuda`` imports and a CUDA device is visible, else ``(None, why)``."""
    ext, why = load_extension()
    if ext is None:
        return None, why
    if not torch.cuda.is_available():
        return None, "built, but no CUDA device is visible (torch.cuda.is_available() is False)"
    lowest = _min_capability(ext)
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if not any(c >= lowest for c in capabilities):
        return None, f"built for compute capability {lowest}+, but the visible devices have {capabilities}"
    return NativeCudaBackend(ext), "available"


def _check_tensor(
    t: torch.Tensor,
    name: str,
    dtype: Optional[torch.dtype] = None,
    numel: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> None:
    check_tensor(t, name, "cuda", "cuda", dtype, numel, device)


# The current stream's cudaStream_t as an int: torch's raw accessor (what torch.compile's generated
# code calls; ~10x cheaper than building a torch.cuda.Stream), else the public API.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_handle(device: torch.device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _cuda_device(device=None) -> torch.device:
    """``device`` (None: the current one) as a CUDA device with an explicit index; ValueError if not CUDA."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device for the 'cuda' backend, got {device}")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class NativeCudaBackend(Backend):
    """Fused perturb / reduce / step on CUDA tensors with the CUDA C++ kernels.

    Each element's sum over the samples has a fixed order: the samples, in the order given by
    ``sample_ids``, are split into ``_C_cuda.sample_splits(num, numel, stream)`` contiguous chunks (one
    for large tensors), each chunk summed in order, then the chunks' sums added in order. The split
    depends on (num, numel, stream) alone, never on the device, so results are bitwise identical run
    to run and from one GPU to another.
    """

    name = "cuda"

    def __init__(self, ext: ModuleType) -> None:
        self._C = ext
        self._min_capability = _min_capability(ext)
        self._capable: Dict[int, bool] = {}

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """CUDA tensors of float32, float64, float16 or bfloat16, on a device the module has code for."""
        if device.type != "cuda" or dtype not in DTYPE_IDS:
            return False
        index = torch.cuda.current_device() if device.index is None else device.index
        if index not in self._capable:
            self._capable[index] = torch.cuda.get_device_capability(index) >= self._min_capability
        return self._capable[index]

    def perturb(self, out, theta, stream, seed, sample_id, scale, offset):  # noqa: D102
        _check_tensor(theta, "theta")
        _check_tensor(out, "out", theta.dtype, theta.numel(), theta.device)
        check_sample_id(sample_id)
        s = check_stream_args(stream, seed, offset, theta.numel())
        device = theta.device
        self._C.perturb(
            out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed, sample_id,
            float(scale), offset, device.index, _stream_handle(device),
        )  # fmt: skip

    def prepare_perturb(self, out, theta, stream, seed, offset):  # noqa: D102
        _check_tensor(theta, "theta")
        _check_tensor(out, "out", theta.dtype, theta.numel(), theta.device)
        s = check_stream_args(stream, seed, offset, theta.numel())
        device = theta.device
        args = (out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed)
        kernel, index = self._C.perturb, device.index

        def perturb(sample_id: int, scale: float) -> None:
            check_sample_id(sample_id)
            # The buffers were validated above and belong to the caller for the whole loop; the
            # stream is looked up per call, so each launch goes to the stream current at that time.
            kernel(*args, sample_id, float(scale), offset, index, _stream_handle(device))

        return perturb

    def perturb_rows(self, out, theta, stream, seed, sample_ids, scales, offset, keep=None):  # noqa: D102
        if keep is not None:  # regenerating the noise in `reduce` is free on a GPU: nothing keeps it
            return super().perturb_rows(out, theta, stream, seed, sample_ids, scales, offset, keep)
        _check_tensor(theta, "theta")
        device = theta.device
        if scales.dim() != 2 or scales.shape[0] != sample_ids.numel() or not 1 <= scales.shape[1] <= 2:
            raise ValueError(f"scales must be (num_samples, 1 or 2), got {tuple(scales.shape)}")
        num, signs = scales.shape
        _check_tensor(out, "out", theta.dtype, num * signs * theta.numel(), device)
        s = check_stream_args(stream, seed, offset, theta.numel())
        # A few hundred bytes, copied on the current stream; out-of-range ids poison their rows on the device.
        ids = sample_ids.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()
        row_scales = scales.to(device=device, dtype=torch.float64, non_blocking=True).contiguous()
        self._C.perturb_rows(
            out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed, ids.data_ptr(), num,
            row_scales.data_ptr(), signs, offset, device.index, _stream_handle(device),
        )  # fmt: skip

    def _accumulate(self, fn, data, weights, sample_ids, stream, seed, offset, *extra):
        _check_tensor(data, "data")
        s = check_stream_args(stream, seed, offset, data.numel())
        device = data.device
        for t, name in ((weights, "weights"), (sample_ids, "sample_ids")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{name} must be on {device} like the data, got {t.device}")
        if sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
            raise TypeError(f"sample_ids must have an integer dtype, got {sample_ids.dtype}")
        if weights.dtype.is_complex:
            raise TypeError(f"weights must be real, got {weights.dtype}")
        # Conversions run on the device, on the current stream (no host sync); no-ops when the caller
        # already passes int64 ids and weights in the accumulation dtype.
        acc = accumulation_dtype(data.dtype)
        ids = sample_ids.reshape(-1).to(torch.int64).contiguous()
        w = weights.reshape(-1).to(acc).contiguous()
        _check_tensor(ids, "sample_ids", torch.int64, device=device)
        _check_tensor(w, "weights", acc, ids.numel(), device)
        work = self._workspace(ids.numel(), data.numel(), s, acc, device)
        fn(
            data.data_ptr(), data.numel(), DTYPE_IDS[data.dtype], w.data_ptr(), ids.data_ptr(), ids.numel(), s, seed,
            *extra, offset, 0 if work is None else work.data_ptr(), device.index, _stream_handle(device),
        )  # fmt: skip

    def _workspace(
        self, num: int, numel: int, stream_id: int, acc: torch.dtype, device: torch.device
    ) -> Optional[torch.Tensor]:
        """The partial sums' scratch tensor of a split reduce/step, or None when it runs as one kernel.

        Allocated on the current stream, the one the kernels run on, so the caching allocator hands
        the memory to nobody else before they are done with it.
        """
        size = self._C.reduce_workspace(num, numel, stream_id)
        return torch.empty(size, dtype=acc, device=device) if size else None

    def reduce(self, grad, weights, sample_ids, stream, seed, offset):  # noqa: D102
        self._accumulate(self._C.reduce, grad, weights, sample_ids, stream, seed, offset)

    def step(self, theta, weights, sample_ids, stream, seed, lr, offset):  # noqa: D102
        self._accumulate(self._C.step, theta, weights, sample_ids, stream, seed, offset, float(lr))

    def squared_norms(self, stream, seed, sample_ids, numel):  # noqa: D102
        s = check_stream_args(stream, seed, 0, numel)
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
        device = _cuda_device(sample_ids.device if sample_ids.device.type == "cuda" else None)
        ids = sample_ids.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
        # This call returns a tensor the caller reads anyway, so the range check may sync.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
            raise ValueError("sample_ids must be in [0, 2**32)")
        out = torch.empty(ids.numel(), dtype=torch.float64, device=device)
        work = torch.empty(self._C.squared_norms_workspace(ids.numel(), numel), dtype=torch.float64, device=device)
        self._C.squared_norms(
            out.data_ptr(), work.data_ptr(), ids.data_ptr(), ids.numel(), numel, s, seed, device.index,
            _stream_handle(device),
        )  # fmt: skip
        return out.to(sample_ids.device)

    def sample(self, stream, seed, sample_id, offset, numel, device=None):  # noqa: D102
        dev = _cuda_device(device)
        check_sample_id(sample_id)
        s = check_stream_args(stream, seed, offset, numel)
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        out = torch.empty(numel, dtype=torch.float32, device=dev)
        self._C.fill(out.data_ptr(), numel, s, seed, sample_id, offset, dev.index, _stream_handle(dev))
        return out

    def philox_words(self, seed: int, sample_id: int, block0: int, blocks: int) -> torch.Tensor:
        """The uint32 words of ``blocks`` consecutive Philox blocks, as int64 (blocks, 4), on the current GPU."""
        check_stream_args(STREAMS[0], seed, 0)
        check_sample_id(sample_id)
        if not 0 <= block0 < 2**64:
            raise ValueError(f"block0 must be in [0, 2**64), got {block0}")
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        dev = _cuda_device()
        out = torch.empty((blocks, 4), dtype=torch.int32, device=dev)
        self._C.philox_words(out.data_ptr(), blocks, seed, sample_id, block0, dev.index, _stream_handle(dev))
        return out.to(torch.int64) & 0xFFFFFFFF
