"""MeZO on a Hugging Face causal LM: forward passes only, at the memory of inference, no optimizer state.

MeZO (Malladi et al., 2023) fine-tunes with two forward passes per step and the memory of inference.
With zo_kernels the whole recipe is two calls::

    sg = zo_kernels.estimate(loss_fn, params, ids, method="antithetic", num_samples=1, sigma=1e-3, perturb="on_use")
    ZOSGD(params, lr).step(sg)      # theta -= lr * sum_i w_i z(seed, i), z regenerated from the seed

``--perturb inplace`` (the default in float32) moves the model's own weights to ``theta + sigma z``, then
``theta - sigma z``, and back (no second copy of the weights; each restore rounds, so float32 only);
``--perturb on_use`` never writes them: every operation that reads a weight is served its perturbed values
(exact in every dtype, the default in bfloat16); ``--perturb copy`` perturbs a scratch copy. ``sg`` holds the
seed and N weights, not a gradient; ``ZOSGD`` without momentum keeps no state. ``loss_fn`` calls the model
through ``torch.func.functional_call`` with the parameters it is given, and HF computes the shifted
next-token loss from ``labels=input_ids``.

``--compare-drift`` runs MeZO in bfloat16 twice side by side, each beside a float64 replay of its own
updates: zo_kernels with ``perturb='on_use'``, and a loop written from MeZO's Algorithm 1 (perturb the
bfloat16 weights in place by ``+eps z``, ``-2 eps z``, ``+eps z``, then ``theta -= lr g z``). After the steps
it prints each run's distance from its replay, relative to how far the replay moved: ``on_use``'s is the
rounding of the updates into bfloat16 only; the in-place loop adds every perturb/restore's rounding, the
drift of MeZO issue #42.

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
    python python/mezo_hf.py --model llama --dtype bfloat16 --perturb on_use
    python python/mezo_hf.py --model llama --compare-drift --steps 1000   # about a minute
    python python/mezo_hf.py --journal run.zoj --steps 300 [--resume]     # resumable: a seed journal per step
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from typing import Callable, Dict, Sequence, Tuple

# lowrank_finetune is the sibling example (python/ is on sys.path when this file runs as a script)
import resume  # the sibling module: --journal / --resume
import torch
from lowrank_finetune import TEXT, build_model, peak_memory, report_eval, run_steps, windows
from torch.func import functional_call

import zo_kernels
from zo_kernels.distributions import draw_seed
from zo_kernels.journal import fingerprint
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
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights' dtype")
    parser.add_argument(
        "--perturb",
        choices=("copy", "inplace", "on_use"),
        default=None,
        help="how the evaluations see theta + sigma z (default: inplace in float32, on_use in bfloat16)",
    )
    parser.add_argument(
        "--compare-drift",
        action="store_true",
        help="bfloat16: on_use against a MeZO-style in-place loop, each against a float64 replay of its updates",
    )
    resume.add_options(parser)
    args = resume.check_options(parser, parser.parse_args(argv))
    if args.perturb is None:
        args.perturb = "inplace" if args.dtype == "float32" and not args.journal else "on_use"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Fine-tune with MeZO and report loss, speed and memory."""
    args = parse_args(argv)
    if args.compare_drift:
        return compare_drift(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the model's initialisation and every estimate's noise seed
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    # eager attention as in lowrank_finetune (no vmap here, but the same model); eval(): no dropout, so the
    # two perturbed losses of a pair differ by the weights only
    model = build_model(args.model, "eager").to(device=device, dtype=getattr(torch, args.dtype)).eval()
    model.requires_grad_(False)  # forward passes only: no autograd graph, no activations kept
    # named_parameters drops GPT-2's tied lm_head.weight; functional_call ties it back to wte
    params: Dict[str, torch.Tensor] = dict(model.named_parameters())
    param_mib = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    data = torch.tensor(list(TEXT * 8), dtype=torch.long, device=device)

    def loss_fn(p: Dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, kwargs=dict(input_ids=ids, labels=ids)).loss.float()

    optimizer = ZOSGD(params, lr=args.lr)  # MeZO: plain SGD, no momentum, no state
    held_out = windows(data, 64, args.seq_len, torch.Generator().manual_seed(args.seed + 10_000))
    # a step draws its windows and its noise seed (one draw of torch's generator per estimate)
    journal, first = resume.open_journal(
        args, params, optimizer, lambda: (windows(data, args.batch, args.seq_len, data_gen), draw_seed())
    )
    with torch.no_grad():
        start_eval = float(loss_fn(params, held_out))
    rss_before = rss_mib()
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | "
        f"{type(model).__name__}, {sum(p.numel() for p in params.values()):,} parameters ({param_mib:.2f} MiB) | "
        f"MeZO: antithetic N={args.num_samples}, sigma={args.sigma:g}, perturb={args.perturb}, {args.dtype}, "
        f"ZOSGD lr={args.lr:g} | "
        f"{args.batch} x {args.seq_len} bytes per step"
    )
    print(
        f"step {first - 1:5d}  eval loss {start_eval:.4f} (log(256) = {math.log(256):.3f})  "
        f"peak memory {peak_memory(device)} before training",
        flush=True,
    )

    def step(ids: torch.Tensor) -> float:
        sg = zo_kernels.estimate(
            loss_fn, params, ids, method="antithetic", num_samples=args.num_samples, sigma=args.sigma,
            perturb=args.perturb,
        )
        optimizer.step(sg)
        if journal is not None:  # after the step: a step without its record is redone on --resume
            journal.append(sg)
        return sg.loss

    every = args.print_every or max(1, args.steps // 10)
    batches = lambda: windows(data, args.batch, args.seq_len, data_gen)  # noqa: E731
    elapsed = run_steps(step, batches, args.steps, every, device, first)
    if journal is not None:
        journal.close()
        print(f"final parameters {fingerprint(params)}")
    if not report_eval(loss_fn, params, held_out, start_eval, args, elapsed, "lower --lr", args.steps - first + 1):
        return 1
    if device.type == "cpu":
        print(
            f"memory: peak RSS {rss_mib():.1f} MiB, {rss_mib() - rss_before:+.1f} MiB during training; "
            f"the weights are {param_mib:.2f} MiB (perturb='copy' would add a scratch copy of them)"
        )
    return 0


def mezo_inplace_step(
    loss_fn: Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    params: Dict[str, torch.Tensor],
    ids: torch.Tensor,
    seed: int,
    eps: float,
    lr: float,
) -> float:
    """One step of MeZO's Algorithm 1 on ``params`` in place, in their own dtype (as MeZO's code does);
    returns the projected gradient ``g``, so that a replay can apply the same update ``theta -= lr g z``."""

    def perturb(scale: float) -> None:
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        for p in params.values():
            z = torch.normal(0.0, 1.0, p.shape, generator=gen, dtype=p.dtype, device=p.device)
            p.add_(z, alpha=scale)

    with torch.no_grad():
        perturb(eps)
        plus = float(loss_fn(params, ids))
        perturb(-2 * eps)
        minus = float(loss_fn(params, ids))
        perturb(eps)
        g = (plus - minus) / (2 * eps)
        perturb(-lr * g)
    return g


def replay_mezo(params64: Dict[str, torch.Tensor], seed: int, g: float, lr: float, dtype: torch.dtype) -> None:
    """The update of :func:`mezo_inplace_step` in float64: the same ``z`` (drawn in ``dtype``), the same ``g``."""
    gen = torch.Generator(device=next(iter(params64.values())).device).manual_seed(seed)
    for p in params64.values():
        z = torch.normal(0.0, 1.0, p.shape, generator=gen, dtype=dtype, device=p.device)
        p.sub_(z.double(), alpha=lr * g)


def drift(params: Dict[str, torch.Tensor], replay: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor]) -> str:
    """``|theta - replay| / |replay - start|`` over all weights (float64), and the mean absolute difference."""
    diff = torch.cat([(params[k].double() - replay[k]).reshape(-1) for k in params])
    moved = torch.cat([(replay[k] - start[k]).reshape(-1) for k in params])
    return f"{float(diff.norm() / moved.norm()):.3f} of the distance moved (mean |diff| {float(diff.abs().mean()):.2e})"


def compare_drift(args: argparse.Namespace) -> int:
    """bfloat16 MeZO, zo_kernels ``on_use`` vs an Algorithm 1 in-place loop, each against a float64 replay."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.model, "eager").to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    data = torch.tensor(list(TEXT * 8), dtype=torch.long, device=device)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}

    def loss_fn(p: Dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, kwargs=dict(input_ids=ids, labels=ids)).loss.float()

    def fresh() -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        return ({k: v.clone() for k, v in start.items()}, {k: v.double() for k, v in start.items()})

    print(f"{type(model).__name__} bfloat16, {args.steps} MeZO steps (antithetic, N=1, sigma={args.sigma:g}, "
          f"lr={args.lr:g}), each run against a float64 replay of its own updates")  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [windows(data, args.batch, args.seq_len, gen) for _ in range(args.steps)]
    params, replay = fresh()
    optimizer = ZOSGD(list(params.values()), lr=args.lr)
    for k, ids in enumerate(batches):
        sg = zo_kernels.estimate(loss_fn, params, ids, method="antithetic", sigma=args.sigma, seed=args.seed + k,
                                 perturb="on_use")  # fmt: skip
        optimizer.step(sg)
        as64 = zo_kernels.SeedGradient.from_state_dict({**sg.state_dict(), "dtypes": ["torch.float64"] * len(params)})
        as64.apply_(list(replay.values()), args.lr)
    print(f"zo_kernels perturb='on_use':     distance from its float64 replay {drift(params, replay, start)}")
    params, replay = fresh()
    for k, ids in enumerate(batches):
        g = mezo_inplace_step(loss_fn, params, ids, args.seed + k, args.sigma, args.lr)
        replay_mezo(replay, args.seed + k, g, args.lr, torch.bfloat16)
    print(f"MeZO Algorithm 1 in place, bf16: distance from its float64 replay {drift(params, replay, start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
