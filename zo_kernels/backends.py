"""Backends that implement the fused noise operations, and the choice of one per call.

Every backend implements these operations on the stream of ``docs/noise.md``
(``zo_kernels.kernels.base.Backend`` defines them):

- ``perturb(out, theta, stream, seed, sample_id, scale, offset)``: ``out = theta + scale * z_i``
- ``perturb_rows(out, theta, stream, seed, sample_ids, scales, offset)``: one batch of rows
  ``theta + scales[i, k] * z_{ids[i]}`` (a default loops over ``perturb``; the compiled backends fuse it)
- ``reduce(grad, weights, sample_ids, stream, seed, offset)``: ``grad += sum_k w_k z_{i_k}``
- ``step(theta, weights, sample_ids, stream, seed, lr, offset)``: ``theta -= lr * sum_k w_k z_{i_k}``
- ``squared_norms(stream, seed, sample_ids, numel)``: ``|z_i|^2`` over the first ``numel`` elements
- ``sample(stream, seed, sample_id, offset, numel, device)``: the noise itself, materialized

``offset`` is the flat index of the tensor's first element in the concatenated parameter vector,
so splitting parameters into tensors never changes the noise. The zero-order layer only talks to
this interface.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from .kernels.base import Backend
from .reference import noise as _ref

#: Environment variable naming the backend to force when ``backend=`` is not given (see :func:`select`).
ENV_VAR = "ZO_KERNELS_BACKEND"


class ReferenceBackend(Backend):
    """Pure PyTorch, any device and floating dtype: the specification and the test oracle."""

    name = "reference"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:  # noqa: D102
        return dtype.is_floating_point

    def perturb(self, out, theta, stream, seed, sample_id, scale, offset):  # noqa: D102
        _ref.perturb(out, theta, stream, seed, sample_id, scale, offset)

    def reduce(self, grad, weights, sample_ids, stream, seed, offset):  # noqa: D102
        _ref.reduce(grad, weights, sample_ids, stream, seed, offset)

    def step(self, theta, weights, sample_ids, stream, seed, lr, offset):  # noqa: D102
        _ref.step(theta, weights, sample_ids, stream, seed, lr, offset)

    def squared_norms(self, stream, seed, sample_ids, numel):  # noqa: D102
        return _ref.squared_norms(stream, seed, sample_ids, numel)

    def sample(self, stream, seed, sample_id, offset, numel, device):  # noqa: D102
        ids = torch.tensor([sample_id], dtype=torch.int64, device=device)
        return _ref.noise(stream, seed, ids, offset, numel)[0]


#: Preference order per device type; the first backend that is built and supports the tensors wins.
PREFERENCE: Dict[str, List[str]] = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}

_BACKENDS: Dict[str, Backend] = {"reference": ReferenceBackend()}
_UNAVAILABLE: Dict[str, str] = {}


def _register_native() -> None:
    from .kernels import native_cuda
    from .kernels.native import NativeCpuBackend, load_extension

    ext, why = load_extension()
    if ext is None:
        _UNAVAILABLE["cpu"] = why
    else:
        _BACKENDS["cpu"] = NativeCpuBackend(ext)
    cuda, why = native_cuda.load_backend()
    if cuda is None:
        _UNAVAILABLE["cuda"] = why
    else:
        _BACKENDS["cuda"] = cuda


def _register_triton() -> None:
    # Importing triton costs about half a second: only pay it where its kernels can run.
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        _UNAVAILABLE["triton"] = (
            "no CUDA device (set TRITON_INTERPRET=1 before importing zo_kernels to run the Triton kernels "
            "on CPU tensors in Triton's interpreter)"
        )
        return
    from .kernels.triton.backend import load_backend

    backend, why = load_backend()
    if backend is None:
        _UNAVAILABLE["triton"] = why
    else:
        _BACKENDS["triton"] = backend


_register_native()
_register_triton()


def available() -> Dict[str, str]:
    """Every known backend name mapped to ``'available'`` or the reason it cannot be used."""
    status = {name: "available" for name in _BACKENDS}
    status.update({name: why for name, why in _UNAVAILABLE.items() if name not in _BACKENDS})
    return status


def get(name: str) -> Backend:
    """The backend called ``name``; ValueError naming the available ones otherwise."""
    if name in _BACKENDS:
        return _BACKENDS[name]
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
        backend = _BACKENDS.get(candidate)
        if backend is not None and backend.supports(device, dtype):
            return backend
    raise ValueError(f"no backend supports {dtype} tensors on {device}")
