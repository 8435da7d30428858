"""Every Triton kernel variant the backend can launch, compiled ahead of time for a GPU target.

A *variant* is one kernel with the argument types, constexprs and launch options that a launcher
in :mod:`.ops` can give it: each stream, each parameter dtype and weight dtype, each ROWS / SIGNS /
STEP case, each autotune config, and both index widths (Python ints below 2**31 reach a kernel as
int32, larger ones as uint32 or int64). :func:`compile_variant` builds one with Triton's own compiler
for an explicit :class:`GPUTarget` (``sm_90`` by default), which needs no GPU: the interpreter
accepts code that the compiler rejects, so ``tests/test_triton_compile.py`` compiles every variant,
and ``bench/sass_report.py`` reads the SASS of each.

Importing this module imports :mod:`.ops`; run it without ``TRITON_INTERPRET=1`` in the environment
(the interpreter's fixed autotune config would hide the GPU configs).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import ops
from .philox import STREAM_IDS

#: Triton's type strings of the parameter dtypes.
POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
#: The index widths of integer arguments: small values (int32) and values past 2**31 (uint32 / int64).
INDEX_WIDTHS = ("int32", "int64")

# How each integer argument reaches a kernel, per index width: Triton types a Python int as i32
# below 2**31, u32 below 2**32 and i64 above. Seed words and sample ids are < 2**32; sizes, offsets
# and block indices may exceed it; the float64 bit patterns are int64 whatever their value.
_INT_TYPES = {
    "int32": {"scale_bits": "i64"},
    "int64": {
        "n": "i64", "offset": "i64", "tiles": "i64", "block0": "i64", "num": "i64",
        "seed_lo": "u32", "seed_hi": "u32", "sample": "u32", "c2": "u32", "c3": "u32", "scale_bits": "i64",
    },
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launchable specialization of a kernel of :mod:`.ops`."""

    op: str
    kernel: Any
    pointers: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, Any], ...]
    num_warps: int
    index: str
    stream: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    weights: Optional[torch.dtype] = None

    @property
    def fn(self):
        """The ``JITFunction`` under any autotuner."""
        return getattr(self.kernel, "fn", self.kernel)

    @property
    def block(self) -> int:
        """The tile size (``BLOCK``)."""
        return int(dict(self.constexprs)["BLOCK"])

    @property
    def elements_per_thread(self) -> int:
        """Tile elements each thread holds: ``BLOCK / (32 * num_warps)``."""
        return max(1, self.block // (32 * self.num_warps))

    @property
    def name(self) -> str:
        """A readable id, e.g. ``reduce-normal-float32-w32-B1024-nw4-int32``."""
        parts = [self.op, self.stream, _short(self.dtype), _short(self.weights) and "w" + _short(self.weights)[5:]]
        extra = {k: v for k, v in self.constexprs if k in ("SIGNS",) and dict(self.constexprs).get("ROWS")}
        parts += [f"{k.lower()}{v}" for k, v in extra.items()]
        parts += [f"B{self.block}", f"nw{self.num_warps}", self.index]
        return "-".join(p for p in parts if p)

    def signature(self) -> Dict[str, str]:
        """Triton's signature dict: pointer, integer and ``constexpr`` types by argument name."""
        pointers, consts, ints = dict(self.pointers), dict(self.constexprs), _INT_TYPES[self.index]
        out = {}
        for arg in self.fn.arg_names:
            out[arg] = pointers.get(arg) or ("constexpr" if arg in consts else ints.get(arg, "i32"))
        return out


def _short(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else ""


def _configs() -> List[Tuple[int, int]]:
    """The (BLOCK, num_warps) pairs the autotuned kernels are tried with on a GPU."""
    return [(c.kwargs["BLOCK"], c.num_warps) for c in ops.gpu_configs()]


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def variants() -> Iterator[Variant]:
    """Every variant the launchers of :mod:`.ops` can produce."""
    for index in INDEX_WIDTHS:
        for stream, sid in STREAM_IDS.items():
            for dtype, ptr in POINTER_TYPES.items():
                for block, warps in _configs():
                    common = dict(num_warps=warps, index=index, stream=stream, dtype=dtype)
                    consts = (("STREAM", sid), ("ACC", _acc(dtype)), ("BLOCK", block))
                    yield Variant(
                        "perturb", ops._perturb_kernel,
                        (("out_ptr", ptr), ("theta_ptr", ptr), ("ids_ptr", ptr), ("scales_ptr", ptr)),
                        consts + (("ROWS", False), ("SIGNS", 1)), **common,
                    )  # fmt: skip
                    for signs in (1, 2):
                        yield Variant(
                            "perturb_rows", ops._perturb_kernel,
                            (("out_ptr", ptr), ("theta_ptr", ptr), ("ids_ptr", "*i64"), ("scales_ptr", "*fp64")),
                            consts + (("ROWS", True), ("SIGNS", signs)), **common,
                        )  # fmt: skip
                    for weights, wptr in ((torch.float32, "*fp32"), (torch.float64, "*fp64")):
                        for step in (False, True):
                            yield Variant(
                                "step" if step else "reduce", ops._accumulate_kernel,
                                (("data_ptr", ptr), ("weights_ptr", wptr), ("ids_ptr", "*i64")),
                                consts + (("STEP", step),), weights=weights, **common,
                            )  # fmt: skip
            yield Variant(
                "squared_norms", ops._squared_norms_kernel, (("partial_ptr", "*fp64"), ("ids_ptr", "*i64")),
                (("STREAM", sid), ("BLOCK", ops.NORM_BLOCK)), 4, index, stream=stream,
            )  # fmt: skip
        words = (("BLOCK", ops.WORDS_BLOCK),)
        yield Variant("philox_blocks", ops._words_kernel, (("out_ptr", "*i64"),), words, 4, index)


@dataclasses.dataclass
class Compiled:
    """A variant's PTX and cubin, and what ptxas said of its registers and local memory."""

    variant: Variant
    kernel_name: str
    ptx: str
    cubin: bytes
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int


def target(arch: int = 90):
    """Triton's ``GPUTarget`` for CUDA compute capability ``arch`` (warp size 32)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def compile_variant(variant: Variant, arch: int = 90) -> Compiled:
    """Compile ``variant`` for ``sm_<arch>`` (no GPU needed); raises if Triton or ptxas fails."""
    from triton.compiler import ASTSource

    sig = variant.signature()
    # Tensors from the caching allocator are 16-byte aligned: the divisibility Triton infers at launch.
    aligned = {(variant.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, _ in variant.pointers}
    src = ASTSource(variant.fn, sig, dict(variant.constexprs), aligned)
    compiled = triton.compile(src, target=target(arch), options={"num_warps": variant.num_warps})
    ptx = compiled.asm["ptx"]
    name = compiled.metadata.name
    info = ptxas_info(ptx, name, arch)
    return Compiled(variant, name, ptx, compiled.asm["cubin"], **info)


def ptxas(arch: int = 90) -> str:
    """The ptxas Triton itself compiles ``sm_<arch>`` with (the PTX it writes needs that version)."""
    if os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"]
    from triton.backends.nvidia import compiler as nvidia

    try:
        tool = nvidia.get_ptxas(arch)
    except TypeError:  # Triton releases whose get_ptxas takes no architecture
        tool = nvidia.get_ptxas()
    return tool.path


_PTXAS_LINE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_info(ptx: str, kernel_name: str, arch: int = 90) -> Dict[str, int]:
    """Registers, spill bytes and stack frame of ``kernel_name`` as ``ptxas -v`` reports them."""
    gpu = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if gpu is None:
        raise ValueError("the PTX names no .target")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(ptx)
        cmd = [ptxas(arch), "-v", f"--gpu-name={gpu.group(1)}", path, "-o", os.path.join(tmp, "k.cubin")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed on {kernel_name}:\n{result.stderr[-4000:]}")
    text = result.stderr.split(f"Compiling entry function '{kernel_name}'")[-1]
    return {key: int(m.group(1)) if (m := rx.search(text)) else 0 for key, rx in _PTXAS_LINE.items()}
