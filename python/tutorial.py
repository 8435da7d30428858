"""Zero-order gradients in two APIs: a linear regression trained with ES estimates instead of backprop.

The problem is the one of TorchOpt's zero-order tutorial: a ``torch.nn.Linear(dim, 1)`` fitted by
mean-squared error to random inputs and random targets, trained with Adam. The gradient Adam
receives is not the exact one but a zero-order (evolution-strategy) estimate of the gradient of the
Gaussian-smoothed loss ``E_z[f(theta + sigma z)]``, built from ``num_samples`` evaluations of the loss
at perturbed parameters. It is trained with each of the three estimators:

- ``'naive'``:      ``1/sigma * mean_i f(theta + sigma z_i) z_i``
- ``'forward'``:    ``1/sigma * mean_i (f(theta + sigma z_i) - f(theta)) z_i``
- ``'antithetic'``: ``1/(2 sigma) * mean_i (f(theta + sigma z_i) - f(theta - sigma z_i)) z_i``

and through each of the two APIs:

- functional: ``@zo_kernels.zero_order(distributions.Normal(), method=..., num_samples=..., sigma=...)``
  on a function ``loss(params, x, y)`` of a dict of tensors (``torch.func.functional_call`` runs the
  ``nn.Linear`` with them). ``loss.backward()`` writes the estimate into ``params[k].grad``.
- module: a ``zo_kernels.ZeroOrderGradientModule`` subclass declared with the class keywords
  ``method=``, ``num_samples=``, ``sigma=``; its ``forward(x, y)`` returns the loss and its
  ``sample(shape)`` draws the noise (the module is its own distribution, as in TorchOpt).

First the script measures each estimator's error against the exact (autograd) gradient at the
initial weights. Then every run starts from those weights and sees the same data, so the curves
differ only by the estimator. 'forward' and 'antithetic' follow the exact-gradient curve (printed
last for comparison). 'naive' subtracts no baseline: its estimate carries a noise term of size about
``f(theta) / sigma * sqrt(n / N)`` for n parameters (the script measures about 30 times the
gradient's norm), so at this ``sigma`` Adam just random-walks. It needs a larger ``sigma`` and far
more samples (``--sigma 0.3 --num-samples 2000`` brings its error to about 0.6 and its final loss
near the others', in about a minute): the reason the baselined estimators exist.

Run::

    python python/tutorial.py                      # defaults: 100 steps per run, about 6 s on 2 CPU cores
    python python/tutorial.py --steps 20 --print-every 5
    python python/tutorial.py --device cuda --num-samples 1000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import zo_kernels
from zo_kernels import distributions

METHODS = ("naive", "forward", "antithetic")


def make_data(batch: int, dim: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random regression data: inputs ``(batch, dim)`` and targets ``(batch, 1)``, both standard normal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    y = torch.randn(batch, 1, generator=g)
    return x.to(device), y.to(device)


def fresh_linear(dim: int, device: torch.device, seed: int) -> nn.Linear:
    """``nn.Linear(dim, 1)`` with the same initial weights for every run (``seed`` fixes them).

    Torch's default generator is left as it was: it supplies the noise of the estimates.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(dim, 1).to(device)


def train_functional(
    method: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> List[float]:
    """Train with the functional API (``zo_kernels.zero_order`` on a function of a dict of params).

    Returns the loss ``f(theta)`` before each step.
    """
    net = fresh_linear(x.shape[1], device, args.seed)
    params: Dict[str, torch.Tensor] = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

    @zo_kernels.zero_order(
        distributions.Normal(), method=method, argnums=0, num_samples=args.num_samples, sigma=args.sigma
    )
    def loss_fn(p: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(net, p, (x,)), y)

    optimizer = torch.optim.Adam(params.values(), lr=args.lr)
    curve = []
    for _ in range(args.steps):
        loss = loss_fn(params, x, y)  # f(theta), with a grad_fn whose backward is the ES estimate
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def estimate_error(
    method: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> float:
    """Mean relative error ``|g_zo - g| / |g|`` of ``args.repeats`` estimates at the initial weights.

    ``g`` is the exact (autograd) gradient of the loss; Gaussian smoothing does not move the gradient
    of a quadratic, so the whole difference is the estimator's noise.
    """
    net = fresh_linear(x.shape[1], device, args.seed)
    exact = torch.autograd.grad(F.mse_loss(net(x), y), list(net.parameters()))
    exact_flat = torch.cat([g.reshape(-1) for g in exact])
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    loss_fn = zo_kernels.zero_order(
        distributions.Normal(), method=method, num_samples=args.num_samples, sigma=args.sigma
    )(lambda p, x, y: F.mse_loss(functional_call(net, p, (x,)), y))
    errors = []
    for _ in range(args.repeats):
        zo = torch.autograd.grad(loss_fn(params, x, y), list(params.values()))
        zo_flat = torch.cat([g.reshape(-1) for g in zo])
        errors.append(float((zo_flat - exact_flat).norm() / exact_flat.norm()))
    return sum(errors) / len(errors)


def module_class(method: str, num_samples: int, sigma: float) -> type:
    """A ``ZeroOrderGradientModule`` subclass for one estimator: class keywords fix it at class creation."""

    class LinearRegression(zo_kernels.ZeroOrderGradientModule, method=method, num_samples=num_samples, sigma=sigma):
        """``nn.Linear(dim, 1)`` whose ``forward`` returns the MSE loss; ``.backward()`` gives ES gradients."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.fc = nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """The scalar loss; called once unperturbed and once per perturbation."""
            return F.mse_loss(self.fc(x), y)

        def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
            """Standard normal noise on the parameters' device, drawn from torch's default generator."""
            return torch.randn(sample_shape, device=self.fc.weight.device)

    return LinearRegression


def train_module(
    method: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> List[float]:
    """Train with the module API (a ``ZeroOrderGradientModule`` subclass). Returns the loss before each step."""
    model = module_class(method, args.num_samples, args.sigma)(x.shape[1]).to(device)
    model.fc.load_state_dict(fresh_linear(x.shape[1], device, args.seed).state_dict())  # same start as the others
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve = []
    for _ in range(args.steps):
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def train_autograd(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> List[float]:
    """The same training with exact (first-order) gradients, for comparison."""
    net = fresh_linear(x.shape[1], device, args.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    curve = []
    for _ in range(args.steps):
        loss = F.mse_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def print_curve(label: str, curve: Sequence[float], every: int, seconds: float) -> None:
    """Print ``label step k loss v`` every ``every`` steps and for the last step, then a summary."""
    for step, value in enumerate(curve):
        if step % every == 0 or step == len(curve) - 1:
            print(f"[{label}] step {step:4d}  loss {value:.6f}")
    print(f"[{label}] loss {curve[0]:.6f} -> {curve[-1]:.6f} in {len(curve)} steps, {seconds:.2f} s", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Linear regression with zero-order gradients: functional and module APIs."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--dim", type=int, default=16, help="input dimension of nn.Linear(dim, 1)")
    parser.add_argument("--batch", type=int, default=64, help="number of (x, y) pairs")
    parser.add_argument("--num-samples", type=int, default=100, help="perturbations per estimate")
    parser.add_argument("--sigma", type=float, default=0.01, help="smoothing scale")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="estimates averaged for the error report")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--print-every", type=int, default=0, help="report every k steps (default: steps / 10)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train every (API, method) pair from the same start and print the loss curves."""
    args = parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    device = torch.device(args.device)
    x, y = make_data(args.batch, args.dim, device, args.seed + 1)
    every = args.print_every or max(1, args.steps // 10)
    backend = zo_kernels.backends.select(device, torch.float32).name
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | backend {backend} | "
        f"nn.Linear({args.dim}, 1), {args.batch} random (x, y) pairs, MSE | Adam lr={args.lr:g} | "
        f"N={args.num_samples}, sigma={args.sigma:g}"
    )

    torch.manual_seed(args.seed + 2)
    for method in args.methods:
        error = estimate_error(method, args, x, y, device)
        print(
            f"[estimate] {method}: relative error {error:.3f} (|g_zo - g| / |g| at the initial weights, "
            f"mean of {args.repeats} estimates of N={args.num_samples})"
        )

    finals = {}
    for api, train in (("functional", train_functional), ("module", train_module)):
        for method in args.methods:
            torch.manual_seed(args.seed + 2)  # the noise of every estimate: reproducible run to run
            tick = time.perf_counter()
            curve = train(method, args, x, y, device)
            print_curve(f"{api}/{method}", curve, every, time.perf_counter() - tick)
            finals[f"{api}/{method}"] = curve[-1]
    tick = time.perf_counter()
    exact = train_autograd(args, x, y, device)
    print_curve("autograd", exact, every, time.perf_counter() - tick)

    if not all(math.isfinite(v) for v in finals.values()):
        print("a loss is not finite: training diverged (lower --lr)")
        return 1
    summary = ", ".join(f"{k} {v:.4f}" for k, v in finals.items())
    print(f"final losses: {summary}; exact gradients {exact[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
