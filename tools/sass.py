"""SASS of compiled GPU kernels: parsing ``cuobjdump -sass``, and what one hot-loop iteration issues.

A development tool, not part of the package: ``tests/test_triton_compile.py`` (via
``tools/triton_variants.py``) checks the sample loops with it, and ``tools/sass_report.py`` turns the
counts into bounds. Needs ``cuobjdump`` (on PATH, in /usr/local/cuda/bin, or bundled with Triton);
no GPU.

- the hot region of a function is the innermost loop holding the Philox multiplies (an immediate
  operand 0xD2511F53 or 0xCD9E8D57): the per-sample loop of reduce / step, the grid-stride loop of
  the CUDA perturb kernels; where those are in no loop (Triton perturb: one tile per program), entry
  to its last EXIT; in a kernel without Philox (a finishing sum over chunks), its widest loop;
- one iteration is the shortest path through that region from its head to its back edge (or exit)
  over the control-flow graph with inner back edges not taken: the rare slow paths (the Payne–Hanek
  reduction of sin/cos, out of range for these angles) stay off it, and every instruction on it is
  issued once per iteration. Predicated-off instructions count (they are issued); NOPs do not.
  Where the region writes global memory the path must pass a global store, so the rows loop of
  perturb_rows is counted once (one row).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PHILOX_IMMEDIATES = ("0xd2511f53", "-0x2daee0ad", "0xcd9e8d57", "-0x326172a9")


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")


@dataclasses.dataclass
class Instr:
    """One SASS instruction: address, predicate guard, opcode and operand text."""

    addr: int
    guard: str
    opcode: str
    operands: str

    @property
    def branch_target(self) -> Optional[int]:
        """The target of a direct branch (``BRA 0x1370``), else None."""
        if self.opcode.split(".")[0] != "BRA":
            return None
        m = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(m.group(1), 16) if m else None

    @property
    def unconditional(self) -> bool:
        """True if the instruction always executes (no guard, or ``@PT``)."""
        return self.guard in ("", "@PT")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """``cuobjdump -sass`` output as instruction lists per function (mangled name)."""
    functions: Dict[str, List[Instr]] = {}
    current: Optional[List[Instr]] = None
    for line in text.splitlines():
        f = _FUNCTION.match(line)
        if f:
            current = functions.setdefault(f.group(1), [])
            continue
        m = _LINE.match(line)
        if m and current is not None:
            body = m.group(2).split()
            guard = body.pop(0) if body and body[0].startswith("@") else ""
            current.append(Instr(int(m.group(1), 16), guard, body[0], " ".join(body[1:])))
    return functions


def _is_philox(ins: Instr) -> bool:
    return ins.opcode.startswith("IMAD") and any(c in ins.operands.lower() for c in PHILOX_IMMEDIATES)


def loops(code: Sequence[Instr]) -> List[Tuple[int, int]]:
    """(head index, back-edge index) of every loop: a branch to an earlier address."""
    index = {ins.addr: k for k, ins in enumerate(code)}
    found = []
    for k, ins in enumerate(code):
        target = ins.branch_target
        if target is not None and target <= ins.addr and target in index:
            found.append((index[target], k))
    return found


def hot_region(code: Sequence[Instr]) -> Tuple[int, int, bool]:
    """(first, last, is_loop) of the hot region.

    The innermost loop holding Philox multiplies; where they are in no loop (one tile per
    program), entry .. the last EXIT; in a kernel without Philox (a finishing sum), its widest loop.
    """
    philox = [k for k, ins in enumerate(code) if _is_philox(ins)]
    every = loops(code)
    candidates = [(h, t) for h, t in every if any(h <= k <= t for k in philox)]
    if candidates:
        h, t = min(candidates, key=lambda ht: ht[1] - ht[0])
        return h, t, True
    if every and not philox:
        h, t = max(every, key=lambda ht: ht[1] - ht[0])
        return h, t, True
    exits = [k for k, ins in enumerate(code) if ins.opcode == "EXIT"]
    return 0, exits[-1] if exits else len(code) - 1, False


def _stores(ins: Instr) -> bool:
    return ins.opcode.split(".")[0] == "STG"


def shortest_path(code: Sequence[Instr], first: int, last: int) -> List[Instr]:
    """The fewest-instruction path from ``first`` to ``last`` (inclusive) in that region's forward CFG.

    Where the region writes global memory, the path must pass through a global store: a loop over
    a sample's rows (CUDA perturb_rows) or a kernel's output is work, not a slow path to skip.
    """
    index = {ins.addr: k for k, ins in enumerate(code)}
    must_store = any(_stores(ins) for ins in code[first : last + 1])
    inf = float("inf")
    # State (k, s): at instruction k, s = whether a global store is behind us.
    dist = {(first, _stores(code[first])): int(code[first].opcode != "NOP")}
    prev: Dict[Tuple[int, bool], Optional[Tuple[int, bool]]] = {(first, _stores(code[first])): None}
    for k in range(first, last):
        ins = code[k]
        if ins.opcode == "EXIT" and ins.unconditional:
            continue
        succ = []
        target = ins.branch_target
        if not (target is not None and ins.unconditional):
            succ.append(k + 1)  # falls through
        if target is not None and target in index and k < index[target] <= last:
            succ.append(index[target])  # forward branches only: inner back edges are not taken
        for stored in (False, True):
            if (k, stored) not in dist:
                continue
            for n in succ:
                state = (n, stored or _stores(code[n]))
                cost = dist[(k, stored)] + (code[n].opcode != "NOP")
                if cost < dist.get(state, inf):
                    dist[state], prev[state] = cost, (k, stored)
    ends = [(last, True)] if must_store else [(last, False), (last, True)]
    reached = [e for e in ends if e in dist]
    if not reached:
        raise ValueError("the region's end is unreachable from its head")
    state: Optional[Tuple[int, bool]] = min(reached, key=dist.__getitem__)
    path = []
    while state is not None:
        path.append(code[state[0]])
        state = prev[state]
    return [ins for ins in reversed(path) if ins.opcode != "NOP"]


@dataclasses.dataclass
class Count:
    """What one kernel issues per hot-loop iteration."""

    per_iteration: int
    barriers: int
    shared: int
    local: int
    is_loop: bool


def count(code: Sequence[Instr]) -> Count:
    """The hot-path instruction count of one function, and its barriers / shared / local memory ops on that path."""
    first, last, is_loop = hot_region(code)
    path = shortest_path(code, first, last)
    ops = [ins.opcode.split(".")[0] for ins in path]
    shared = sum(op in ("STS", "LDS", "LDSM") for op in ops)
    local = sum(op in ("STL", "LDL") for op in ops)
    return Count(len(path), sum(op == "BAR" for op in ops), shared, local, is_loop)


def _triton_bin(name: str) -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def tool(name: str) -> str:
    """A CUDA binary tool: on PATH, in /usr/local/cuda/bin, or bundled with Triton."""
    for candidate in (shutil.which(name), f"/usr/local/cuda/bin/{name}", _triton_bin(name)):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{name} not found (PATH, /usr/local/cuda/bin, Triton's bundled tools)")


def disassemble(cubin: bytes) -> Dict[str, List[Instr]]:
    """The SASS of every function of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool("cuobjdump"), "-sass", fh.name], capture_output=True, text=True, check=True)
    return parse_sass(out.stdout)


def demangle(names: Iterable[str]) -> Dict[str, str]:
    """Itanium-demangled names (``c++filt``), or the names as they are without it."""
    names = list(names)
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))
