"""The counter-based noise stream z(seed, i, j), and the fused operations built on it, in PyTorch.

This module *is* the contract of ``docs/noise.md``; the compiled and Triton backends are tested
against it. Everything here works on any device and is written for clarity, not speed: it
materializes noise in bounded chunks, which the fused kernels never do.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels.dtypes import accumulation_dtype  # re-exported: callers import it from here
from .philox import random_words

NORMAL = "normal"
RADEMACHER = "rademacher"
STREAMS = (NORMAL, RADEMACHER)

#: How many consecutive flat elements one Philox call (four uint32 words) feeds, per stream.
ELEMENTS_PER_BLOCK = {NORMAL: 4, RADEMACHER: 128}

#: 2*pi rounded to float32, the constant every backend multiplies the second uniform by.
TWO_PI_F32 = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))

#: Bound on the number of stream values one chunk of the reference materializes at once.
CHUNK_ELEMENTS = 1 << 22


def uniform_open01(words: torch.Tensor) -> torch.Tensor:
    """Map uint32 words to float32 uniforms in the open interval (0, 1), exactly.

    ``u = ((x >> 9) + 0.5) * 2**-23``: the top 23 bits plus a half, so every value is an odd
    multiple of 2**-24, representable in float32 with no rounding on any backend.
    """
    return ((words >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def box_muller(words: torch.Tensor) -> torch.Tensor:
    """Four float32 standard normals from four uint32 words (last dimension of size 4).

    Pairs (x0, x1) and (x2, x3): ``r = sqrt(-2 log u_even)``, ``t = TWO_PI_F32 * u_odd``,
    outputs ``(r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1)``, all in float32.
    """
    u = uniform_open01(words)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))
    angle = TWO_PI_F32 * u[..., 1::2]
    out = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return out.flatten(-2)


def rademacher_signs(words: torch.Tensor) -> torch.Tensor:
    """128 float32 signs from four uint32 words: element ``32*w + b`` is +1 where bit b of word w is set."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return (bits.to(torch.float32) * 2.0 - 1.0).flatten(-2)


def noise(stream: str, seed: int, sample_ids: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
    """Stream values ``z(seed, i, j)`` for ``i`` in ``sample_ids`` and ``j`` in ``[offset, offset + numel)``.

    Returns a float32 tensor of shape ``(len(sample_ids), numel)`` on ``sample_ids.device``.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    sample_ids = sample_ids.to(torch.int64).reshape(-1)
    device = sample_ids.device
    if numel == 0:
        return torch.empty((sample_ids.numel(), 0), dtype=torch.float32, device=device)
    per_block = ELEMENTS_PER_BLOCK[stream]
    first, last = offset // per_block, (offset + numel - 1) // per_block
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = random_words(seed, sample_ids[:, None], blocks[None, :])
    values = box_muller(words) if stream == NORMAL else rademacher_signs(words)
    start = offset - first * per_block
    return values.flatten(1)[:, start : start + numel]


def _element_chunks(numel: int, rows: int) -> Sequence[range]:
    step = max(1, CHUNK_ELEMENTS // max(rows, 1))
    return [range(lo, min(lo + step, numel)) for lo in range(0, numel, step)]


def perturb(
    out: torch.Tensor, theta: torch.Tensor, stream: str, seed: int, sample_id: int, scale: float, offset: int
) -> torch.Tensor:
    """``out = theta + scale * z(seed, sample_id, offset + j)`` over the flat elements of ``theta``."""
    acc = accumulation_dtype(theta.dtype)
    flat_theta, flat_out = theta.reshape(-1), out.view(-1)
    ids = torch.tensor([sample_id], dtype=torch.int64, device=theta.device)
    for chunk in _element_chunks(theta.numel(), 1):
        z = noise(stream, seed, ids, offset + chunk.start, len(chunk))[0].to(acc)
        part = flat_theta[chunk.start : chunk.stop].to(acc) + scale * z
        flat_out[chunk.start : chunk.stop] = part.to(out.dtype)
    return out


def combine(
    weights: torch.Tensor, sample_ids: torch.Tensor, stream: str, seed: int, offset: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """``sum_k weights[k] * z(seed, sample_ids[k], offset + j)`` as a flat tensor in the accumulation dtype."""
    acc = accumulation_dtype(dtype)
    device = weights.device
    total = torch.zeros(numel, dtype=acc, device=device)
    ids = sample_ids.to(device=device, dtype=torch.int64).reshape(-1)
    w = weights.to(acc).reshape(-1)
    rows = max(1, min(ids.numel(), 64))
    for lo in range(0, ids.numel(), rows):
        for chunk in _element_chunks(numel, rows):
            z = noise(stream, seed, ids[lo : lo + rows], offset + chunk.start, len(chunk)).to(acc)
            total[chunk.start : chunk.stop] += w[lo : lo + rows] @ z
    return total


def reduce(
    grad: torch.Tensor, weights: torch.Tensor, sample_ids: torch.Tensor, stream: str, seed: int, offset: int
) -> torch.Tensor:
    """``grad += sum_k weights[k] * z(seed, sample_ids[k], offset + j)``; returns ``grad``."""
    total = combine(weights, sample_ids, stream, seed, offset, grad.numel(), grad.dtype)
    flat = grad.view(-1)
    flat.copy_((flat.to(total.dtype) + total).to(grad.dtype))
    return grad


def step(
    theta: torch.Tensor,
    weights: torch.Tensor,
    sample_ids: torch.Tensor,
    stream: str,
    seed: int,
    lr: float,
    offset: int,
) -> torch.Tensor:
    """``theta -= lr * sum_k weights[k] * z(seed, sample_ids[k], offset + j)`` in place; returns ``theta``."""
    total = combine(weights, sample_ids, stream, seed, offset, theta.numel(), theta.dtype)
    flat = theta.view(-1)
    flat.copy_((flat.to(total.dtype) - lr * total).to(theta.dtype))
    return theta


def squared_norms(stream: str, seed: int, sample_ids: torch.Tensor, numel: int) -> torch.Tensor:
    """``sum_j z(seed, i, j)**2`` over ``j < numel`` for each sample id, in float64."""
    ids = sample_ids.to(torch.int64).reshape(-1)
    out = torch.zeros(ids.numel(), dtype=torch.float64, device=ids.device)
    rows = max(1, min(ids.numel(), 64))
    for lo in range(0, ids.numel(), rows):
        for chunk in _element_chunks(numel, rows):
            z = noise(stream, seed, ids[lo : lo + rows], chunk.start, len(chunk)).to(torch.float64)
            out[lo : lo + rows] += (z * z).sum(dim=1)
    return out


def lowrank_perturb(out: torch.Tensor, theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``out = theta + scale * (a @ b.T)`` for an ``(m, n)`` matrix, in the accumulation dtype, rounded once."""
    acc = accumulation_dtype(theta.dtype)
    out.copy_((theta.to(acc) + scale * (a.to(acc) @ b.to(acc).t())).to(out.dtype))


def lowrank_accumulate(
    data: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, alpha: float
) -> None:
    """``data += alpha * a @ diag(weights) @ b.T`` in the accumulation dtype, rounded once."""
    acc = accumulation_dtype(data.dtype)
    lowrank_perturb(data, data, a.to(acc) * weights.to(acc), b, alpha)
