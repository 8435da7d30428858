"""CPU benchmark of zo_kernels: noise throughput and full zero-order gradient steps vs TorchOpt.

Run from the repository root::

    python bench/cpu_kernels.py [--quick] [--out bench/results/cpu.md]

Prints one markdown table (after a short header: date, CPU, versions, threads, backend) and writes
the same text to ``--out`` when given. Every number is the median of repeated runs after one
warm-up run, timed with ``time.perf_counter``; every ratio compares numbers measured in this run.
Uses the native ``cpu`` backend when ``zo_kernels.backends.available()`` reports it, otherwise the
pure-PyTorch ``reference`` backend, and says so in the header. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels import backends, distributions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import TORCHOPT_MISSING, import_torchopt, torchopt_version  # noqa: E402

torchopt = import_torchopt()  # optional: without it the TorchOpt cells say TORCHOPT_MISSING

THREADS = 2
SIGMA = 0.01
METHODS = ("naive", "forward", "antithetic")
SEED = 20240601

Params = Tuple[torch.Tensor, ...]
LossFn = Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Configuration and environment
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Sizes and repeat counts of one run."""

    quick: bool
    numel: int  # n: elements of the noise-throughput buffers
    noise_samples: int  # N of the noise-throughput section
    step_samples: int  # N of the gradient-step section
    repeats: int  # timed runs per measurement (after one warm-up)
    budget_s: float  # stop repeating a measurement once it took this long (keeping >= 3 runs)
    models: Tuple[str, ...]

    @staticmethod
    def make(quick: bool) -> Config:
        """The full configuration, or the ``--quick`` smoke-run one."""
        if quick:
            return Config(True, 100_000, 8, 8, 2, 2.0, ("linear",))
        return Config(False, 1_000_000, 64, 100, 7, 6.0, ("linear", "mlp"))


def choose_backend() -> Tuple[str, str]:
    """``('cpu', note)`` when the native backend is built, else ``('reference', why not cpu)``."""
    status = backends.available().get("cpu", "unknown backend")
    if status == "available":
        return "cpu", "cpu (native C++/OpenMP)"
    return "reference", f"reference (pure PyTorch) -- FALLBACK, the 'cpu' backend is not available: {status}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def omp_environment() -> str:
    """The OpenMP environment variables that change thread behaviour, as set for this run."""
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    return "env: " + ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in names)


def _system_cpu_seconds() -> Tuple[float, float]:
    """(busy, total) CPU seconds summed over all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


class OtherLoad:
    """Share of all cores used by *other* processes since construction (system busy time minus ours)."""

    def __init__(self) -> None:
        self.busy, self.total = _system_cpu_seconds()
        self.own = time.process_time()

    def fraction(self) -> float:
        """Other processes' CPU time over the elapsed CPU capacity, in [0, 1]."""
        busy, total = _system_cpu_seconds()
        others = (busy - self.busy) - (time.process_time() - self.own)
        return min(max(others / max(total - self.total, 1e-9), 0.0), 1.0)


def load_note(when: str, monitor: Optional[OtherLoad]) -> str:
    """How much of the CPUs other processes used ``when``, with a warning above 10% (they distort timings)."""
    if monitor is None:
        return f"CPU use by other processes {when}: unknown"
    share = monitor.fraction()
    note = f"CPU use by other processes {when}: {share:.0%} of all cores"
    if share > 0.1:
        note += " -- WARNING: the machine was busy, timings are unreliable"
    return note


def start_monitor() -> Optional[OtherLoad]:
    """An :class:`OtherLoad` from now, or None where /proc/stat cannot be read."""
    try:
        return OtherLoad()
    except (OSError, ValueError, IndexError):
        return None


def header_lines(cfg: Config, backend_note: str, load: str) -> List[str]:
    """The lines printed above the table."""
    mode = "quick (smoke run, linear model only)" if cfg.quick else "full"
    return [
        "# zo_kernels CPU benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- device: {cpu_model()}",
        f"- versions: torch {torch.__version__}, zo_kernels {zo_kernels.__version__}, "
        f"{torchopt_version(torchopt)}, python {platform.python_version()}",
        f"- threads: {torch.get_num_threads()} (torch.set_num_threads({THREADS})); {omp_environment()}",
        f"- {load}",
        f"- backend: {backend_note}",
        f"- mode: {mode}; section 1: n = {cfg.numel:,} float32 elements, N = {cfg.noise_samples} samples; "
        f"section 2: N = {cfg.step_samples} samples, sigma = {SIGMA}",
        f"- timing: median of up to {cfg.repeats} runs after 1 warm-up (fewer, but at least "
        f"{min(3, cfg.repeats)}, when a measurement exceeds {cfg.budget_s:g} s)",
        "- speed-up = how many times faster ours is than the baseline: throughput ratio in section 1, "
        "time ratio TorchOpt / ours in section 2 (TorchOpt always samples Normal noise)",
        "- overhead = (time - bare evals) / bare evals, where bare evals is the same number of plain "
        "loss calls under torch.no_grad(): N+1 for naive/forward, 2N+1 for antithetic",
        "",
    ]


# --------------------------------------------------------------------------------------------------
# Timing and formatting
# --------------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Median wall time in seconds of ``fn()`` over up to ``repeats`` runs after one warm-up run."""
    fn()
    times: List[float] = []
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if len(times) >= min(3, repeats) and spent > budget_s:
            break
    return statistics.median(times)


def fmt_rate(per_s: float) -> str:
    """Elements per second, in millions."""
    return f"{per_s / 1e6:,.0f} M/s"


def fmt_ms(seconds: float) -> str:
    """A duration in milliseconds."""
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def fmt_ratio(ratio: float) -> str:
    """A speed-up factor."""
    return f"{ratio:.2f}x"


def fmt_overhead(seconds: float, bare: float) -> str:
    """Time beyond the bare evaluations, as a percentage of them."""
    return f"{(seconds - bare) / bare * 100:+.0f}%"


def verdict(checks: Sequence[Tuple[str, bool]]) -> str:
    """'yes' when every check passes, else the names of the failing ones."""
    failed = [name for name, ok in checks if not ok]
    return "yes" if not failed else "NO: " + ", ".join(failed)


COLUMNS = (
    "section",
    "case",
    "ours (Normal)",
    "ours (Rademacher)",
    "baseline: TorchOpt / torch",
    "bare evals",
    "speed-up (Normal)",
    "speed-up (Rademacher)",
    "overhead ours-Normal",
    "overhead ours-Rademacher",
    "overhead TorchOpt",
    "target",
    "met",
)


@dataclass
class Row:
    """One table row; empty cells print as an en dash."""

    section: str
    case: str
    ours_normal: str = ""
    ours_rademacher: str = ""
    baseline: str = ""
    bare: str = ""
    speedup_normal: str = ""
    speedup_rademacher: str = ""
    overhead_normal: str = ""
    overhead_rademacher: str = ""
    overhead_torchopt: str = ""
    target: str = ""
    met: str = ""

    def cells(self) -> List[str]:
        """The row's cells in column order."""
        values = list(vars(self).values())
        return [v if v else "–" for v in values]


def render_table(rows: Sequence[Row]) -> str:
    """A markdown table of ``rows``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Section 1: noise throughput
# --------------------------------------------------------------------------------------------------

Fill = Callable[[torch.Tensor], torch.Tensor]


def fill_normal(buf: torch.Tensor) -> torch.Tensor:
    """Standard normals in place."""
    return buf.normal_()


def fill_signs_bernoulli(buf: torch.Tensor) -> torch.Tensor:
    """Random signs in place via ``bernoulli_(0.5) * 2 - 1``."""
    return buf.bernoulli_(0.5).mul_(2.0).sub_(1.0)


def fill_signs_random(buf: torch.Tensor) -> torch.Tensor:
    """Random signs in place via ``random_(0, 2) * 2 - 1`` (the in-place form of ``randint(0, 2)``)."""
    return buf.random_(0, 2).mul_(2.0).sub_(1.0)


def reduce_time(cfg: Config, backend: str, stream: str) -> float:
    """Seconds for one backend ``reduce``: ``grad += sum_k w_k z_k`` over N samples of n elements."""
    impl = backends.get(backend)
    grad = torch.zeros(cfg.numel, dtype=torch.float32)
    weights = torch.randn(cfg.noise_samples, dtype=torch.float32)
    ids = torch.arange(cfg.noise_samples, dtype=torch.int64)
    return median_time(lambda: impl.reduce(grad, weights, ids, stream, SEED, 0), cfg.repeats, cfg.budget_s)


def generate_time(cfg: Config, fill: Fill) -> float:
    """Seconds to fill one n-element buffer N times, nothing else."""
    buf = torch.empty(cfg.numel, dtype=torch.float32)

    def run() -> None:
        for _ in range(cfg.noise_samples):
            fill(buf)

    return median_time(run, cfg.repeats, cfg.budget_s)


def per_sample_accumulate_time(cfg: Config, fill: Fill) -> float:
    """Seconds to generate each sample and add it to a grad buffer: ``g.add_(z, alpha=w_k)``."""
    z = torch.empty(cfg.numel, dtype=torch.float32)
    grad = torch.zeros(cfg.numel, dtype=torch.float32)
    weights = torch.randn(cfg.noise_samples).tolist()

    def run() -> None:
        for w in weights:
            grad.add_(fill(z), alpha=w)

    return median_time(run, cfg.repeats, cfg.budget_s)


def chunked_accumulate_time(cfg: Config, fill: Fill, chunk: int = 8) -> float:
    """Seconds to generate ``chunk`` samples at a time and accumulate them: ``g.addmv_(Z.T, w)``."""
    chunk = min(chunk, cfg.noise_samples)
    zs = torch.empty(chunk, cfg.numel, dtype=torch.float32)
    grad = torch.zeros(cfg.numel, dtype=torch.float32)
    weights = torch.randn(cfg.noise_samples, dtype=torch.float32)

    def run() -> None:
        for lo in range(0, cfg.noise_samples, chunk):
            w = weights[lo : lo + chunk]
            block = fill(zs[: w.numel()])
            grad.addmv_(block.T, w)

    return median_time(run, cfg.repeats, cfg.budget_s)


def fastest(candidates: Sequence[Tuple[str, Callable[[], float]]]) -> Tuple[str, float]:
    """The label and seconds of the fastest of several ``(label, timer)`` baselines."""
    timed = [(label, timer()) for label, timer in candidates]
    return min(timed, key=lambda item: item[1])


def noise_rows(cfg: Config, backend: str) -> List[Row]:
    """Section 1: backend ``reduce`` vs torch generation alone and generation + accumulation."""
    elements = cfg.numel * cfg.noise_samples
    ours_n = elements / reduce_time(cfg, backend, "normal")
    ours_r = elements / reduce_time(cfg, backend, "rademacher")
    signs = [("bernoulli_(0.5)*2-1", fill_signs_bernoulli), ("random_(0,2)*2-1", fill_signs_random)]

    alone_n = elements / generate_time(cfg, fill_normal)
    sign_label, sign_s = fastest([(label, lambda f=f: generate_time(cfg, f)) for label, f in signs])
    alone_r = elements / sign_s
    acc_n_label, acc_n_s = fastest(accumulate_candidates(cfg, "normal_", fill_normal))
    sign_fill = dict(signs)[sign_label]
    acc_r_label, acc_r_s = fastest(accumulate_candidates(cfg, sign_label, sign_fill))
    acc_n, acc_r = elements / acc_n_s, elements / acc_r_s

    section = f"1. noise, n={cfg.numel:,}, N={cfg.noise_samples}, float32 (values/s)"
    ours_cells = dict(ours_normal=fmt_rate(ours_n), ours_rademacher=fmt_rate(ours_r))
    return [
        Row(section, f"(a) `{backend}` backend `reduce` into grad (normal / rademacher stream)", **ours_cells),
        Row(
            section,
            f"(b) generation alone, N × n-buffer: `normal_` / `{sign_label}` (faster sign baseline)",
            baseline=f"{fmt_rate(alone_n)} / {fmt_rate(alone_r)}",
            speedup_normal=fmt_ratio(ours_n / alone_n),
            speedup_rademacher=fmt_ratio(ours_r / alone_r),
            target="Normal: reduce ≥ normal_ alone (≥ 1.00x)",
            met=verdict([("Normal", ours_n >= alone_n)]),
        ),
        Row(
            section,
            f"(c) generate + accumulate (faster variant): `{acc_n_label}` / `{acc_r_label}`",
            baseline=f"{fmt_rate(acc_n)} / {fmt_rate(acc_r)}",
            speedup_normal=fmt_ratio(ours_n / acc_n),
            speedup_rademacher=fmt_ratio(ours_r / acc_r),
        ),
    ]


def accumulate_candidates(cfg: Config, label: str, fill: Fill) -> List[Tuple[str, Callable[[], float]]]:
    """The two generate-and-accumulate baselines for one generator, as ``(label, timer)`` pairs."""
    return [
        (f"{label}; g.add_(z, alpha=w) per sample", lambda: per_sample_accumulate_time(cfg, fill)),
        (f"{label} on 8-sample chunk; g.addmv_(Z.T, w)", lambda: chunked_accumulate_time(cfg, fill)),
    ]


# --------------------------------------------------------------------------------------------------
# Section 2: full gradient steps
# --------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A loss over a tuple of parameter tensors, with its data."""

    name: str
    loss: LossFn
    params: Params
    x: torch.Tensor
    y: torch.Tensor
    targets: Tuple[float, Optional[float], Optional[float]]  # min speed-up, max overhead N / R (%)

    @property
    def numel(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.params)


def linear_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a linear model ``x @ w.T + b`` (TorchOpt's zero-order tutorial model)."""
    weight, bias = params
    return F.mse_loss(F.linear(x, weight, bias), y)


def mlp_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a two-layer tanh MLP."""
    w1, b1, w2, b2 = params
    return F.mse_loss(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)


def leaf_params(*modules: torch.nn.Module) -> Params:
    """The modules' parameters as detached leaf tensors that require grad (for a functional loss)."""
    return tuple(p.detach().clone().requires_grad_() for m in modules for p in m.parameters())


def make_problem(name: str) -> Problem:
    """The tutorial-sized linear model (2,049 parameters) or the 1024-256-10 MLP (264,970)."""
    if name == "linear":
        x, y = torch.randn(64, 2048), torch.randn(64, 1)
        params = leaf_params(torch.nn.Linear(2048, 1))
        return Problem("linear 2048→1, batch 64, MSE", linear_loss, params, x, y, (4.0, None, None))
    if name == "mlp":
        x, y = torch.randn(256, 1024), torch.randn(256, 10)
        params = leaf_params(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 10))
        return Problem("MLP 1024→256→10 tanh, batch 256, MSE", mlp_loss, params, x, y, (1.2, 40.0, 10.0))
    raise ValueError(f"unknown model {name!r}")


def step_time(problem: Problem, decorated: LossFn, cfg: Config) -> float:
    """Seconds for one full step: the decorated loss's forward and backward, filling every ``.grad``."""

    def run() -> None:
        for p in problem.params:
            p.grad = None
        decorated(problem.params, problem.x, problem.y).backward()

    seconds = median_time(run, cfg.repeats, cfg.budget_s)
    if any(p.grad is None or not bool(torch.isfinite(p.grad).all()) for p in problem.params):
        raise RuntimeError(f"{problem.name}: a step left a missing or non-finite gradient")
    return seconds


def bare_time(problem: Problem, evals: int, cfg: Config) -> float:
    """Seconds for ``evals`` plain calls of the undecorated loss under ``torch.no_grad()``."""

    def run() -> None:
        with torch.no_grad():
            for _ in range(evals):
                problem.loss(problem.params, problem.x, problem.y)

    return median_time(run, cfg.repeats, cfg.budget_s)


def ours(problem: Problem, dist: distributions.FusedDistribution, method: str, cfg: Config, backend: str) -> LossFn:
    """The loss decorated by ``zo_kernels.zero_order`` on ``backend``."""
    decorate = zo_kernels.zero_order(
        dist, method=method, argnums=0, num_samples=cfg.step_samples, sigma=SIGMA, backend=backend
    )
    return decorate(problem.loss)


def torchopt_fn(problem: Problem, method: str, cfg: Config) -> LossFn:
    """The loss decorated by TorchOpt's ``zero_order`` with ``torch.distributions.Normal(0, 1)``."""
    decorate = torchopt.diff.zero_order(
        torch.distributions.Normal(0.0, 1.0), method=method, argnums=0, num_samples=cfg.step_samples, sigma=SIGMA
    )
    return decorate(problem.loss)


def step_row(problem: Problem, method: str, cfg: Config, backend: str) -> Row:
    """Times of ours (Normal, Rademacher), TorchOpt and the bare evaluations for one method."""
    evals = (2 if method == "antithetic" else 1) * cfg.step_samples + 1
    t_n = step_time(problem, ours(problem, distributions.Normal(), method, cfg, backend), cfg)
    t_r = step_time(problem, ours(problem, distributions.Rademacher(), method, cfg, backend), cfg)
    t_opt = step_time(problem, torchopt_fn(problem, method, cfg), cfg) if torchopt is not None else None
    t_bare = bare_time(problem, evals, cfg)
    min_speedup, max_ovh_n, max_ovh_r = problem.targets
    targets = [f"speed-up ≥ {min_speedup:g}x"]
    checks = []
    if t_opt is not None:
        checks += [("speed-up N", t_opt / t_n >= min_speedup), ("speed-up R", t_opt / t_r >= min_speedup)]
    if max_ovh_n is not None and max_ovh_r is not None:
        targets.append(f"overhead ≤ {max_ovh_n:g}% (N), ≤ {max_ovh_r:g}% (R)")
        checks += [
            ("overhead N", (t_n - t_bare) / t_bare * 100 <= max_ovh_n),
            ("overhead R", (t_r - t_bare) / t_bare * 100 <= max_ovh_r),
        ]
    met = verdict(checks) if checks else ""
    if t_opt is None:  # the speed-up targets cannot be checked without TorchOpt
        met = "; ".join(filter(None, [met, f"speed-up not measured ({TORCHOPT_MISSING})"]))
    return Row(
        f"2. step, N={cfg.step_samples}: {problem.name} ({problem.numel:,} params)",
        f"{method} ({evals} evals)",
        ours_normal=fmt_ms(t_n),
        ours_rademacher=fmt_ms(t_r),
        baseline=f"TorchOpt {fmt_ms(t_opt)}" if t_opt is not None else f"TorchOpt: {TORCHOPT_MISSING}",
        bare=fmt_ms(t_bare),
        speedup_normal=fmt_ratio(t_opt / t_n) if t_opt is not None else "",
        speedup_rademacher=fmt_ratio(t_opt / t_r) if t_opt is not None else "",
        overhead_normal=fmt_overhead(t_n, t_bare),
        overhead_rademacher=fmt_overhead(t_r, t_bare),
        overhead_torchopt=fmt_overhead(t_opt, t_bare) if t_opt is not None else "",
        target="; ".join(targets),
        met=met,
    )


def step_rows(cfg: Config, backend: str) -> List[Row]:
    """Section 2: one row per model and method."""
    rows = []
    for name in cfg.models:
        problem = make_problem(name)
        rows += [step_row(problem, method, cfg, backend) for method in METHODS]
    return rows


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="zo_kernels CPU benchmark (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", help="smoke run: n=1e5, N=8, linear model only, 2 runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the report, and write it to ``--out`` when given."""
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = Config.make(args.quick)
    backend, backend_note = choose_backend()
    before = start_monitor()
    time.sleep(1.0)
    load = load_note("in the second before the run", before)
    during = start_monitor()
    started = time.perf_counter()
    rows = noise_rows(cfg, backend) + step_rows(cfg, backend)
    elapsed = time.perf_counter() - started
    footer = [f"Measured in {elapsed:.1f} s. {load_note('during the run', during)}."]
    lines = header_lines(cfg, backend_note, load) + [render_table(rows), ""] + footer
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
