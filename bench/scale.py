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
   (and first-order backprop for reference), each configuration in a fresh process.
3. Distributed: step time with 1 and 2 gloo ranks on 127.0.0.1 (``process_group=dist.group.WORLD``)
   and the bytes each rank sends per step, counted, vs an all-reduce of the gradient.

Times are ``harness.time_call``'s (section 3: the slowest rank's ``perf_counter`` per step).
Sections 1 and 2 also run on a CUDA device when there is one. The header of the report explains
how memory and bytes are measured.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch
from baselines import TORCHOPT_MISSING, import_torchopt, torchopt_zero_order
from harness import fmt_bytes, fmt_mib, fmt_ms, fmt_ratio, verdict

import zo_kernels
from zo_kernels import distributions
from zo_kernels.optim import ZOSGD

torchopt = import_torchopt()  # optional: without it the TorchOpt cells say TORCHOPT_MISSING

THREADS = harness.THREADS
SIGMA = 0.01  # section 1 and 3 (as bench/cpu_kernels.py)
MEZO_SIGMA = 1e-3  # section 2 (MeZO's)
METHOD = "antithetic"
HAS_BATCH_SIZE = "batch_size" in inspect.signature(zo_kernels.zero_order).parameters
WORKER_TIMEOUT_S = 180
MIN_SPEEDUP = {"linear": 10.0, "mlp": 1.3}  # section 1 target: batched vs TorchOpt


@dataclass(frozen=True)
class Config:
    """Sizes and time budgets of one run."""

    quick: bool
    num_samples: int  # N of sections 1 and 3
    batch_sizes: Tuple[int, ...]  # B of section 1
    budget_s: float  # CPU timing of one measurement stops after this many seconds (harness.time_call)
    gpt: Dict[str, int]  # section 2 model and batch
    dist_steps: int  # timed steps per rank in section 3
    dist_threads: Tuple[Tuple[int, int], ...]  # (ranks, threads per rank) of section 3

    @staticmethod
    def make(quick: bool) -> Config:
        """The full configuration, or the ``--quick`` smoke-run one."""
        if quick:
            gpt = dict(vocab=4096, seq_len=64, d_model=256, heads=4, layers=4, ff=1024, batch=4)
            return Config(True, 100, (10, 100), 1.0, gpt, 2, ((1, 1), (2, 1)))
        gpt = dict(vocab=8192, seq_len=128, d_model=384, heads=6, layers=6, ff=1536, batch=8)
        return Config(False, 100, (10, 100), 6.0, gpt, 5, ((1, 1), (1, 2), (2, 1)))


COLUMNS = ("section", "case", "result", "baseline", "vs baseline", "target", "met", "detail")


@dataclass
class Row:
    """One table row (the fields are :data:`COLUMNS`)."""

    section: str
    case: str
    result: str = ""
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""
    detail: str = ""


# --------------------------------------------------------------------------------------------------
# Section 1: step time, loop vs batched vs TorchOpt
# --------------------------------------------------------------------------------------------------


def ours(cfg: Config, **extra: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """``zo_kernels.zero_order`` with Normal noise, antithetic, N samples (plus ``extra`` options)."""
    return zo_kernels.zero_order(
        distributions.Normal(), method=METHOD, argnums=0, num_samples=cfg.num_samples, sigma=SIGMA, **extra
    )


def step_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 1 on one device: loop, batched and TorchOpt, for the linear model and the MLP."""
    rows: List[Row] = []
    for name in ("linear", "mlp"):
        problem, min_speedup = harness.make_problem(name, device), MIN_SPEEDUP[name]
        section = f"1. step time [{device.type}], N={cfg.num_samples} {METHOD}, Normal: {problem.name} " + (
            f"({problem.numel:,} params)"
        )
        evals = 2 * cfg.num_samples + 1
        t_opt = None
        if torchopt is not None:
            decorated = torchopt_zero_order(torchopt, METHOD, cfg.num_samples, SIGMA, device)(problem.loss)
            t_opt = harness.step_time(problem, decorated, cfg.budget_s)
        t_loop = harness.step_time(problem, ours(cfg)(problem.loss), cfg.budget_s)
        t_bare = harness.time_call(harness.bare_evals(problem, evals), device, cfg.budget_s)
        baseline = f"TorchOpt {fmt_ms(t_opt)}" if t_opt is not None else ""

        def vs_torchopt(seconds: float, t_opt: Optional[float] = t_opt) -> str:
            return fmt_ratio(t_opt / seconds) if t_opt is not None else ""

        opt_result = fmt_ms(t_opt) if t_opt is not None else TORCHOPT_MISSING
        rows.append(Row(section, "TorchOpt 0.7.3 `torchopt.diff.zero_order`", opt_result))
        bare = f"{evals} plain evaluations alone (no_grad loop): {fmt_ms(t_bare)}"
        rows.append(
            Row(
                section,
                "zo_kernels loop: `zero_order(...)`",
                fmt_ms(t_loop),
                baseline,
                vs_torchopt(t_loop),
                detail=bare,
            )
        )
        if not HAS_BATCH_SIZE:
            rows.append(
                Row(section, "zo_kernels batched: `zero_order(..., batch_size=B)`",
                    "batch_size not available in this build", target=f"≥ {min_speedup:g}x vs TorchOpt",
                    met="not measured")
            )  # fmt: skip
            continue
        for b in cfg.batch_sizes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t_b = harness.step_time(problem, ours(cfg, batch_size=b)(problem.loss), cfg.budget_s)
            fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            if t_opt is not None:
                met = verdict([("speed-up", t_opt / t_b >= min_speedup), ("vmap", not fallback)])
            else:
                met = f"{'NO: vmap' if fallback else 'vmap ok'}; speed-up not measured ({TORCHOPT_MISSING})"
            rows.append(
                Row(section, f"zo_kernels batched: `zero_order(..., batch_size={b})`", fmt_ms(t_b), baseline,
                    vs_torchopt(t_b), f"≥ {min_speedup:g}x vs TorchOpt", met,
                    ("FELL BACK TO THE LOOP: " + fallback[0][:160]) if fallback else "")
            )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------
# Section 2: peak memory of one step, one fresh process per configuration
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


def gpt_case(case: str, gpt: Dict[str, int], device: torch.device) -> harness.Built:
    """A memory job's ``build``: one training step of ``case`` on ``TinyGPT`` (run by harness.memory_worker)."""
    model, params, tokens, loss_fn = harness.tiny_gpt(gpt, device)
    model.requires_grad_(case in ("torchopt", "backprop", "zero_order_inplace"))
    optimizer = ZOSGD(params, lr=1e-6)
    zo_inplace = zo_kernels.zero_order(
        distributions.Normal(), method=METHOD, num_samples=1, sigma=MEZO_SIGMA, inplace=True
    )(loss_fn)
    if case == "torchopt":
        if torchopt is None:
            raise RuntimeError(f"memory case 'torchopt': {TORCHOPT_MISSING}")
        to_fn = torchopt_zero_order(torchopt, METHOD, 1, MEZO_SIGMA, device)(lambda ps, batch: loss_fn(list(ps), batch))

    def step() -> None:
        if case == "inference":
            with torch.no_grad():
                loss_fn(params, tokens)
        elif case in ("mezo_inplace", "mezo_copy"):
            sg = zo_kernels.estimate(
                loss_fn, params, tokens, method=METHOD, num_samples=1, sigma=MEZO_SIGMA, inplace=case == "mezo_inplace"
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
        harness.sync(device)

    return step, params


def memory_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 2 on one device: one fresh process per configuration."""
    gpt = cfg.gpt
    cases = [c for c in MEMORY_CASES if not cfg.quick or c[0] in QUICK_MEMORY_CASES]
    runnable = [case for case, _ in cases if case != "torchopt" or torchopt is not None]
    jobs = [harness.MemoryJob(gpt_case, dict(case=case, gpt=gpt), str(device), THREADS, seed=0) for case in runnable]
    results: Dict[str, Dict[str, Any]] = {"torchopt": {"missing": TORCHOPT_MISSING}}
    results.update(zip(runnable, harness.run_memory_jobs(jobs, 1, WORKER_TIMEOUT_S)))
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


@dataclass(frozen=True)
class DistJob:
    """One launch of section 3: ``world`` ranks of ``threads`` threads, ``steps`` timed steps of N samples."""

    world: int
    port: int
    threads: int
    steps: int
    samples: int
    out: str


def dist_worker(rank: int, job: DistJob) -> None:
    """One rank of section 3: time ``steps`` estimates per model, count the bytes this rank sends."""
    import torch.distributed as dist

    torch.set_num_threads(job.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{job.port}",
        rank=rank,
        world_size=job.world,
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
        problem = harness.make_problem(name)
        decorated = zo_kernels.zero_order(
            distributions.Normal(), method=METHOD, argnums=0, num_samples=job.samples, sigma=SIGMA,
            process_group=dist.group.WORLD,
        )(problem.loss)  # fmt: skip
        step = harness.grad_step(problem, decorated)
        step()  # warm-up
        times = []
        sent["bytes"] = 0
        for _ in range(job.steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            original["all_reduce"](elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank is done
            times.append(float(elapsed))
        step_bytes = sent["bytes"] / job.steps
        # What data parallelism with first-order gradients would send instead: an all-reduce of n float32.
        grad = torch.ones(problem.numel, dtype=torch.float32)
        ar_times = []
        for _ in range(max(job.steps, 3)):
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
        Path(job.out).write_text(json.dumps(results))
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
            job = DistJob(world, harness.free_port(), threads, cfg.dist_steps, cfg.num_samples, out)
            try:
                harness.spawn(dist_worker, (job,), world, threads, WORKER_TIMEOUT_S)
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
    fields = [
        ("date", harness.now()),
        ("device", f"{harness.cpu_model()} ({os.cpu_count()} CPUs){gpu}"),
        ("versions", harness.versions(torchopt)),
        ("threads", f"{THREADS} (torch.set_num_threads); {harness.omp_environment()}"),
        ("", load),
        ("backend", f"{backend_note}; devices measured: {', '.join(d.type for d in devices)}"),
        ("mode", f"{'quick (smoke run)' if cfg.quick else 'full'}; {batched}"),
        ("timing", harness.timing_note(cfg.budget_s)),
        ("section 1", "one step = the decorated loss and `.backward()` until every `.grad` is written; "
                      f"sigma = {SIGMA}; ratio = TorchOpt time / our time"),
        ("section 2 method", "each configuration runs in a fresh Python process (`harness.memory_worker`) that "
         "builds the model, runs one warm-up step, drops `.grad`, then measures one step. On a GPU the peak is "
         "`torch.cuda.max_memory_allocated` (parameters included). On the CPU it is the parameters' bytes "
         "plus the growth of the process's resident set during the step: the peak RSS (`VmHWM`) is reset "
         "through `/proc/self/clear_refs` just before the step and the RSS at that moment subtracted; "
         "glibc runs with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors leave the resident set at once. "
         "This approximates the CUDA number (tensor memory), leaving out the Python/torch runtime "
         "(a few hundred MiB, the same for every configuration)"),
        ("section 3 method", "one process per rank (`torch.set_num_threads` threads each), gloo over "
         f"127.0.0.1; the step time is the slowest rank's (MAX all-reduce), median of {cfg.dist_steps} steps "
         "after a warm-up; bytes are counted by wrapping `torch.distributed.broadcast/all_gather/all_reduce` "
         "(payload this rank contributes, transport overhead excluded)"),
    ]  # fmt: skip
    return harness.header("zo_kernels scaling benchmark: batched evaluation, memory, distributed", fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the report, and write it to ``--out`` when given."""
    parser = argparse.ArgumentParser(description="zo_kernels scaling benchmark (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", help="smoke run: shorter timings, a smaller GPT, fewer steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = Config.make(args.quick)
    _, backend_note = harness.choose_backend()
    devices = harness.devices()
    run = harness.Run()
    rows: List[Row] = []
    for device in devices:
        rows += step_rows(cfg, device)
    for device in devices:
        rows += memory_rows(cfg, device)
    rows += dist_rows(cfg)
    lines = (
        header_lines(cfg, backend_note, run.before, devices) + harness.rows_table(COLUMNS, rows) + ["", run.footer()]
    )
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
