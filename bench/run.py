"""``make bench``: every benchmark this machine can run, one summary table of ratios, and plots.

Run from the repository root::

    python bench/run.py                # full run: 2-5 minutes on 2 CPU cores (more on a busy machine)
    python bench/run.py --quick        # smoke run: tiny sizes, a short time budget per point
    python bench/run.py --out-dir DIR  # where the report and plots go (default bench/results)

On the CPU always, and on the GPU too when ``torch.cuda.is_available()``, it times one antithetic
gradient step of a tanh MLP ``d -> d -> 10`` (batch 64, Normal noise) for seven contenders:

- zo_kernels ``zero_order`` (best backend for the device) + ``.backward()``, against
  (a) TorchOpt 0.7.3 ``torchopt.diff.zero_order`` + ``.backward()`` and
  (b) plain PyTorch: ``Z = torch.randn(N, n)``, perturbations with rows of ``Z``, ``g = w @ Z``
  (``bench/baselines.py``);
- zo_kernels ``estimate(..., inplace=True)`` + ``ZOSGD.step`` (estimate and update) against
  (c) a MeZO-SGD step (per-parameter ``torch.normal`` loop, in-place perturbation, ``bench/baselines.py``),
  (d) EvoTorch 0.6.1 ``PGPE`` (symmetric sampling, raw fitness, no optimizer: the same estimate and
  update) on a vectorized ``evotorch.Problem``, one ``searcher.step()``, and
  (e) torcheggroll 0.2.0 ``TorchEggrollES(rank=1, pop_size=2N).step`` (rank-1 noise, z-scored
  fitness: another estimator, at the same N and sigma).

TorchOpt, EvoTorch, torcheggroll and matplotlib are optional: without one of the baselines its cells
say "... not installed" and its ratios are left out; without matplotlib the report says the plots
were not drawn.

Two sweeps: the number of samples N at a fixed model, and the parameter count at a fixed N; the
peak memory of one step at each parameter count, each (contender, size) in a fresh process
(``harness.run_memory_jobs``). Times are ``harness.time_call``'s. It prints one table of ratios and
writes ``summary-<device>.md`` (that table, the data behind the plots, device, versions and date) and
three PNG plots ``summary-<device>-{time-vs-samples,time-vs-params,memory-vs-params}.png``; ``--quick``
adds ``-quick`` to these names so that a smoke run never replaces a full one.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch
import torch.nn.functional as F
from baselines import (
    EGGROLL_MISSING,
    EVOTORCH_MISSING,
    TORCHOPT_MISSING,
    EvoTorchPGPE,
    MeZO,
    import_evotorch,
    import_optional,
    import_torchopt,
    torch_matmul_step,
    torcheggroll_step,
    torchopt_zero_order,
    version_of,
)
from harness import Problem, fmt_mem, fmt_ratio, fmt_time, mlp_loss, sync, table, wide_mlp_numel

import zo_kernels
from zo_kernels import backends, distributions
from zo_kernels.optim import ZOSGD

torchopt = import_torchopt()  # optional: without it the TorchOpt cells say TORCHOPT_MISSING

METHOD = "antithetic"
SIGMA = 1e-3  # MeZO's eps; the same for every contender
LR = 1e-7  # MeZO / ZOSGD learning rate: small, so repeated timing steps barely move the parameters
BATCH = 64
WORKER_TIMEOUT_S = 180
PLOTS_MISSING = "Plots not drawn: matplotlib not installed."
mlp_numel = wide_mlp_numel

#: Contender id -> label. "inference" is only measured for memory: one forward under no_grad.
CONTENDERS: Dict[str, str] = {
    "zo": "zo_kernels `zero_order` + backward",
    "torchopt": "TorchOpt 0.7.3 `zero_order` + backward",
    "torch": "PyTorch `randn(N, n)` + `w @ Z`",
    "zo_mezo": "zo_kernels `estimate(inplace=True)` + `ZOSGD`",
    "mezo": "MeZO per-parameter `torch.normal` loop",
    "evotorch": "EvoTorch 0.6.1 `PGPE` `searcher.step()`",
    "torcheggroll": "torcheggroll 0.2.0 `TorchEggrollES(rank=1).step`",
}
MEMORY_CASES: Dict[str, str] = {"inference": "inference (one forward, no_grad)", **CONTENDERS}
#: Peer package -> what its cells say (and why its ratios are left out) where it cannot be imported.
PEERS: Dict[str, str] = {"evotorch": EVOTORCH_MISSING, "torcheggroll": EGGROLL_MISSING}


@functools.cache
def peer(name: str) -> Optional[ModuleType]:
    """The optional peer library ``name`` of :data:`PEERS`, or None where it is missing.

    Imported on first use, not with this module: a memory worker (a fresh process that imports this
    script) then pays for the import of a peer (evotorch: ~2 s) only when it measures that peer.
    """
    return import_evotorch() if name == "evotorch" else import_optional(name)


def missing(case: str) -> Optional[str]:
    """What the cells of an optional contender say where its package cannot be imported; None where it can."""
    if case == "torchopt":
        return TORCHOPT_MISSING if torchopt is None else None
    if case in PEERS:
        return PEERS[case] if peer(case) is None else None
    return None


def runnable() -> Tuple[str, ...]:
    """The contenders this machine can run: the optional ones only where installed."""
    return tuple(c for c in CONTENDERS if missing(c) is None)


def runnable_memory() -> Tuple[str, ...]:
    """The memory cases this machine can run: inference and :func:`runnable`."""
    return ("inference", *runnable())


#: (baseline id, zo_kernels id, what the row compares)
COMPARISONS: Tuple[Tuple[str, str, str], ...] = (
    ("torchopt", "zo", "(a) TorchOpt 0.7.3 `torchopt.diff.zero_order`"),
    ("torch", "zo", "(b) plain PyTorch `randn(N, n)` + matmul"),
    ("mezo", "zo_mezo", "(c) MeZO per-parameter `torch.normal` loop, in place"),
    ("evotorch", "zo_mezo", "(d) EvoTorch 0.6.1 `PGPE`, symmetric, raw fitness (same estimate)"),
    ("torcheggroll", "zo_mezo", "(e) torcheggroll 0.2.0 `TorchEggrollES(rank=1)` (rank-1 noise, z-scored)"),
)
#: What each peer's step computes, printed under the summary table.
ESTIMATORS: Tuple[str, ...] = (
    "(a) TorchOpt: the antithetic estimate `1/(2σN) Σ (f(θ+σz_i) − f(θ−σz_i)) z_i`, Normal z, raw losses "
    "(the same as zo_kernels); (b) the same with `Z` materialized; (c) MeZO: the same estimate from N seeds, "
    "applied as `θ −= lr·g`.",
    '(d) EvoTorch `PGPE(popsize=2N, symmetric=True, stdev_init=σ, ranking_method="raw", optimizer=None, '
    'center_learning_rate=lr/σ², stdev_learning_rate=0)` on `Problem("min", vmap(loss of one flat vector), '
    "vectorized=True)`: N mirrored directions (2N evaluations), center gradient "
    "`Σ (u_i⁺ − u_i⁻)/2 · σz_i / N` with utilities u = −f, i.e. −σ² times the same raw antithetic estimate, so the "
    "update is `θ −= lr·g`, as `ZOSGD`'s; PGPE also computes the (unused, zero-rate) σ gradient. EvoTorch's "
    'defaults would be `ranking_method="centered"` (rank-based fitness shaping) and the ClipUp optimizer.',
    "(e) torcheggroll `TorchEggrollES(rank=1, pop_size=2N, antithetic=True)`: per member rank-1 noise "
    "`σ·a bᵀ` for the matrices and Gaussian noise for the biases, 2N members on materialized weights in one "
    "vmapped forward, fitness −f z-scored, update `θ += lr·√(2N)·mean(r_i ε_i)`: a different estimator (EGGROLL); "
    "zo_kernels' own `LowRank(1)` is compared with it in `bench/lowrank.py`.",
)

STYLES: Dict[str, Tuple[str, str]] = {  # contender -> (colour, marker) of the plots
    "zo": ("tab:blue", "o"),
    "zo_mezo": ("tab:cyan", "s"),
    "torchopt": ("tab:red", "v"),
    "torch": ("tab:orange", "^"),
    "mezo": ("tab:purple", "D"),
    "evotorch": ("tab:green", "P"),
    "torcheggroll": ("tab:brown", "*"),
    "inference": ("tab:gray", "x"),
}


@dataclass(frozen=True)
class Config:
    """Sizes and the time budget of one run."""

    quick: bool
    widths: Tuple[int, ...]  # d of the MLP d -> d -> 10: the parameter-count sweep (time and memory)
    sweep_width: int  # d of the num_samples sweep
    sample_counts: Tuple[int, ...]  # N of the num_samples sweep
    param_samples: int  # N of the parameter-count sweep (and of the memory points)
    budget_s: float  # CPU timing of one point stops after this many seconds (harness.time_call)

    @staticmethod
    def make(quick: bool) -> Config:
        """The full configuration, or the ``--quick`` smoke-run one."""
        if quick:
            return Config(True, (32, 128), 128, (1, 4), 4, 0.5)
        return Config(False, (64, 256, 1024, 2048), 1024, (1, 4, 16, 64), 16, 4.0)

    def points(self) -> List[Tuple[int, int]]:
        """Every (width, N) whose step time is measured: both sweeps, without duplicates."""
        pts = [(self.sweep_width, n) for n in self.sample_counts] + [(w, self.param_samples) for w in self.widths]
        return sorted(set(pts))


def device_tag(device: torch.device) -> str:
    """A short file-name tag: ``cpu``, or ``cuda-`` and the GPU's model (``cuda-h100``)."""
    if device.type != "cuda":
        return device.type
    words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
    words = [w for w in words if w and w not in ("nvidia", "geforce", "tesla", "rtx", "gtx", "quadro")]
    return "cuda-" + (words[0] if words else "gpu")


def device_name(device: torch.device) -> str:
    """The device in words, for headers and plot titles."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{harness.cpu_model()}, {harness.THREADS} threads of {os.cpu_count()} CPUs"


def zo_backend(device: torch.device) -> Tuple[str, str]:
    """(backend name, note) that ``zero_order`` uses on ``device``: the best one available there."""
    if device.type == "cpu":
        return harness.choose_backend()
    name = backends.select(device, torch.float32).name
    return name, f"{name} (best available for CUDA float32)"


# --------------------------------------------------------------------------------------------------
# The cases: one step of each contender
# --------------------------------------------------------------------------------------------------


def make_step(case: str, problem: Problem, num_samples: int, backend: str) -> Callable[[], None]:
    """A callable that runs one step of ``case`` on ``problem`` (and synchronizes the device)."""
    device = problem.x.device
    x, y = problem.x, problem.y
    if case == "zo":
        decorate = zo_kernels.zero_order(
            distributions.Normal(), method=METHOD, argnums=0, num_samples=num_samples, sigma=SIGMA, backend=backend
        )
        return harness.grad_step(problem, decorate(mlp_loss))
    if case == "torchopt":
        if torchopt is None:
            raise RuntimeError(f"case 'torchopt': {TORCHOPT_MISSING}")
        return harness.grad_step(problem, torchopt_zero_order(torchopt, METHOD, num_samples, SIGMA, device)(mlp_loss))
    if case == "torch":

        def torch_step() -> None:
            for p in problem.params:
                p.grad = None
            torch_matmul_step(mlp_loss, problem.params, x, y, num_samples=num_samples, sigma=SIGMA)
            sync(device)

        return torch_step
    if case == "zo_mezo":
        plain_params = problem.plain_params()
        optimizer = ZOSGD(plain_params, lr=LR)

        def zo_mezo_step() -> None:
            sg = zo_kernels.estimate(
                mlp_loss, plain_params, x, y, method=METHOD, num_samples=num_samples, sigma=SIGMA, inplace=True,
                backend=backend,
            )  # fmt: skip
            optimizer.step(sg)
            sync(device)

        return zo_mezo_step
    if case == "mezo":
        mezo = MeZO(problem.plain_params(), lr=LR, eps=SIGMA, num_samples=num_samples)

        def mezo_step() -> None:
            mezo.step(mlp_loss, x, y)
            sync(device)

        return mezo_step
    if case in PEERS and peer(case) is None:
        raise RuntimeError(f"case {case!r}: {PEERS[case]}")
    if case == "evotorch":
        pgpe = EvoTorchPGPE(
            peer("evotorch"), mlp_loss, problem.params, x, y, num_samples=num_samples, sigma=SIGMA, lr=LR
        )

        def pgpe_step() -> None:
            pgpe.step()
            sync(device)

        return pgpe_step
    if case == "torcheggroll":
        es_step = torcheggroll_step(
            peer("torcheggroll"), mlp_module(problem), x, F.mse_loss, y, num_samples=num_samples, sigma=SIGMA, lr=LR
        )

        def eggroll_step() -> None:
            es_step()
            sync(device)

        return eggroll_step
    if case == "inference":

        def inference() -> None:
            with torch.no_grad():
                mlp_loss(problem.params, x, y)
            sync(device)

        return inference
    raise ValueError(f"unknown case {case!r}")


def mlp_module(problem: Problem) -> torch.nn.Module:
    """``problem``'s MLP ``d -> d -> 10`` (``mlp_loss``) as an ``nn.Sequential`` holding copies of its parameters."""
    w1, b1, w2, b2 = (p.detach() for p in problem.params)
    with torch.device(w1.device):
        module = torch.nn.Sequential(
            torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.Tanh(), torch.nn.Linear(w2.shape[1], w2.shape[0])
        )
    module.load_state_dict({"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2})
    return module


def memory_case(case: str, width: int, num_samples: int, backend: str, device: torch.device) -> harness.Built:
    """A memory job's ``build``: one step of ``case`` at ``width`` (run in a fresh process by harness.memory_worker)."""
    problem = harness.wide_mlp(width, device, BATCH)
    return make_step(case, problem, num_samples, backend), problem.params


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@dataclass
class DeviceResults:
    """Everything measured on one device."""

    device: torch.device
    backend_note: str
    times: Dict[Tuple[int, int], Dict[str, float]] = field(default_factory=dict)  # (width, N) -> case -> s
    memory: Dict[int, Dict[str, Dict[str, Any]]] = field(default_factory=dict)  # width -> case -> worker result


def time_points(
    cfg: Config, device: torch.device, backend: str, res: DeviceResults, progress: harness.Progress
) -> None:
    """Median step time of every contender at every (width, N) point."""
    for width, num in cfg.points():
        problem = harness.wide_mlp(width, device, BATCH)
        res.times[(width, num)] = {}
        for case in runnable():
            progress.show(f"{device.type}: step time, {case}, d={width} ({problem.numel:,} params), N={num}")
            res.times[(width, num)][case] = harness.time_call(
                make_step(case, problem, num, backend), device, cfg.budget_s
            )
            if case in ("zo", "torchopt", "torch"):
                harness.check_grads(problem, case)
            progress.advance()
        del problem
        if device.type == "cuda":
            torch.cuda.empty_cache()


def memory_points(
    cfg: Config, device: torch.device, backend: str, res: DeviceResults, progress: harness.Progress
) -> None:
    """Peak memory of one step of every case at every width, each in a fresh single-threaded process."""
    points = [(width, case) for width in cfg.widths for case in runnable_memory()]
    jobs = [
        harness.MemoryJob(memory_case, dict(case=case, width=width, num_samples=cfg.param_samples, backend=backend),
                          str(device), threads=1)
        for width, case in points
    ]  # fmt: skip

    def label(indices: Sequence[int]) -> str:
        return f"{device.type}: peak memory ({', '.join(f'{points[k][1]} d={points[k][0]}' for k in indices)})"

    results = harness.run_memory_jobs(jobs, harness.memory_parallelism(), WORKER_TIMEOUT_S, progress, label)
    for (width, case), result in zip(points, results):
        res.memory.setdefault(width, {})[case] = result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def peak_of(res: DeviceResults, width: int, case: str) -> Optional[float]:
    """The measured peak bytes, or None where the point failed or was not measured."""
    return res.memory.get(width, {}).get(case, {}).get("peak")


SUMMARY_COLUMNS = (
    "device",
    "baseline",
    "zo_kernels",
    "sweep",
    "MLP d→d→10",
    "N",
    "baseline time",
    "zo_kernels time",
    "speed-up",
    "baseline peak mem",
    "zo_kernels peak mem",
    "memory ratio",
)


def summary_rows(cfg: Config, results: Sequence[DeviceResults]) -> List[List[str]]:
    """One row per (device, baseline, measured point): speed-up and memory ratio, baseline / zo_kernels."""
    rows = []
    for res in results:
        tag = device_tag(res.device)
        for base, ours, label in COMPARISONS:
            sweeps = [("N", (cfg.sweep_width, n)) for n in cfg.sample_counts]
            sweeps += [("params", (w, cfg.param_samples)) for w in cfg.widths]
            for sweep, (width, num) in sweeps:
                t = res.times[(width, num)]
                row = [tag, label, CONTENDERS[ours], sweep, f"d={width}, {mlp_numel(width):,} params", str(num)]
                if base in t:
                    row += [fmt_time(t[base]), fmt_time(t[ours]), fmt_ratio(t[base] / t[ours])]
                else:  # not runnable here (an optional baseline not installed): no ratio
                    row += [not_run(base), fmt_time(t[ours]), ""]
                mb, mo = peak_of(res, width, base), peak_of(res, width, ours)
                if sweep == "params" and mb is not None and mo is not None:
                    row += [fmt_mem(mb), fmt_mem(mo), fmt_ratio(mb / mo)]
                elif sweep == "params" and base not in runnable_memory():
                    row += [not_run(base), fmt_mem(mo) if mo is not None else "", ""]
                else:
                    row += ["", "", ""]
                rows.append(row)
    return rows


def not_run(case: str) -> str:
    """The cell of a case that was not measured on this machine (its package is missing, or it was not run)."""
    return missing(case) or "not measured"


def data_tables(cfg: Config, results: Sequence[DeviceResults]) -> List[str]:
    """The numbers behind the plots: every contender's median time and every case's peak memory."""
    lines: List[str] = []
    for res in results:
        tag = device_tag(res.device)
        lines += ["", f"### Step time per contender [{tag}] (median, milliseconds)", ""]
        rows = []
        for (width, num), t in sorted(res.times.items()):
            cells = [f"{t[c] * 1e3:,.2f}" if c in t else not_run(c) for c in CONTENDERS]
            rows.append([str(width), f"{mlp_numel(width):,}", str(num), *cells])
        lines += table(["d", "params", "N", *CONTENDERS.values()], rows)
        lines += ["", f"### Peak memory of one step [{tag}], N={cfg.param_samples} (MiB)", ""]
        rows = []
        for width, cases in sorted(res.memory.items()):
            cells = []
            for case in MEMORY_CASES:
                r = cases.get(case)
                if r is None:
                    cells.append(not_run(case))
                else:
                    cells.append(f"{r['peak'] / 2**20:,.2f}" if "peak" in r else f"FAILED: {r.get('error', '?')}")
            rows.append([str(width), f"{mlp_numel(width):,}", *cells])
        lines += table(["d", "params", *MEMORY_CASES.values()], rows)
        methods = sorted({r["method"] for cases in res.memory.values() for r in cases.values() if "method" in r})
        lines += ["", f"Memory method: {', '.join(methods) or 'none succeeded'}."]
    return lines


def versions() -> str:
    """torch, the peers (evotorch, torcheggroll), zo_kernels, torchopt and python versions: a report's versions line."""
    peers = "".join(f"{version_of(peer(name), name, why)}, " for name, why in PEERS.items())
    return harness.versions(torchopt, extra=peers)


def header_lines(cfg: Config, results: Sequence[DeviceResults], load: str) -> List[str]:
    """The lines above the summary table."""
    fields = [("date", harness.now())]
    fields += [
        (f"device [{device_tag(r.device)}]", f"{device_name(r.device)}; backend: {r.backend_note}") for r in results
    ]
    fields += [
        ("versions", versions()),
        ("threads", f"{harness.THREADS} (torch.set_num_threads); {harness.omp_environment()}"),
        ("", load),
        ("mode", "quick (smoke run: tiny sizes, numbers not meaningful)" if cfg.quick else "full"),
        ("problem", f"tanh MLP d→d→10 (`bench/harness.py`'s `mlp_loss`), batch {BATCH}, MSE, float32; "
                    f"{METHOD}, Normal noise, sigma = {SIGMA:g}; N sweep at d = {cfg.sweep_width}, parameter sweep "
                    f"at N = {cfg.param_samples}"),
        ("one step", "`zero_order`, TorchOpt and plain PyTorch return f(θ) and write every `.grad` "
                     f"(2N+1 evaluations); `estimate(inplace=True)` + `ZOSGD(lr={LR:g})` evaluates 2N+1 times and "
                     "updates the parameters; MeZO evaluates 2N times and updates them; EvoTorch's `PGPE.step()` "
                     "follows the last population's gradient, samples N mirrored directions and evaluates 2N members "
                     "in one vmapped call; torcheggroll's `step` evaluates 2N members in one vmapped call and updates "
                     "(`bench/baselines.py`)"),
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


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def footnote(cfg: Config, results: Sequence[DeviceResults]) -> str:
    """Device(s), versions, date and timing method, printed under every plot."""
    devices = "; ".join(f"[{device_tag(r.device)}] {device_name(r.device)}, backend {r.backend_note}" for r in results)
    mode = "QUICK SMOKE RUN, " if cfg.quick else ""
    return (
        f"{devices}\n{versions()}; {harness.now()}\n"
        f"{mode}median time per call (harness.time_call, <= {cfg.budget_s:g} s); "
        f"MLP d→d→10, batch {BATCH}, {METHOD}, sigma={SIGMA:g}; bench/run.py"
    )


def plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Callable[[DeviceResults], Dict[str, List[Tuple[float, float]]]],
    cfg: Config,
    results: Sequence[DeviceResults],
) -> None:
    """One log-log figure, a panel per device, a line per case; title and footnote name device, versions, date."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 5.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        for case, points in series(res).items():
            if not points:
                continue
            colour, marker = STYLES[case]
            xs, ys = zip(*sorted(points))
            floor = case == "inference"  # dashed and on top: the in-place contenders lie on it
            ax.plot(
                xs,
                ys,
                marker=marker,
                color=colour,
                label=MEMORY_CASES[case].replace("`", ""),
                linestyle="--" if floor else "-",
                zorder=3 if floor else 2,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"[{device_tag(res.device)}] {device_name(res.device)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, footnote(cfg, results), fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the plots are skipped, with a note, where it cannot)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(cfg: Config, results: Sequence[DeviceResults], out_dir: Path, prefix: str) -> List[Path]:
    """The three PNGs: time vs N, time vs parameter count, peak memory vs parameter count (none without matplotlib)."""
    if not have_matplotlib():
        return []
    paths = [out_dir / f"{prefix}-{name}.png" for name in ("time-vs-samples", "time-vs-params", "memory-vs-params")]

    def vs_samples(res: DeviceResults) -> Dict[str, List[Tuple[float, float]]]:
        points = [(n, res.times[(cfg.sweep_width, n)]) for n in cfg.sample_counts]
        return {c: [(n, t[c]) for n, t in points if c in t] for c in CONTENDERS}

    def vs_params(res: DeviceResults) -> Dict[str, List[Tuple[float, float]]]:
        points = [(mlp_numel(w), res.times[(w, cfg.param_samples)]) for w in cfg.widths]
        return {c: [(x, t[c]) for x, t in points if c in t] for c in CONTENDERS}

    def memory(res: DeviceResults) -> Dict[str, List[Tuple[float, float]]]:
        out: Dict[str, List[Tuple[float, float]]] = {}
        for case in MEMORY_CASES:
            out[case] = [
                (mlp_numel(w), peak / 2**20) for w in cfg.widths if (peak := peak_of(res, w, case)) is not None
            ]
        return out

    sweep_numel = f"{mlp_numel(cfg.sweep_width):,}"
    plot(
        paths[0],
        f"Time per gradient step vs num_samples N (MLP d={cfg.sweep_width}, {sweep_numel} params)\n{harness.now()}",
        "num_samples N",
        "seconds per step (median)",
        vs_samples,
        cfg,
        results,
    )
    plot(
        paths[1],
        f"Time per gradient step vs parameter count (N={cfg.param_samples})\n{harness.now()}",
        "parameters",
        "seconds per step (median)",
        vs_params,
        cfg,
        results,
    )
    plot(
        paths[2],
        f"Peak memory of one step vs parameter count (N={cfg.param_samples})\n{harness.now()}",
        "parameters",
        "peak memory (MiB)",
        memory,
        cfg,
        results,
    )
    return paths


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every benchmark of this machine, print the summary table, write the report and the plots."""
    parser = argparse.ArgumentParser(description="Every zo_kernels benchmark of this machine (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a short time budget per point")
    parser.add_argument(
        "--out-dir", type=Path, default=harness.ROOT / "bench" / "results", help="report and plots go here"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(harness.THREADS)
    cfg = Config.make(args.quick)
    devices = harness.devices()
    prefix = f"summary-{device_tag(devices[-1])}" + ("-quick" if cfg.quick else "")
    per_device = len(cfg.points()) * len(runnable()) + len(cfg.widths) * len(runnable_memory())
    progress = harness.Progress(per_device * len(devices))
    run = harness.Run()
    results: List[DeviceResults] = []
    for device in devices:
        backend, note = zo_backend(device)
        res = DeviceResults(device, note)
        time_points(cfg, device, backend, res, progress)
        memory_points(cfg, device, backend, res, progress)
        results.append(res)
    progress.close()

    summary = table(SUMMARY_COLUMNS, summary_rows(cfg, results))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(cfg, results, args.out_dir, prefix)
    footer = run.footer()
    head = header_lines(cfg, results, run.before) + ["## Summary: ratios against the baselines", ""] + summary
    head += ["", "What each baseline computes (same N antithetic pairs, same σ, same problem):", ""]
    head += [f"- {line}" for line in ESTIMATORS]
    skipped = [why for case in CONTENDERS if (why := missing(case)) is not None]
    if skipped:
        head += [f"- Not measured here: {', '.join(skipped)} (their cells say so; their ratios are left out)."]
    report = head + ["", "## Plots", ""] + ([f"![{p.stem}]({p.name})" for p in plots] or [PLOTS_MISSING])
    report += ["", "## Data behind the plots"] + data_tables(cfg, results) + ["", footer]
    md = args.out_dir / f"{prefix}.md"
    md.write_text("\n".join(report) + "\n")
    print("\n".join(head))
    print("\n" + footer)
    print(f"\nWrote {md} and {', '.join(p.name for p in plots) or 'no plots (' + PLOTS_MISSING + ')'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
