"""Griffe extension for the API reference (mkdocstrings): read vital_fast's docstrings as they are written.

vital_fast's docstrings follow the numpy style with a few reStructuredText habits that griffe's numpy parser
and Markdown do not know. This extension rewrites each docstring when griffe loads it (the source files
are not touched):

- ``Example`` sections (singular) become ``Examples``, the numpy name, so that their doctests render as code
  (read as Markdown, ``d["a"]["b"]`` would be a reference link, and the heading a title);
- Sphinx roles such as ``:func:`visualize``` or ``:class:`~vital_fast.optim.Settings``` become inline code
  (``~`` keeps the last name, as Sphinx shows it);
- a paragraph ending in a reST literal-block marker (``first::``) ends in one colon; the indented block after
  it is already a code block in Markdown.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^([ \t]*)Example\n([ \t]*)-------[ \t]*$", re.MULTILINE)
_ROLES = "func|class|meth|mod|data|attr|obj|exc|const|term"
_ROLE = re.compile(rf":(?:py:)?(?:{_ROLES}):`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _role(m: re.Match) -> str:
    tilde, text, target = m.group(1), m.group(2).strip(), m.group(3)
    if target is not None:  # :role:`title <target>`
        return f"`{text}`"
    return f"`{text.rsplit('.', 1)[-1] if tilde else text}`"


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` with the rewrites above."""
    text = _EXAMPLE.sub(r"\1Examples\n\2--------", text)
    text = _ROLE.sub(_role, text)
    return _LITERAL.sub(r"\1:", text)


class MarkdownDocstrings(griffe.Extension):
    """Apply :func:`markdown_docstring` to every loaded docstring."""

    def on_instance(self, *, obj, **kwargs) -> None:  # noqa: D102
        doc = obj.docstring
        if doc is not None:
            doc.value = markdown_docstring(doc.value)
