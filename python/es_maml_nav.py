"""ES-MAML on 2D point navigation: a meta-gradient through a non-differentiable inner adaptation.

The task is the "2D navigation" of MAML (Finn et al. 2017) and ES-MAML (Song et al., arXiv 1910.01215),
written in torch and vectorized over tasks, candidate policies and ES members (no gym): a point robot
starts at the origin, each task draws a goal uniform in ``[-0.5, 0.5]^2``, an action is a displacement
clipped to ``[-0.1, 0.1]`` per coordinate, and each of the ``H`` steps pays minus the distance from the
new position to the goal (the reward of rllab's ``PointEnv``; no early termination, so every episode
lasts ``H`` steps). The observation is the position only: the policy never sees the goal, it must find
it from rewards. The policy is deterministic, ``action = clip(W s + b)`` (or a tanh MLP with
``--hidden``), over one flat parameter vector.

Inner adaptation: ES-MAML's monotonic hill climbing, vectorized. From the meta-parameters ``theta``,
each of ``--inner-rounds`` rounds draws ``--inner-candidates`` perturbations ``current + s * eps`` per
task, runs one rollout of each on the task, and keeps the best if its return beats the current
policy's (``argmax`` over the candidates and ``torch.where``, no Python ``if``, so the adaptation
vmaps). The step sizes ``s`` (one per policy parameter, as ``log s``) are meta-parameters too, as in
Meta-SGD: ES learns *where* the hill climbing should search. The meta-objective is the mean over a
batch of tasks of the return after adaptation; its gradient w.r.t. ``(theta, log s)`` comes from
``zo_kernels.zero_order(Normal(), method="antithetic", ...)`` with ``batch_size``, so one vmapped
call runs the adaptation and its rollouts for many ES members at once. Every member of an estimate
sees the same tasks and the same hill-climbing noise (common random numbers: arguments, not draws
inside the function). The meta-optimizer is ``torch.optim.Adam`` on ``.grad`` (minimizing minus the
return).

Why autograd (MAML) cannot do this: the adaptation returns ``gather(candidates, argmax(returns))``
guarded by ``where(best > current)``. ``argmax`` and the comparison are integer- and boolean-valued, so no
gradient flows through *which* candidate wins. Backpropagating through this code (possible at all only
because this toy simulator is torch; an RL simulator gives no gradient) differentiates the winner's
return with the winner frozen; and since each round starts from the previous round's winner, the
adapted return jumps wherever a winner changes: it is a discontinuous function of the meta-parameters,
whose pointwise derivative misses exactly the effect of the selection (and, through ``H`` steps of linear
feedback, can explode). ES differentiates the Gaussian smoothing of the whole bi-level process, jumps
included, from forward evaluations only.

The environment is deterministic and starts at the origin, so the hill climbing's rollouts are exact
evaluations and the post-adaptation return can never be below the pre-adaptation one (the current
policy is kept unless a candidate beats it): "adaptation helps" is guaranteed; what meta-training
changes is by how much, and how good the adapted policy is.

Measured (``bench/results/es_maml_nav.md``, seed 0, one CPU thread): on 128 held-out tasks (H=100) the
return after adaptation goes from -37.81 to -5.20 in 200 meta-steps (44-65 s on 2 shared CPU cores,
most of the gain in the first 30 steps), while the meta-policy's own return stays at -37.8: it learns
a stable linear feedback with ``b ~ 0`` that rests at the origin, so a hill-climbing move of ``b``
shifts its resting point towards the goal. The meta-policy is a starting point for adaptation, not a
policy. For scale (checked by hand, not by this script): a policy told the goal, ``clip(g - s)``,
earns -0.49; the best of a small grid of hand-set ``W = -k I`` and scales ``s`` reaches -5.19 after
the same hill climbing, so ES found about the best of that family rather than something beyond it.

Run::

    python python/es_maml_nav.py --out bench/results/es_maml_nav.md   # the full run, about a minute
    python python/es_maml_nav.py --quick                              # the test's settings, about a second
    python python/es_maml_nav.py --hidden 16 --meta-steps 100         # 2-16-2 MLP: -25.99 -> -5.54, ~3 min
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch
from tabulate import tabulate

import zo_kernels
from zo_kernels.distributions import Normal

GOAL_RANGE = 0.5  # goals uniform in [-GOAL_RANGE, GOAL_RANGE]^2 (MAML's 2D navigation)
MAX_ACTION = 0.1  # per-coordinate clip of the displacement


# -- the task ----------------------------------------------------------------------------------------------


def nav_step(pos: torch.Tensor, action: torch.Tensor, goal: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the point robot for every environment.

    Args:
        pos: ``(..., 2)`` positions.
        action: ``(..., 2)`` raw actions; clipped to ``[-MAX_ACTION, MAX_ACTION]`` per coordinate.
        goal: ``(..., 2)`` goals, broadcastable to ``pos``.

    Returns:
        The new positions ``(..., 2)`` and the rewards ``(...)``: minus the distance from the new position to the goal.
    """
    new_pos = pos + action.clamp(-MAX_ACTION, MAX_ACTION)
    return new_pos, -torch.linalg.vector_norm(new_pos - goal, dim=-1)


def num_policy_params(hidden: int) -> int:
    """Length of the flat parameter vector: ``W`` (2x2) and ``b`` (2), or a ``2-H-2`` MLP."""
    return 6 if hidden == 0 else 2 * hidden + hidden + 2 * hidden + 2


def policy_action(params: torch.Tensor, pos: torch.Tensor, hidden: int) -> torch.Tensor:
    """The raw action of the policy ``params`` ``(..., P)`` at positions ``pos`` ``(..., 2)`` (same leading dims)."""
    if hidden == 0:
        w = params[..., :4].unflatten(-1, (2, 2))
        return torch.einsum("...ij,...j->...i", w, pos) + params[..., 4:6]
    h = hidden
    w1 = params[..., : 2 * h].unflatten(-1, (h, 2))
    b1 = params[..., 2 * h : 3 * h]
    w2 = params[..., 3 * h : 5 * h].unflatten(-1, (2, h))
    b2 = params[..., 5 * h : 5 * h + 2]
    z = torch.tanh(torch.einsum("...ij,...j->...i", w1, pos) + b1)
    return torch.einsum("...ij,...j->...i", w2, z) + b2


def rollout_return(params: torch.Tensor, goal: torch.Tensor, horizon: int, hidden: int) -> torch.Tensor:
    """Undiscounted return of ``horizon`` steps from the origin, for policies ``(..., P)`` on goals ``(..., 2)``.

    The leading dims of ``params`` and ``goal`` broadcast; the loop has a fixed length, so it vmaps.
    """
    shape = torch.broadcast_shapes(params.shape[:-1], goal.shape[:-1])
    pos = torch.zeros(*shape, 2, dtype=params.dtype, device=params.device)
    total = torch.zeros(shape, dtype=params.dtype, device=params.device)
    for _ in range(horizon):
        pos, reward = nav_step(pos, policy_action(params, pos, hidden), goal)
        total = total + reward
    return total


def sample_goals(tasks: int, generator: torch.Generator) -> torch.Tensor:
    """``(tasks, 2)`` goals uniform in ``[-GOAL_RANGE, GOAL_RANGE]^2``."""
    return (torch.rand(tasks, 2, generator=generator) * 2 - 1) * GOAL_RANGE


# -- the inner adaptation and the meta-objective ---------------------------------------------------------------


def hill_climb(
    theta: torch.Tensor, log_step: torch.Tensor, goals: torch.Tensor, noise: torch.Tensor, horizon: int, hidden: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ES-MAML's monotonic hill climbing from ``theta`` on every task, all candidates of a round at once.

    Args:
        theta: ``(P,)`` meta-parameters (the policy every task starts from).
        log_step: ``(P,)`` log of the per-parameter perturbation scale.
        goals: ``(T, 2)`` the tasks.
        noise: ``(R, T, K, P)`` standard normal draws: ``R`` rounds of ``K`` candidates per task.
        horizon: steps per rollout.
        hidden: the policy's hidden width (0: linear).

    Returns:
        The adapted policies ``(T, P)``, their returns ``(T,)`` and the returns of ``theta`` before adaptation ``(T,)``.
    """
    tasks = goals.shape[0]
    current = theta.expand(tasks, -1)
    before = rollout_return(current, goals, horizon, hidden)
    current_return = before
    step = log_step.exp()
    for r in range(noise.shape[0]):
        candidates = current.unsqueeze(1) + step * noise[r]  # (T, K, P)
        returns = rollout_return(candidates, goals.unsqueeze(1), horizon, hidden)  # (T, K)
        best = returns.argmax(dim=1, keepdim=True)  # the selection autograd cannot differentiate
        best_return = returns.gather(1, best).squeeze(1)
        best_params = candidates.gather(1, best.unsqueeze(-1).expand(-1, -1, candidates.shape[-1])).squeeze(1)
        improved = best_return > current_return
        current = torch.where(improved.unsqueeze(-1), best_params, current)
        current_return = torch.where(improved, best_return, current_return)
    return current, current_return, before


def neg_adapted_return(
    meta: Dict[str, torch.Tensor], goals: torch.Tensor, noise: torch.Tensor, horizon: int, hidden: int
) -> torch.Tensor:
    """The meta-loss: minus the mean over tasks of the return after hill-climbing adaptation."""
    _, adapted, _ = hill_climb(meta["theta"], meta["log_step"], goals, noise, horizon, hidden)
    return -adapted.mean()


def evaluate(
    meta: Dict[str, torch.Tensor], goals: torch.Tensor, noise: torch.Tensor, horizon: int, hidden: int
) -> Tuple[float, float]:
    """Mean return on ``goals`` before and after adaptation (with the given hill-climbing noise)."""
    with torch.no_grad():
        _, after, before = hill_climb(meta["theta"], meta["log_step"], goals, noise, horizon, hidden)
    return float(before.mean()), float(after.mean())


# -- meta-training ------------------------------------------------------------------------------------------


def init_meta(hidden: int, init_step: float, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Small random policy weights, zero biases, and the same initial hill-climbing scale for every parameter."""
    p = num_policy_params(hidden)
    if hidden == 0:
        theta = torch.cat((0.1 * torch.randn(4, generator=generator), torch.zeros(2)))
    else:
        theta = torch.cat(
            (
                torch.randn(2 * hidden, generator=generator),
                torch.zeros(hidden),
                0.1 * torch.randn(2 * hidden, generator=generator) / math.sqrt(hidden),
                torch.zeros(2),
            )
        )
    return {
        "theta": theta.requires_grad_(),
        "log_step": torch.full((p,), math.log(init_step)).requires_grad_(),
    }


def train(
    args: argparse.Namespace, log: List[str] | None = None
) -> Tuple[List[Dict[str, float]], Dict[str, torch.Tensor]]:
    """ES-MAML meta-training from ``args`` (see :func:`parse_args`).

    Returns:
        One row per held-out evaluation (``step``, mean return ``before`` and ``after`` adaptation, the
        meta-batch's ``train_after`` return, ``time_s`` since the start), and the final meta-parameters.
        The printed lines are also appended to ``log`` when given.
    """

    def say(line: str) -> None:
        print(line, flush=True)
        if log is not None:
            log.append(line)

    torch.manual_seed(args.seed)  # every estimate's noise seed
    gen = torch.Generator().manual_seed(args.seed)
    meta = init_meta(args.hidden, args.inner_step, gen)
    p = num_policy_params(args.hidden)
    optimizer = torch.optim.Adam(list(meta.values()), lr=args.lr)
    loss_fn = zo_kernels.zero_order(
        Normal(),
        method="antithetic",
        num_samples=args.num_samples,
        sigma=args.sigma,
        batch_size=args.batch_size or 2 * args.num_samples,
    )(neg_adapted_return)

    # held-out tasks and their hill-climbing noise are fixed for the whole run, so evaluations compare
    held_gen = torch.Generator().manual_seed(args.seed + 10_000)
    held_goals = sample_goals(args.eval_tasks, held_gen)
    held_noise = torch.randn(args.inner_rounds, args.eval_tasks, args.inner_candidates, p, generator=held_gen)

    history: List[Dict[str, float]] = []
    start = time.perf_counter()

    def record(step: int, train_return: float) -> None:
        before, after = evaluate(meta, held_goals, held_noise, args.horizon, args.hidden)
        elapsed = time.perf_counter() - start
        history.append({"step": step, "before": before, "after": after, "train_after": train_return, "time_s": elapsed})
        train_text = f"{train_return:8.2f}" if math.isfinite(train_return) else f"{'-':>8}"
        say(
            f"meta-step {step:4d}  held-out return before {before:8.2f}  after {after:8.2f}  "
            f"gain {after - before:7.2f}  | train after {train_text}  | {elapsed:6.1f} s"
        )

    for step in range(args.meta_steps):
        goals = sample_goals(args.meta_batch, gen)
        noise = torch.randn(args.inner_rounds, args.meta_batch, args.inner_candidates, p, generator=gen)
        optimizer.zero_grad()
        loss = loss_fn(meta, goals, noise, args.horizon, args.hidden)
        if step % args.print_every == 0:
            record(step, -float(loss.detach()))  # before this step's update
        loss.backward()
        optimizer.step()
    record(args.meta_steps, float("nan"))  # no meta-batch after the last update
    return history, {k: t.detach() for k, t in meta.items()}


# -- command line -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="ES-MAML (hill-climbing adaptation) on 2D point navigation.")
    parser.add_argument("--meta-steps", type=int, default=200, help="meta-gradient steps")
    parser.add_argument("--num-samples", type=int, default=16, help="antithetic pairs N per meta-gradient estimate")
    parser.add_argument("--sigma", type=float, default=0.05, help="ES smoothing scale of the meta-parameters")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (meta-optimizer)")
    parser.add_argument("--batch-size", type=int, default=None, help="ES members per vmapped call (default: 2N)")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-gradient estimate")
    parser.add_argument("--eval-tasks", type=int, default=128, help="held-out tasks for the printed returns")
    parser.add_argument("--horizon", type=int, default=100, help="steps per rollout")
    parser.add_argument("--inner-rounds", type=int, default=3, help="hill-climbing rounds")
    parser.add_argument("--inner-candidates", type=int, default=16, help="perturbations per task and round")
    parser.add_argument("--inner-step", type=float, default=0.05, help="initial hill-climbing perturbation scale")
    parser.add_argument("--hidden", type=int, default=0, help="hidden width of a tanh MLP policy; 0: linear")
    parser.add_argument("--print-every", type=int, default=10, help="held-out evaluation every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings for the test")
    parser.add_argument("--out", default=None, help="write the log as markdown to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.meta_steps, args.num_samples, args.meta_batch = 20, 8, 8
        args.eval_tasks, args.horizon, args.print_every = 64, 20, 5
    return args


def write_markdown(path: str, argv: Sequence[str], header: str, lines: List[str], table: str) -> None:
    """The run's log as a markdown file: the command, the environment, the table and the printed lines."""
    command = " ".join(["python python/es_maml_nav.py", *argv])
    text = [
        "# ES-MAML on 2D point navigation (`python/es_maml_nav.py`)",
        "",
        "Written by `--out` at the end of the run; the lines below are the run's stdout.",
        "",
        "`before` / `after`: mean return (sum over the H steps of minus the distance to the goal) over the "
        "held-out tasks, of the meta-policy itself and of the policy after hill-climbing adaptation on each "
        "task (the held-out goals and their hill-climbing noise are fixed for the run). `train after`: the "
        "same after adaptation on the meta-batch of that step, before its update. Wall time: since the start "
        "of meta-training, held-out evaluations included.",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at the end "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (the machine may be shared: times are its own)",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"zo_kernels {zo_kernels.__version__}",
        "",
        table,
        "",
        "```",
        f"$ {command}",
        header,
        *lines,
        "```",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    """Meta-train, print held-out returns before and after adaptation, and a final table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    p = num_policy_params(args.hidden)
    kind = "linear" if args.hidden == 0 else f"MLP 2-{args.hidden}-2"
    header = (
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | {kind} policy, {p} parameters + {p} "
        f"log step sizes | hill climbing {args.inner_rounds} rounds x {args.inner_candidates} candidates | "
        f"H={args.horizon} | meta-batch {args.meta_batch} tasks | antithetic N={args.num_samples}, "
        f"sigma={args.sigma:g}, Adam lr={args.lr:g} | {args.eval_tasks} held-out tasks"
    )
    print(header, flush=True)
    lines: List[str] = []
    history, meta = train(args, lines)
    first, last = history[0], history[-1]
    rows = [[h["step"], h["before"], h["after"], h["after"] - h["before"], h["time_s"]] for h in history]
    table = tabulate(
        rows,
        headers=["meta-step", "return before adaptation", "return after adaptation", "gain", "wall time (s)"],
        floatfmt=".2f",
        tablefmt="github",
    )
    summary = (
        f"held-out return after adaptation {first['after']:.2f} -> {last['after']:.2f}, "
        f"before adaptation {first['before']:.2f} -> {last['before']:.2f} "
        f"in {args.meta_steps} meta-steps, {last['time_s']:.1f} s"
    )
    lines.append(summary)
    if args.hidden == 0:

        def fmt(values: torch.Tensor) -> str:
            return ", ".join(f"{v:.3f}" for v in values.tolist())

        theta, step = meta["theta"], meta["log_step"].exp()
        lines.append(
            f"learned meta-policy: W = [[{fmt(theta[:2])}], [{fmt(theta[2:4])}]], b = [{fmt(theta[4:])}]; "
            f"hill-climbing scales of (W, b) = [{fmt(step)}]"
        )
    print(table)
    for line in lines[-2:] if args.hidden == 0 else lines[-1:]:
        print(line, flush=True)
    if args.out:
        write_markdown(args.out, argv, header, lines, table)
    ok = all(math.isfinite(h["before"]) and math.isfinite(h["after"]) for h in history)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
