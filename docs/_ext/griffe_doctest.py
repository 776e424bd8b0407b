"""Griffe extension for the API pages: render docstring doctest examples as code.

jaxprune's docstrings hold plain ``>>>`` examples (run by ``tests/test_doctests.py``) outside any
Markdown code block, so Markdown would reflow them as text (and read ``x["kernel"]`` as a link).
This wraps every run of lines starting at a ``>>>`` line, up to the next blank line, in a
```` ```pycon ```` fence, keeping its indentation. Loaded from ``mkdocs.yml``; not part of the package.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(indent + "```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(indent + "```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence ``>>>`` examples in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
