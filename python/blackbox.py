"""Optimizing a black box: the error rate of a classifier with integer weights, computed in NumPy.

The objective is the fraction of misclassified points of a linear classifier whose weights are
first rounded to integers in ``[-7, 7]`` (4-bit quantization) and then applied in NumPy::

    q = clip(round(theta), -7, 7)                    # rounding: zero derivative almost everywhere
    error = mean(sign(X @ q) != y)                   # 0-1 loss, evaluated by NumPy

Autograd cannot help with either half. Through NumPy there is no graph at all: the returned tensor
does not require grad and ``backward()`` raises. Written in torch instead (``torch.round``,
``torch.sign``), the graph exists but every derivative in it is zero, so the gradient is exactly 0.
The script shows both, then minimises the same NumPy objective with ``zo_kernels.zero_order``: the
antithetic ES estimate of the gradient of the smoothed objective ``E_z[error(theta + sigma z)]``,
with ``sigma`` about one quantization step, is informative wherever the plain objective is flat.
Adam takes the steps, with a cosine-decaying learning rate. The data are points labelled by a
hidden integer-weight "teacher" with a few labels flipped, so the best reachable error is about the
flip rate (printed).

Run::

    python python/blackbox.py                      # defaults: 100 iterations, a few seconds on 2 CPU cores
    python python/blackbox.py --iterations 10
    python python/blackbox.py --dim 32 --num-samples 64 --iterations 200
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Sequence, Tuple

import numpy as np
import torch

import zo_kernels
from zo_kernels import distributions

LEVELS = 7  # integer weights in [-LEVELS, LEVELS]


def make_data(points: int, dim: int, flip: float, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, teacher)``: Gaussian points, labels ``sign(X @ teacher)`` with a fraction ``flip`` flipped."""
    rng = np.random.default_rng(seed)
    teacher = rng.integers(-LEVELS, LEVELS + 1, size=dim)
    X = rng.standard_normal((points, dim))
    y = np.sign(X @ teacher)
    y[y == 0] = 1
    y[rng.random(points) < flip] *= -1
    return X, y, teacher


def error_rate_numpy(theta: torch.Tensor, X: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """The black box: 0-1 error of the classifier with weights ``clip(round(theta))``, computed in NumPy.

    The result is a 0-dim tensor on ``theta``'s device with no autograd history.
    """
    q = np.clip(np.rint(theta.detach().cpu().double().numpy()), -LEVELS, LEVELS)
    predictions = np.where(X @ q >= 0, 1.0, -1.0)
    return torch.tensor(float(np.mean(predictions != y)), dtype=theta.dtype, device=theta.device)


def error_rate_torch(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same objective in differentiable-looking torch: ``torch.round`` and ``torch.sign`` keep a graph."""
    q = torch.clamp(torch.round(theta), -LEVELS, LEVELS)
    return (1 - torch.sign(X @ q) * y).mean() / 2  # (1 - y * sign) / 2 is 1 for a mistake, 0 for a hit


def show_autograd_fails(theta0: torch.Tensor, X: np.ndarray, y: np.ndarray) -> None:
    """Print what backprop gives for both versions of the objective: nothing, then zeros."""
    theta = theta0.clone().requires_grad_()
    try:
        error_rate_numpy(theta, X, y).backward()
        print(f"autograd through NumPy: gradient {theta.grad}")
    except RuntimeError as exc:
        print(f"autograd through NumPy: no gradient ({str(exc).splitlines()[0]})")
    Xt = torch.as_tensor(X, dtype=theta.dtype, device=theta.device)
    yt = torch.as_tensor(y, dtype=theta.dtype, device=theta.device)
    error_rate_torch(theta, Xt, yt).backward()
    grad_max = float(theta.grad.abs().max())
    print(f"autograd through the torch version (round, sign): gradient max |g| = {grad_max:g} (all zero)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Zero-order optimization of a non-differentiable NumPy objective.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--dim", type=int, default=10, help="number of integer weights")
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--flip", type=float, default=0.05, help="fraction of labels flipped")
    parser.add_argument("--num-samples", type=int, default=32, help="antithetic pairs per estimate")
    parser.add_argument("--sigma", type=float, default=1.0, help="perturbation scale (the quantization step is 1)")
    parser.add_argument("--lr", type=float, default=0.3, help="initial Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Show that autograd gives nothing, then drive the NumPy objective down with ES gradients."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    X, y, teacher = make_data(args.points, args.dim, args.flip, args.seed + 1)
    theta = (2.0 * torch.randn(args.dim, dtype=torch.float64)).to(device)
    teacher_error = float(error_rate_numpy(torch.as_tensor(teacher, dtype=torch.float64), X, y))
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | numpy {np.__version__} | device {device} | "
        f"{args.dim} integer weights in [-{LEVELS}, {LEVELS}], {args.points} points, {args.flip:.0%} labels flipped "
        f"(the teacher's error: {teacher_error:.4f}) | antithetic N={args.num_samples}, sigma={args.sigma:g}, "
        f"Adam lr={args.lr:g}"
    )
    show_autograd_fails(theta, X, y)

    objective = zo_kernels.zero_order(
        distributions.Normal(), method="antithetic", num_samples=args.num_samples, sigma=args.sigma
    )(error_rate_numpy)
    theta.requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.iterations)  # settle at the end
    values = []
    tick = time.perf_counter()
    for it in range(args.iterations):
        value = objective(theta, X, y)  # error(theta) by NumPy; backward() runs the 2N perturbed evaluations
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
        values.append(float(value.detach()))
        print(f"iteration {it:3d}  objective {values[-1]:.4f}", flush=True)
    with torch.no_grad():
        final = float(error_rate_numpy(theta, X, y))
    seconds = time.perf_counter() - tick
    if not all(math.isfinite(v) for v in values + [final]):
        print("the objective is not finite")
        return 1
    weights = np.clip(np.rint(theta.detach().cpu().numpy()), -LEVELS, LEVELS).astype(int)
    print(
        f"objective {values[0]:.4f} -> {final:.4f} in {args.iterations} iterations, {seconds:.1f} s "
        f"(teacher: {teacher_error:.4f})"
    )
    print(f"quantized weights: {weights.tolist()}  teacher: {teacher.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
