"""Quick-start demo: fit a small regression model with zero-order gradients on this machine's device.

Run with ``make demo`` (or ``python python/demo.py --device cpu --steps 200``).
"""

import argparse
import time

import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels import distributions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--method", default="antithetic", choices=["naive", "forward", "antithetic"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    # A 2-layer MLP (32 -> 16 -> 1, 545 parameters) fitted to a noisy teacher network.
    x = torch.randn(256, 32, device=device)
    teacher = torch.randn(32, 1, device=device) / 32**0.5
    y = torch.tanh(x @ teacher) + 0.01 * torch.randn(256, 1, device=device)
    params = {
        "w1": (torch.randn(32, 16, device=device) / 32**0.5).requires_grad_(),
        "b1": torch.zeros(16, device=device, requires_grad=True),
        "w2": (torch.randn(16, 1, device=device) / 16**0.5).requires_grad_(),
        "b2": torch.zeros(1, device=device, requires_grad=True),
    }

    @zo_kernels.zero_order(distributions.Normal(), method=args.method, num_samples=args.num_samples, sigma=0.01)
    def loss_fn(p, x, y):
        hidden = torch.tanh(x @ p["w1"] + p["b1"])
        return F.mse_loss(hidden @ p["w2"] + p["b2"], y)

    opt = torch.optim.Adam(params.values(), lr=0.02)
    n_params = sum(p.numel() for p in params.values())
    backend = zo_kernels.backends.select(device, torch.float32)
    print(
        f"zo_kernels {zo_kernels.__version__} | device {device} | backend {backend.name} | "
        f"{n_params} parameters | method {args.method} | N={args.num_samples}"
    )
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = loss_fn(params, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if step % 15 == 0:
            print(f"step {step:4d}  loss {loss.item():.5f}")
    times.sort()
    print(
        f"time per step: median {1e3 * times[len(times) // 2]:.2f} ms "
        f"({args.num_samples} samples, {2 if args.method == 'antithetic' else 1} evaluations each)"
    )


if __name__ == "__main__":
    main()
