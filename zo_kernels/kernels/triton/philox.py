"""The noise stream of ``docs/noise.md`` as Triton device functions.

Philox4x32-10 on uint32 words (``tl.umulhi`` for the high word of each product, the wrapping uint32
multiply for the low word), the exact float32 uniforms, Box–Muller normals and Rademacher signs.
:func:`stream_tile` turns a tile of consecutive flat indices into stream values with one Philox call
per stream block (4 normals, 128 signs), so callers start tiles at multiples of the block length.

On GPUs ``log``, ``sin`` and ``cos`` are libdevice's accurate ``__nv_logf`` / ``__nv_sinf`` /
``__nv_cosf`` rather than fast approximations, which keeps the normals within about 1e-6 of the
reference; under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, which has no libdevice) they come
from ``tl`` (numpy there). ``sqrt`` is the correctly rounded ``tl.sqrt_rn`` everywhere.

Integer scalars arrive as int32, uint32 or int64 depending on their value (Triton types Python ints
that way); ``.to(tl.uint32)`` keeps the low 32 bits of any of them, so callers convert with it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...reference import noise as _ref

#: Whether the kernels run in Triton's interpreter (read once, when the kernels are defined).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
#: 2*pi rounded to float32 (docs/noise.md, TWO_PI_F32).
TWO_PI_F32: tl.constexpr = tl.constexpr(6.28318548202514648)
#: 2**-23: ``((x >> 9) + 0.5) * 2**-23`` is an exact float32 uniform in (0, 1).
INV_2_23: tl.constexpr = tl.constexpr(1.1920928955078125e-07)

#: Stream ids: the position of the stream's name in ``zo_kernels.reference.noise.STREAMS``.
STREAM_IDS = {name: k for k, name in enumerate(_ref.STREAMS)}
NORMAL: tl.constexpr = tl.constexpr(STREAM_IDS[_ref.NORMAL])
#: Consecutive flat elements fed by one Philox call (4 normals, 128 signs).
NORMAL_PER_BLOCK: tl.constexpr = tl.constexpr(_ref.ELEMENTS_PER_BLOCK[_ref.NORMAL])
RADEMACHER_PER_BLOCK: tl.constexpr = tl.constexpr(_ref.ELEMENTS_PER_BLOCK[_ref.RADEMACHER])
#: The largest of them: tiles start at multiples of it, so they hold whole Philox blocks of any stream.
MAX_PER_BLOCK = max(_ref.ELEMENTS_PER_BLOCK.values())

_LIBDEVICE: tl.constexpr = tl.constexpr(not INTERPRET)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint32 counter words ``c0..c3`` and key words ``k0, k1``.

    The key is bumped by the Weyl increments before rounds 2..10 (Random123 order). Products and
    key bumps wrap modulo 2**32 by design, so they opt out of Triton's overflow sanitizer (which
    would flag them under ``TRITON_DEBUG=1``).
    """
    for r in tl.static_range(10):
        if r > 0:
            k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
            k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def split_block(block):
    """The counter words ``(block & 0xffffffff, block >> 32)`` of a non-negative int64 block index."""
    return block.to(tl.uint32), (block >> 32).to(tl.uint32)


@triton.jit
def block_words(block, sample, k0, k1):
    """The four words of stream block ``block`` (int64) of ``sample`` (uint32) under key ``(k0, k1)``.

    Counter ``(block & 0xffffffff, block >> 32, sample, 0)`` (docs/noise.md).
    """
    c0, c1 = split_block(block)
    zero = tl.zeros_like(c0)
    return philox4x32_10(c0, c1, sample + zero, zero, k0, k1)


@triton.jit
def uniform_open01(x):
    """Exact float32 uniform in (0, 1) from a uint32 word: ``((x >> 9) + 0.5) * 2**-23``."""
    return ((x >> 9).to(tl.float32) + 0.5) * INV_2_23


@triton.jit
def box_muller(a, b):
    """Two float32 normals ``(r cos t, r sin t)`` from the words ``a`` (radius) and ``b`` (angle)."""
    u = uniform_open01(a)
    t = TWO_PI_F32 * uniform_open01(b)
    if _LIBDEVICE:
        r = tl.sqrt_rn(-2.0 * libdevice.log(u))
        z0 = r * libdevice.cos(t)
        z1 = r * libdevice.sin(t)
    else:
        r = tl.sqrt_rn(-2.0 * tl.log(u))
        z0 = r * tl.cos(t)
        z1 = r * tl.sin(t)
    return z0, z1


@triton.jit
def tile_index(STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """Positions ``0 .. BLOCK - 1`` laid out like :func:`stream_tile`'s values: ``[r, a, b] = r * P + a * B + b``.

    Shapes ``[BLOCK // 4, 2, 2]`` (normal) and ``[BLOCK // 128, 4, 32]`` (rademacher): one row per Philox block.
    """
    P: tl.constexpr = NORMAL_PER_BLOCK if STREAM == NORMAL else RADEMACHER_PER_BLOCK
    A: tl.constexpr = 2 if STREAM == NORMAL else 4
    B: tl.constexpr = P // A
    r = tl.arange(0, BLOCK // P)[:, None, None] * P
    return r + tl.arange(0, A)[None, :, None] * B + tl.arange(0, B)[None, None, :]


@triton.jit
def stream_tile(start, sample, k0, k1, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """float32 values of the flat elements ``start + tile_index(STREAM, BLOCK)`` of ``sample``.

    ``start`` (int64) must be a multiple of the stream's block length P (4 or 128): the tile is
    ``BLOCK // P`` whole Philox blocks, each generated once, one per row.
    """
    P: tl.constexpr = NORMAL_PER_BLOCK if STREAM == NORMAL else RADEMACHER_PER_BLOCK
    rows = tl.arange(0, BLOCK // P).to(tl.int64)
    x0, x1, x2, x3 = block_words(start // P + rows, sample, k0, k1)
    if STREAM == NORMAL:
        n0, n1 = box_muller(x0, x1)
        n2, n3 = box_muller(x2, x3)
        # [r, q, p] = lane 2q + p of block r. join adds a minor axis inside each thread, so the four
        # lanes of a block stay in the thread that computed them.
        z = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    else:
        w = tl.arange(0, 4)[None, :, None]
        word = tl.where(
            w == 0,
            x0[:, None, None],
            tl.where(w == 1, x1[:, None, None], tl.where(w == 2, x2[:, None, None], x3[:, None, None])),
        )
        bits = (word >> tl.arange(0, 32).to(tl.uint32)[None, None, :]) & 1  # [r, w, t] = bit t of x_w
        z = tl.where(bits != 0, 1.0, -1.0).to(tl.float32)
    return z
