"""GPU benchmark of zo_kernels: fused reduce kernels and full gradient steps, one table per section.

Run on a machine with a CUDA GPU (``bench/gpu_all.sh`` builds, tests and runs this)::

    python bench/gpu_kernels.py [--quick] [--out bench/results/gpu.md]

Kernel times are medians of ``triton.testing.do_bench``; every ratio compares numbers measured in
this run on this GPU. Sections:

1. ``reduce`` (grad += sum_i w_i z_i over N samples of n elements) for the Triton and CUDA backends,
   float32 and bfloat16 parameters, against a PyTorch baseline (chunked ``torch.randn`` + matmul
   accumulate), a Philox bound (N*n normals at the measured rate of a generation-only Philox kernel)
   and the write bound of the gradient (read + write of n elements at the measured copy bandwidth).
2. A full gradient step (forward + ES backward) for each method, N = 100 and 1000, on the CPU
   benchmark's MLP (1024-256-10) and a 4-layer MLP with about 4M parameters, against TorchOpt
   0.7.3 when it is installed, with the peak GPU memory of each step.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels import backends, distributions

SIGMA = 0.01
METHODS = ("naive", "forward", "antithetic")


def do_bench(fn: Callable[[], None]) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``, which flushes the L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def gpu_backends() -> List[str]:
    """The GPU backends built and usable here, fastest first."""
    status = backends.available()
    return [name for name in ("cuda", "triton") if status.get(name) == "available"]


def torch_baseline(grad: torch.Tensor, weights: torch.Tensor, chunk: int) -> None:
    """What a user writes without fused kernels: materialize a chunk of noise, then a matmul."""
    n = grad.numel()
    acc = torch.zeros(n, dtype=torch.float32, device=grad.device)
    for lo in range(0, weights.numel(), chunk):
        w = weights[lo : lo + chunk]
        z = torch.randn(w.numel(), n, device=grad.device, dtype=torch.float32)
        acc.addmv_(z.t(), w)
    grad.add_(acc.to(grad.dtype))


def philox_rate(device: torch.device) -> float:
    """Normals per second of noise generation alone (the fused ``sample`` of the best backend)."""
    backend = backends.get(gpu_backends()[0])
    n = 1 << 26
    ms = do_bench(lambda: backend.sample("normal", 1, 0, 0, n, device))
    return n / (ms * 1e-3)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3)


def reduce_case(num: int, n: int, dtype: torch.dtype, device: torch.device, rate: float, bandwidth: float) -> List[str]:
    """Rows of section 1 for one (N, n, dtype): every GPU backend against the baseline and bounds."""
    grad = torch.zeros(n, dtype=dtype, device=device)
    weights = torch.randn(num, dtype=torch.float32, device=device)
    ids = torch.arange(num, device=device)
    chunk = max(1, min(num, (1 << 30) // (4 * n)))  # at most 1 GiB of materialized noise per chunk
    base_ms = do_bench(lambda: torch_baseline(grad, weights, chunk)) if num * n <= 1024 * 10**7 else None
    bound_ms = num * n / rate * 1e3
    write_ms = 2 * n * grad.element_size() / bandwidth * 1e3
    rows = []
    for name in gpu_backends():
        backend = backends.get(name)
        ms = do_bench(lambda b=backend: b.reduce(grad, weights, ids, "normal", 7, 0))
        speedup = f"{base_ms / ms:.1f}x" if base_ms else "(skipped: N*n > 1e10)"
        target = "≥ 3x vs PyTorch" if (num, n) == (1024, 10**7) else ""
        rows.append(
            f"| {num} | {n:.0e} | {str(dtype)[6:]} | {name} | {ms:.2f} ms | {num * n / ms / 1e6:.2f} G/s | "
            f"{speedup} | {bound_ms:.2f} ms | {write_ms:.3f} ms | {target} |"
        )
    return rows


def reduce_rows(quick: bool, device: torch.device) -> List[str]:
    """Section 1 table rows."""
    rate, bandwidth = philox_rate(device), copy_bandwidth(device)
    rows = [
        f"Measured: noise generation {rate / 1e9:.1f} G normals/s; copy bandwidth {bandwidth / 1e9:.0f} GB/s.",
        "",
        "| N | n | dtype | backend | time | normals/s | vs PyTorch randn+matmul | Philox bound | write bound "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = [(256, 10**6), (1024, 10**7)] if quick else [(k, n) for k in (256, 1024) for n in (10**6, 10**7, 10**8)]
    for num, n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            rows += reduce_case(num, n, dtype, device, rate, bandwidth)
            torch.cuda.empty_cache()
    return rows


def mlp(sizes: Sequence[int], device: torch.device) -> Tuple[Tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]:
    """Leaf parameters of a tanh MLP with the given layer sizes, and its MSE loss."""
    params: List[torch.Tensor] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layer = torch.nn.Linear(fan_in, fan_out, device=device)
        params += [layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()]

    def loss(p: Tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for k in range(0, len(p), 2):
            h = F.linear(h, p[k], p[k + 1])
            if k + 2 < len(p):
                h = torch.tanh(h)
        return F.mse_loss(h, y)

    return tuple(params), loss


def step_stats(fn: Callable[..., torch.Tensor], params: Tuple[torch.Tensor, ...], x, y) -> Tuple[float, int]:
    """(median ms, peak bytes) of one forward + backward that fills ``.grad``."""

    def run() -> None:
        for p in params:
            p.grad = None
        fn(params, x, y).backward()

    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(run), peak


def step_rows(quick: bool, device: torch.device) -> List[str]:
    """Section 2 table rows."""
    try:
        import torchopt
    except ImportError:
        torchopt = None
    rows = [
        "| model | params | N | method | ours | TorchOpt 0.7.3 | speed-up | peak mem ours | peak mem TorchOpt "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    models: Dict[str, Tuple[Sequence[int], int]] = {"MLP 1024-256-10": ((1024, 256, 10), 256)}
    if not quick:
        models["4-layer MLP 4.2M"] = ((1024, 1792, 1024, 512, 10), 256)
    for name, (sizes, batch) in models.items():
        params, loss = mlp(sizes, device)
        x = torch.randn(batch, sizes[0], device=device)
        y = torch.randn(batch, sizes[-1], device=device)
        numel = sum(p.numel() for p in params)
        for num in (100,) if quick else (100, 1000):
            for method in METHODS:
                ours = zo_kernels.zero_order(distributions.Normal(), method=method, num_samples=num, sigma=SIGMA)(loss)
                t_ours, m_ours = step_stats(ours, params, x, y)
                if torchopt is not None:
                    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
                    normal = torch.distributions.Normal(zero, one)
                    theirs = torchopt.diff.zero_order(normal, method=method, num_samples=num, sigma=SIGMA)(loss)
                    t_opt, m_opt = step_stats(theirs, params, x, y)
                    opt_cells = f"{t_opt:.1f} ms | {t_opt / t_ours:.1f}x"
                    mem_opt = f"{m_opt / 2**20:.1f} MiB"
                else:
                    opt_cells, mem_opt = "not installed | –", "–"
                rows.append(
                    f"| {name} | {numel:,} | {num} | {method} | {t_ours:.1f} ms | {opt_cells} | "
                    f"{m_ours / 2**20:.1f} MiB | {mem_opt} | ≥ 10x |"
                )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run every section and print (and optionally write) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--out", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA GPU")
    if not gpu_backends():
        sys.exit(f"no GPU backend is available: {backends.available()}")
    device = torch.device("cuda")
    import triton

    header = [
        "# zo_kernels GPU benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {torch.cuda.get_device_name(device)}",
        f"- versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"zo_kernels {zo_kernels.__version__}, python {sys.version.split()[0]}",
        f"- backends: {', '.join(gpu_backends())}; times are medians of triton.testing.do_bench",
        "",
        "## 1. reduce: grad += sum_i w_i z_i",
        "",
    ]
    report = header + reduce_rows(args.quick, device) + ["", "## 2. gradient step (Normal noise)", ""]
    report += step_rows(args.quick, device)
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
