"""ES-MAML: the meta-gradient of few-shot adaptation from forward passes only, next to MAML and first-order MAML.

The task is MAML's few-shot sinusoid regression (Finn et al. 2017): each task is ``y = A sin(x - phase)``
with the amplitude ``A`` uniform in ``[0.1, 5]`` and the phase uniform in ``[0, pi]``; the learner sees
``K = 10`` points (the *support* set, ``x`` uniform in ``[-5, 5]``), adapts an MLP ``1-40-40-1`` (ReLU)
by a few SGD steps on them, and is scored by the MSE on new points of the same task (the *query*
set). Meta-learning looks for the initialisation ``theta`` from which that adaptation works best: it
minimises the mean query loss after adaptation, a bi-level function of ``theta``.

Three meta-learners train side by side, with the same initialisation, the same stream of task
batches and the same meta-optimizer (``torch.optim.Adam``); they differ only in how they get the
meta-gradient:

- **ES-MAML** (Song et al., arXiv 1910.01215): the whole inner loop of a batch of tasks is one black
  box ``theta -> mean query loss``, decorated with ``zo_kernels.zero_order(Normal(),
  method="antithetic", num_samples=N, sigma=sigma, batch_size=2N)``: ``loss.backward()`` gives an
  antithetic ES estimate of the gradient of its Gaussian smoothing from ``2N`` evaluations of the
  inner loop, all ``2N`` perturbed initialisations in one ``torch.func.vmap``-ed call. The adaptation
  operator is k plain SGD steps with exact inner gradients (``torch.func.grad``, which works under the
  estimator's ``no_grad`` and under vmap); ES-MAML allows any operator, this is its simplest. No graph
  of the inner loop is kept, so the memory does not grow with the number of inner steps.
- **MAML** through TorchOpt 0.7.3's *functional* API: every inner step is ``torchopt.sgd(inner_lr)``'s
  ``update(grads, state, inplace=False)`` followed by ``torchopt.apply_updates(..., inplace=False)``,
  with the inner gradients from ``torch.autograd.grad(..., create_graph=True)``, so backprop runs
  through the unrolled inner loop (second-order terms included). The functional API is used rather
  than ``torchopt.MetaSGD`` (an ``nn.Module`` wrapper) because it works on the same flat parameter
  tensor as the other two and adapts a whole batch of tasks at once instead of one task at a time.
- **FO-MAML**: the same unrolled loop with the inner gradients detached (first-order MAML): the
  meta-gradient is the query-loss gradient at the adapted parameters.

The network is written functionally over one flat parameter vector (``NUM_PARAMS`` = 1,761 floats):
:func:`forward` takes parameters of shape ``(..., NUM_PARAMS)`` and inputs ``(..., M, 1)``, so a batch
of tasks is adapted as one batched computation (a ``(tasks, NUM_PARAMS)`` tensor), without a loop.

Every few meta-steps the script prints the post-adaptation MSE of each learner on a fixed held-out
set of tasks (adapted on their ``K`` support points with the same inner loop, scored on 100 query
points each) and each learner's wall time so far (its meta-steps only, not the evaluations), then a
final table. ``bench/meta_gradient.py`` imports this module to measure the meta-gradient's cost as
the inner loop grows, with iMAML's implicit meta-gradient (:func:`imaml_meta_loss`) as a third way.

The defaults (sigma 0.05, N = 32, Adam lr 1e-2 for every learner) come from short tuning runs of
ES-MAML (200 meta-steps of 10 tasks, seed 0, 2026-12-07): sigma 0.02 and 0.1 learned more slowly
than 0.05; Adam lr 3e-3 was much slower and 3e-2 diverged (a perturbed inner loop's loss became
infinite, which ``zero_order`` reports as ``NonFiniteLossError``); 25 tasks per meta-step instead of
10 lowered ES-MAML's MSE further at the same step count. With MAML's own meta-lr, 1e-3, FO-MAML
too was far slower (post-adaptation MSE 3.07 vs 0.80 after those 200 meta-steps), so every learner
uses 1e-2.

Run::

    python python/es_maml.py                          # defaults: 300 meta-steps; under a minute on one CPU core
    python python/es_maml.py --inner-steps 1 --num-samples 64 --sigma 0.05
    python python/es_maml.py --quick                  # the smoke test's settings, a few seconds
    python python/es_maml.py --out bench/results/es_maml.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import zo_kernels
from zo_kernels.distributions import Normal

TORCHOPT_MISSING = "torchopt not installed"
LAYERS = (1, 40, 40, 1)
#: (weight, bias) shapes of each ``torch.nn.Linear``-style layer, in the flat vector's order.
SHAPES: Tuple[Tuple[int, ...], ...] = tuple(
    shape for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:]) for shape in ((fan_out, fan_in), (fan_out,))
)
NUM_PARAMS = sum(math.prod(shape) for shape in SHAPES)
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
# The defaults of the command line, also what bench/meta_gradient.py measures.
META_BATCH = 25  # tasks per meta-step (MAML's sinusoid setting)
SHOTS = 10  # K: support points per task
QUERY = 10  # query points per training task
INNER_STEPS = 5
INNER_LR = 0.01
NUM_SAMPLES = 32  # ES antithetic pairs: 64 inner loops per meta-gradient
SIGMA = 0.05
META_LR = 1e-2

MetaLoss = Callable[..., torch.Tensor]


def import_torchopt() -> Optional[ModuleType]:
    """The ``torchopt`` module, or None where it cannot be imported (the MAML learner is then skipped)."""
    try:
        import torchopt
    except ImportError:
        return None
    return torchopt


# --------------------------------------------------------------------------------------------------
# Tasks and the network
# --------------------------------------------------------------------------------------------------


@dataclass
class Tasks:
    """A batch of sinusoid tasks: support ``(xs, ys)`` and query ``(xq, yq)``, each ``(tasks, points, 1)``."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(xs, ys, xq, yq)``, the meta-loss's data arguments."""
        return self.xs, self.ys, self.xq, self.yq


def sample_tasks(batch: int, shots: int, generator: torch.Generator, query: int = 10) -> Tasks:
    """``batch`` sinusoid tasks with ``shots`` support and ``query`` query points each, drawn from ``generator``.

    Amplitude uniform in ``[0.1, 5]``, phase uniform in ``[0, pi]``, every ``x`` uniform in ``[-5, 5]``
    (MAML's sinusoid benchmark); ``y = amplitude * sin(x - phase)``.
    """

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    amplitude = uniform(*AMPLITUDE, batch, 1, 1)
    phase = uniform(*PHASE, batch, 1, 1)
    xs, xq = uniform(*X_RANGE, batch, shots, 1), uniform(*X_RANGE, batch, query, 1)
    return Tasks(xs, amplitude * torch.sin(xs - phase), xq, amplitude * torch.sin(xq - phase))


def init_params(generator: torch.Generator) -> torch.Tensor:
    """A flat ``(NUM_PARAMS,)`` initialisation, ``torch.nn.Linear``'s: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    parts = []
    for shape in SHAPES:
        fan_in = shape[1] if len(shape) == 2 else parts[-1].shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        parts.append((torch.rand(*shape, generator=generator) * 2 - 1) * bound)
    return torch.cat([p.reshape(-1) for p in parts])


def unflatten(params: torch.Tensor) -> List[torch.Tensor]:
    """Views of a ``(..., NUM_PARAMS)`` tensor as the layers' weights ``(..., out, in)`` and biases ``(..., out)``."""
    lead = params.shape[:-1]
    chunks = params.split([math.prod(s) for s in SHAPES], dim=-1)
    return [chunk.reshape(*lead, *shape) for chunk, shape in zip(chunks, SHAPES)]


def forward(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The MLP ``1-40-40-1`` (ReLU) at ``x`` ``(..., M, 1)`` with parameters ``(..., NUM_PARAMS)`` -> ``(..., M, 1)``.

    Leading dimensions broadcast: ``(NUM_PARAMS,)`` parameters serve every task of a batch, ``(tasks,
    NUM_PARAMS)`` ones give each task its own network (the adapted parameters).
    """
    h = x
    layers = unflatten(params)
    for k in range(0, len(layers), 2):
        weight, bias = layers[k], layers[k + 1]
        h = h @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
        if k + 2 < len(layers):
            h = torch.relu(h)
    return h


def task_losses(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MSE of each task ``(...,)``: over its points of ``x``, ``y`` ``(..., M, 1)``."""
    return (forward(params, x) - y).pow(2).mean(dim=(-2, -1))


def _per_task(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``params`` broadcast to one row per task of ``x`` ``(tasks, M, 1)``: ``(tasks, NUM_PARAMS)``."""
    return params.expand(*x.shape[:-2], params.shape[-1])


def adapt(
    params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, inner_lr: float, first_order: bool = False
) -> torch.Tensor:
    """``steps`` SGD steps of each task's MSE on ``(x, y)`` ``(tasks, K, 1)`` from ``params``: ``(tasks, NUM_PARAMS)``.

    The gradients are ``torch.func.grad``'s, so this runs under ``torch.no_grad()`` and under
    ``torch.func.vmap`` (ES-MAML's evaluations). The tasks are independent rows of one tensor: the
    gradient of the *sum* of their losses is each task's own gradient in its row. With
    ``first_order=True`` the inner gradients are detached (FO-MAML): backprop through the result then
    gives the query-loss gradient at the adapted parameters.
    """
    phi = _per_task(params, x)
    grad = torch.func.grad(lambda p: task_losses(p, x, y).sum())
    for _ in range(steps):
        g = grad(phi)
        phi = phi - inner_lr * (g.detach() if first_order else g)
    return phi


def torchopt_adapt(
    params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, inner_lr: float, torchopt: ModuleType
) -> torch.Tensor:
    """:func:`adapt` as a differentiable TorchOpt loop: ``torchopt.sgd`` + ``apply_updates``, ``inplace=False``.

    The inner gradients come from ``torch.autograd.grad(..., create_graph=True)``, so the returned
    ``(tasks, NUM_PARAMS)`` tensor is differentiable in ``params`` through every inner step (MAML's
    second-order meta-gradient); the graph of all ``steps`` steps is kept until the backward pass.
    """
    phi = _per_task(params, x)
    inner = torchopt.sgd(lr=inner_lr)
    state = inner.init(phi)
    for _ in range(steps):
        (g,) = torch.autograd.grad(task_losses(phi, x, y).sum(), phi, create_graph=True)
        updates, state = inner.update(g, state, inplace=False)
        phi = torchopt.apply_updates(phi, updates, inplace=False)
    return phi


def es_meta_loss(
    inner_steps: int,
    inner_lr: float,
    num_samples: int,
    sigma: float,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
) -> MetaLoss:
    """ES-MAML's meta-loss ``f(params, xs, ys, xq, yq)``: adapt every task, return the mean query MSE.

    Decorated with ``zo_kernels.zero_order(Normal(), method="antithetic", num_samples, sigma,
    batch_size=batch_size or 2 * num_samples)``: ``f(...).backward()`` writes the ES estimate of the
    meta-gradient into ``params.grad``, from ``2 * num_samples`` runs of the whole inner loop over
    the batch of tasks (``batch_size`` of them per vmapped call), forward passes and ``torch.func.grad``
    only, no graph kept.
    """

    @zo_kernels.zero_order(
        Normal(),
        method="antithetic",
        num_samples=num_samples,
        sigma=sigma,
        batch_size=batch_size or 2 * num_samples,
        seed=seed,
    )
    def meta_loss(
        params: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> torch.Tensor:
        return task_losses(adapt(params, xs, ys, inner_steps, inner_lr), xq, yq).mean()

    return meta_loss


def maml_meta_loss(inner_steps: int, inner_lr: float, torchopt: ModuleType) -> MetaLoss:
    """MAML's meta-loss through :func:`torchopt_adapt`: ``.backward()`` backprops through the unrolled inner loop."""

    def meta_loss(
        params: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> torch.Tensor:
        return task_losses(torchopt_adapt(params, xs, ys, inner_steps, inner_lr, torchopt), xq, yq).mean()

    return meta_loss


def fomaml_meta_loss(inner_steps: int, inner_lr: float) -> MetaLoss:
    """First-order MAML's meta-loss: :func:`adapt` with the inner gradients detached."""

    def meta_loss(
        params: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> torch.Tensor:
        return task_losses(adapt(params, xs, ys, inner_steps, inner_lr, first_order=True), xq, yq).mean()

    return meta_loss


def imaml_meta_loss(inner_steps: int, inner_lr: float, lam: float, cg_steps: int, torchopt: ModuleType) -> MetaLoss:
    """iMAML's meta-loss (Rajeswaran et al. 2019) by TorchOpt's implicit differentiation.

    Each task's inner problem is proximally regularized, ``min_phi L_in(phi) + lam/2 |phi - theta|^2``;
    ``inner_steps`` steps of gradient descent from ``theta`` approximate its solution (under
    ``torchopt.diff.implicit.custom_root``, outside autograd: no graph of the loop is kept), and the
    meta-gradient comes from the optimality condition ``grad L_in(phi) + lam (phi - theta) = 0`` by
    the implicit function theorem, the linear system ``(H + lam I) u = grad L_out`` solved by
    ``torchopt.linear_solve.solve_cg(maxiter=cg_steps)`` with Hessian-vector products. It is the
    exact gradient of the regularized bi-level problem only where the inner solver has converged.
    """

    def optimality(phi: torch.Tensor, theta: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        # torch.func.grad, not autograd.grad: TorchOpt differentiates this function with functorch.vjp
        return torch.func.grad(lambda p: task_losses(p, xs, ys).sum())(phi) + lam * (phi - theta)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps))
    def solve(phi: torch.Tensor, theta: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        for _ in range(inner_steps):
            phi = phi - inner_lr * optimality(phi, theta, xs, ys)
        return phi

    def meta_loss(
        params: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> torch.Tensor:
        phi = solve(_per_task(params.detach(), xs).clone(), params, xs, ys)
        return task_losses(phi, xq, yq).mean()

    return meta_loss


def post_adaptation_mse(params: torch.Tensor, tasks: Tasks, steps: int, inner_lr: float) -> float:
    """Mean query MSE of ``tasks`` after adapting ``params`` on their support sets (no meta-gradient)."""
    with torch.no_grad():
        adapted = adapt(params.detach(), tasks.xs, tasks.ys, steps, inner_lr)
        return float(task_losses(adapted, tasks.xq, tasks.yq).mean())


# --------------------------------------------------------------------------------------------------
# Training side by side
# --------------------------------------------------------------------------------------------------


@dataclass
class Learner:
    """One meta-learner: its meta-loss, parameters, Adam, and what it measured."""

    name: str
    meta_loss: Optional[MetaLoss]  # None: cannot run here (``skipped`` says why)
    how: str
    params: torch.Tensor
    optimizer: Optional[torch.optim.Optimizer]
    skipped: str = ""
    seconds: float = 0.0  # wall time of its meta-steps (meta-gradient + Adam), evaluations excluded
    history: List[float] = field(default_factory=list)  # held-out post-adaptation MSE at each report

    def step(self, tasks: Tasks) -> float:
        """One meta-step on ``tasks``: the meta-gradient, then Adam; returns the meta-training loss."""
        assert self.meta_loss is not None and self.optimizer is not None
        tick = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_loss(self.params, *tasks.tensors())
        loss.backward()
        self.optimizer.step()
        self.seconds += time.perf_counter() - tick
        return float(loss.detach())


def make_learners(args: argparse.Namespace, theta0: torch.Tensor, torchopt: Optional[ModuleType]) -> List[Learner]:
    """ES-MAML, MAML (TorchOpt) and FO-MAML, each from a copy of ``theta0`` with its own Adam."""
    n, k, lr = args.num_samples, args.inner_steps, args.inner_lr
    specs: List[Tuple[str, Optional[MetaLoss], str, str]] = [
        (
            "ES-MAML (zo_kernels)",
            es_meta_loss(k, lr, n, args.sigma),
            f"zero_order(Normal(), antithetic, N={n}, sigma={args.sigma:g}, batch_size={2 * n}): "
            f"{2 * n} inner loops per meta-step, one vmapped call",
            "",
        ),
        (
            "MAML (TorchOpt)",
            maml_meta_loss(k, lr, torchopt) if torchopt is not None else None,
            "torchopt.sgd + apply_updates(inplace=False), create_graph=True: backprop through the unrolled loop",
            "" if torchopt is not None else TORCHOPT_MISSING,
        ),
        ("FO-MAML", fomaml_meta_loss(k, lr), "inner gradients detached: query gradient at the adapted parameters", ""),
    ]
    learners = []
    for name, meta_loss, how, skipped in specs:
        params = theta0.clone().requires_grad_()
        optimizer = torch.optim.Adam([params], lr=args.meta_lr)
        learners.append(Learner(name, meta_loss, how, params, optimizer if meta_loss else None, skipped))
    return learners


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="ES-MAML (zo_kernels) vs MAML (TorchOpt) vs FO-MAML on sinusoids.")
    parser.add_argument("--meta-steps", type=int, default=300, help="meta-steps of every learner")
    parser.add_argument("--inner-steps", type=int, default=INNER_STEPS, help="SGD steps of the inner loop (k)")
    parser.add_argument("--inner-lr", type=float, default=INNER_LR, help="inner SGD learning rate")
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="ES antithetic pairs N per meta-gradient")
    parser.add_argument("--sigma", type=float, default=SIGMA, help="ES perturbation scale")
    parser.add_argument("--meta-lr", type=float, default=META_LR, help="Adam learning rate of every learner")
    parser.add_argument("--meta-batch", type=int, default=META_BATCH, help="tasks per meta-step")
    parser.add_argument("--shots", type=int, default=SHOTS, help="support points per task (K)")
    parser.add_argument("--query", type=int, default=QUERY, help="query points per training task")
    parser.add_argument("--test-tasks", type=int, default=100, help="held-out tasks (100 query points each)")
    parser.add_argument("--eval-every", type=int, default=25, help="meta-steps between held-out evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="the smoke test's run: 60 meta-steps of 10 tasks, N=16")
    parser.add_argument("--out", type=Path, default=None, help="also write the log as markdown to this file")
    args = parser.parse_args(argv)
    if args.quick:  # new defaults: options given on the command line still win
        parser.set_defaults(meta_steps=60, meta_batch=10, num_samples=16, eval_every=20, test_tasks=50)
        args = parser.parse_args(argv)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train the three meta-learners side by side, print the held-out MSE as they go and a final table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu_start = cpu_seconds()
    torchopt = import_torchopt()
    torch.manual_seed(args.seed)  # ES-MAML's noise seeds come from torch's default generator
    theta0 = init_params(torch.Generator().manual_seed(args.seed))
    test = sample_tasks(args.test_tasks, args.shots, torch.Generator().manual_seed(args.seed + 10_000), query=100)
    stream = torch.Generator().manual_seed(args.seed + 1)  # one task stream: every learner sees each batch
    learners = make_learners(args, theta0, torchopt)
    active = [ln for ln in learners if ln.meta_loss is not None]
    k, lr = args.inner_steps, args.inner_lr
    log = Log()

    log(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | "
        f"{'torchopt ' + torchopt.__version__ if torchopt else TORCHOPT_MISSING} | python {platform.python_version()}"
        f" | {torch.get_num_threads()} threads"
    )
    log(
        f"sinusoid regression, MLP 1-40-40-1 ReLU ({NUM_PARAMS} parameters) | {args.meta_batch} tasks per meta-step, "
        f"K={args.shots} support + {args.query} query points | inner loop {k} SGD steps, lr {lr:g} | Adam meta-lr "
        f"{args.meta_lr:g} for every learner | {args.meta_steps} meta-steps, seed {args.seed}"
    )
    for ln in learners:
        log(f"  {ln.name}: {ln.skipped or ln.how}")
    zero = float(test.yq.pow(2).mean())
    initial = post_adaptation_mse(theta0, test, k, lr)
    log(
        f"held-out: {args.test_tasks} tasks, adapted on K={args.shots} points ({k} steps), MSE on 100 points each | "
        f"predicting 0: MSE {zero:.3f} | initial parameters: post-adaptation MSE {initial:.3f}"
    )
    for ln in active:
        ln.history.append(initial)

    def report(step: int) -> None:
        cells = []
        for ln in learners:
            if ln.meta_loss is None:
                cells.append(f"{ln.name} {ln.skipped}")
                continue
            if step > 0:
                ln.history.append(post_adaptation_mse(ln.params, test, k, lr))
            cells.append(f"{ln.name} {ln.history[-1]:.3f} ({ln.seconds:.1f} s)")
        log(f"meta-step {step:4d}  test MSE  " + "  |  ".join(cells))

    report(0)
    for step in range(1, args.meta_steps + 1):
        tasks = sample_tasks(args.meta_batch, args.shots, stream, query=args.query)
        for ln in active:
            try:
                loss = ln.step(tasks)
            except zo_kernels.NonFiniteLossError as exc:  # a perturbed inner loop diverged
                loss, why = math.nan, f" ({exc})"
            else:
                why = ""
            if not math.isfinite(loss):
                log(f"{ln.name}: the meta-training loss is not finite at meta-step {step}{why}")
                return 1
        if step % args.eval_every == 0 or step == args.meta_steps:
            report(step)

    es = learners[0]
    log(
        f"ES-MAML post-adaptation MSE: {es.history[0]:.3f} -> {es.history[-1]:.3f} in {args.meta_steps} meta-steps, "
        f"{es.seconds:.1f} s"
    )
    for other in active[1:]:
        log(
            f"at {args.meta_steps} meta-steps: ES-MAML's final test MSE is {es.history[-1] / other.history[-1]:.2f}x "
            f"{other.name}'s ({es.history[-1]:.3f} vs {other.history[-1]:.3f}); its meta-steps took "
            f"{es.seconds / other.seconds:.1f}x the time"
        )
    log.table = final_table(learners, args.meta_steps, zero)
    print("\n" + "\n".join(log.table), flush=True)
    if args.out is not None:
        write_markdown(argv, log, other_cpu_share(cpu_start, cpu_seconds()), args.out)
    return 0


class Log:
    """The printed lines, kept for the markdown file, and the final table."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.table: List[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)


def final_table(learners: Sequence[Learner], meta_steps: int, zero: float) -> List[str]:
    """Initial, final and best held-out MSE, wall time and time per meta-step of each learner (tabulate)."""
    from tabulate import tabulate

    rows = []
    for ln in learners:
        if ln.meta_loss is None or not ln.history:
            rows.append([ln.name, ln.skipped, "", "", "", ""])
            continue
        h = ln.history
        per_step = f"{ln.seconds / meta_steps * 1e3:.1f} ms"
        rows.append([ln.name, f"{h[0]:.3f}", f"{h[-1]:.3f}", f"{min(h):.3f}", f"{ln.seconds:.1f} s", per_step])
    headers = ["learner", "initial test MSE", "final test MSE", "best test MSE", "wall time", "per meta-step"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True).splitlines()
    return table + ["", f"Predicting 0 everywhere: test MSE {zero:.3f}."]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_seconds() -> Optional[Tuple[float, float, float]]:
    """(busy, total) CPU seconds of all cores since boot (/proc/stat) and this process's own; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle, tick, own = fields[3] + (fields[4] if len(fields) > 4 else 0), os.sysconf("SC_CLK_TCK"), os.times()
    return (sum(fields) - idle) / tick, sum(fields) / tick, own.user + own.system


def other_cpu_share(start: Optional[Tuple[float, float, float]], end: Optional[Tuple[float, float, float]]) -> str:
    """The share of all cores that *other* processes used between two :func:`cpu_seconds` samples, in words."""
    if start is None or end is None:
        return "unknown"
    (b0, t0, o0), (b1, t1, o1) = start, end
    share = min(max(((b1 - b0) - (o1 - o0)) / max(t1 - t0, 1e-9), 0.0), 1.0)
    return f"{share:.0%} of all cores" + (" (a busy machine: the wall times are inflated)" if share > 0.1 else "")


def write_markdown(argv: Optional[Sequence[str]], log: Log, others: str, out: Path) -> None:
    """The run's log as markdown: date, command, machine, the printed log in a code block, the final table."""
    command = " ".join(["python python/es_maml.py", *(sys.argv[1:] if argv is None else argv)])
    text = [
        "# ES-MAML vs MAML vs FO-MAML on few-shot sinusoid regression (`python/es_maml.py`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{command}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; {torch.get_num_threads()} torch threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')})",
        f"- CPU use by other processes during the run: {others}; the MSEs do not depend on it",
        "",
        "```",
        *log.lines,
        "```",
        "",
        *log.table,
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
