"""Orbax checkpoints of the whole training state, resumable bit-exactly.

A checkpoint holds one pytree ``state`` (usually a :class:`TrainState`: params, the optax state
with the pruner's masks and counters, the step, the PRNG key and the data-iterator position) plus
a JSON ``config``. :class:`CheckpointManager` wraps ``orbax.checkpoint.CheckpointManager`` with

* retention (``max_to_keep``) and asynchronous saves (``async_save=True``),
* restore of the latest (or any) step onto a *template* state, on any mesh/sharding — the
  restored arrays take the sharding of the template's leaves (or of ``shardings=``),
* a structure check before restoring: a checkpoint from a different model raises
  :class:`CheckpointMismatchError` naming the first path that differs,
* clear :class:`CheckpointError` on a read-only, missing or full directory, including failures of
  an asynchronous save, which surface at the next ``save``/``wait``/``close`` (never silently).

Mask trees have ``None`` leaves (unpruned params); orbax stores them as empty nodes and they come
back as ``None``. Typed PRNG keys (``jax.random.key``) are stored as their raw key data and
re-wrapped on restore. Orbax writes each step into a ``<step>.orbax-checkpoint-tmp`` directory and
renames it when complete, so a process killed mid-save leaves the previous step restorable.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> state = TrainState.create({"w": jnp.ones(3)}, opt_state=(), seed=0)
    >>> with CheckpointManager(d, async_save=False) as mgr:
    ...     _ = mgr.save(1, state._replace(step=jnp.int32(1)), config={"lr": 0.1})
    ...     restored, cfg = mgr.restore(state)
    >>> int(restored.step), cfg
    (1, {'lr': 0.1})
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.core.masks import PyTree, leaves_with_paths

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointManager",
    "TrainState",
    "IndexedIterator",
    "check_structure",
    "abstract_state",
    "dir_size",
]

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (directory read-only, missing, full, ...)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree does not match the template (different model or optimizer)."""


class TrainState(NamedTuple):
    """Everything needed to resume a run exactly.

    ``step``: int32 scalar; ``params``; ``opt_state`` (any optax state, e.g. with a
    :class:`~jaxprune.training.PruneState`); ``rng``: a PRNG key; ``data_pos``: int32 position of
    the data iterator (batches consumed), see :class:`IndexedIterator`.

    >>> s = TrainState.create({"w": jnp.zeros(2)}, opt_state=(), seed=1)
    >>> int(s.step), int(s.data_pos)
    (0, 0)
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    data_pos: jax.Array

    @classmethod
    def create(cls, params: PyTree, opt_state: PyTree, seed: int = 0) -> TrainState:
        """A fresh state at step 0 with ``rng = jax.random.key(seed)``.

        >>> TrainState.create({}, (), 0).rng.dtype
        key<fry>
        """
        return cls(jnp.zeros([], jnp.int32), params, opt_state, jax.random.key(seed),
                   jnp.zeros([], jnp.int32))


class IndexedIterator:
    """A deterministic data iterator: batch ``i`` is ``fn(i)``; ``position`` is all its state.

    Saving ``position`` (e.g. as ``TrainState.data_pos``) and restarting from it reproduces the
    exact batch sequence, which is what makes resumed runs bit-identical.

    >>> it = IndexedIterator(lambda i: i * 10, position=2)
    >>> next(it), next(it), it.position
    (20, 30, 4)
    """

    def __init__(self, fn: Callable[[int], Any], position: int = 0):
        if int(position) < 0:
            raise ValueError(f"jaxprune: IndexedIterator position must be >= 0, got {position}")
        self.fn = fn
        self.position = int(position)

    def __iter__(self) -> IndexedIterator:
        return self

    def __next__(self) -> Any:
        out = self.fn(self.position)
        self.position += 1
        return out


# ----------------------------------------------------------------------------------------------
# Tree helpers
# ----------------------------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _flat_spec(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` for the array leaves (arrays, ``ShapeDtypeStruct`` or orbax
    array metadata; ``None``/empty nodes are ignored)."""
    return {path: (tuple(x.shape), str(np.dtype(x.dtype)))
            for path, x in leaves_with_paths(tree) if x is not None and hasattr(x, "shape")}


def check_structure(template: PyTree, saved: PyTree, what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first path where ``saved`` (arrays or
    orbax metadata) differs from ``template`` in presence, shape or dtype.

    NamedTuples, dicts and lists compare by their paths, so a NamedTuple state matches the dict
    orbax reads back. ``None`` leaves (unpruned mask entries) are ignored on both sides.

    >>> check_structure({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    jaxprune.io.checkpoint.CheckpointMismatchError: jaxprune: checkpoint does not match the model: \
'a' is in the model but not in the checkpoint (checkpoint has e.g. 'b')
    """
    t = _flat_spec(_to_savable(template))
    s = _flat_spec(saved)
    for path, (shape, dtype) in t.items():
        if path not in s:
            near = [k for k in s if k not in t][:1]
            hint = f" ({what} has e.g. '{near[0]}')" if near else ""
            raise CheckpointMismatchError(
                f"jaxprune: {what} does not match the model: '{path}' is in the model but not "
                f"in the {what}{hint}"
            )
        sshape, sdtype = s[path]
        if sshape != shape:
            raise CheckpointMismatchError(
                f"jaxprune: {what} does not match the model at '{path}': {what} shape {sshape}, "
                f"model shape {shape}"
            )
        if sdtype != dtype:
            raise CheckpointMismatchError(
                f"jaxprune: {what} does not match the model at '{path}': {what} dtype {sdtype}, "
                f"model dtype {dtype}"
            )
    for path in s:
        if path not in t:
            raise CheckpointMismatchError(
                f"jaxprune: {what} does not match the model: '{path}' is in the {what} but not "
                "in the model"
            )


def abstract_state(template: PyTree, shardings: PyTree | None = None) -> PyTree:
    """``jax.ShapeDtypeStruct`` tree to restore into: shapes/dtypes of ``template`` (keys as raw
    key data), shardings from ``shardings`` (same tree, ``None`` leaves kept) or from the
    template's own arrays.

    >>> abstract_state({"w": jnp.ones(2)})["w"].shape
    (2,)
    """
    sav = _to_savable(template)
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, sav)
    shard_flat = jax.tree_util.tree_flatten(shardings, is_leaf=lambda x: x is None)[0]
    flat, treedef = jax.tree_util.tree_flatten(sav)
    shard_flat = [s for s in shard_flat if s is not None]
    if len(shard_flat) != len(flat):
        raise ValueError(
            f"jaxprune: shardings has {len(shard_flat)} leaves but the state has {len(flat)}"
        )
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
           for x, s in zip(flat, shard_flat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _rewrap_keys(template: PyTree, restored: PyTree) -> PyTree:
    def f(t, r):
        if _is_key(t):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        return r

    return jax.tree.map(f, template, restored)


def dir_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path``.

    >>> import tempfile; dir_size(tempfile.mkdtemp())
    0
    """
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _nbytes(tree: PyTree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(_to_savable(tree)) if hasattr(x, "shape"))


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"jaxprune: cannot create checkpoint directory '{directory}': {e.strerror or e}"
        ) from e
    probe = os.path.join(directory, f".jaxprune-write-probe-{uuid.uuid4().hex}")
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        why = "read-only" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else (
            "full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "not writable")
        raise CheckpointError(
            f"jaxprune: checkpoint directory '{directory}' is {why} ({e.strerror or e}); "
            "no checkpoint can be saved there"
        ) from e


# ----------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save/restore the training state with retention, async saves and a structure check.

    Args:
      directory: where steps are stored (made absolute; created if missing).
      max_to_keep: keep at most this many most recent steps (``None``: keep all).
      save_interval_steps: ``save`` only writes on multiples of this (``force=True`` overrides).
      async_save: write in a background thread; errors surface at the next ``save``/``wait``.
      min_free_factor: refuse to save (``CheckpointError``) unless the filesystem has this many
        times the state's size free (``0`` disables the check).

    >>> import tempfile
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), max_to_keep=2)
    >>> mgr.latest_step() is None
    True
    >>> mgr.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        min_free_factor: float = 1.5,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"jaxprune: max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        if jax.process_index() == 0:
            _check_writable(self.directory)
        self.min_free_factor = float(min_free_factor)
        self.async_save = bool(async_save)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=self.async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    # context manager ------------------------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _raise(self, what: str, e: BaseException) -> None:
        if isinstance(e, CheckpointError):
            raise e
        raise CheckpointError(
            f"jaxprune: {what} in '{self.directory}' failed: {type(e).__name__}: {e}"
        ) from e

    def wait(self) -> None:
        """Block until pending async saves are on disk; raise :class:`CheckpointError` if any
        failed (so a run never continues as if it had saved)."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            self._raise("an asynchronous checkpoint save", e)

    def save(self, step: int, state: PyTree, *, config: dict[str, Any] | None = None,
             force: bool = False, wait: bool = False) -> bool:
        """Save ``state`` (and the JSON-serialisable ``config``) as ``step``.

        Returns whether a save was started (``False`` when ``step`` is not on the save interval).
        ``force=True`` saves regardless of the interval and replaces an existing ``step``.
        Raises :class:`CheckpointError` if the directory is full or unwritable, or if an earlier
        async save failed.

        >>> import tempfile
        >>> with CheckpointManager(tempfile.mkdtemp()) as m:
        ...     m.save(0, {"w": jnp.ones(2)}, wait=True)
        True
        """
        step = int(step)
        self.wait()  # surfaces a failed previous async save before starting another
        if jax.process_index() == 0 and self.min_free_factor > 0:
            need = int(self.min_free_factor * _nbytes(state))
            free = _free_bytes(self.directory)
            if free < need:
                raise CheckpointError(
                    f"jaxprune: checkpoint directory '{self.directory}' is full: {free} bytes "
                    f"free, step {step} needs about {need}; free space or use another directory"
                )
        if force and step in self._mgr.all_steps():
            self._mgr.delete(step)
        try:
            saved = self._mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_to_savable(state)),
                    config=ocp.args.JsonSave(dict(config or {})),
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001
            self._raise(f"saving step {step}", e)
        if wait:
            self.wait()
        return bool(saved)

    def all_steps(self) -> list[int]:
        """Steps that are completely on disk (in-progress ``*.orbax-checkpoint-tmp`` excluded)."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The most recent complete step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"jaxprune: no checkpoint in '{self.directory}'")
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(
                f"jaxprune: no checkpoint for step {step} in '{self.directory}' (have {steps})"
            )
        return int(step)

    def saved_structure(self, step: int | None = None) -> PyTree:
        """Orbax metadata tree (shapes/dtypes) of the saved state at ``step`` (default latest)."""
        step = self._resolve(step)
        md = self._mgr.item_metadata(step)
        md = md["state"] if hasattr(md, "__getitem__") else md.state
        return getattr(md, "tree", md)

    def restore(self, template: PyTree, step: int | None = None, *,
                shardings: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore ``(state, config)`` from ``step`` (default: latest) into ``template``'s tree.

        ``template`` is a state of the same model (e.g. freshly initialised, possibly sharded on
        another mesh); restored arrays get the template leaves' shardings unless ``shardings``
        (a tree of ``jax.sharding.Sharding`` like the state) is given. Raises
        :class:`CheckpointMismatchError` naming the first differing path when the checkpoint is
        from another model/optimizer, :class:`CheckpointError` when there is no such step.

        >>> import tempfile
        >>> with CheckpointManager(tempfile.mkdtemp(), async_save=False) as m:
        ...     _ = m.save(0, {"w": jnp.ones(2)})
        ...     m.restore({"w": jnp.zeros(3)})
        Traceback (most recent call last):
        ...
        jaxprune.io.checkpoint.CheckpointMismatchError: jaxprune: checkpoint does not match the \
model at 'w': checkpoint shape (2,), model shape (3,)
        """
        step = self._resolve(step)
        check_structure(template, self.saved_structure(step))
        target = abstract_state(template, shardings)
        try:
            out = self._mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001
            self._raise(f"restoring step {step}", e)
        return _rewrap_keys(template, out["state"]), dict(out["config"] or {})

    def config(self, step: int | None = None) -> dict[str, Any]:
        """The JSON config saved with ``step`` (default: latest)."""
        step = self._resolve(step)
        out = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"] or {})

    def close(self) -> None:
        """Wait for pending saves (raising :class:`CheckpointError` on failure) and release."""
        try:
            self.wait()
        finally:
            self._mgr.close()


def leaf_paths(tree: PyTree) -> list[str]:
    """Paths of all leaves (``None`` included), for error messages and docs.

    >>> leaf_paths({"a": None, "b": 1})
    ['a', 'b']
    """
    return [p for p, _ in leaves_with_paths(tree)]
