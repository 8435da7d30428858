"""Philox4x32-10 in plain PyTorch: the specification every backend is tested against.

Values are uint32 held in ``int64`` tensors, because PyTorch's unsigned 32-bit support is too thin
(and absent before 2.3) for multiply/shift/xor on every device. The 32x32 -> 64-bit products that
Philox needs would overflow ``int64``, so :func:`mulhilo32` splits one factor into 16-bit halves.

Reference: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers: as easy as
1, 2, 3", SC'11, and the Random123 library's ``philox.h`` constants.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

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
