"""MeZO on a Hugging Face causal LM: forward passes only, the weights perturbed in place, no optimizer state.

MeZO (Malladi et al., 2023) fine-tunes with two forward passes per step and the memory of inference.
With zo_kernels the whole recipe is two calls::

    sg = zo_kernels.estimate(loss_fn, params, ids, method="antithetic", num_samples=1, sigma=1e-3, inplace=True)
    ZOSGD(params, lr).step(sg)      # theta -= lr * sum_i w_i z(seed, i), z regenerated from the seed

``inplace=True`` moves the model's own weights to ``theta + sigma z``, then ``theta - sigma z``, and back
(no second copy of the weights); ``sg`` holds the seed and N weights, not a gradient; ``ZOSGD`` without
momentum keeps no state. ``loss_fn`` calls the model through ``torch.func.functional_call`` with the
parameters it is given, and HF computes the shifted next-token loss from ``labels=input_ids``.

The model is built from a config, randomly initialised, nothing downloaded: ``--model gpt2``
(``GPT2LMHeadModel``) or ``--model llama`` (``LlamaForCausalLM``), 2 layers of width 64, a byte
vocabulary (256). The model, the text (pangrams read as bytes) and the memory probe are those of
``python/lowrank_finetune.py``, which trains the same models with a batched low-rank population
instead; ``python/mezo_finetune.py`` is MeZO on a plain ``torch.nn`` transformer with a learnable
synthetic task.

Memory is the process's peak resident set (``resource.getrusage``; tracemalloc does not see torch's
CPU allocations), printed next to the weights' own size: most of the resident set is the torch and
transformers libraries, so the script also prints its growth from before the first step.

Run::

    python python/mezo_hf.py                           # GPT-2, 300 steps, a few seconds on 2 CPU cores
    python python/mezo_hf.py --model llama --steps 50 --print-every 10
    python python/mezo_hf.py --num-samples 4 --lr 1e-2
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from typing import Dict, Sequence

import torch

# lowrank_finetune is the sibling example (python/ is on sys.path when this file runs as a script)
from lowrank_finetune import TEXT, build_model, peak_memory, report_eval, run_steps, windows
from torch.func import functional_call

import zo_kernels
from zo_kernels.optim import ZOSGD


def rss_mib() -> float:
    """The process's peak resident set so far, in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="MeZO (in place, ZOSGD) on a tiny HF causal LM with zo_kernels.")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=1, help="antithetic pairs N per step (2N + 1 forwards)")
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=8, help="text windows per step")
    parser.add_argument("--seq-len", type=int, default=32, help="bytes per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=0, help="report every k steps (default: steps / 10)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Fine-tune with MeZO and report loss, speed and memory."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the model's initialisation and every estimate's noise seed
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    # eager attention as in lowrank_finetune (no vmap here, but the same model); eval(): no dropout, so the
    # two perturbed losses of a pair differ by the weights only
    model = build_model(args.model, "eager").to(device).eval()
    model.requires_grad_(False)  # forward passes only: no autograd graph, no activations kept
    # named_parameters drops GPT-2's tied lm_head.weight; functional_call ties it back to wte
    params: Dict[str, torch.Tensor] = dict(model.named_parameters())
    param_mib = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    data = torch.tensor(list(TEXT * 8), dtype=torch.long, device=device)

    def loss_fn(p: Dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, kwargs=dict(input_ids=ids, labels=ids)).loss

    optimizer = ZOSGD(params, lr=args.lr)  # MeZO: plain SGD, no momentum, no state
    held_out = windows(data, 64, args.seq_len, torch.Generator().manual_seed(args.seed + 10_000))
    with torch.no_grad():
        start_eval = float(loss_fn(params, held_out))
    rss_before = rss_mib()
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | "
        f"{type(model).__name__}, {sum(p.numel() for p in params.values()):,} parameters ({param_mib:.2f} MiB) | "
        f"MeZO: antithetic N={args.num_samples}, sigma={args.sigma:g}, inplace=True, ZOSGD lr={args.lr:g} | "
        f"{args.batch} x {args.seq_len} bytes per step"
    )
    print(
        f"step {0:5d}  eval loss {start_eval:.4f} (log(256) = {math.log(256):.3f})  "
        f"peak memory {peak_memory(device)} before training",
        flush=True,
    )

    def step(ids: torch.Tensor) -> float:
        sg = zo_kernels.estimate(
            loss_fn, params, ids, method="antithetic", num_samples=args.num_samples, sigma=args.sigma, inplace=True
        )
        optimizer.step(sg)
        return sg.loss

    every = args.print_every or max(1, args.steps // 10)
    elapsed = run_steps(step, lambda: windows(data, args.batch, args.seq_len, data_gen), args.steps, every, device)
    if not report_eval(loss_fn, params, held_out, start_eval, args, elapsed, "lower --lr"):
        return 1
    if device.type == "cpu":
        print(
            f"memory: peak RSS {rss_mib():.1f} MiB, {rss_mib() - rss_before:+.1f} MiB during training; "
            f"the weights are {param_mib:.2f} MiB (a scratch copy, inplace=False, would add as much again)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
