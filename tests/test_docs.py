"""docs/: the generated API reference is current, every public name is documented, the examples run, links resolve."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
GENERATOR = os.path.join(ROOT, "tools", "gen_api_docs.py")
# api.md is generated (its code blocks are signatures and docstring excerpts, not programs).
PAGES = sorted(name for name in os.listdir(DOCS) if name.endswith(".md") and name != "api.md")
NOT_RUN = re.compile(r"^\s*#\s*not run\b", re.MULTILINE)
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def test_api_reference_is_what_the_generator_renders():
    fresh = load_generator().render()
    current = read("api.md")
    if current != fresh:
        import difflib

        diff = "".join(
            difflib.unified_diff(current.splitlines(True), fresh.splitlines(True), "docs/api.md", "rendered now", n=1)
        )
        pytest.fail(f"docs/api.md is stale: run `python tools/gen_api_docs.py`.\n{diff[:6000]}")


def test_every_public_name_has_a_docstring():
    missing = load_generator().missing_docstrings()
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page, monkeypatch, capsys):
    """The ```python blocks of one page run in order in one namespace, except those marked `# not run`."""
    blocks = [b for b in FENCE.findall(read(page)) if not NOT_RUN.search(b)]
    if not blocks:
        pytest.skip(f"{page} has no runnable python block")
    if any(re.search(r"^\s*import torchopt\b", b, re.MULTILINE) for b in blocks):
        pytest.importorskip("torchopt")
    monkeypatch.delenv("ZO_KERNELS_BACKEND", raising=False)
    namespace = {"__name__": f"docs_{page[:-3]}"}
    for k, block in enumerate(blocks):
        code = compile(block, f"docs/{page} (python block {k + 1})", "exec")
        exec(code, namespace)


@pytest.mark.parametrize("page", PAGES + ["api.md"])
def test_relative_links_resolve(page):
    text = FENCE.sub("", read(page))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(DOCS, target.split("#")[0]))
        if not os.path.exists(path):
            broken.append(target)
    assert not broken, f"docs/{page}: links to missing files: {broken}"


def test_readme_results_block_is_current():
    """README.md's results table is generated from bench/results/summary-*.md, never typed by hand."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "tools/readme_results.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
