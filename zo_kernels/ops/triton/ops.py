"""Triton kernels for the fused noise operations, and their launchers.

Every noise kernel tiles the *global* flat index space: program ``p`` owns the ``BLOCK`` elements
``j = (offset // BLOCK + p) * BLOCK + i`` (``BLOCK`` a multiple of every stream's block length), so a
tile holds whole Philox blocks and each block is generated once per sample; elements outside
``[offset, offset + n)`` are masked. Each thread generates one Philox block (normal: 4 values) or
one word of one (rademacher: 32 values) per sample and keeps them: :data:`CONFIGS` sizes the tiles
so. Integer arguments carry type annotations (``tl.int64`` sizes and offsets, ``tl.uint32`` seed
words and ids), so one compiled kernel serves every value; the seed goes in as two uint32 halves,
and float64 scalars (scale, lr) as their int64 bit pattern, so nothing is rounded to float32 on the way.

``reduce`` / ``step`` loop over the samples inside each program, in order, accumulating in
registers (float32, float64 for float64 parameters), one fma per sample. When a tensor has too few
tiles to fill a GPU, :func:`sample_splits` cuts the samples into ``K`` contiguous chunks: program
``(p, c)`` writes chunk ``c``'s sums to row ``c`` of a ``K x n`` workspace and a second kernel adds
the rows in order ``c = 0 .. K - 1`` before applying them. ``K`` depends on ``(num, n, stream)``
alone, so every result is bitwise identical run to run and on any GPU. Launchers take tensors that
:mod:`.backend` has validated.
"""

from __future__ import annotations

import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

from .philox import (
    INTERPRET,
    MAX_PER_BLOCK,
    NORMAL,
    NORMAL_PER_BLOCK,
    STREAM_IDS,
    bits_tile,
    interleave_lanes,
    normal_lanes,
    philox4x32_10,
    rademacher_words,
    sign_values,
    split_block,
    stream_tile,
    word_bits,
)

__all__ = ["INTERPRET", "CONFIGS", "sample_splits", "perturb", "perturb_rows", "accumulate", "squared_norms"]

#: Stream values one thread generates per sample: a Philox block of normals, a word of signs.
ELEMENTS_PER_THREAD = {STREAM_IDS["normal"]: 4, STREAM_IDS["rademacher"]: 32}
#: Warps per program of every kernel.
NUM_WARPS = 4
#: (BLOCK, num_warps) per stream id: fixed, not tuned. The kernels are compute-bound and every
#: thread does the same work in any tile, so timing configs per size bought nothing but a tuning
#: run (several device-synchronized launches) for each new size and dtype.
CONFIGS = {sid: (per * 32 * NUM_WARPS, NUM_WARPS) for sid, per in ELEMENTS_PER_THREAD.items()}
#: Tile of the kernel that adds the partial sums of a split reduce (8 elements a thread).
FINISH_BLOCK = 1024
#: Tile size and grid of the squared-norm partial sums: fixed, so that the summation order, hence
#: the float64 result, is the same on every run.
NORM_BLOCK = CONFIGS[STREAM_IDS["normal"]][0]
NORM_PROGRAMS = 1024
WORDS_BLOCK = 128
#: Pinned instead of left to Triton's default (which Triton 3.9 warns may change): ``a * b + c``
#: is one fma, as in the CUDA and C++ kernels. The accumulations are written as ``tl.fma`` anyway.
FP_FUSION = True

#: The sample split (:func:`sample_splits`): the numbers of the CUDA backend (csrc/cuda/kernels.cu),
#: fixed, never the device's, because the chunks fix the summation order. Threads aimed at: an
#: H100/H200 (132 SMs x 2048 threads) full once.
SPLIT_THREADS = 132 * 2048
#: Fewest samples per chunk: shorter chunks would spend more on the workspace than they win.
MIN_CHUNK_SAMPLES = 16
#: Most workspace elements: 64 MiB of float64 partial sums.
MAX_WORKSPACE_ELEMENTS = (64 << 20) // 8
#: The largest second grid dimension: ``perturb_rows`` launches once per this many samples, and a
#: reduce splits its samples into at most this many chunks.
MAX_GRID_Y = 65535

assert all(block % MAX_PER_BLOCK == 0 for block, _ in CONFIGS.values())

# Integer arguments are annotated; specializing on their values (divisibility by 16, equality to 1)
# would only multiply compilations, so every one is exempt.
_INTS = ("n", "n_units", "offset_units", "seed_lo", "seed_hi", "sample", "scale_bits", "base", "extra", "chunks",
         "tiles", "block0", "c2", "c3")  # fmt: skip


def _jit(fn):
    """``triton.jit`` with every integer argument of ``fn`` named in :data:`_INTS` left unspecialized."""
    params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[a for a in params if a in _INTS])


def sample_splits(num: int, n: int, stream: int) -> int:
    """How many contiguous chunks a reduce/step over ``num`` samples of an ``n``-element tensor uses.

    0 when there is nothing to do, 1 for one kernel looping over all samples per tile, ``K >= 2`` for
    ``K`` partial sums (in parallel over ``program_id(1)``) added in chunk order by a second kernel.
    ``K = min(SPLIT_THREADS // ceil(n / G), num // MIN_CHUNK_SAMPLES, MAX_WORKSPACE_ELEMENTS // n,
    MAX_GRID_Y)``, at least 1, with ``G`` the values per thread of ``stream`` (normal 4, rademacher 32):
    the rule of the CUDA backend, a pure function of ``(num, n, stream)`` so that the summation order
    is the same on every device.
    """
    if num <= 0 or n <= 0:
        return 0
    threads = triton.cdiv(n, ELEMENTS_PER_THREAD[stream])
    return max(1, min(SPLIT_THREADS // threads, num // MIN_CHUNK_SAMPLES, MAX_WORKSPACE_ELEMENTS // n, MAX_GRID_Y))


def chunk_bounds(num: int, chunks: int, c: int) -> Tuple[int, int]:
    """Samples ``[lo, hi)`` of chunk ``c``: ``chunks`` near-equal chunks, the first ``num % chunks`` one longer."""
    base, extra = divmod(num, chunks)
    lo = c * base + min(c, extra)
    return lo, lo + base + (c < extra)


def _words(seed: int):
    return seed & 0xFFFFFFFF, seed >> 32


def _f64_bits(x: float) -> int:
    """The IEEE-754 bit pattern of float64 ``x`` as a signed int64 (decoded by :func:`_f64`)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _units(x, ALIGN: tl.constexpr):
    """``x * ALIGN`` as int64: sizes and offsets arrive in units of ``ALIGN`` elements (see :func:`_align`).

    A product by a constant is a multiple of it for Triton's alignment analysis, where a
    ``tl.multiple_of`` hint on an argument is not kept; it lets whole runs move as vectors.
    """
    return x.to(tl.int64) * ALIGN


@triton.jit
def _tile(offset, n, BLOCK: tl.constexpr):
    """The tile of this program: ``(start, pos0, i, mask)``; element ``i`` is global ``start + i``, tensor ``pos0 + i``.

    ``start`` and ``pos0`` are int64 scalars, the in-tile positions ``i`` and their bounds int32: each
    element's address and mask then cost 32-bit arithmetic, not 64-bit.
    """
    start = (offset // BLOCK + tl.program_id(0).to(tl.int64)) * BLOCK
    pos0 = start - offset
    lo = tl.minimum(tl.maximum(-pos0, 0), BLOCK).to(tl.int32)
    hi = tl.minimum(tl.maximum(n - pos0, 0), BLOCK).to(tl.int32)
    i = tl.arange(0, BLOCK)
    return start, pos0, i, (i >= lo) & (i < hi)


@triton.jit
def _apply(ptrs, mask, total, scale_bits, STEP: tl.constexpr):
    """``*ptrs += total`` (reduce) or ``*ptrs = fma(-lr, total, *ptrs)`` (step, lr in ``scale_bits``), rounded once."""
    data = tl.load(ptrs, mask=mask).to(total.dtype)
    if STEP:
        data = tl.fma(-_f64(scale_bits).to(total.dtype), total, data)
    else:
        data = data + total
    tl.store(ptrs, data.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _weight(weights_ptr, ids_ptr, s, ACC: tl.constexpr):
    """Weight and uint32 id of sample ``s``; the weight is NaN for an id outside ``[0, 2**32)`` (poison, not wrap)."""
    sample_id = tl.load(ids_ptr + s)
    w = tl.load(weights_ptr + s).to(ACC)
    w = tl.where((sample_id >= 0) & (sample_id < 4294967296), w, float("nan")).to(ACC)
    return w, sample_id.to(tl.uint32)


@triton.jit
def _chunk_sum(weights_ptr, ids_ptr, lo, hi, start, k0, k1, STREAM: tl.constexpr, ACC: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """``[BLOCK]`` sums ``(((+0 + w_lo z_lo) + ...) + w_{hi-1} z_{hi-1})`` over the tile at ``start``, one fma each.

    The sums stay in the layout the noise is generated in (per-lane rows for normals, ``[bit, word]``
    for signs), so the loop moves nothing between threads; the tile is assembled once, after it.
    """
    if STREAM == NORMAL:
        R: tl.constexpr = BLOCK // NORMAL_PER_BLOCK
        a0 = tl.zeros([R], ACC)
        a1 = tl.zeros([R], ACC)
        a2 = tl.zeros([R], ACC)
        a3 = tl.zeros([R], ACC)
        for s in range(lo, hi):
            w, sample = _weight(weights_ptr, ids_ptr, s, ACC)
            n0, n1, n2, n3 = normal_lanes(start, sample, k0, k1, R)
            a0 = tl.fma(w, n0.to(ACC), a0)
            a1 = tl.fma(w, n1.to(ACC), a1)
            a2 = tl.fma(w, n2.to(ACC), a2)
            a3 = tl.fma(w, n3.to(ACC), a3)
        total = interleave_lanes(a0, a1, a2, a3, BLOCK)
    else:
        W: tl.constexpr = BLOCK // 32
        acc = tl.zeros([32, W], ACC)
        for s in range(lo, hi):
            w, sample = _weight(weights_ptr, ids_ptr, s, ACC)
            z = sign_values(word_bits(rademacher_words(start, sample, k0, k1, W)))
            acc = tl.fma(w, z.to(ACC), acc)
        total = bits_tile(acc, BLOCK)
    return total


@_jit
def _perturb_kernel(
    out_ptr, theta_ptr, ids_ptr, scales_ptr, n_units: tl.int64, offset_units: tl.int64, seed_lo: tl.uint32,
    seed_hi: tl.uint32, sample: tl.uint32, scale_bits: tl.int64,
    ROWS: tl.constexpr, SIGNS: tl.constexpr, STREAM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """``out = fma(scale, z, theta)`` for one sample, or for each sample of a batch.

    ``ROWS=False``: sample ``sample``, scale ``scale_bits``. ``ROWS=True``: sample ``ids_ptr[i]`` with
    ``i = program_id(1)``, ``SIGNS`` rows scaled by ``scales_ptr[i * SIGNS + s]`` from one noise tile.
    """
    n = _units(n_units, ALIGN)
    start, pos0, k, mask = _tile(_units(offset_units, ALIGN), n, BLOCK)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    theta = tl.load(theta_ptr + pos0 + k, mask=mask).to(ACC)
    if ROWS:
        i = tl.program_id(1).to(tl.int64)
        sample_id = tl.load(ids_ptr + i)
        valid = (sample_id >= 0) & (sample_id < 4294967296)  # an id out of range poisons its rows
        z = stream_tile(start, sample_id.to(tl.uint32), k0, k1, STREAM, BLOCK).to(ACC)
        for s in tl.static_range(SIGNS):
            scale = tl.where(valid, tl.load(scales_ptr + i * SIGNS + s), float("nan")).to(ACC)
            row = out_ptr + ((i * SIGNS + s) * n + pos0)
            tl.store(row + k, tl.fma(scale, z, theta).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        z = stream_tile(start, sample.to(tl.uint32), k0, k1, STREAM, BLOCK).to(ACC)
        out = tl.fma(_f64(scale_bits).to(ACC), z, theta)
        tl.store(out_ptr + pos0 + k, out.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _accumulate_kernel(
    out_ptr, weights_ptr, ids_ptr, n_units: tl.int64, offset_units: tl.int64, seed_lo: tl.uint32,
    seed_hi: tl.uint32, base: tl.int64, extra: tl.int64, scale_bits: tl.int64,
    STREAM: tl.constexpr, ACC: tl.constexpr, STEP: tl.constexpr, PARTIAL: tl.constexpr, BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """The sums over samples chunk ``c = program_id(1)`` (see :func:`chunk_bounds`, ``base, extra = divmod(num, K)``).

    ``PARTIAL=False`` (one chunk): ``data += sum`` (reduce) or ``data = fma(-lr, sum, data)`` (step) on
    ``out_ptr``. ``PARTIAL=True``: row ``c`` of the ``K x n`` workspace ``out_ptr`` = the chunk's sums.
    """
    n = _units(n_units, ALIGN)
    start, pos0, k, mask = _tile(_units(offset_units, ALIGN), n, BLOCK)
    c = tl.program_id(1).to(tl.int64)
    extra = extra.to(tl.int64)
    lo = c * base.to(tl.int64) + tl.minimum(c, extra)
    hi = lo + base.to(tl.int64) + (c < extra).to(tl.int64)
    total = _chunk_sum(weights_ptr, ids_ptr, lo, hi, start, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32),
                       STREAM, ACC, BLOCK)  # fmt: skip
    if PARTIAL:
        tl.store(out_ptr + (c * n + pos0) + k, total, mask=mask)
    else:
        _apply(out_ptr + pos0 + k, mask, total, scale_bits, STEP)


@_jit
def _finish_kernel(data_ptr, ws_ptr, n_units: tl.int64, chunks: tl.int64, scale_bits: tl.int64,
                   STEP: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """``data += ((ws[0] + ws[1]) + ...) + ws[K - 1]`` (reduce) or ``data = fma(-lr, that, data)`` (step)."""
    n = _units(n_units, ALIGN)
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    total = tl.load(ws_ptr + k, mask=mask)
    for c in range(1, chunks):
        total += tl.load(ws_ptr + c * n + k, mask=mask)
    _apply(data_ptr + k, mask, total, scale_bits, STEP)


@triton.jit
def _squares(z, pos, n):
    return tl.where(pos < n, z.to(tl.float64) * z.to(tl.float64), 0.0)


@_jit
def _squared_norms_kernel(partial_ptr, ids_ptr, n: tl.int64, tiles: tl.int64, seed_lo: tl.uint32,
                          seed_hi: tl.uint32, BLOCK: tl.constexpr):  # fmt: skip
    """``partial[i, g] = sum of z_i(j)**2`` (float64, normal stream) over the tiles ``g, g + G, ...`` of ``[0, n)``.

    NaN for an id outside ``[0, 2**32)``.
    """
    g = tl.program_id(1)
    programs = tl.num_programs(1)
    sample_id = tl.load(ids_ptr + tl.program_id(0))
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    R: tl.constexpr = BLOCK // NORMAL_PER_BLOCK
    first = tl.arange(0, R).to(tl.int64) * NORMAL_PER_BLOCK
    acc = tl.zeros([R], dtype=tl.float64)
    for t in range(g, tiles, programs):
        start = tl.cast(t, tl.int64) * BLOCK  # t is a Python int in the interpreter
        n0, n1, n2, n3 = normal_lanes(start, sample_id.to(tl.uint32), k0, k1, R)
        pos = start + first
        acc += ((_squares(n0, pos, n) + _squares(n1, pos + 1, n)) + _squares(n2, pos + 2, n)) + _squares(n3, pos + 3, n)
    total = tl.where((sample_id >= 0) & (sample_id < 4294967296), tl.sum(acc, axis=0), float("nan"))
    tl.store(partial_ptr + tl.program_id(0) * programs + g, total)


@_jit
def _words_kernel(out_ptr, n: tl.int64, block0: tl.int64, c2: tl.uint32, c3: tl.uint32, seed_lo: tl.uint32,
                  seed_hi: tl.uint32, BLOCK: tl.constexpr):  # fmt: skip
    """Philox words of counters ``(b & 0xffffffff, b >> 32, c2, c3)`` for ``b = block0 + i``, ``i < n``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c0, c1 = split_block(block0.to(tl.int64) + i)
    zero = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2.to(tl.uint32) + zero, c3.to(tl.uint32) + zero, k0, k1)
    mask = i < n
    tl.store(out_ptr + 4 * i, x0, mask=mask)
    tl.store(out_ptr + 4 * i + 1, x1, mask=mask)
    tl.store(out_ptr + 4 * i + 2, x2, mask=mask)
    tl.store(out_ptr + 4 * i + 3, x3, mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _align(offset: int, n: int, dtype: torch.dtype) -> int:
    """The elements of ``dtype`` in 16 bytes when ``offset`` and ``n`` are multiples of it (vector loads), else 1."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return vec if offset % vec == 0 and n % vec == 0 else 1


def _tiles(offset: int, n: int, block: int) -> int:
    return triton.cdiv(offset % block + n, block)


def perturb(out: torch.Tensor, theta: torch.Tensor, stream: int, seed: int, sample_id: int, scale: float, offset: int):
    """``out = theta + scale * z(seed, sample_id, offset + j)``; contiguous tensors on one device."""
    n = theta.numel()
    if n == 0:
        return
    lo, hi = _words(seed)
    block, warps = CONFIGS[stream]
    align = _align(offset, n, theta.dtype)
    _perturb_kernel[(_tiles(offset, n, block),)](
        out, theta, out, out, n // align, offset // align, lo, hi, sample_id, _f64_bits(scale),
        ROWS=False, SIGNS=1, STREAM=stream, ACC=_acc(theta.dtype), BLOCK=block, ALIGN=align,
        num_warps=warps, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def perturb_rows(
    out: torch.Tensor, theta: torch.Tensor, stream: int, seed: int, ids: torch.Tensor, scales: torch.Tensor, offset: int
):
    """Row ``i * signs + s`` of ``out`` = ``theta + scales[i, s] * z(seed, ids[i], offset + j)``.

    ``ids`` (int64) and ``scales`` (float64, ``(num, signs)``) are on ``theta``'s device; one launch
    per :data:`MAX_GRID_Y` samples, each program generating its tile's noise once for all its rows.
    """
    n, (num, signs) = theta.numel(), scales.shape
    if n == 0 or num == 0:
        return
    lo, hi = _words(seed)
    block, warps = CONFIGS[stream]
    align = _align(offset, n, theta.dtype)
    for first in range(0, num, MAX_GRID_Y):
        count = min(MAX_GRID_Y, num - first)
        _perturb_kernel[(_tiles(offset, n, block), count)](
            out[first * signs :], theta, ids[first:], scales[first:], n // align, offset // align, lo, hi, 0, 0,
            ROWS=True, SIGNS=signs, STREAM=stream, ACC=_acc(theta.dtype), BLOCK=block, ALIGN=align,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def accumulate(data: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stream: int, seed: int, offset: int,
               lr=None, splits=None):  # fmt: skip
    """``data += sum_k weights[k] z_k`` (``lr`` None) or ``data -= lr * sum_k weights[k] z_k``, in place.

    The samples are cut into :func:`sample_splits` chunks (``splits`` forces the count, for tests).
    """
    n, num = data.numel(), ids.numel()
    chunks = sample_splits(num, n, stream) if splits is None else min(int(splits), num, MAX_GRID_Y)
    if n == 0 or chunks <= 0:
        return
    acc = _acc_dtype(data.dtype)
    weights = weights.to(acc)
    lo, hi = _words(seed)
    block, warps = CONFIGS[stream]
    lr_bits = _f64_bits(0.0 if lr is None else lr)
    base, extra = divmod(num, chunks)
    out = data if chunks == 1 else torch.empty((chunks, n), dtype=acc, device=data.device)
    align = _align(offset, n, out.dtype)
    _accumulate_kernel[(_tiles(offset, n, block), chunks)](
        out, weights, ids, n // align, offset // align, lo, hi, base, extra, lr_bits,
        STREAM=stream, ACC=_acc(data.dtype), STEP=lr is not None and chunks == 1, PARTIAL=chunks > 1, BLOCK=block,
        ALIGN=align, num_warps=warps, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    if chunks > 1:
        align = _align(0, n, data.dtype)
        _finish_kernel[(triton.cdiv(n, FINISH_BLOCK),)](
            data, out, n // align, chunks, lr_bits, STEP=lr is not None, BLOCK=FINISH_BLOCK, ALIGN=align,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def squared_norms(ids: torch.Tensor, stream: int, seed: int, n: int) -> torch.Tensor:
    """float64 ``sum_{j < n} z(seed, i, j)**2`` per id, on ``ids.device``, in a fixed order.

    NaN for an id outside ``[0, 2**32)``.
    """
    num = ids.numel()
    if num == 0 or n == 0:
        return torch.zeros(num, dtype=torch.float64, device=ids.device)
    if stream != STREAM_IDS["normal"]:  # every sign squares to exactly 1: the sum is n, exact in float64
        valid = (ids >= 0) & (ids < 2**32)
        return torch.where(valid, float(n), float("nan")).to(torch.float64)
    tiles = triton.cdiv(n, NORM_BLOCK)
    programs = min(tiles, NORM_PROGRAMS)
    partial = torch.empty((num, programs), dtype=torch.float64, device=ids.device)
    lo, hi = _words(seed)
    _squared_norms_kernel[(num, programs)](
        partial, ids, n, tiles, lo, hi, BLOCK=NORM_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION
    )
    return partial.sum(dim=1)


def philox_blocks(block0: int, blocks: int, c2: int, c3: int, seed: int, device: torch.device) -> torch.Tensor:
    """Philox4x32-10 words of ``blocks`` consecutive block counters, as int64 of shape (blocks, 4)."""
    out = torch.empty((blocks, 4), dtype=torch.int64, device=device)
    if blocks:
        lo, hi = _words(seed)
        _words_kernel[(triton.cdiv(blocks, WORDS_BLOCK),)](
            out, blocks, block0, c2, c3, lo, hi, BLOCK=WORDS_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION
        )
    return out
