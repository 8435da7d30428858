"""Evolution-strategy policy search on cart-pole, with a return that has no gradient at all.

The environment is the classic cart-pole of Barto, Sutton & Anderson (1983), with the equations and
constants of Gym's ``CartPole-v1``, written in torch: a batch of environments is one ``(envs, 4)``
tensor of states ``(x, x_dot, theta, theta_dot)`` stepped in parallel by Euler integration. The policy
is a small network (linear by default, an MLP with ``--hidden H``) whose output is thresholded into a
push of ``+10 N`` or ``-10 N``. An episode ends when the pole leans more than 12 degrees or the cart
leaves ``|x| < 2.4``; the return is the number of steps balanced (at most ``--max-steps``).

Both the action (a hard threshold) and the termination test are step functions of the policy's
parameters, so the return is piecewise constant: autograd has nothing to differentiate (the script
checks that the return does not even require grad). Evolution strategies estimate the gradient of
the Gaussian-smoothed return instead, from returns at perturbed parameters::

    sg = zo_kernels.estimate(neg_return, params, starts, method="antithetic", num_samples=N, sigma=sigma,
                             batch_size=2 * N)   # all 2N perturbed policies in one vmapped rollout
    optimizer.step(sg)                           # zo_kernels.optim.ZOAdam

``batch_size`` makes one call of the rollout evaluate many perturbed policies through
``torch.func.vmap``: the episode loop has a fixed length and uses masks, not Python ``if`` statements, so it
vmaps. Every perturbation of one estimate sees the same initial states (common random numbers),
and the noise of every estimate comes from a seed drawn from torch's default generator, so
``torch.manual_seed(seed)`` reproduces a run bit for bit: the script trains twice with the same seed
and checks that the returns and the final parameters are identical.

Run::

    python python/es_control.py                        # defaults: 40 iterations, twice; about 5 s on 2 CPU cores
    python python/es_control.py --iterations 5 --max-steps 100
    python python/es_control.py --hidden 16 --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

import zo_kernels
from zo_kernels.optim import ZOAdam

# CartPole-v1 constants (SI units).
GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5  # half the pole's length
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE = 10.0
TAU = 0.02  # seconds per step
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * math.pi / 360

Params = Dict[str, torch.Tensor]


def cartpole_step(state: torch.Tensor, push_right: torch.Tensor) -> torch.Tensor:
    """One Euler step of the cart-pole equations for every environment.

    Args:
        state: ``(..., 4)`` tensor of ``(x, x_dot, theta, theta_dot)``.
        push_right: boolean tensor of shape ``state.shape[:-1]``: push with ``+FORCE`` where true, ``-FORCE`` else.

    Returns:
        The next state, same shape.
    """
    x, x_dot, theta, theta_dot = state.unbind(-1)
    force = torch.where(push_right, FORCE, -FORCE)
    cos, sin = torch.cos(theta), torch.sin(theta)
    temp = (force + POLE_MASS_LENGTH * theta_dot**2 * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos**2 / TOTAL_MASS))
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
    return torch.stack(
        (x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc), dim=-1
    )


def policy(params: Params, state: torch.Tensor) -> torch.Tensor:
    """The policy's decision, push right or not, for every environment (a hard threshold at 0)."""
    if "w1" in params:
        hidden = torch.tanh(state @ params["w1"] + params["b1"])
        score = hidden @ params["w2"] + params["b2"]
    else:
        score = state @ params["w"] + params["b"]
    return score.squeeze(-1) > 0


def steps_balanced(params: Params, starts: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Mean number of steps the pole stays up, over the environments started at ``starts`` ``(envs, 4)``.

    The loop always runs ``max_steps`` steps and masks finished episodes (no data-dependent Python
    control flow), so ``torch.func.vmap`` can run many perturbed policies at once.
    """
    state = starts
    alive = torch.ones(starts.shape[0], dtype=torch.bool, device=starts.device)
    balanced = torch.zeros(starts.shape[0], dtype=starts.dtype, device=starts.device)
    for _ in range(max_steps):
        state = cartpole_step(state, policy(params, state))
        upright = (state[..., 0].abs() <= X_LIMIT) & (state[..., 2].abs() <= THETA_LIMIT)
        alive = alive & upright
        balanced = balanced + alive.to(balanced.dtype)
    return balanced.mean()


def neg_return(params: Params, starts: torch.Tensor, max_steps: int) -> torch.Tensor:
    """The loss ES minimises: minus the mean return."""
    return -steps_balanced(params, starts, max_steps)


def init_policy(hidden: int, device: torch.device) -> Params:
    """A linear policy (``hidden == 0``) or a one-hidden-layer tanh MLP, small random weights."""
    if hidden == 0:
        return {"w": 0.1 * torch.randn(4, 1, device=device), "b": torch.zeros(1, device=device)}
    return {
        "w1": torch.randn(4, hidden, device=device) / 2.0,
        "b1": torch.zeros(hidden, device=device),
        "w2": torch.randn(hidden, 1, device=device) / hidden**0.5,
        "b2": torch.zeros(1, device=device),
    }


def random_starts(envs: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gym's initial states: every coordinate uniform in ``[-0.05, 0.05]``."""
    return ((torch.rand(envs, 4, generator=generator) - 0.5) * 0.1).to(device)


def train(args: argparse.Namespace, device: torch.device, verbose: bool) -> Tuple[List[float], Params]:
    """One ES run from ``torch.manual_seed(args.seed)``. Returns the return per iteration and the final policy."""
    torch.manual_seed(args.seed)  # the policy's initialisation and every estimate's noise seed
    starts_gen = torch.Generator().manual_seed(args.seed + 1)
    params = init_policy(args.hidden, device)
    optimizer = ZOAdam(list(params.values()), lr=args.lr)
    returns: List[float] = []
    for it in range(args.iterations):
        starts = random_starts(args.envs, starts_gen, device)
        tick = time.perf_counter()
        sg = zo_kernels.estimate(
            neg_return,
            params,
            starts,
            args.max_steps,
            method="antithetic",
            num_samples=args.num_samples,
            sigma=args.sigma,
            batch_size=2 * args.num_samples if args.batch_size is None else args.batch_size,
        )
        optimizer.step(sg)
        returns.append(-sg.loss)  # the unperturbed policy's return on this iteration's starts
        if verbose:
            print(
                f"iteration {it:3d}  return {returns[-1]:7.2f} (mean steps balanced of {args.envs} envs, "
                f"max {args.max_steps})  {time.perf_counter() - tick:.2f} s",
                flush=True,
            )
    return returns, params


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Evolution-strategy policy search on a batched torch cart-pole.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=40, help="ES updates per run")
    parser.add_argument("--envs", type=int, default=16, help="environments per evaluation (same starts for all)")
    parser.add_argument("--max-steps", type=int, default=200, help="episode length cap (CartPole-v0: 200)")
    parser.add_argument("--hidden", type=int, default=0, help="hidden units of the MLP policy; 0: linear policy")
    parser.add_argument("--num-samples", type=int, default=16, help="antithetic pairs per estimate")
    parser.add_argument("--sigma", type=float, default=0.1, help="ES perturbation scale")
    parser.add_argument("--lr", type=float, default=0.05, help="ZOAdam learning rate")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="perturbed policies per vmapped rollout (default: all 2N)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the second run (the reproducibility check)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, show that autograd sees no gradient, and check that a second run reproduces the first."""
    args = parse_args(argv)
    device = torch.device(args.device)
    n_params = sum(p.numel() for p in init_policy(args.hidden, device).values())
    kind = "linear" if args.hidden == 0 else f"MLP 4-{args.hidden}-1"
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | "
        f"{kind} policy, {n_params} parameters | antithetic N={args.num_samples}, sigma={args.sigma:g}, "
        f"ZOAdam lr={args.lr:g} | {args.envs} envs x {args.max_steps} steps"
    )

    probe = {k: v.clone().requires_grad_() for k, v in init_policy(args.hidden, device).items()}
    probe_return = steps_balanced(probe, random_starts(args.envs, torch.Generator().manual_seed(0), device), 50)
    print(
        f"autograd: the return requires_grad={probe_return.requires_grad} (thresholded actions and termination "
        "tests: piecewise constant in the parameters), so backprop has no gradient to give"
    )

    tick = time.perf_counter()
    returns, params = train(args, device, verbose=True)
    print(
        f"return {returns[0]:.2f} -> {returns[-1]:.2f} in {args.iterations} iterations, "
        f"{time.perf_counter() - tick:.1f} s"
    )
    if not all(math.isfinite(r) for r in returns):
        print("a return is not finite")
        return 1

    held_out = random_starts(256, torch.Generator().manual_seed(args.seed + 10_000), device)
    print(
        f"held-out return of the final policy: {float(steps_balanced(params, held_out, args.max_steps)):.2f} "
        f"(mean of 256 new starts, max {args.max_steps})"
    )

    if not args.no_check:
        again, params_again = train(args, device, verbose=False)
        same_params = all(torch.equal(params[k], params_again[k]) for k in params)
        if again != returns or not same_params:
            print(f"reproducibility FAILED: seed {args.seed} gave different returns or parameters on a second run")
            return 1
        print(
            f"reproducibility checked: a second run with seed {args.seed} gave identical returns at all "
            f"{len(returns)} iterations and bitwise-identical final parameters"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
