"""Offline text: the Python standard library's own source as a byte-level tfds dataset.

Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except test suites, IDLE, lib2to3
and site-packages, sorted by relative path (deterministic). A file goes to ``validation`` when
``crc32(relative path) % 10 == 0``, otherwise to ``train``. Each split's files are concatenated
(``\\n`` between files) and cut into records of ``RECORD = 257`` bytes (256 inputs + 1 target shift).

The :class:`StdlibBytes` builder writes ``array_record`` files (no tensorflow needed) and
:func:`load_split` reads them back with ``tfds``'s data source. :func:`stdlib_sentences` gives
deterministic English sentences (first lines of stdlib docstrings) for sentence-embedding tests.
``tensorflow_datasets`` is imported lazily.

Example:
    >>> files = stdlib_files()
    >>> len(files) > 100
    True
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RECORD", "stdlib_files", "split_of", "split_bytes", "load_split", "stdlib_sentences",
           "default_data_dir"]

RECORD = 257
_EXCLUDE = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
            "turtledemo", "ensurepip"}
MAX_BYTES = {"train": 6_000_000, "validation": 600_000}


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of the standard library (excluding tests, IDLE, site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE and not d.startswith("."))
        for f in filenames:
            if f.endswith(".py"):
                out.append(Path(dirpath) / f)
    return sorted(out, key=lambda p: str(p.relative_to(root)))


def split_of(path: Path) -> str:
    """``"validation"`` for ~10% of files (by a hash of the relative path), else ``"train"``.

    >>> split_of(Path(sysconfig.get_paths()["stdlib"]) / "os.py") in ("train", "validation")
    True
    """
    rel = str(path.relative_to(Path(sysconfig.get_paths()["stdlib"])))
    return "validation" if zlib.crc32(rel.encode()) % 10 == 0 else "train"


def split_bytes(split: str, max_bytes: int | None = None) -> np.ndarray:
    """The split as ``(n, RECORD)`` uint8 records (first ``max_bytes`` bytes of the split).

    >>> split_bytes("validation", 1000).shape
    (3, 257)
    """
    if split not in MAX_BYTES:
        raise ValueError(f"jaxprune: unknown split '{split}'; valid: {sorted(MAX_BYTES)}")
    limit = MAX_BYTES[split] if max_bytes is None else max_bytes
    parts, total = [], 0
    for f in stdlib_files():
        if split_of(f) != split:
            continue
        b = f.read_bytes() + b"\n"
        parts.append(b)
        total += len(b)
        if total >= limit:
            break
    data = np.frombuffer(b"".join(parts)[:limit], np.uint8)
    n = len(data) // RECORD
    return data[: n * RECORD].reshape(n, RECORD)


@functools.cache
def _builder_cls() -> Any:
    import tensorflow_datasets as tfds
    from etils import epath

    class StdlibBytes(tfds.core.GeneratorBasedBuilder):
        """Byte records of the Python standard library's source."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}
        # tfds derives code_path through importlib_resources, which it does not declare
        code_path = epath.Path(__file__)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"bytes": tfds.features.Tensor(shape=(RECORD,), dtype=np.uint8)}
                ),
                description="Byte-level records of CPython's standard library source files.",
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager
            return {"train": self._generate_examples("train"),
                    "validation": self._generate_examples("validation")}

        def _generate_examples(self, split: str) -> Any:
            for i, rec in enumerate(split_bytes(split)):
                yield i, {"bytes": rec}

    return StdlibBytes


def default_data_dir() -> Path:
    """``$JAXPRUNE_DATA_DIR`` or ``~/.cache/jaxprune/tfds`` (the same rule as the digits data)."""
    from jaxprune.zoo.data.digits import default_data_dir as _digits_default

    return _digits_default(None)


def load_split(split: str, data_dir: str | Path | None = None) -> np.ndarray:
    """Build (once) the tfds dataset as array_record and read ``split`` as ``(n, RECORD)`` uint8."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    d.mkdir(parents=True, exist_ok=True)
    builder = _builder_cls()(data_dir=str(d.resolve()), file_format="array_record")
    builder.download_and_prepare()
    src = builder.as_data_source(split=split)
    return np.stack([np.asarray(src[i]["bytes"], np.uint8) for i in range(len(src))])


def stdlib_sentences(n: int, split: str = "train", seed: int = 0, min_len: int = 24,
                     max_len: int = 160) -> list[str]:
    """``n`` distinct docstring first lines (English sentences) from the split's stdlib files.

    >>> s = stdlib_sentences(3, "validation")
    >>> len(s), all(isinstance(x, str) for x in s)
    (3, True)
    """
    seen: set[str] = set()
    out: list[str] = []
    for f in stdlib_files():
        if split_of(f) != split:
            continue
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef | ast.Module):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                line = doc.strip().split("\n")[0].strip()
                if (min_len <= len(line) <= max_len and line[0].isupper() and line.endswith(".")
                        and line not in seen and line.isascii()):
                    seen.add(line)
                    out.append(line)
        if len(out) >= 4 * n + 200:
            break
    if len(out) < n:
        raise ValueError(f"jaxprune: only {len(out)} stdlib sentences in '{split}', asked for {n}")
    idx = np.random.default_rng(seed).permutation(len(out))[:n]
    return [out[i] for i in sorted(idx)]
