"""``make bench``: one antithetic ES step of zo_kernels against five baselines, one summary table of ratios, plots.

    python bench/run.py [--quick] [--out-dir bench/results]

On the CPU (and the GPU when there is one), a tanh MLP d → d → 10, batch 64, Normal noise: zo_kernels
``zero_order`` + backward against (a) TorchOpt and (b) plain PyTorch ``randn(N, n)`` + ``w @ Z``;
``estimate(inplace=True)`` + ``ZOSGD`` against (c) MeZO, (d) EvoTorch PGPE and (e) torcheggroll
(bench/README.md says what each computes). Sweeps of N and of the parameter count, the peak memory of one
step per (case, size) in a fresh process. Writes ``summary-<device>[-quick].md`` and three PNG plots.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch
import torch.nn.functional as F
from harness import fmt_mem, fmt_ratio, fmt_time, mlp_loss, sync, table
from harness import wide_mlp_numel as mlp_numel

import zo_kernels
from zo_kernels import distributions
from zo_kernels.optim import ZOSGD

torchopt = harness.optional("torchopt")
METHOD, SIGMA, LR, BATCH = "antithetic", 1e-3, 1e-7, 64  # LR: repeated timing steps barely move the parameters
WORKER_TIMEOUT_S = 180
PLOTS_MISSING = "Plots not drawn: matplotlib not installed."
#: Contender id -> label, plot colour and marker. "inference" (one forward, no_grad) is only measured for memory.
CONTENDERS: Dict[str, Tuple[str, str, str]] = {
    "zo": ("zo_kernels `zero_order` + backward", "tab:blue", "o"),
    "torchopt": ("TorchOpt 0.7.3 `zero_order` + backward", "tab:red", "v"),
    "torch": ("PyTorch `randn(N, n)` + `w @ Z`", "tab:orange", "^"),
    "zo_mezo": ("zo_kernels `estimate(inplace=True)` + `ZOSGD`", "tab:cyan", "s"),
    "mezo": ("MeZO per-parameter `torch.normal` loop", "tab:purple", "D"),
    "evotorch": ("EvoTorch 0.6.1 `PGPE` `searcher.step()`", "tab:green", "P"),
    "torcheggroll": ("torcheggroll 0.2.0 `TorchEggrollES(rank=1).step`", "tab:brown", "*"),
}
MEMORY_CASES = {"inference": ("inference (one forward, no_grad)", "tab:gray", "x"), **CONTENDERS}
#: (baseline, zo_kernels contender, what the row compares)
COMPARISONS = (
    ("torchopt", "zo", "(a) TorchOpt 0.7.3 `torchopt.diff.zero_order`"),
    ("torch", "zo", "(b) plain PyTorch `randn(N, n)` + matmul"),
    ("mezo", "zo_mezo", "(c) MeZO per-parameter `torch.normal` loop, in place"),
    ("evotorch", "zo_mezo", "(d) EvoTorch 0.6.1 `PGPE`, symmetric, raw fitness (same estimate)"),
    ("torcheggroll", "zo_mezo", "(e) torcheggroll 0.2.0 `TorchEggrollES(rank=1)` (rank-1 noise, z-scored)"),
)
ESTIMATORS = (
    "(a) TorchOpt: the antithetic estimate `1/(2σN) Σ (f(θ+σz_i) − f(θ−σz_i)) z_i`, Normal z, raw losses (the same "
    "as zo_kernels); (b) the same with `Z` materialized; (c) MeZO: the same estimate from N seeds, applied as "
    "`θ −= lr·g`.",
    '(d) EvoTorch `PGPE(popsize=2N, symmetric=True, stdev_init=σ, ranking_method="raw", optimizer=None, '
    "center_learning_rate=lr/σ², stdev_learning_rate=0)` on a vectorized problem: center gradient −σ² times the same "
    "raw antithetic estimate, so the update is `θ −= lr·g`, as `ZOSGD`'s; PGPE also computes the (zero-rate) σ "
    'gradient. EvoTorch\'s defaults would be `ranking_method="centered"` and the ClipUp optimizer.',
    "(e) torcheggroll `TorchEggrollES(rank=1, pop_size=2N, antithetic=True)`: rank-1 noise `σ·a bᵀ` on the matrices, "
    "2N members on materialized weights in one vmapped forward, z-scored fitness: a different estimator (EGGROLL); "
    "zo_kernels' own `LowRank(1)` is compared with it in `bench/lowrank.py`.",
)
SUMMARY_COLUMNS = ("device", "baseline", "zo_kernels", "sweep", "MLP d→d→10", "N", "baseline time", "zo_kernels time",
                   "speed-up", "baseline peak mem", "zo_kernels peak mem", "memory ratio")  # fmt: skip


def runnable(memory: bool = False) -> List[str]:
    """The cases this machine can run (the optional ones only where installed)."""
    return [c for c in (MEMORY_CASES if memory else CONTENDERS) if harness.missing(c) is None]


@dataclass(frozen=True)
class Config:
    """Sizes: d of the parameter sweep, d and N of the N sweep, N of the parameter sweep, CPU seconds per point."""

    quick: bool
    widths: Tuple[int, ...]
    sweep_width: int
    sample_counts: Tuple[int, ...]
    param_samples: int
    budget_s: float

    def sweeps(self) -> List[Tuple[str, int, int]]:
        """Every (sweep, width, N) of the summary table."""
        n_sweep = [("N", self.sweep_width, n) for n in self.sample_counts]
        return n_sweep + [("params", w, self.param_samples) for w in self.widths]


FULL = Config(False, (64, 256, 1024, 2048), 1024, (1, 4, 16, 64), 16, 4.0)
QUICK = Config(True, (32, 128), 128, (1, 4), 4, 0.5)


def device_tag(device: torch.device) -> str:
    """A file-name tag: ``cpu``, or ``cuda-`` and the GPU's model (``cuda-h100``)."""
    if device.type != "cuda":
        return device.type
    skip = ("nvidia", "geforce", "tesla", "rtx", "gtx", "quadro")
    words = [w for w in re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower()) if w and w not in skip]
    return "cuda-" + (words[0] if words else "gpu")


def make_step(case: str, problem: harness.Problem, num: int, backend: str) -> Callable[[], None]:
    """A callable that runs one step of ``case`` on ``problem`` (and synchronizes the device)."""
    x, y, device = problem.x, problem.y, problem.x.device
    if harness.missing(case):
        raise RuntimeError(f"case {case!r}: {harness.missing(case)}")
    if case == "zo":
        return harness.grad_step(problem, zo_kernels.zero_order(
            distributions.Normal(), method=METHOD, argnums=0, num_samples=num, sigma=SIGMA, backend=backend)(mlp_loss))
    if case == "torchopt":
        return harness.grad_step(problem, harness.torchopt_zero_order(torchopt, METHOD, num, SIGMA, device)(mlp_loss))
    if case == "torch":
        run = functools.partial(harness.torch_matmul_step, mlp_loss, problem.params, x, y, num_samples=num, sigma=SIGMA)
    elif case == "zo_mezo":
        params = [p.detach().clone() for p in problem.params]  # the in-place contenders' own copy
        optimizer = ZOSGD(params, lr=LR)

        def run() -> None:
            optimizer.step(zo_kernels.estimate(mlp_loss, params, x, y, method=METHOD, num_samples=num, sigma=SIGMA,
                                               inplace=True, backend=backend))  # fmt: skip

    elif case == "mezo":
        mezo = harness.MeZO([p.detach().clone() for p in problem.params], lr=LR, eps=SIGMA, num_samples=num)
        run = functools.partial(mezo.step, mlp_loss, x, y)
    elif case == "evotorch":
        run = harness.EvoTorchPGPE(harness.optional(case), mlp_loss, problem.params, x, y, num_samples=num, sigma=SIGMA,
                                   lr=LR).step  # fmt: skip
    elif case == "torcheggroll":
        w1, b1, w2, b2 = (p.detach() for p in problem.params)
        with torch.device(device):
            module = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.Tanh(),
                                         torch.nn.Linear(w2.shape[1], w2.shape[0]))  # fmt: skip
        module.load_state_dict({"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2})
        run = harness.torcheggroll_step(harness.optional(case), module, x, F.mse_loss, y, num_samples=num, sigma=SIGMA,
                                        lr=LR)
    elif case == "inference":
        run = torch.no_grad()(functools.partial(mlp_loss, problem.params, x, y))
    else:
        raise ValueError(f"unknown case {case!r}")

    def step() -> None:
        if case == "torch":
            for p in problem.params:
                p.grad = None
        run()
        sync(device)

    return step


def memory_case(case: str, width: int, num_samples: int, backend: str, device: torch.device) -> harness.Built:
    """A memory job's ``build``: one step of ``case`` at ``width`` (run in a fresh process by harness.memory_worker)."""
    problem = harness.wide_mlp(width, device, BATCH)
    return make_step(case, problem, num_samples, backend), problem.params


@dataclass
class DeviceResults:
    """Everything measured on one device: step times per (width, N) and case, worker results per width and case."""

    device: torch.device
    backend_note: str
    times: Dict[Tuple[int, int], Dict[str, float]] = field(default_factory=dict)
    memory: Dict[int, Dict[str, Dict[str, Any]]] = field(default_factory=dict)

    def peak(self, width: int, case: str) -> Optional[float]:
        """The measured peak bytes, or None where the point failed or was not measured."""
        return self.memory.get(width, {}).get(case, {}).get("peak")


def measure(cfg: Config, device: torch.device, progress: harness.Progress) -> DeviceResults:
    """Median step time of every contender at every point, then peak memory per (width, case) in fresh processes."""
    backend, note = harness.choose_backend(device)
    res = DeviceResults(device, note)
    for width, num in sorted({(w, n) for _, w, n in cfg.sweeps()}):
        problem = harness.wide_mlp(width, device, BATCH)
        res.times[(width, num)] = times = {}
        for case in runnable():
            progress.show(f"{device.type}: step time, {case}, d={width} ({problem.numel:,} params), N={num}")
            times[case] = harness.time_call(make_step(case, problem, num, backend), device, cfg.budget_s)
            if case in ("zo", "torchopt", "torch"):
                harness.check_grads(problem.params, f"{case} ({problem.name})")
            progress.advance()
        if device.type == "cuda":
            del problem
            torch.cuda.empty_cache()
    points = [(width, case) for width in cfg.widths for case in runnable(memory=True)]
    jobs = [harness.MemoryJob(memory_case, dict(case=case, width=width, num_samples=cfg.param_samples, backend=backend),
                              str(device), name=f"{device.type} {case} d={width}") for width, case in points]
    results = harness.run_memory_jobs(jobs, harness.memory_parallelism(), WORKER_TIMEOUT_S, progress)
    for (width, case), result in zip(points, results):
        res.memory.setdefault(width, {})[case] = result
    return res


def summary_rows(cfg: Config, results: Sequence[DeviceResults]) -> List[List[str]]:
    """One row per (device, baseline, point): speed-up and memory ratio, baseline / zo_kernels."""
    rows = []
    for res in results:
        for base, ours, label in COMPARISONS:
            for sweep, width, num in cfg.sweeps():
                t = res.times[(width, num)]
                row = [device_tag(res.device), label, CONTENDERS[ours][0], sweep,
                       f"d={width}, {mlp_numel(width):,} params", str(num)]  # fmt: skip
                ratio = fmt_ratio(t[base] / t[ours]) if base in t else ""
                row += [fmt_time(t[base]) if base in t else not_run(base), fmt_time(t[ours]), ratio]
                mb, mo = res.peak(width, base), res.peak(width, ours)
                if sweep != "params":
                    row += ["", "", ""]
                elif mb is not None and mo is not None:
                    row += [fmt_mem(mb), fmt_mem(mo), fmt_ratio(mb / mo)]
                else:
                    row += [not_run(base) if harness.missing(base) else "", fmt_mem(mo) if mo is not None else "", ""]
                rows.append(row)
    return rows


def not_run(case: str) -> str:
    """The cell of a case that was not measured here (its package is missing, or it failed)."""
    return harness.missing(case) or "not measured"


def data_tables(cfg: Config, results: Sequence[DeviceResults]) -> List[str]:
    """The numbers behind the plots: every contender's median time and every case's peak memory."""
    lines: List[str] = []
    for res in results:
        tag = device_tag(res.device)
        rows = [[str(w), f"{mlp_numel(w):,}", str(n), *(f"{t[c] * 1e3:,.2f}" if c in t else not_run(c)
                 for c in CONTENDERS)] for (w, n), t in sorted(res.times.items())]  # fmt: skip
        lines += ["", f"### Step time per contender [{tag}] (median, milliseconds)", ""]
        lines += table(["d", "params", "N", *(v[0] for v in CONTENDERS.values())], rows)
        rows = []
        for width, cases in sorted(res.memory.items()):
            cells = [not_run(c) if c not in cases else f"{cases[c]['peak'] / 2**20:,.2f}" if "peak" in cases[c]
                     else f"FAILED: {cases[c].get('error', '?')}" for c in MEMORY_CASES]  # fmt: skip
            rows.append([str(width), f"{mlp_numel(width):,}", *cells])
        lines += ["", f"### Peak memory of one step [{tag}], N={cfg.param_samples} (MiB)", ""]
        lines += table(["d", "params", *(v[0] for v in MEMORY_CASES.values())], rows)
        methods = sorted({r["method"] for cases in res.memory.values() for r in cases.values() if "method" in r})
        lines += ["", f"Memory method: {', '.join(methods) or 'none succeeded'}."]
    return lines


def header_lines(cfg: Config, results: Sequence[DeviceResults], run: harness.Run) -> List[str]:
    """The lines above the summary table."""
    fields = [(f"device [{device_tag(r.device)}]", f"{harness.device_name(r.device)}; backend: {r.backend_note}")
              for r in results]
    fields += [
        *run.fields("evotorch", "torcheggroll"),
        ("mode", "quick (smoke run: tiny sizes, numbers not meaningful)" if cfg.quick else "full"),
        ("problem", f"tanh MLP d→d→10 (`bench/harness.py`'s `mlp_loss`), batch {BATCH}, MSE, float32; "
                    f"{METHOD}, Normal noise, sigma = {SIGMA:g}; N sweep at d = {cfg.sweep_width}, parameter sweep "
                    f"at N = {cfg.param_samples}"),
        ("timing", harness.timing_note(cfg.budget_s)),
        ("", "speed-up = baseline time / zo_kernels time; memory ratio = baseline peak / zo_kernels peak "
             "(> 1: zo_kernels is faster / smaller)"),
        ("peak memory", "each (case, size) in a fresh single-threaded process after one warm-up step "
                        f"(`harness.memory_worker`, {harness.memory_parallelism()} processes at a time); "
                        "GPU: `torch.cuda.max_memory_allocated`; CPU: parameter bytes + growth of the resident set "
                        "during the step (`VmHWM` reset through `/proc/self/clear_refs`, glibc "
                        "`MALLOC_MMAP_THRESHOLD_=65536`), which leaves out the Python/torch runtime"),
    ]  # fmt: skip
    return harness.header("zo_kernels benchmark summary (`make bench`, `bench/run.py`)", fields)


def write_plots(cfg: Config, results: Sequence[DeviceResults], out_dir: Path, prefix: str) -> List[Path]:
    """Time vs N, time vs parameter count, peak memory vs parameter count: log-log, a panel per device."""
    if harness.optional("matplotlib") is None:
        return []

    def times(res: DeviceResults, points: List[Tuple[int, Tuple[int, int]]]) -> List[Any]:
        return [(*CONTENDERS[c], [(x, res.times[key][c]) for x, key in points if c in res.times[key]])
                for c in CONTENDERS]

    def memory(res: DeviceResults) -> List[Any]:
        return [(*MEMORY_CASES[c], [(mlp_numel(w), p / 2**20) for w in cfg.widths if (p := res.peak(w, c)) is not None])
                for c in MEMORY_CASES]

    plots = (
        ("time-vs-samples", f"Time per gradient step vs num_samples N (MLP d={cfg.sweep_width}, "
         f"{mlp_numel(cfg.sweep_width):,} params)", "num_samples N", "seconds per step (median)",
         lambda res: times(res, [(n, (cfg.sweep_width, n)) for n in cfg.sample_counts])),
        ("time-vs-params", f"Time per gradient step vs parameter count (N={cfg.param_samples})", "parameters",
         "seconds per step (median)",
         lambda res: times(res, [(mlp_numel(w), (w, cfg.param_samples)) for w in cfg.widths])),
        ("memory-vs-params", f"Peak memory of one step vs parameter count (N={cfg.param_samples})", "parameters",
         "peak memory (MiB)", memory),
    )  # fmt: skip
    devices = "; ".join(f"[{device_tag(r.device)}] {harness.device_name(r.device)}, backend {r.backend_note}"
                        for r in results)  # fmt: skip
    quick = "QUICK SMOKE RUN, " if cfg.quick else ""
    foot = (f"{devices}\n{harness.versions('evotorch', 'torcheggroll')}; {harness.now()}\n{quick}median time per call "
            f"(harness.time_call, <= {cfg.budget_s:g} s); MLP d→d→10, batch {BATCH}, {METHOD}, sigma={SIGMA:g}; "
            "bench/run.py")
    paths = [out_dir / f"{prefix}-{name}.png" for name, *_ in plots]
    for path, (_, title, xlabel, ylabel, series) in zip(paths, plots):
        panels = [(f"[{device_tag(r.device)}] {harness.device_name(r.device)}", xlabel, ylabel, series(r))
                  for r in results]
        harness.plot(path, f"{title}\n{harness.now()}", foot, panels, floor=MEMORY_CASES["inference"][0])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure every device, print the summary, write the report and the plots."""
    parser = harness.parser(__doc__, out=None)
    parser.add_argument("--out-dir", type=Path, default=harness.ROOT / "bench" / "results", help="report and plots")
    args = parser.parse_args(argv)
    cfg, devices = QUICK if args.quick else FULL, harness.devices()
    prefix = f"summary-{device_tag(devices[-1])}" + ("-quick" if cfg.quick else "")
    per_device = len({(w, n) for _, w, n in cfg.sweeps()}) * len(runnable()) + len(cfg.widths) * len(runnable(True))
    progress = harness.Progress(per_device * len(devices))
    run = harness.Run()
    results = [measure(cfg, device, progress) for device in devices]
    progress.close()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(cfg, results, args.out_dir, prefix)
    footer = run.footer()
    head = header_lines(cfg, results, run) + ["## Summary: ratios against the baselines", ""]
    head += table(SUMMARY_COLUMNS, summary_rows(cfg, results))
    head += ["", "What each baseline computes (same N antithetic pairs, same σ, same problem):", ""]
    head += [f"- {line}" for line in ESTIMATORS]
    skipped = [why for case in CONTENDERS if (why := harness.missing(case))]
    if skipped:
        head += [f"- Not measured here: {', '.join(skipped)} (their cells say so; their ratios are left out)."]
    report = head + ["", "## Plots", ""] + ([f"![{p.stem}]({p.name})" for p in plots] or [PLOTS_MISSING])
    harness.write(args.out_dir / f"{prefix}.md", report + ["", "## Data behind the plots", *data_tables(cfg, results),
                                                           "", footer])  # fmt: skip
    print("\n".join(head) + f"\n\n{footer}\n\nWrote {args.out_dir / prefix}.md and "
          f"{', '.join(p.name for p in plots) or 'no plots (' + PLOTS_MISSING + ')'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
