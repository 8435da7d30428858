"""The pure-PyTorch reference backend: the counter-based stream ``z(seed, i, j)`` and every fused operation.

This module *is* the contract of ``docs/noise.md``; the compiled and Triton backends are tested
against it. Everything here works on any device and is written for clarity, not speed: it
materializes noise in bounded chunks, which the fused kernels never do. It depends on the
declarations (:mod:`.spec`) only, never on the kernels it specifies.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from .base import Backend
from .spec import ELEMENTS_PER_BLOCK, NORMAL, STREAMS, TWO_PI_F32, Placement, Traits, accumulation_dtype

# -- Philox4x32-10, the counter-based generator --------------------------------------------------------

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

Word = Union[int, torch.Tensor]
Words4 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def mulhilo32(a: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(hi, lo)`` 32-bit halves of the 64-bit product ``a * x`` (uint32 in int64)."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    p_lo = x_lo * a  # < 2**48: fits int64
    p_hi = x_hi * a
    s = p_hi + (p_lo >> 16)  # a * x == s * 2**16 + (p_lo & 0xFFFF)
    hi = s >> 16
    lo = ((s & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int,
    k1: int,
    rounds: int = PHILOX_ROUNDS,
) -> Words4:
    """Apply Philox4x32 with ``rounds`` rounds to broadcastable counter words and a 64-bit key.

    Every counter word is a uint32 value held in an ``int64`` tensor; the four outputs are too.
    """
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_seed(seed: int) -> Tuple[int, int]:
    """Split a 64-bit seed into the Philox key words ``(k0, k1) = (low 32 bits, high 32 bits)``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return seed & MASK32, seed >> 32


def counter_words(
    sample_ids: torch.Tensor, blocks: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counter words for (sample id, block index), broadcasting ``sample_ids`` against ``blocks``.

    Layout (docs/noise.md): ``c0 = block & 0xffffffff``, ``c1 = block >> 32``, ``c2 = sample id``,
    ``c3 = 0`` (reserved).
    """
    c0 = blocks & MASK32
    c1 = blocks >> 32
    c2 = sample_ids & MASK32
    c3 = torch.zeros_like(c0)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    return c0, c1, c2, c3


def random_words(seed: int, sample_ids: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The four uint32 words of each (sample, block), stacked on a new last dimension of size 4."""
    k0, k1 = split_seed(seed)
    return torch.stack(philox4x32(*counter_words(sample_ids, blocks), k0, k1), dim=-1)


# -- the stream and the operations ----------------------------------------------------------------------

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


class ReferenceBackend(Backend):
    """Pure PyTorch, any device and floating dtype: the specification and the test oracle."""

    name = "reference"
    traits = Traits(
        Placement("reference", None, "any tensor", host_ids=True, dtypes=None),
        lambda: torch.device("cpu"),
        lambda data, given: given,  # the reference converts to the accumulation dtype itself
        max_signs=None,
    )

    def run_perturb(self, op):  # noqa: D102
        def launch(sample_id: int, scale: float) -> None:
            perturb(op.out, op.theta, op.stream, op.seed, sample_id, scale, op.offset)

        return launch

    def run_accumulate(self, op):  # noqa: D102
        if op.lr is None:
            reduce(op.data, op.weights, op.ids, op.stream, op.seed, op.offset)
        else:
            step(op.data, op.weights, op.ids, op.stream, op.seed, op.lr, op.offset)

    def run_squared_norms(self, op):  # noqa: D102
        return squared_norms(op.stream, op.seed, op.ids, op.numel)

    def run_sample(self, op):  # noqa: D102
        ids = torch.tensor([op.sample_id], dtype=torch.int64, device=op.device)
        return noise(op.stream, op.seed, ids, op.offset, op.numel)[0]

    def run_lowrank_perturb(self, op):  # noqa: D102
        lowrank_perturb(op.out, op.theta, op.a, op.b, op.scale)

    def run_lowrank_accumulate(self, op):  # noqa: D102
        lowrank_accumulate(op.data, op.a, op.b, op.weights, op.alpha)

    def run_philox_words(self, op):  # noqa: D102
        blocks = torch.arange(op.block0, op.block0 + op.blocks, device=op.device)[None, :]
        return random_words(op.seed, torch.tensor([[op.sample_id]], device=op.device), blocks)[0]
