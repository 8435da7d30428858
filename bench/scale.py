"""Scaling: batched evaluation, MeZO's memory mode and distributed estimation.

    python bench/scale.py [--quick] [--out bench/results/scale.md]

0. Cost per evaluation beyond the evaluation, MLP 64→64→10, N = 16, one thread: loop, ``batch_size=32``, TorchOpt.
1. Step time (N = 100, sigma = 0.01; TorchOpt's tutorial-size linear model, the 1024-256-10 MLP) per method: the
   ``zero_order`` loop (Normal, Rademacher) and ``batch_size=B``, against TorchOpt and against the bare evaluations.
2. Peak memory of one ``TinyGPT`` (python/mezo_finetune.py) step, each mode in a fresh process: MeZO in place, a
   scratch copy, ``zero_order(inplace=True)``, TorchOpt, backprop, inference alone.
3. 1 vs 2 gloo ranks on 127.0.0.1 (``process_group=dist.group.WORLD``): step time; bytes a rank sends vs an all-reduce.
Sections 1 and 2 also run on a CUDA device when there is one; the header says how everything is measured.
"""

from __future__ import annotations

import datetime
import functools
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
from harness import fmt_bytes, fmt_mem, fmt_ms, fmt_ratio, verdict

import zo_kernels
from zo_kernels import distributions
from zo_kernels.optim import ZOSGD

torchopt = harness.optional("torchopt")
SIGMA, MEZO_SIGMA, METHOD, N = 0.01, 1e-3, "antithetic", 100  # MEZO_SIGMA: section 2 (MeZO's)
BATCHES = (10, 100)
WORKER_TIMEOUT_S = 180
#: Section 1's targets per model: the loop's speed-up vs TorchOpt, its overhead over the bare evaluations (%) with
#: Normal and with Rademacher noise, and the batched speed-up vs TorchOpt.
STEP_TARGETS = {"linear": (4.0, None, None, 10.0), "mlp": (1.2, 40.0, 10.0, 1.3)}
COLUMNS = ("section", "case", "result", "baseline", "vs baseline", "target", "met", "detail")


@dataclass(frozen=True)
class Config:
    """Time budget, models of sections 1 and 3, section 2's model, section 3's steps and (ranks, threads per rank)."""

    quick: bool
    budget_s: float
    models: Tuple[str, ...]
    gpt: Dict[str, int]
    dist_steps: int
    dist_threads: Tuple[Tuple[int, int], ...]


QUICK = Config(True, 1.0, ("linear",), dict(vocab=4096, seq_len=64, d_model=256, heads=4, layers=4, ff=1024,
                                            batch=4), 2, ((1, 1), (2, 1)))  # fmt: skip
FULL = Config(False, 6.0, ("linear", "mlp"), dict(vocab=8192, seq_len=128, d_model=384, heads=6, layers=6, ff=1536,
                                                  batch=8), 5, ((1, 1), (1, 2), (2, 1)))  # fmt: skip


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


def ours(dist: Any = None, method: str = METHOD, num_samples: int = N, **extra: Any) -> Callable[[harness.LossFn],
                                                                                                 harness.LossFn]:
    """``zo_kernels.zero_order`` with N samples (Normal noise, antithetic unless given; plus ``extra`` options)."""
    return zo_kernels.zero_order(dist or distributions.Normal(), method=method, argnums=0, num_samples=num_samples,
                                 sigma=SIGMA, **extra)  # fmt: skip


def step_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 1 on one device, per model and method: TorchOpt; the loop with Normal and Rademacher noise against
    it and against the bare evaluations; with ``batch_size=B`` (antithetic, Normal)."""
    rows: List[Row] = []
    for name in cfg.models:
        problem, (need, max_n, max_r, need_batched) = harness.make_problem(name, device), STEP_TARGETS[name]
        section = f"1. step time [{device.type}], N={N}: {problem.name} ({problem.numel:,} params)"
        for method in ("naive", "forward", "antithetic"):
            evals = (2 if method == "antithetic" else 1) * N + 1
            t_opt = None
            if torchopt is not None:
                decorated = harness.torchopt_zero_order(torchopt, method, N, SIGMA, device)(problem.loss)
                t_opt = harness.step_time(problem, decorated, cfg.budget_s)
            t_bare = harness.time_call(harness.bare_evals(problem, evals), device, cfg.budget_s)
            base = f"TorchOpt {fmt_ms(t_opt)}" if t_opt is not None else ""
            rows.append(Row(section, f"TorchOpt 0.7.3 `torchopt.diff.zero_order`, {method} ({evals} evals, Normal)",
                            fmt_ms(t_opt) if t_opt is not None else harness.missing("torchopt"),
                            detail=f"{evals} plain evaluations alone (no_grad loop): {fmt_ms(t_bare)}"))  # fmt: skip
            variants = [("Normal", distributions.Normal(), None, max_n)]
            variants += [("Rademacher", distributions.Rademacher(), None, max_r)]
            variants += [("Normal", distributions.Normal(), b, None) for b in BATCHES if method == "antithetic"]
            for noise, dist, b, max_overhead in variants:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t = harness.step_time(problem, ours(dist, method, batch_size=b)(problem.loss), cfg.budget_s)
                fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
                overhead = (t - t_bare) / t_bare * 100
                speedup = need if b is None else need_batched
                checks = [("speed-up", t_opt / t >= speedup)] if t_opt is not None else []
                target = f"≥ {speedup:g}x vs TorchOpt"
                if max_overhead is not None:
                    checks.append(("overhead", overhead <= max_overhead))
                    target += f", overhead ≤ {max_overhead:g}%"
                if b is not None:
                    checks.append(("vmap", not fallback))
                missing = "" if t_opt else f"speed-up not measured ({harness.missing('torchopt')})"
                met = "; ".join(filter(None, [verdict(checks) if checks else "", missing]))
                how = "loop: `zero_order(...)`" if b is None else f"batched: `zero_order(..., batch_size={b})`"
                detail = f"overhead over the bare evaluations {overhead:+.0f}%"
                rows.append(Row(section, f"zo_kernels {how}, {method}, {noise}", fmt_ms(t), base,
                                fmt_ratio(t_opt / t) if t_opt else "", target, met,
                                detail + ("; FELL BACK TO THE LOOP: " + fallback[0][:160] if fallback else "")))
    return rows


#: Section 0: a small policy-sized MLP (64→64→10, batch 64), N antithetic samples, one thread; target µs/evaluation.
SMALL_N, SMALL_TARGET_US = 16, 30.0


def overhead_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 0: what a ``zero_order`` step costs per evaluation beyond the evaluation itself, where ES users live
    (small policies), in the loop, with ``batch_size=32`` and for TorchOpt; one thread, side by side."""
    problem, evals, threads = harness.wide_mlp(64, device), 2 * SMALL_N + 1, torch.get_num_threads()
    section = f"0. cost per evaluation [{device.type}, 1 thread], N={SMALL_N} antithetic: {problem.name} " + (
        f"({problem.numel:,} params, batch 64)")
    torch.set_num_threads(1)
    try:
        bare = harness.time_call(harness.bare_evals(problem, evals), device, cfg.budget_s) / evals
        rows = [Row(section, "one plain evaluation (no_grad)", f"{bare * 1e6:.1f} µs")]
        contenders = [("zo_kernels loop", ours(method="antithetic", num_samples=SMALL_N), SMALL_TARGET_US),
                      ("zo_kernels `batch_size=32`", ours(num_samples=SMALL_N, batch_size=32), None)]
        if torchopt is not None:
            contenders.append(("TorchOpt 0.7.3", harness.torchopt_zero_order(torchopt, METHOD, SMALL_N, SIGMA, device),
                               None))
        for name, decorator, target in contenders:
            extra = (harness.step_time(problem, decorator(problem.loss), cfg.budget_s) / evals - bare) * 1e6
            checks = [("overhead", extra <= target)] if target is not None else []
            rows.append(Row(section, f"{name}: step time per evaluation beyond the evaluation", f"{extra:.1f} µs",
                            f"{bare * 1e6:.1f} µs", f"{extra / (bare * 1e6):.2f}x",
                            f"≤ {target:g} µs" if target else "", verdict(checks) if checks else ""))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return rows


MEMORY_CASES = {
    "inference": "inference alone: one forward under `torch.no_grad()`",
    "mezo_inplace": "MeZO step: `estimate(..., inplace=True)` + `ZOSGD(lr).step(sg)`",
    "mezo_copy": "`estimate(..., inplace=False)` + `ZOSGD(lr).step(sg)` (perturbs a copy of the parameters)",
    "zero_order_inplace": "`zero_order(..., inplace=True)` + `.backward()` (writes `.grad`)",
    "torchopt": "TorchOpt 0.7.3 `zero_order` + `.backward()` (writes `.grad`)",
    "backprop": "first-order reference: `loss.backward()` (autograd, writes `.grad`)",
}
QUICK_MEMORY_CASES = ("inference", "mezo_inplace", "mezo_copy", "torchopt")


def gpt_case(case: str, gpt: Dict[str, int], device: torch.device) -> harness.Built:
    """A memory job's ``build``: one training step of ``case`` on ``TinyGPT`` (run by harness.memory_worker)."""
    model, params, tokens, loss_fn = harness.tiny_gpt(gpt, device)
    model.requires_grad_(case in ("torchopt", "backprop", "zero_order_inplace"))
    optimizer = ZOSGD(params, lr=1e-6)
    if case == "zero_order_inplace":
        fn = zo_kernels.zero_order(distributions.Normal(), method=METHOD, num_samples=1, sigma=MEZO_SIGMA,
                                   inplace=True)(loss_fn)  # fmt: skip
    elif case == "torchopt":
        if torchopt is None:
            raise RuntimeError(f"memory case 'torchopt': {harness.missing('torchopt')}")
        fn = harness.torchopt_zero_order(torchopt, METHOD, 1, MEZO_SIGMA, device)(lambda ps, b: loss_fn(list(ps), b))
    elif case not in MEMORY_CASES:
        raise ValueError(f"unknown memory case {case!r}")

    def step() -> None:
        if case == "inference":
            with torch.no_grad():
                loss_fn(params, tokens)
        elif case in ("mezo_inplace", "mezo_copy"):
            optimizer.step(zo_kernels.estimate(loss_fn, params, tokens, method=METHOD, num_samples=1, sigma=MEZO_SIGMA,
                                               inplace=case == "mezo_inplace"))  # fmt: skip
        elif case == "backprop":
            loss_fn(params, tokens).backward()
        else:
            fn(tuple(params) if case == "torchopt" else params, tokens).backward()
        harness.sync(device)

    return step, params


def memory_rows(cfg: Config, device: torch.device) -> List[Row]:
    """Section 2 on one device: one fresh process per configuration, peaks against inference alone."""
    cases = [c for c in MEMORY_CASES if not cfg.quick or c in QUICK_MEMORY_CASES]
    runnable = [c for c in cases if c != "torchopt" or torchopt is not None]
    jobs = [harness.MemoryJob(gpt_case, dict(case=c, gpt=cfg.gpt), str(device), harness.THREADS, 0) for c in runnable]
    results: Dict[str, Dict[str, Any]] = {"torchopt": {"missing": harness.missing("torchopt")}}
    results.update(zip(runnable, harness.run_memory_jobs(jobs, 1, WORKER_TIMEOUT_S)))
    gpt, n_params = cfg.gpt, max((r.get("numel", 0) for r in results.values()), default=0)
    section = (f"2. peak memory of one step [{device.type}]: TinyGPT {n_params / 1e6:.1f}M params (d={gpt['d_model']}, "
               f"{gpt['layers']} layers, vocab {gpt['vocab']}), batch {gpt['batch']}×{gpt['seq_len']}, N=1 {METHOD}, "
               f"sigma={MEZO_SIGMA:g}")  # fmt: skip
    ref, rows = results.get("inference", {}), []
    for case in cases:
        r = results[case]
        if "missing" in r or "error" in r:
            rows.append(Row(section, MEMORY_CASES[case], r.get("missing", "FAILED"), detail=r.get("error", "")))
            continue
        row = Row(section, MEMORY_CASES[case], fmt_mem(r["peak"]), detail=(
            f"{'peak allocated' if device.type == 'cuda' else 'params + RSS growth'}: {fmt_mem(r['params'])} params, "
            f"+{fmt_mem(r['delta'])} during the step; step {fmt_ms(r['seconds'])}; {r['method']}"))  # fmt: skip
        if case != "inference" and "peak" in ref:
            row.baseline, row.ratio = f"inference {fmt_mem(ref['peak'])}", f"{r['peak'] / ref['peak']:.2f}x"
        if case == "mezo_inplace" and "peak" in ref:
            row.target, row.met = "≤ 1.1x inference", verdict([("peak", r["peak"] <= 1.1 * ref["peak"])])
        rows.append(row)
    return rows


@dataclass(frozen=True)
class DistJob:
    """One launch of section 3: ``world`` ranks of ``threads`` threads, ``steps`` timed steps."""

    world: int
    port: int
    threads: int
    steps: int
    models: Tuple[str, ...]
    out: str


def dist_worker(rank: int, job: DistJob) -> None:
    """One rank of section 3: time ``steps`` estimates per model, count the bytes this rank sends."""
    import torch.distributed as dist

    torch.set_num_threads(job.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job.port}", rank=rank, world_size=job.world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    sent = {"bytes": 0}
    original = {name: getattr(dist, name) for name in ("broadcast", "all_gather", "all_reduce")}

    def counting(name: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensor = kwargs["tensor"] if "tensor" in kwargs else args[1 if name == "all_gather" else 0]
            src = kwargs["src"] if "src" in kwargs else (args[1] if len(args) > 1 else None)
            if name != "broadcast" or dist.get_rank() == src:  # a broadcast is sent by its source only
                sent["bytes"] += tensor.numel() * tensor.element_size()
            return original[name](*args, **kwargs)

        return wrapper

    for name in original:  # zo_kernels calls torch.distributed.<name> at run time
        setattr(dist, name, counting(name))

    def timed(fn: Callable[[], Any], steps: int, slowest: bool) -> float:
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if slowest:  # a step ends when its slowest rank is done
                original["all_reduce"](elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
        return statistics.median(times)

    results = {}
    for name in job.models:
        torch.manual_seed(0)  # the same problem on every rank
        problem = harness.make_problem(name)
        step = harness.grad_step(problem, ours(process_group=dist.group.WORLD)(problem.loss))
        step()  # warm-up
        sent["bytes"] = 0
        seconds = timed(step, job.steps, True)
        step_bytes = sent["bytes"] / job.steps
        # What data parallelism with first-order gradients would send instead: an all-reduce of n float32.
        grad = torch.ones(problem.numel, dtype=torch.float32)
        allreduce = timed(functools.partial(original["all_reduce"], grad), max(job.steps, 3), False)
        results[name] = dict(step=seconds, sent=step_bytes, numel=problem.numel, allreduce=allreduce, name=problem.name)
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
            out = str(Path(tmp) / f"{world}_{threads}.json")
            job = DistJob(world, harness.free_port(), threads, cfg.dist_steps, cfg.models, out)
            try:
                harness.spawn(dist_worker, (job,), world, threads, WORKER_TIMEOUT_S)
                runs[(world, threads)] = json.loads(Path(job.out).read_text())
            except RuntimeError as exc:
                runs[(world, threads)] = {"error": str(exc)[:200]}
    rows: List[Row] = []
    for name in cfg.models:
        ref, section = runs.get((1, 1), {}).get(name), None
        for (world, threads), result in runs.items():
            case = f"{world} rank{'s' * (world > 1)} × {threads} thread{'s' * (threads > 1)}"
            if "error" in result:
                rows.append(Row(f"3. distributed [cpu, gloo]: {name}", case, "FAILED", detail=result["error"]))
                continue
            r = result[name]
            section = (f"3. distributed [cpu, gloo, 127.0.0.1]: {r['name']} ({r['numel']:,} params), N={N} {METHOD}, "
                       "`process_group=dist.group.WORLD`")  # fmt: skip
            row = Row(section, f"step time, {case}", fmt_ms(r["step"]))
            if ref is not None and (world, threads) != (1, 1):
                row.baseline = f"1 rank × 1 thread {fmt_ms(ref['step'])}"
                row.ratio = f"speed-up {ref['step'] / r['step']:.2f}x"
            rows.append(row)
        two = runs.get((2, 1), {}).get(name)
        if two is not None and section is not None:
            signs, allreduce_bytes = 2 if METHOD == "antithetic" else 1, two["numel"] * 4
            rows.append(Row(
                section, "bytes rank 0 of 2 sends per step (counted at the torch.distributed calls)",
                fmt_bytes(two["sent"]), f"all-reduce of the float32 gradient: n × 4 = {fmt_bytes(allreduce_bytes)}",
                f"{allreduce_bytes / max(two['sent'], 1):,.0f}x fewer",
                detail=(f"all ranks' losses gathered: N × 8 B × {signs} signs = {fmt_bytes(N * 8 * signs)}, each rank "
                        f"sending its half (N/2 × 8 B × {signs}) and a failure flag (8 B × {signs}), plus the 8-byte "
                        f"seed from rank 0; gloo all-reduce of n float32 measured here: {fmt_ms(two['allreduce'])} "
                        "per call"),
            ))  # fmt: skip
    return rows


def header_lines(cfg: Config, run: harness.Run, devices: Sequence[torch.device]) -> List[str]:
    """The lines printed above the table."""
    gpu = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU: sections 1-2 on the CPU"
    fields = [
        ("device", f"{harness.cpu_model()} ({os.cpu_count()} CPUs); {gpu}"),
        *run.fields(),
        ("backend", f"{harness.choose_backend()[1]}; devices measured: {', '.join(d.type for d in devices)}"),
        ("mode", f"{'quick (smoke run: the linear model only)' if cfg.quick else 'full'}; `batch_size` B = "
                 f"{', '.join(map(str, BATCHES))}"),
        ("timing", harness.timing_note(cfg.budget_s)),
        ("section 1", "one step = the decorated loss and `.backward()` until every `.grad` is written; "
                      f"sigma = {SIGMA}; ratio = TorchOpt time / our time (TorchOpt samples Normal noise); "
                      "overhead = (time − bare evaluations) / bare evaluations, the bare evaluations being the same "
                      "number of plain loss calls under `torch.no_grad()`"),
        ("section 2 method", "a fresh process per configuration (`harness.memory_worker`): one warm-up step, then "
         "one measured step. GPU: `torch.cuda.max_memory_allocated` (parameters included); CPU: the parameters' bytes "
         "plus the growth of the resident set during the step (`VmHWM` reset through `/proc/self/clear_refs`, glibc "
         "`MALLOC_MMAP_THRESHOLD_=65536`), which leaves out the Python/torch runtime"),
        ("section 3 method", "one process per rank (`torch.set_num_threads` threads each), gloo over "
         f"127.0.0.1; the step time is the slowest rank's (MAX all-reduce), median of {cfg.dist_steps} steps "
         "after a warm-up; bytes are counted by wrapping `torch.distributed.broadcast/all_gather/all_reduce` "
         "(payload this rank contributes, transport overhead excluded)"),
    ]  # fmt: skip
    return harness.header("zo_kernels scaling benchmark: batched evaluation, memory, distributed", fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the report, and write it to ``--out`` when given."""
    args = harness.parser(__doc__).parse_args(argv)
    torch.manual_seed(0)
    cfg, devices = QUICK if args.quick else FULL, harness.devices()
    run = harness.Run()
    rows = overhead_rows(cfg, torch.device("cpu")) + [row for device in devices for row in step_rows(cfg, device)]
    rows += [row for device in devices for row in memory_rows(cfg, device)] + dist_rows(cfg)
    lines = header_lines(cfg, run, devices) + harness.rows_table(COLUMNS, rows) + ["", run.footer()]
    print("\n".join(lines))
    harness.write(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
