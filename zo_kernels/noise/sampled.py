"""User distributions: any object with ``.sample(sample_shape)``, or a function of the shape (TorchOpt's contract).

Their noise cannot be regenerated from a seed, so each sample's is drawn once per tensor, kept, and
summed after its evaluation.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence

import torch

from .base import Noise, Perturb, Sampler, resolve_seed

if TYPE_CHECKING:
    from ..estimator.plan import Segment
    from ..ops.base import Backend


def check_sample(sample: object, like: torch.Tensor, where: str) -> torch.Tensor:
    """Return a distribution's ``sample`` as a tensor shaped, typed and placed like ``like``.

    Numbers and sequences are converted; a sample of another shape is a ValueError.
    """
    if not isinstance(sample, torch.Tensor):
        try:
            sample = torch.as_tensor(sample)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where} must be a tensor, got {type(sample).__name__}") from exc
    if sample.shape != like.shape:
        raise ValueError(f"{where} has shape {tuple(sample.shape)}, expected {tuple(like.shape)}")
    if sample.dtype.is_complex:
        raise TypeError(f"{where} must be real, got dtype {sample.dtype}")
    if sample.device.type == "meta" and like.device.type != "meta":
        raise ValueError(f"{where} is on the meta device (it has no values); expected a tensor like {like.device}")
    return sample.to(device=like.device, dtype=like.dtype)


def as_sampler(distribution: object) -> Sampler:
    """A function of the sample shape for ``distribution``: its ``.sample`` method, or itself if callable."""
    if isinstance(distribution, type) and hasattr(distribution, "sample"):
        raise TypeError(
            f"distribution must be an instance, got the class {distribution.__name__} "
            f"(did you mean {distribution.__name__}(...)?)"
        )
    sample = getattr(distribution, "sample", None)
    if callable(sample):
        return lambda shape: sample(shape)
    if callable(distribution):
        return distribution  # type: ignore[return-value]
    raise TypeError(
        "distribution must have a .sample(sample_shape) method (e.g. a torch.distributions.Distribution) "
        f"or be a function of the sample shape; got {type(distribution).__name__}"
    )


class _Kept:
    """One sample's noise from a user distribution (the tensor itself: it cannot be regenerated)."""

    __slots__ = ("z",)

    def __init__(self) -> None:
        self.z: Optional[torch.Tensor] = None


class Sampled(Noise):
    """Any user distribution, sampled per sample and per tensor (TorchOpt's contract); its noise is kept.

    The distribution is checked when wrapped: it must have ``.sample(sample_shape)`` or be a function of the shape.
    """

    name = "sampled"
    regenerable = False
    joins_leaves = False
    uses_scratch = False

    def __init__(self, distribution: Any) -> None:
        self.distribution, self.sampler = distribution, as_sampler(distribution)

    @contextlib.contextmanager
    def session(self, seed: Any, leaves: Sequence[torch.Tensor]) -> Iterator[Optional[int]]:
        """Run the user distribution under ``seed`` without disturbing torch's global RNG state."""
        if seed is None:
            yield None
            return
        value = resolve_seed(seed)
        devices = sorted({p.device.index or 0 for p in leaves if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(value)
            yield value

    def seed_text(self, seed: Optional[int]) -> str:
        """``seed=None`` names torch's global RNG."""
        return "seed=None (torch's global RNG)" if seed is None else f"seed={seed}"

    def backend(self, device: torch.device, dtype: torch.dtype, requested: Optional[str]) -> Optional[Backend]:
        """None: samples are drawn and added in PyTorch."""
        return None

    def keeps_noise(self, segment: Segment, rows: int) -> bool:
        """Always: the noise cannot be regenerated."""
        return True

    def keep_buffer(self, segment: Segment, rows: Optional[int] = None) -> Any:
        """A holder for one sample's noise, as the distribution returned it (cast like the leaf)."""
        return _Kept()

    def perturber(self, segment: Segment, seed: Optional[int], keep: Any) -> Perturb:
        """Draw ``z_i`` for the segment's one leaf, keep it, and return ``theta + scale * z_i``."""
        assert keep is not None and self.sampler is not None
        sampler, leaf = self.sampler, segment.leaves[0]

        def perturb(i: int, scale: float) -> List[torch.Tensor]:
            where = f"sample {i} of the distribution for a {tuple(leaf.shape)} tensor"
            keep.z = check_sample(sampler(leaf.shape), leaf, where)
            return self.twin(segment, keep, scale)

        return perturb

    def twin(self, segment: Segment, keep: Any, scale: float) -> List[torch.Tensor]:
        """A new tensor ``theta + scale * z`` (the product rounded first), per sample as TorchOpt does."""
        return [segment.leaves[0] + scale * keep.z]

    def accumulate(self, acc: torch.Tensor, keep: Any, weight: torch.Tensor) -> None:
        """``acc += z * weight`` in the accumulation dtype."""
        acc.view(keep.z.shape).add_(keep.z.to(acc.dtype) * weight.to(acc.dtype))

    def _not_regenerable(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"a {self.name} distribution's noise cannot be regenerated from a seed")

    perturb_rows = accumulate_rows = reduce = step = _not_regenerable  # type: ignore[assignment]
