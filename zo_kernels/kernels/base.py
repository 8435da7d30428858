"""The interface every backend implements (see ``zo_kernels.backends`` for the choice of one).

Every backend takes the same arguments in the same order, with the same defaults, and runs the
checks of :mod:`.checks` (which name the offending argument) before any kernel sees them.
"""

from __future__ import annotations

import abc
from typing import Callable, Optional

import torch


class Backend(abc.ABC):
    """One implementation of the fused noise operations on the stream of ``docs/noise.md``."""

    name: str = ""

    @abc.abstractmethod
    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend can run on tensors of ``device`` and ``dtype``."""

    @abc.abstractmethod
    def perturb(
        self, out: torch.Tensor, theta: torch.Tensor, stream: str, seed: int, sample_id: int, scale: float, offset: int
    ) -> None:
        """Write ``theta + scale * z(seed, sample_id, offset + j)`` into ``out``."""

    @abc.abstractmethod
    def reduce(
        self, grad: torch.Tensor, weights: torch.Tensor, sample_ids: torch.Tensor, stream: str, seed: int, offset: int
    ) -> None:
        """Add ``sum_k weights[k] * z(seed, sample_ids[k], offset + j)`` to ``grad``."""

    @abc.abstractmethod
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

    @abc.abstractmethod
    def squared_norms(self, stream: str, seed: int, sample_ids: torch.Tensor, numel: int) -> torch.Tensor:
        """float64 ``sum_{j < numel} z(seed, i, j)**2`` for each id, on ``sample_ids.device``."""

    def __repr__(self) -> str:
        return f"<zo_kernels backend {self.name!r}>"

    @abc.abstractmethod
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

    @abc.abstractmethod
    def philox_words(
        self, seed: int, sample_id: int, block0: int, blocks: int, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """The uint32 words of Philox blocks ``block0 .. block0 + blocks - 1``, as int64 ``(blocks, 4)``.

        The raw generator under both streams (counter ``(block, sample_id, 0)``, key ``seed``), for
        bit-exact tests against the reference; ``device`` defaults as in :meth:`sample`.
        """

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

        The estimate perturbs the same buffers once per sample; a backend may validate them once
        here and return a cheaper call. With ``keep`` (a float32 buffer like ``theta``), each call
        also leaves the unscaled noise ``z`` there, for backends where keeping it beats
        regenerating it in ``reduce`` (see :meth:`prefers_kept_noise`).
        """
        if keep is not None:
            self._check_keep(keep, theta, 1)

        def perturb(sample_id: int, scale: float) -> None:
            self.perturb(out, theta, stream, seed, sample_id, scale, offset)
            if keep is not None:
                keep.view(-1).copy_(self.sample(stream, seed, sample_id, offset, theta.numel(), theta.device))

        return perturb

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
        (float32 ``(num, theta.numel())``), row ``i`` also receives ``z(seed, sample_ids[i])``. The
        default makes one :meth:`perturb` call per row; a backend may generate each sample's noise
        once for all its rows (the antithetic pair) in a single call.
        """
        signs = scales.shape[1]
        if keep is not None:
            self._check_keep(keep, theta, sample_ids.numel())
        for i, sample_id in enumerate(sample_ids.tolist()):
            for k, scale in enumerate(scales[i].tolist()):
                self.perturb(out[i * signs + k], theta, stream, seed, sample_id, scale, offset)
            if keep is not None:
                z = self.sample(stream, seed, sample_id, offset, theta.numel(), theta.device)
                keep.view(sample_ids.numel(), theta.numel())[i].copy_(z)

    @staticmethod
    def _check_keep(keep: torch.Tensor, theta: torch.Tensor, rows: int) -> None:
        """``keep`` holds ``rows`` float32 samples of ``theta``'s size, on its device."""
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"keep must be a tensor, got {type(keep).__name__}")
        if keep.dtype != torch.float32 or keep.device != theta.device or not keep.is_contiguous():
            raise ValueError(
                f"keep must be a contiguous float32 tensor on {theta.device}, got {keep.dtype} on {keep.device}"
            )
        if keep.numel() != rows * theta.numel():
            raise ValueError(f"keep must have {rows * theta.numel()} elements, got {keep.numel()}")

    def prefers_kept_noise(self, stream: str, numel: int, rows: int = 1) -> bool:
        """Whether keeping ``rows`` samples' noise (``numel`` floats each) and accumulating it beats ``reduce``.

        False by default: regenerating is free on GPUs. The CPU backend measures otherwise for
        the normal stream, whose Box-Muller costs more than reading a kept buffer.
        """
        return False
