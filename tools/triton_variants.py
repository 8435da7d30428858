"""Every Triton kernel variant the backend can launch, compiled ahead of time for a GPU target.

A development tool, not part of the package (``python tools/triton_variants.py [--json PATH]``).
A *variant* is one kernel with the argument types, constexprs and launch options that a launcher
in ``zo_kernels.ops.triton.ops`` (or ``.lowrank``) can give it: each stream, each parameter dtype, each ROWS /
SIGNS / STEP / PARTIAL case, and both alignments (``ALIGN``: vector loads when the offset and size
allow). The tile config is fixed per stream (:data:`.ops.CONFIGS`) or operation
(:data:`.lowrank.PERTURB_CONFIG`, :data:`.lowrank.ACCUMULATE_CONFIG`) and every integer argument
carries a type annotation, so values never select a variant. :func:`compile_variant` builds one with Triton's own
compiler for an explicit :class:`GPUTarget` (``sm_90`` by default), which needs no GPU: the
interpreter accepts code that the compiler rejects, so ``tests/test_triton_compile.py`` compiles
every variant, and ``tools/sass_report.py`` reads the SASS of each.

Importing this module imports ``ops``; compile without ``TRITON_INTERPRET=1`` in the environment.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import sass  # tools/sass.py: this script's directory is on sys.path
import torch
import triton
from triton.runtime.jit import JITFunction

from zo_kernels.ops.triton import lowrank, ops
from zo_kernels.ops.triton.philox import STREAM_IDS

#: Triton's type strings of the parameter dtypes.
POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
#: The index variants: one, since every integer argument is annotated (``tl.int64`` / ``tl.uint32``).
INDEX_WIDTHS = ("annotated",)
#: Compile options every launch of :mod:`.ops` passes besides ``num_warps``.
OPTIONS = {"enable_fp_fusion": ops.FP_FUSION}


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
        """The ``JITFunction`` (under any autotuner or heuristics wrapper)."""
        kernel = self.kernel
        while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn  # an autotuner, or the interpreter's wrapper (whose fn is the Python function)
        return kernel

    @property
    def block(self) -> int:
        """The tile size: ``BLOCK``, or ``BLOCK_M * BLOCK_N`` output elements of a low-rank kernel."""
        consts = dict(self.constexprs)
        return int(consts["BLOCK"]) if "BLOCK" in consts else int(consts["BLOCK_M"]) * int(consts["BLOCK_N"])

    @property
    def align(self) -> int:
        """``ALIGN``: 1, or the elements per 16-byte vector the kernel may move (1 for kernels without it)."""
        return int(dict(self.constexprs).get("ALIGN", 1))

    @property
    def elements_per_thread(self) -> int:
        """Tile elements each thread holds: ``BLOCK / (32 * num_warps)``."""
        return max(1, self.block // (32 * self.num_warps))

    @property
    def name(self) -> str:
        """A readable id, e.g. ``reduce-normal-float32-w32-B512-nw4-a4-annotated``."""
        parts = [self.op, self.stream, _short(self.dtype), _short(self.weights) and "w" + _short(self.weights)[5:]]
        consts = dict(self.constexprs)
        if consts.get("ROWS"):
            parts.append(f"signs{consts['SIGNS']}")
        tile = f"{consts['BLOCK_M']}x{consts['BLOCK_N']}x{consts['BLOCK_K']}" if "BLOCK_M" in consts else self.block
        parts += [f"B{tile}", f"nw{self.num_warps}"]
        if "ALIGN" in consts:
            parts.append(f"a{consts['ALIGN']}")
        parts.append(self.index)
        return "-".join(p for p in parts if p)

    def signature(self) -> Dict[str, str]:
        """Triton's signature dict: pointer, annotated integer and ``constexpr`` types by argument name."""
        pointers, consts = dict(self.pointers), dict(self.constexprs)
        out = {}
        for param in self.fn.params:
            arg = param.name
            if arg in pointers:
                out[arg] = pointers[arg]
            elif arg in consts:
                out[arg] = "constexpr"
            elif param.annotation_type:
                out[arg] = param.annotation_type
            else:
                raise TypeError(f"{self.fn.__name__}: argument {arg} has no type annotation and is no pointer")
        return out


def _short(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else ""


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _aligns(dtype: torch.dtype) -> Tuple[int, int]:
    """The ``ALIGN`` values :func:`.ops._align` gives for ``dtype``: unaligned, and 16 bytes of it."""
    return 1, 16 // torch.empty((), dtype=dtype).element_size()


def _noise_variants(stream: str, dtype: torch.dtype, align: int) -> Iterator[Variant]:
    """perturb, perturb_rows (1 and 2 signs), reduce and step of one stream, dtype and alignment."""
    sid, ptr = STREAM_IDS[stream], POINTER_TYPES[dtype]
    block, warps = ops.CONFIGS[sid]
    acc, accptr = _acc(dtype), POINTER_TYPES[_acc(dtype)]
    common = dict(num_warps=warps, index=INDEX_WIDTHS[0], stream=stream, dtype=dtype)
    consts = (("STREAM", sid), ("ACC", ops._acc(dtype)), ("BLOCK", block), ("ALIGN", align))
    yield Variant(
        "perturb", ops._perturb_kernel, (("out_ptr", ptr), ("theta_ptr", ptr), ("ids_ptr", ptr), ("scales_ptr", ptr)),
        consts + (("ROWS", False), ("SIGNS", 1)), **common,
    )  # fmt: skip
    for signs in (1, 2):
        yield Variant(
            "perturb_rows", ops._perturb_kernel,
            (("out_ptr", ptr), ("theta_ptr", ptr), ("ids_ptr", "*i64"), ("scales_ptr", "*fp64")),
            consts + (("ROWS", True), ("SIGNS", signs)), **common,
        )  # fmt: skip
    for step in (False, True):
        yield Variant(
            "step" if step else "reduce", ops._accumulate_kernel,
            (("out_ptr", ptr), ("weights_ptr", accptr), ("ids_ptr", "*i64")),
            consts + (("STEP", step), ("PARTIAL", False)), weights=acc, **common,
        )  # fmt: skip


def _split_variants(dtype: torch.dtype, align: int) -> Iterator[Variant]:
    """The two kernels of a split reduce/step for ``dtype``: the partial sums (per stream) and the finish."""
    acc, accptr = _acc(dtype), POINTER_TYPES[_acc(dtype)]
    if dtype == acc:  # the partial sums only see the accumulation dtype and its alignment
        for stream, sid in STREAM_IDS.items():
            block, warps = ops.CONFIGS[sid]
            yield Variant(
                "reduce_partial", ops._accumulate_kernel,
                (("out_ptr", accptr), ("weights_ptr", accptr), ("ids_ptr", "*i64")),
                (("STREAM", sid), ("ACC", ops._acc(dtype)), ("BLOCK", block), ("ALIGN", align), ("STEP", False),
                 ("PARTIAL", True)),
                warps, INDEX_WIDTHS[0], stream=stream, dtype=acc, weights=acc,
            )  # fmt: skip
    for step in (False, True):
        yield Variant(
            "step_finish" if step else "reduce_finish", ops._finish_kernel,
            (("data_ptr", POINTER_TYPES[dtype]), ("ws_ptr", accptr)),
            (("STEP", step), ("BLOCK", ops.FINISH_BLOCK), ("ALIGN", align)), ops.NUM_WARPS, INDEX_WIDTHS[0],
            dtype=dtype,
        )  # fmt: skip


def _lowrank_variants(dtype: torch.dtype, align: int) -> Iterator[Variant]:
    """The two launches of :func:`.lowrank._lowrank_kernel` for ``dtype``: perturb (unweighted), accumulate."""
    ptr, accptr = POINTER_TYPES[dtype], POINTER_TYPES[_acc(dtype)]
    for op, config, weights in (("lowrank_perturb", lowrank.PERTURB_CONFIG, None),
                                ("lowrank_accumulate", lowrank.ACCUMULATE_CONFIG, _acc(dtype))):  # fmt: skip
        yield Variant(
            op, lowrank._lowrank_kernel,
            (("out_ptr", ptr), ("theta_ptr", ptr), ("a_ptr", "*fp32"), ("b_ptr", "*fp32"),
             ("w_ptr", "*fp32" if weights is None else accptr)),
            (("ACC", ops._acc(dtype)), ("WEIGHTED", weights is not None), ("BLOCK_M", config.block_m),
             ("BLOCK_N", config.block_n), ("BLOCK_K", config.block_k), ("GROUP_M", config.group_m), ("ALIGN", align)),
            config.num_warps, INDEX_WIDTHS[0], dtype=dtype, weights=weights,
        )  # fmt: skip


def variants() -> Iterator[Variant]:
    """Every variant the launchers of :mod:`.ops` and :mod:`.lowrank` can produce."""
    for dtype in POINTER_TYPES:
        for align in _aligns(dtype):
            for stream in STREAM_IDS:
                yield from _noise_variants(stream, dtype, align)
            yield from _split_variants(dtype, align)
            yield from _lowrank_variants(dtype, align)
    yield Variant(
        "squared_norms", ops._squared_norms_kernel, (("partial_ptr", "*fp64"), ("ids_ptr", "*i64")),
        (("BLOCK", ops.NORM_BLOCK),), ops.NUM_WARPS, INDEX_WIDTHS[0], stream="normal",
    )  # fmt: skip
    yield Variant(
        "philox_blocks", ops._words_kernel, (("out_ptr", "*i64"),), (("BLOCK", ops.WORDS_BLOCK),), ops.NUM_WARPS,
        INDEX_WIDTHS[0],
    )  # fmt: skip


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
    compiled = triton.compile(src, target=target(arch), options={"num_warps": variant.num_warps, **OPTIONS})
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


#: The register-allocation flag Triton's own ``make_cubin`` passes ptxas (Triton 3.9, "to work around
#: a ptxas 13.x bug"): it changes the allocation (a float64 low-rank kernel: 130 registers and no
#: spill with it, 128 and an 8-byte spill without), so the report uses it to describe the cubin that
#: runs. A ptxas that rejects it is asked again without it.
TRITON_PTXAS_FLAGS = ("--regAllocOptLevel=2",)


def ptxas_info(ptx: str, kernel_name: str, arch: int = 90) -> Dict[str, int]:
    """Registers, spill bytes and stack frame of ``kernel_name`` as ``ptxas -v`` reports them."""
    gpu = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if gpu is None:
        raise ValueError("the PTX names no .target")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(ptx)
        for flags in (TRITON_PTXAS_FLAGS, ()):
            cmd = [ptxas(arch), "-v", *flags, f"--gpu-name={gpu.group(1)}", path, "-o", os.path.join(tmp, "k.cubin")]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed on {kernel_name}:\n{result.stderr[-4000:]}")
    text = result.stderr.split(f"Compiling entry function '{kernel_name}'")[-1]
    return {key: int(m.group(1)) if (m := rx.search(text)) else 0 for key, rx in _PTXAS_LINE.items()}


#: PTX of approximate transcendentals: the normals must use libdevice's accurate functions.
APPROX_PTX = re.compile(r"\b(sin|cos|lg2|ex2|sqrt|rsqrt)\.approx")
#: Ops whose kernels loop over samples (or chunks): their loop must not synchronize the block.
LOOP_OPS = ("reduce", "step", "reduce_partial", "reduce_finish", "step_finish")
#: Ops whose hot loop is a GEMM's K loop: counted too (its local memory is checked), but it stages
#: the factor tiles through shared memory between barriers by design.
GEMM_OPS = ("lowrank_perturb", "lowrank_accumulate")


def _report_row(index: int) -> Dict[str, Any]:
    """Compile variant ``index`` of :func:`variants` and describe it (a worker of :func:`report`)."""
    v = list(variants())[index]
    row = {"name": v.name, "op": v.op, "stream": v.stream, "dtype": _short(v.dtype), "block": v.block,
           "num_warps": v.num_warps, "align": v.align, "index": v.index}  # fmt: skip
    try:
        c = compile_variant(v)
    except Exception as exc:  # reported, and failed on by the test
        return {**row, "error": f"{type(exc).__name__}: {exc}"[-2000:]}
    row.update(registers=c.registers, spill_stores=c.spill_stores, spill_loads=c.spill_loads, stack=c.stack,
               approx=len(APPROX_PTX.findall(c.ptx)), error=None)  # fmt: skip
    if v.op in LOOP_OPS + GEMM_OPS:
        loop = sass.count(sass.disassemble(c.cubin)[c.kernel_name])
        row.update(loop_instructions=loop.per_iteration, loop_barriers=loop.barriers, loop_shared=loop.shared,
                   loop_local=loop.local)  # fmt: skip
    return row


def report(jobs: Optional[int] = None) -> List[Dict[str, Any]]:
    """Compile every variant (``jobs`` processes) and return one row each: registers, spills, loop barriers."""
    if ops.INTERPRET:
        raise RuntimeError("compile the variants without TRITON_INTERPRET=1 in the environment")
    count = sum(1 for _ in variants())
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(_report_row, range(count)))


def format_table(rows: List[Dict[str, Any]]) -> str:
    """``rows`` of :func:`report` as a fixed-width table."""
    cols = ("name", "registers", "spill_stores", "spill_loads", "stack", "loop_instructions", "loop_barriers",
            "error")  # fmt: skip
    lines = ["  ".join(f"{c:>12}" if c != "name" else f"{c:<64}" for c in cols)]
    for r in rows:
        cells = [str(r.get(c, "")) if r.get(c) is not None else "" for c in cols]
        lines.append("  ".join(f"{v:>12}" if c != "name" else f"{v:<64}" for c, v in zip(cols, cells)))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``python tools/triton_variants.py [--json PATH] [--jobs N]``: compile and tabulate all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per CPU)")
    args = parser.parse_args(argv)
    rows = report(args.jobs)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
