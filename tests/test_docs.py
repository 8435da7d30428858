"""docs/: the site builds strictly, the API reference covers every public name and each has a docstring, the
examples run, links resolve."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(name for name in os.listdir(DOCS) if name.endswith(".md"))
# api.md is mkdocstrings directives (``::: zo_kernels...``), rendered from the docstrings when the site is built.
EXAMPLE_PAGES = [name for name in PAGES if name != "api.md"]
NOT_RUN = re.compile(r"^\s*#\s*not run\b", re.MULTILINE)
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

#: The modules of the API reference: (module, kinds of names documented when it has no ``__all__``). The backend
#: objects are an internal interface (zo_kernels/ops/base.py): of zo_kernels.backends only the functions that
#: choose and report backends, and the constants they read, are public.
MODULES = (
    ("zo_kernels", ("class", "function", "constant")),
    ("zo_kernels.distributions", ("class", "function", "constant")),
    ("zo_kernels.nn", ("class", "function", "constant")),
    ("zo_kernels.diff", ("class", "function", "constant")),
    ("zo_kernels.diff.zero_order", ("class", "function", "constant")),
    ("zo_kernels.optim", ("class", "function", "constant")),
    ("zo_kernels.journal", ("class", "function", "constant")),
    ("zo_kernels.backends", ("function", "constant")),
)
DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*\n((?:[ \t]+.*\n|[ \t]*\n)*)", re.MULTILINE)


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def test_site_builds_strictly(tmp_path):
    """`make docs`: mkdocs + mkdocstrings render every page and the API reference with no warning (~5 s)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0, (
        "`python -m mkdocs build --strict` failed:\n  "
        + "\n  ".join(problems)
        + "\n--- output tail ---\n"
        + output[-3000:]
    )
    assert os.path.exists(tmp_path / "site" / "api" / "index.html")


# --------------------------------------------------------------------------------------------------
# The API reference: which names it renders, and their docstrings (read by griffe, as mkdocstrings reads them).


@pytest.fixture(scope="module")
def package():
    import griffe

    path = os.path.join(ROOT, "tools", "griffe_comment_docs.py")
    spec = importlib.util.spec_from_file_location("griffe_comment_docs", path)
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    return griffe.load(
        "zo_kernels", search_paths=[ROOT], extensions=griffe.load_extensions(extension.CommentDocstrings)
    )


def directives():
    """``{identifier: members}`` of docs/api.md's ``::: identifier`` blocks (members None: all; False: none)."""
    out = {}
    for name, options in DIRECTIVE.findall(read("api.md")):
        match = re.search(r"^\s+members:\s*(.+)$", options, re.MULTILINE)
        if match is None:
            out[name] = None
        elif match.group(1).strip() == "false":
            out[name] = False
        else:
            out[name] = [m.strip() for m in match.group(1).strip().strip("[]").split(",") if m.strip()]
    return out


def public_names(module, kinds):
    """``module``'s ``__all__``, else the classes and functions of ``kinds`` it defines and its UPPER_CASE constants."""
    if module.exports is not None:
        return [str(name) for name in module.exports]
    names = []
    for name, member in module.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if member.is_attribute:
            if "constant" in kinds and name.isupper():
                names.append(name)
        elif (member.is_class and "class" in kinds) or (member.is_function and "function" in kinds):
            names.append(name)
    return names


def documented(package):
    """The canonical paths of the objects docs/api.md renders, each mapped to the object."""
    out = {}
    for identifier, members in directives().items():
        obj = package[identifier[len("zo_kernels.") :]] if identifier != "zo_kernels" else package
        obj = obj.final_target if obj.is_alias else obj
        out[obj.path] = obj
        if obj.is_module and members is not False:
            for name in members if members is not None else public_names(obj, ("class", "function", "constant")):
                member = obj[name]
                member = member.final_target if member.is_alias else member
                out[member.path] = member
    return out


def test_api_reference_covers_every_public_name(package):
    """A name added to a public module (its ``__all__``, or a new public function) must be added to docs/api.md."""
    paths = documented(package)
    missing = []
    for module_name, kinds in MODULES:
        module = package[module_name[len("zo_kernels.") :]] if module_name != "zo_kernels" else package
        assert module.path in paths, f"docs/api.md has no `::: {module_name}`"
        for name in public_names(module, kinds):
            member = module[name]
            target = member.final_target if member.is_alias else member
            if target.path not in paths:
                missing.append(f"{module_name}.{name}")
    assert not missing, "public names docs/api.md does not render (add a `::: name` or a `members:` entry):\n  " + (
        "\n  ".join(missing)
    )


def _method_docstring(cls, name):
    """The docstring of method ``name`` of ``cls``, or of the nearest base class that documents it."""
    for klass in [cls, *cls.mro()]:
        member = klass.members.get(name)
        if member is not None and member.docstring is not None and member.docstring.value.strip():
            return member.docstring.value
    return None


def test_every_public_name_has_a_docstring(package):
    """Every rendered object, and every public method of a rendered class, has a docstring (a constant: a ``#:``
    comment above its assignment)."""
    missing = []
    for path, obj in documented(package).items():
        if obj.docstring is None or not obj.docstring.value.strip():
            hint = " (constant: add a `#:` comment above its assignment)" if obj.is_attribute else ""
            missing.append(path + hint)
        if obj.is_class:
            for name, member in obj.members.items():
                if name.startswith("_") or member.is_alias or not member.is_function:
                    continue
                if _method_docstring(obj, name) is None:
                    missing.append(f"{path}.{name}")
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


# --------------------------------------------------------------------------------------------------
# The pages themselves.


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
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


@pytest.mark.parametrize("page", PAGES)
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
    done = subprocess.run(
        [sys.executable, "tools/readme_results.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------
# The project README (the repository root's README.md): its examples run, its links resolve.

README = os.path.join(ROOT, "README.md")
FENCE_ANY = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)


def read_readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_readme_python_examples_run(monkeypatch, capsys):
    """Every ```python block of README.md runs, in order, in one namespace, as a reader would copy them (~2 s on a
    CPU: the examples cap their sizes). No block may be skipped: a block that needs torchrun or a GPU must guard
    itself, as the README's process_group line does."""
    blocks = FENCE.findall(read_readme())
    assert blocks, "README.md has no ```python block"
    monkeypatch.delenv("ZO_KERNELS_BACKEND", raising=False)
    namespace = {"__name__": "readme"}
    for k, block in enumerate(blocks):
        exec(compile(block, f"README.md (python block {k + 1})", "exec"), namespace)


def _slugs(text):
    """The anchors of ``text``'s headings as both GitHub and the site (Python-Markdown's toc) spell them."""
    from markdown.extensions.toc import slugify

    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", FENCE_ANY.sub("", text), re.MULTILINE):
        github = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        if github == slugify(heading.replace("`", ""), "-"):
            out.add(github)
    return out


def test_readme_links_resolve():
    """README.md's relative links name existing files, and an anchor into a docs page names one of its headings
    (one that GitHub and the site spell alike)."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE_ANY.sub("", read_readme())):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, path)) if path else README
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                if anchor not in _slugs(f.read()):
                    broken.append(f"{target} (no such heading)")
    assert not broken, "README.md: broken links:\n  " + "\n  ".join(broken)
