"""The meta-gradient's cost as the inner loop grows: ES (zo_kernels) vs explicit and implicit MAML (TorchOpt).

    python bench/meta_gradient.py [--quick] [--out-dir bench/results]   # full: k ∈ {1, 5, 20, 100}, ~2 min on 2 CPUs

One meta-step of ``python/es_maml.py``'s sinusoid regression (the meta-loss of a task batch and ``.backward()``, k
inner steps) by (a) zo_kernels ES (``es_maml.es_meta_loss``, ``batch_size=2N``: the 2N inner loops in one vmapped call,
no graph kept; (a') ``batch_size=2``), (b) TorchOpt explicit MAML (backprop through the unrolled loop, whose graph is
kept) and (c) TorchOpt iMAML (``custom_root`` on the proximal inner problem, ``solve_cg``): its time
(``harness.cpu_time``) and its peak memory above the baseline of a fresh single-threaded process
(``harness.memory_worker``). Writes ``meta_gradient-cpu[-quick].md`` and ``.png`` to ``--out-dir``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch

sys.path.insert(0, str(harness.ROOT / "python"))  # the examples directory (harness.tiny_gpt loads one by path)
import es_maml  # noqa: E402

torchopt = harness.optional("torchopt")  # optional: without it (b) and (c) say "torchopt not installed"
# TorchOpt 0.7.3's implicit differentiation calls functorch.vjp, which warns on every torch 2.x
warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)

METHODS = {
    "es": "(a) zo_kernels ES, `batch_size=2N`",
    "es_pair": "(a') zo_kernels ES, `batch_size=2`",
    "maml": "(b) TorchOpt explicit MAML (unrolled)",
    "imaml": "(c) TorchOpt implicit (iMAML, CG)",
}
STYLES = {"es": ("tab:blue", "o"), "es_pair": ("tab:cyan", "D"), "maml": ("tab:red", "s"), "imaml": ("tab:green", "^")}
LAM, CG_STEPS = 1.0, 5  # iMAML's proximal weight and the conjugate-gradient iterations of its implicit linear solve
# "flat in k": the peaks of the k after the first differ by at most 25% or by 1 MiB, about the noise of
# resident-set peaks between fresh processes (allocator arenas, page granularity)
FLAT, FLAT_BYTES = 1.25, 2**20
WORKER_TIMEOUT_S = 300


@dataclass(frozen=True)
class Config:
    """Sizes and time budget of one run."""

    quick: bool
    ks: Tuple[int, ...]
    tasks: int
    num_samples: int
    budget_s: float


QUICK = Config(True, (1, 3), 4, 4, 0.05)
FULL = Config(False, (1, 5, 20, 100), es_maml.META_BATCH, es_maml.NUM_SAMPLES, 3.0)  # es_maml's defaults


def meta_step(method: str, k: int, cfg: Config) -> Tuple[Callable[[], None], torch.Tensor]:
    """One meta-gradient of ``method`` with ``k`` inner steps on a fixed task batch, and the meta-parameters."""
    gen = torch.Generator().manual_seed(0)
    theta = es_maml.init_params(gen).requires_grad_()
    tasks = es_maml.sample_tasks(cfg.tasks, es_maml.SHOTS, gen, query=es_maml.QUERY).tensors()
    lr, n = es_maml.INNER_LR, cfg.num_samples
    if method.startswith("es"):
        meta = es_maml.es_meta_loss(k, lr, n, es_maml.SIGMA, batch_size=2 * n if method == "es" else 2)
    elif method == "maml":
        meta = es_maml.maml_meta_loss(k, lr, torchopt)
    else:
        meta = es_maml.imaml_meta_loss(k, lr, LAM, CG_STEPS, torchopt)

    def step() -> None:
        theta.grad = None
        meta(theta, *tasks).backward()

    return step, theta


def memory_case(method: str, k: int, quick: bool, device: torch.device) -> harness.Built:
    """A memory job's ``build`` (run in a fresh process by ``harness.memory_worker``)."""
    step, theta = meta_step(method, k, QUICK if quick else FULL)
    return step, [theta]


def measure(cfg: Config, methods: Sequence[str], progress: harness.Progress) -> Dict[Tuple[str, int], Dict]:
    """Time per meta-step here, then the peak memory of each point in fresh processes."""
    points = [(m, k) for m in methods for k in cfg.ks]
    results: Dict[Tuple[str, int], Dict] = {p: {} for p in points}
    for method, k in points:
        progress.show(f"time: {METHODS[method]}, k={k}")
        step, theta = meta_step(method, k, cfg)
        results[(method, k)]["seconds"] = harness.cpu_time(step, max_run_time=cfg.budget_s)
        harness.check_grads([theta], f"{method}, k={k}: the meta-gradient")
        progress.advance()
    jobs = [harness.MemoryJob(memory_case, dict(method=m, k=k, quick=cfg.quick), name=f"{m} k={k}") for m, k in points]
    memory = harness.run_memory_jobs(jobs, harness.memory_parallelism(), WORKER_TIMEOUT_S, progress)
    for point, mem in zip(points, memory):
        results[point].update(mem)
    return results


def ratio_rows(cfg: Config, methods: Sequence[str], res: Dict[Tuple[str, int], Dict]) -> List[List[str]]:
    """Per method: time and memory at the largest k over the smallest (and the second), and whether it is flat."""
    lo, second, hi = cfg.ks[0], cfg.ks[1], cfg.ks[-1]

    def ratio(m: str, key: str, a: int, b: int) -> float:
        num, den = res[(m, b)].get(key), res[(m, a)].get(key)
        return num / den if num is not None and den else math.nan

    rows = []
    for m in METHODS:
        if m not in methods:
            rows.append([METHODS[m], harness.missing("torchopt")] + [""] * (len(cfg.ks) > 2) + ["", ""])
            continue
        later = [res[(m, k)].get("delta") for k in (cfg.ks[1:] if len(cfg.ks) > 2 else cfg.ks)]
        first = res[(m, lo)].get("delta")

        def flat_among(peaks: List[float]) -> bool:
            return max(peaks) - min(peaks) <= max(FLAT_BYTES, (FLAT - 1) * min(peaks))

        if None in later or first is None:
            flat = "n/a"
        elif not flat_among(later):
            flat = "no: grows with k"
        else:
            flat = "yes" if flat_among([first, *later]) else f"yes from k={second} on"
        cells = [ratio(m, "seconds", lo, hi), ratio(m, "delta", lo, hi)]
        cells += [ratio(m, "delta", second, hi)] if len(cfg.ks) > 2 else []
        rows.append([METHODS[m], *("n/a" if math.isnan(c) else harness.fmt_ratio(c) for c in cells), flat])
    return rows


def report(cfg: Config, methods: Sequence[str], res: Dict, run: harness.Run, png: Optional[str]) -> List[str]:
    """The markdown report: header, table, ratios, what each method computes."""
    n, lo, hi = cfg.num_samples, cfg.ks[0], cfg.ks[-1]
    fields = [
        ("device", f"{harness.cpu_model()}, {harness.THREADS} threads of {os.cpu_count()} CPUs (memory: 1 thread)"),
        ("backend", harness.choose_backend()[1]),
        *run.fields(),
        ("mode", "quick (smoke run: tiny sizes, numbers not meaningful)" if cfg.quick else "full"),
        ("problem", f"`python/es_maml.py` sinusoids, MLP 1-40-40-1 ReLU ({es_maml.NUM_PARAMS:,} parameters), "
         f"{cfg.tasks} tasks per meta-step, K={es_maml.SHOTS} support + {es_maml.QUERY} query points, inner SGD lr "
         f"{es_maml.INNER_LR:g}; ES N={n} ({2 * n} inner loops), sigma={es_maml.SIGMA:g}; iMAML lambda={LAM:g}, "
         f"{CG_STEPS} CG iterations"),
        ("timing", harness.timing_note(cfg.budget_s) + "; one meta-step = meta-loss + `.backward()`"),
        ("memory", "`harness.memory_worker`: a fresh process per point (1 thread), one warm-up step, then the growth "
         "of the resident set during one step (`VmHWM` reset by `/proc/self/clear_refs`, glibc "
         "`MALLOC_MMAP_THRESHOLD_=65536`): bytes above the process's baseline"),
    ]
    lines = harness.header("Meta-gradient cost vs inner-loop length (`bench/meta_gradient.py`)", fields)
    rows = []
    for m in METHODS:
        for k in cfg.ks:
            if m not in methods:
                rows.append([METHODS[m], str(k), harness.missing("torchopt"), ""])
                continue
            r = res[(m, k)]
            mem = r["error"] if "error" in r else harness.fmt_mem(r["delta"])
            rows.append([METHODS[m], str(k), harness.fmt_time(r["seconds"]), mem])
    lines += harness.table(("method", "inner steps k", "time per meta-step", "peak memory above baseline"), rows)
    lines += ["", f"## Growth from k={lo} to k={hi}", ""]
    columns = [f"time k={hi} / k={lo}", f"memory k={hi} / k={lo}"]
    columns += [f"memory k={hi} / k={cfg.ks[1]}"] if len(cfg.ks) > 2 else []
    lines += harness.table(("method", *columns, "memory flat in k"), ratio_rows(cfg, methods, res))
    lines += ["", f"*memory flat in k*: the peaks at k = {', '.join(map(str, cfg.ks[1:]))} differ by at most "
              f"{FLAT - 1:.0%} or {FLAT_BYTES / 2**20:g} MiB (about the noise of resident-set peaks between fresh "
              f"processes), and from k = {lo}'s too for a plain *yes*."]  # fmt: skip
    lines += ["", "## What each method computes", ""]
    lines += [
        f"- (a), (a') an antithetic ES estimate of the gradient of the Gaussian-smoothed (sigma={es_maml.SIGMA:g}) "
        f"meta-loss from {2 * n} forward runs of the k-step inner loop (inner gradients by `torch.func.grad` under "
        "`no_grad`, no graph kept across steps): unbiased for the smoothed objective but noisy (relative variance ~ "
        "parameters / N); cost ~ 2N·k inner steps. Its memory is one vmapped call's: (a) all 2N inner loops at once, "
        "(a') one antithetic pair per call (N calls). The first inner step starts from a broadcast view of the "
        "perturbed parameters; from the second on, every task's adapted copy (2N × tasks × parameters for (a)) and its "
        "gradient are live, so the peak is reached at k = 2 and stays there.",
        "- (b) the exact gradient of the k-step meta-loss, second-order terms included (backprop through the "
        "unrolled inner loop): the graph of all k steps is held until `.backward()`.",
        f"- (c) the implicit-function-theorem gradient at the approximate solution of each task's proximal inner "
        f"problem `L_in(phi) + {LAM:g}/2 |phi - theta|^2` (k GD steps from theta, no graph): `(H + lambda I) u = "
        f"grad L_out` by {CG_STEPS} CG iterations of Hessian-vector products. A different objective from (a) and "
        "(b), exact only where the inner problem is solved (not at small k).",
    ]
    if png:
        lines += ["", f"![time and memory vs k]({png})"]
    return lines + ["", run.footer()]


def plot(path: Path, cfg: Config, methods: Sequence[str], res: Dict) -> None:
    """Time and memory vs k, log-log, a line per method (``harness.plot``)."""

    def lines(key: str, scale: float) -> List[Tuple[str, str, str, List[Tuple[int, float]]]]:
        return [(METHODS[m], *STYLES[m], [(k, res[(m, k)][key] * scale) for k in cfg.ks if key in res[(m, k)]])
                for m in methods]

    panels = [("", "inner steps k", "time per meta-step (s)", lines("seconds", 1.0)),
              ("", "inner steps k", "peak memory above baseline (MiB)", lines("delta", 2.0**-20))]
    title = f"meta-gradient cost vs k: sinusoid MAML, {cfg.tasks} tasks, ES N={cfg.num_samples}"
    foot = f"{harness.cpu_model()}, {harness.THREADS} threads; {harness.versions()}; {harness.now()}; "
    harness.plot(path, ("QUICK SMOKE RUN, " if cfg.quick else "") + title, foot + "bench/meta_gradient.py", panels,
                 size=(6, 5))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure every (method, k), print the report, write it and the plot to ``--out-dir``."""
    parser = harness.parser(__doc__, out=None)
    parser.add_argument("--out-dir", type=Path, default=harness.ROOT / "bench" / "results", help="report and plot")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    methods = [m for m in METHODS if m.startswith("es") or torchopt is not None]
    progress = harness.Progress(2 * len(methods) * len(cfg.ks))
    run = harness.Run()
    res = measure(cfg, methods, progress)
    progress.close()
    stem = f"meta_gradient-cpu{'-quick' if cfg.quick else ''}"
    png = f"{stem}.png" if harness.optional("matplotlib") else None
    harness.write(args.out_dir / f"{stem}.md", report(cfg, methods, res, run, png), echo=True)
    if png is None:
        print("matplotlib not installed: no plot", file=sys.stderr)
    else:
        plot(args.out_dir / png, cfg, methods, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
