"""Render docs/api.md, the API reference, from the signatures and docstrings of zo_kernels.

Usage (from the repository root)::

    python tools/gen_api_docs.py            # (re)write docs/api.md
    python tools/gen_api_docs.py --check    # exit 1 if docs/api.md differs from a fresh rendering
    python tools/gen_api_docs.py --missing  # list the public names that have no docstring

``tests/test_docs.py`` asserts that docs/api.md equals :func:`render` and that
:func:`missing_docstrings` is empty, so a changed signature or docstring must be followed by a
rerun of this script.

What is documented (see :data:`MODULES`): the names listed in a module's ``__all__``; for a module
without one, the classes and functions defined in it (``obj.__module__`` is the module) and its
UPPER_CASE constants. For each class: its own public methods (those defined in the class body, in
definition order), its public class attributes and, where it defines ``__init_subclass__``, the
class keywords of a subclass. An object met a second time (an alias) links to its first entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "api.md")

#: (module, kinds of objects to document when the module has no ``__all__``), in page order.
MODULES: Sequence[Tuple[str, Tuple[str, ...]]] = (
    ("zo_kernels", ("class", "function", "constant")),
    ("zo_kernels.distributions", ("class", "function", "constant")),
    ("zo_kernels.nn", ("class", "function", "constant")),
    ("zo_kernels.diff", ("class", "function", "constant")),
    ("zo_kernels.diff.zero_order", ("class", "function", "constant")),
    ("zo_kernels.optim", ("class", "function", "constant")),
    # The backend objects themselves are an internal interface (zo_kernels/kernels/base.py): only
    # the functions that choose and report backends, and the constants they read, are public.
    ("zo_kernels.backends", ("function", "constant")),
)

#: Names shown first in a module's section, in this order; the others follow alphabetically.
FIRST = ("zero_order", "estimate", "SeedGradient", "ZeroOrderGradientModule", "NonFiniteLossError")

SECTIONS = ("Args", "Arguments", "Attributes", "Returns", "Raises", "Yields", "Example", "Examples", "Note", "Notes")
ITEM_SECTIONS = ("Args", "Arguments", "Attributes", "Raises")
WIDTH = 100


# --------------------------------------------------------------------------------------------------
# Docstrings: the Google style used in zo_kernels, rendered as Markdown.


def _inline(text: str) -> str:
    """RST inline markup as Markdown: ``x`` and :role:`x` become `x`."""

    def role(match: re.Match) -> str:
        target = match.group(1)
        return f"`{target[1:].split('.')[-1]}`" if target.startswith("~") else f"`{target}`"

    text = re.sub(r":(?:func|class|meth|data|attr|mod|exc|obj):`([^`]+)`", role, text)
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _section_body(lines: List[str], start: int) -> Tuple[List[str], int]:
    """The indented lines after a section header at ``start - 1`` (blank lines inside kept), and the next index."""
    body: List[str] = []
    k = start
    while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > 0):
        body.append(lines[k])
        k += 1
    while body and not body[-1].strip():
        body.pop()
        k -= 1
    return body, k


def _items(body: List[str]) -> List[str]:
    """``name: text`` entries (continuation lines joined) as Markdown list items."""
    base = min(_indent(line) for line in body if line.strip())
    items: List[List[str]] = []
    for line in body:
        if not line.strip():
            continue
        if _indent(line) == base or not items:
            items.append([line.strip()])
        else:
            items[-1].append(line.strip())
    out = []
    for parts in items:
        text = " ".join(parts)
        match = re.match(r"^([^:`]+?):\s+(.*)$", text) or re.match(r"^([^:`]+?):$", text + ":")
        if match and match.lastindex == 2:
            out.append(f"- `{match.group(1)}`: {_inline(match.group(2))}")
        else:
            out.append(f"- {_inline(text)}")
    return out


def render_docstring(doc: str) -> str:
    """A cleaned docstring as Markdown (Google sections become bold headers and lists, ``::`` a code block)."""
    lines = doc.splitlines()
    out: List[str] = []
    k = 0
    while k < len(lines):
        line = lines[k]
        header = line.strip()[:-1] if line.strip().endswith(":") else None
        if _indent(line) == 0 and header in SECTIONS:
            body, k = _section_body(lines, k + 1)
            out.append(f"**{header}:**")
            out.append("")
            if header in ITEM_SECTIONS and body:
                out.extend(_items(body))
            else:
                out.append(_inline(" ".join(part.strip() for part in body if part.strip())))
            out.append("")
            continue
        if line.rstrip().endswith("::"):
            stripped = line.rstrip()[:-2].rstrip()
            out.append(_inline(stripped + (":" if stripped else "")))
            body, k = _section_body(lines, k + 1)
            while body and not body[0].strip():
                body.pop(0)
            base = min((_indent(b) for b in body if b.strip()), default=0)
            out.extend(["", "```python", *[b[base:] if b.strip() else "" for b in body], "```", ""])
            continue
        out.append(_inline(line))
        k += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --------------------------------------------------------------------------------------------------
# Signatures.


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def _params(sig: inspect.Signature, drop_first: bool = False) -> List[str]:
    params = list(sig.parameters.values())
    if drop_first and params:
        params = params[1:]
    out: List[str] = []
    star_done = False
    for k, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            out.append("*")
            star_done = True
        name = p.name
        if p.kind is p.VAR_POSITIONAL:
            name, star_done = "*" + name, True
        elif p.kind is p.VAR_KEYWORD:
            name = "**" + name
        if p.annotation is not p.empty:
            name += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            name += (" = " if p.annotation is not p.empty else "=") + repr(p.default)
        out.append(name)
        nxt = params[k + 1] if k + 1 < len(params) else None
        if p.kind is p.POSITIONAL_ONLY and (nxt is None or nxt.kind is not p.POSITIONAL_ONLY):
            out.append("/")
    return out


def format_call(prefix: str, params: Optional[List[str]], returns: Optional[str] = None) -> str:
    """``prefix(params) -> returns``, one parameter per line when it does not fit on one line."""
    if params is None:
        return prefix
    tail = f" -> {returns}" if returns else ""
    one = f"{prefix}({', '.join(params)}){tail}"
    if len(one) <= WIDTH or not params:
        return one
    return prefix + "(\n" + "".join(f"    {p},\n" for p in params) + ")" + tail


def _signature(obj: Any) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _returns(sig: inspect.Signature) -> Optional[str]:
    if sig.return_annotation is sig.empty:
        return None
    text = _annotation(sig.return_annotation)
    return None if text == "None" else text


# --------------------------------------------------------------------------------------------------
# Which names are public.


def _kind(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "constant"


def public_names(module: types.ModuleType, kinds: Sequence[str]) -> List[str]:
    """The documented names of ``module``: its ``__all__``, else the objects it defines of ``kinds``."""
    if hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        names = []
        for name, obj in vars(module).items():
            if name.startswith("_"):
                continue
            kind = _kind(obj)
            if kind == "constant":
                if "constant" in kinds and name.isupper() and isinstance(obj, (str, int, float, dict, list, tuple)):
                    names.append(name)
            elif kind in ("class", "exception", "function"):
                wanted = "class" if kind == "exception" else kind
                if wanted in kinds and getattr(obj, "__module__", None) == module.__name__:
                    names.append(name)
    first = [n for n in FIRST if n in names]
    return first + sorted(n for n in names if n not in first)


def _own_doc(obj: Any) -> Optional[str]:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc and doc.strip() else None


def _members(cls: type) -> List[Tuple[str, Any, str]]:
    """``(name, function, kind)`` of the public methods defined in ``cls``'s own body, in order."""
    out = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, classmethod):
            out.append((name, raw.__func__, "classmethod"))
        elif isinstance(raw, staticmethod):
            out.append((name, raw.__func__, "staticmethod"))
        elif isinstance(raw, property):
            out.append((name, raw, "property"))
        elif inspect.isfunction(raw):
            abstract = getattr(raw, "__isabstractmethod__", False)
            out.append((name, raw, "abstract method" if abstract else "method"))
    return out


def _class_attributes(cls: type) -> List[Tuple[str, Any]]:
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return [
        (name, value)
        for name, value in vars(cls).items()
        if not name.startswith("_")
        and name not in fields
        and not callable(value)
        and not isinstance(value, (classmethod, staticmethod, property))
    ]


def _inherited_doc(cls: type, name: str) -> Tuple[Optional[str], Optional[str]]:
    """The docstring of ``name`` from the nearest base class that documents it, and that class's name."""
    for base in cls.__mro__[1:]:
        if name in vars(base):
            raw = vars(base)[name]
            doc = _own_doc(raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw)
            if doc:
                return doc, base.__name__
    return None, None


def _constant_comment(module: types.ModuleType, name: str) -> Optional[str]:
    """The ``#:`` comment lines just above ``name``'s assignment in ``module``'s source, joined."""
    try:
        lines = inspect.getsource(module).splitlines()
    except (OSError, TypeError):
        return None
    for k, line in enumerate(lines):
        if re.match(rf"^{re.escape(name)}\s*(:[^=]*)?=", line):
            comment: List[str] = []
            j = k - 1
            while j >= 0 and lines[j].startswith("#:"):
                comment.insert(0, lines[j][2:].strip())
                j -= 1
            return " ".join(comment) or None
    return None


# --------------------------------------------------------------------------------------------------
# The page.


class _Page:
    def __init__(self) -> None:
        self.out: List[str] = []
        self.seen: Dict[int, str] = {}  # id(object) -> anchor of its first entry
        self.missing: List[str] = []
        self.toc: List[Tuple[int, str, str]] = []

    def anchor(self, qualname: str) -> str:
        return qualname.replace(".", "-").lower()

    def heading(self, level: int, qualname: str, kind: str) -> None:
        anchor = self.anchor(qualname)
        self.toc.append((level, qualname, anchor))
        self.out += [f'<a id="{anchor}"></a>', "", f"{'#' * level} `{qualname}` ({kind})", ""]

    def doc(self, qualname: str, doc: Optional[str]) -> None:
        if doc:
            self.out += [render_docstring(doc), ""]
        else:
            self.missing.append(qualname)
            self.out += ["*No docstring.*", ""]

    def code(self, text: str) -> None:
        self.out += ["```python", text, "```", ""]

    def module(self, name: str, kinds: Sequence[str]) -> None:
        module = importlib.import_module(name)
        self.seen.setdefault(id(module), self.anchor(name))
        callable_module = type(module) is not types.ModuleType and callable(module)
        self.heading(2, name, "callable module" if callable_module else "module")
        self.doc(name, _own_doc(module))
        if callable_module:
            call = _signature(type(module).__call__)
            params = _params(call, drop_first=True) if call else None
            self.out += [f"Calling the module itself runs `{type(module).__name__}.__call__`:", ""]
            self.code(format_call(name, params))
        for attr in public_names(module, kinds):
            self.entry(f"{name}.{attr}", getattr(module, attr))

    def entry(self, qualname: str, obj: Any) -> None:
        kind = _kind(obj)
        first = self.seen.get(id(obj)) if kind != "constant" else None
        if first is not None:
            self.toc.append((3, qualname, first))
            self.out += [f"- `{qualname}`: the same {kind} as [above](#{first}).", ""]
            return
        if kind == "module":  # documented in its own section
            self.toc.append((3, qualname, self.anchor(obj.__name__)))
            self.out += [f"- `{qualname}`: module, see [`{obj.__name__}`](#{self.anchor(obj.__name__)}).", ""]
            return
        if kind != "constant":
            self.seen[id(obj)] = self.anchor(qualname)
        self.heading(3, qualname, kind)
        if kind == "constant":
            self.code(f"{qualname} = {obj!r}")
            module_name, _, name = qualname.rpartition(".")
            comment = _constant_comment(sys.modules[module_name], name)
            if comment:
                self.out += [_inline(comment), ""]
            else:  # the ``#:`` comment above the assignment is a constant's docstring
                self.missing.append(f"{qualname} (constant: add a `#:` comment above its assignment)")
                self.out += ["*No `#:` comment.*", ""]
            return
        if kind == "function":
            sig = _signature(obj)
            self.code(format_call(qualname, _params(sig) if sig else None, _returns(sig) if sig else None))
            self.doc(qualname, _own_doc(obj))
            return
        self.klass(qualname, obj, kind)

    def klass(self, qualname: str, cls: type, kind: str) -> None:
        sig = None if kind == "exception" else _signature(cls)
        bases = ", ".join(
            f"{b.__module__}.{b.__qualname__}" if b.__module__ not in ("builtins",) else b.__qualname__
            for b in cls.__bases__
            if b is not object
        )
        keyword = "class" if kind == "class" else "exception"
        self.code(format_call(f"{keyword} {qualname}", _params(sig) if sig else None))
        if bases:
            self.out += [f"Bases: `{bases}`", ""]
        self.doc(qualname, _own_doc(cls))
        hook = vars(cls).get("__init_subclass__")
        if hook is not None:
            func = hook.__func__ if isinstance(hook, classmethod) else hook
            params = _params(inspect.signature(func), drop_first=True)
            self.out += ["Class keywords, given when subclassing:", ""]
            self.code(f"class MyModule({', '.join([cls.__name__, *params])}): ...")
        attributes = _class_attributes(cls)
        if attributes:
            self.out += ["Class attributes: " + ", ".join(f"`{n} = {v!r}`" for n, v in attributes) + ".", ""]
        for name, func, member_kind in _members(cls):
            member = f"{qualname}.{name}"
            self.heading(4, member, member_kind)
            if member_kind == "property":
                self.doc(member, _own_doc(func))
                continue
            msig = _signature(func)
            drop = member_kind in ("method", "abstract method", "classmethod")
            if msig is not None:
                self.code(format_call(f"{qualname}.{name}", _params(msig, drop_first=drop), _returns(msig)))
            doc = _own_doc(func)
            if doc is None:
                doc, owner = _inherited_doc(cls, name)
                if doc is not None:
                    self.out += [f"*Docstring inherited from `{owner}.{name}`.*", ""]
            self.doc(member, doc)


HEADER = """\
# API reference

<!-- GENERATED FILE: do not edit. Regenerate with `python tools/gen_api_docs.py`. -->

This page is generated from the signatures and docstrings of the `zo_kernels` package by
[`tools/gen_api_docs.py`](../tools/gen_api_docs.py); do not edit it by hand. After changing a public
signature or docstring, regenerate it from the repository root:

```bash
python tools/gen_api_docs.py           # rewrites docs/api.md
python tools/gen_api_docs.py --check   # exit status 1 if docs/api.md is stale
```

`tests/test_docs.py` fails while this page differs from the script's output or a public name has no
docstring. It covers every name exported by `zo_kernels`, `zo_kernels.distributions`,
`zo_kernels.nn`, `zo_kernels.diff`, `zo_kernels.optim`, and the public functions and constants of
`zo_kernels.backends`; for each class, the methods defined in its body. Guides: [docs/README.md](README.md).
"""


def _build() -> _Page:
    page = _Page()
    for name, kinds in MODULES:
        page.module(name, kinds)
    return page


def render() -> str:
    """The full text of docs/api.md."""
    page = _build()
    toc = ["## Contents", ""]
    for level, qualname, anchor in page.toc:
        if level <= 3:
            toc.append(f"{'  ' * (level - 2)}- [`{qualname}`](#{anchor})")
    body = "\n".join(page.out).rstrip() + "\n"
    return HEADER + "\n" + "\n".join(toc) + "\n\n" + body


def missing_docstrings() -> List[str]:
    """Public names without documentation: no docstring (own or inherited), or a constant without ``#:`` comment."""
    return _build().missing


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale; write nothing")
    parser.add_argument("--missing", action="store_true", help="list public names without a docstring")
    parser.add_argument("--output", default=OUTPUT, help="where to write (default: docs/api.md)")
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if args.missing:
        names = missing_docstrings()
        print("\n".join(names) if names else "every public name has a docstring")
        return 1 if names else 0
    text = render()
    if args.check:
        try:
            with open(args.output, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{args.output} is stale: run `python tools/gen_api_docs.py`", file=sys.stderr)
            return 1
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
