"""Offline English evaluation text: the Python documentation sources of Debian's ``python3.11-doc``.

The package (``apt-get install python3.11-doc``; PSF license) ships ~11 MB of reStructuredText as
``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``. Files are sorted by relative path; a file
belongs to the ``test`` split when ``crc32(relative path) % 10 == 0``, else to ``calibration``.
:func:`split_text` concatenates a split's files (``\\n\\n`` between them); :func:`token_windows` cuts
tokenized text into fixed-length windows for WikiText-style perplexity. When the package is absent
every function raises :class:`DocsMissing` with the install command (nothing is downloaded).

Example:
    >>> split_of("library/os.rst.txt") in ("test", "calibration")
    True
    >>> token_windows(list(range(10)), seq=4, bos=99).tolist()
    [[99, 0, 1, 2, 3], [99, 4, 5, 6, 7]]
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DocsMissing", "DOCS_ROOT", "docs_root", "docs_files", "split_of", "split_text",
           "token_windows"]

DOCS_ROOT = "/usr/share/doc/python3.11/html/_sources"
_ENV = "JAXPRUNE_PYDOCS"


class DocsMissing(FileNotFoundError):
    """The Python documentation sources are not installed."""


def docs_root() -> Path:
    """``$JAXPRUNE_PYDOCS`` or :data:`DOCS_ROOT`; raises :class:`DocsMissing` if it has no
    ``.rst.txt`` files."""
    root = Path(os.environ.get(_ENV, DOCS_ROOT))
    if not root.is_dir() or next(root.rglob("*.rst.txt"), None) is None:
        raise DocsMissing(
            f"jaxprune.zoo.data.pydocs: no Python documentation sources under {root}. Install them "
            f"with `apt-get update && apt-get install -y python3.11-doc` (Debian/Ubuntu), or point "
            f"${_ENV} at a folder of .rst.txt files."
        )
    return root


def docs_files() -> list[Path]:
    """All ``.rst.txt`` files, sorted by relative path."""
    root = docs_root()
    return sorted(root.rglob("*.rst.txt"), key=lambda p: str(p.relative_to(root)))


def split_of(rel: str) -> str:
    """``"test"`` for ~10% of files (by ``crc32`` of the relative path), else ``"calibration"``."""
    return "test" if zlib.crc32(rel.encode()) % 10 == 0 else "calibration"


def split_text(split: str, max_chars: int | None = None) -> str:
    """The split's files concatenated (``\\n\\n`` between files), at most ``max_chars`` characters."""
    if split not in ("test", "calibration"):
        raise ValueError(f"jaxprune.zoo.data.pydocs: split must be 'test' or 'calibration', got {split!r}")
    root = docs_root()
    parts, size = [], 0
    for f in docs_files():
        if split_of(str(f.relative_to(root))) != split:
            continue
        parts.append(f.read_text(encoding="utf-8", errors="replace").strip())
        size += len(parts[-1]) + 2
        if max_chars is not None and size >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def token_windows(ids: Sequence[int], seq: int, bos: int | None = None,
                  n: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of ``seq`` tokens (the tail is dropped), each prefixed
    with ``bos`` when given: ``(n, seq + 1)`` int32 (``(n, seq)`` without ``bos``)."""
    a = np.asarray(ids, np.int32)
    k = len(a) // seq if n is None else min(n, len(a) // seq)
    w = a[: k * seq].reshape(k, seq)
    if bos is not None:
        w = np.concatenate([np.full((k, 1), bos, np.int32), w], axis=1)
    return w
