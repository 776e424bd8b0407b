"""Orbax checkpoints of the whole training state, resumable bit-exactly.

A checkpoint holds one pytree ``state`` (usually a :class:`TrainState`: params, the optax state
with the pruner's masks and counters, the step, the PRNG key and the data-iterator position) plus
a JSON ``config``. :class:`CheckpointManager` wraps ``orbax.checkpoint.CheckpointManager`` with

* retention (``max_to_keep``) and asynchronous saves (``async_save=True``),
* restore of the latest (or any) step onto a *template* state, on any mesh/sharding — the
  restored arrays take the sharding of the template's leaves (or of ``shardings=``),
* a structure check before restoring: a checkpoint from a different model raises
  :class:`CheckpointMismatchError` naming the first path that differs,
* clear :class:`CheckpointError` on a missing or full directory, including failures of an
  asynchronous save, which surface at the next ``save``/``wait``/``close`` (never silently), and a
  pending asynchronous save is finished (or its failure printed) at interpreter exit when the
  manager was never closed,
* no silent drops: saving a step that exists, or one older than the latest step, raises (or warns
  with ``on_drop="warn"``); ``force=True`` replaces a step crash-safely (the new step is written
  completely, then swapped in by renames; :mod:`jaxprune.io.integrity` finishes or undoes a swap a
  killed process left half done when the directory is next opened),
* a CRC-32 per array, written at save and verified on restore (:class:`IntegrityError` names the
  array whose bytes changed on disk), and a read-only directory opens for restoring.

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

import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
import errno
import os
import shutil
import sys
import uuid
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxprune.core.masks import PyTree
from jaxprune.io import integrity
from jaxprune.io.data import IndexedIterator  # noqa: F401 - re-exported (it used to live here)
from jaxprune.io.integrity import IntegrityError, _at_exit, _step_index
from jaxprune.io.trees import (
    CheckpointMismatchError,
    _nbytes,
    _rewrap_keys,
    _to_savable,
    abstract_state,
    check_structure,
    dir_size,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "IntegrityError",
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


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _unwritable_reason(directory: str) -> str | None:
    """``None`` if ``directory`` (created if missing) is writable, else why not (read-only, full)."""
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
        return f"'{directory}' is {why} ({e.strerror or e})"
    return None


def _handlers(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
            "checksums": ocp.JsonCheckpointHandler(), **(extra or {})}


# Files without which a step cannot be read, and what each holds (for the error message).
_REQUIRED = {"_CHECKPOINT_METADATA": "the step's metadata", "state/_METADATA": "the state's tree",
             "state/manifest.ocdbt": "the arrays' index", "config/metadata": "the config"}


# Managers with an asynchronous save in flight (strong references: a manager dropped without
# close() must still finish its save); emptied by wait()/close().
_PENDING: set[CheckpointManager] = set()


def _finish_pending_at_exit() -> None:
    """Finish the pending async save of every manager never closed (or print its failure)."""
    for mgr in list(_PENDING):
        pending = mgr._pending
        print(f"jaxprune: CheckpointManager('{mgr.directory}') was not closed; finishing the "
              f"asynchronous save of step {pending} before exit", file=sys.stderr)
        try:
            mgr.close()
        except Exception as e:  # noqa: BLE001 - reported, the interpreter is exiting
            print(f"jaxprune: the asynchronous save of step {pending} in '{mgr.directory}' "
                  f"FAILED at exit and is lost: {e}", file=sys.stderr)
            continue
        print(f"jaxprune: step {pending} is saved in '{mgr.directory}'", file=sys.stderr)


_at_exit(_finish_pending_at_exit)


# ----------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save/restore the training state with retention, async saves and integrity checks.

    Args:
      directory: where steps are stored (made absolute; created if missing). A directory that
        exists but is read-only opens for restoring; ``save`` then raises.
      max_to_keep: keep at most this many most recent steps (``None``: keep all).
      save_interval_steps: ``save`` only writes on multiples of this (``force=True`` overrides).
      async_save: write in a background thread; errors surface at the next ``save``/``wait``,
        and a save still running at interpreter exit is finished then (or its failure printed).
      min_free_factor: refuse to save (``CheckpointError``) unless the filesystem has this many
        times the state's size free (``0`` disables the check).
      on_drop: what ``save`` does with a step it would not keep (it exists, or it is older than
        the latest step): ``"raise"`` (default, :class:`CheckpointError`) or ``"warn"`` (a
        ``UserWarning`` and ``save`` returns ``False``).
      items: extra orbax items saved next to the state, ``{name: handler}`` (e.g. a data
        iterator: ``{"data": jaxprune.io.data.ProcessBatchesHandler()}``); pass their
        args as ``items=`` to :meth:`save` and :meth:`restore`.

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
        on_drop: str = "raise",
        items: dict[str, Any] | None = None,
    ):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
            raise ValueError(f"jaxprune: max_to_keep must be >= 1 or None, got {max_to_keep}")
        if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) \
                or save_interval_steps < 1:
            raise ValueError("jaxprune: save_interval_steps must be an integer >= 1, got "
                             f"{save_interval_steps!r}")
        if not float(min_free_factor) >= 0:
            raise ValueError(f"jaxprune: min_free_factor must be >= 0, got {min_free_factor}")
        if on_drop not in ("raise", "warn"):
            raise ValueError(f"jaxprune: on_drop must be 'raise' or 'warn', got {on_drop!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only: str | None = None  # why saving is impossible, or None
        if jax.process_index() == 0:
            self.read_only = _unwritable_reason(self.directory)
            if self.read_only is None:
                for msg in integrity.recover(self.directory):
                    warnings.warn(f"jaxprune: checkpoint directory '{self.directory}': {msg}",
                                  stacklevel=2)
        self.min_free_factor = float(min_free_factor)
        self.async_save = bool(async_save)
        self.save_interval_steps = save_interval_steps
        self.on_drop = on_drop
        self._items = dict(items or {})
        if set(self._items) & set(_handlers()):
            raise ValueError(f"jaxprune: items may not be named {sorted(_handlers())}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=self.async_save,
            create=self.read_only is None,
            read_only=self.read_only is not None,
            todelete_subdir=None if self.read_only else integrity.DELETED_SUBDIR,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_handlers(self._items))
        self._pending: int | None = None

    # context manager ------------------------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _raise(self, what: str, e: BaseException) -> None:
        if isinstance(e, CheckpointError | IntegrityError | CheckpointMismatchError):
            raise e
        hint = " (its files may be damaged or truncated; restore another step)" if what.startswith(
            ("restoring", "reading")) else ""
        raise CheckpointError(
            f"jaxprune: {what} in '{self.directory}' failed{hint}: {type(e).__name__}: {e}"
        ) from e

    def wait(self) -> None:
        """Block until pending async saves are on disk; raise :class:`CheckpointError` if any
        failed (so a run never continues as if it had saved)."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            self._raise("an asynchronous checkpoint save", e)
        finally:
            self._pending = None
            _PENDING.discard(self)
            if self.read_only is None and jax.process_index() == 0:
                integrity.purge_deleted(self.directory)  # steps dropped by retention

    def _drop(self, why: str) -> bool:
        msg = f"jaxprune: CheckpointManager.save: {why}"
        if self.on_drop == "warn":
            warnings.warn(msg + " (not saved)", stacklevel=3)
            return False
        raise CheckpointError(msg + " (pass on_drop='warn' to the manager to skip such saves "
                              "with a warning)")

    def save(self, step: int, state: PyTree, *, config: dict[str, Any] | None = None,
             force: bool = False, wait: bool = False, items: dict[str, Any] | None = None) -> bool:
        """Save ``state`` (and the JSON-serialisable ``config``; ``items``: args of the extra
        items, ``{name: args}``) as ``step``.

        Returns whether a save was started: ``False`` only when ``step`` is not on the save
        interval (or, with ``on_drop="warn"``, for a dropped step). A step that already exists,
        or is older than the latest step, raises :class:`CheckpointError` (it would otherwise
        be dropped) unless ``force=True``, which saves regardless of the interval and replaces
        an existing step crash-safely: the new step is written completely (synchronously)
        before the old one is removed. Also raises :class:`CheckpointError` if the directory is
        read-only, full or unwritable, or if an earlier async save failed; a negative or
        non-integer ``step`` raises ``ValueError``/``TypeError``.

        >>> import tempfile
        >>> with CheckpointManager(tempfile.mkdtemp()) as m:
        ...     m.save(0, {"w": jnp.ones(2)}, wait=True)
        True
        """
        step = _step_index(step)
        if self.read_only is not None:
            raise CheckpointError(f"jaxprune: cannot save step {step}: checkpoint directory "
                                  f"{self.read_only}; it is open for restoring only")
        self.wait()  # surfaces a failed previous async save before starting another
        if jax.process_index() == 0 and self.min_free_factor > 0:
            need = int(self.min_free_factor * _nbytes(state))
            free = _free_bytes(self.directory)
            if free < need:
                raise CheckpointError(
                    f"jaxprune: checkpoint directory '{self.directory}' is full: {free} bytes "
                    f"free, step {step} needs about {need}; free space or use another directory"
                )
        steps = self.all_steps()
        if not force:
            if step in steps:
                return self._drop(f"step {step} already exists in '{self.directory}'; pass "
                                  "force=True to replace it (the new step is written completely "
                                  "before the old one is removed)")
            if steps and step < steps[-1]:
                return self._drop(
                    f"step {step} is older than the latest step {steps[-1]} in "
                    f"'{self.directory}' (did the run resume from an earlier step?), so restore() "
                    f"would still return step {steps[-1]}; call delete_steps_after({step}) to "
                    "discard the newer steps first, or pass force=True to save it anyway")
            if step % self.save_interval_steps:
                return False
        savable = _to_savable(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(savable),
            config=ocp.args.JsonSave(dict(config or {})),
            checksums=ocp.args.JsonSave(integrity.checksums(savable)),
            **self._item_args(items),
        )
        if step in steps:
            self._replace(step, args)
            return True
        try:
            saved = self._mgr.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001
            self._raise(f"saving step {step}", e)
        if saved and self.async_save:
            self._pending = step
            _PENDING.add(self)
        if wait:
            self.wait()
        return bool(saved)

    def _replace(self, step: int, args: Any) -> None:
        """Write ``step`` into a staging directory, then swap it in (:func:`integrity.swap_in`)."""
        staging = os.path.join(self.directory, f"{integrity.STAGING_PREFIX}{step}")
        try:
            if jax.process_index() == 0 and os.path.exists(staging):
                shutil.rmtree(staging)
            options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
            with ocp.CheckpointManager(staging, options=options, item_handlers=_handlers(self._items)) as m:
                m.save(step, args=args, force=True)
                m.wait_until_finished()
            if jax.process_index() == 0:
                integrity.swap_in(os.path.join(staging, str(step)),
                                  os.path.join(self.directory, str(step)))
                shutil.rmtree(staging, ignore_errors=True)
            if jax.process_count() > 1:
                ocp.multihost.sync_global_processes(f"jaxprune_replace_{step}")
        except Exception as e:  # noqa: BLE001
            if jax.process_index() == 0:
                integrity.recover(self.directory)  # put the old step back if it was moved
            self._raise(f"replacing step {step}", e)
        finally:
            self._mgr.reload()

    def delete_steps_after(self, step: int) -> list[int]:
        """Delete every saved step newer than ``step`` (e.g. after resuming from ``step`` to
        train a different continuation); returns the deleted steps.

        >>> import tempfile
        >>> with CheckpointManager(tempfile.mkdtemp(), async_save=False) as m:
        ...     _ = [m.save(s, {"w": jnp.ones(1)}) for s in (1, 2, 3)]
        ...     m.delete_steps_after(1), m.all_steps()
        ([2, 3], [1])
        """
        step = _step_index(step)
        if self.read_only is not None:
            raise CheckpointError(f"jaxprune: cannot delete steps: directory {self.read_only}")
        self.wait()
        gone = [s for s in self.all_steps() if s > step]
        for s in gone:
            self._mgr.delete(s)
        self._mgr.reload()
        return gone

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
            step = steps[-1]
        elif _step_index(step) not in steps:
            raise CheckpointError(
                f"jaxprune: no checkpoint for step {step} in '{self.directory}' (have {steps})"
            )
        step = int(step)
        step_dir = os.path.join(self.directory, str(step))
        required = dict(_REQUIRED)
        if os.path.isdir(os.path.join(step_dir, "checksums")):
            required["checksums/metadata"] = "the arrays' checksums"
        missing = [f"{f} ({what})" for f, what in required.items()
                   if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, f))]
        if missing:
            raise CheckpointError(
                f"jaxprune: checkpoint step {step} in '{self.directory}' is damaged: "
                f"{', '.join(missing)} missing; restore another step (have {steps})"
            )
        return step

    def saved_structure(self, step: int | None = None) -> PyTree:
        """Orbax metadata tree (shapes/dtypes) of the saved state at ``step`` (default latest)."""
        step = self._resolve(step)
        try:
            md = self._mgr.item_metadata(step)
            md = md["state"] if hasattr(md, "__getitem__") else md.state
        except Exception as e:  # noqa: BLE001
            self._raise(f"reading the metadata of step {step}", e)
        if md is None:
            raise CheckpointError(f"jaxprune: checkpoint step {step} in '{self.directory}' has "
                                  "no readable state metadata; it is damaged")
        return getattr(md, "tree", md)

    def restore(self, template: PyTree, step: int | None = None, *,
                shardings: PyTree | None = None,
                items: dict[str, Any] | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore ``(state, config)`` from ``step`` (default: latest) into ``template``'s tree.

        ``items``: restore args of the extra items, ``{name: args}``, restored in place (e.g. a
        data iterator's state); a step without such an item raises :class:`CheckpointError`.
        ``template`` is a state of the same model (e.g. freshly initialised, possibly sharded on
        another mesh); restored arrays get the template leaves' shardings unless ``shardings``
        (a tree of ``jax.sharding.Sharding`` like the state) is given. Raises
        :class:`CheckpointMismatchError` naming the first differing path when the checkpoint is
        from another model/optimizer, :class:`CheckpointError` when there is no such step or its
        metadata files are missing, :class:`IntegrityError` naming the array whose bytes differ
        from what was saved.

        >>> import tempfile
        >>> with CheckpointManager(tempfile.mkdtemp(), async_save=False) as m:
        ...     _ = m.save(0, {"w": jnp.ones(2)})
        ...     m.restore({"w": jnp.zeros(3)})
        Traceback (most recent call last):
        ...
        jaxprune.io.trees.CheckpointMismatchError: jaxprune: checkpoint does not match the \
model at 'w': checkpoint shape (2,), model shape (3,)
        """
        extra, step = items, self._resolve(step)
        check_structure(template, self.saved_structure(step))
        target = abstract_state(template, shardings)
        items = {"state": ocp.args.StandardRestore(target), "config": ocp.args.JsonRestore()}
        has_sums = os.path.isdir(os.path.join(self.directory, str(step), "checksums"))
        if has_sums:  # checkpoints written before checksums existed restore unchecked
            items["checksums"] = ocp.args.JsonRestore()
        items.update(self._item_args(extra, step))
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            self._raise(f"restoring step {step}", e)
        if has_sums:
            try:
                integrity.verify_checksums(out["state"], dict(out["checksums"] or {}))
            except IntegrityError as e:
                raise IntegrityError(f"{e} (step {step} in '{self.directory}')") from None
        return _rewrap_keys(template, out["state"]), dict(out["config"] or {})

    def _item_args(self, args: dict[str, Any] | None, step: int | None = None) -> dict[str, Any]:
        for name in args or {}:
            if name not in self._items:
                raise ValueError(f"jaxprune: item '{name}' was not declared when the "
                                 f"CheckpointManager was made (items={sorted(self._items)})")
            if step is not None and not os.path.isdir(os.path.join(self.directory, str(step), name)):
                raise CheckpointError(f"jaxprune: checkpoint step {step} in '{self.directory}' "
                                      f"has no '{name}' item")
        return dict(args or {})

    def config(self, step: int | None = None) -> dict[str, Any]:
        """The JSON config saved with ``step`` (default: latest)."""
        step = self._resolve(step)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:  # e.g. a truncated config file: JSONDecodeError
            self._raise(f"reading the config of step {step}", e)
        return dict(out["config"] or {})

    def close(self) -> None:
        """Wait for pending saves (raising :class:`CheckpointError` on failure) and release."""
        try:
            self.wait()
        finally:
            self._mgr.close()
