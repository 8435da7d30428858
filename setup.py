"""Build script: the pure-Python package plus native extensions built by CMake (CMakeLists.txt).

- ``zo_kernels._C``: fused C++/OpenMP kernels for CPU tensors, bound with pybind11 through raw
  pointers (no libtorch linkage, so one wheel serves any PyTorch >= 2.1).
- ``zo_kernels._C_cuda``: the CUDA kernels (csrc/cuda), same raw-pointer binding, static CUDA
  runtime. Built when ``ZO_KERNELS_BUILD_CUDA=1``, or with the default ``auto`` when nvcc is found.
- Each extension may fail on its own: the package still installs without it (a failed CUDA build
  never costs ``_C``), the failure is reported as a warning and ``zo_kernels.backends.available()``
  explains why the backend is missing. Set ``ZO_KERNELS_REQUIRE_NATIVE=1`` to make a failed native
  build an error instead.
- Wheels for an index (``make wheel``, cibuildwheel in pyproject.toml) go through
  ``auditwheel repair --exclude libgomp.so.1``: ``_C`` shares torch's OpenMP runtime instead of
  vendoring a second one (why: CMakeLists.txt, docs/install.md). The version lives in
  zo_kernels/_version.py.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The version, from zo_kernels/_version.py (its one source), read as text: importing the package needs torch."""
    with open(os.path.join(ROOT, "zo_kernels", "_version.py"), encoding="utf-8") as f:
        found = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
    if not found:
        raise RuntimeError('zo_kernels/_version.py has no `__version__ = "..."` line')
    return found.group(1)


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[])
        self.target = target


def _nvcc() -> str:
    """The nvcc that CMake should use: $CUDACXX, else nvcc on PATH, else the default toolkit's; or ''."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return ""


def _cuda_setting() -> str:
    value = os.environ.get("ZO_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"ZO_KERNELS_BUILD_CUDA must be 0, 1 or auto, got {value!r}")
    if value == "auto":
        return "ON" if _nvcc() else "OFF"
    return "ON" if value == "1" else "OFF"


def _require_native() -> bool:
    return os.environ.get("ZO_KERNELS_REQUIRE_NATIVE") == "1"


class CMakeBuild(build_ext):
    """Configure and build the CMake targets into the place setuptools expects each extension."""

    def run(self) -> None:
        """Build every extension; a failure only warns unless ZO_KERNELS_REQUIRE_NATIVE=1."""
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves a working pure-Python package
            if _require_native():
                raise
            print(f"WARNING: zo_kernels native build failed ({exc}); installing without it.", file=sys.stderr)

    def build_extensions(self) -> None:
        """Build each extension on its own: one that fails is warned about and dropped, the others kept."""
        failed = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - e.g. a CUDA build failure must not cost zo_kernels._C
                if _require_native():
                    raise
                print(
                    f"WARNING: zo_kernels: building {ext.name} failed ({exc}); installing without it.",
                    file=sys.stderr,
                )
                failed.append(ext)
        # Dropped extensions are neither copied in place (editable installs) nor listed as outputs.
        self.extensions = [ext for ext in self.extensions if ext not in failed]

    def build_extension(self, ext: Extension) -> None:
        """Configure CMake (one build directory for _C, one for _C_cuda) and build the extension's target."""
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        # The CUDA target is configured in a build directory of its own, so that a CUDA toolkit that
        # CMake cannot use fails that extension only, never the configuration of _C.
        cuda = ext.target == "_C_cuda"
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake-cuda" if cuda else "cmake")
        os.makedirs(build_dir, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DZO_OUTPUT_DIR={out_dir}",
            f"-DZO_BUILD_CUDA={'ON' if cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYTHON_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        if cuda and _nvcc():
            args.append(f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
        try:
            import ninja

            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}"]
        except ImportError:
            pass
        cmake = shutil.which("cmake") or "cmake"
        subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir, *args])
        # A bare --parallel overrides $CMAKE_BUILD_PARALLEL_LEVEL; pass it only when that is unset, so
        # that a shared or small build machine can bound the number of compile jobs.
        parallel = [] if os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") else ["--parallel"]
        subprocess.check_call([cmake, "--build", build_dir, "--target", ext.target, *parallel])


setup(
    name="zo_kernels",
    version=_version(),
    description="Fast, lean zero-order (evolution-strategy) gradient estimation for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zo_kernels", "zo_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    ext_modules=[CMakeExtension("zo_kernels._C", target="_C")]
    + ([CMakeExtension("zo_kernels._C_cuda", target="_C_cuda")] if _cuda_setting() == "ON" else []),
    cmdclass={"build_ext": CMakeBuild},
    license="Apache-2.0",
)
