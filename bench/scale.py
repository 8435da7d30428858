"""Scaling benchmark of zo_kernels: batched evaluation, MeZO memory mode and distributed estimation.

Run from the repository root::

    python bench/scale.py [--quick] [--out bench/results/scale.md]

Prints one markdown report (a header with date, device, versions and method notes, then one table)
and writes the same text to ``--out`` when given. Three sections, all measured in this run:

1. Step time, N = 100 antithetic samples of Normal noise, on TorchOpt's tutorial-size linear model
   and on the 1024-256-10 tanh MLP: ``zo_kernels.zero_order`` evaluating one sample per call (loop),
   with ``batch_size=B`` (vmapped; only if this build has it), and TorchOpt 0.7.3. Ratios vs TorchOpt.
2. Peak memory of one training step of a GPT-style model (``TinyGPT`` from
   ``python/mezo_finetune.py``): MeZO in place vs a scratch copy vs inference alone vs TorchOpt
   (and first-order backprop for reference), each configuration in a fresh subprocess.
3. Distributed: step time with 1 and 2 gloo ranks on 127.0.0.1 (``process_group=dist.group.WORLD``)
   and the bytes each rank sends per step, counted, vs an all-reduce of the gradient.

Every time is the median of repeated runs after one warm-up run (``time.perf_counter``); the GPU is
synchronized inside each timed run. Sections 1 and 2 also run on a CUDA device when there is one.
The header of the report explains how memory and bytes are measured.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels import distributions
from zo_kernels.optim import ZOSGD

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

from baselines import TORCHOPT_MISSING, import_torchopt, torchopt_version  # noqa: E402
from cpu_kernels import (  # noqa: E402
    OtherLoad,
    _system_cpu_seconds,
    choose_backend,
    cpu_model,
    fmt_ms,
    fmt_ratio,
    load_note,
    make_problem,
    median_time,
    omp_environment,
    verdict,
)
from mezo_finetune import TinyGPT  # noqa: E402

torchopt = import_torchopt()  # optional: without it the TorchOpt cells say TORCHOPT_MISSING

THREADS = 2
SIGMA = 0.01  # section 1 and 3 (as bench/cpu_kernels.py)
MEZO_SIGMA = 1e-3  # section 2 (MeZO's)
METHOD = "antithetic"
HAS_BATCH_SIZE = "batch_size" in inspect.signature(zo_kernels.zero_order).parameters
WORKER_TIMEOUT_S = 180


# --------------------------------------------------------------------------------------------------
# Configuration, report rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Sizes and repeat counts of one run."""

    quick: bool
    num_samples: int  # N of sections 1 and 3
    batch_sizes: Tuple[int, ...]  # B of section 1
    repeats: int  # timed runs per measurement, after one warm-up
    budget_s: float  # stop repeating once a measurement took this long (keeping >= min(3, repeats) runs)
    gpt: Dict[str, int]  # section 2 model and batch
    dist_steps: int  # timed steps per rank in section 3
    dist_threads: Tuple[Tuple[int, int], ...]  # (ranks, threads per rank) of section 3

    @staticmethod
    def make(quick: bool) -> Config:
        """The full configuration, or the ``--quick`` smoke-run one."""
        if quick:
            gpt = dict(vocab=4096, seq_len=64, d_model=256, heads=4, layers=4, ff=1024, batch=4)
            return Config(True, 100, (10, 100), 2, 1.0, gpt, 2, ((1, 1), (2, 1)))
        gpt = dict(vocab=8192, seq_len=128, d_model=384, heads=6, layers=6, ff=1536, batch=8)
        return Config(False, 100, (10, 100), 7, 6.0, gpt, 5, ((1, 1), (1, 2), (2, 1)))


COLUMNS = ("section", "case", "result", "baseline", "vs baseline", "target", "met", "detail")


@dataclass
class Row:
    """One table row; empty cells print as an en dash."""

    section: str
    case: str
    result: str = ""
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""
    detail: str = ""

    def cells(self) -> List[str]:
        """The row's cells in column order (pipes escaped)."""
        return [(v or "–").replace("|", "\\|") for v in vars(self).values()]


def render_table(rows: Sequence[Row]) -> str:
    """A markdown table of ``rows``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def fmt_mib(nbytes: float) -> str:
    """Bytes in MiB."""
    return f"{nbytes / 2**20:,.1f} MiB"


def fmt_bytes(nbytes: float) -> str:
    """Bytes, with a binary unit."""
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished (waited-for) children: the workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class RunLoad(OtherLoad):
    """``OtherLoad`` that does not count this benchmark's own worker processes as other load."""

    def __init__(self) -> None:
        self.busy, self.total = _system_cpu_seconds()
        self.own = _own_cpu_seconds()

    def fraction(self) -> float:
        """Other processes' CPU time over the elapsed CPU capacity, in [0, 1]."""
        busy, total = _system_cpu_seconds()
        others = (busy - self.busy) - (_own_cpu_seconds() - self.own)
        return min(max(others / max(total - self.total, 1e-9), 0.0), 1.0)


def start_monitor() -> Optional[RunLoad]:
    """A :class:`RunLoad` from now, or None where /proc/stat cannot be read."""
    try:
        return RunLoad()
    except (OSError, ValueError, IndexError):
        return None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(commands: Sequence[List[str]], env: Dict[str, str], timeout_s: float) -> List[str]:
    """Run the commands concurrently; return their stdout. Raises with their stderr on failure or timeout."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands
    ]
    deadline = time.monotonic() + timeout_s
    outputs, errors = [], []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"worker timed out after {timeout_s:.0f} s: {' '.join(proc.args)}") from None
            outputs.append(out)
            if proc.returncode != 0:
                errors.append(f"exit {proc.returncode}: {err.strip().splitlines()[-1:] or ''}")
    finally:
        for proc in procs:  # only our own children, by handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise RuntimeError("; ".join(errors))
    return outputs


def worker_env(threads: int) -> Dict[str, str]:
    """Environment of a worker: the package importable, glibc returning large blocks to the OS at once."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    # A fixed mmap threshold: every block above 64 KiB is its own mapping, unmapped when freed, so the
    # resident set follows the live tensors instead of glibc's heap (RSS deltas in section 2).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    return env


# --------------------------------------------------------------------------------------------------
# Section 1: step time, loop vs batched vs TorchOpt
# --------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A loss over a tuple of parameter tensors, with its data, on one device."""

    name: str
    loss: Callable[..., torch.Tensor]
    params: Tuple[torch.Tensor, ...]
    x: torch.Tensor
    y: torch.Tensor
    min_speedup: float  # target for the batched mode vs TorchOpt

    @property
    def numel(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.params)


def problem_on(name: str, device: torch.device) -> Problem:
    """``bench/cpu_kernels.py``'s linear (2,049 params) or MLP (264,970 params) problem on ``device``."""
    base = make_problem(name)
    params = tuple(p.detach().to(device).requires_grad_() for p in base.params)
    target = 10.0 if name == "linear" else 1.3
    return Problem(base.name, base.loss, params, base.x.to(device), base.y.to(device), target)


def step_time(problem: Problem, decorated: Callable[..., torch.Tensor], cfg: Config) -> float:
    """Seconds for one step: the decorated loss and its backward, until every ``.grad`` is written."""
    device = problem.x.device

    def run() -> None:
        for p in problem.params:
            p.grad = None
        decorated(problem.params, problem.x, problem.y).backward()
        sync(device)

    seconds = median_time(run, cfg.repeats, cfg.budget_s)
    if any(p.grad is None or not bool(torch.isfinite(p.grad).all()) for p in problem.params):
        raise RuntimeError(f"{problem.name}: a step left a missing or non-finite gradient")
    return seconds


def bare_time(problem: Problem, evals: int, cfg: Config) -> float:
    """Seconds for ``evals`` plain calls of the loss under ``torch.no_grad()``."""

    def run() -> None:
        with torch.no_grad():
            for _ in range(evals):
                problem.loss(problem.params, problem.x, problem.y)
        sync(problem.x.device)

    return median_time(run, cfg.repeats, cfg.budget_s)


def ours(cfg: Config, **extra: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """``zo_kernels.zero_order`` with Normal noise, antithetic, N samples (plus ``extra`` options)."""
    return zo_kernels.zero_order(
        distributions.Normal(), method=METHOD, argnums=0, num_samples=cfg.num_samples, sigma=SIGMA, **extra
    )


def torchopt_decorator(cfg: Config, device: torch.device) -> Callable[[Callable[..., torch.Tensor]], Any]:
    """TorchOpt's ``zero_order`` with a standard Normal whose samples land on ``device``."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torchopt.diff.zero_order(
        torch.distributions.Normal(zero, one), method=METHOD, argnums=0, num_samples=cfg.num_samples, sigma=SIGMA
    )


def step_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 1 on one device: loop, batched and TorchOpt, for the linear model and the MLP."""
    rows: List[Row] = []
    for name in ("linear", "mlp"):
        problem = problem_on(name, device)
        section = f"1. step time [{device.type}], N={cfg.num_samples} {METHOD}, Normal: {problem.name} " + (
            f"({problem.numel:,} params)"
        )
        evals = 2 * cfg.num_samples + 1
        t_opt = step_time(problem, torchopt_decorator(cfg, device)(problem.loss), cfg) if torchopt is not None else None
        t_loop = step_time(problem, ours(cfg)(problem.loss), cfg)
        t_bare = bare_time(problem, evals, cfg)
        baseline = f"TorchOpt {fmt_ms(t_opt)}" if t_opt is not None else ""

        def vs_torchopt(seconds: float, t_opt: Optional[float] = t_opt) -> str:
            return fmt_ratio(t_opt / seconds) if t_opt is not None else ""

        opt_result = fmt_ms(t_opt) if t_opt is not None else TORCHOPT_MISSING
        rows.append(Row(section, "TorchOpt 0.7.3 `torchopt.diff.zero_order`", opt_result, detail=""))
        rows.append(
            Row(
                section,
                "zo_kernels loop: `zero_order(...)`",
                fmt_ms(t_loop),
                baseline,
                vs_torchopt(t_loop),
                detail=f"{evals} plain evaluations alone (no_grad loop): {fmt_ms(t_bare)}",
            )
        )
        if not HAS_BATCH_SIZE:
            rows.append(
                Row(
                    section,
                    "zo_kernels batched: `zero_order(..., batch_size=B)`",
                    "batch_size not available in this build",
                    target=f"≥ {problem.min_speedup:g}x vs TorchOpt",
                    met="not measured",
                )
            )
            continue
        for b in cfg.batch_sizes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t_b = step_time(problem, ours(cfg, batch_size=b)(problem.loss), cfg)
            fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            if t_opt is not None:
                met = verdict([("speed-up", t_opt / t_b >= problem.min_speedup), ("vmap", not fallback)])
            else:
                met = f"{'NO: vmap' if fallback else 'vmap ok'}; speed-up not measured ({TORCHOPT_MISSING})"
            rows.append(
                Row(
                    section,
                    f"zo_kernels batched: `zero_order(..., batch_size={b})`",
                    fmt_ms(t_b),
                    baseline,
                    vs_torchopt(t_b),
                    f"≥ {problem.min_speedup:g}x vs TorchOpt",
                    met,
                    ("FELL BACK TO THE LOOP: " + fallback[0][:160]) if fallback else "",
                )
            )
    return rows


# --------------------------------------------------------------------------------------------------
# Section 2: peak memory of one step, one fresh subprocess per configuration
# --------------------------------------------------------------------------------------------------

MEMORY_CASES = (
    ("inference", "inference alone: one forward under `torch.no_grad()`"),
    ("mezo_inplace", "MeZO step: `estimate(..., inplace=True)` + `ZOSGD(lr).step(sg)`"),
    ("mezo_copy", "`estimate(..., inplace=False)` + `ZOSGD(lr).step(sg)` (perturbs a copy of the parameters)"),
    ("zero_order_inplace", "`zero_order(..., inplace=True)` + `.backward()` (writes `.grad`)"),
    ("torchopt", "TorchOpt 0.7.3 `zero_order` + `.backward()` (writes `.grad`)"),
    ("backprop", "first-order reference: `loss.backward()` (autograd, writes `.grad`)"),
)
QUICK_MEMORY_CASES = ("inference", "mezo_inplace", "mezo_copy", "torchopt")


def _rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(case: str, device_name: str, gpt: Dict[str, int], out: str) -> None:
    """One configuration of section 2 in this (fresh) process: warm-up step, then the measured step."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    device = torch.device(device_name)
    model = TinyGPT(gpt["vocab"], gpt["seq_len"], gpt["d_model"], gpt["heads"], gpt["layers"], gpt["ff"]).to(device)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    model.requires_grad_(case in ("torchopt", "backprop", "zero_order_inplace"))
    tokens = torch.randint(gpt["vocab"], (gpt["batch"], gpt["seq_len"] + 1), device=device)
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    def loss_fn(ps: Sequence[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, dict(zip(names, ps)), (batch[:, :-1],))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    optimizer = ZOSGD(params, lr=1e-6)
    zo_inplace = zo_kernels.zero_order(
        distributions.Normal(), method=METHOD, num_samples=1, sigma=MEZO_SIGMA, inplace=True
    )(loss_fn)
    if case == "torchopt":
        if torchopt is None:
            raise RuntimeError(f"memory case 'torchopt': {TORCHOPT_MISSING}")
        zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
        to_fn = torchopt.diff.zero_order(
            torch.distributions.Normal(zero, one), method=METHOD, argnums=0, num_samples=1, sigma=MEZO_SIGMA
        )(lambda ps, batch: loss_fn(list(ps), batch))

    def step() -> None:
        if case == "inference":
            with torch.no_grad():
                loss_fn(params, tokens)
        elif case in ("mezo_inplace", "mezo_copy"):
            sg = zo_kernels.estimate(
                loss_fn,
                params,
                tokens,
                method=METHOD,
                num_samples=1,
                sigma=MEZO_SIGMA,
                inplace=case == "mezo_inplace",
            )
            optimizer.step(sg)
        elif case == "zero_order_inplace":
            zo_inplace(params, tokens).backward()
        elif case == "torchopt":
            to_fn(tuple(params), tokens).backward()
        elif case == "backprop":
            loss_fn(params, tokens).backward()
        else:
            raise ValueError(f"unknown memory case {case!r}")
        sync(device)

    step()  # warm-up: lazy initialisations (kernels, thread pools) are not the step's memory
    for p in params:
        p.grad = None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        delta, method = peak - base, "cuda max_memory_allocated"
    else:
        exact = _reset_peak_rss()
        base = _rss_kib("VmRSS") * 1024
        if not exact:  # cannot reset: the peak since the process started
            base = _rss_kib("VmHWM") * 1024
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        delta = _rss_kib("VmHWM") * 1024 - base
        peak = param_bytes + delta
        method = "VmHWM reset" if exact else "VmHWM since start (could not reset)"
    numel = sum(p.numel() for p in params)
    result = dict(peak=peak, delta=delta, base=base, params=param_bytes, numel=numel, seconds=seconds, method=method)
    Path(out).write_text(json.dumps(result))


def memory_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 2 on one device: one fresh subprocess per configuration."""
    gpt = cfg.gpt
    cases = [c for c in MEMORY_CASES if not cfg.quick or c[0] in QUICK_MEMORY_CASES]
    results: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, _ in cases:
            if case == "torchopt" and torchopt is None:
                results[case] = {"missing": TORCHOPT_MISSING}
                continue
            out = str(Path(tmp) / f"{case}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", case, "--device", str(device)]
            cmd += ["--gpt", json.dumps(gpt), "--worker-out", out]
            try:
                run_workers([cmd], worker_env(THREADS), WORKER_TIMEOUT_S)
                results[case] = json.loads(Path(out).read_text())
            except RuntimeError as exc:
                results[case] = {"error": str(exc)[:200]}
    n_params = max((r.get("numel", 0) for r in results.values()), default=0)
    section = (
        f"2. peak memory of one step [{device.type}]: TinyGPT {n_params / 1e6:.1f}M params "
        f"(d={gpt['d_model']}, {gpt['layers']} layers, vocab {gpt['vocab']}), batch {gpt['batch']}×{gpt['seq_len']}, "
        f"N=1 {METHOD}, sigma={MEZO_SIGMA:g}"
    )
    ref = results.get("inference", {})
    rows = []
    for case, label in cases:
        r = results[case]
        if "missing" in r:
            rows.append(Row(section, label, r["missing"]))
            continue
        if "error" in r:
            rows.append(Row(section, label, "FAILED", detail=r["error"]))
            continue
        what = "peak allocated" if device.type == "cuda" else "params + RSS growth"
        detail = (
            f"{what}: {fmt_mib(r['params'])} params, +{fmt_mib(r['delta'])} during the step; "
            f"step {fmt_ms(r['seconds'])}; {r['method']}"
        )
        row = Row(section, label, fmt_mib(r["peak"]), detail=detail)
        if case != "inference" and "peak" in ref:
            row.baseline = f"inference {fmt_mib(ref['peak'])}"
            row.ratio = f"{r['peak'] / ref['peak']:.2f}x"
        if case == "mezo_inplace" and "peak" in ref:
            row.target = "≤ 1.1x inference"
            row.met = verdict([("peak", r["peak"] <= 1.1 * ref["peak"])])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Section 3: distributed estimation over gloo ranks
# --------------------------------------------------------------------------------------------------


def dist_worker(rank: int, world: int, port: int, threads: int, steps: int, samples: int, out: str) -> None:
    """One rank of section 3: time ``steps`` estimates per model, count the bytes this rank sends."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    sent = {"bytes": 0}
    original = {name: getattr(dist, name) for name in ("broadcast", "all_gather", "all_reduce")}

    def counting(name: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            position = 1 if name == "all_gather" else 0  # all_gather(tensor_list, tensor), others (tensor, ...)
            tensor = kwargs["tensor"] if "tensor" in kwargs else args[position]
            src = kwargs["src"] if "src" in kwargs else (args[1] if len(args) > 1 else None)
            if name != "broadcast" or dist.get_rank() == src:  # a broadcast is sent by its source only
                sent["bytes"] += tensor.numel() * tensor.element_size()
            return original[name](*args, **kwargs)

        return wrapper

    for name in original:  # zo_kernels calls torch.distributed.<name> at run time
        setattr(dist, name, counting(name))

    results = {}
    for name in ("linear", "mlp"):
        torch.manual_seed(0)  # the same problem on every rank
        problem = problem_on(name, torch.device("cpu"))
        decorated = zo_kernels.zero_order(
            distributions.Normal(),
            method=METHOD,
            argnums=0,
            num_samples=samples,
            sigma=SIGMA,
            process_group=dist.group.WORLD,
        )(problem.loss)

        def step(problem: Problem = problem, decorated: Callable[..., torch.Tensor] = decorated) -> None:
            for p in problem.params:
                p.grad = None
            decorated(problem.params, problem.x, problem.y).backward()

        step()  # warm-up
        times = []
        sent["bytes"] = 0
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            original["all_reduce"](elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank is done
            times.append(float(elapsed))
        step_bytes = sent["bytes"] / steps
        # What data parallelism with first-order gradients would send instead: an all-reduce of n float32.
        grad = torch.ones(problem.numel, dtype=torch.float32)
        ar_times = []
        for _ in range(max(steps, 3)):
            dist.barrier()
            start = time.perf_counter()
            original["all_reduce"](grad)
            ar_times.append(time.perf_counter() - start)
        results[name] = dict(
            step=statistics.median(times),
            sent=step_bytes,
            numel=problem.numel,
            allreduce=statistics.median(ar_times),
            name=problem.name,
        )
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def dist_rows(cfg: Config) -> List[Row]:
    """Section 3: 1 rank vs 2 gloo ranks on the CPU, one launch per (ranks, threads) setting."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return [Row("3. distributed", "gloo", "torch.distributed with gloo not available in this build")]
    runs: Dict[Tuple[int, int], Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in cfg.dist_threads:
            out = str(Path(tmp) / f"dist_{world}_{threads}.json")
            port = free_port()
            commands = [
                [sys.executable, str(Path(__file__).resolve()), "--dist-worker", str(rank), str(world), str(port)]
                + [str(threads), str(cfg.dist_steps), str(cfg.num_samples), out]
                for rank in range(world)
            ]
            try:
                run_workers(commands, worker_env(threads), WORKER_TIMEOUT_S)
                runs[(world, threads)] = json.loads(Path(out).read_text())
            except RuntimeError as exc:
                runs[(world, threads)] = {"error": str(exc)[:200]}
    rows: List[Row] = []
    for name in ("linear", "mlp"):
        ref = runs.get((1, 1), {}).get(name)
        section = None
        for (world, threads), result in runs.items():
            case = f"{world} rank{'s' if world > 1 else ''} × {threads} thread{'s' if threads > 1 else ''}"
            if "error" in result:
                rows.append(Row(f"3. distributed [cpu, gloo]: {name}", case, "FAILED", detail=result["error"]))
                continue
            r = result[name]
            section = (
                f"3. distributed [cpu, gloo, 127.0.0.1]: {r['name']} ({r['numel']:,} params), "
                f"N={cfg.num_samples} {METHOD}, `process_group=dist.group.WORLD`"
            )
            row = Row(section, f"step time, {case}", fmt_ms(r["step"]))
            if ref is not None and (world, threads) != (1, 1):
                row.baseline = f"1 rank × 1 thread {fmt_ms(ref['step'])}"
                row.ratio = f"speed-up {ref['step'] / r['step']:.2f}x"
            rows.append(row)
        two = runs.get((2, 1), {}).get(name)
        if two is not None and section is not None:
            signs = 2 if METHOD == "antithetic" else 1
            expected = cfg.num_samples * 8 * signs
            allreduce_bytes = two["numel"] * 4
            rows.append(
                Row(
                    section,
                    "bytes rank 0 of 2 sends per step (counted at the torch.distributed calls)",
                    fmt_bytes(two["sent"]),
                    f"all-reduce of the float32 gradient: n × 4 = {fmt_bytes(allreduce_bytes)}",
                    f"{allreduce_bytes / max(two['sent'], 1):,.0f}x fewer",
                    detail=(
                        f"all ranks' losses gathered: N × 8 B × {signs} signs = {fmt_bytes(expected)}, each rank "
                        f"sending its half (N/2 × 8 B × {signs}) and a failure flag (8 B × {signs}), "
                        f"plus the 8-byte seed from rank 0; "
                        f"gloo all-reduce of n float32 measured here: {fmt_ms(two['allreduce'])} per call"
                    ),
                )
            )
    return rows


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def header_lines(cfg: Config, backend_note: str, load: str, devices: Sequence[torch.device]) -> List[str]:
    """The lines printed above the table."""
    gpu = (
        f"; GPU: {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else "; no GPU: sections 1-2 on the CPU only"
    )
    batched = (
        f"`batch_size` available (B = {', '.join(map(str, cfg.batch_sizes))})"
        if HAS_BATCH_SIZE
        else "batch_size not available in this build"
    )
    return [
        "# zo_kernels scaling benchmark: batched evaluation, memory, distributed",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- device: {cpu_model()} ({os.cpu_count()} CPUs){gpu}",
        f"- versions: torch {torch.__version__}, zo_kernels {zo_kernels.__version__}, "
        f"{torchopt_version(torchopt)}, python {platform.python_version()}",
        f"- threads: {THREADS} (torch.set_num_threads); {omp_environment()}",
        f"- {load}",
        f"- backend: {backend_note}; devices measured: {', '.join(d.type for d in devices)}",
        f"- mode: {'quick (smoke run)' if cfg.quick else 'full'}; {batched}",
        f"- timing: median of up to {cfg.repeats} runs after 1 warm-up (fewer, but at least "
        f"{min(3, cfg.repeats)}, when a measurement exceeds {cfg.budget_s:g} s); CUDA synchronized in each run",
        "- section 1: one step = the decorated loss and `.backward()` until every `.grad` is written; "
        f"sigma = {SIGMA}; ratio = TorchOpt time / our time",
        "- section 2 method: each configuration runs in a fresh Python process that builds the model, runs "
        "one warm-up step, drops `.grad`, then measures one step. On a GPU the peak is "
        "`torch.cuda.max_memory_allocated` (parameters included). On the CPU it is the parameters' bytes "
        "plus the growth of the process's resident set during the step: the peak RSS (`VmHWM`) is reset "
        "through `/proc/self/clear_refs` just before the step and the RSS at that moment subtracted; "
        "glibc runs with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors leave the resident set at once. "
        "This approximates the CUDA number (tensor memory), leaving out the Python/torch runtime "
        "(a few hundred MiB, the same for every configuration)",
        f"- section 3 method: one process per rank (`torch.set_num_threads` threads each), gloo over "
        f"127.0.0.1; the step time is the slowest rank's (MAX all-reduce), median of {cfg.dist_steps} steps "
        "after a warm-up; bytes are counted by wrapping `torch.distributed.broadcast/all_gather/all_reduce` "
        "(payload this rank contributes, transport overhead excluded)",
        "",
    ]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options (the ``--*-worker`` ones are internal)."""
    parser = argparse.ArgumentParser(description="zo_kernels scaling benchmark (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, a smaller GPT, fewer steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--gpt", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist-worker", nargs=7, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the report, and write it to ``--out`` when given."""
    args = parse_args(argv)
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.device, json.loads(args.gpt), args.worker_out)
        return 0
    if args.dist_worker is not None:
        rank, world, port, threads, steps, samples = (int(v) for v in args.dist_worker[:6])
        dist_worker(rank, world, port, threads, steps, samples, args.dist_worker[6])
        return 0

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = Config.make(args.quick)
    _, backend_note = choose_backend()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    before = start_monitor()
    time.sleep(1.0)
    load = load_note("in the second before the run", before)
    during = start_monitor()
    started = time.perf_counter()
    rows: List[Row] = []
    for device in devices:
        rows += step_rows(cfg, device)
    for device in devices:
        rows += memory_rows(cfg, device)
    rows += dist_rows(cfg)
    elapsed = time.perf_counter() - started
    footer = [f"Measured in {elapsed:.1f} s. {load_note('during the run', during)}."]
    lines = header_lines(cfg, backend_note, load, devices) + [render_table(rows), ""] + footer
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
