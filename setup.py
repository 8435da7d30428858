"""Build script: the pure-Python package plus native extensions built by CMake (CMakeLists.txt).

- ``zo_kernels._C``: fused C++/OpenMP kernels for CPU tensors, bound with pybind11 through raw
  pointers (no libtorch linkage, so one wheel serves any PyTorch >= 2.1).
- ``ZO_KERNELS_BUILD_CUDA=0/1/auto`` (default auto: when nvcc is found) is passed to CMake for the
  CUDA target.
- Without a working compiler the package still installs: the failed build is reported as a
  warning and ``zo_kernels.backends.available()`` explains why ``cpu`` is missing. Set
  ``ZO_KERNELS_REQUIRE_NATIVE=1`` to make a failed native build an error instead.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[])
        self.target = target


def _cuda_setting() -> str:
    value = os.environ.get("ZO_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"ZO_KERNELS_BUILD_CUDA must be 0, 1 or auto, got {value!r}")
    if value == "auto":
        return "ON" if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc") else "OFF"
    return "ON" if value == "1" else "OFF"


class CMakeBuild(build_ext):
    """Configure and build the CMake targets into the place setuptools expects each extension."""

    def run(self) -> None:
        """Build every extension; a failure only warns unless ZO_KERNELS_REQUIRE_NATIVE=1."""
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves a working pure-Python package
            if os.environ.get("ZO_KERNELS_REQUIRE_NATIVE") == "1":
                raise
            print(f"WARNING: zo_kernels native build failed ({exc}); installing without it.", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        """Configure CMake once per build directory and build the extension's target."""
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DZO_OUTPUT_DIR={out_dir}",
            f"-DZO_BUILD_CUDA={_cuda_setting()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYTHON_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        try:
            import ninja

            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}"]
        except ImportError:
            pass
        cmake = shutil.which("cmake") or "cmake"
        subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir, *args])
        subprocess.check_call([cmake, "--build", build_dir, "--target", ext.target, "--parallel"])


setup(
    name="zo_kernels",
    version="0.1.0",
    description="Fast, lean zero-order (evolution-strategy) gradient estimation for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zo_kernels", "zo_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    ext_modules=[CMakeExtension("zo_kernels._C", target="_C")],
    cmdclass={"build_ext": CMakeBuild},
    license="Apache-2.0",
)
