"""Zero-order training spread over processes with ``process_group=``: every rank ends with the same model.

With ``zo_kernels.zero_order(..., process_group=dist.group.WORLD)``, each of the W ranks evaluates a
contiguous share of the N perturbed losses of an estimate. The ranks then all-gather those N scalars
(not n-element gradients) and every rank rebuilds the same gradient from the same noise seed, rank
0's, broadcast at each estimate. So the optimizer steps are identical on every rank and the
parameters never drift apart, with no parameter or gradient all-reduce at all.

The script fits a small MLP (32 -> 16 -> 1, tanh) to a noisy teacher network with Adam, on
minibatches drawn from a generator seeded identically on every rank. To show that the noise seed
really comes from rank 0, each rank seeds torch's default generator differently after the model is
initialised (same initial weights everywhere). At the end every rank hashes its parameters (SHA-256
of their bytes) and prints the digest; rank 0 all-gathers the digests and checks that they agree.
Rank 0 prints the loss per step.

Run::

    torchrun --nproc_per_node=2 python/distributed.py          # 2 ranks: gloo on CPU, NCCL with >= 2 GPUs
    python python/distributed.py                               # one process (a world of 1, gloo)
    torchrun --nproc_per_node=2 python/distributed.py --steps 20 --print-every 1

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) the script starts a group of one
process (gloo, or NCCL on a GPU) on an in-memory store, so it needs no port. The default device is
CUDA when there is one GPU per local rank (each rank takes ``cuda:LOCAL_RANK`` and the group uses
NCCL); otherwise the CPU with gloo. The defaults take a few seconds on 2 CPU cores (torchrun sets
``OMP_NUM_THREADS=1`` per rank; on a busy machine a single process runs faster with it too).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import os
import sys
import time
from typing import Dict, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import zo_kernels
from zo_kernels import distributions

Params = Dict[str, torch.Tensor]


def default_device() -> str:
    """``'cuda'`` when every local rank can have a GPU of its own, else ``'cpu'``."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "cpu"


def init_group(device_name: str, timeout_s: float) -> Tuple[int, int, torch.device]:
    """Join (or, without torchrun, create) the default process group. Returns ``(rank, world, device)``.

    Under torchrun (``RANK`` and ``WORLD_SIZE`` set) the group is initialised from the environment:
    NCCL for CUDA, gloo for the CPU. Without it, a group of one process on an in-memory store (no port).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    device = torch.device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "NCCL needs one GPU per rank: use --device cpu (gloo) or fewer processes"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if launched:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def init_mlp(dim: int, hidden: int, device: torch.device) -> Params:
    """A 2-layer tanh MLP ``dim -> hidden -> 1`` as a dict of leaf tensors that require grad."""
    return {
        "w1": (torch.randn(dim, hidden) / dim**0.5).to(device).requires_grad_(),
        "b1": torch.zeros(hidden, device=device, requires_grad=True),
        "w2": (torch.randn(hidden, 1) / hidden**0.5).to(device).requires_grad_(),
        "b2": torch.zeros(1, device=device, requires_grad=True),
    }


def mlp(p: Params, x: torch.Tensor) -> torch.Tensor:
    """The MLP with parameters ``p`` applied to ``x`` ``(batch, dim)``: outputs ``(batch, 1)``."""
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean-squared error of the MLP on ``(x, y)``."""
    return F.mse_loss(mlp(p, x), y)


def checksum(params: Params) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's bytes, in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Zero-order training with the samples spread over torch.distributed ranks."
    )
    parser.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda with one GPU per local rank, else cpu)"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--num-samples", type=int, default=64, help="N per estimate, split over the ranks")
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--batch", type=int, default=128, help="minibatch size (the same batch on every rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=0, help="report every k steps (default: steps / 10)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait for the others")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Params:
    """Fit the MLP with ``process_group=dist.group.WORLD`` estimates; rank 0 prints the loss per step."""
    dim, hidden = 32, 16
    torch.manual_seed(args.seed)  # the same teacher and initial weights on every rank
    teacher = init_mlp(dim, hidden, torch.device("cpu"))
    params = init_mlp(dim, hidden, device)
    torch.manual_seed(args.seed + 1000 * (rank + 1))  # a different RNG per rank: the noise seed must come from rank 0
    data_gen = torch.Generator().manual_seed(args.seed + 1)  # the same minibatches on every rank

    @zo_kernels.zero_order(
        distributions.Normal(),
        method="antithetic",
        num_samples=args.num_samples,
        sigma=args.sigma,
        process_group=dist.group.WORLD,
    )
    def loss_fn(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mlp_loss(p, x, y)

    optimizer = torch.optim.Adam(params.values(), lr=args.lr)
    every = args.print_every or max(1, args.steps // 10)
    tick = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(args.batch, dim, generator=data_gen)
        with torch.no_grad():
            y = mlp(teacher, x) + 0.01 * torch.randn(args.batch, 1, generator=data_gen)
        loss = loss_fn(params, x.to(device), y.to(device))
        optimizer.zero_grad()
        loss.backward()  # this rank's share of the 2N evaluations, an all-gather of the losses, the same g everywhere
        optimizer.step()
        if step % every == 0 or step == args.steps - 1:
            value = loss.item()  # the same on every rank (same parameters, same batch)
            if not math.isfinite(value):
                raise FloatingPointError(f"rank {rank}: loss is {value} at step {step}: lower --lr")
            if rank != 0:
                continue
            rate = (step + 1) / (time.perf_counter() - tick)
            print(f"step {step:4d}  loss {value:.6f}  ({rate:.1f} steps/s)", flush=True)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Train on every rank, then check that all ranks hold bitwise-identical parameters."""
    args = parse_args(argv)
    rank, world, device = init_group(args.device or default_device(), args.timeout)
    try:
        if rank == 0:
            share = ", ".join(
                str(args.num_samples // world + (1 if r < args.num_samples % world else 0)) for r in range(world)
            )
            print(
                f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | {world} rank(s), "
                f"{dist.get_backend()} | device {device} | MLP 32-16-1, antithetic N={args.num_samples} "
                f"(samples per rank: {share}), sigma={args.sigma:g}, Adam lr={args.lr:g}",
                flush=True,
            )
        params = train(args, rank, world, device)
        digest = checksum(params)
        print(f"rank {rank} final parameter checksum {digest}", flush=True)
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            if rank == 0:
                print(f"MISMATCH: the ranks' parameters differ: {digests}", flush=True)
            return 1
        if rank == 0:
            print(f"all {world} rank(s) hold bitwise-identical parameters (checksum {digest})", flush=True)
        return 0
    finally:
        # Every rank is done with the group before any rank tears it down: a gloo peer that closes
        # its connections while another still holds them can abort that one at exit.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
