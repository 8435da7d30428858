"""Seed journals: bytes per step, replay vs training time, and elastic recovery from SIGKILLs with nothing lost.

    python bench/journal.py [--quick] [--out bench/results/journal.md]

1. Bytes per step (antithetic N = 16) against the model's float32 weights, and the file after the run.
2. 1,000 steps of N = 16 on the MLP 256→256→10 (68,362 parameters, ZOSGD): training without a journal, training with
   one (an fsync per step), and replaying the journal into the starting values (checked bit for bit).
3. python/elastic.py under torchrun (2 gloo ranks): an uninterrupted run, then SIGKILLs of rank 1 at random steps,
   each run checked bit for bit against it; recovery: from the kill to the restored state (rank 0's report).
"""

from __future__ import annotations

import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch

import zo_kernels
from zo_kernels.journal import Journal, replay
from zo_kernels.optim import ZOSGD

N, SIGMA, LR = 16, 0.01, 0.01  # lr 0.05 diverges on this MLP within 300 steps


def train(problem: harness.Problem, steps: int, path: str | None) -> tuple[list[torch.Tensor], float, float, int]:
    """``steps`` ZOSGD steps, journaled to ``path`` if given: params, seconds, of which in append, record bytes."""
    params = [p.detach().clone() for p in problem.params]
    opt = ZOSGD(params, lr=LR)
    journal, appending = Journal(path, params, opt) if path else None, 0.0
    tick = time.perf_counter()
    for step in range(steps):
        sg = zo_kernels.estimate(problem.loss, params, problem.x, problem.y, method="antithetic", num_samples=N,
                                 sigma=SIGMA, seed=step)  # fmt: skip
        opt.step(sg)
        if journal is not None:
            before = time.perf_counter()
            journal.append(sg)
            appending += time.perf_counter() - before
    if journal is not None:
        journal.close()  # every record is already durable: nothing left to time
    return params, time.perf_counter() - tick, appending, journal.last_record_bytes if journal else 0


def elastic(directory: Path, steps: int, kill_at: int | None) -> tuple[list[torch.Tensor], float, float | None]:
    """One python/elastic.py run under torchrun: final params, wall seconds, recovery seconds (None: no kill)."""
    env = dict(os.environ, PYTHONPATH=str(harness.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
           str(harness.ROOT / "python" / "elastic.py"), "--dir", str(directory), "--steps", str(steps)]  # fmt: skip
    tick = time.perf_counter()
    done = subprocess.run(cmd + (["--kill-at", str(kill_at)] if kill_at is not None else []), env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        raise RuntimeError(f"elastic.py failed (kill at {kill_at}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    found = re.search(r"recovery took ([0-9.]+) s from the kill", done.stdout)
    return torch.load(directory / "final.pt")["params"], seconds, float(found.group(1)) if found else None


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    steps, kills, elastic_steps = (50, 2, 20) if args.quick else (1000, 20, 40)
    run = harness.Run()
    lines = harness.header("Seed journals", [("machine", f"{harness.cpu_model()}: a 2-core CPU, no GPU"),
                                             *run.fields()])  # fmt: skip
    problem = harness.wide_mlp(256, torch.device("cpu"))
    weight_bytes = sum(p.numel() * 4 for p in problem.params)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.zoj")
        train(problem, 10, None)  # warm-up: the first steps allocate and fault in pages
        _, bare_s, _, _ = train(problem, steps, None)
        trained, journaled_s, append_s, record = train(problem, steps, path)
        file_bytes = os.path.getsize(path)
        params = [p.detach().clone() for p in problem.params]
        tick = time.perf_counter()
        replayed = replay(path, params, ZOSGD(params, lr=LR))
        replay_s = time.perf_counter() - tick
        exact = replayed == steps and all(torch.equal(a, b) for a, b in zip(params, trained))
    lines += ["## 1. Size", ""] + harness.table(("what", "bytes", "note"), [
        ("one record (a step), N = 16", f"{record}", "46 + 8 N: frame 8, seed/sigma/ids/N 30, loss 8, weights 8 N"),
        ("model weights (float32)", f"{weight_bytes:,}", f"{problem.name}: {weight_bytes / record:,.0f}x a record"),
        (f"journal after {steps} steps", f"{file_bytes:,}", "header (layout, fingerprint, optimizer) included")])
    timed = (("training, no journal", bare_s), ("training + journal (fsync per step)", journaled_s),
             ("... of which in journal.append (encode, write, fsync)", append_s), ("replay of the journal", replay_s))
    lines += ["", f"## 2. {steps} steps of N = {N} (antithetic, {problem.name}, ZOSGD)", ""] + harness.table(
        ("run", "time", "per step", "vs training"), [(name, harness.fmt_ms(t), harness.fmt_time(t / steps),
                                                      harness.fmt_ratio(t / bare_s)) for name, t in timed])
    lines += ["", f"Replayed parameters equal the journaled run bit for bit: {'yes' if exact else 'NO'}.", ""]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        reference, straight_s, _ = elastic(Path(tmp) / "straight", elastic_steps, None)
        rows, recoveries, lost = [], [], 0
        for k in range(kills):
            at = rng.randrange(1, elastic_steps)
            final, seconds, recovery = elastic(Path(tmp) / f"kill{k}", elastic_steps, at)
            same = all(torch.equal(a, b) for a, b in zip(final, reference))
            lost += not same
            recoveries.append(recovery or float("nan"))
            rows.append((str(k + 1), str(at), f"{seconds:.1f} s", f"{recovery:.2f} s" if recovery else "",
                         harness.verdict([("bit for bit", same)])))
    lines += [f"## 3. Elastic: {kills} SIGKILLs of rank 1 (python/elastic.py, {elastic_steps} steps, checkpoint every "
              f"10, torchrun --standalone --nproc_per_node=2 --max-restarts=3)", "",
              f"Uninterrupted run: {straight_s:.1f} s. Recovery (SIGKILL to restored state, including torchrun's "
              f"restart of both ranks): median {statistics.median(recoveries):.2f} s, max {max(recoveries):.2f} s. "
              f"Runs whose final parameters differ from the uninterrupted run: {lost} of {kills}.", ""]  # fmt: skip
    lines += harness.table(("kill", "at step", "run time", "recovery", "final params = uninterrupted"), rows)
    lines += ["", run.footer()]
    harness.write(args.out, lines, echo=True)


if __name__ == "__main__":
    main()
