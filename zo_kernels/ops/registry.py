"""Backends that implement the fused noise operations, and the choice of one per call.

Every backend implements these operations on the stream of ``docs/noise.md``
(:class:`.base.Backend` defines them):

- ``perturb(out, theta, stream, seed, sample_id, scale, offset)``: ``out = theta + scale * z_i``
- ``perturb_rows(out, theta, stream, seed, sample_ids, scales, offset)``: one batch of rows
  ``theta + scales[i, k] * z_{ids[i]}`` (a default loops over ``perturb``; the compiled backends fuse it)
- ``reduce(grad, weights, sample_ids, stream, seed, offset)``: ``grad += sum_k w_k z_{i_k}``
- ``step(theta, weights, sample_ids, stream, seed, lr, offset)``: ``theta -= lr * sum_k w_k z_{i_k}``
- ``squared_norms(stream, seed, sample_ids, numel)``: ``|z_i|^2`` over the first ``numel`` elements
- ``sample(stream, seed, sample_id, offset, numel, device=None)``: the noise itself, materialized
- ``philox_words(seed, sample_id, block0, blocks, device=None)``: the raw Philox words (for tests)

``offset`` is the flat index of the tensor's first element in the concatenated parameter vector,
so splitting parameters into tensors never changes the noise. The zero-order layer only talks to
this interface.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .base import Backend
from .reference import ReferenceBackend

#: Environment variable naming the backend to force when ``backend=`` is not given (see :func:`select`).
ENV_VAR = "ZO_KERNELS_BACKEND"


#: Preference order per device type; the first backend that is built and supports the tensors wins.
PREFERENCE: Dict[str, List[str]] = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}

_BACKENDS: Dict[str, Backend] = {"reference": ReferenceBackend()}
_UNAVAILABLE: Dict[str, str] = {}


def _probe_cpu() -> Tuple[Optional[Backend], str]:
    from .native import load_backend

    return load_backend("cpu")


def _probe_cuda() -> Tuple[Optional[Backend], str]:
    from .native import load_backend

    return load_backend("cuda")


def _probe_triton() -> Tuple[Optional[Backend], str]:
    # Importing triton costs about half a second: only pay it where its kernels can run.
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return None, (
            "no CUDA device (set TRITON_INTERPRET=1 before importing zo_kernels to run the Triton kernels "
            "on CPU tensors in Triton's interpreter)"
        )
    from .triton.backend import load_backend

    return load_backend()


#: How each compiled backend is found. Probed on first use, not at import: probing CUDA initializes
#: the driver, which an ``import zo_kernels`` on a CPU-only job (or before a fork) must not do.
_PROBES: Dict[str, Callable[[], Tuple[Optional[Backend], str]]] = {
    "cpu": _probe_cpu,
    "cuda": _probe_cuda,
    "triton": _probe_triton,
}
_probe_lock = threading.Lock()


def _ensure(name: str) -> None:
    """Probe backend ``name`` once (thread-safe); a no-op for known or unknown names."""
    if name not in _PROBES or name in _BACKENDS or name in _UNAVAILABLE:
        return
    with _probe_lock:
        if name in _BACKENDS or name in _UNAVAILABLE:
            return
        backend, why = _PROBES[name]()
        if backend is None:
            _UNAVAILABLE[name] = why
        else:
            _BACKENDS[name] = backend


def available() -> Dict[str, str]:
    """Every known backend name mapped to ``'available'`` or the reason it cannot be used (probes them all)."""
    for name in _PROBES:
        _ensure(name)
    status = {name: "available" for name in _BACKENDS}
    status.update({name: why for name, why in _UNAVAILABLE.items() if name not in _BACKENDS})
    return status


def get(name: str) -> Backend:
    """The backend called ``name``; ValueError naming the available ones otherwise."""
    _ensure(name)
    if name in _BACKENDS:
        return _BACKENDS[name]
    for other in _PROBES:  # the message lists every available backend
        _ensure(other)
    names = ", ".join(sorted(_BACKENDS))
    if name in _UNAVAILABLE:
        raise ValueError(f"backend {name!r} is not available ({_UNAVAILABLE[name]}); available: {names}")
    raise ValueError(f"unknown backend {name!r}; available: {names}")


def select(device: torch.device, dtype: torch.dtype, requested: Optional[str] = None) -> Backend:
    """The backend for tensors on ``device`` with ``dtype``.

    ``requested`` (the ``backend=`` argument), else the ``ZO_KERNELS_BACKEND`` environment variable,
    forces a backend by name; otherwise the first available one of :data:`PREFERENCE` that
    supports the device and dtype.
    """
    name = requested if requested is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None:
        source = "" if requested is not None else f" (from ${ENV_VAR})"
        try:
            backend = get(name)
        except ValueError as exc:
            raise ValueError(f"{exc}{source}") from None
        if not backend.supports(device, dtype):
            raise ValueError(f"backend {name!r}{source} does not support {dtype} tensors on {device}")
        return backend
    for candidate in PREFERENCE.get(device.type, ["reference"]):
        _ensure(candidate)
        backend = _BACKENDS.get(candidate)
        if backend is not None and backend.supports(device, dtype):
            return backend
    raise ValueError(f"no backend supports {dtype} tensors on {device}")
