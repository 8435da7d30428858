"""MeZO-style fine-tuning of a small decoder-only transformer with seed-compressed zero-order steps.

MeZO (Malladi et al., 2023) trains with forward passes only: each step perturbs the parameters in
place by ``+sigma z``, evaluates the loss, moves them to ``-sigma z``, evaluates again, restores them,
and updates ``theta -= lr * g`` where ``g = (f(+) - f(-)) / (2 sigma) * z`` is regenerated from its
seed. No gradient, no activation memory for a backward pass and no optimizer state is ever held, so
training needs about the memory of inference. Here that is::

    sg = zo_kernels.estimate(loss_fn, params, batch, method="antithetic", num_samples=N, sigma=1e-3, inplace=True)
    ZOSGD(params, lr).step(sg)   # the fused step kernel: theta -= lr * sum_i w_i z(seed, i)

The model is a randomly initialised GPT-style language model built from ``torch.nn`` (token and
position embeddings, ``nn.TransformerEncoderLayer`` blocks with a causal mask, a linear LM head);
nothing is downloaded. The data is synthetic and learnable: every sequence follows a fixed random
permutation of the vocabulary (``next = perm[current]``), except that with probability ``--noise``
a token is replaced by a uniformly random one. A model that has not learned the rule scores
``log(vocab)``; one that has learned it reaches the entropy printed at the start.

With ``--journal PATH`` every step is recorded in a seed journal (``zo_kernels.journal``: the seed, the
weights and the learning rate: 54 bytes per step at N = 1); ``--resume`` replays it into the freshly
initialised model (same ``--seed``, checked against the journal's fingerprint) and continues: the
result equals an uninterrupted run bit for bit. A journaled run estimates with ``perturb='on_use'``
(exact, at about the memory of inference) rather than ``inplace=True``, whose restores round the
parameters in a way no record holds, so that an in-place run cannot be replayed bit for bit.

Run::

    python python/mezo_finetune.py                    # defaults: 1000 steps, about 15 s on 2 CPU cores
    python python/mezo_finetune.py --device cuda --steps 3000 --d-model 256 --layers 4
    python python/mezo_finetune.py --steps 500 --journal run.zoj            # stopped at any point, then:
    python python/mezo_finetune.py --steps 1000 --journal run.zoj --resume  # the same as 1000 steps at once
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from typing import List, Sequence

import resume  # the sibling module: --journal / --resume
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import zo_kernels
from zo_kernels.distributions import draw_seed
from zo_kernels.journal import fingerprint
from zo_kernels.optim import ZOSGD


class TinyGPT(nn.Module):
    """Token + learned position embeddings, pre-norm causal transformer blocks, LM head."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int, ff: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, dim_feedforward=ff, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, length, vocab)`` for each next token."""
        length = tokens.shape[1]
        h = self.tok(tokens) + self.pos.weight[:length]
        mask = self.mask[:length, :length]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def make_batch(perm: torch.Tensor, batch: int, seq_len: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Sequences with ``x[t+1] = perm[x[t]]``, each token replaced by a random one with probability ``noise``."""
    vocab = perm.numel()
    tokens = torch.empty(batch, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (batch,), generator=generator)
    for t in range(1, seq_len):
        follow = perm[tokens[:, t - 1]]
        random = torch.randint(vocab, (batch,), generator=generator)
        swap = torch.rand(batch, generator=generator) < noise
        tokens[:, t] = torch.where(swap, random, follow)
    return tokens


def task_entropy(vocab: int, noise: float) -> float:
    """Cross-entropy (nats per token) of the best predictor of the next token."""
    p_follow = 1.0 - noise + noise / vocab
    p_other = noise / vocab
    h = -p_follow * math.log(p_follow)
    if p_other > 0:
        h -= (vocab - 1) * p_other * math.log(p_other)
    return h


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (cuda max allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return f"{mib:.1f} MiB (process peak RSS)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MeZO fine-tuning of a tiny transformer LM with zo_kernels.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=1, help="N perturbations per step (2N + 1 forwards)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff", type=int, default=64, help="feed-forward width")
    parser.add_argument("--noise", type=float, default=0.1, help="probability that a token breaks the rule")
    parser.add_argument("--print-every", type=int, default=0, help="report every k steps (default: steps / 10)")
    resume.add_options(parser)
    parser.add_argument(
        "--perturb",
        choices=("inplace", "on_use", "copy"),
        default=None,
        help="how the estimate perturbs (default: inplace, or on_use with --journal: replayable bit for bit)",
    )
    args = resume.check_options(parser, parser.parse_args(argv))
    args.perturb = args.perturb or ("on_use" if args.journal else "inplace")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the model's initialisation and every estimate's seed
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.randperm(args.vocab, generator=data_gen)

    model = TinyGPT(args.vocab, args.seq_len, args.d_model, args.heads, args.layers, args.ff).to(device)
    model.requires_grad_(False)  # forward passes only: no autograd graph is ever built
    names = [name for name, _ in model.named_parameters()]
    params: List[torch.Tensor] = [p for _, p in model.named_parameters()]
    n_params = sum(p.numel() for p in params)

    def loss_fn(ps: List[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, dict(zip(names, ps)), (batch[:, :-1],))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    optimizer = ZOSGD(params, lr=args.lr)  # MeZO: no momentum, no state
    held_out = make_batch(perm, 256, args.seq_len, args.noise, data_gen).to(device)
    # a step draws its batch and its noise seed (one draw of torch's generator per estimate)
    journal, first = resume.open_journal(
        args, params, optimizer, lambda: (make_batch(perm, args.batch, args.seq_len, args.noise, data_gen), draw_seed())
    )
    with torch.no_grad():
        start_eval = float(loss_fn(params, held_out))

    every = args.print_every or max(1, args.steps // 10)
    backend = zo_kernels.backends.select(device, torch.float32).name
    print(
        f"zo_kernels {zo_kernels.__version__} | torch {torch.__version__} | device {device} | backend {backend} | "
        f"{n_params:,} parameters | N={args.num_samples} antithetic, sigma={args.sigma:g}, lr={args.lr:g}, "
        f"perturb={args.perturb} | batch {args.batch} x {args.seq_len} tokens"
    )
    print(
        f"task: vocab {args.vocab}, permutation rule with {args.noise:.0%} noise; uniform guess "
        f"log(vocab) = {math.log(args.vocab):.3f}, best possible = {task_entropy(args.vocab, args.noise):.3f} nats"
    )
    print(f"step {first - 1:5d}  held-out loss {start_eval:.4f}  peak memory {peak_memory(device)}", flush=True)

    losses: List[float] = []
    tick = time.perf_counter()
    for step in range(first, args.steps + 1):
        batch = make_batch(perm, args.batch, args.seq_len, args.noise, data_gen).to(device)
        sg = zo_kernels.estimate(
            loss_fn,
            params,
            batch,
            method="antithetic",
            num_samples=args.num_samples,
            sigma=args.sigma,
            perturb=args.perturb,
        )
        optimizer.step(sg)
        if journal is not None:
            journal.append(sg)  # after the step: a step without its record is redone on --resume
        losses.append(sg.loss)
        if step % every == 0 or step == args.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - tick
            done = len(losses)
            print(
                f"step {step:5d}  loss {sum(losses) / done:.4f} (mean of the last {done} steps' f(theta))  "
                f"{done / elapsed:6.1f} steps/s  peak memory {peak_memory(device)}",
                flush=True,
            )
            losses.clear()
            tick = time.perf_counter()

    if journal is not None:
        journal.close()
    print(f"final parameters {fingerprint(params)}")
    with torch.no_grad():
        end_eval = float(loss_fn(params, held_out))
    if not math.isfinite(end_eval):
        print(f"held-out loss is {end_eval}: training diverged (lower --lr)")
        return 1
    print(f"held-out loss: {start_eval:.4f} -> {end_eval:.4f} (log(vocab) = {math.log(args.vocab):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
