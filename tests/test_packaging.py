"""The package builds as a wheel with its native extension, installs in a fresh venv, and degrades cleanly."""

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_SITE = os.path.dirname(os.path.dirname(torch.__file__))


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports(tmp_path):
    pytest.importorskip("pybind11")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), ROOT])
    wheels = glob.glob(str(dist / "zo_kernels-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0]])
    # torch comes from this interpreter's site-packages, appended last: zo_kernels must come from the venv.
    probe = textwrap.dedent(
        f"""
        import sys
        sys.path.append({TORCH_SITE!r})
        import torch, zo_kernels
        print(zo_kernels.__file__)
        print(zo_kernels.backends.available()["cpu"])
        x = torch.ones(3, requires_grad=True)
        zo_kernels.zero_order(zo_kernels.distributions.Normal(), num_samples=2, seed=1)(lambda t: t.sum())(x).backward()
        print(zo_kernels.backends.select(x.device, x.dtype).name, bool(torch.isfinite(x.grad).all()))
        """
    )
    lines = run([python, "-c", probe], cwd=str(tmp_path)).split("\n")
    assert lines[0].startswith(str(venv)), lines
    assert lines[1] == "available", lines
    assert lines[2] == "cpu True", lines


def test_missing_extension_falls_back_to_the_reference_backend(tmp_path):
    probe = textwrap.dedent(
        """
        import sys
        sys.modules["zo_kernels._C"] = None  # makes `import zo_kernels._C` raise ImportError
        import torch, zo_kernels
        print(zo_kernels.backends.available()["cpu"])
        print(zo_kernels.backends.select(torch.device("cpu"), torch.float32).name)
        """
    )
    out = run([sys.executable, "-c", probe], cwd=ROOT).split("\n")
    assert out[0].startswith("not built"), out
    assert out[1] == "reference", out


def test_a_missing_extension_in_a_source_tree_says_the_source_tree_is_imported(monkeypatch):
    """From the repository root, Python imports the in-tree package, not the installed one: say so."""
    import importlib

    from zo_kernels.ops import native

    real = importlib.import_module

    def no_extension(name, *args):
        if name == "zo_kernels._C":
            raise ImportError("No module named 'zo_kernels._C'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_extension)
    module, why = native.load_extension("cpu")
    assert module is None
    assert "Python is importing the source tree" in why and "Run from another directory" in why, why
