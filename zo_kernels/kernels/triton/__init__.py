"""Triton kernels for CUDA tensors (planned; see README 'What is not built yet')."""
