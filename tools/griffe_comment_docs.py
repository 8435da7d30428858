"""Griffe extension for the docs site (``mkdocs.yml``): zo_kernels' docstring conventions in Markdown.

- ``#:`` comment lines just above an assignment document it (Sphinx autodoc's convention, used for
  module constants such as ``zo_kernels.backends.ENV_VAR``); griffe itself only reads a string
  literal *below* an assignment, so the comment becomes the docstring of an attribute that has none.
- reST roles (``:func:`select```, ``:class:`~torch.Tensor```) become code spans, as Sphinx shows
  them, and a paragraph ending in ``::`` before an indented example ends in ``:``; mkdocstrings
  renders docstrings as Markdown, where both would stay literal text (the indented example is a
  Markdown code block already).

``tests/test_docs.py`` loads the package with this extension when it checks that every public name
is documented.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional

import griffe

ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|exc|obj):`~?([^`]+)`")
LITERAL_BLOCK = re.compile(r"(\S)::(\n[ \t]*\n)")


def comment_docstring(lines: List[str], lineno: int) -> Optional[str]:
    """The ``#:`` lines right above line ``lineno`` (1-based) of ``lines``, joined; None if there are none."""
    comment: List[str] = []
    k = lineno - 2
    while k >= 0 and lines[k].lstrip().startswith("#:"):
        comment.insert(0, lines[k].lstrip()[2:].strip())
        k -= 1
    return "\n".join(comment) or None


def roles_as_code(text: str) -> str:
    """``:role:`target``` as ````target```` (``~a.b.c`` as ``c``, as Sphinx shortens it)."""

    def code(match: re.Match) -> str:
        target = match.group(0)
        name = match.group(1)
        return f"``{name.split('.')[-1] if '`~' in target else name}``"

    return ROLE.sub(code, text)


class CommentDocstrings(griffe.Extension):
    """``#:`` comments as attribute docstrings; reST roles and ``::`` as Markdown in every docstring."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        """Called by griffe for every object it loads, before its members."""
        if obj.docstring is None and obj.is_attribute and obj.lineno and obj.filepath:
            try:
                lines = obj.lines_collection[obj.filepath]
            except (KeyError, TypeError):
                lines = []
            text = comment_docstring(lines, obj.lineno)
            if text:
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno - 1, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = LITERAL_BLOCK.sub(r"\1:\2", roles_as_code(obj.docstring.value))
