"""The interface every backend implements (see ``zo_kernels.backends`` for the choice of one).

The public methods are defined here once, with one signature and one set of defaults for every
backend: each validates its arguments through its declaration in :mod:`.operations` (errors name
the argument) and hands the validated arguments to the backend's ``run_<operation>``, the only
methods a backend implements (with :attr:`Backend.traits`, where its tensors may live).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Optional

import torch

from .spec import (
    Accumulate,
    LowRankAccumulate,
    LowRankPerturb,
    Perturb,
    PerturbRows,
    PhiloxWords,
    Sample,
    SquaredNorms,
    Traits,
    accumulation_dtype,
    check_float,
)

#: Rows of a half-precision matrix perturbed per GEMM, so its float32 product stays small.
_HALF_CHUNK_ELEMENTS = 1 << 20

#: What :meth:`Backend.run_perturb` returns: ``(sample_id, scale) -> None``, arguments already checked.
PerturbLaunch = Callable[[int, float], None]


class Backend(abc.ABC):
    """One implementation of the fused noise operations on the stream of ``docs/noise.md``."""

    name: str = ""
    #: Where the backend's tensors may live and what the checks convert to (set by each backend).
    traits: Traits
    #: Whether ``run_perturb``/``run_perturb_rows`` fill ``keep`` themselves; otherwise the generic
    #: path perturbs, then writes :meth:`sample` into ``keep``.
    keeps_noise: bool = False

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend can run on tensors of ``device`` and ``dtype``."""
        placement = self.traits.placement
        return placement.accepts(torch.device(device)) and placement.takes(dtype)

    def __repr__(self) -> str:
        return f"<zo_kernels backend {self.name!r}>"

    # -- the operations: validated here, run by the backend ----------------------------------------

    def perturb(
        self, out: torch.Tensor, theta: torch.Tensor, stream: str, seed: int, sample_id: int, scale: float, offset: int
    ) -> None:
        """Write ``theta + scale * z(seed, sample_id, offset + j)`` into ``out``."""
        self.prepare_perturb(out, theta, stream, seed, offset)(sample_id, scale)

    def prepare_perturb(
        self,
        out: torch.Tensor,
        theta: torch.Tensor,
        stream: str,
        seed: int,
        offset: int,
        keep: Optional[torch.Tensor] = None,
    ) -> Callable[[int, float], None]:
        """A function ``(sample_id, scale) -> None`` doing ``perturb`` into ``out`` for a fixed buffer pair.

        The estimate perturbs the same buffers once per sample, so they are validated once, here.
        With ``keep`` (a float32 buffer like ``theta``), each call also leaves the unscaled noise
        ``z`` there, for backends where keeping it beats regenerating it in ``reduce`` (see
        :meth:`prefers_kept_noise`).
        """
        op = Perturb.check(self.traits, out, theta, stream, seed, offset, keep)
        launch = self._perturb_and_keep(op)
        check = Perturb.check_sample

        def perturb(sample_id: int, scale: float) -> None:
            launch(*check(sample_id, scale))

        return perturb

    def _perturb_and_keep(self, op: Perturb) -> PerturbLaunch:
        if op.keep is None or self.keeps_noise:
            return self.run_perturb(op)
        launch, keep = self.run_perturb(dataclasses.replace(op, keep=None)), op.keep.view(-1)
        n = op.theta.numel()

        def perturb_and_sample(sample_id: int, scale: float) -> None:
            launch(sample_id, scale)
            sample = Sample(op.stream, op.stream_id, op.seed, sample_id, op.offset, n, op.theta.device)
            keep.copy_(self.run_sample(sample))

        return perturb_and_sample

    def perturb_rows(
        self,
        out: torch.Tensor,
        theta: torch.Tensor,
        stream: str,
        seed: int,
        sample_ids: torch.Tensor,
        scales: torch.Tensor,
        offset: int,
        keep: Optional[torch.Tensor] = None,
    ) -> None:
        """Perturb a batch: row ``i * signs + k`` of ``out`` gets ``theta + scales[i, k] * z(seed, sample_ids[i])``.

        ``out`` is ``(num * signs, theta.numel())``, ``sample_ids`` int64 ``(num,)`` and ``scales``
        float64 ``(num, signs)``, both on the CPU (they are a handful of scalars); with ``keep``
        (float32 ``(num, theta.numel())``), row ``i`` also receives ``z(seed, sample_ids[i])``.
        """
        op = PerturbRows.check(self.traits, out, theta, stream, seed, sample_ids, scales, offset, keep)
        if op.keep is None or self.keeps_noise:
            return self.run_perturb_rows(op)
        self.run_perturb_rows(dataclasses.replace(op, keep=None))
        kept = op.keep.view(op.num, -1)
        for i, sample_id in enumerate(op.ids.tolist()):
            sample = Sample(op.stream, op.stream_id, op.seed, sample_id, op.offset, op.theta.numel(), op.theta.device)
            kept[i].copy_(self.run_sample(sample))

    def reduce(
        self, grad: torch.Tensor, weights: torch.Tensor, sample_ids: torch.Tensor, stream: str, seed: int, offset: int
    ) -> None:
        """Add ``sum_k weights[k] * z(seed, sample_ids[k], offset + j)`` to ``grad``."""
        self.run_accumulate(Accumulate.check(self.traits, "grad", grad, weights, sample_ids, stream, seed, offset))

    def step(
        self,
        theta: torch.Tensor,
        weights: torch.Tensor,
        sample_ids: torch.Tensor,
        stream: str,
        seed: int,
        lr: float,
        offset: int,
    ) -> None:
        """Subtract ``lr * sum_k weights[k] * z(seed, sample_ids[k], offset + j)`` from ``theta``."""
        lr = check_float(lr, "lr")
        op = Accumulate.check(self.traits, "theta", theta, weights, sample_ids, stream, seed, offset, lr)
        self.run_accumulate(op)

    def squared_norms(self, stream: str, seed: int, sample_ids: torch.Tensor, numel: int) -> torch.Tensor:
        """float64 ``sum_{j < numel} z(seed, i, j)**2`` for each id, on ``sample_ids.device``."""
        op = SquaredNorms.check(self.traits, stream, seed, sample_ids, numel)
        return self.run_squared_norms(op).to(op.home)

    def sample(
        self,
        stream: str,
        seed: int,
        sample_id: int,
        offset: int,
        numel: int,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """float32 ``z(seed, sample_id, offset + j)`` for ``j < numel`` on ``device`` (materialized noise).

        ``device=None`` is the backend's default device: the current CUDA device for GPU-only
        backends, else the CPU.
        """
        return self.run_sample(Sample.check(self.traits, stream, seed, sample_id, offset, numel, device))

    def philox_words(
        self, seed: int, sample_id: int, block0: int, blocks: int, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """The uint32 words of Philox blocks ``block0 .. block0 + blocks - 1``, as int64 ``(blocks, 4)``.

        The raw generator under both streams (counter ``(block, sample_id, 0)``, key ``seed``), for
        bit-exact tests against the reference; ``device`` defaults as in :meth:`sample`.
        """
        return self.run_philox_words(PhiloxWords.check(self.traits, seed, sample_id, block0, blocks, device))

    def lowrank_perturb(
        self, out: torch.Tensor, theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> None:
        """``out = theta + scale * (a @ b.T)`` for an ``(m, n)`` matrix (``out`` may be ``theta``: in place).

        ``a`` ``(m, r)`` and ``b`` ``(n, r)`` are float32 factors (a sample's, from the stream).
        """
        self.run_lowrank_perturb(LowRankPerturb.check(self.traits, out, theta, a, b, scale))

    def lowrank_accumulate(
        self, data: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, alpha: float
    ) -> None:
        """``data += alpha * a @ diag(weights) @ b.T``: the sum over samples of low-rank noise, one matrix product.

        ``a`` ``(m, K)`` and ``b`` ``(n, K)`` float32 hold the samples' factors side by side, ``weights``
        ``(K,)`` each column's weight.
        """
        op = LowRankAccumulate.check(self.traits, "data", data, a, b, weights, alpha)
        self.run_lowrank_accumulate(op)

    def prefers_kept_noise(self, stream: str, numel: int, rows: int = 1) -> bool:
        """Whether keeping ``rows`` samples' noise (``numel`` floats each) and accumulating it beats ``reduce``.

        False by default: regenerating is free on GPUs. The CPU backend measures otherwise for
        the normal stream, whose Box-Muller costs more than reading a kept buffer.
        """
        return False

    # -- what each backend implements (arguments validated by the declarations) --------------------

    @abc.abstractmethod
    def run_perturb(self, op: Perturb) -> PerturbLaunch:
        """A launch ``(sample_id, scale)`` of ``op`` (``op.keep`` only if :attr:`keeps_noise`)."""

    def run_perturb_rows(self, op: PerturbRows) -> None:
        """All rows of ``op``; this default launches :meth:`run_perturb` once per row."""
        n, out = op.theta.numel(), op.out.view(-1)
        for i, sample_id in enumerate(op.ids.tolist()):
            for k, scale in enumerate(op.scales[i].tolist()):
                row = i * op.signs + k
                single = Perturb(out[row * n : (row + 1) * n], op.theta.view(-1), op.stream, op.stream_id, op.seed,
                                 op.offset, None)  # fmt: skip
                self.run_perturb(single)(sample_id, scale)

    @abc.abstractmethod
    def run_accumulate(self, op: Accumulate) -> None:
        """``reduce`` (``op.lr is None``) or ``step``."""

    @abc.abstractmethod
    def run_squared_norms(self, op: SquaredNorms) -> torch.Tensor:
        """The norms on ``op.device`` (the caller moves them to ``op.home``)."""

    @abc.abstractmethod
    def run_sample(self, op: Sample) -> torch.Tensor:
        """The float32 noise of ``op`` on ``op.device``."""

    @abc.abstractmethod
    def run_philox_words(self, op: PhiloxWords) -> torch.Tensor:
        """The int64 ``(blocks, 4)`` words of ``op`` on ``op.device``."""

    def run_lowrank_perturb(self, op: LowRankPerturb) -> None:
        """One GEMM with ``beta = 1`` into ``out`` (MKL/OpenBLAS on the CPU, cuBLAS on CUDA): see :func:`gemm_into`."""
        gemm_into(op.out, op.theta, op.a, op.b, op.scale)

    def run_lowrank_accumulate(self, op: LowRankAccumulate) -> None:
        """``data += alpha * (a * weights) @ b.T`` as one GEMM: see :func:`gemm_into`."""
        gemm_into(op.data, op.data, op.a.to(op.weights.dtype) * op.weights, op.b, op.alpha)


def gemm_into(out: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``out = base + alpha * a @ b.T`` (``out`` may be ``base``), the product in the accumulation dtype.

    float32/float64 matrices take one GEMM and no ``m x n`` temporary; half-precision ones are
    formed in float32 a block of rows at a time and rounded once.
    """
    acc = accumulation_dtype(base.dtype)
    a, bt = a.to(acc), b.to(acc).t()
    if base.dtype == acc:
        if out.data_ptr() == base.data_ptr():
            base.addmm_(a, bt, alpha=alpha)
        else:
            torch.addmm(base, a, bt, alpha=alpha, out=out)
        return
    rows = max(1, _HALF_CHUNK_ELEMENTS // max(1, base.shape[1]))
    for lo in range(0, base.shape[0], rows):
        out[lo : lo + rows].copy_(torch.addmm(base[lo : lo + rows].to(acc), a[lo : lo + rows], bt, alpha=alpha))
