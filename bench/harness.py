"""The shared pieces of every benchmark script in ``bench/``: timing, problems, environment, tables, workers.

The scripts (``run.py``, ``scale.py``, ``cpu_kernels.py``, ``gpu_kernels.py``) run from ``bench/`` and
import this module as a sibling (``import harness``); tests add ``bench/`` to ``sys.path`` once, as
``tests/test_sass.py`` does for ``sass_report``. No script imports another script.

**Timing.** :func:`cpu_time` is ``torch.utils.benchmark.Timer.adaptive_autorange``: the call is run in
blocks of ``number`` calls (``number`` grown by 10x until one block takes >= 10 ms, so the timer's own
overhead is < 1e-4 of a block; those first blocks are the warm-up), then blocks are timed until at
least 4 blocks and ``min_run_time`` seconds are in and the blocks' interquartile range is within
10% of their median, or ``max_run_time`` seconds are spent; the result is the median over blocks
of the time per call, measured with the torch threads of the caller (``num_threads``). A call
that takes longer than ``max_run_time`` is timed once after one warm-up call. :func:`gpu_time` is
``triton.testing.do_bench`` (median, L2 flushed between calls, ``warmup_ms`` / ``rep_ms`` of calls),
or CUDA events around repeated calls where triton is missing. :func:`time_call` picks by device.

**Problems.** The functional losses (``linear_loss``, ``mlp_loss``, ``deep_mlp_loss``) of a tuple of
parameter tensors, their parameter factories (:func:`make_problem`, :func:`wide_mlp`, :func:`mlp`)
and the ``TinyGPT`` of ``python/mezo_finetune.py`` (:func:`tiny_gpt`).

**Workers.** :func:`spawn` runs a module-level function in fresh processes through
``torch.multiprocessing.spawn`` (arguments: dataclasses), with the benchmark environment
(:func:`worker_env`) and a timeout; :func:`memory_worker` / :func:`run_memory_jobs` measure the peak
memory of one step per fresh process (``MemoryJob``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from baselines import torchopt_version

import zo_kernels
from zo_kernels import backends

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2  # torch.set_num_threads of every CPU benchmark

Params = Tuple[torch.Tensor, ...]
LossFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Environment: device, versions, threads, how busy the CPUs are
# --------------------------------------------------------------------------------------------------


def now(utc: bool = False) -> str:
    """The date and time of a report: local (``2026-12-01 09:20 UTC``), or UTC."""
    if utc:
        return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


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


def threads_line() -> str:
    """``2 (torch.set_num_threads); env: OMP_NUM_THREADS=...``: the value of a header's threads line."""
    return f"{torch.get_num_threads()} (torch.set_num_threads); {omp_environment()}"


def versions(torchopt: Optional[ModuleType], torch_extra: str = "", extra: str = "") -> str:
    """``torch X, zo_kernels Y, torchopt Z, python W`` (``torch_extra`` after torch's, ``extra`` before torchopt)."""
    return (
        f"torch {torch.__version__}{torch_extra}, {extra}zo_kernels {zo_kernels.__version__}, "
        f"{torchopt_version(torchopt)}, python {platform.python_version()}"
    )


def choose_backend() -> Tuple[str, str]:
    """``('cpu', note)`` when the native backend is built, else ``('reference', why not cpu)``."""
    status = backends.available().get("cpu", "unknown backend")
    if status == "available":
        return "cpu", "cpu (native C++/OpenMP)"
    return "reference", f"reference (pure PyTorch) -- FALLBACK, the 'cpu' backend is not available: {status}"


def devices() -> List[torch.device]:
    """The CPU, and the GPU when ``torch.cuda.is_available()``."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _system_cpu_seconds() -> Tuple[float, float]:
    """(busy, total) CPU seconds summed over all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished (waited-for) children: the workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Share of all cores used by *other* processes since construction (busy time minus ours and our workers')."""

    def __init__(self) -> None:
        self.busy, self.total = _system_cpu_seconds()
        self.own = _own_cpu_seconds()

    def fraction(self) -> float:
        """Other processes' CPU time over the elapsed CPU capacity, in [0, 1]."""
        busy, total = _system_cpu_seconds()
        others = (busy - self.busy) - (_own_cpu_seconds() - self.own)
        return min(max(others / max(total - self.total, 1e-9), 0.0), 1.0)


def start_monitor() -> Optional[OtherLoad]:
    """An :class:`OtherLoad` from now, or None where /proc/stat cannot be read."""
    try:
        return OtherLoad()
    except (OSError, ValueError, IndexError):
        return None


def load_note(when: str, monitor: Optional[OtherLoad]) -> str:
    """How much of the CPUs other processes used ``when``, with a warning above 10% (they distort timings)."""
    if monitor is None:
        return f"CPU use by other processes {when}: unknown"
    share = monitor.fraction()
    note = f"CPU use by other processes {when}: {share:.0%} of all cores"
    if share > 0.1:
        note += " -- WARNING: the machine was busy, timings are unreliable"
    return note


class Run:
    """The load around a run: the second before it (``before``) and the run itself (``footer()``)."""

    def __init__(self) -> None:
        monitor = start_monitor()
        time.sleep(1.0)
        self.before = load_note("in the second before the run", monitor)
        self.during = start_monitor()
        self.started = time.perf_counter()

    def footer(self) -> str:
        """``Measured in 12.3 s. CPU use by other processes during the run: ...``."""
        elapsed = time.perf_counter() - self.started
        return f"Measured in {elapsed:.1f} s. {load_note('during the run', self.during)}."


def header(title: str, fields: Sequence[Tuple[str, str]]) -> List[str]:
    """A report's header: ``# title``, then ``- key: value`` per field (``- value`` where key is empty)."""
    return [f"# {title}", ""] + [f"- {k}: {v}" if k else f"- {v}" for k, v in fields] + [""]


# --------------------------------------------------------------------------------------------------
# Tables, numbers, progress
# --------------------------------------------------------------------------------------------------


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A markdown table (tabulate's ``github`` format; empty cells as an en dash, pipes escaped)."""
    from tabulate import tabulate

    def cell(text: str) -> str:
        return (text or "–").replace("|", "\\|")

    body = [[cell(c) for c in row] for row in rows]
    return tabulate(body, headers=list(columns), tablefmt="github", disable_numparse=True).splitlines()


def rows_table(columns: Sequence[str], rows: Sequence[Any]) -> List[str]:
    """:func:`table` of dataclass rows, one field per column in declaration order."""
    return table(columns, [[getattr(row, f.name) for f in dataclasses.fields(row)] for row in rows])


def fmt_ms(seconds: float) -> str:
    """A duration in milliseconds, one decimal (seconds from 10 s)."""
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def fmt_time(seconds: float) -> str:
    """A duration with three significant digits in milliseconds (``fmt_ms`` from 10 s)."""
    if seconds >= 10:
        return fmt_ms(seconds)
    ms = seconds * 1e3
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def fmt_ratio(ratio: float) -> str:
    """A speed-up factor."""
    return f"{ratio:.2f}x"


def fmt_overhead(seconds: float, bare: float) -> str:
    """Time beyond the bare evaluations, as a percentage of them."""
    return f"{(seconds - bare) / bare * 100:+.0f}%"


def fmt_mib(nbytes: float) -> str:
    """Bytes in MiB, one decimal."""
    return f"{nbytes / 2**20:,.1f} MiB"


def fmt_mem(nbytes: float) -> str:
    """Bytes in MiB with three significant digits below 100 MiB (:func:`fmt_mib` above)."""
    return fmt_mib(nbytes) if nbytes >= 100 * 2**20 else f"{nbytes / 2**20:.3g} MiB"


def fmt_bytes(nbytes: Optional[float]) -> str:
    """Bytes with a binary unit (MiB, KiB, B); empty for None."""
    if nbytes is None:
        return ""
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def verdict(checks: Sequence[Tuple[str, bool]]) -> str:
    """'yes' when every check passes, else the names of the failing ones."""
    failed = [name for name, ok in checks if not ok]
    return "yes" if not failed else "NO: " + ", ".join(failed)


class Progress:
    """A tqdm progress bar on stderr: ``[#####     ] 12/40 00:35  label``."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        fmt = "[{bar:30}] {n_fmt}/{total_fmt} {elapsed}  {desc}"
        self.bar = tqdm(total=max(total, 1), file=sys.stderr, bar_format=fmt, ascii=" #", dynamic_ncols=False)

    def show(self, label: str) -> None:
        """Show ``label`` as the task now running."""
        self.bar.set_description_str(label[:110], refresh=True)

    def advance(self) -> None:
        """Count one task as done."""
        self.bar.update(1)

    def close(self) -> None:
        """Show the full bar and end the line."""
        self.show("done")
        self.bar.close()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def cpu_time(fn: Callable[[], object], max_run_time: float, min_run_time: float = 0.01) -> float:
    """Median seconds per call of ``fn()``: ``torch.utils.benchmark.Timer.adaptive_autorange`` (module docstring)."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.adaptive_autorange(threshold=0.1, min_run_time=min_run_time, max_run_time=max_run_time).median)


def gpu_time(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` on a CUDA device: ``triton.testing.do_bench`` (L2 flushed), else CUDA events."""
    try:
        import triton.testing
    except ImportError:
        fn()
        times: List[float] = []
        deadline = time.perf_counter() + rep_ms * 1e-3
        while len(times) < 3 or time.perf_counter() < deadline:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median seconds per call: :func:`cpu_time` on the CPU (at most ``budget_s``), :func:`gpu_time` on a GPU."""
    if device.type == "cuda":
        return gpu_time(fn) * 1e-3
    return cpu_time(fn, max_run_time=budget_s)


def timing_note(budget_s: float) -> str:
    """The value of a header's timing line for :func:`time_call`."""
    return (
        "CPU: `torch.utils.benchmark.Timer.adaptive_autorange` (blocks of calls after warm-up blocks, median "
        f"time per call over blocks, until the blocks' IQR is within 10% of their median or {budget_s:g} s); "
        "GPU: median of `triton.testing.do_bench` (warmup 25 ms, rep 100 ms, L2 flushed); device synchronized in "
        "each call"
    )


class Meter:
    """Median milliseconds (:func:`gpu_time`) and peak extra bytes of a call on a CUDA device."""

    def __init__(self, device: torch.device, warmup_ms: int, rep_ms: int) -> None:
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def ms(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of ``fn``."""
        return gpu_time(fn, self.warmup_ms, self.rep_ms)

    def peak(self, fn: Callable[[], Any]) -> int:
        """Bytes allocated at the peak of one call of ``fn`` above what was allocated before it."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base


class CpuMeter:
    """A :class:`Meter` for CPU tensors (dry runs): :func:`cpu_time` within 0.05 s, no memory statistics (0 bytes)."""

    warmup_ms, rep_ms = 0, 0

    def ms(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds per call."""
        return cpu_time(fn, max_run_time=0.05) * 1e3

    def peak(self, fn: Callable[[], Any]) -> int:
        """Runs ``fn``; CPU tensors have no allocator statistics."""
        fn()
        return 0


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def linear_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a linear model ``x @ w.T + b`` (TorchOpt's zero-order tutorial model)."""
    weight, bias = params
    return F.mse_loss(F.linear(x, weight, bias), y)


def mlp_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a two-layer tanh MLP."""
    w1, b1, w2, b2 = params
    return F.mse_loss(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)


def deep_mlp_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a tanh MLP of any depth (``params`` = weight, bias per layer; no tanh after the last)."""
    h = x
    for k in range(0, len(params), 2):
        h = F.linear(h, params[k], params[k + 1])
        if k + 2 < len(params):
            h = torch.tanh(h)
    return F.mse_loss(h, y)


def leaf_params(*modules: torch.nn.Module) -> Params:
    """The modules' parameters as detached leaf tensors that require grad (for a functional loss)."""
    return tuple(p.detach().clone().requires_grad_() for m in modules for p in m.parameters())


@dataclass
class Problem:
    """A loss over a tuple of parameter tensors (leaves that require grad), with its data."""

    name: str
    loss: LossFn
    params: Params
    x: torch.Tensor
    y: torch.Tensor

    @property
    def numel(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.params)

    def to(self, device: torch.device) -> Problem:
        """The same problem on ``device``."""
        params = tuple(p.detach().to(device).requires_grad_() for p in self.params)
        return Problem(self.name, self.loss, params, self.x.to(device), self.y.to(device))

    def plain_params(self) -> List[torch.Tensor]:
        """A copy of the parameters that does not require grad (for the in-place contenders)."""
        return [p.detach().clone() for p in self.params]


def make_problem(name: str, device: Optional[torch.device] = None) -> Problem:
    """``linear``: the tutorial-sized linear model (2,049 parameters); ``mlp``: the 1024-256-10 MLP (264,970)."""
    if name == "linear":
        x, y = torch.randn(64, 2048), torch.randn(64, 1)
        problem = Problem("linear 2048→1, batch 64, MSE", linear_loss, leaf_params(torch.nn.Linear(2048, 1)), x, y)
    elif name == "mlp":
        x, y = torch.randn(256, 1024), torch.randn(256, 10)
        params = leaf_params(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 10))
        problem = Problem("MLP 1024→256→10 tanh, batch 256, MSE", mlp_loss, params, x, y)
    else:
        raise ValueError(f"unknown model {name!r}")
    return problem if device is None else problem.to(device)


def wide_mlp(width: int, device: torch.device, batch: int = 64, outputs: int = 10) -> Problem:
    """The tanh MLP ``width -> width -> outputs`` and a batch, the same on every run and device (seeded by width)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(width)
    params = leaf_params(torch.nn.Linear(width, width), torch.nn.Linear(width, outputs))
    x, y = torch.randn(batch, width), torch.randn(batch, outputs)
    torch.random.set_rng_state(gen_state)
    return Problem(f"MLP {width}→{width}→{outputs}", mlp_loss, params, x, y).to(device)


def wide_mlp_numel(width: int, outputs: int = 10) -> int:
    """Parameters of :func:`wide_mlp` (without building it)."""
    return width * width + width + width * outputs + outputs


def mlp(sizes: Sequence[int], device: torch.device) -> Tuple[Params, LossFn]:
    """Leaf parameters of a tanh MLP with the given layer sizes, and its MSE loss (:func:`deep_mlp_loss`)."""
    params: List[torch.Tensor] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layer = torch.nn.Linear(fan_in, fan_out, device=device)
        params += [layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()]
    return tuple(params), deep_mlp_loss


def _mezo_finetune() -> ModuleType:
    """``python/mezo_finetune.py`` (the example that defines ``TinyGPT``), imported by path."""
    name = "mezo_finetune"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "python" / "mezo_finetune.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def tiny_gpt(
    gpt: Dict[str, int], device: torch.device
) -> Tuple[torch.nn.Module, List[torch.Tensor], torch.Tensor, LossFn]:
    """``TinyGPT`` of ``gpt``'s sizes on ``device``, its parameters, a batch of tokens and the next-token loss."""
    model = _mezo_finetune().TinyGPT(
        gpt["vocab"], gpt["seq_len"], gpt["d_model"], gpt["heads"], gpt["layers"], gpt["ff"]
    )
    model = model.to(device)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    tokens = torch.randint(gpt["vocab"], (gpt["batch"], gpt["seq_len"] + 1), device=device)

    def loss_fn(ps: Sequence[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, dict(zip(names, ps)), (batch[:, :-1],))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    return model, params, tokens, loss_fn


def grad_step(problem: Problem, decorated: LossFn) -> Callable[[], None]:
    """One step: the decorated loss and ``.backward()`` until every ``.grad`` is written (device synchronized)."""
    device = problem.x.device

    def run() -> None:
        for p in problem.params:
            p.grad = None
        decorated(problem.params, problem.x, problem.y).backward()
        sync(device)

    return run


def check_grads(problem: Problem, what: str) -> None:
    """After a gradient step: every ``.grad`` exists and is finite (otherwise the timing means nothing)."""
    if any(p.grad is None or not bool(torch.isfinite(p.grad).all()) for p in problem.params):
        raise RuntimeError(f"{what}: a step left a missing or non-finite gradient ({problem.name})")


def step_time(problem: Problem, decorated: LossFn, budget_s: float) -> float:
    """Median seconds of :func:`grad_step` (:func:`time_call`), its gradients checked afterwards."""
    seconds = time_call(grad_step(problem, decorated), problem.x.device, budget_s)
    check_grads(problem, "step")
    return seconds


def bare_evals(problem: Problem, evals: int) -> Callable[[], None]:
    """``evals`` plain calls of the undecorated loss under ``torch.no_grad()``: the cost of the evaluations alone."""

    def run() -> None:
        with torch.no_grad():
            for _ in range(evals):
                problem.loss(problem.params, problem.x, problem.y)
        sync(problem.x.device)

    return run


# --------------------------------------------------------------------------------------------------
# Workers: fresh processes through torch.multiprocessing.spawn
# --------------------------------------------------------------------------------------------------


def worker_env(threads: int) -> Dict[str, str]:
    """Environment of a worker: the package importable, glibc returning large blocks to the OS at once."""
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": str(threads)}
    # A fixed mmap threshold: every block above 64 KiB is its own mapping, unmapped when freed, so the
    # resident set follows the live tensors instead of glibc's heap (the CPU memory numbers).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    return env


@contextlib.contextmanager
def _environment(env: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``env`` (what a spawned process inherits), restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spawn(fn: Callable[..., None], args: Tuple[Any, ...], nprocs: int, threads: int, timeout_s: float) -> None:
    """``fn(index, *args)`` in ``nprocs`` fresh processes (``torch.multiprocessing.spawn``) with :func:`worker_env`.

    Raises RuntimeError with the last line of the failing worker's error, or on timeout (the workers,
    our own children, are then killed).
    """
    import torch.multiprocessing as mp

    with _environment(worker_env(threads)):
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(min(deadline - time.monotonic(), 1.0), 0.05)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker timed out after {timeout_s:.0f} s: {fn.__name__}")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise RuntimeError(f"{type(exc).__name__}: {lines[-1] if lines else exc}") from None
    finally:
        for proc in ctx.processes:  # only our own children, by handle
            if proc.is_alive():
                proc.kill()
                proc.join()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: What a memory job's ``build(**kwargs, device=...)`` returns: one step, and the parameters it trains.
Built = Tuple[Callable[[], None], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class MemoryJob:
    """One memory point: ``build`` (a module-level function) makes the step; measured in its own process."""

    build: Callable[..., Built]
    kwargs: Dict[str, Any]
    device: str = "cpu"
    threads: int = 1
    seed: Optional[int] = None
    out: str = ""


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


def memory_worker(index: int, jobs: Sequence[MemoryJob]) -> None:
    """``jobs[index]`` in this fresh process: a warm-up step, then the peak memory of one measured step.

    On a GPU ``torch.cuda.max_memory_allocated`` (parameters and data included); on the CPU the
    parameters' bytes plus the growth of the resident set during the step (peak RSS reset through
    ``/proc/self/clear_refs`` just before it; the peak since the start where that is refused).
    Writes ``peak, delta, base, params, numel, seconds, method`` as JSON to ``job.out``.
    """
    job = jobs[index]
    torch.set_num_threads(job.threads)
    if job.seed is not None:
        torch.manual_seed(job.seed)
    device = torch.device(job.device)
    step, params = job.build(device=device, **job.kwargs)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
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
        base = _rss_kib("VmRSS" if exact else "VmHWM") * 1024  # cannot reset: the peak since the start
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        delta = _rss_kib("VmHWM") * 1024 - base
        peak = param_bytes + delta
        method = "VmHWM reset" if exact else "VmHWM since start (could not reset)"
    numel = sum(p.numel() for p in params)
    result = dict(peak=peak, delta=delta, base=base, params=param_bytes, numel=numel, seconds=seconds, method=method)
    Path(job.out).write_text(json.dumps(result))


def run_memory_jobs(
    jobs: Sequence[MemoryJob],
    at_once: int,
    timeout_s: float,
    progress: Optional[Progress] = None,
    label: Callable[[Sequence[int]], str] = lambda _: "",
) -> List[Dict[str, Any]]:
    """Every job's result (``{"error": ...}`` where it failed), ``at_once`` fresh processes side by side.

    Each worker measures its own process, so running side by side changes the wall time, not the
    peaks. A failed group is rerun job by job to find out which one failed, and why. ``progress``
    shows ``label(indices)`` while a group runs and advances once per job.
    """
    results: List[Dict[str, Any]] = [{} for _ in jobs]
    at_once = max(at_once, 1)
    with tempfile.TemporaryDirectory() as tmp:
        placed = [dataclasses.replace(job, out=str(Path(tmp) / f"job{k}.json")) for k, job in enumerate(jobs)]

        def run(indices: Sequence[int]) -> None:
            group = [placed[k] for k in indices]
            spawn(memory_worker, (group,), len(group), max(job.threads for job in group), timeout_s)
            for k in indices:
                results[k] = json.loads(Path(placed[k].out).read_text())

        for lo in range(0, len(jobs), at_once):
            indices = list(range(lo, min(lo + at_once, len(jobs))))
            if progress is not None:
                progress.show(label(indices))
            try:
                run(indices)
            except RuntimeError as exc:
                for k in indices:
                    try:
                        if len(indices) == 1:
                            raise exc
                        run([k])
                    except RuntimeError as exc_k:
                        results[k] = {"error": str(exc_k)[:200]}
            if progress is not None:
                for _ in indices:
                    progress.advance()
    return results


def memory_parallelism() -> int:
    """How many single-threaded memory workers run side by side: one per CPU, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))
