"""Triton kernels for the low-rank operations, and their launchers.

``lowrank_perturb``: ``out = theta + scale * (a @ b.T)`` with ``a`` ``(m, r)``, ``b`` ``(n, r)``, ``r``
small (one sample's factors); ``lowrank_accumulate``: ``data += alpha * a @ diag(weights) @ b.T`` with
``K = samples * rank`` columns, possibly thousands. Both are one kernel, :func:`_lowrank_kernel`:
program ``p`` owns a ``BLOCK_M x BLOCK_N`` tile of the ``(m, n)`` output, forms its product over a
loop of ``BLOCK_K`` columns of the factors with ``tl.dot`` in the accumulation dtype (float32,
float64 for float64 matrices; the columns of ``a`` scaled by their weights first, rounded in that
dtype as in the reference), then reads the tile of ``theta`` (``data``) once and writes
``fma(scale, product, theta)`` rounded once into ``out``: no ``m x n`` temporary, one pass over the
matrix. In place (``out`` is ``theta``) is safe: every element is read and written by the one
program that owns it.

The two launchers differ only in their fixed configuration (:data:`PERTURB_CONFIG`,
:data:`ACCUMULATE_CONFIG`): a perturb's ``r`` is a few columns, so its K block is the smallest
``tl.dot`` takes (16), the unused columns masked to zero; an accumulate's K loop is the work, so it
takes 32 columns a step. The configs are fixed, not tuned, like those of :mod:`.ops`: a tuning run
would cost device-synchronized launches per new shape, and the variants compiled by
``tests/test_triton_compile.py`` are then exactly those launched. Sizes are ``tl.int64`` arguments
(never specialized on their values); the row length arrives in units of ``ALIGN`` elements so the
tile rows of the matrices move as 16-byte vectors when their length allows (see :func:`.ops._units`).
Launchers take tensors that :mod:`.backend` has validated (:mod:`..operations`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .ops import FP_FUSION, _acc, _align, _f64, _f64_bits, _units

__all__ = ["ACCUMULATE_CONFIG", "PERTURB_CONFIG", "Config", "lowrank_accumulate", "lowrank_perturb"]


class Config(NamedTuple):
    """A fixed launch configuration of :func:`_lowrank_kernel`."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int


#: 64 x 64 output tiles on 8 warps (16 accumulators a thread). Chosen from sm_90 compiles, not
#: timings: 104-130 registers and no spill in every dtype, so two programs (16 warps) an SM (one
#: for float64 past 128 registers); 4 warps take 170-230 registers for the same tile, 128-row tiles
#: 180-255 (float64 spills at 128 x 128). K block 16: the fewest columns tl.dot takes, so r = 1 .. 16
#: is one step.
PERTURB_CONFIG = Config(64, 64, 16, 8, 8)
#: The same tile, 32 factor columns a K step (half the loop overhead and barriers per product; 128
#: registers, 144 for float64 with aligned rows). GROUP_M = 8 row tiles in a row share each column
#: band of ``b`` while it is in L2 (the launch order of Triton's matmul tutorial).
ACCUMULATE_CONFIG = Config(64, 64, 32, 8, 8)


# Every integer argument is annotated and left unspecialized (as in .ops): a size that happens to be 1 or a
# multiple of 16 must not select another compiled kernel.
@triton.jit(do_not_specialize=["m", "n_units", "k", "scale_bits"])
def _lowrank_kernel(
    out_ptr, theta_ptr, a_ptr, b_ptr, w_ptr, m: tl.int64, n_units: tl.int64, k: tl.int64, scale_bits: tl.int64,
    ACC: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """``out[tile] = fma(scale, (a @ diag(w) @ b.T)[tile], theta[tile])``, the product in ``ACC``, rounded once.

    ``a`` is ``(m, k)``, ``b`` ``(n, k)``, float32, row-major; ``w`` ``(k,)`` of ``ACC`` when
    ``WEIGHTED`` (else unread: all ones); ``theta`` and ``out`` ``(m, n)`` with ``n = n_units *
    ALIGN``; ``scale`` is the float64 whose bits are ``scale_bits``.
    """
    n = _units(n_units, ALIGN)
    # Grouped launch order: consecutive programs walk GROUP_M row tiles down one column band.
    pid = tl.program_id(0).to(tl.int64)
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % size_m
    tile_n = (pid % per_group) // size_m
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The factor loads clamp their rows instead of masking them: rows past the edge repeat the last
    # one and their products are never stored, so the K loop's loads carry only the column mask.
    a_rows = a_ptr + tl.minimum(rows, m - 1)[:, None] * k
    b_rows = b_ptr + tl.minimum(cols, n - 1)[None, :] * k
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + ks
        live = kk < k  # the columns past k (r padded to BLOCK_K) load as 0 and add nothing
        a = tl.load(a_rows + kk[None, :], mask=live[None, :], other=0.0).to(ACC)
        if WEIGHTED:
            a = a * tl.load(w_ptr + kk, mask=live, other=0.0).to(ACC)[None, :]
        b = tl.load(b_rows + kk[:, None], mask=live[:, None], other=0.0).to(ACC)
        # float32: IEEE products and sums, FFMA (TF32 tensor cores' 10-bit mantissas would leave the
        # result ~1e-3 relative from the reference); float64 is float64 throughout (DMMA on sm_90).
        acc = tl.dot(a, b, acc, input_precision="ieee")
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    offsets = rows[:, None] * n + cols[None, :]
    theta = tl.load(theta_ptr + offsets, mask=mask).to(ACC)
    out = tl.fma(_f64(scale_bits).to(ACC), acc, theta)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(config: Config, out: torch.Tensor, theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            weights: Optional[torch.Tensor], scale: float) -> None:  # fmt: skip
    m, n = theta.shape
    if m == 0 or n == 0:
        return
    align = _align(0, n, theta.dtype)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    _lowrank_kernel[(tiles,)](
        out, theta, a, b, a if weights is None else weights, m, n // align, a.shape[1], _f64_bits(scale),
        ACC=_acc(theta.dtype), WEIGHTED=weights is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, ALIGN=align, num_warps=config.num_warps,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def lowrank_perturb(out: torch.Tensor, theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``out = theta + scale * (a @ b.T)`` (``out`` may be ``theta``) for ``(m, n)`` matrices, in one pass.

    ``a`` ``(m, r)`` and ``b`` ``(n, r)`` are float32; the product is formed in float32 (float64
    for float64 ``theta``) and rounded once into ``out``.
    """
    _launch(PERTURB_CONFIG, out, theta, a, b, None, scale)


def lowrank_accumulate(data: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor,
                       alpha: float) -> None:  # fmt: skip
    """``data += alpha * a @ diag(weights) @ b.T`` in place: a tiled GEMM with a loop over the ``K`` columns.

    ``a`` ``(m, K)`` and ``b`` ``(n, K)`` are float32, ``weights`` ``(K,)`` of the accumulation dtype
    (float32, float64 for float64 ``data``), where the product is formed and added once. Each
    element's sum over ``K`` runs in a fixed order (K blocks in sequence): results are deterministic.
    """
    _launch(ACCUMULATE_CONFIG, data, data, a, b, weights, alpha)
