"""Triton kernels for CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``).

``philox.py``: the noise stream as device functions; ``ops.py``: the kernels and their launchers;
``backend.py``: :class:`~.backend.TritonBackend` (validation, then launch) and ``load_backend()``,
which imports without Triton and says why the backend is unavailable.
"""
