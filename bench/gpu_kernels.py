"""GPU benchmark of zo_kernels: the fused reduce kernels against plain PyTorch and their SASS bound, and full steps.

Run on a machine with a CUDA GPU (``bench/gpu_all.sh`` builds, tests and runs this)::

    python bench/gpu_kernels.py [--quick] [--out bench/results/gpu.md] [--sass bench/results/sass.json]

Kernel times are medians of ``triton.testing.do_bench`` (L2 flushed between runs); peak memory is
``torch.cuda.max_memory_allocated`` during one call, above what was allocated before it. Every
ratio compares numbers measured in this run on this GPU. ``--out`` also writes the raw numbers as
JSON next to the report (``gpu.md`` -> ``gpu.json``).

1. ``reduce`` (``grad += sum_i w_i z_i`` over N samples of n elements) of the ``cuda`` and ``triton``
   backends, Normal and Rademacher streams, float32 and bfloat16 gradients, against the fastest
   plain-PyTorch way to the same sum (noise materialized in chunks of at most 1 GiB, then a matrix-vector
   product), and against the SASS bound of ``bench/results/sass.json`` (``bench/sass_report.py``:
   the GPU's instruction issue rate over the kernel's instructions per element).
   Targets (issue 11), at N = 1024, n = 1e7, each a ratio in the table and a met / NOT met computed
   from it: the fused reduce reaches >= 85% of its SASS bound (both streams, both backends); the
   default backend is >= 0.9x as fast as the randn + matmul baseline (Normal) and >= 5x (Rademacher)
   with O(n) memory (peak <= 4n bytes) where the baseline holds O(chunk*n); Triton within 1.5x of
   CUDA. Why 0.9x and not more: on an H200 the accurate Box-Muller stream is bound at about
   4.4-4.8e11 normals/s by instruction issue, while randn + matmul is bound by writing memory at
   about 5e11 normals/s, so with accurate normals the fused kernel cannot be several times faster;
   its gain is the memory.
2. A full gradient step (forward + ES backward, every ``.grad`` written) for each method on the CPU
   benchmark's MLP (1024-256-10; full run: also a 4-layer MLP of 4.2M parameters), against TorchOpt
   0.7.3 when it is installed and the plain-PyTorch antithetic step of ``bench/baselines.py``, with the
   peak GPU memory of each.

The table-building functions (:func:`reduce_report`, :func:`step_report`, :func:`sass_bound`) are
pure: ``tests/test_gpu_kernels.py`` feeds them a fake sass.json and fake timings without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch
from baselines import TORCHOPT_MISSING, import_torchopt, torch_matmul_step, torchopt_zero_order
from harness import CpuMeter, Meter, fmt_bytes, table

import zo_kernels
from zo_kernels import backends, distributions

DEFAULT_SASS = harness.ROOT / "bench" / "results" / "sass.json"
SIGMA = 0.01
SEED = 7
METHODS = ("naive", "forward", "antithetic")
STREAMS = ("normal", "rademacher")
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHUNK_BYTES = 1 << 30  # the baselines materialize at most 1 GiB of float32 noise at a time
BASELINE_MAX_ELEMENTS = 1024 * 10**7  # larger N*n: the baseline is not run (it would take seconds per call)

#: The point of the targets, and the targets (issue 11).
TARGET_POINT = (1024, 10**7)
SASS_FRACTION = 0.85
VS_BASELINE = {"normal": 0.9, "rademacher": 5.0}
TRITON_VS_CUDA = 1.5
NO_SASS = "no SASS bound recorded"


# --------------------------------------------------------------------------------------------------
# Results (plain data: what the pure report functions take)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One reduce configuration: N samples of n elements, the gradient's dtype, the noise stream."""

    num: int
    n: int
    dtype: str
    stream: str


@dataclass
class Timing:
    """One measured contender of a case: median milliseconds and the extra bytes allocated during a call."""

    label: str
    ms: Optional[float] = None
    peak_bytes: Optional[int] = None
    note: str = ""  # why it has no numbers (skipped, failed)


@dataclass
class ReduceResults:
    """Section 1: per case, each backend's timing and the fastest baseline's."""

    kernels: Dict[Case, Dict[str, Timing]] = dataclasses.field(default_factory=dict)
    baselines: Dict[Case, Timing] = dataclasses.field(default_factory=dict)


@dataclass
class StepResult:
    """Section 2: one (model, N, method) with ours, TorchOpt and the plain-PyTorch step."""

    model: str
    params: int
    num: int
    method: str
    ours: Timing
    torchopt: Timing
    plain: Timing


# --------------------------------------------------------------------------------------------------
# SASS bounds (bench/results/sass.json)
# --------------------------------------------------------------------------------------------------


def load_sass(path: Optional[Path]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The parsed sass.json and a line saying where it came from (or why there is none)."""
    if path is None or not Path(path).exists():
        return None, f"SASS bounds: {NO_SASS} ({path} not found; bench/sass_report.py writes it)"
    try:
        data = json.loads(Path(path).read_text())
        kernels = data["kernels"]
        assert isinstance(kernels, list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        return None, f"SASS bounds: {NO_SASS} ({path} unreadable: {type(exc).__name__}: {exc})"
    rate = data.get("issue_rate")
    rate_text = f"issue rate {rate:.4g} instructions/s" if isinstance(rate, (int, float)) else "issue rate not given"
    return data, f"SASS bounds: {path} ({len(kernels)} kernels, {rate_text})"


def sass_bound(
    sass: Optional[Dict[str, Any]], backend: str, op: str, stream: str, dtype: str
) -> Optional[Tuple[float, int]]:
    """(elements per second, variants) of the fastest recorded kernel for this combination, or None.

    Several entries can match (a Triton kernel has one per autotune configuration); the highest
    bound is used, which makes the percentage the strictest.
    """
    if not sass:
        return None
    bounds = [
        float(k["bound_per_s"])
        for k in sass.get("kernels", [])
        if isinstance(k, dict)
        and (k.get("backend"), k.get("op"), k.get("stream"), k.get("dtype")) == (backend, op, stream, dtype)
        and isinstance(k.get("bound_per_s"), (int, float))
        and k["bound_per_s"] > 0
    ]
    return (max(bounds), len(bounds)) if bounds else None


# --------------------------------------------------------------------------------------------------
# Formatting and the pure report functions
# --------------------------------------------------------------------------------------------------


def fmt_kernel_ms(ms: Optional[float]) -> str:
    """Milliseconds with three significant digits (``harness.fmt_time``); empty for None."""
    return "" if ms is None else harness.fmt_time(ms * 1e-3)


def fmt_gps(per_s: float) -> str:
    """Elements per second in G/s, three significant digits."""
    return f"{per_s / 1e9:.3g} G/s"


def fmt_n(n: int) -> str:
    """``10000000`` as ``1e7``."""
    text = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if float(text) == n else f"{n:,}"


def target_cell(name: str, ok: Optional[bool], value: str, why: str = "") -> str:
    """One target's cell text: ``name: met (value)``, ``NOT met``, or ``not checked (why)``."""
    if ok is None:
        return f"{name}: not checked ({why})"
    return f"{name}: {'met' if ok else 'NOT met'} ({value})"


@dataclass(frozen=True)
class Target:
    """One target instance at the target point, for the summary list under the table."""

    row: str
    text: str
    ok: Optional[bool]


def primary_backend(names: Sequence[str]) -> Optional[str]:
    """The backend zero_order uses for CUDA tensors: cuda when it is there, else triton."""
    for name in ("cuda", "triton"):
        if name in names:
            return name
    return names[0] if names else None


def reduce_report(results: ReduceResults, sass: Optional[Dict[str, Any]]) -> Tuple[List[str], List[Target]]:
    """Section 1's table and the targets checked at the target point, from measured (or fake) numbers."""
    columns = (
        "N",
        "n",
        "dtype",
        "stream",
        "backend",
        "time",
        "elements/s",
        "% of SASS bound",
        "baseline (fastest plain PyTorch)",
        "baseline time",
        "speed vs baseline",
        "peak mem ours",
        "peak mem baseline",
        "triton / cuda time",
        "targets (N = 1024, n = 1e7)",
    )
    rows: List[List[str]] = []
    targets: List[Target] = []
    for case, timings in results.kernels.items():
        base = results.baselines.get(case, Timing("", note="not measured"))
        primary = primary_backend(list(timings))
        at_target = (case.num, case.n) == TARGET_POINT
        for name, t in timings.items():
            label = f"{name} {case.stream} {case.dtype} N={case.num} n={fmt_n(case.n)}"
            row = [str(case.num), fmt_n(case.n), case.dtype, case.stream, name]
            if t.ms is None:
                rows.append(row + [t.note or "not measured"] + [""] * 9)
                continue
            rate = case.num * case.n / (t.ms * 1e-3)
            bound = sass_bound(sass, name, "reduce", case.stream, case.dtype)
            pct = rate / bound[0] if bound else None
            pct_cell = NO_SASS if bound is None else f"{pct:.0%}" + (f" (best of {bound[1]})" if bound[1] > 1 else "")
            speed = base.ms / t.ms if base.ms is not None else None
            cuda = timings.get("cuda")
            vs_cuda = t.ms / cuda.ms if name == "triton" and cuda is not None and cuda.ms else None
            if name == "triton":
                vs_cuda_cell = f"{vs_cuda:.2f}x" if vs_cuda is not None else "cuda not measured"
            else:
                vs_cuda_cell = ""
            checks: List[Tuple[str, Optional[bool], str, str]] = []
            if at_target:
                checks.append(
                    (f"≥ {SASS_FRACTION:.0%} of SASS bound", None if pct is None else pct >= SASS_FRACTION,
                     f"{pct:.0%}" if pct is not None else "", NO_SASS)
                )  # fmt: skip
                if name == primary:
                    need = VS_BASELINE[case.stream]
                    checks.append(
                        (f"≥ {need:g}x baseline", None if speed is None else speed >= need,
                         f"{speed:.2f}x" if speed is not None else "", base.note or "baseline not measured")
                    )  # fmt: skip
                if t.peak_bytes is not None:
                    checks.append(("O(n) memory (≤ 4n bytes)", t.peak_bytes <= 4 * case.n, fmt_bytes(t.peak_bytes), ""))
                if name == "triton":
                    checks.append(
                        (f"≤ {TRITON_VS_CUDA:g}x cuda time", None if vs_cuda is None else vs_cuda <= TRITON_VS_CUDA,
                         f"{vs_cuda:.2f}x" if vs_cuda is not None else "", "cuda not measured")
                    )  # fmt: skip
            cells = [target_cell(*check) for check in checks]
            targets += [Target(label, cell, check[1]) for cell, check in zip(cells, checks)]
            rows.append(
                row
                + [
                    fmt_kernel_ms(t.ms),
                    fmt_gps(rate),
                    pct_cell,
                    base.label or base.note,
                    fmt_kernel_ms(base.ms) if base.ms is not None else base.note,
                    f"{speed:.2f}x" if speed is not None else "",
                    fmt_bytes(t.peak_bytes),
                    fmt_bytes(base.peak_bytes),
                    vs_cuda_cell,
                    "; ".join(cells),
                ]
            )
    return table(columns, rows), targets


def target_summary(targets: Sequence[Target]) -> List[str]:
    """The list of every checked target and a count line."""
    met = sum(t.ok is True for t in targets)
    missed = sum(t.ok is False for t in targets)
    unchecked = sum(t.ok is None for t in targets)
    lines = [f"Targets at N = {TARGET_POINT[0]}, n = {fmt_n(TARGET_POINT[1])}: {met} met, {missed} NOT met, "
             f"{unchecked} not checked."]  # fmt: skip
    lines += [f"- {t.row}: {t.text}" for t in targets]
    return lines


def step_report(results: Sequence[StepResult]) -> List[str]:
    """Section 2's table: ours, TorchOpt and plain PyTorch per (model, N, method), with peaks and ratios."""
    columns = (
        "model",
        "params",
        "N",
        "method",
        "ours",
        "peak mem ours",
        "TorchOpt",
        "peak mem TorchOpt",
        "TorchOpt / ours",
        "plain PyTorch randn(N, n) + w @ Z",
        "peak mem plain",
        "plain / ours",
    )
    rows = []
    for r in results:
        row = [r.model, f"{r.params:,}", str(r.num), r.method]
        row += [fmt_kernel_ms(r.ours.ms) or r.ours.note, fmt_bytes(r.ours.peak_bytes)]
        for other in (r.torchopt, r.plain):
            ratio = f"{other.ms / r.ours.ms:.2f}x" if other.ms is not None and r.ours.ms else ""
            row += [fmt_kernel_ms(other.ms) if other.ms is not None else other.note, fmt_bytes(other.peak_bytes), ratio]
        rows.append(row)
    return table(columns, rows)


def results_json(reduce: ReduceResults, steps: Sequence[StepResult]) -> Dict[str, Any]:
    """Every number of the run as plain JSON-able data."""
    return {
        "reduce": [
            {**dataclasses.asdict(case), "contender": name, **dataclasses.asdict(t)}
            for case, timings in reduce.kernels.items()
            for name, t in [*timings.items(), ("baseline", reduce.baselines.get(case, Timing("", note="none")))]
        ],
        "step": [dataclasses.asdict(r) for r in steps],
    }


# --------------------------------------------------------------------------------------------------
# Measuring (GPU)
# --------------------------------------------------------------------------------------------------


def gpu_backends() -> List[str]:
    """The GPU backends built and usable here, fastest first."""
    status = backends.available()
    return [name for name in ("cuda", "triton") if status.get(name) == "available"]


def chunk_rows(num: int, n: int) -> int:
    """Samples per materialized chunk: at most 1 GiB of float32 noise."""
    return max(1, min(num, CHUNK_BYTES // (4 * n)))


def baseline_candidates(stream: str, grad: torch.Tensor, weights: torch.Tensor) -> List[Tuple[str, Callable[[], None]]]:
    """Plain-PyTorch ways to ``grad += sum_i w_i z_i``: noise in chunks of <= 1 GiB, then ``addmv_``."""
    n, num = grad.numel(), weights.numel()
    chunk = chunk_rows(num, n)
    device = grad.device
    direct = grad.dtype == torch.float32  # else accumulate in float32 and add once

    def accumulate(make: Callable[[int], torch.Tensor], affine: bool) -> Callable[[], None]:
        def run() -> None:
            acc = grad if direct else torch.zeros(n, dtype=torch.float32, device=device)
            for lo in range(0, num, chunk):
                w = weights[lo : lo + chunk]
                z = make(w.numel())
                if affine:  # z in {0, 1}: sum w (2z - 1) = 2 (w @ z) - sum w, without a pass over z
                    acc.addmv_(z.t(), w, alpha=2.0)
                    acc.sub_(w.sum())
                else:
                    acc.addmv_(z.t(), w)
            if not direct:
                grad.add_(acc)

        return run

    def randn(rows: int) -> torch.Tensor:
        return torch.randn(rows, n, device=device)

    def randint_signs(rows: int) -> torch.Tensor:
        return torch.randint(0, 2, (rows, n), device=device, dtype=torch.float32).mul_(2.0).sub_(1.0)

    def bernoulli_signs(rows: int) -> torch.Tensor:
        return torch.empty(rows, n, device=device).bernoulli_(0.5).mul_(2.0).sub_(1.0)

    def randint_bits(rows: int) -> torch.Tensor:
        return torch.randint(0, 2, (rows, n), device=device, dtype=torch.float32)

    if stream == "normal":
        return [(f"randn({chunk}, n) + addmv_", accumulate(randn, False))]
    return [
        (f"randint(0, 2, ({chunk}, n))·2−1 + addmv_", accumulate(randint_signs, False)),
        (f"bernoulli_(0.5) ({chunk}, n)·2−1 + addmv_", accumulate(bernoulli_signs, False)),
        (f"randint(0, 2, ({chunk}, n)) + 2·addmv_ − Σw", accumulate(randint_bits, True)),
    ]


def measure_reduce(
    cases: Sequence[Case], names: Sequence[str], device: torch.device, meter: Any, log: Callable[[str], None]
) -> ReduceResults:
    """Time every backend and the fastest baseline on every case (a failure is recorded, not raised)."""
    results = ReduceResults()
    for case in cases:
        log(f"reduce {case}")
        results.kernels[case], results.baselines[case] = measure_case(case, names, device, meter)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def measure_case(
    case: Case, names: Sequence[str], device: torch.device, meter: Any
) -> Tuple[Dict[str, Timing], Timing]:
    """Every backend's reduce on one case, and the fastest baseline (its peak memory measured too)."""
    grad = torch.zeros(case.n, dtype=DTYPES[case.dtype], device=device)
    weights = torch.randn(case.num, device=device)
    ids = torch.arange(case.num, device=device)
    timings: Dict[str, Timing] = {}
    for name in names:
        backend = backends.get(name)
        timings[name] = timed(name, lambda b=backend: b.reduce(grad, weights, ids, case.stream, SEED, 0), meter)
    if case.num * case.n > BASELINE_MAX_ELEMENTS:
        return timings, Timing("", note=f"not run: N·n > {BASELINE_MAX_ELEMENTS:.0e}")
    candidates = baseline_candidates(case.stream, grad, weights)
    measured = [timed(label, fn, meter, peak=False) for label, fn in candidates]
    done = [t for t in measured if t.ms is not None]
    if not done:
        return timings, Timing("", note="; ".join(t.note for t in measured))
    best = min(done, key=lambda t: t.ms)
    best.peak_bytes = meter.peak(dict(candidates)[best.label])
    return timings, best


def timed(label: str, fn: Callable[[], Any], meter: Any, peak: bool = True) -> Timing:
    """A first call (compilation, autotuning) outside the numbers, then the peak and the median time."""
    try:
        fn()
        peak_bytes = meter.peak(fn) if peak else None
        return Timing(label, meter.ms(fn), peak_bytes)
    except Exception as exc:  # noqa: BLE001 - one failing contender must not cost the report
        traceback.print_exc()
        return Timing(label, note=f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")


def measure_steps(
    models: Dict[str, Tuple[Sequence[int], int]],
    sample_counts: Sequence[int],
    device: torch.device,
    meter: Any,
    log: Callable[[str], None],
) -> List[StepResult]:
    """Section 2: ours, TorchOpt (when installed) and the plain-PyTorch antithetic step, per point."""
    results = []
    for name, (sizes, batch) in models.items():
        for num in sample_counts:
            for method in METHODS:
                log(f"step {name} N={num} {method}")
                results.append(measure_step(name, sizes, batch, num, method, device, meter))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def measure_step(
    model: str, sizes: Sequence[int], batch: int, num: int, method: str, device: torch.device, meter: Any
) -> StepResult:
    """One point of section 2 on a freshly seeded MLP."""
    torch.manual_seed(0)
    params, loss = harness.mlp(sizes, device)
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randn(batch, sizes[-1], device=device)

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            fn(params, x, y).backward()

        return run

    ours = zo_kernels.zero_order(distributions.Normal(), method=method, num_samples=num, sigma=SIGMA)(loss)
    t_ours = timed("zo_kernels", step(ours), meter)
    torchopt = import_torchopt()
    if torchopt is None:
        t_opt = Timing("TorchOpt", note=TORCHOPT_MISSING)
    else:
        theirs = torchopt_zero_order(torchopt, method, num, SIGMA, device)(loss)
        t_opt = timed("TorchOpt", step(theirs), meter)
    if method == "antithetic":

        def plain() -> None:
            torch_matmul_step(loss, params, x, y, num_samples=num, sigma=SIGMA)

        t_plain = timed("plain PyTorch", plain, meter)
    else:
        t_plain = Timing("plain PyTorch", note="antithetic only")
    return StepResult(model, sum(p.numel() for p in params), num, method, t_ours, t_opt, t_plain)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def reduce_cases(quick: bool) -> List[Case]:
    """The reduce configurations: the target point only with ``--quick``."""
    sizes = [TARGET_POINT] if quick else [(k, n) for k in (256, 1024) for n in (10**6, 10**7, 10**8)]
    return [Case(num, n, dtype, stream) for num, n in sizes for dtype in DTYPES for stream in STREAMS]


def measured_rates(device: torch.device, meter: Any, name: str, numel: int = 1 << 26) -> str:
    """One line: noise generation alone (``sample``) and device copy bandwidth, measured now."""
    try:
        backend = backends.get(name)
        gen = numel / (meter.ms(lambda: backend.sample("normal", 1, 0, 0, numel, device)) * 1e-3)
        a = torch.empty(4 * numel, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        bandwidth = 2 * a.numel() / (meter.ms(lambda: b.copy_(a)) * 1e-3)
        return (f"Measured alongside: `{name}` normal generation alone (`sample` of {numel:,} floats, written to "
                f"memory) {fmt_gps(gen)}; device copy {bandwidth / 1e9:.3g} GB/s (read + write).")  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        return f"Generation rate / copy bandwidth not measured: {type(exc).__name__}: {exc}"


def write(path: Optional[str], lines: Sequence[str]) -> None:
    """Write the report so far (so a run cut short still leaves its finished sections)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run both sections, print the report and write it (and its JSON) to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target point only, one model, N = 100 (~1 min)")
    parser.add_argument("--out", help="also write the report to this markdown file (and the numbers as .json)")
    parser.add_argument("--sass", type=Path, default=DEFAULT_SASS, help="SASS bounds (bench/sass_report.py's JSON)")
    # Tiny sizes on CPU tensors with the CPU backends: runs every line of the script without a GPU (tests).
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models: Dict[str, Tuple[Sequence[int], int]] = {"MLP 1024-256-10": ((1024, 256, 10), 256)}
    if args.cpu_dry_run:
        device, meter = torch.device("cpu"), CpuMeter()
        names = [name for name in ("reference", "cpu") if backends.available().get(name) == "available"]
        cases = [Case(8, 5000, dtype, stream) for dtype in DTYPES for stream in STREAMS]
        models, sample_counts, rate_numel = {"MLP 64-16-10": ((64, 16, 10), 32)}, (4,), 1 << 16
        device_line, timing = "CPU: DRY RUN of the script, the numbers mean nothing", "harness.cpu_time (0.05 s)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu_kernels.py needs a CUDA GPU")
        names = gpu_backends()
        if not names:
            sys.exit(f"no GPU backend is available: {backends.available()}")
        device = torch.device("cuda")
        meter = Meter(device, warmup_ms=25, rep_ms=100)
        cases, sample_counts, rate_numel = reduce_cases(args.quick), (100,) if args.quick else (100, 1000), 1 << 26
        if not args.quick:
            models["4-layer MLP 4.2M"] = ((1024, 1792, 1024, 512, 10), 256)
        props = torch.cuda.get_device_properties(device)
        device_line = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
        timing = f"triton.testing.do_bench (warmup {meter.warmup_ms} ms, rep {meter.rep_ms} ms, L2 flushed)"
    torchopt = import_torchopt()
    mode = "dry run" if args.cpu_dry_run else "quick" if args.quick else "full"
    started = time.perf_counter()

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", file=sys.stderr, flush=True)

    sass, sass_line = load_sass(args.sass)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    fields = [
        ("date", harness.now(utc=True)),
        ("device", device_line),
        ("versions", harness.versions(torchopt, f" (CUDA {torch.version.cuda})", f"triton {triton_version}, ")),
        ("backends", f"{', '.join(names)}; mode: {mode}; times are medians of {timing}; "
                     "peak mem = torch.cuda.max_memory_allocated during one call minus what was allocated before it"),
        ("", f"{sass_line}; elements/s = N·n / time, the unit of bound_per_s"),
    ]  # fmt: skip
    report = harness.header("zo_kernels GPU benchmark", fields) + [
        "## 1. reduce: grad += Σ_i w_i z_i",
        "",
        "Targets (issue 11) at N = 1024, n = 1e7: the fused reduce ≥ 85% of its SASS bound (both streams, both "
        "backends); the default backend ≥ 0.9x the randn + matmul baseline's speed (Normal) and ≥ 5x "
        "(Rademacher), with O(n) memory (peak ≤ 4n bytes) where the baseline holds a chunk of noise; Triton "
        "within 1.5x of CUDA. On an H200 the accurate Box-Muller stream is bound at about 4.4-4.8e11 normals/s "
        "by instruction issue and randn + matmul at about 5e11/s by writing memory, so the fused Normal reduce "
        "is not expected to be several times faster; it saves the chunk's memory. The baseline is the fastest "
        "plain-PyTorch way measured here (Rademacher: the fastest of three), noise in chunks of at most 1 GiB.",
        "",
    ]
    write(args.out, report + ["(running)"])
    reduce = measure_reduce(cases, names, device, meter, log)
    reduce_lines, targets = reduce_report(reduce, sass)
    report += [measured_rates(device, meter, names[0], rate_numel), ""] + reduce_lines
    report += [""] + target_summary(targets)
    write(args.out, report + ["", "(section 2 running)"])
    steps = measure_steps(models, sample_counts, device, meter, log)
    report += [
        "",
        "## 2. gradient step (Normal noise, forward + backward until every .grad is written)",
        "",
        "Ratios are the other's time over ours (> 1: ours is faster). No target: the step's cost is the N "
        "evaluations of the model, the same for every contender.",
        "",
    ]
    report += step_report(steps) + ["", f"Measured in {time.perf_counter() - started:.0f} s."]
    print("\n".join(report))
    if args.out:
        write(args.out, report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results_json(reduce, steps), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
