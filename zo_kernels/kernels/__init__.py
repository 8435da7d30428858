"""Bindings of the compiled and Triton kernels to the backend interface of ``zo_kernels.backends``."""
