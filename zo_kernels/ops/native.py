"""The compiled backends (``zo_kernels._C`` on the CPU, ``zo_kernels._C_cuda`` on CUDA): one adapter.

The extensions take addresses, element counts and dtype ids, not libtorch types, so nothing here
depends on the PyTorch version; in exchange, this adapter is the only guard between a Python mistake
and a wild pointer; :class:`.base.Backend` runs the checks of :mod:`.operations` on every argument
before every call. The two modules
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
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch

from .base import Backend
from .spec import (
    ABI_VERSION,
    DTYPE_IDS,
    Accumulate,
    Perturb,
    PerturbRows,
    PhiloxWords,
    Placement,
    Sample,
    SquaredNorms,
    Traits,
    accumulation_dtype,
)


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
        shadowed = source_tree_shadowing()
        if shadowed is not None:
            return None, f"not built in the source tree that Python imports zo_kernels from ({exc}): {shadowed}"
        return None, f"not built ({exc}); {spec.build}, or set ZO_KERNELS_REQUIRE_NATIVE=1 to see why the build failed"
    found = getattr(ext, "ABI_VERSION", None)
    if found != spec.abi:
        return None, (
            f"stale build: zo_kernels.{spec.module} has ABI version {found}, this Python code needs "
            f"{spec.abi}; reinstall the package (`pip install .`)"
        )
    return ext, "available"


def source_tree_shadowing() -> Optional[str]:
    """Why the compiled modules are missing when ``zo_kernels`` is imported from a source checkout, else None.

    Run from the repository root after ``pip install .``, Python imports the in-tree package (the
    current directory comes first on ``sys.path``), which has no compiled modules, instead of the
    installed one: reinstalling would not help.
    """
    package = Path(__file__).resolve().parent.parent
    if not (package.parent / "setup.py").is_file() or not (package.parent / "csrc").is_dir():
        return None
    try:
        from importlib import metadata

        dist = metadata.distribution("zo_kernels")
    except Exception:  # noqa: BLE001 - not installed at all (or no metadata): not a shadowing case
        return None
    installed = Path(str(dist.locate_file("zo_kernels"))).resolve()
    where = "" if installed == package else f"; the installed package is {installed}"
    return (
        f"Python is importing the source tree {package}{where}. Run from another directory to use the installed "
        "package, or build the source tree in place (`pip install -e .`)"
    )


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
        self._capable: Dict[int, bool] = {}
        # The CPU kernels keep noise and take float64 weights; the CUDA ones regenerate the noise
        # (free on a GPU) and take weights in the accumulation dtype (what the estimator passes).
        self.keeps_noise = not self._cuda
        self.traits = Traits(
            PLACEMENTS[device_type],
            _current_cuda_device if self._cuda else _cpu,
            _accumulation_weights if self._cuda else _float64_weights,
            max_signs=2 if self._cuda else None,
        )
        if self._cuda:
            self._min_capability = min_capability(ext)

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

    def _launch(self, device: torch.device) -> Tuple[int, ...]:
        """The ``launch`` tuple of every binding: ``(threads,)``, or ``(device index, current stream)``."""
        if self._cuda:
            return device.index, _stream_handle(device)
        return (max(1, torch.get_num_threads()),)

    # -- the operations (arguments validated by kernels/operations.py) ----------------------------

    def run_perturb(self, op: Perturb) -> Callable[[int, float], None]:  # noqa: D102
        theta = op.theta
        args = (op.out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], op.stream_id, op.seed)
        keep, offset = _address(op.keep), op.offset
        kernel, device, launch = self._C.perturb, theta.device, self._launch

        def perturb(sample_id: int, scale: float) -> None:
            # The CUDA stream is looked up per call, so each launch goes to the stream current then.
            kernel(*args, sample_id, scale, offset, keep, launch(device))

        return perturb

    def run_perturb_rows(self, op: PerturbRows) -> None:  # noqa: D102
        theta, scales = op.theta, op.device_scales
        self._C.perturb_rows(
            op.out.data_ptr(), theta.data_ptr(), theta.numel(), DTYPE_IDS[theta.dtype], op.stream_id, op.seed,
            op.ids.data_ptr(), op.num, scales.data_ptr(), op.signs, op.offset, _address(op.keep),
            self._launch(theta.device),
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

    def run_accumulate(self, op: Accumulate) -> None:  # noqa: D102
        data = op.data
        scratch = self._workspace(op.num, data.numel(), op.stream_id, op.weights.dtype, data.device)
        fn, extra = (self._C.reduce, ()) if op.lr is None else (self._C.step, (op.lr,))
        fn(
            data.data_ptr(), data.numel(), DTYPE_IDS[data.dtype], op.weights.data_ptr(), op.ids.data_ptr(), op.num,
            op.stream_id, op.seed, *extra, op.offset, _address(scratch), self._launch(data.device),
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

    def run_squared_norms(self, op: SquaredNorms) -> torch.Tensor:  # noqa: D102
        ids, device = op.ids, op.device
        out = torch.empty(ids.numel(), dtype=torch.float64, device=device)
        size = self._C.squared_norms_workspace(ids.numel(), op.numel) if self._cuda else 0
        scratch = torch.empty(size, dtype=torch.float64, device=device) if size else None
        self._C.squared_norms(
            out.data_ptr(), ids.data_ptr(), ids.numel(), op.numel, op.stream_id, op.seed, _address(scratch),
            self._launch(device),
        )  # fmt: skip
        return out

    def run_sample(self, op: Sample) -> torch.Tensor:  # noqa: D102
        out = torch.empty(op.numel, dtype=torch.float32, device=op.device)
        self._C.fill(out.data_ptr(), op.numel, op.stream_id, op.seed, op.sample_id, op.offset, self._launch(op.device))
        return out

    def run_philox_words(self, op: PhiloxWords) -> torch.Tensor:  # noqa: D102
        out = torch.empty((op.blocks, 4), dtype=torch.int32, device=op.device)
        self._C.philox_words(out.data_ptr(), op.blocks, op.seed, op.sample_id, op.block0, self._launch(op.device))
        return out.to(torch.int64) & 0xFFFFFFFF


def _address(t: Optional[torch.Tensor]) -> int:
    """A tensor's address for the bindings; 0 (the null pointer) for none."""
    return 0 if t is None else t.data_ptr()


def _cpu() -> torch.device:
    return torch.device("cpu")


def _current_cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _float64_weights(data: torch.dtype, given: torch.dtype) -> torch.dtype:
    return torch.float64


def _accumulation_weights(data: torch.dtype, given: torch.dtype) -> torch.dtype:
    return accumulation_dtype(data)


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
