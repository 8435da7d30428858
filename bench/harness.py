"""What every script in ``bench/`` shares: environment, tables, plots, timing, problems, baselines, workers.

The scripts import this module as a sibling (``import harness``); bench/README.md describes the timing
(:func:`time_call`) and the memory measurement (:func:`memory_worker`: one step in a fresh process).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import importlib.util
import json
import logging
import os
import platform
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels import backends

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2  # torch.set_num_threads of every CPU benchmark
Params = Tuple[torch.Tensor, ...]
LossFn = Callable[..., torch.Tensor]
#: The optional packages (baselines, model and plot libraries): a missing one leaves its cells saying so.
OPTIONAL = ("torchopt", "evotorch", "torcheggroll", "transformers", "matplotlib", "triton")

# --- environment -----------------------------------------------------------------------------------


def now() -> str:
    """The date and time of a report (``2026-12-01 09:20 UTC``)."""
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The device in words, for headers and plot titles."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {THREADS} threads of {os.cpu_count()} CPUs"


def threads_line() -> str:
    """A header's threads line: torch's threads and the OpenMP variables that change their behaviour."""
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    env = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in names)
    return f"{torch.get_num_threads()} (torch.set_num_threads); env: {env}"


def versions(*peers: str, torch_extra: str = "") -> str:
    """``torch X, <peers>, zo_kernels Y, torchopt Z, python W`` (:func:`version` of each peer; ``torch_extra`` after
    torch's version)."""
    own = [f"zo_kernels {zo_kernels.__version__}", version("torchopt"), f"python {platform.python_version()}"]
    return ", ".join([f"torch {torch.__version__}{torch_extra}", *map(version, peers), *own])


def choose_backend(device: torch.device = torch.device("cpu")) -> Tuple[str, str]:
    """The backend ``zero_order`` uses on ``device`` and a note: on the CPU ``('cpu', note)`` when the native backend is
    built, else ``('reference', why not cpu)``; on a GPU the best one available for float32."""
    if device.type == "cuda":
        name = backends.select(device, torch.float32).name
        return name, f"{name} (best available for CUDA float32)"
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


class Run:
    """A run: torch's threads set to :data:`THREADS`, and how busy the CPUs were with *other* processes (busy time minus
    ours and our workers'), from /proc/stat, in the second before it (``before``) and during it (``footer()``); above
    10% the timings are unreliable."""

    def __init__(self) -> None:
        torch.set_num_threads(THREADS)
        first = self._sample()
        time.sleep(1.0)
        self.before = self._note("in the second before the run", first)
        self.during, self.started = self._sample(), time.perf_counter()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle, tick, t = fields[3] + (fields[4] if len(fields) > 4 else 0), os.sysconf("SC_CLK_TCK"), os.times()
        return (sum(fields) - idle) / tick, sum(fields) / tick, t.user + t.system + t.children_user + t.children_system

    def _note(self, when: str, start: Optional[Tuple[float, float, float]]) -> str:
        end = self._sample()
        if start is None or end is None:
            return f"CPU use by other processes {when}: unknown"
        (b0, t0, o0), (b1, t1, o1) = start, end
        share = min(max(((b1 - b0) - (o1 - o0)) / max(t1 - t0, 1e-9), 0.0), 1.0)
        warn = " -- WARNING: the machine was busy, timings are unreliable" if share > 0.1 else ""
        return f"CPU use by other processes {when}: {share:.0%} of all cores{warn}"

    def fields(self, *peers: str, torch_extra: str = "") -> List[Tuple[str, str]]:
        """A header's fields: :func:`versions` (of ``peers`` too), torch's threads, the CPU use before the run."""
        return [("versions", versions(*peers, torch_extra=torch_extra)), ("threads", threads_line()), ("", self.before)]

    def footer(self) -> str:
        """``Measured in 12.3 s. CPU use by other processes during the run: ...``."""
        return f"Measured in {time.perf_counter() - self.started:.1f} s. {self._note('during the run', self.during)}."


def header(title: str, fields: Sequence[Tuple[str, str]]) -> List[str]:
    """A report's header: ``# title``, the date, then ``- key: value`` per field (``- value`` where key is empty)."""
    return [f"# {title}", "", f"- date: {now()}"] + [f"- {k}: {v}" if k else f"- {v}" for k, v in fields] + [""]


def parser(doc: str, out: Optional[str] = "also write the report to this file") -> argparse.ArgumentParser:
    """A script's argument parser: ``--quick`` (smoke run) and, where ``out`` says what it is, ``--out FILE``."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a short time budget per point")
    if out:
        p.add_argument("--out", type=Path, default=None, help=out)
    return p


def write(path: Optional[Path], lines: Sequence[str], echo: bool = False) -> None:
    """Write a report (a run cut short keeps what was written; not where ``path`` is None); where ``echo``, print it
    and say on stderr where it went."""
    if echo:
        print("\n".join(lines))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if echo:
            print(f"{Path(sys.argv[0]).name}: wrote {path}", file=sys.stderr)


# --- tables, numbers, progress ---------------------------------------------------------------------


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A markdown table (tabulate's ``github`` format; empty cells as an en dash, pipes escaped)."""
    from tabulate import tabulate

    body = [[(c or "–").replace("|", "\\|") for c in row] for row in rows]
    return tabulate(body, headers=list(columns), tablefmt="github", disable_numparse=True).splitlines()


def rows_table(columns: Sequence[str], rows: Sequence[Any]) -> List[str]:
    """:func:`table` of dataclass rows, one field per column in declaration order."""
    return table(columns, [[getattr(row, f.name) for f in dataclasses.fields(row)] for row in rows])


def fmt_ms(seconds: float) -> str:
    """A duration in milliseconds, one decimal (seconds from 10 s)."""
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def fmt_time(seconds: float) -> str:
    """A duration with three significant digits in milliseconds (``fmt_ms`` from 10 s)."""
    ms = seconds * 1e3
    return fmt_ms(seconds) if seconds >= 10 else (f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms")


def fmt_ratio(ratio: float) -> str:
    """A speed-up factor."""
    return f"{ratio:.2f}x"


def fmt_mem(nbytes: float) -> str:
    """Bytes in MiB: three significant digits below 100 MiB, one decimal above."""
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 100 * 2**20 else f"{nbytes / 2**20:.3g} MiB"


def fmt_bytes(nbytes: Optional[float]) -> str:
    """Bytes with a binary unit (MiB, KiB, B); empty for None."""
    if nbytes is None:
        return ""
    unit, size = next(((u, s) for u, s in (("MiB", 2**20), ("KiB", 2**10)) if nbytes >= s), ("B", 0))
    return f"{nbytes / size:,.1f} {unit}" if size else f"{nbytes:,.0f} B"


def verdict(checks: Sequence[Tuple[str, bool]]) -> str:
    """'yes' when every check passes, else the names of the failing ones."""
    failed = [name for name, ok in checks if not ok]
    return "NO: " + ", ".join(failed) if failed else "yes"


class Progress:
    """A tqdm progress bar on stderr: ``[#####     ] 12/40 00:35  label``."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        fmt = "[{bar:30}] {n_fmt}/{total_fmt} {elapsed}  {desc}"
        self.bar = tqdm(total=max(total, 1), file=sys.stderr, bar_format=fmt, ascii=" #", dynamic_ncols=False)

    def show(self, label: str) -> None:
        """Show ``label`` as the task now running."""
        self.bar.set_description_str(label[:110], refresh=True)

    def advance(self, tasks: int = 1) -> None:
        """Count ``tasks`` tasks as done."""
        self.bar.update(tasks)

    def close(self) -> None:
        """Show the full bar and end the line."""
        self.show("done")
        self.bar.close()


#: One panel of :func:`plot`: title, x label, y label and its lines, each (label, colour, marker, (x, y) points).
Panel = Tuple[str, str, str, Sequence[Tuple[str, str, str, Sequence[Tuple[float, float]]]]]


def plot(
    path: Path, title: str, foot: str, panels: Sequence[Panel], size: Tuple[float, float] = (7.5, 5.6), floor: str = ""
) -> None:
    """A row of log-log ``panels`` (each ``size`` inches) under ``title``, ``foot`` in small print below, to a PNG; the
    line labelled ``floor`` dashed and on top (others may lie on it). matplotlib on Agg (ImportError without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False)
    for ax, (name, xlabel, ylabel, lines) in zip(axes[0], panels):
        for label, colour, marker, points in (line for line in lines if line[3]):
            style = dict(linestyle="--", zorder=3) if label == floor else {}
            ax.plot(*zip(*sorted(points)), marker=marker, color=colour, label=label.replace("`", ""), **style)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, foot, fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.01 + 0.03 * (foot.count("\n") + 1), 1, 0.95))  # room for the foot's lines
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- timing ----------------------------------------------------------------------------------------


def cpu_time(fn: Callable[[], object], max_run_time: float, min_run_time: float = 0.01) -> float:
    """Median seconds per call of ``fn()``: ``Timer.adaptive_autorange`` with the caller's torch threads."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.adaptive_autorange(threshold=0.1, min_run_time=min_run_time, max_run_time=max_run_time).median)


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median seconds per call: :func:`cpu_time` on the CPU (at most ``budget_s``), on a GPU the median of
    ``triton.testing.do_bench`` (25 ms of warm-up, 100 ms of calls, L2 flushed between them)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e-3
    return cpu_time(fn, max_run_time=budget_s)


def timing_note(budget_s: float) -> str:
    """The value of a header's timing line for :func:`time_call`."""
    return (
        "CPU: `torch.utils.benchmark.Timer.adaptive_autorange` (blocks of calls after warm-up blocks, median "
        f"time per call over blocks, until the blocks' IQR is within 10% of their median or {budget_s:g} s); "
        "GPU: median of `triton.testing.do_bench` (warmup 25 ms, rep 100 ms, L2 flushed); device synchronized in "
        "each call"
    )


# --- problems --------------------------------------------------------------------------------------


def mlp_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a tanh MLP (``params`` = weight, bias per layer; no tanh after the last; one layer: linear)."""
    h = x
    for k in range(0, len(params), 2):
        h = F.linear(h, params[k], params[k + 1])
        h = torch.tanh(h) if k + 2 < len(params) else h
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


def make_problem(name: str, device: Optional[torch.device] = None) -> Problem:
    """``linear``: TorchOpt's tutorial-sized linear model (2,049 parameters); ``mlp``: the 1024-256-10 MLP (264,970)."""
    if name == "linear":
        problem = Problem("linear 2048→1, batch 64, MSE", mlp_loss, leaf_params(torch.nn.Linear(2048, 1)),
                          torch.randn(64, 2048), torch.randn(64, 1))  # fmt: skip
    elif name == "mlp":
        problem = Problem("MLP 1024→256→10 tanh, batch 256, MSE", mlp_loss,
                          leaf_params(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 10)),
                          torch.randn(256, 1024), torch.randn(256, 10))  # fmt: skip
    else:
        raise ValueError(f"unknown model {name!r}")
    return problem if device is None else problem.to(device)


def wide_mlp(width: int, device: torch.device, batch: int = 64, outputs: int = 10) -> Problem:
    """The tanh MLP ``width -> width -> outputs`` and a batch, the same on every run and device (seeded by width)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(width)
    params = leaf_params(torch.nn.Linear(width, width), torch.nn.Linear(width, outputs))
    x, y = torch.randn(batch, width), torch.randn(batch, outputs)
    torch.random.set_rng_state(state)
    return Problem(f"MLP {width}→{width}→{outputs}", mlp_loss, params, x, y).to(device)


def wide_mlp_numel(width: int, outputs: int = 10) -> int:
    """Parameters of :func:`wide_mlp` (without building it)."""
    return width * width + width + width * outputs + outputs


def tiny_gpt(gpt: Dict[str, int], device: torch.device) -> Tuple[torch.nn.Module, List[torch.Tensor], torch.Tensor,
                                                                  LossFn]:  # fmt: skip
    """``TinyGPT`` of ``python/mezo_finetune.py``, its parameters, a batch of tokens and the next-token loss."""
    if "mezo_finetune" not in sys.modules:  # the example, imported by path (with its sibling modules)
        if str(ROOT / "python") not in sys.path:
            sys.path.insert(0, str(ROOT / "python"))
        spec = importlib.util.spec_from_file_location("mezo_finetune", ROOT / "python" / "mezo_finetune.py")
        assert spec is not None and spec.loader is not None
        sys.modules["mezo_finetune"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    sizes = [gpt[k] for k in ("vocab", "seq_len", "d_model", "heads", "layers", "ff")]
    model = sys.modules["mezo_finetune"].TinyGPT(*sizes).to(device)
    names, params = zip(*model.named_parameters())
    tokens = torch.randint(gpt["vocab"], (gpt["batch"], gpt["seq_len"] + 1), device=device)

    def loss_fn(ps: Sequence[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, dict(zip(names, ps)), (batch[:, :-1],))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    return model, list(params), tokens, loss_fn


def grad_step(problem: Problem, decorated: LossFn) -> Callable[[], None]:
    """One step: the decorated loss and ``.backward()`` until every ``.grad`` is written (device synchronized)."""

    def run() -> None:
        for p in problem.params:
            p.grad = None
        decorated(problem.params, problem.x, problem.y).backward()
        sync(problem.x.device)

    return run


def check_grads(params: Sequence[torch.Tensor], what: str) -> None:
    """After a gradient step: every ``.grad`` exists and is finite (otherwise the timing means nothing)."""
    if any(p.grad is None or not bool(torch.isfinite(p.grad).all()) for p in params):
        raise RuntimeError(f"{what}: a step left a missing or non-finite gradient")


def step_time(problem: Problem, decorated: LossFn, budget_s: float) -> float:
    """Median seconds of :func:`grad_step` (:func:`time_call`), its gradients checked afterwards."""
    seconds = time_call(grad_step(problem, decorated), problem.x.device, budget_s)
    check_grads(problem.params, f"step ({problem.name})")
    return seconds


def bare_evals(problem: Problem, evals: int) -> Callable[[], None]:
    """``evals`` plain calls of the undecorated loss under ``torch.no_grad()``: the cost of the evaluations alone."""

    def run() -> None:
        with torch.no_grad():
            for _ in range(evals):
                problem.loss(problem.params, problem.x, problem.y)
        sync(problem.x.device)

    return run


# --- baselines (bench/README.md says what each computes) -------------------------------------------


@functools.cache
def optional(name: str) -> Optional[ModuleType]:
    """The optional package ``name``, or None where it cannot be imported; evotorch with ``evotorch.algorithms`` loaded
    and its INFO logging (a line per setting) off. Imported on first use (a worker pays for evotorch's ~2 s if used)."""
    try:
        module = importlib.import_module(name)
        if name == "evotorch":
            importlib.import_module("evotorch.algorithms")
            logging.getLogger("evotorch").setLevel(logging.WARNING)
        return module
    except ImportError:
        return None


def missing(name: str) -> Optional[str]:
    """``'name not installed'`` where ``name`` is an optional package that cannot be imported, else None (also where
    ``name`` is no package, say a contender of zo_kernels')."""
    return f"{name} not installed" if name in OPTIONAL and optional(name) is None else None


def version(name: str) -> str:
    """``'name X.Y'`` (the installed distribution's version) or ``'name not installed'``."""
    module = optional(name)
    if module is None:
        return f"{name} not installed"
    with contextlib.suppress(metadata.PackageNotFoundError):
        return f"{name} {metadata.version(name)}"
    return f"{name} {getattr(module, '__version__', '?')}"


def torchopt_zero_order(torchopt: ModuleType, method: str, num_samples: int, sigma: float,
                        device: torch.device) -> Callable[[LossFn], LossFn]:  # fmt: skip
    """TorchOpt's ``zero_order`` decorator (``argnums=0``) with a standard Normal whose samples land on ``device``."""
    normal = torch.distributions.Normal(torch.tensor(0.0, device=device), torch.tensor(1.0, device=device))
    return torchopt.diff.zero_order(normal, method=method, argnums=0, num_samples=num_samples, sigma=sigma)


def _views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """``flat`` split into tensors shaped like ``like`` (views, no copy)."""
    return tuple(part.view(p.shape) for part, p in zip(flat.split([p.numel() for p in like]), like))


def torch_matmul_step(loss: LossFn, params: Sequence[torch.Tensor], *args: Any, num_samples: int,
                      sigma: float) -> torch.Tensor:  # fmt: skip
    """Plain PyTorch, noise materialized: ``Z = randn(N, n)``, ``g = w @ Z``; writes every ``p.grad``, returns f(θ)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        noise = torch.randn(num_samples, flat.numel(), device=flat.device, dtype=flat.dtype)
        theta = torch.empty_like(flat)
        f0 = loss(tuple(p.detach() for p in params), *args)
        diffs = torch.empty(num_samples, device=flat.device, dtype=noise.dtype)
        for i in range(num_samples):
            torch.add(flat, noise[i], alpha=sigma, out=theta)
            plus = loss(_views(theta, params), *args)
            torch.add(flat, noise[i], alpha=-sigma, out=theta)
            diffs[i] = plus - loss(_views(theta, params), *args)  # stays on the device: no sync per sample
        for p, g in zip(params, _views((diffs / (2.0 * sigma * num_samples)) @ noise, params)):
            p.grad = g
    return f0


class MeZO:
    """MeZO-SGD from Malladi et al. 2023 (arXiv:2305.17333), Algorithm 1, with N seeds per step averaged.

    Per seed: reseed, ``p += eps z`` per parameter (``torch.normal``), ``l+``; ``p -= 2 eps z``, ``l-``;
    ``p += eps z``; ``projected_grad = (l+ - l-) / 2 eps`` (``.item()``); then ``p -= lr g z / N``.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, eps: float, num_samples: int = 1, seed: int = 0):
        self.params: List[torch.Tensor] = list(params)
        self.lr, self.eps, self.num_samples = float(lr), float(eps), int(num_samples)
        self.generator = torch.Generator(device=self.params[0].device)
        self.seeds = random.Random(seed)  # one fresh seed per sample and step, as MeZO draws them

    def _perturb(self, seed: int, scale: float) -> None:
        self.generator.manual_seed(seed)
        for p in self.params:
            p.add_(torch.normal(0.0, 1.0, size=p.shape, generator=self.generator, device=p.device, dtype=p.dtype),
                   alpha=scale)  # fmt: skip

    @torch.no_grad()
    def step(self, loss: LossFn, *args: Any) -> float:
        """One MeZO-SGD step on ``loss(params, *args)``; returns the last ``l+``."""
        seeds = [self.seeds.randrange(2**31) for _ in range(self.num_samples)]
        projected, plus = [], 0.0
        for seed in seeds:
            self._perturb(seed, self.eps)
            plus_t = loss(self.params, *args)
            self._perturb(seed, -2.0 * self.eps)
            minus_t = loss(self.params, *args)
            self._perturb(seed, self.eps)
            projected.append(((plus_t - minus_t) / (2.0 * self.eps)).item())
            plus = float(plus_t)
        for seed, g in zip(seeds, projected):
            self._perturb(seed, -self.lr * g / self.num_samples)
        return plus


class EvoTorchPGPE:
    """EvoTorch's PGPE set to the raw antithetic ES step: ``symmetric=True``, ``ranking_method="raw"``,
    ``optimizer=None``, ``center_learning_rate=lr/sigma**2``, ``stdev_learning_rate=0``, on a vectorized
    ``Problem`` whose objective is the loss vmapped over a (2N, n) population. The first ``step()`` (sampling
    and evaluation only) runs here; every :meth:`step` after it is a full one."""

    def __init__(self, evotorch: ModuleType, loss: LossFn, params: Sequence[torch.Tensor], *args: Any,
                 num_samples: int, sigma: float, lr: float) -> None:  # fmt: skip
        like = [p.detach() for p in params]
        center = torch.cat([p.reshape(-1) for p in like])
        population_loss = torch.func.vmap(lambda flat: loss(_views(flat, like), *args))  # (2N, n) -> (2N,)
        self.problem = evotorch.Problem("min", population_loss, solution_length=center.numel(), vectorized=True,
                                        device=center.device, dtype=center.dtype)  # fmt: skip
        self.searcher = evotorch.algorithms.PGPE(
            self.problem, popsize=2 * num_samples, center_learning_rate=lr / sigma**2, stdev_learning_rate=0.0,
            stdev_init=sigma, symmetric=True, optimizer=None, ranking_method="raw", center_init=center,
        )  # fmt: skip
        self.searcher.step()

    def step(self) -> None:
        """Follow the last population's gradient, then sample and evaluate the next population."""
        self.searcher.step()

    @property
    def center(self) -> torch.Tensor:
        """The center of the search distribution (the flat parameters)."""
        return self.searcher.status["center"]


def torcheggroll_step(torcheggroll: ModuleType, module: torch.nn.Module, x: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y: torch.Tensor, *,
                      num_samples: int, sigma: float, lr: float, rank: int = 1) -> Callable[[], float]:  # fmt: skip
    """One ``TorchEggrollES(rank, pop_size=2N, antithetic=True).step(x, loss_fn, y)`` per call on a copy of ``module``;
    returns the population's mean fitness (``loss_fn``: one member's outputs and ``y`` to a scalar, vmapped)."""
    es = torcheggroll.TorchEggrollES(copy.deepcopy(module), pop_size=2 * num_samples, sigma=sigma, lr=lr, rank=rank,
                                     antithetic=True)  # fmt: skip
    return lambda: float(es.step(x, loss_fn, y))


# --- workers: fresh processes through torch.multiprocessing.spawn ----------------------------------


def spawn(fn: Callable[..., None], args: Tuple[Any, ...], nprocs: int, threads: int, timeout_s: float) -> None:
    """``fn(index, *args)`` in ``nprocs`` fresh processes (``torch.multiprocessing.spawn``), the package importable,
    ``OMP_NUM_THREADS=threads`` and glibc returning blocks above 64 KiB to the system when freed (so the resident set
    follows the live tensors). RuntimeError with the failing worker's last line, or on timeout (workers killed)."""
    import torch.multiprocessing as mp

    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": str(threads),
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}  # fmt: skip
    with mock.patch.dict(os.environ, env):  # what the spawned processes inherit
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
    name: str = ""  # what the progress bar shows


def _rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in KiB."""
    line = next(v for v in Path("/proc/self/status").read_text().splitlines() if v.startswith(field + ":"))
    return int(line.split()[1])


def memory_worker(index: int, jobs: Sequence[MemoryJob]) -> None:
    """``jobs[index]`` in this fresh process: a warm-up step, then the peak memory of one step (GPU: the allocator's;
    CPU: parameter bytes + resident-set growth, the peak reset by /proc/self/clear_refs), as JSON to ``job.out``."""
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
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base, method = torch.cuda.memory_allocated(device), "cuda max_memory_allocated"
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux >= 4.0)
            base, method = _rss_kib("VmRSS") * 1024, "VmHWM reset"
        except OSError:
            base, method = _rss_kib("VmHWM") * 1024, "VmHWM since start (could not reset)"
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    delta = (torch.cuda.max_memory_allocated(device) if cuda else _rss_kib("VmHWM") * 1024) - base
    delta = max(delta, 0)  # the kernel's RSS counters lag by a few pages: a "negative growth" is that noise
    peak = base + delta if cuda else param_bytes + delta
    numel = sum(p.numel() for p in params)
    result = dict(peak=peak, delta=delta, base=base, params=param_bytes, numel=numel, seconds=seconds, method=method)
    Path(job.out).write_text(json.dumps(result))


def run_memory_jobs(
    jobs: Sequence[MemoryJob], at_once: int, timeout_s: float, progress: Optional[Progress] = None
) -> List[Dict[str, Any]]:
    """Every job's result (``{"error": ...}`` where it failed), ``at_once`` fresh processes side by side (each measures
    only itself); a failed group is rerun job by job to find which failed. ``progress`` shows the jobs' names."""
    results: List[Dict[str, Any]] = [{} for _ in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        placed = [dataclasses.replace(job, out=str(Path(tmp) / f"job{k}.json")) for k, job in enumerate(jobs)]

        def run(indices: Sequence[int]) -> Optional[str]:
            """Measure a group of jobs side by side; None, or why it failed."""
            group = [placed[k] for k in indices]
            try:
                spawn(memory_worker, (group,), len(group), max(job.threads for job in group), timeout_s)
            except RuntimeError as exc:
                return str(exc)[:200]
            for k in indices:
                results[k] = json.loads(Path(placed[k].out).read_text())
            return None

        for lo in range(0, len(jobs), max(at_once, 1)):
            indices = list(range(lo, min(lo + max(at_once, 1), len(jobs))))
            if progress is not None:
                progress.show("peak memory: " + ", ".join(jobs[k].name for k in indices))
            failed = run(indices)
            for k in indices if failed else ():  # rerun a failed group job by job to find which failed
                why = run([k]) if len(indices) > 1 else failed
                if why is not None:
                    results[k] = {"error": why}
            if progress is not None:
                progress.advance(len(indices))
    return results


def memory_parallelism() -> int:
    """How many single-threaded memory workers run side by side: one per CPU, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))
