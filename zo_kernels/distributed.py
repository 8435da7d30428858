"""Spreading an estimate's samples over the ranks of a ``torch.distributed`` process group.

Each rank evaluates a contiguous share of the sample ids; the ranks then all-gather the N losses
(N scalars per sign, never n-element gradients) and every rank forms the same weights and rebuilds
the same gradient from the shared seed. With the same seed, the result equals the single-process
one bit for bit on one backend.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch


def check_process_group(group: Any) -> Any:
    """``group`` if it is None or usable: torch.distributed available and initialized."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group was given, but this PyTorch build has no torch.distributed")
    if not isinstance(group, dist.ProcessGroup):
        kind = type(group).__name__
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD), got {kind}")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given, but torch.distributed.init_process_group() has not been called")
    return group


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
