"""pytest plugin: keep one contiguous share of the collected tests (``bench/gpu_all.sh`` runs shards at once).

    PYTEST_SHARD=K/COUNT python -m pytest -p pytest_shard ...   # with tools/ on PYTHONPATH

Shard ``K`` (0-based) of ``COUNT`` keeps the items ``[len*K//COUNT, len*(K+1)//COUNT)`` of the
collection order, so tests that compile the same kernel variants mostly land in the same process;
the rest are reported as deselected. Without ``PYTEST_SHARD`` the plugin does nothing.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import pytest


def shard_spec(value: str) -> Tuple[int, int]:
    """``'K/COUNT'`` as ``(K, COUNT)``; ValueError unless ``0 <= K < COUNT``."""
    index, _, count = value.partition("/")
    k, n = int(index), int(count)
    if not 0 <= k < n:
        raise ValueError(f"PYTEST_SHARD must be K/COUNT with 0 <= K < COUNT, got {value!r}")
    return k, n


def shard_bounds(total: int, index: int, count: int) -> Tuple[int, int]:
    """The half-open range of item positions that shard ``index`` of ``count`` keeps."""
    return total * index // count, total * (index + 1) // count


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Keep this shard's share of ``items``; report the rest as deselected."""
    value = os.environ.get("PYTEST_SHARD")
    if not value:
        return
    lo, hi = shard_bounds(len(items), *shard_spec(value))
    dropped = items[:lo] + items[hi:]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = items[lo:hi]
