"""Triton kernels for the fused noise operations, and their launchers.

Every kernel tiles the *global* flat index space: program ``p`` owns the ``BLOCK`` elements
``j = (offset // BLOCK + p) * BLOCK + i`` (``BLOCK`` a multiple of every stream's block length), so a
tile holds whole Philox blocks and each block is generated once per sample; elements outside
``[offset, offset + n)`` are masked. Index math is int64, the seed goes in as two uint32 halves,
and float64 scalars (scale, lr) as their int64 bit pattern, so nothing is rounded to float32 on the way.

``reduce`` / ``step`` loop over the samples inside each program, in order, accumulating in
registers (float32, float64 for float64 parameters): one read of every weight and id per program,
one read-modify-write of the data, and a fixed summation order, so results are bitwise identical
run to run and for any tile size. Launchers take tensors that :mod:`.backend` has validated.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .philox import INTERPRET, MAX_PER_BLOCK, philox4x32_10, split_block, stream_tile, tile_index

#: Tile size and grid of the squared-norm partial sums: fixed (not tuned) so that the summation
#: order, hence the float64 result, is the same on every run.
NORM_BLOCK = 1024
NORM_PROGRAMS = 1024
WORDS_BLOCK = 128

# Index, seed and scalar arguments take any value: specializing on them (divisibility by 16,
# equality to 1) would only multiply compilations, so every integer argument is exempt.
_INTS = ("n", "offset", "seed_lo", "seed_hi", "sample", "scale_bits", "num", "tiles", "block0", "c2", "c3")


def _jit(fn):
    """``triton.jit`` with every integer argument of ``fn`` named in :data:`_INTS` left unspecialized."""
    params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[a for a in params if a in _INTS])


def _small_tiles_for_small_n(configs, named_args, **kwargs):
    """Only tiles no larger than ``n`` are worth timing: a tensor that fits one tile is not tuned."""
    fitting = [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]]
    return fitting or configs[:1]


def gpu_configs():
    """The (tile size, warps) configs the autotuned kernels are timed with on a GPU."""
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((256, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8))
    ]


def _autotune(restore):
    """Tile size and warps tuned per (n, stream, tensor dtypes) on GPUs; one fixed config in the interpreter.

    The tile size never changes a result (every element's arithmetic is the same in any tile).
    ``restore`` names the tensors the kernel writes in place: tuning runs it several times and must
    leave them as they were.
    """
    # timing the interpreter means nothing and costs much
    configs = [triton.Config({"BLOCK": 2048}, num_warps=1)] if INTERPRET else gpu_configs()
    assert all(c.kwargs["BLOCK"] % MAX_PER_BLOCK == 0 for c in configs)
    return triton.autotune(
        configs=configs,
        key=["n", "STREAM"],
        restore_value=restore,
        prune_configs_by={"early_config_prune": _small_tiles_for_small_n},
    )


def _words(seed: int):
    return seed & 0xFFFFFFFF, seed >> 32


def _f64_bits(x: float) -> int:
    """The IEEE-754 bit pattern of float64 ``x`` as a signed int64 (decoded by :func:`_f64`)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _tile(offset, n, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """First global index of this program's tile, and the tensor positions / mask of its elements."""
    offset = offset.to(tl.int64)
    start = (offset // BLOCK + tl.program_id(0)) * BLOCK
    k = start + tile_index(STREAM, BLOCK) - offset
    return start, k, (k >= 0) & (k < n.to(tl.int64))


@_autotune(restore=["out_ptr"])
@_jit
def _perturb_kernel(
    out_ptr, theta_ptr, ids_ptr, scales_ptr, n, offset, seed_lo, seed_hi, sample, scale_bits,
    ROWS: tl.constexpr, SIGNS: tl.constexpr, STREAM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out = theta + scale * z`` for one sample, or for each sample of a batch.

    ``ROWS=False``: sample ``sample``, scale ``scale_bits``. ``ROWS=True``: sample ``ids_ptr[i]`` with
    ``i = program_id(1)``, ``SIGNS`` rows scaled by ``scales_ptr[i * SIGNS + s]`` from one noise tile.
    """
    start, k, mask = _tile(offset, n, STREAM, BLOCK)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    theta = tl.load(theta_ptr + k, mask=mask).to(ACC)
    if ROWS:
        i = tl.program_id(1).to(tl.int64)
        sample_id = tl.load(ids_ptr + i)
        valid = (sample_id >= 0) & (sample_id < 4294967296)  # an id out of range poisons its rows
        z = stream_tile(start, sample_id.to(tl.uint32), k0, k1, STREAM, BLOCK).to(ACC)
        for s in tl.static_range(SIGNS):
            scale = tl.where(valid, tl.load(scales_ptr + i * SIGNS + s), float("nan")).to(ACC)
            row = out_ptr + (i * SIGNS + s) * n.to(tl.int64)
            tl.store(row + k, (theta + scale * z).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        z = stream_tile(start, sample.to(tl.uint32), k0, k1, STREAM, BLOCK)
        out = theta + _f64(scale_bits).to(ACC) * z.to(ACC)
        tl.store(out_ptr + k, out.to(out_ptr.dtype.element_ty), mask=mask)


@_autotune(restore=["data_ptr"])
@_jit
def _accumulate_kernel(
    data_ptr, weights_ptr, ids_ptr, num, n, offset, seed_lo, seed_hi, scale_bits,
    STREAM: tl.constexpr, ACC: tl.constexpr, STEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``data += sum_s w_s z_s`` (reduce) or ``data -= lr * sum_s w_s z_s`` (step, lr in scale_bits)."""
    start, k, mask = _tile(offset, n, STREAM, BLOCK)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    acc = tl.zeros(k.shape, dtype=ACC)
    for s in range(num):
        w = tl.load(weights_ptr + s).to(ACC)
        z = stream_tile(start, tl.load(ids_ptr + s).to(tl.uint32), k0, k1, STREAM, BLOCK)
        acc += w * z.to(ACC)
    data = tl.load(data_ptr + k, mask=mask).to(ACC)
    if STEP:
        data = data - _f64(scale_bits).to(ACC) * acc
    else:
        data = data + acc
    tl.store(data_ptr + k, data.to(data_ptr.dtype.element_ty), mask=mask)


@_jit
def _squared_norms_kernel(partial_ptr, ids_ptr, n, tiles, seed_lo, seed_hi, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """``partial[i, g] = sum of z_i(j)**2`` (float64) over the tiles ``g, g + G, ...`` of ``[0, n)``."""
    g = tl.program_id(1)
    programs = tl.num_programs(1)
    sample = tl.load(ids_ptr + tl.program_id(0)).to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    pos = tile_index(STREAM, BLOCK)
    acc = tl.zeros(pos.shape, dtype=tl.float64)
    for t in range(g, tiles, programs):
        start = tl.cast(t, tl.int64) * BLOCK  # t is a Python int in the interpreter
        z = stream_tile(start, sample, k0, k1, STREAM, BLOCK).to(tl.float64)
        acc += tl.where(start + pos < n, z * z, 0.0)
    tl.store(partial_ptr + tl.program_id(0) * programs + g, tl.sum(tl.sum(tl.sum(acc, axis=2), axis=1), axis=0))


@_jit
def _words_kernel(out_ptr, n, block0, c2, c3, seed_lo, seed_hi, BLOCK: tl.constexpr):
    """Philox words of counters ``(b & 0xffffffff, b >> 32, c2, c3)`` for ``b = block0 + i``, ``i < n``."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
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


def _grid(offset: int, n: int):
    return lambda meta: (triton.cdiv(offset % meta["BLOCK"] + n, meta["BLOCK"]),)


def perturb(out: torch.Tensor, theta: torch.Tensor, stream: int, seed: int, sample_id: int, scale: float, offset: int):
    """``out = theta + scale * z(seed, sample_id, offset + j)``; contiguous tensors on one device."""
    n = theta.numel()
    if n == 0:
        return
    lo, hi = _words(seed)
    _perturb_kernel[_grid(offset, n)](
        out, theta, out, out, n, offset, lo, hi, sample_id, _f64_bits(scale),
        ROWS=False, SIGNS=1, STREAM=stream, ACC=_acc(theta.dtype),
    )  # fmt: skip


#: The largest second grid dimension: ``perturb_rows`` launches once per this many samples.
MAX_GRID_Y = 65535


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
    for first in range(0, num, MAX_GRID_Y):
        count = min(MAX_GRID_Y, num - first)

        def grid(meta, count=count):
            return (triton.cdiv(offset % meta["BLOCK"] + n, meta["BLOCK"]), count)

        _perturb_kernel[grid](
            out[first * signs :], theta, ids[first:], scales[first:], n, offset, lo, hi, 0, 0,
            ROWS=True, SIGNS=signs, STREAM=stream, ACC=_acc(theta.dtype),
        )  # fmt: skip


def accumulate(data: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stream: int, seed: int, offset: int,
               lr=None):  # fmt: skip
    """``data += sum_k weights[k] z_k`` (``lr`` None) or ``data -= lr * sum_k weights[k] z_k``, in place."""
    n, num = data.numel(), ids.numel()
    if n == 0 or num == 0:
        return
    lo, hi = _words(seed)
    _accumulate_kernel[_grid(offset, n)](
        data, weights, ids, num, n, offset, lo, hi, _f64_bits(0.0 if lr is None else lr),
        STREAM=stream, ACC=_acc(data.dtype), STEP=lr is not None,
    )  # fmt: skip


def squared_norms(ids: torch.Tensor, stream: int, seed: int, n: int) -> torch.Tensor:
    """float64 ``sum_{j < n} z(seed, i, j)**2`` per id, on ``ids.device``, in a fixed order."""
    num = ids.numel()
    if num == 0 or n == 0:
        return torch.zeros(num, dtype=torch.float64, device=ids.device)
    tiles = triton.cdiv(n, NORM_BLOCK)
    programs = min(tiles, NORM_PROGRAMS)
    partial = torch.empty((num, programs), dtype=torch.float64, device=ids.device)
    lo, hi = _words(seed)
    _squared_norms_kernel[(num, programs)](partial, ids, n, tiles, lo, hi, STREAM=stream, BLOCK=NORM_BLOCK)
    return partial.sum(dim=1)


def philox_blocks(block0: int, blocks: int, c2: int, c3: int, seed: int, device: torch.device) -> torch.Tensor:
    """Philox4x32-10 words of ``blocks`` consecutive block counters, as int64 of shape (blocks, 4)."""
    out = torch.empty((blocks, 4), dtype=torch.int64, device=device)
    if blocks:
        lo, hi = _words(seed)
        _words_kernel[(triton.cdiv(blocks, WORDS_BLOCK),)](out, blocks, block0, c2, c3, lo, hi, BLOCK=WORDS_BLOCK)
    return out
