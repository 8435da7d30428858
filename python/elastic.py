"""Elastic zero-order training on torchrun: a rank dies, the job restarts, and nothing is lost or done twice.

Every rank evaluates its share of each estimate (``process_group=dist.group.WORLD``) and applies the
same ``ZOSGD`` step (momentum 0.9) to a small tanh MLP fitted to a teacher network on synthetic data.
The run survives restarts with two files in the shared directory ``--dir``:

- ``checkpoint.pt``: every ``--checkpoint-every`` steps, rank 0 writes the parameters, the optimizer's
  state and the step, atomically (a temporary file, fsync, ``os.replace``), after starting the journal
  segment ``journal-<step>.zoj`` that the checkpoint names (its header fingerprints those parameters);
- the journal segment: rank 0 appends one record (seed, sample ids, weights, the optimizer's options)
  per step after applying it, durable (fsync) before the next step starts.

On start, every rank loads the checkpoint and replays the segment after it
(:func:`zo_kernels.journal.replay`, which checks the fingerprint, so a segment never lands on the
wrong checkpoint), which gives the exact state after the last recorded step; then rank 0 reopens the
segment for append and training continues. Each step's data and noise seed are functions of
``--seed`` and the step number, so a step redone after a restart is the same step.

What happens to a step in flight when a rank dies: the journal record is appended only after the
step is applied, so a step without a record (rank 0 died or was stopped before its append returned,
or the estimate's all-gather failed because the other rank was gone) is simply redone from the
restored state; a record cut short by the kill is a torn tail, dropped (with a warning) and
truncated. A step that was recorded is never applied twice: a restart does not continue from the
surviving ranks' parameters, every rank rebuilds them from checkpoint + journal. Whether a step in
flight was recorded or not, the final parameters equal those of an uninterrupted run bit for bit.

``--kill-at STEP`` makes rank 1 (rank 0 in a world of 1) SIGKILL itself just before that step, once:
it first writes the marker file ``killed`` (holding the time of the kill) to ``--dir``, and a later
incarnation that finds the marker goes on. After a restart rank 0 reports how long the recovery took.
At the end rank 0 writes the parameters to ``--dir/final.pt`` and prints their SHA-256; every rank
checks that the others hold the same.

Run::

    torchrun --standalone --nproc_per_node=2 --max-restarts=3 python/elastic.py --dir /tmp/run --kill-at 7
    python python/elastic.py --dir /tmp/run1        # a world of 1, no torchrun

torchrun's agent keeps one store for all restarts, and a new incarnation could read the gloo
addresses the killed one left there: each incarnation initialises its process group in its own
prefix of that store (``TORCHELASTIC_RESTART_COUNT``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import zo_kernels
from zo_kernels.distributions import Normal
from zo_kernels.journal import Journal, fingerprint, replay
from zo_kernels.optim import ZOSGD

DIM, HIDDEN = 8, 16
CHECKPOINT, MARKER, FINAL = "checkpoint.pt", "killed", "final.pt"


def init_group(timeout_s: float) -> Tuple[int, int]:
    """Join the job's process group (gloo), in this incarnation's prefix of torchrun's store; or a world of 1."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=rank == 0 and not agent_store,
        timeout=timeout,
    )
    incarnation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"zo_kernels_elastic/{incarnation}/", base)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world


def init_mlp(generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """A tanh MLP ``DIM -> HIDDEN -> 1``."""
    return {
        "w1": torch.randn(DIM, HIDDEN, generator=generator) / DIM**0.5,
        "b1": torch.zeros(HIDDEN),
        "w2": torch.randn(HIDDEN, 1, generator=generator) / HIDDEN**0.5,
        "b2": torch.zeros(1),
    }


def mlp(p: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP with parameters ``(w1, b1, w2, b2)`` applied to ``x``."""
    w1, b1, w2, b2 = p
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def loss_fn(p: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean-squared error of the MLP."""
    return F.mse_loss(mlp(p, x), y)


def batch(args: argparse.Namespace, teacher: Sequence[torch.Tensor], step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s minibatch: a function of ``--seed`` and the step only, the same on every rank and restart."""
    g = torch.Generator().manual_seed((args.seed << 32) + step)
    x = torch.randn(args.batch, DIM, generator=g)
    return x, mlp(teacher, x) + 0.01 * torch.randn(args.batch, 1, generator=g)


def step_seed(args: argparse.Namespace, step: int) -> int:
    """Step ``step``'s noise seed (all ranks pass the same one; estimate uses rank 0's anyway)."""
    return ((args.seed << 32) + step) ^ 0x9E3779B97F4A7C15


def atomic_save(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file, fsync, then ``os.replace``: readers see the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Run:
    """The training state of one rank and, on rank 0, the files that make it survive a restart."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        self.args, self.rank, self.world = args, rank, world
        g = torch.Generator().manual_seed(args.seed)
        self.teacher = list(init_mlp(g).values())
        self.params: List[torch.Tensor] = list(init_mlp(g).values())
        self.optimizer = ZOSGD(self.params, lr=args.lr, momentum=0.9)
        self.journal: Optional[Journal] = None
        self.segment_start = -1  # the step of the checkpoint the open journal segment starts at
        self.step = 0

    def path(self, name: str) -> str:
        return os.path.join(self.args.dir, name)

    def restore(self) -> Tuple[int, int, float]:
        """The last checkpoint, then its journal segment replayed: ``(checkpoint step, steps replayed, seconds)``."""
        tick = time.perf_counter()
        if not os.path.exists(self.path(CHECKPOINT)):
            return 0, 0, 0.0
        state = torch.load(self.path(CHECKPOINT), weights_only=True)
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        replayed = replay(self.path(state["journal"]), self.params, self.optimizer, distribution=Normal())
        self.segment_start, self.step = state["step"], state["step"] + replayed
        return state["step"], replayed, time.perf_counter() - tick

    def open_journal(self) -> None:
        """Rank 0: reopen the checkpoint's segment for append (truncating a torn tail), or checkpoint step 0."""
        if self.segment_start < 0:
            self.checkpoint()  # on the other ranks: just where the segment starts
        elif self.rank == 0:
            self.journal = Journal(self.path(f"journal-{self.segment_start:06d}.zoj"), self.params, self.optimizer)

    def checkpoint(self) -> None:
        """Rank 0: a new journal segment at this step, then the checkpoint naming it, then the old segments go."""
        self.segment_start = self.step
        if self.rank != 0:
            return
        if self.journal is not None:
            self.journal.close()
        name = f"journal-{self.step:06d}.zoj"
        if os.path.exists(self.path(name)):  # left by an incarnation that died before its checkpoint named it
            os.remove(self.path(name))
        self.journal = Journal(self.path(name), self.params, self.optimizer, distribution=Normal())
        state = {"step": self.step, "params": self.params, "optimizer": self.optimizer.state_dict(), "journal": name}
        atomic_save(state, self.path(CHECKPOINT))
        for old in glob.glob(self.path("journal-*.zoj")):
            if os.path.basename(old) != name:
                os.remove(old)

    def maybe_die(self) -> None:
        """``--kill-at``: the victim rank SIGKILLs itself before that step, in the first incarnation only."""
        if self.step != self.args.kill_at or self.rank != min(1, self.world - 1) or os.path.exists(self.path(MARKER)):
            return
        with open(self.path(MARKER), "w") as f:
            f.write(repr(time.time()))
            f.flush()
            os.fsync(f.fileno())
        print(f"rank {self.rank}: SIGKILL before step {self.step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def train(self) -> None:
        """The remaining steps: estimate across the ranks, step, then (rank 0) journal the step."""
        every = self.args.checkpoint_every
        while self.step < self.args.steps:
            if self.step % every == 0 and self.step != self.segment_start:
                self.checkpoint()
            self.maybe_die()
            x, y = batch(self.args, self.teacher, self.step)
            sg = zo_kernels.estimate(
                loss_fn,
                self.params,
                x,
                y,
                method="antithetic",
                num_samples=self.args.num_samples,
                sigma=self.args.sigma,
                seed=step_seed(self.args, self.step),
                process_group=dist.group.WORLD,
            )
            self.optimizer.step(sg)
            if self.journal is not None:
                self.journal.append(sg)
            self.step += 1
            if self.rank == 0 and (self.step % every == 0 or self.step == self.args.steps):
                print(f"step {self.step:4d}  loss {sg.loss:.6f}", flush=True)
        if self.journal is not None:
            self.journal.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Zero-order training that survives rank failures under torchrun.")
    parser.add_argument("--dir", required=True, help="directory shared by the ranks: checkpoint, journal, final.pt")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=None, help="rank 1 SIGKILLs itself before this step, once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=8, help="N per estimate (antithetic), split over ranks")
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.005)  # with momentum 0.9; 0.05 diverges
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait for the others")
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1 or args.steps < 0 or not 0 <= args.seed < 2**31:
        parser.error("--checkpoint-every must be >= 1, --steps >= 0 and --seed in [0, 2**31)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Restore, train to ``--steps``, write final.pt; 1 if the ranks' parameters differ."""
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    started = time.time()
    rank, world = init_group(args.timeout)
    try:
        run = Run(args, rank, world)
        checkpoint_step, replayed, seconds = run.restore()
        dist.barrier()  # every rank has read the files before rank 0 truncates a torn tail or starts a segment
        run.open_journal()
        incarnation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if rank == 0 and (checkpoint_step or replayed):
            since = ""
            if os.path.exists(run.path(MARKER)):
                with open(run.path(MARKER)) as f:
                    killed = float(f.read())
                since = (
                    f"; recovery took {time.time() - killed:.2f} s from the kill ({time.time() - started:.2f} s here)"
                )
            print(
                f"incarnation {incarnation}: restored the checkpoint of step {checkpoint_step} and replayed "
                f"{replayed} journaled steps in {seconds * 1e3:.1f} ms; resuming at step {run.step}{since}",
                flush=True,
            )
        run.train()
        digest = fingerprint(run.params)
        digests: List[Optional[str]] = [None] * world
        dist.all_gather_object(digests, digest)
        if rank == 0:
            atomic_save({"step": run.step, "params": run.params}, run.path(FINAL))
            print(f"final parameters {digest} after {run.step} steps", flush=True)
            if len(set(digests)) != 1:
                print(f"MISMATCH: the ranks' parameters differ: {digests}", flush=True)
        return 0 if len(set(digests)) == 1 else 1
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
