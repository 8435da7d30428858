"""Evolution strategies with low-rank noise (EGGROLL) on cart-pole, against full-rank noise at the same budget.

The task is the one of ``python/es_control.py``: Gym's ``CartPole-v1`` written in torch (a batch of
environments stepped in parallel, a fixed-length masked episode loop so that it vmaps), a policy whose
output is thresholded into a push left or right, and a return (the steps balanced) that autograd cannot
differentiate. It is restated here in a few lines so that this example stands alone.

The policy is an MLP ``4-H-H-1`` and each ES estimate perturbs its three matrices by
``A B^T / sqrt(r)`` (``LowRank(r)``, Sarkar et al., arXiv 2511.16652) instead of a full-rank normal
matrix. With ``batch_size``, all ``2N`` perturbed policies of an antithetic estimate run as one vmapped
rollout in which every member *shares* the unperturbed weights: ``state @ W`` becomes
``state @ W + (state @ A) @ B^T`` (``docs/lowrank.md``), so no member's weights exist::

    sg = zo_kernels.estimate(neg_return, params, starts, max_steps, distribution=LowRank(1),
                             method="antithetic", num_samples=N, sigma=sigma, batch_size=2 * N)
    optimizer.step(sg)                           # zo_kernels.optim.ZOAdam

The same training then runs with ``Normal()`` (same N, same seed, same starts) and a last line compares
the two: the return of the final policy on held-out starts and the time per iteration. On a policy this
small, low-rank noise costs time rather than saving it: the rewrite is a Python ``TorchFunctionMode`` that
sees every torch call of the 200-step rollout, and that dispatch outweighs the tiny matrix products
(measured with one CPU thread: about 2.4x slower per iteration at the default H=32, about even at H=256). It
pays where the matrices are large: at ``--hidden 1024`` (a million parameters) it was about 1.9x faster
than ``Normal()``, whose batch holds 2N perturbed copies of the weights (``docs/lowrank.md``).

Run::

    python python/lowrank_es.py                          # 30 iterations with each noise; about 15 s on 2 CPU cores
    python python/lowrank_es.py --hidden 256 --iterations 50
    python python/lowrank_es.py --quick                  # the smoke test's settings
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

# the task itself is es_control.py's (the same batched torch cart-pole); only the policy differs
from es_control import THETA_LIMIT, X_LIMIT, cartpole_step, random_starts

import zo_kernels
from zo_kernels.distributions import FusedDistribution, LowRank, Normal
from zo_kernels.optim import ZOAdam

Params = Dict[str, torch.Tensor]


def steps_balanced(params: Params, starts: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Mean steps the pole stays up over the environments started at ``starts`` ``(envs, 4)``.

    Every use of a matrix is ``activations @ W``: a matmul that the low-rank batch rewrites into the
    shared product plus the member's low-rank term, so nothing is materialized per member.
    """
    state = starts
    alive = torch.ones(starts.shape[0], dtype=torch.bool, device=starts.device)
    balanced = torch.zeros(starts.shape[0], dtype=starts.dtype, device=starts.device)
    for _ in range(max_steps):  # fixed length, masks instead of `if`: vmap needs no data-dependent control flow
        h = torch.tanh(state @ params["w1"] + params["b1"])
        h = torch.tanh(h @ params["w2"] + params["b2"])
        state = cartpole_step(state, (h @ params["w3"] + params["b3"]).squeeze(-1) > 0)
        alive = alive & (state[..., 0].abs() <= X_LIMIT) & (state[..., 2].abs() <= THETA_LIMIT)
        balanced = balanced + alive.to(balanced.dtype)
    return balanced.mean()


def neg_return(params: Params, starts: torch.Tensor, max_steps: int) -> torch.Tensor:
    """The loss ES minimises: minus the mean return."""
    return -steps_balanced(params, starts, max_steps)


def init_policy(hidden: int, device: torch.device) -> Params:
    """A tanh MLP ``4-H-H-1`` with scaled normal weights and zero biases."""
    return {
        "w1": torch.randn(4, hidden, device=device) / 2.0,
        "b1": torch.zeros(hidden, device=device),
        "w2": torch.randn(hidden, hidden, device=device) / hidden**0.5,
        "b2": torch.zeros(hidden, device=device),
        "w3": torch.randn(hidden, 1, device=device) / hidden**0.5,
        "b3": torch.zeros(1, device=device),
    }


def train(
    args: argparse.Namespace, distribution: FusedDistribution, device: torch.device
) -> Tuple[List[float], List[float], Params]:
    """One ES run from ``torch.manual_seed(args.seed)``: returns per iteration, seconds per iteration, the policy."""
    torch.manual_seed(args.seed)  # the same initial policy and the same noise seeds for both distributions
    starts_gen = torch.Generator().manual_seed(args.seed + 1)
    params = init_policy(args.hidden, device)
    optimizer = ZOAdam(list(params.values()), lr=args.lr)
    returns: List[float] = []
    times: List[float] = []
    for it in range(args.iterations):
        starts = random_starts(args.envs, starts_gen, device)
        tick = time.perf_counter()
        sg = zo_kernels.estimate(
            neg_return,
            params,
            starts,
            args.max_steps,
            distribution=distribution,
            method="antithetic",
            num_samples=args.num_samples,
            sigma=args.sigma,
            batch_size=args.batch_size or 2 * args.num_samples,
        )
        optimizer.step(sg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
        returns.append(-sg.loss)  # the unperturbed policy's return on this iteration's starts
        print(
            f"[{distribution}] iteration {it:3d}  return {returns[-1]:7.2f}  loss {sg.loss:8.2f}  "
            f"{times[-1] * 1e3:7.1f} ms/iteration",
            flush=True,
        )
    return returns, times, params


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="ES with LowRank noise on cart-pole, compared with Normal noise.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=30, help="ES updates per run")
    parser.add_argument("--envs", type=int, default=16, help="environments per evaluation (same starts for all)")
    parser.add_argument("--max-steps", type=int, default=200, help="episode length cap")
    parser.add_argument("--hidden", type=int, default=32, help="width H of the 4-H-H-1 MLP policy")
    parser.add_argument("--rank", type=int, default=1, help="rank r of each matrix's perturbation")
    parser.add_argument("--num-samples", type=int, default=16, help="antithetic pairs N per estimate")
    parser.add_argument("--sigma", type=float, default=0.1, help="ES perturbation scale")
    parser.add_argument("--lr", type=float, default=0.05, help="ZOAdam learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help="policies per vmapped rollout (default: 2N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short run (the test's): 8 iterations of 100 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.max_steps = 8, 100
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train with LowRank(r), then with Normal() at the same N, and compare."""
    args = parse_args(argv)
    device = torch.device(args.device)
    n_params = sum(p.numel() for p in init_policy(args.hidden, device).values())
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | "
        f"MLP 4-{args.hidden}-{args.hidden}-1 policy, {n_params} parameters | antithetic N={args.num_samples}, "
        f"sigma={args.sigma:g}, batch_size={args.batch_size or 2 * args.num_samples}, ZOAdam lr={args.lr:g} | "
        f"{args.envs} envs x {args.max_steps} steps"
    )
    # 256 starts no training iteration sees: the return of the initial and the final policy on them is the
    # progress measure (each iteration's own return moves with its 16 random starts)
    held_out = random_starts(256, torch.Generator().manual_seed(args.seed + 10_000), device)
    torch.manual_seed(args.seed)
    initial = float(steps_balanced(init_policy(args.hidden, device), held_out, args.max_steps))
    results = {}
    for distribution in (LowRank(args.rank), Normal()):
        returns, times, params = train(args, distribution, device)
        final = float(steps_balanced(params, held_out, args.max_steps))
        if not all(math.isfinite(r) for r in returns) or not math.isfinite(final):
            print(f"[{distribution}] a return is not finite")
            return 1
        # the median: the first iterations pay one-time setup, and a busy machine adds outliers
        results[distribution] = (final, statistics.median(times))
        print(
            f"[{distribution}] held-out return {initial:.2f} -> {final:.2f} (256 new starts) in {args.iterations} "
            f"iterations, median {results[distribution][1] * 1e3:.1f} ms/iteration"
        )
    (low, (low_final, low_time)), (full, (full_final, full_time)) = results.items()
    print(
        f"comparison at N={args.num_samples}: {low} held-out return {low_final:.2f}, median {low_time * 1e3:.1f} "
        f"ms/iteration | {full} held-out return {full_final:.2f}, median {full_time * 1e3:.1f} ms/iteration | "
        f"time ratio {low_time / full_time:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
