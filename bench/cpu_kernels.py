"""CPU benchmark of zo_kernels: noise throughput and full zero-order gradient steps vs TorchOpt.

Run from the repository root::

    python bench/cpu_kernels.py [--quick] [--out bench/results/cpu.md]

Prints one markdown table (after a short header: date, CPU, versions, threads, backend) and writes
the same text to ``--out`` when given. Every number is ``harness.cpu_time``'s median time per call
(``torch.utils.benchmark.Timer.adaptive_autorange``); every ratio compares numbers measured in this run.
Uses the native ``cpu`` backend when ``zo_kernels.backends.available()`` reports it, otherwise the
pure-PyTorch ``reference`` backend, and says so in the header. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import harness
import torch
from baselines import TORCHOPT_MISSING, import_torchopt, torchopt_zero_order
from harness import LossFn, Problem, cpu_time, fmt_ms, fmt_overhead, fmt_ratio, verdict

import zo_kernels
from zo_kernels import backends, distributions

torchopt = import_torchopt()  # optional: without it the TorchOpt cells say TORCHOPT_MISSING

THREADS = harness.THREADS
SIGMA = 0.01
METHODS = ("naive", "forward", "antithetic")
SEED = 20240601

#: Per model of section 2: min speed-up vs TorchOpt, max overhead (%) for Normal and Rademacher noise.
Targets = Tuple[float, Optional[float], Optional[float]]
TARGETS = {"linear": (4.0, None, None), "mlp": (1.2, 40.0, 10.0)}


@dataclass(frozen=True)
class Config:
    """Sizes and the time budget of one run."""

    quick: bool
    numel: int  # n: elements of the noise-throughput buffers
    noise_samples: int  # N of the noise-throughput section
    step_samples: int  # N of the gradient-step section
    budget_s: float  # timing of one measurement stops after this many seconds (harness.cpu_time)
    models: Tuple[str, ...]

    @staticmethod
    def make(quick: bool) -> Config:
        """The full configuration, or the ``--quick`` smoke-run one."""
        if quick:
            return Config(True, 100_000, 8, 8, 0.5, ("linear",))
        return Config(False, 1_000_000, 64, 100, 6.0, ("linear", "mlp"))


def header_lines(cfg: Config, backend_note: str, load: str) -> List[str]:
    """The lines printed above the table."""
    mode = "quick (smoke run, linear model only)" if cfg.quick else "full"
    fields = [
        ("date", harness.now()),
        ("device", harness.cpu_model()),
        ("versions", harness.versions(torchopt)),
        ("threads", f"{torch.get_num_threads()} (torch.set_num_threads({THREADS})); {harness.omp_environment()}"),
        ("", load),
        ("backend", backend_note),
        ("mode", f"{mode}; section 1: n = {cfg.numel:,} float32 elements, N = {cfg.noise_samples} samples; "
                 f"section 2: N = {cfg.step_samples} samples, sigma = {SIGMA}"),
        ("timing", harness.timing_note(cfg.budget_s).split("; GPU:")[0]),
        ("", "speed-up = how many times faster ours is than the baseline: throughput ratio in section 1, "
             "time ratio TorchOpt / ours in section 2 (TorchOpt always samples Normal noise)"),
        ("", "overhead = (time - bare evals) / bare evals, where bare evals is the same number of plain "
             "loss calls under torch.no_grad(): N+1 for naive/forward, 2N+1 for antithetic"),
    ]  # fmt: skip
    return harness.header("zo_kernels CPU benchmark", fields)


def fmt_rate(per_s: float) -> str:
    """Elements per second, in millions."""
    return f"{per_s / 1e6:,.0f} M/s"


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
    """One table row (the fields are :data:`COLUMNS`)."""

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
    return cpu_time(lambda: impl.reduce(grad, weights, ids, stream, SEED, 0), cfg.budget_s)


def generate_time(cfg: Config, fill: Fill) -> float:
    """Seconds to fill one n-element buffer N times, nothing else."""
    buf = torch.empty(cfg.numel, dtype=torch.float32)

    def run() -> None:
        for _ in range(cfg.noise_samples):
            fill(buf)

    return cpu_time(run, cfg.budget_s)


def per_sample_accumulate_time(cfg: Config, fill: Fill) -> float:
    """Seconds to generate each sample and add it to a grad buffer: ``g.add_(z, alpha=w_k)``."""
    z = torch.empty(cfg.numel, dtype=torch.float32)
    grad = torch.zeros(cfg.numel, dtype=torch.float32)
    weights = torch.randn(cfg.noise_samples).tolist()

    def run() -> None:
        for w in weights:
            grad.add_(fill(z), alpha=w)

    return cpu_time(run, cfg.budget_s)


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

    return cpu_time(run, cfg.budget_s)


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


def ours(problem: Problem, dist: distributions.FusedDistribution, method: str, cfg: Config, backend: str) -> LossFn:
    """The loss decorated by ``zo_kernels.zero_order`` on ``backend``."""
    decorate = zo_kernels.zero_order(
        dist, method=method, argnums=0, num_samples=cfg.step_samples, sigma=SIGMA, backend=backend
    )
    return decorate(problem.loss)


def torchopt_fn(problem: Problem, method: str, cfg: Config) -> LossFn:
    """The loss decorated by TorchOpt's ``zero_order`` with ``torch.distributions.Normal(0, 1)``."""
    return torchopt_zero_order(torchopt, method, cfg.step_samples, SIGMA, problem.x.device)(problem.loss)


def step_row(problem: Problem, targets_of: Targets, method: str, cfg: Config, backend: str) -> Row:
    """Times of ours (Normal, Rademacher), TorchOpt and the bare evaluations for one method."""
    evals = (2 if method == "antithetic" else 1) * cfg.step_samples + 1
    t_n = harness.step_time(problem, ours(problem, distributions.Normal(), method, cfg, backend), cfg.budget_s)
    t_r = harness.step_time(problem, ours(problem, distributions.Rademacher(), method, cfg, backend), cfg.budget_s)
    t_opt = (
        harness.step_time(problem, torchopt_fn(problem, method, cfg), cfg.budget_s) if torchopt is not None else None
    )
    t_bare = cpu_time(harness.bare_evals(problem, evals), cfg.budget_s)
    min_speedup, max_ovh_n, max_ovh_r = targets_of
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
        problem = harness.make_problem(name)
        rows += [step_row(problem, TARGETS[name], method, cfg, backend) for method in METHODS]
    return rows


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the report, and write it to ``--out`` when given."""
    parser = argparse.ArgumentParser(description="zo_kernels CPU benchmark (see bench/README.md).")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: n=1e5, N=8, linear model only, 0.5 s per point"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = Config.make(args.quick)
    backend, backend_note = harness.choose_backend()
    run = harness.Run()
    rows = noise_rows(cfg, backend) + step_rows(cfg, backend)
    lines = header_lines(cfg, backend_note, run.before) + harness.rows_table(COLUMNS, rows) + ["", run.footer()]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
