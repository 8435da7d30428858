"""Build script: the pure-Python package, plus native extensions through CMake (see CMakeLists.txt).

The native targets (``zo_kernels._C`` for CPU tensors, ``zo_kernels._C_cuda`` for CUDA tensors) are
not built yet: the package installs and runs on its pure-PyTorch reference backend, and
``zo_kernels.backends.available()`` says so.
"""

from setuptools import find_packages, setup

setup(
    name="zo_kernels",
    version="0.1.0",
    description="Fast, lean zero-order (evolution-strategy) gradient estimation for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zo_kernels", "zo_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    license="Apache-2.0",
)
