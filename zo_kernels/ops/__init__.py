"""The fused operations on the counter-based stream, and the backends that run them.

- :mod:`.spec`: each operation declared once (arguments, checks), the stream's constants, the dtype ids
  and the ABI number of the compiled modules;
- :mod:`.base`: the :class:`~.base.Backend` interface (validate, then ``run_<operation>``);
- :mod:`.reference`: the pure-PyTorch specification and test oracle;
- :mod:`.native`: the C++ CPU and CUDA modules (``zo_kernels._C``, ``zo_kernels._C_cuda``);
- :mod:`.triton`: the Triton kernels;
- :mod:`.registry`: which backends exist and which one serves a tensor.
"""
