"""Evolution strategies on real Gymnasium environments: the return is a black box, evaluated without autograd.

The objective is minus the mean episode return of a small MLP policy on a Gymnasium environment
(``--env CartPole-v1``, discrete actions, or ``--env Pendulum-v1``, a continuous torque). The
environment is NumPy code: nothing in it has a gradient, so the loss function runs its episodes
under ``torch.no_grad()`` and hands back one number. zo_kernels treats it as a black box: each
estimate evaluates the policy at ``2N`` perturbed parameter sets (antithetic pairs) and weights the
noise by the *ranks* of their losses::

    sg = zo_kernels.estimate(neg_mean_return, params, envs, reset_seed, method="antithetic",
                             num_samples=N, sigma=sigma, fitness_shaping="centered_ranks")
    optimizer.step(sg)                               # zo_kernels.optim.ZOAdam

Centered ranks (Salimans et al. 2017) make the step independent of the return's scale and of
outliers: CartPole's returns run from 10 to 500 and Pendulum's from -1600 to -100, and one lucky
episode would otherwise dominate an update. Every loss call evaluates one perturbed policy on a
vector of ``--envs`` environments at once (``gymnasium.make_vec``: one batched policy forward and
one vectorized environment step per time step, for all episodes), reset with the same seeds for
every member of one estimate (common random numbers: the ranks compare policies, not starts).

The run stops when the policy is solved: when the unperturbed policy's return in an iteration
reaches the environment's threshold (CartPole-v1: 475), a held-out evaluation on
``--eval-episodes`` new episodes decides. Environments without a threshold (Pendulum) run
``--iterations`` iterations and report the change of the held-out return.

Run::

    python python/es_gym.py                                   # CartPole-v1 to solved, about 20 s on 2 CPU cores
    python python/es_gym.py --env Pendulum-v1 --iterations 15
    python python/es_gym.py --env CartPole-v1 --vectorization sync    # gymnasium.vector.SyncVectorEnv
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, List, Sequence

import gymnasium as gym
import numpy as np
import torch

import zo_kernels
from zo_kernels.optim import ZOAdam

Params = Dict[str, torch.Tensor]


class Policy:
    """A tanh MLP from observations to actions, its weights a dict of tensors (what ES perturbs).

    Discrete action spaces take the argmax of one output per action; box spaces squash each output
    into the action's bounds with tanh.
    """

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, hidden: int) -> None:
        self.inputs = int(np.prod(observation_space.shape))
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        if self.discrete:
            self.outputs = int(action_space.n)
        else:
            self.outputs = int(np.prod(action_space.shape))
            low = torch.as_tensor(action_space.low, dtype=torch.float32)
            high = torch.as_tensor(action_space.high, dtype=torch.float32)
            self.center, self.half_range = (high + low) / 2, (high - low) / 2
            self.action_shape = action_space.shape
        self.hidden = hidden

    def init(self) -> Params:
        """Small random weights (from torch's default generator, so ``torch.manual_seed`` fixes them)."""
        return {
            "w1": torch.randn(self.inputs, self.hidden) / self.inputs**0.5,
            "b1": torch.zeros(self.hidden),
            "w2": torch.randn(self.hidden, self.outputs) / self.hidden**0.5,
            "b2": torch.zeros(self.outputs),
        }

    def act(self, params: Params, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations ``(envs, *obs_shape)``, as the vector environment wants them."""
        x = torch.from_numpy(np.asarray(obs, dtype=np.float32)).reshape(len(obs), self.inputs)
        out = torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
        if self.discrete:
            return out.argmax(-1).numpy()
        action = self.center + self.half_range * torch.tanh(out)
        return action.reshape(len(obs), *self.action_shape).numpy()


@torch.no_grad()  # the environment is NumPy: there is nothing for autograd to record
def mean_return(policy: Policy, params: Params, envs: gym.vector.VectorEnv, reset_seed: int, max_steps: int) -> float:
    """Mean undiscounted return of one episode in each of the vector's environments, started from ``reset_seed``.

    Every environment runs until its first episode ends (terminated or truncated); the vector
    keeps stepping the others, and what a finished environment does after that (Gymnasium resets
    it at the next step) is masked out. The loop ends as soon as every episode is over.
    """
    # The same seed gives the same starts on every call. (How it seeds the environments depends on the class:
    # SyncVectorEnv seeds environment k with reset_seed + k, CartPoleVectorEnv draws all starts from one
    # generator seeded with reset_seed, so the two modes start differently.)
    obs, _ = envs.reset(seed=reset_seed)
    total = np.zeros(envs.num_envs)
    running = np.ones(envs.num_envs, dtype=bool)
    for _ in range(max_steps):
        obs, reward, terminated, truncated, _ = envs.step(policy.act(params, obs))
        total += np.where(running, reward, 0.0)
        running &= ~(terminated | truncated)
        if not running.any():
            break
    return float(total.mean())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults solve CartPole-v1."""
    parser = argparse.ArgumentParser(description="Evolution strategies (zo_kernels) on Gymnasium environments.")
    parser.add_argument("--env", default="CartPole-v1", help="a Gymnasium id, e.g. CartPole-v1 or Pendulum-v1")
    parser.add_argument(
        "--vectorization",
        choices=("auto", "vector_entry_point", "sync"),
        default="auto",
        help="gymnasium.make_vec mode; auto: the environment's own vectorized class if it has one, else sync",
    )
    parser.add_argument("--iterations", type=int, default=60, help="at most this many ES updates")
    parser.add_argument("--envs", type=int, default=8, help="episodes per evaluation of one policy (vector size)")
    parser.add_argument("--max-steps", type=int, default=None, help="episode cap (default: the spec's, 500 / 200)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP policy")
    parser.add_argument("--num-samples", type=int, default=16, help="antithetic pairs N per estimate (2N policies)")
    parser.add_argument("--sigma", type=float, default=0.2, help="ES perturbation scale")
    parser.add_argument("--lr", type=float, default=0.05, help="ZOAdam learning rate")
    parser.add_argument("--eval-episodes", type=int, default=100, help="held-out episodes of the final evaluation")
    parser.add_argument("--target", type=float, default=None, help="solved threshold (default: the spec's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train until solved (or for ``--iterations``), print the return per iteration and a held-out evaluation."""
    args = parse_args(argv)
    spec = gym.spec(args.env)
    max_steps = args.max_steps or spec.max_episode_steps or 1000
    target = args.target if args.target is not None else spec.reward_threshold
    mode = None if args.vectorization == "auto" else args.vectorization
    envs = gym.make_vec(args.env, num_envs=args.envs, vectorization_mode=mode)
    eval_envs = gym.make_vec(args.env, num_envs=args.eval_episodes, vectorization_mode=mode)
    policy = Policy(envs.single_observation_space, envs.single_action_space, args.hidden)

    torch.manual_seed(args.seed)  # the policy's initialisation and every estimate's noise seed
    params = policy.init()
    optimizer = ZOAdam(list(params.values()), lr=args.lr)
    n_params = sum(p.numel() for p in params.values())
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | gymnasium {gym.__version__} | "
        f"{args.env} ({type(envs).__name__}, {args.envs} envs, cap {max_steps} steps) | MLP "
        f"{policy.inputs}-{args.hidden}-{policy.outputs}, {n_params} parameters | antithetic N={args.num_samples}, "
        f"sigma={args.sigma:g}, centered ranks, ZOAdam lr={args.lr:g} | target {target}"
    )

    # Every evaluation of one estimate appends its mean return here: the first is the unperturbed
    # policy (the estimate's f(theta)), the other 2N are the population.
    evaluations: List[float] = []

    def neg_mean_return(p: Params, vector: gym.vector.VectorEnv, reset_seed: int) -> torch.Tensor:
        evaluations.append(mean_return(policy, p, vector, reset_seed, max_steps))
        return torch.tensor(-evaluations[-1])

    # Held-out episodes: seeds no training iteration uses (those are seed * 1000 + iteration).
    eval_seed = 10**6 + args.seed

    def held_out() -> float:
        return mean_return(policy, params, eval_envs, eval_seed, max_steps)

    start_return = held_out()
    solved_at = None
    start = time.perf_counter()
    for it in range(args.iterations):
        tick = time.perf_counter()
        evaluations.clear()
        # estimate + ZOAdam rather than the zero_order decorator + torch.optim: with a black box there is no
        # autograd graph for backward() to run through, and the SeedGradient carries f(theta) and the 2N
        # shaped weights straight to the optimizer (no .grad tensors, no requires_grad on the policy).
        sg = zo_kernels.estimate(
            neg_mean_return,
            params,
            envs,
            args.seed * 1000 + it,  # new starts every iteration, the same for all 2N members of this one
            method="antithetic",
            num_samples=args.num_samples,
            sigma=args.sigma,
            fitness_shaping="centered_ranks",
        )
        optimizer.step(sg)
        unperturbed, population = -sg.loss, float(np.mean(evaluations[1:]))
        line = (
            f"iteration {it:3d}  return {unperturbed:8.2f} (unperturbed, {args.envs} episodes)  "
            f"population mean {population:8.2f}  {time.perf_counter() - tick:5.2f} s/iteration"
        )
        # The return above is of the parameters before this step; a candidate is checked on held-out episodes.
        if target is not None and unperturbed >= target:
            evaluation = held_out()
            line += f"  held-out {evaluation:.2f}"
            if evaluation >= target:
                solved_at = it
        print(line, flush=True)
        if solved_at is not None:
            break
    seconds = time.perf_counter() - start
    final = held_out()
    if not math.isfinite(final):
        print(f"the final return is {final}")
        return 1
    iterations = it + 1
    status = ""
    if target is not None:
        status = f"solved (>= {target:g}) at iteration {solved_at}" if solved_at is not None else "NOT solved"
        status = f" | {status}"
    print(
        f"final evaluation: mean return {final:.2f} over {args.eval_episodes} held-out episodes "
        f"(before training {start_return:.2f}){status} | {iterations} iterations, {seconds:.1f} s total, "
        f"{seconds / iterations:.2f} s/iteration"
    )
    envs.close()
    eval_envs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
