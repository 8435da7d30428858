"""Offline instruction counts of the GPU kernels: SASS per generated element and the bound it sets on an H200.

Until a GPU runs the kernels, this is how their speed is judged. For each CUDA kernel (a cubin that
nvcc builds from ``csrc/cuda/kernels.cu``) and each Triton kernel variant (compiled by
``tools/triton_variants.py`` for sm_90), it disassembles the SASS with ``cuobjdump``, finds
the hot loop and counts the instructions one thread issues per iteration of it, as
``tools/sass.py`` defines them (the shortest path through the innermost loop holding
the Philox multiplies; rare slow paths off it, stores on it):

- per element = per iteration / elements one thread handles per iteration (CUDA: its group size;
  Triton: BLOCK / (32 * num_warps));
- the bound = the H200's lane-instruction issue rate (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz
  = 3.35e13/s) / per element. It ignores memory and the lower throughput of some instructions, so
  a kernel cannot beat it; a compute-bound kernel comes close.

Registers, spills and stack come from ``ptxas -v``. ``--before REV ...`` also measures git revisions
(each in a temporary worktree, oldest first): the first is the "before" column, and the reduce
kernels get one line per revision, so each fix's commit shows what it changed.

    python tools/sass_report.py [--before REV ...] [--out bench/results/sass.md] [--json bench/results/sass.json]

Needs nvcc (CUDA >= 12) and Triton with its bundled cuobjdump; no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMS, SCHEDULERS, LANES, CLOCK_HZ = 132, 4, 32, 1.98e9
#: Lane-instructions per second an H200 can issue: one warp instruction per scheduler per cycle.
ISSUE_RATE = SMS * SCHEDULERS * LANES * CLOCK_HZ
STREAMS = ("normal", "rademacher")
DTYPES = ("float32", "float64", "float16", "bfloat16")  # the dtype ids of csrc/cuda/kernels.h
#: The Triton variants the report covers (every tile config and alignment; the first index width; float32 weights).
TRITON_OPS = ("reduce", "step", "reduce_partial", "perturb", "perturb_rows")
REPORT_DTYPES = ("float32", "bfloat16")


# --- rows -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One kernel's line of the report."""

    backend: str
    op: str
    stream: str
    dtype: str
    kernel: str
    config: str
    per_iteration: int
    elements: int
    barriers: int
    registers: int
    spills: int
    stack: int

    @property
    def per_element(self) -> float:
        """Hot-loop instructions per generated element."""
        return self.per_iteration / self.elements

    @property
    def bound(self) -> float:
        """Elements per second an H200 can at most reach at this instruction count."""
        return ISSUE_RATE / self.per_element

    @property
    def key(self) -> Tuple[str, str, str, str, str]:
        """What identifies the row across two trees."""
        return self.backend, self.op, self.stream, self.dtype, self.config


def _group_sizes(source: str) -> Dict[str, int]:
    """Elements a CUDA thread handles per hot-loop iteration, per stream (``Group<S>::kSize``)."""
    sizes = {}
    for stream, enum in (("normal", "kNormal"), ("rademacher", "kRademacher")):
        m = re.search(rf"struct Group<{enum}>\s*{{\s*static constexpr int kSize = (\d+);", source)
        if m is None:
            raise ValueError(f"csrc/cuda/kernels.cu: no Group<{enum}>::kSize")
        sizes[stream] = int(m.group(1))
    return sizes


def _ptxas_table(text: str) -> Dict[str, Dict[str, int]]:
    """Registers / spills / stack per mangled function from ``nvcc -Xptxas -v`` output."""
    table: Dict[str, Dict[str, int]] = {}
    for chunk in text.split("Compiling entry function '")[1:]:
        name = chunk.split("'", 1)[0]

        def grab(rx: str, chunk: str = chunk) -> int:
            m = re.search(rx, chunk)
            return int(m.group(1)) if m else 0

        table[name] = {
            "registers": grab(r"Used (\d+) registers"),
            "spills": grab(r"(\d+) bytes spill stores") + grab(r"(\d+) bytes spill loads"),
            "stack": grab(r"(\d+) bytes stack frame"),
        }
    return table


_CUDA_KERNEL = re.compile(r"::(\w+_kernel)<(\d+)(?:,\s*(\d+))?>")
_CUDA_OPS = {"accumulate_kernel": "reduce/step", "perturb_kernel": "perturb", "perturb_rows_kernel": "perturb_rows",
             "partial_kernel": "reduce_partial"}  # fmt: skip


def cuda_rows(root: str) -> List[Row]:
    """Rows for the templated CUDA kernels of ``root``'s csrc/cuda/kernels.cu."""
    from sass import count, demangle, disassemble, tool

    source = os.path.join(root, "csrc", "cuda", "kernels.cu")
    with open(source, encoding="utf-8") as fh:
        groups = _group_sizes(fh.read())
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [tool("nvcc"), "-std=c++17", "-arch=sm_90", "-O3", "-cubin", "-Xptxas=-v", "-I",
               os.path.join(root, "csrc"), source, "-o", cubin]  # fmt: skip
        build = subprocess.run(cmd, capture_output=True, text=True, check=True)
        with open(cubin, "rb") as fh:
            functions = disassemble(fh.read())
    resources = _ptxas_table(build.stdout + build.stderr)
    rows = []
    for mangled, name in demangle(functions).items():
        m = _CUDA_KERNEL.search(name)
        if m is None or m.group(3) is None:
            continue  # not a <stream, dtype> template: squared norms, words
        kernel, stream, dtype = m.group(1), STREAMS[int(m.group(2))], DTYPES[int(m.group(3))]
        c = count(functions[mangled])
        res = resources.get(mangled, {"registers": 0, "spills": 0, "stack": 0})
        op = _CUDA_OPS.get(kernel, kernel.replace("_kernel", ""))
        rows.append(Row("cuda", op, stream, dtype, kernel, "256 threads", c.per_iteration, groups[stream],
                        c.barriers, **res))  # fmt: skip
    return rows


def triton_compiled_here() -> List[dict]:
    """The report's Triton variants of the importable zo_kernels, compiled: row fields plus the cubin (hex).

    Runs in a worker (its working directory: the tree measured) whose ``zo_kernels`` may be another
    tree's, so it only compiles; the SASS is read by the caller, with this tree's counting. The variants
    are that tree's ``tools/triton_variants.py``, or ``zo_kernels.kernels.triton.variants`` in trees
    from before it moved out of the package.
    """
    tools = os.path.join(os.getcwd(), "tools")
    if os.path.exists(os.path.join(tools, "triton_variants.py")):
        sys.path.insert(0, tools)
        import triton_variants as tv
    else:
        from zo_kernels.kernels.triton import variants as tv  # trees from before the move

    out, seen = [], set()
    for v in tv.variants():
        dtype = str(v.dtype).replace("torch.", "")
        signs = dict(v.constexprs).get("SIGNS", 1)
        if v.op not in TRITON_OPS or dtype not in REPORT_DTYPES or v.index != tv.INDEX_WIDTHS[0]:
            continue
        if (v.weights is not None and str(v.weights) != "torch.float32") or (v.op == "perturb_rows" and signs != 2):
            continue
        align = getattr(v, "align", 1)  # trees before the aligned variants have none
        config = f"BLOCK {v.block}, {v.num_warps} warps" + (f", {align}-element vectors" if align > 1 else "")
        if (v.op, v.stream, dtype, config) in seen:
            continue
        seen.add((v.op, v.stream, dtype, config))
        c = tv.compile_variant(v)
        out.append({
            "op": v.op, "stream": v.stream, "dtype": dtype, "kernel": c.kernel_name, "config": config,
            "elements": v.elements_per_thread, "registers": c.registers, "spills": c.spill_stores + c.spill_loads,
            "stack": c.stack, "cubin": c.cubin.hex(),
        })  # fmt: skip
    return out


def triton_rows(root: str) -> List[Row]:
    """Rows for ``root``'s Triton kernels, compiled in a fresh interpreter (the kernels are read at import)."""
    from sass import count, disassemble

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "compiled.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--compile-triton", path]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        if out.returncode != 0:
            raise RuntimeError(f"Triton compilation of {root} failed:\n{out.stderr[-4000:]}")
        with open(path, encoding="utf-8") as fh:
            compiled = json.load(fh)
    rows = []
    for c in compiled:
        n = count(disassemble(bytes.fromhex(c.pop("cubin")))[c["kernel"]])
        rows.append(Row("triton", per_iteration=n.per_iteration, barriers=n.barriers, **c))
    return rows


def measure(root: str) -> List[Row]:
    """Every row of the tree at ``root`` (a tree whose Triton kernels do not compile gets CUDA rows only)."""
    rows = cuda_rows(root)
    try:
        rows += triton_rows(root)
    except RuntimeError as exc:
        print(f"{root}: no Triton rows: {str(exc)[:600]}", file=sys.stderr)
    return sorted(rows, key=lambda r: (r.op, r.stream, r.dtype, r.backend, r.config))


# --- the report -----------------------------------------------------------------------------------


def _fmt_row(r: Row, before: Optional[Row]) -> str:
    was = f"{before.per_iteration} / {before.per_element:.1f}" if before else "–"
    ratio = f"{before.per_element / r.per_element:.2f}x" if before else "–"
    return (
        f"| {r.backend} | {r.op} | {r.stream} | {r.dtype} | {r.config} | {r.elements} | {was} | "
        f"{r.per_iteration} / {r.per_element:.1f} | {ratio} | {r.barriers} | {r.registers} | {r.spills} | "
        f"{r.stack} | {r.bound:.2e} |"
    )


def best(rows: Iterable[Row]) -> Dict[Tuple[str, str, str, str], Row]:
    """The lowest per-element count per (backend, op, stream, dtype): the config that bounds the kernel."""
    out: Dict[Tuple[str, str, str, str], Row] = {}
    for r in rows:
        k = r.key[:4]
        if k not in out or r.per_element < out[k].per_element:
            out[k] = r
    return out


def _summary(rows: List[Row], before: Optional[List[Row]]) -> List[str]:
    """Per (op, stream, dtype): each backend's best config before and now, and Triton / CUDA."""
    now, was = best(rows), best(before or [])
    lines = [
        "| op | stream | dtype | CUDA before | CUDA now | Triton before | Triton now | Triton / CUDA now "
        "| bound now, CUDA (elements/s) | bound now, Triton (elements/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k[1:] for k in now if k[0] == "triton"} | {(op, s, d) for b, o, s, d in now if b == "cuda"
                  for op in o.split("/")})  # fmt: skip

    def find(table, backend, op, stream, dtype):
        for (b, o, s, d), r in table.items():
            if (b, s, d) == (backend, stream, dtype) and op in o.split("/"):
                return r
        return None

    for op, stream, dtype in keys:
        c, t = find(now, "cuda", op, stream, dtype), find(now, "triton", op, stream, dtype)
        cb, tb = find(was, "cuda", op, stream, dtype), find(was, "triton", op, stream, dtype)
        cells = [f"{r.per_element:.1f}" if r else "–" for r in (cb, c, tb, t)]
        ratio = f"{t.per_element / c.per_element:.2f}x" if c and t else "–"
        bounds = [f"{r.bound:.2e}" if r else "–" for r in (c, t)]
        lines.append(f"| {op} | {stream} | {dtype} | " + " | ".join(cells + [ratio] + bounds) + " |")
    return lines


def _progression(steps: List[Tuple[str, Optional[List[Row]]]]) -> List[str]:
    """Instructions per element of the reduce kernels at each measured revision, oldest first."""
    cols = [(b, s, d) for b in ("cuda", "triton") for s in STREAMS for d in REPORT_DTYPES]
    lines = [
        "| revision | " + " | ".join(f"{b} reduce {s} {d}" for b, s, d in cols) + " | triton reduce normal bar.sync |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for label, rows in steps:
        if rows is None:
            lines.append(f"| {label} | " + " | ".join(["failed to build"] * (len(cols) + 1)) + " |")
            continue
        table = best(r for r in rows if "reduce" in r.op.split("/"))
        cells = []
        for b, s, d in cols:
            r = next((r for (kb, _, ks, kd), r in table.items() if (kb, ks, kd) == (b, s, d)), None)
            cells.append(f"{r.per_element:.1f}" if r else "–")
        bar = next((r.barriers for (kb, _, ks, kd), r in table.items() if (kb, ks, kd) == ("triton", "normal",
                    "float32")), None)  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'–' if bar is None else bar} |")
    return lines


def render(rows: List[Row], before: Optional[List[Row]], meta: Dict[str, str],
           steps: Sequence[Tuple[str, Optional[List[Row]]]] = ()) -> str:  # fmt: skip
    """The markdown report: header, method, summary, the revisions measured, and every kernel's row."""
    old = {r.key: r for r in before or []}
    lines = [
        "# SASS instruction counts (offline, sm_90)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        f"- bound: {ISSUE_RATE:.3e} lane-instructions/s ({SMS} SMs x {SCHEDULERS} schedulers x {LANES} lanes x "
        f"{CLOCK_HZ / 1e9:.2f} GHz) / instructions per element",
        "- method: tools/sass_report.py's docstring (shortest path through the hot loop, inner back edges not "
        "taken); per element = per iteration / elements a thread handles per iteration",
        "",
        "## Summary: instructions per element, best config of each kernel",
        "",
        *_summary(rows, before),
        "",
    ]
    if steps:
        lines += ["## Reduce kernels at each measured revision", "", *_progression(list(steps)), ""]
    lines += [
        "## Every kernel",
        "",
        "| backend | op | stream | dtype | config | elements / iter | before: per iter / per element | "
        "per iter / per element | before / now | bar.sync | registers | spills (B) | stack (B) | bound (elements/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_fmt_row(r, old.get(r.key)) for r in rows]
    return "\n".join(lines) + "\n"


def to_json(rows: List[Row]) -> dict:
    """What bench/reduce_kernels.py reads: the best config per (backend, op, stream, dtype)."""
    kernels = []
    for r in best(rows).values():
        for op in r.op.split("/"):  # the CUDA reduce and step share one kernel
            kernels.append({
                "backend": r.backend, "op": op, "stream": r.stream, "dtype": r.dtype, "kernel": r.kernel,
                "config": r.config, "instructions_per_element": r.per_element, "bound_per_s": r.bound,
                "registers": r.registers, "spills": r.spills,
            })  # fmt: skip
    return {"issue_rate": ISSUE_RATE, "kernels": kernels}


def _worktree(rev: str) -> str:
    path = tempfile.mkdtemp(prefix="sass-before-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
    return path


def _versions() -> Dict[str, str]:
    import triton
    from sass import tool

    nvcc = subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"triton": triton.__version__, "nvcc": nvcc[-1] if nvcc else "?"}


def _label(rev: str) -> str:
    out = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s", rev], capture_output=True, text=True)
    text = out.stdout.strip() or rev
    return text if len(text) <= 72 else text[:69] + "..."


def measure_revision(rev: str) -> Optional[List[Row]]:
    """The rows of git revision ``rev`` (a temporary worktree), or None where it does not build."""
    tree = _worktree(rev)
    try:
        return measure(tree)
    except (subprocess.CalledProcessError, RuntimeError, ValueError) as exc:
        print(f"{rev}: {type(exc).__name__}: {str(exc)[:400]}", file=sys.stderr)
        return None
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Measure this tree (and ``--before`` revisions), print the report and write the markdown and JSON files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--before",
        nargs="*",
        default=[],
        metavar="REV",
        help="git revisions to measure too, oldest first; the first is the 'before' column",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sass.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "sass.json"))
    parser.add_argument("--compile-triton", metavar="PATH", help=argparse.SUPPRESS)  # the worker of triton_rows
    args = parser.parse_args(argv)
    if args.compile_triton:  # the zo_kernels on PYTHONPATH is the tree being measured
        with open(args.compile_triton, "w", encoding="utf-8") as fh:
            json.dump(triton_compiled_here(), fh)
        return
    rows = measure(ROOT)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "tree": f"{head.stdout.strip()} (the working tree)",
        **_versions(),
    }
    steps = [(_label(rev), measure_revision(rev)) for rev in args.before]
    if steps:
        meta["before"] = steps[0][0]
        steps.append(("now: " + meta["tree"], rows))
    text = render(rows, steps[0][1] if steps else None, meta, steps)
    print(text)
    for path, content in ((args.out, text), (args.json, json.dumps(to_json(rows), indent=1) + "\n")):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(content)


if __name__ == "__main__":
    main()
