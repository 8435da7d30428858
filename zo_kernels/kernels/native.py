"""The compiled backends (``zo_kernels._C`` on the CPU, ``zo_kernels._C_cuda`` on CUDA): one adapter.

The extensions take addresses, element counts and dtype ids, not libtorch types, so nothing here
depends on the PyTorch version; in exchange, this adapter is the only guard between a Python mistake
and a wild pointer, and runs :mod:`.checks` on every argument before every call. The two modules
bind the same operations with the same leading arguments; only the trailing *launch* arguments
differ: the OpenMP thread count on the CPU, the device index and the current stream's handle on
CUDA (kernels run on ``torch.cuda.current_stream(device)``, so they order with the surrounding
PyTorch work like a PyTorch op, and ``perturb``, ``reduce`` and ``step`` never synchronize).

Each element's sum over the samples has a fixed order on both devices (on CUDA: the samples are
split into ``_C_cuda.sample_splits(num, numel, stream)`` contiguous chunks, each summed in order,
then the chunks' sums added in order), so results are bitwise identical run to run, for any thread
count and from one GPU to another. GPU-resident ``sample_ids`` are not range-checked (that would
sync): the kernels turn what an out-of-range id touches into NaN instead of wrapping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch

from .abi import ABI_VERSION
from .base import Backend
from .checks import (
    DTYPE_IDS,
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
from .dtypes import accumulation_dtype


@dataclass(frozen=True)
class Extension:
    """One compiled module: its import name, the ABI version this adapter calls, how to build it."""

    module: str
    abi: int
    build: str


#: Both modules bind csrc/bindings.h, so both report the one ABI_VERSION of :mod:`.abi`.
EXTENSIONS: Dict[str, Extension] = {
    "cpu": Extension("_C", ABI_VERSION, "reinstall with a C++17 compiler (`pip install .`)"),
    "cuda": Extension("_C_cuda", ABI_VERSION, "reinstall with nvcc on PATH (`ZO_KERNELS_BUILD_CUDA=1 pip install .`)"),
}

PLACEMENTS: Dict[str, Placement] = {
    "cpu": Placement("cpu", ("cpu",), "on the CPU", host_ids=True),
    "cuda": Placement("cuda", ("cuda",), "a CUDA tensor", host_ids=False),
}


def load_extension(device_type: str = "cpu") -> Tuple[Optional[ModuleType], str]:
    """Import the extension for ``device_type``; return ``(module, 'available')`` or ``(None, reason)``.

    torch is imported first, so its OpenMP runtime (``libgomp.so.1``) is the one ``_C`` binds to:
    one thread pool serves both, and ``torch.set_num_threads`` bounds our kernels too.
    """
    spec = EXTENSIONS[device_type]
    import importlib

    try:
        ext = importlib.import_module(f"zo_kernels.{spec.module}")
    except ImportError as exc:
        return None, f"not built ({exc}); {spec.build}, or set ZO_KERNELS_REQUIRE_NATIVE=1 to see why the build failed"
    found = getattr(ext, "ABI_VERSION", None)
    if found != spec.abi:
        return None, (
            f"stale build: zo_kernels.{spec.module} has ABI version {found}, this Python code needs "
            f"{spec.abi}; reinstall the package (`pip install .`)"
        )
    return ext, "available"


# The current stream's cudaStream_t as an int: torch's raw accessor (what torch.compile's generated
# code calls; ~10x cheaper than building a torch.cuda.Stream), else the public API.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_handle(device: torch.device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def min_capability(ext: ModuleType) -> Tuple[int, int]:
    """The lowest compute capability the CUDA module has code for (by default sm_80 and sm_90, compute_90 PTX)."""
    arch = int(getattr(ext, "MIN_ARCH", 800))
    return arch // 100, (arch % 100) // 10


class NativeBackend(Backend):
    """Fused perturb / reduce / step with the compiled kernels of one device type.

    On the CPU it uses ``torch.get_num_threads()`` threads, so ``torch.set_num_threads`` governs
    both PyTorch and these kernels; results do not depend on the thread count.
    """

    def __init__(self, ext: ModuleType, device_type: str) -> None:
        self._C = ext
        self.name = device_type
        self._cuda = device_type == "cuda"
        self._placement = PLACEMENTS[device_type]
        self._capable: Dict[int, bool] = {}
        if self._cuda:
            self._min_capability = min_capability(ext)

    # -- devices and launch arguments ------------------------------------------------------------

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Tensors of this device type and float32, float64, float16 or bfloat16 (CUDA: a device with code)."""
        if device.type != self.name or dtype not in DTYPE_IDS:
            return False
        if not self._cuda:
            return True
        index = torch.cuda.current_device() if device.index is None else device.index
        if index not in self._capable:
            self._capable[index] = torch.cuda.get_device_capability(index) >= self._min_capability
        return self._capable[index]

    def _device(self, device=None) -> torch.device:
        """``device`` (None: the CPU, or the current CUDA device) with an explicit index; ValueError if not ours."""
        if not self._cuda:
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError(f"device must be the CPU for the 'cpu' backend, got {device}")
            return torch.device("cpu")
        device = torch.device("cuda") if device is None else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device for the 'cuda' backend, got {device}")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _launch(self, device: torch.device) -> Tuple[int, ...]:
        """The ``launch`` tuple of every binding: ``(threads,)``, or ``(device index, current stream)``."""
        if self._cuda:
            return device.index, _stream_handle(device)
        return (max(1, torch.get_num_threads()),)

    def _check(self, t, name: str, dtype=None, numel=None, device=None) -> None:
        check_tensor(t, name, self._placement, dtype, numel, device)

    def _check_pair(self, out, theta, rows: int = 1) -> None:
        self._check(theta, "theta")
        self._check(out, "out", theta.dtype, rows * theta.numel(), theta.device if self._cuda else None)

    # -- the backend interface -------------------------------------------------------------------

    def perturb(self, out, theta, stream, seed, sample_id, scale, offset):  # noqa: D102
        self._check_pair(out, theta)
        sample_id = check_sample_id(sample_id)
        s = check_stream_args(stream, seed, offset, theta.numel())
        self._C.perturb(
            out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed, sample_id,
            check_float(scale, "scale"), offset, 0, self._launch(theta.device),
        )  # fmt: skip

    def prepare_perturb(self, out, theta, stream, seed, offset, keep=None) -> Callable[[int, float], None]:  # noqa: D102
        self._check_pair(out, theta)
        if keep is not None and self._cuda:  # the CUDA kernel does not keep noise: the generic path does
            return super().prepare_perturb(out, theta, stream, seed, offset, keep)
        if keep is not None:
            self._check(keep, "keep", torch.float32, theta.numel())
        s = check_stream_args(stream, seed, offset, theta.numel())
        args = (out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed)
        keep_ptr = 0 if keep is None else keep.data_ptr()
        kernel, device, launch = self._C.perturb, theta.device, self._launch

        def perturb(sample_id: int, scale: float) -> None:
            sample_id = check_sample_id(sample_id)
            # The buffers were validated above and belong to the caller for the whole loop; the
            # CUDA stream is looked up per call, so each launch goes to the stream current then.
            kernel(*args, sample_id, check_float(scale, "scale"), offset, keep_ptr, launch(device))

        return perturb

    def perturb_rows(self, out, theta, stream, seed, sample_ids, scales, offset, keep=None):  # noqa: D102
        if keep is not None and self._cuda:  # regenerating the noise in `reduce` is free on a GPU
            return super().perturb_rows(out, theta, stream, seed, sample_ids, scales, offset, keep)
        self._check(theta, "theta")
        device = theta.device
        ids = check_ids(sample_ids, device, host_ok=True)
        num, signs = check_scales(scales, ids.numel(), 2 if self._cuda else None)
        self._check(out, "out", theta.dtype, num * signs * theta.numel(), device if self._cuda else None)
        if keep is not None:
            self._check(keep, "keep", torch.float32, num * theta.numel())
        s = check_stream_args(stream, seed, offset, theta.numel())
        # A few hundred bytes, copied on the current stream.
        row_scales = scales.to(device=device, non_blocking=True).contiguous()
        self._C.perturb_rows(
            out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], s, seed, ids.data_ptr(), num,
            row_scales.data_ptr(), signs, offset, 0 if keep is None else keep.data_ptr(), self._launch(device),
        )  # fmt: skip

    #: Below this many elements, regenerating the noise in one ``reduce`` costs less than the
    #: accumulation calls that keeping it needs (about 30 us each, i.e. ~15k normals).
    KEEP_MIN_NUMEL = 1 << 15

    def prefers_kept_noise(self, stream: str, numel: int, rows: int = 1) -> bool:
        """On the CPU, True for the normal stream of large batches: Box-Muller costs ~4x more than an axpy.

        Measured (bench/results/cpu.md): regenerating normals in ``reduce`` made about half of the
        time beyond the bare evaluations on a 265k-parameter MLP, and keeping them one sample at a
        time made the 2k-parameter linear model slower; a batch of ``rows`` samples is accumulated
        in one matrix-vector product, so it counts as ``rows * numel`` elements. Rademacher signs
        regenerate at memory speed, and so does everything on a GPU.
        """
        return not self._cuda and stream == "normal" and numel * rows >= self.KEEP_MIN_NUMEL

    def _accumulate(self, fn, data, weights, sample_ids, stream, seed, offset, *extra) -> None:
        self._check(data, "data")
        s = check_stream_args(stream, seed, offset, data.numel())
        device = data.device
        host_ok = self._placement.host_ids
        ids = check_ids(sample_ids, device, host_ok)
        # CPU kernels take float64 weights; CUDA ones the accumulation dtype (what the estimator passes).
        acc = accumulation_dtype(data.dtype) if self._cuda else torch.float64
        w = check_weights(weights, ids.numel(), device, acc, host_ok)
        scratch = self._workspace(ids.numel(), data.numel(), s, acc, device)
        fn(
            data.data_ptr(), data.numel(), DTYPE_IDS[data.dtype], w.data_ptr(), ids.data_ptr(), ids.numel(), s, seed,
            *extra, offset, 0 if scratch is None else scratch.data_ptr(), self._launch(device),
        )  # fmt: skip

    def _workspace(
        self, num: int, numel: int, stream_id: int, acc: torch.dtype, device: torch.device
    ) -> Optional[torch.Tensor]:
        """CUDA: the partial sums' scratch of a split reduce/step; None when it runs as one kernel (and on the CPU).

        Allocated on the current stream, the one the kernels run on, so the caching allocator hands
        the memory to nobody else before they are done with it.
        """
        size = self._C.reduce_workspace(num, numel, stream_id) if self._cuda else 0
        return torch.empty(size, dtype=acc, device=device) if size else None

    def reduce(self, grad, weights, sample_ids, stream, seed, offset):  # noqa: D102
        self._accumulate(self._C.reduce, grad, weights, sample_ids, stream, seed, offset)

    def step(self, theta, weights, sample_ids, stream, seed, lr, offset):  # noqa: D102
        self._accumulate(self._C.step, theta, weights, sample_ids, stream, seed, offset, check_float(lr, "lr"))

    def squared_norms(self, stream, seed, sample_ids, numel):  # noqa: D102
        numel = check_numel(numel)
        s = check_stream_args(stream, seed, 0, numel)
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a tensor, got {type(sample_ids).__name__}")
        device = self._device(sample_ids.device if sample_ids.device.type == self.name else None)
        ids = check_ids(sample_ids.to(device), device, host_ok=True)
        # This call returns a tensor the caller reads anyway, so the range check may sync.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
            raise ValueError("sample_ids must be in [0, 2**32)")
        out = torch.empty(ids.numel(), dtype=torch.float64, device=device)
        size = self._C.squared_norms_workspace(ids.numel(), numel) if self._cuda else 0
        scratch = torch.empty(size, dtype=torch.float64, device=device) if size else None
        work = 0 if scratch is None else scratch.data_ptr()
        self._C.squared_norms(out.data_ptr(), ids.data_ptr(), ids.numel(), numel, s, seed, work, self._launch(device))
        return out.to(sample_ids.device)

    def sample(self, stream, seed, sample_id, offset, numel, device=None):  # noqa: D102
        dev = self._device(device)
        sample_id = check_sample_id(sample_id)
        numel = check_numel(numel)
        s = check_stream_args(stream, seed, offset, numel)
        out = torch.empty(numel, dtype=torch.float32, device=dev)
        self._C.fill(out.data_ptr(), numel, s, seed, sample_id, offset, self._launch(dev))
        return out

    def philox_words(self, seed, sample_id, block0, blocks, device=None):  # noqa: D102
        check_philox_blocks(seed, sample_id, block0, blocks)
        dev = self._device(device)
        out = torch.empty((blocks, 4), dtype=torch.int32, device=dev)
        self._C.philox_words(out.data_ptr(), blocks, seed, sample_id, block0, self._launch(dev))
        return out.to(torch.int64) & 0xFFFFFFFF


class NativeCpuBackend(NativeBackend):
    """:class:`NativeBackend` on the CPU (``zo_kernels._C``, OpenMP)."""

    name = "cpu"

    def __init__(self, ext: ModuleType) -> None:
        super().__init__(ext, "cpu")


class NativeCudaBackend(NativeBackend):
    """:class:`NativeBackend` on CUDA (``zo_kernels._C_cuda``)."""

    name = "cuda"

    def __init__(self, ext: ModuleType) -> None:
        super().__init__(ext, "cuda")


def load_backend(device_type: str = "cpu") -> Tuple[Optional[NativeBackend], str]:
    """``(backend, 'available')`` if the module imports (and, for CUDA, a capable device is visible)."""
    ext, why = load_extension(device_type)
    if ext is None:
        return None, why
    if device_type == "cpu":
        return NativeCpuBackend(ext), "available"
    if not torch.cuda.is_available():
        return None, "built, but no CUDA device is visible (torch.cuda.is_available() is False)"
    lowest = min_capability(ext)
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if not any(c >= lowest for c in capabilities):
        return None, f"built for compute capability {lowest}+, but the visible devices have {capabilities}"
    return NativeCudaBackend(ext), "available"
