"""The fused ``reduce`` kernels against plain PyTorch and against generating the noise alone; on a GPU, the SASS bound.

    python bench/reduce_kernels.py [--quick] [--out bench/results/cpu.md]                   # the CPU
    python bench/reduce_kernels.py [--quick] --out bench/results/gpu.md [--sass SASS.json]  # with a GPU: the GPU

``grad += Σ_i w_i z_i`` (N samples of n elements; Normal, Rademacher) by each backend of the device (CPU: ``cpu``,
else ``reference``; GPU: ``cuda``, ``triton``) against the fastest plain-PyTorch generation into chunks of samples +
``addmv_`` (CPU: 1 and 8 samples, GPU: ≤ 1 GiB) and against that generation alone. CPU: float32, N = 64, n = 1e6
(``--quick``: 8, 1e5); GPU: float32 and bfloat16, N ∈ {256, 1024} × n ∈ {1e6, 1e7, 1e8} (``--quick``: the target
point), peak memory and % of sass.json's ``bound_per_s`` (``tools/sass_report.py``). Targets at the target point (met /
NOT met / not checked): CPU: the Normal reduce ≥ 1.00x generation alone; GPU: issue 11's (bench/README.md). ``--out``
also writes the numbers as JSON beside the report.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch
from harness import fmt_bytes, fmt_ratio

from zo_kernels import backends

SEED = 7
STREAMS = ("normal", "rademacher")
CHUNK_BYTES = 1 << 30  # on a GPU the baselines hold at most 1 GiB of float32 noise at a time
BASELINE_MAX_ELEMENTS = 1024 * 10**7  # larger N*n: the baseline is not run (seconds per call)
GPU_POINT, SASS_FRACTION, TRITON_VS_CUDA = (1024, 10**7), 0.85, 1.5  # the targets of issue 11
VS_BASELINE = {"normal": 0.9, "rademacher": 5.0}
NO_SASS = "no SASS bound recorded"
COLUMNS = ("N", "n", "dtype", "stream", "backend", "time", "elements/s", "% of SASS bound",
           "baseline (fastest plain PyTorch)", "baseline time", "speed vs baseline", "generation alone",
           "speed vs generation alone", "peak mem ours", "peak mem baseline", "triton / cuda time",
           "targets")  # fmt: skip
#: Ways to fill a (rows, n) buffer with a stream's noise: label, fill, and whether it gives {0, 1} (then the sum is
#: ``2 (w @ z) - Σw``, without a pass over z).
FILLS = {
    "normal": [("normal_", lambda z: z.normal_(), False)],
    "rademacher": [("bernoulli_(0.5)·2−1", lambda z: z.bernoulli_(0.5).mul_(2.0).sub_(1.0), False),
                   ("random_(0, 2)·2−1", lambda z: z.random_(0, 2).mul_(2.0).sub_(1.0), False),
                   ("random_(0, 2) (2·w @ z − Σw)", lambda z: z.random_(0, 2), True)],
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One reduce configuration: N samples of n elements, the gradient's dtype, the noise stream."""

    num: int
    n: int
    dtype: str
    stream: str


@dataclass
class Timing:
    """One measured contender of a case: median milliseconds, extra bytes allocated during a call, or why not."""

    label: str
    ms: Optional[float] = None
    peak_bytes: Optional[int] = None
    note: str = ""


def load_sass(path: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    """The parsed sass.json and a line saying where it came from (or why there is none)."""
    try:
        data = json.loads(Path(path).read_text())
        return data, f"SASS bounds: {path} ({len(data['kernels'])} kernels, issue rate {data['issue_rate']:.4g}/s)"
    except (OSError, ValueError, KeyError, TypeError) as exc:  # tools/sass_report.py writes it
        return None, f"SASS bounds: {NO_SASS} ({path}: {type(exc).__name__}: {exc})"


def sass_bound(sass: Optional[Dict[str, Any]], backend: str, stream: str, dtype: str) -> Optional[Tuple[float, int]]:
    """(elements/s, variants) of the best recorded reduce kernel of this combination (the strictest percentage)."""
    bounds = [float(k["bound_per_s"]) for k in (sass or {}).get("kernels", []) if isinstance(k, dict)
              and (k.get("backend"), k.get("op"), k.get("stream"), k.get("dtype")) == (backend, "reduce", stream, dtype)
              and isinstance(k.get("bound_per_s"), (int, float)) and k["bound_per_s"] > 0]  # fmt: skip
    return (max(bounds), len(bounds)) if bounds else None


def fmt_n(n: int) -> str:
    """``10000000`` as ``1e7``."""
    text = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if float(text) == n else f"{n:,}"


Results = Dict[Case, Tuple[Dict[str, Timing], Timing, Timing]]  # per case: each backend, the baseline, generation


def report(results: Results, sass: Optional[Dict[str, Any]], point: Tuple[int, int], gpu: bool) -> List[str]:
    """The table, then every target checked at ``point`` (N, n) with a count line."""
    rows: List[List[str]] = []
    targets: List[Tuple[str, str, Optional[bool]]] = []
    for case, (timings, base, alone) in results.items():
        primary = next((b for b in ("cuda", "triton") if b in timings), next(iter(timings), None))
        for name, t in timings.items():
            row = [str(case.num), fmt_n(case.n), case.dtype, case.stream, name]
            if t.ms is None:
                rows.append(row + [t.note or "not measured"] + [""] * 11)
                continue
            rate = case.num * case.n / (t.ms * 1e-3)
            bound = sass_bound(sass, name, case.stream, case.dtype)
            pct = rate / bound[0] if bound else None
            speed = base.ms / t.ms if base.ms is not None else None
            vs_alone = alone.ms / t.ms if alone.ms is not None else None
            cuda = timings.get("cuda")
            vs_cuda = t.ms / cuda.ms if name == "triton" and cuda is not None and cuda.ms else None
            checks: List[Tuple[str, Optional[bool], str, str]] = []
            if (case.num, case.n) == point and gpu:
                checks.append((f"≥ {SASS_FRACTION:.0%} of SASS bound", None if pct is None else pct >= SASS_FRACTION,
                               f"{pct:.0%}" if pct is not None else "", NO_SASS))  # fmt: skip
                if name == primary:
                    need = VS_BASELINE[case.stream]
                    checks.append((f"≥ {need:g}x baseline", None if speed is None else speed >= need,
                                   f"{speed:.2f}x" if speed is not None else "", base.note or "baseline not measured"))
                if t.peak_bytes is not None:
                    checks.append(("O(n) memory (≤ 4n bytes)", t.peak_bytes <= 4 * case.n, fmt_bytes(t.peak_bytes), ""))
                if name == "triton":
                    checks.append((f"≤ {TRITON_VS_CUDA:g}x cuda time", None if vs_cuda is None
                                   else vs_cuda <= TRITON_VS_CUDA, f"{vs_cuda:.2f}x" if vs_cuda else "",
                                   "cuda not measured"))  # fmt: skip
            elif (case.num, case.n) == point and case.stream == "normal":
                checks.append(("≥ 1.00x generation alone", None if vs_alone is None else vs_alone >= 1.0,
                               f"{vs_alone:.2f}x" if vs_alone is not None else "", alone.note))  # fmt: skip
            cells = [f"{what}: not checked ({why})" if ok is None else f"{what}: {'met' if ok else 'NOT met'} ({value})"
                     for what, ok, value, why in checks]  # fmt: skip
            label = f"{name} {case.stream} {case.dtype} N={case.num} n={fmt_n(case.n)}"
            targets += [(label, cell, check[1]) for cell, check in zip(cells, checks)]
            sass_cell = NO_SASS if bound is None else f"{pct:.0%}" + (f" (best of {bound[1]})" if bound[1] > 1 else "")
            alone_rate = f"{alone.label}: {case.num * case.n / (alone.ms * 1e-3) / 1e9:.3g} G/s" if alone.ms else ""
            rows.append(row + [
                harness.fmt_time(t.ms * 1e-3), f"{rate / 1e9:.3g} G/s", sass_cell if gpu else "",
                base.label or base.note, harness.fmt_time(base.ms * 1e-3) if base.ms is not None else base.note,
                fmt_ratio(speed) if speed is not None else "", alone_rate or alone.note,
                fmt_ratio(vs_alone) if vs_alone is not None else "", fmt_bytes(t.peak_bytes),
                fmt_bytes(base.peak_bytes),
                (f"{vs_cuda:.2f}x" if vs_cuda is not None else "cuda not measured") if name == "triton" else "",
                "; ".join(cells),
            ])  # fmt: skip
    count = {ok: sum(t[2] is ok for t in targets) for ok in (True, False, None)}
    summary = (f"Targets at N = {point[0]}, n = {fmt_n(point[1])}: {count[True]} met, {count[False]} NOT met, "
               f"{count[None]} not checked.")  # fmt: skip
    return harness.table(COLUMNS, rows) + ["", summary] + [f"- {label}: {text}" for label, text, _ in targets]


Calls = Dict[str, Callable[[], None]]


def baselines(stream: str, grad: torch.Tensor, weights: torch.Tensor, chunks: Sequence[int]) -> Tuple[Calls, Calls]:
    """Plain-PyTorch ways to ``grad += Σ_i w_i z_i`` (noise in chunks of samples, then ``addmv_``), and the same
    generation alone, each by label."""
    n, num, device = grad.numel(), weights.numel(), grad.device
    summed: Calls = {}
    alone: Calls = {}
    for chunk in chunks:
        for label, fill, bits in FILLS[stream]:

            def run(fill: Callable[[torch.Tensor], torch.Tensor] = fill, bits: bool = bits, chunk: int = chunk,
                    accumulate: bool = True) -> None:  # fmt: skip
                buf = torch.empty(chunk, n, device=device)
                acc = grad if grad.dtype == torch.float32 else torch.zeros(n, device=device)  # float32 sums
                for lo in range(0, num, chunk):
                    w = weights[lo : lo + chunk]
                    z = fill(buf[: w.numel()])
                    if accumulate and bits:
                        acc.addmv_(z.t(), w, alpha=2.0).sub_(w.sum())
                    elif accumulate:
                        acc.addmv_(z.t(), w)
                if accumulate and acc is not grad:
                    grad.add_(acc)

            summed[f"{label} in {chunk} × n chunks, addmv_"] = run
            if not bits and chunk == max(chunks):
                alone[f"{label} in {chunk} × n chunks"] = lambda run=run: run(accumulate=False)
    return summed, alone


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def timed(label: str, fn: Callable[[], Any], device: torch.device, budget_s: float, peak: bool = True) -> Timing:
    """A first call (compilation, autotuning) outside the numbers, then the peak and the median time."""
    try:
        fn()
        peak_b = peak_bytes(fn, device) if peak else None
        return Timing(label, harness.time_call(fn, device, budget_s) * 1e3, peak_b)
    except Exception as exc:  # one failing contender must not cost the report
        traceback.print_exc()
        return Timing(label, note=f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")


def fastest(candidates: Calls, device: torch.device, budget_s: float) -> Timing:
    """The fastest candidate (its peak memory measured too), or a note of why none was measured."""
    measured = [timed(label, fn, device, budget_s, peak=False) for label, fn in candidates.items()]
    done = [t for t in measured if t.ms is not None]
    if not done:
        return Timing("", note="; ".join(t.note for t in measured))
    best = min(done, key=lambda t: t.ms or 0.0)
    best.peak_bytes = peak_bytes(candidates[best.label], device)
    return best


def measure_case(case: Case, names: Sequence[str], device: torch.device,
                 budget_s: float) -> Tuple[Dict[str, Timing], Timing, Timing]:  # fmt: skip
    """Every backend's reduce on one case, the fastest baseline and the fastest generation alone."""
    grad = torch.zeros(case.n, dtype=getattr(torch, case.dtype), device=device)
    weights, ids = torch.randn(case.num, device=device), torch.arange(case.num, device=device)
    timings = {name: timed(name, lambda b=backends.get(name): b.reduce(grad, weights, ids, case.stream, SEED, 0),
                           device, budget_s) for name in names}  # fmt: skip
    if case.num * case.n > BASELINE_MAX_ELEMENTS:
        skipped = Timing("", note=f"not run: N·n > {BASELINE_MAX_ELEMENTS:.0e}")
        return timings, skipped, skipped
    cap = max(1, min(case.num, CHUNK_BYTES // (4 * case.n)))
    summed, alone = baselines(case.stream, grad, weights, [cap] if device.type == "cuda" else [1, min(8, case.num)])
    return timings, fastest(summed, device, budget_s), fastest(alone, device, budget_s)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure every case of the device, print the report and write it (and its JSON) to ``--out``."""
    parser = harness.parser(__doc__, "also write the report to this markdown file (and the numbers as .json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where there is a GPU, else cpu")
    parser.add_argument("--sass", type=Path, default=harness.ROOT / "bench" / "results" / "sass.json",
                        help="GPU: the SASS bounds (tools/sass_report.py's JSON)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = [name for name, status in backends.available().items() if status == "available"]
    gpu = device.type == "cuda"
    if gpu:
        names = [name for name in ("cuda", "triton") if name in available]
        if not names:
            sys.exit(f"no GPU backend is available: {backends.available()}")
        point, dtypes, budget_s = GPU_POINT, ("float32", "bfloat16"), 0.0
        sizes = [point] if args.quick else [(k, n) for k in (256, 1024) for n in (10**6, 10**7, 10**8)]
        props = torch.cuda.get_device_properties(device)
        device_line = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    else:
        backend, backend_note = harness.choose_backend()
        names, device_line = [backend], f"{harness.device_name(device)}; backend: {backend_note}"
        point, dtypes, budget_s = ((8, 10**5) if args.quick else (64, 10**6)), ("float32",), 0.5 if args.quick else 6.0
        sizes = [point]
    sass, sass_line = load_sass(args.sass) if gpu else (None, "")
    run = harness.Run()
    results: Results = {}
    for case in [Case(k, n, d, s) for k, n in sizes for d in dtypes for s in STREAMS]:
        print(f"reduce_kernels.py: reduce {case}", file=sys.stderr, flush=True)
        results[case] = measure_case(case, names, device, budget_s)
        if gpu:
            torch.cuda.empty_cache()
    fields = [
        ("device", device_line),
        *run.fields("triton", torch_extra=f" (CUDA {torch.version.cuda})" if gpu else ""),
        ("mode", f"{'quick' if args.quick else 'full'}; backends: {', '.join(names)}; elements/s = N·n / time"),
        ("timing", harness.timing_note(budget_s) if not gpu else "median of `triton.testing.do_bench` (warmup 25 ms, "
         "rep 100 ms, L2 flushed); peak mem = torch.cuda.max_memory_allocated during one call minus what was "
         "allocated before it"),
    ]  # fmt: skip
    if gpu:
        fields.append(("", sass_line))
    lines = harness.header(f"zo_kernels reduce kernels ({'GPU' if gpu else 'CPU'}, `bench/reduce_kernels.py`)", fields)
    lines += report(results, sass, point, gpu) + ["", run.footer()]
    harness.write(args.out, lines, echo=True)
    if args.out:
        data = [{**dataclasses.asdict(case), "contender": name, **dataclasses.asdict(t)}
                for case, (timings, base, alone) in results.items()
                for name, t in [*timings.items(), ("baseline", base), ("generation", alone)]]
        args.out.with_suffix(".json").write_text(json.dumps({"reduce": data}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
