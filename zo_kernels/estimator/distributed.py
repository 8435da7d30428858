"""Spreading an estimate's samples over the ranks of a ``torch.distributed`` process group.

Each rank evaluates a contiguous share of the sample ids; the ranks then all-gather the N losses
(N scalars per sign, never n-element gradients) and every rank forms the same weights and rebuilds
the same gradient from the shared seed. With the same seed, the result equals the single-process
one bit for bit on one backend.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


def share(num_samples: int, group: Any) -> Tuple[int, int]:
    """``(first id, count)`` of this rank's contiguous share of ``num_samples`` ids (uneven splits allowed)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    base, extra = divmod(num_samples, world)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


def shared_seed(seed: int, group: Any, device: torch.device) -> int:
    """The group's rank-0 seed on every rank, so that a seed drawn from each rank's RNG still agrees."""
    import torch.distributed as dist

    t = torch.tensor([seed - 2**63], dtype=torch.int64, device=device)  # int64 holds the 64-bit pattern
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item()) + 2**63


def gather_losses(
    local: torch.Tensor, num_samples: int, group: Optional[Any], failed: bool = False
) -> Tuple[torch.Tensor, List[int]]:
    """All ranks' ``(signs, count)`` losses in sample-id order ``(signs, num_samples)``, and the failed ranks.

    A rank whose function raised still calls this (with ``failed=True``) so that no rank waits for
    it: the flag travels in one extra column of the same all-gather, and every rank learns which
    ranks failed.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    widest = -(-num_samples // world)
    padded = torch.zeros((local.shape[0], widest + 1), dtype=local.dtype, device=local.device)
    padded[:, : local.shape[1]] = local
    padded[:, widest] = 1.0 if failed else 0.0
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    flags = torch.stack([part[0, widest] for part in parts]).tolist()
    counts = [num_samples // world + (1 if r < num_samples % world else 0) for r in range(world)]
    losses = torch.cat([part[:, :count] for part, count in zip(parts, counts)], dim=1)
    return losses, [r for r, flag in enumerate(flags) if flag != 0.0]


class RankShare:
    """A rank's share of an estimate's samples, and the one place where ranks exchange losses and failures.

    Without a process group the share is every sample and nothing is exchanged.
    """

    def __init__(self, group: Any, num_samples: int, first: int, count: int) -> None:
        self.group, self.num_samples, self.first, self.count = group, num_samples, first, count

    @classmethod
    def of(
        cls, group: Any, seed: Optional[int], num_samples: int, device: torch.device
    ) -> Tuple[Optional[int], RankShare]:
        """The seed every rank uses (rank 0's) and this rank's share of ``num_samples``."""
        if group is None:
            return seed, cls(None, num_samples, 0, num_samples)
        assert seed is not None
        seed = shared_seed(seed, group, device)
        return seed, cls(group, num_samples, *share(num_samples, group))

    def attempt(self, evaluate: Callable[[], T]) -> Tuple[Optional[T], Optional[BaseException]]:
        """``evaluate()``; across ranks, its exception is returned (to be raised after the exchange), not raised."""
        try:
            return evaluate(), None
        except Exception as exc:
            if self.group is None:
                raise
            # Still take part in the gather, flagged, so that the other ranks raise instead of waiting.
            return None, exc

    def gather(
        self, blocks: Optional[List[torch.Tensor]], failure: Optional[BaseException], signs: int, device: torch.device
    ) -> torch.Tensor:
        """The ``(signs, num_samples)`` losses of every rank from this rank's loss blocks.

        Raises this rank's ``failure``, or a RuntimeError naming the ranks whose function raised.
        """
        if blocks:
            losses = torch.cat(blocks, dim=1)
        else:  # a rank with no share of the samples (or one whose function raised)
            losses = torch.zeros((signs, 0), dtype=torch.float64, device=device)
        if self.group is None:
            return losses
        losses, failed_ranks = gather_losses(losses, self.num_samples, self.group, failure is not None)
        if failure is not None:
            raise failure
        if failed_ranks:
            raise RuntimeError(
                f"zo_kernels: the function raised on rank(s) {failed_ranks} while evaluating their share of the "
                "samples (their tracebacks say which sample); no gradient was formed on any rank"
            )
        return losses
