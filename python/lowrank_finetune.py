"""Population fine-tuning of a small Hugging Face causal LM with low-rank ES noise (EGGROLL).

Each step estimates the gradient of the language-model loss from ``2N`` perturbed models (antithetic
pairs), every weight matrix perturbed by ``A B^T / sqrt(r)`` (``LowRank(r)``, Sarkar et al., arXiv
2511.16652), and steps with the fused update ``theta -= lr * sum_i w_i z_i``::

    sg = zo_kernels.estimate(loss_fn, params, ids, distribution=LowRank(1), method="antithetic",
                             num_samples=N, sigma=sigma, batch_size=2 * N)
    ZOSGD(params, lr).step(sg)        # or sg.apply_(params, lr): the same fused step, no optimizer state

With ``batch_size`` the whole population is one vmapped forward pass in which the members *share* the
model's weights: ``nn.Linear``, GPT-2's ``Conv1D`` (``addmm``), the embeddings and the tied LM head are
rewritten into the shared product plus each member's low-rank term (``docs/lowrank.md``), so no member's
weights are ever built; the factors of a step cost ``2N * r * (m + n)`` numbers per matrix. Any other use
of a perturbed matrix would be materialized for that op, with a warning; the script catches those
warnings and prints them (for both models here there are none).

The model is built from a config (nothing is downloaded) and randomly initialised: ``--model gpt2``
(``GPT2LMHeadModel``, 2 layers, width 64) or ``--model llama`` (``LlamaForCausalLM``, 2 layers, width 64,
SwiGLU MLP, rotary positions). The text is a few pangrams repeated, read as bytes (vocabulary 256), so a
random model starts at about ``log(256) = 5.55`` nats and learns the byte statistics quickly. Attention
runs in HF's ``eager`` implementation: under vmap, PyTorch has no batching rule for the CPU
scaled-dot-product-attention kernel and falls back to a per-member loop with a warning (``--attn sdpa``
shows it).

With ``--journal PATH`` every step is recorded in a seed journal (``zo_kernels.journal``: seed, weights,
learning rate; ``46 + 8 N`` bytes per step, 174 at the default N = 16, against 0.4 MiB of float32
weights); ``--resume`` replays it into the freshly initialised model (same ``--seed``, checked against
the journal's fingerprint) and continues to ``--steps``, bit for bit as an uninterrupted run.

Run::

    python python/lowrank_finetune.py                        # GPT-2, 300 steps, about a minute on 2 CPU cores
    python python/lowrank_finetune.py --steps 300 --journal run.zoj --resume    # after an interrupted run
    python python/lowrank_finetune.py --model llama --update apply
    python python/lowrank_finetune.py --steps 30 --print-every 10
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
import warnings
from typing import Callable, Dict, List, Sequence

import resume  # the sibling module: --journal / --resume
import torch
from torch.func import functional_call

import zo_kernels
from zo_kernels.distributions import LowRank, draw_seed
from zo_kernels.journal import fingerprint
from zo_kernels.optim import ZOSGD

TEXT = (
    b"The quick brown fox jumps over the lazy dog. "
    b"Pack my box with five dozen liquor jugs. "
    b"How vexingly quick daft zebras jump! "
    b"Sphinx of black quartz, judge my vow. "
)


def build_model(name: str, attn: str) -> torch.nn.Module:
    """A randomly initialised tiny causal LM from a config: no download, no tokenizer (bytes are the tokens)."""
    import transformers

    transformers.logging.set_verbosity_error()  # GPT2Config's default bos/eos ids exceed vocab 256: unused here
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, attn_implementation=attn
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=256,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config)


def windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes of ``data``, as a ``(count, length)`` int64 batch."""
    starts = torch.randint(0, data.numel() - length + 1, (count,), generator=generator)
    return data[(starts[:, None] + torch.arange(length)).to(data.device)]  # the same windows on any device


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on the CPU.

    Not tracemalloc: torch's CPU allocator does not go through Python's, so tracemalloc misses tensors.
    """
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (cuda max allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"{rss / 2**20 if sys.platform == 'darwin' else rss / 2**10:.1f} MiB (process peak RSS)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="LowRank ES fine-tuning of a tiny HF causal LM with zo_kernels.")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=16, help="antithetic pairs N per step (2N members)")
    parser.add_argument("--batch-size", type=int, default=None, help="members per vmapped forward (default: 2N)")
    parser.add_argument("--rank", type=int, default=1, help="rank r of each matrix's perturbation")
    parser.add_argument("--sigma", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument(
        "--attn", choices=("eager", "sdpa"), default="eager", help="HF attention implementation (sdpa: see above)"
    )
    parser.add_argument("--update", choices=("zosgd", "apply"), default="zosgd", help="ZOSGD.step or sg.apply_")
    parser.add_argument("--batch", type=int, default=8, help="text windows per step")
    parser.add_argument("--seq-len", type=int, default=32, help="bytes per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=0, help="report every k steps (default: steps / 10)")
    resume.add_options(parser)
    return resume.check_options(parser, parser.parse_args(argv))


def run_steps(
    step: Callable[[torch.Tensor], float],
    batch: Callable[[], torch.Tensor],
    steps: int,
    every: int,
    device: torch.device,
    first: int = 1,
) -> float:
    """Steps ``first`` to ``steps``: calls of ``step(batch())`` (each returns f(theta)); every ``every`` steps, print
    the mean loss, steps/s and peak memory. Returns the seconds taken."""
    losses: List[float] = []
    tick = start = time.perf_counter()
    for k in range(first, steps + 1):
        losses.append(step(batch()))
        if k % every == 0 or k == steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done = len(losses)
            print(
                f"step {k:5d}  loss {sum(losses) / done:.4f} (mean f(theta) of the last {done} steps)  "
                f"{done / (time.perf_counter() - tick):6.2f} steps/s  peak memory {peak_memory(device)}",
                flush=True,
            )
            losses.clear()
            tick = time.perf_counter()
    return time.perf_counter() - start


def report_eval(
    loss_fn: Callable[..., torch.Tensor],
    params: Dict[str, torch.Tensor],
    held_out: torch.Tensor,
    start_eval: float,
    args: argparse.Namespace,
    elapsed: float,
    hint: str,
    ran: int,
) -> bool:
    """Print the held-out loss before -> after and the speed of the ``ran`` steps run; False (with ``hint``) if
    training diverged."""
    with torch.no_grad():
        end_eval = float(loss_fn(params, held_out))
    if not math.isfinite(end_eval):
        print(f"eval loss is {end_eval}: training diverged ({hint})")
        return False
    print(
        f"eval loss: {start_eval:.4f} -> {end_eval:.4f} in {args.steps} steps, {ran / elapsed:.2f} steps/s "
        f"({ran * (2 * args.num_samples + 1) / elapsed:.0f} forward passes/s)"
    )
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Fine-tune, report loss, speed and memory, and list any op the low-rank batch had to materialize."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the model's initialisation and every estimate's noise seed
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    # eval(): no dropout, so each member's loss depends on its weights and the batch only
    model = build_model(args.model, args.attn).to(device).eval()
    model.requires_grad_(False)  # forward passes only: no autograd graph is ever built
    # named_parameters drops GPT-2's tied lm_head.weight; functional_call ties it back to wte (tie_weights=True)
    params: Dict[str, torch.Tensor] = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    data = torch.tensor(list(TEXT * 8), dtype=torch.long, device=device)
    members = args.batch_size or 2 * args.num_samples

    def loss_fn(p: Dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        # HF shifts the labels itself: the loss is the mean next-byte cross-entropy
        return functional_call(model, p, kwargs=dict(input_ids=ids, labels=ids)).loss

    matrices = [p for p in params.values() if p.ndim >= 2]
    factor_numbers = sum(args.rank * (p.shape[0] + p.numel() // p.shape[0]) for p in matrices)
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | "
        f"{type(model).__name__}, {n_params:,} parameters in {len(params)} tensors ({len(matrices)} matrices) | "
        f"LowRank({args.rank}) antithetic N={args.num_samples}, batch_size={members}, sigma={args.sigma:g}, "
        f"lr={args.lr:g}, update={args.update} | {args.batch} x {args.seq_len} bytes per step"
    )
    # What a population of `members` perturbed models would hold as weights (Normal() with the same batch_size),
    # against what LowRank holds per vmapped call: the matrices' factors and the vectors' perturbed copies.
    vectors = n_params - sum(p.numel() for p in matrices)
    print(
        f"per call: {members} materialized members would be {members * n_params * 4 / 2**20:.1f} MiB of float32 "
        f"weights; LowRank's factors + perturbed vectors are {members * (factor_numbers + vectors) * 4 / 2**20:.2f} MiB"
    )

    optimizer = ZOSGD(params, lr=args.lr)  # no momentum: no state, the fused low-rank step
    held_out = windows(data, 64, args.seq_len, torch.Generator().manual_seed(args.seed + 10_000))
    # --update apply steps without the optimizer: its journal records the lr of each sg.apply_ instead
    stepper = optimizer if args.update == "zosgd" else None
    # a step draws its windows and its noise seed (one draw of torch's generator per estimate)
    journal, first = resume.open_journal(
        args, params, stepper, lambda: (windows(data, args.batch, args.seq_len, data_gen), draw_seed())
    )
    with torch.no_grad():
        start_eval = float(loss_fn(params, held_out))
    print(
        f"step {first - 1:5d}  eval loss {start_eval:.4f} (log(256) = {math.log(256):.3f})  "
        f"peak memory {peak_memory(device)}",
        flush=True,
    )

    # every warning raised inside the estimates, by message: zo_kernels' "not rewritten" ones name the op that
    # got a materialized member, and PyTorch's vmap fallbacks show up here too
    caught_warnings: Dict[str, str] = {}

    def step(ids: torch.Tensor) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sg = zo_kernels.estimate(
                loss_fn,
                params,
                ids,
                distribution=LowRank(args.rank),
                method="antithetic",
                num_samples=args.num_samples,
                sigma=args.sigma,
                batch_size=members,
            )
        for w in caught:
            caught_warnings.setdefault(str(w.message), f"{w.category.__name__}: {w.message}")
        if args.update == "zosgd":
            optimizer.step(sg)
        else:
            sg.apply_(params, args.lr)  # what ZOSGD(momentum=0).step does
        if journal is not None:  # after the step: a step without its record is redone on --resume
            journal.append(sg, lr=None if stepper is not None else args.lr)
        return sg.loss

    every = args.print_every or max(1, args.steps // 10)
    batches = lambda: windows(data, args.batch, args.seq_len, data_gen)  # noqa: E731
    elapsed = run_steps(step, batches, args.steps, every, device, first)
    if journal is not None:
        journal.close()
    print(f"final parameters {fingerprint(params)}")
    ran = args.steps - first + 1
    if not report_eval(loss_fn, params, held_out, start_eval, args, elapsed, "lower --lr or --sigma", ran):
        return 1
    if caught_warnings:
        print(f"warnings ({len(caught_warnings)}):")
        for text in caught_warnings.values():
            print(f"  {text}")
    else:
        print("warnings: none (every use of a perturbed matrix was rewritten; nothing was materialized)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
