"""The noise stream of ``docs/noise.md`` as Triton device functions.

Philox4x32-10 on uint32 words (``tl.umulhi`` for the high word of each product, the wrapping uint32
multiply for the low word), the exact float32 uniforms, Box–Muller normals and Rademacher signs.
:func:`stream_tile` turns a tile of consecutive flat indices into stream values with one Philox call
per 4 normals and per 32 signs (a block's words are spread over four threads), so callers start
tiles at multiples of the block length. A thread keeps what it generates: the four lanes of a
normal block as four row tensors, the 32 bits of a word along an axis held in registers, and the
reduce loop keeps its sums in that layout, so no value crosses threads per sample.

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

from .. import spec as _ref

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

#: Stream ids: the position of the stream's name in ``zo_kernels.ops.spec.STREAMS``.
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
def normal_lanes(start, sample, k0, k1, ROWS: tl.constexpr):
    """The four normals of each of the ``ROWS`` Philox blocks from flat element ``start`` (int64, a multiple of 4).

    Four ``[ROWS]`` tensors, lanes 0..3 of the blocks ``start // 4 + r``: each thread generates and
    keeps whole blocks, so nothing crosses threads until :func:`interleave_lanes`.
    """
    x0, x1, x2, x3 = block_words(start // NORMAL_PER_BLOCK + tl.arange(0, ROWS).to(tl.int64), sample, k0, k1)
    n0, n1 = box_muller(x0, x1)
    n2, n3 = box_muller(x2, x3)
    return n0, n1, n2, n3


@triton.jit
def interleave_lanes(a0, a1, a2, a3, BLOCK: tl.constexpr):
    """``[BLOCK]`` with element ``4 r + l`` = lane ``l`` of row ``r``.

    ``join`` adds a minor axis inside each thread: ``[r, q, p]`` = lane ``2 q + p``, so the four lanes
    of a block stay in the thread that computed them and the reshape moves nothing.
    """
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [BLOCK])


@triton.jit
def rademacher_words(start, sample, k0, k1, WORDS: tl.constexpr):
    """Word ``i`` (uint32, ``[WORDS]``) = word ``i % 4`` of Philox block ``start // 128 + i // 4``.

    The four threads holding a block's words each run the whole Philox call: one call per 32 signs,
    which costs less than moving words between threads.
    """
    i = tl.arange(0, WORDS)
    x0, x1, x2, x3 = block_words(start // RADEMACHER_PER_BLOCK + (i // 4).to(tl.int64), sample, k0, k1)
    w = i % 4
    return tl.where(w == 0, x0, tl.where(w == 1, x1, tl.where(w == 2, x2, x3)))


@triton.jit
def word_bits(word):
    """``[32, W]``: ``[t, i]`` = bit ``t`` of ``word[i]``.

    The bits run along the *major* axis: Triton's default layout spreads the minor axis (the words)
    over the threads and repeats the major one in each thread's registers, so a word's 32 bits stay
    in the thread that generated it, in every op that follows, without a layout conversion.
    """
    return (word[None, :] >> tl.arange(0, 32).to(tl.uint32)[:, None]) & 1


@triton.jit
def bits_tile(x, BLOCK: tl.constexpr):
    """The ``[BLOCK]`` tile of a ``[32, W]`` tensor laid out like :func:`word_bits`: ``32 i + t`` is ``x[t, i]``."""
    return tl.reshape(tl.trans(x), [BLOCK])


@triton.jit
def pinned_words(word):
    """``word`` ([W] uint32) unchanged, as the sum over a size-1 axis: a value Triton moves, never regenerates.

    A tile of signs meets a vector-load layout (4 elements a thread, threads side by side) when it
    is added to loaded data. Triton's layout pass would rather regenerate the words in that layout,
    one Philox call per vector (8 a thread); it does not rematerialize through a reduction, so with
    this the one word each thread made crosses threads through shared memory instead (Triton 3.6 and 3.9).
    """
    return tl.sum(word[:, None], axis=1)


@triton.jit
def sign_values(bits):
    """float32 ``+1`` where ``bits`` is set, ``-1`` where not."""
    return tl.where(bits != 0, 1.0, -1.0).to(tl.float32)


@triton.jit
def stream_tile(start, sample, k0, k1, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """float32 values ``[BLOCK]`` of the flat elements ``start + i`` of ``sample``.

    ``start`` (int64) must be a multiple of the stream's block length P (4 or 128): the tile is
    ``BLOCK // P`` whole Philox blocks, each generated once.
    """
    if STREAM == NORMAL:
        n0, n1, n2, n3 = normal_lanes(start, sample, k0, k1, BLOCK // NORMAL_PER_BLOCK)
        z = interleave_lanes(n0, n1, n2, n3, BLOCK)
    else:
        word = pinned_words(rademacher_words(start, sample, k0, k1, BLOCK // 32))
        z = bits_tile(sign_values(word_bits(word)), BLOCK)
    return z
