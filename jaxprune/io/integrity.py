"""Checkpoint integrity: per-array checksums, crash-safe step replacement, crash recovery.

Used by :class:`jaxprune.io.checkpoint.CheckpointManager`; the pieces are plain functions on
directories and pytrees so they can be tested (and fault-injected) on their own.

* :func:`checksums` / :func:`verify_checksums`: a CRC-32 of every array's bytes, written at save
  time next to the arrays and compared after restore, so bytes flipped on disk (bit rot, a bad
  copy) raise :class:`IntegrityError` naming the array instead of restoring garbage.
* :func:`swap_in`: replace step directory ``final`` by a completely written ``staged`` one with
  two renames; :func:`recover` (run when a manager opens a directory) finishes or undoes a swap
  that a killed process left half done. At every instant either the old or the new step is on
  disk under a name :func:`recover` maps back to the step.
* :data:`FAULT_HOOK`: called with the name of each stage of a swap; the fault-injection test
  sets it to kill the process exactly there.

Example:
    >>> import numpy as np
    >>> sums = checksums({"w": np.arange(3.0)})
    >>> verify_checksums({"w": np.arange(3.0)}, sums)
    >>> try:
    ...     verify_checksums({"w": np.zeros(3)}, sums)
    ... except IntegrityError as e:
    ...     print(str(e)[:43])
    jaxprune: checkpoint array 'w' is corrupted
"""

from __future__ import annotations

import atexit
import collections
import operator
import os
import shutil
import threading
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxprune.core.masks import PyTree, leaves_with_paths

__all__ = ["IntegrityError", "checksums", "verify_checksums", "swap_in", "recover",
           "purge_deleted", "REPLACED_SUFFIX", "STAGING_PREFIX", "DELETED_SUBDIR", "FAULT_HOOK"]

REPLACED_SUFFIX = ".jaxprune-replaced"
STAGING_PREFIX = ".jaxprune-staging-"
#: retention moves a dropped step here with one atomic rename, then it is deleted (a process
#: killed while deleting a step in place would leave a half-deleted step that looks saved)
DELETED_SUBDIR = ".jaxprune-deleted"

#: ``FAULT_HOOK(stage)`` is called at each stage of :func:`swap_in` (tests kill the process there).
FAULT_HOOK: Callable[[str], None] | None = None


class IntegrityError(RuntimeError):
    """A checkpoint's bytes differ from what was saved (bit rot, a truncated or edited file)."""


def _step_index(step: Any) -> int:
    """``step`` as a Python int >= 0 (ints, numpy/JAX integer scalars), else a clear error."""
    bad = (f"jaxprune: CheckpointManager: step must be an integer >= 0 (e.g. int(state.step)), "
           f"got {step!r}")
    if isinstance(step, bool):
        raise TypeError(bad)
    try:
        s = operator.index(step)
    except TypeError:
        raise TypeError(bad + f" of type {type(step).__name__}") from None
    if s < 0:
        raise ValueError(bad + "; a negative step could never be restored")
    return s


def _at_exit(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` at interpreter exit *before* ``concurrent.futures`` shuts its thread
    pools down (orbax's background save needs them): ``threading``'s exit hooks run first and in
    reverse order of registration; plain ``atexit`` handlers would run too late."""
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(fn, *args)
            return
    except RuntimeError:  # the interpreter is already shutting down
        return
    atexit.register(fn, *args)


def _crc(x: Any) -> int | None:
    if getattr(x, "is_fully_addressable", True) is False:
        return None  # a multi-process array: this process cannot see all of its bytes
    a = np.ascontiguousarray(np.asarray(x))
    return zlib.crc32(a.view(np.uint8).reshape(-1).data) if a.size else 0


def _keyed(tree: PyTree) -> list[tuple[str, Any]]:
    """``(key, leaf)`` per leaf: its path, or, where two leaves share a path string (a dict key
    ``"a/b"`` next to ``{"a": {"b": ...}}``), ``jax.tree_util.keystr`` of its key path, so no
    checksum is keyed ambiguously."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    paths = [p for p, _ in leaves_with_paths(tree)]
    seen = collections.Counter(paths)
    return [(p if seen[p] == 1 else "keystr:" + jax.tree_util.keystr(kp), x)
            for p, (kp, x) in zip(paths, flat, strict=True)]


def checksums(tree: PyTree) -> dict[str, int | None]:
    """``{leaf path: CRC-32 of the array's bytes}`` (``None`` for arrays this process cannot
    read whole, i.e. not fully addressable multi-process arrays; ``None`` leaves are skipped).
    Leaves whose path strings collide are keyed by ``"keystr:" + jax.tree_util.keystr(path)``.

    >>> checksums({"a": np.zeros(2, np.float32), "b": None})
    {'a': 1696784233}
    """
    return {key: _crc(x) for key, x in _keyed(tree) if x is not None and hasattr(x, "shape")}


def verify_checksums(tree: PyTree, saved: dict[str, int | None]) -> None:
    """Raise :class:`IntegrityError` naming the first array of ``tree`` whose checksum differs
    from ``saved`` (arrays without a saved checksum are not checked).

    >>> verify_checksums({"a": np.ones(2)}, {"a": None})
    """
    for path, x in _keyed(tree):
        want = saved.get(path)
        if x is None or want is None or not hasattr(x, "shape"):
            continue
        got = _crc(x)
        if got is not None and got != want:
            raise IntegrityError(
                f"jaxprune: checkpoint array '{path}' is corrupted: its checksum is {got} on "
                f"restore but was {want} when saved (the file was changed or damaged on disk); "
                "restore another step"
            )


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def swap_in(staged: str, final: str) -> None:
    """Move the complete step directory ``staged`` to ``final``, replacing what is there.

    ``final`` is first renamed to ``final + REPLACED_SUFFIX`` (kept until the new step is in
    place), then ``staged`` to ``final``, then the old copy is deleted. A crash between the two
    renames leaves only the old copy, which :func:`recover` renames back.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> for n in ("1", "new"): os.makedirs(os.path.join(d, n, n))
    >>> swap_in(os.path.join(d, "new"), os.path.join(d, "1")); os.listdir(os.path.join(d, "1"))
    ['new']
    """
    parent = os.path.dirname(final)
    old = final + REPLACED_SUFFIX
    _stage("staged")
    if os.path.exists(final):
        if os.path.exists(old):  # a previous crash left both: the step dir is the valid one
            shutil.rmtree(old)
        os.rename(final, old)
        _fsync_dir(parent)
    _stage("old_moved_aside")
    os.rename(staged, final)
    _fsync_dir(parent)
    _stage("new_in_place")
    shutil.rmtree(old, ignore_errors=True)
    _stage("old_deleted")


def recover(directory: str) -> list[str]:
    """Finish or undo replacements a crash interrupted; returns what was done, for logging.

    ``<step>.jaxprune-replaced`` without ``<step>``: the old step is renamed back (the new one
    never arrived). Both present: the replacement completed; the old copy is deleted. Staging
    directories (``.jaxprune-staging-*``) are incomplete or already moved; they are deleted.

    >>> import tempfile; d = tempfile.mkdtemp(); os.makedirs(os.path.join(d, "3" + REPLACED_SUFFIX))
    >>> recover(d), os.listdir(d)
    (["restored step '3' from an interrupted replacement"], ['3'])
    """
    done: list[str] = []
    if not os.path.isdir(directory):
        return done
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name == DELETED_SUBDIR:
            if purge_deleted(directory):
                done.append(f"finished deleting the steps dropped by retention ('{name}')")
        elif name.startswith(STAGING_PREFIX):
            shutil.rmtree(full, ignore_errors=True)
            done.append(f"removed the incomplete staging directory '{name}'")
        elif name.endswith(REPLACED_SUFFIX):
            step_dir = full[: -len(REPLACED_SUFFIX)]
            if os.path.exists(step_dir):
                shutil.rmtree(full, ignore_errors=True)
                done.append(f"removed the replaced copy '{name}'")
            else:
                os.rename(full, step_dir)
                done.append(f"restored step '{os.path.basename(step_dir)}' from an interrupted "
                            "replacement")
    if done:
        _fsync_dir(directory)
    return done


def purge_deleted(directory: str) -> bool:
    """Delete the steps that retention moved to ``DELETED_SUBDIR``; whether there were any.

    >>> import tempfile; d = tempfile.mkdtemp(); os.makedirs(os.path.join(d, DELETED_SUBDIR, "1"))
    >>> purge_deleted(d), os.listdir(d)
    (True, [])
    """
    full = os.path.join(directory, DELETED_SUBDIR)
    if not os.path.isdir(full):
        return False
    shutil.rmtree(full, ignore_errors=True)
    return True
