"""Data iterators whose position is part of the checkpoint, so a resumed run sees the same batches.

* :class:`IndexedIterator` -- batch ``i`` is ``fn(i)``; its position is ``TrainState.data_pos``.
* :class:`ProcessBatches` -- this process's rows of consecutive global batches through a grain
  pipeline with per-process sharding (grain ``ShardOptions``: each process reads only its rows).
  Element ``t`` of every process's dataset is its part of global batch ``t``, so the grain
  iterator's position *is* the global step, on any number of processes.
* :class:`ProcessBatchesHandler` -- an orbax item handler (``CheckpointManager(items=...)``):
  every process writes its iterator state (``process_<i>-of-<n>.json``, like grain's own
  handler); a restore reads all of them, checks that they agree
  (:func:`merge_process_states`) and continues from that global position -- also with another
  process count (2 -> 1, 1 -> 2). States that disagree, or that were saved by a pipeline with
  another global batch or data ``key``, raise :class:`DataStateError` (never different data).

grain is imported only when a :class:`ProcessBatches` is made (``import jaxprune`` does not
need it).

Example (one process; under ``jaxprune launch -n 2`` pass the batch sharding and each process
gets its half of every batch):
    >>> import numpy as np
    >>> it = ProcessBatches(np.arange(12), 4)
    >>> next(it), next(it), it.position
    (array([0, 1, 2, 3]), array([4, 5, 6, 7]), 2)
    >>> again = ProcessBatches(np.arange(12), 4)
    >>> again.set_state(it.get_state()); next(again)
    array([ 8,  9, 10, 11])
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = [
    "IndexedIterator",
    "DataStateError",
    "DATA_STATE_VERSION",
    "ProcessBatches",
    "ProcessBatchesHandler",
    "ProcessBatchesSave",
    "ProcessBatchesRestore",
    "merge_process_states",
]


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


class DataStateError(ValueError):
    """A saved data-iterator state does not fit this pipeline or these processes."""


#: format of the state dict of :class:`ProcessBatches` (bumped if its meaning changes)
DATA_STATE_VERSION = 1


def _grain_step(grain_state: Any) -> int:
    """The element index in the state of grain's ``MapDataset.to_iter_dataset()`` iterator."""
    if not (isinstance(grain_state, dict) and set(grain_state) == {"next_index"}
            and isinstance(grain_state["next_index"], int)):
        raise DataStateError(
            f"jaxprune: unexpected grain iterator state {grain_state!r} (expected "
            "{'next_index': int}); the installed grain changed its state format, so the global "
            "data position cannot be read from it"
        )
    return grain_state["next_index"]


class ProcessBatches:
    """This process's rows of consecutive global batches, read through a grain pipeline.

    Global batch ``t`` is records ``t*B .. t*B+B-1`` of ``source`` (any random-access source:
    ``len`` and ``__getitem__``, e.g. a ``grain`` data source; ``B = global_batch``); only the
    trailing ``len(source) % B`` records are never used. This process reads only its rows
    ``lo .. hi`` of each batch (:func:`~jaxprune.io.distributed.process_rows` of ``sharding``,
    the batch sharding) and stacks them (``grain.MapDataset.batch``). Per-process sharding is grain's
    ``ShardOptions(shard_index=lo // (hi - lo), shard_count=B // (hi - lo))`` applied to the
    dataset of ``hi - lo``-row sub-batches as the strided slice ``[shard_index::shard_count]``,
    so element ``t`` of *every* process's dataset is its part of global batch ``t``: the grain
    iterator's position is the global step on every process, whatever the process count. That
    is what makes the state portable -- saved by N processes, restored by M (2 -> 1, 1 -> 2) --
    and :class:`ProcessBatchesHandler` saves it inside an orbax checkpoint.

    ``key`` names the data stream (e.g. corpus, seed, sequence length); it is saved with the
    state and a restore into a pipeline with another ``key`` or global batch raises
    :class:`DataStateError` instead of silently feeding different data. grain is imported here
    (lazily: ``import jaxprune`` does not need it). ``num_threads``/``prefetch`` are grain's
    ``ReadOptions`` (background reads of the next batches).

    >>> import numpy as np
    >>> it = ProcessBatches(np.arange(10) * 10, 4)
    >>> next(it), it.position, it.steps
    (array([ 0, 10, 20, 30]), 1, 2)
    >>> it.get_state()["global_step"]
    1
    """

    def __init__(self, source: Any, global_batch: int, sharding: jax.sharding.Sharding | None = None,
                 *, key: str = "", num_threads: int = 1, prefetch: int = 2):
        import grain

        from jaxprune.io.distributed import process_rows  # (distributed imports checkpoint)

        if isinstance(global_batch, bool) or int(global_batch) < 1:
            raise ValueError(f"jaxprune: global_batch must be >= 1, got {global_batch}")
        self.global_batch = int(global_batch)
        self.key = str(key)
        self.records = len(source)
        self.steps = self.records // self.global_batch
        if self.steps < 1:
            raise ValueError(f"jaxprune: the source has {self.records} records, fewer than one "
                             f"global batch of {self.global_batch}")
        rows = process_rows(self.global_batch, sharding)
        per = rows.stop - rows.start
        if rows.start % per or self.global_batch % per:
            raise ValueError(f"jaxprune: this process's rows {rows.start}:{rows.stop} of a "
                             f"{self.global_batch}-row batch are not an aligned block")
        self.rows = rows
        self.shard = grain.sharding.ShardOptions(shard_index=rows.start // per,
                                                 shard_count=self.global_batch // per,
                                                 drop_remainder=True)
        n = self.shard.shard_count
        ds = grain.MapDataset.source(source).batch(per, drop_remainder=True)[: self.steps * n]
        self.dataset = ds[self.shard.shard_index::n]  # element t: our rows of global batch t
        self._read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it = iter(self.dataset.to_iter_dataset(self._read))

    def __iter__(self) -> ProcessBatches:
        return self

    def __next__(self) -> Any:
        return next(self._it)

    @property
    def position(self) -> int:
        """Global batches consumed so far (the next batch is global batch ``position``)."""
        return _grain_step(self._it.get_state())

    def get_state(self) -> dict[str, Any]:
        """A JSON-able state: the global step, the grain iterator's own state and what the step
        means (global batch, ``key``); identical on every process of the job."""
        g = self._it.get_state()
        return {"version": DATA_STATE_VERSION, "global_step": _grain_step(g),
                "global_batch": self.global_batch, "key": self.key, "grain": g}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`get_state`, of any process count).

        Raises :class:`DataStateError` if it was saved by a pipeline with another global batch
        or ``key``, or is malformed.
        """
        if not isinstance(state, dict) or state.get("version") != DATA_STATE_VERSION:
            raise DataStateError(f"jaxprune: not a ProcessBatches state (version "
                                 f"{DATA_STATE_VERSION}): {state!r}")
        for field, mine in (("global_batch", self.global_batch), ("key", self.key)):
            if state.get(field) != mine:
                raise DataStateError(
                    f"jaxprune: the saved data iterator had {field}={state.get(field)!r}, this "
                    f"pipeline has {field}={mine!r}; resuming would feed different batches")
        step = state["global_step"]
        if _grain_step(state["grain"]) != step:
            raise DataStateError(f"jaxprune: saved data state is inconsistent: global_step "
                                 f"{step} but grain state {state['grain']!r}")
        if not 0 <= step <= self.steps:
            raise DataStateError(f"jaxprune: saved data position {step} is outside this "
                                 f"pipeline's {self.steps} global batches")
        self._it.set_state(dict(state["grain"]))


def merge_process_states(states: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
    """The one global data state from the per-process states of a checkpoint.

    ``states`` maps ``(process_index, process_count)`` to that process's
    :meth:`ProcessBatches.get_state`. Every process of the saving job must be present and all
    must agree (same global step, batch and ``key``); otherwise :class:`DataStateError` says
    which process differs -- resuming from such a checkpoint, with any process count, would
    feed different data than the uninterrupted run.

    >>> s = {"version": 1, "global_step": 3, "global_batch": 8, "key": "", "grain": {"next_index": 3}}
    >>> merge_process_states({(0, 2): s, (1, 2): s})["global_step"]
    3
    """
    if not states:
        raise DataStateError("jaxprune: the checkpoint holds no data-iterator state")
    counts = {n for _, n in states}
    if len(counts) != 1:
        raise DataStateError(f"jaxprune: data states from jobs of different sizes {sorted(counts)}")
    (n,) = counts
    missing = sorted(set(range(n)) - {i for i, _ in states})
    if missing:
        raise DataStateError(f"jaxprune: the data state of process(es) {missing} of {n} is "
                             "missing from the checkpoint")
    ref = states[(0, n)]
    for (i, _), s in sorted(states.items()):
        diff = [f for f in ("version", "global_step", "global_batch", "key") if s.get(f) != ref.get(f)]
        if diff:
            raise DataStateError(
                f"jaxprune: data states differ between process 0 and process {i} of {n} in "
                f"{diff} ({[ref.get(f) for f in diff]} vs {[s.get(f) for f in diff]}); the "
                "processes did not consume the same global batches")
    return ref


class ProcessBatchesHandler(ocp.CheckpointHandler):
    """Orbax handler for a :class:`ProcessBatches` state (an item of a composite checkpoint).

    Like grain's own ``grain.checkpoint.CheckpointHandler`` every process writes its state as
    ``process_<i>-of-<n>.json``; unlike it, restoring with another process count works: all
    saved files are read, checked to agree (:func:`merge_process_states`) and the one global
    state is set on this process's iterator. Save with :class:`ProcessBatchesSave` (a snapshot
    of the state, taken when ``save`` is called), restore with :class:`ProcessBatchesRestore`.

    >>> import tempfile, numpy as np
    >>> from etils import epath
    >>> d, it = epath.Path(tempfile.mkdtemp()), ProcessBatches(np.arange(8), 2)
    >>> _ = next(it)
    >>> ProcessBatchesHandler().save(d, ProcessBatchesSave(it.get_state()))
    >>> ProcessBatchesHandler().restore(d, ProcessBatchesRestore(ProcessBatches(np.arange(8), 2))
    ...                                 )["global_step"]
    1
    """

    def save(self, directory: Any, args: ProcessBatchesSave) -> None:  # type: ignore[override]
        """Write this process's state to ``directory``."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: Any, args: ProcessBatchesRestore) -> dict[str, Any]:  # type: ignore[override]
        """Set the merged global state on ``args.item``; return that state."""
        states = {}
        for f in directory.glob("process_*-of-*.json"):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
            if m:
                states[(int(m[1]), int(m[2]))] = json.loads(f.read_text())
        try:
            state = merge_process_states(states)
        except DataStateError as e:
            raise DataStateError(f"{e} (in '{directory}')") from None
        args.item.set_state(state)
        return state

    def structure(self, directory: Any) -> None:
        """No tree structure (required by the interface)."""
        return None

    def metadata(self, directory: Any) -> None:
        """No metadata (required by the interface)."""
        return None

    def finalize(self, directory: Any) -> None:
        """Nothing to finalize."""

    def close(self) -> None:
        """Nothing to release."""


@ocp.args.register_with_handler(ProcessBatchesHandler, for_save=True)
@dataclasses.dataclass
class ProcessBatchesSave(ocp.args.CheckpointArgs):
    """Save args: ``state`` = :meth:`ProcessBatches.get_state` at the step being saved."""

    state: dict[str, Any]


@ocp.args.register_with_handler(ProcessBatchesHandler, for_restore=True)
@dataclasses.dataclass
class ProcessBatchesRestore(ocp.args.CheckpointArgs):
    """Restore args: ``item`` = the :class:`ProcessBatches` to continue (set in place)."""

    item: ProcessBatches
