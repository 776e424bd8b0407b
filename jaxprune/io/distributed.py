"""Multi-process (multi-controller) training on JAX's distributed runtime.

One Python process per host (or per GPU), all running the same program; ``jax.devices()`` lists
the devices of every process, ``jax.local_devices()`` this process's. This module holds the few
steps that differ from a single-process run; the rest (mesh, shardings, the jitted train step,
pruning under ``jit``) is :mod:`jaxprune.io.sharding` unchanged.

* :func:`initialize` -- ``jax.distributed.initialize`` from arguments or from the environment
  variables the launcher (:mod:`jaxprune.io.launch`) sets (:data:`ENV_COORDINATOR`,
  :data:`ENV_NUM_PROCESSES`, :data:`ENV_PROCESS_ID`, :data:`ENV_LOCAL_DEVICES`), with CPU
  collectives (``gloo``) so cross-process reductions also work on CPU. On a GPU/TPU cluster pass
  the cluster's coordinator address (or nothing: JAX auto-detects TPU pods, SLURM, Open MPI).
* :func:`global_mesh` -- a ``data x model`` Auto mesh over *all* processes' devices, with the
  ``model`` axis inside a process (fast links) and ``data`` across processes by default.
* :func:`process_rows` -- this process's rows of a global batch (deterministic per-process data).
* :func:`put_global` -- place a host value that is the same on every process (fresh params, a
  config) onto a global sharding; :func:`to_host` -- the full value of a global array on every
  process (for logging and compact checkpoints).
* :func:`tree_fingerprint` / :func:`assert_consistent` -- a hash of every shard of a tree,
  exchanged with one collective, so that a mask (or param) replicated across processes is proven
  bit-identical on every process; a mismatch raises naming the leaf.

Example (one process; the same code runs unchanged under ``jaxprune launch -n 2``):
    >>> import jax.numpy as jnp
    >>> initialize()  # no coordinator configured: single process, nothing to do
    False
    >>> mesh = global_mesh(1, 1)
    >>> process_rows(8)
    slice(0, 8, None)
    >>> assert_consistent({"m": jnp.ones((2, 2), bool)})["m"] != 0
    True
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune.core.masks import PyTree, leaves_with_paths, tree_map_masked
from jaxprune.io import sharding as shd

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_LOCAL_DEVICES",
    "InconsistentAcrossProcessesError",
    "initialize",
    "global_mesh",
    "process_rows",
    "put_global",
    "to_host",
    "tree_fingerprint",
    "assert_consistent",
]

#: ``host:port`` of process 0's coordination service
ENV_COORDINATOR = "JAXPRUNE_COORDINATOR_ADDRESS"
#: number of processes in the job
ENV_NUM_PROCESSES = "JAXPRUNE_NUM_PROCESSES"
#: this process's id, ``0 .. N-1``
ENV_PROCESS_ID = "JAXPRUNE_PROCESS_ID"
#: CPU devices per process (``jax_num_cpu_devices``; ignored on GPU/TPU)
ENV_LOCAL_DEVICES = "JAXPRUNE_LOCAL_DEVICES"


class InconsistentAcrossProcessesError(RuntimeError):
    """Copies of the same shard differ between devices/processes (a non-SPMD computation)."""


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"jaxprune: environment variable {name}={v!r} is not an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_cpu_devices: int | None = None,
    cpu_collectives: str = "gloo",
    initialization_timeout: int = 60,
    auto: bool = False,
) -> bool:
    """Join the multi-process job; return whether ``jax.distributed.initialize`` ran.

    Arguments win over the environment (:data:`ENV_COORDINATOR` etc., set by ``jaxprune launch``).
    With neither (and ``auto=False``) this is a single-process run and nothing happens, except
    that ``local_cpu_devices`` still sets ``jax_num_cpu_devices``. ``auto=True`` lets JAX detect
    the cluster (TPU pods, SLURM, Open MPI, Kubernetes). ``cpu_collectives`` (``"gloo"`` or
    ``"mpi"``) makes jitted reductions across processes work on CPU devices. Must run before any
    other JAX computation in the process; a second call returns ``True`` without re-joining.

    >>> initialize(local_cpu_devices=None)
    False
    """
    if jax.distributed.is_initialized():  # already joined (e.g. by the caller): nothing to redo
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if local_cpu_devices is None:
        local_cpu_devices = _env_int(ENV_LOCAL_DEVICES)
    if local_cpu_devices is not None:
        if local_cpu_devices < 1:
            raise ValueError(f"jaxprune: local_cpu_devices must be >= 1, got {local_cpu_devices}")
        jax.config.update("jax_num_cpu_devices", int(local_cpu_devices))
    if not (auto or coordinator_address or num_processes is not None or process_id is not None):
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError(
            "jaxprune: a coordinator address needs num_processes and process_id (arguments or "
            f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); got num_processes={num_processes}, "
            f"process_id={process_id}"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"jaxprune: process_id must be in [0, {num_processes}), got {process_id}"
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {"initialization_timeout": int(initialization_timeout)}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
    return True


def global_mesh(data: int | None = None, model: int | None = None) -> Mesh:
    """A ``data x model`` Auto mesh over every process's devices.

    Defaults: ``model`` = devices per process, ``data`` = number of processes, so params split on
    ``model`` stay inside one process and only the data-parallel gradient sum crosses processes.
    Devices are ordered by process, then local id, so each process's devices are contiguous
    along ``model`` whenever ``model`` divides the per-process count.

    >>> dict(global_mesh().shape) == {"data": jax.process_count(), "model": jax.local_device_count()}
    True
    """
    if model is None:
        model = jax.local_device_count()
    if data is None:
        data = jax.device_count() // model
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return shd.make_mesh(data, model, devices=devs)


def process_rows(global_batch: int, sharding: jax.sharding.Sharding | None = None) -> slice:
    """This process's rows of a global batch of ``global_batch`` rows.

    With ``sharding`` (the batch sharding, e.g. :func:`~jaxprune.io.sharding.batch_sharding`):
    exactly the rows that sharding puts on this process's devices -- all of them when the batch
    is replicated across processes (a mesh whose ``data`` axis stays inside a process). Without
    it: the ``p``-th of ``N`` equal contiguous blocks, which is the same thing on a
    :func:`global_mesh` whose ``data`` axis runs over the processes. Data loading stays a pure
    function of the step: every process builds (or indexes) the same global batch and keeps
    these rows for :func:`~jaxprune.io.sharding.shard_batch`. Raises ``ValueError`` if the rows
    are not one contiguous block or the batch does not divide.

    >>> process_rows(6)
    slice(0, 6, None)
    >>> process_rows(8, shd.batch_sharding(global_mesh(1, 1)))
    slice(0, 8, None)
    """
    if sharding is None:
        n, p = jax.process_count(), jax.process_index()
        if global_batch % n:
            raise ValueError(
                f"jaxprune: global batch {global_batch} is not divisible by the {n} processes"
            )
        per = global_batch // n
        return slice(p * per, (p + 1) * per)
    spans = set()
    for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
        start, stop, step = idx[0].indices(global_batch)
        if step != 1:
            raise ValueError(f"jaxprune: batch sharding {sharding} gives strided rows")
        spans.add((start, stop))
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    covered = np.zeros(hi - lo, bool)
    for s_, e_ in spans:
        covered[s_ - lo:e_ - lo] = True
    if not covered.all():
        raise ValueError(
            f"jaxprune: the rows of a {global_batch}-row batch on process {jax.process_index()} "
            f"are not contiguous under {sharding}; order the mesh's devices by process"
        )
    return slice(lo, hi)


def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
    """Place ``tree`` (host or local-device values, equal on every process) onto global shardings.

    Each process keeps only its addressable shards (``make_array_from_callback``), so nothing
    crosses processes and it works for any mesh, single- or multi-process. ``None`` leaves pass.

    >>> from jaxprune.io.sharding import make_mesh, param_shardings
    >>> w = {"w": np.ones((2, 4), np.float32)}
    >>> put_global(w, param_shardings(w, make_mesh()))["w"].shape
    (2, 4)
    """
    def put(x: Any, s: Any) -> Any:
        if x is None:
            return None
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            raw = jax.make_array_from_callback(data.shape, _key_data_sharding(s, data.ndim),
                                               lambda idx: data[idx])
            return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return tree_map_masked(put, tree, shardings)


def _key_data_sharding(s: NamedSharding, ndim: int) -> NamedSharding:
    spec = tuple(s.spec) + (None,) * (ndim - len(s.spec))
    return NamedSharding(s.mesh, PartitionSpec(*spec[:ndim]))


def to_host(tree: PyTree) -> PyTree:
    """Full numpy values of (possibly non-addressable) global arrays, on every process.

    A collective (all processes must call it); arrays this process can fully address are just
    copied. ``None`` leaves pass through; typed PRNG keys come back as their raw key data.

    >>> import jax.numpy as jnp
    >>> to_host({"a": jnp.arange(3), "b": None})["a"]
    array([0, 1, 2], dtype=int32)
    """
    def get(x: Any) -> Any:
        if x is None:
            return None
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return tree_map_masked(get, tree)


def _u32_to_i32(v: int) -> int:
    return int(np.array(v & 0xFFFFFFFF, np.uint32).view(np.int32))


def _local_shard_table(tree: PyTree) -> tuple[list[str], np.ndarray]:
    """Rows ``(leaf, index-hash, data-hash)`` for every addressable shard of every array leaf."""
    paths, rows = [], []
    leaves = [(p, x) for p, x in leaves_with_paths(tree) if x is not None]
    for li, (path, x) in enumerate(leaves):
        paths.append(path)
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array):
            shards = [(repr(s.index), np.asarray(s.data)) for s in x.addressable_shards]
        else:
            shards = [("host", np.asarray(x))]
        for idx, data in shards:
            data = np.ascontiguousarray(data)
            h = zlib.crc32(str((data.dtype.str, data.shape)).encode())
            h = zlib.crc32(data.view(np.uint8).reshape(-1).tobytes(), h)
            rows.append((li, _u32_to_i32(zlib.crc32(idx.encode())), _u32_to_i32(h)))
    return paths, np.asarray(rows, np.int32).reshape(-1, 3)


def tree_fingerprint(tree: PyTree) -> dict[str, int]:
    """``{leaf path: hash}`` over the leaf's global value, identical on every process.

    The hash combines every distinct shard (by its index) of the array as seen by all processes;
    it is a collective when more than one process runs. Raises
    :class:`InconsistentAcrossProcessesError` if two copies of one shard differ.

    >>> import jax.numpy as jnp
    >>> a = tree_fingerprint({"m": jnp.zeros(3, bool)})
    >>> a == tree_fingerprint({"m": jnp.zeros(3, bool)}), a == tree_fingerprint({"m": jnp.ones(3, bool)})
    (True, False)
    """
    paths, table = _local_shard_table(tree)
    if jax.process_count() > 1:
        counts = multihost_utils.process_allgather(np.int32(table.shape[0]))
        width = int(np.max(counts))
        padded = np.full((width, 3), -1, np.int32)
        padded[: table.shape[0]] = table
        gathered = np.asarray(multihost_utils.process_allgather(padded))  # (procs, width, 3)
        parts = [(pid, gathered[pid, : int(counts[pid])]) for pid in range(gathered.shape[0])]
    else:
        parts = [(0, table)]
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for pid, rows in parts:
        for li, idx, h in rows.tolist():
            prev = seen.setdefault((li, idx), (h, pid))
            if prev[0] != h:
                raise InconsistentAcrossProcessesError(
                    f"jaxprune: leaf '{paths[li]}' differs between process {prev[1]} and process "
                    f"{pid} (the same shard has different contents); the computation that made it "
                    "was not the same on every process (host randomness, per-process data, or "
                    "non-deterministic ops outside jit)"
                )
    out: dict[str, int] = {}
    for li, path in enumerate(paths):
        items = sorted((idx, h) for (lj, idx), (h, _) in seen.items() if lj == li)
        out[path] = zlib.crc32(repr(items).encode())
    return out


def assert_consistent(tree: PyTree, what: str = "tree") -> dict[str, int]:
    """Check that ``tree`` is the same global value on every process; return its fingerprint.

    Use it on masks after a pruning step: they come from a top-k over the *global* sharded
    params under ``jit``, so every copy must agree; a difference raises
    :class:`InconsistentAcrossProcessesError` naming the leaf. Besides the per-shard check,
    every process's whole-tree fingerprint is compared (``multihost_utils.assert_equal``).

    >>> import jax.numpy as jnp
    >>> sorted(assert_consistent({"a": jnp.ones(2), "b": None}, "masks"))
    ['a']
    """
    fp = tree_fingerprint(tree)
    if jax.process_count() > 1:
        digest = np.asarray([_u32_to_i32(v) for v in fp.values()] or [0], np.int32)
        multihost_utils.assert_equal(
            digest, f"jaxprune: {what} fingerprints differ between processes"
        )
    return fp
