"""Kept for ``bench/meta_gradient.py``, which imports these two names from here: the baselines live in harness.py."""

from harness import TORCHOPT_MISSING, import_torchopt  # noqa: F401
