"""Sparse training on a device mesh: params, masks and optimizer state sharded alike.

* :func:`make_mesh` builds a ``(data, model)`` mesh with ``jax.make_mesh`` and ``AxisType.Auto``
  axes (under ``jax.make_mesh``'s default Explicit axes, ``top_k``/``quantile``/sorts over sharded
  params raise).
* :func:`param_specs` / :func:`param_shardings` choose a ``PartitionSpec`` per param: by default
  the last dim of every leaf with ``ndim >= 2`` is split over ``model`` (a Dense kernel
  ``(in, out)`` is split by output unit, Megatron-style); 1-D leaves are replicated. ``rules``
  (``((regex, PartitionSpec), ...)``) override per path.
* **Indivisible dims**: a mesh axis whose size does not divide the dim it shards raises
  ``ValueError`` naming the path, dim and axis (``indivisible="error"``, the default), so a layout
  never changes silently; ``indivisible="replicate"`` replicates that dim instead.
* :func:`state_shardings` gives every leaf of any state (a :class:`~jaxprune.io.checkpoint.TrainState`,
  an optax state with a :class:`~jaxprune.training.PruneState`) the sharding of the param it
  mirrors — matched by path suffix and shape — so masks and Adam moments are sharded exactly like
  their params; ``None`` mask leaves stay ``None``; everything else (counters, keys) is replicated.
* :func:`make_sharded_train_step` jits one step with those shardings as ``in_shardings`` and
  ``out_shardings``, so pruning (:func:`jaxprune.pruner`, any allocation incl. ``Global``)
  runs under ``jit`` on the sharded arrays and the new masks come out sharded like the params.
* :func:`initialize_distributed` wires ``jax.distributed.initialize`` for multi-host slices
  (see :mod:`jaxprune.io.distributed` for the multi-process helpers and
  :mod:`jaxprune.io.launch` for local multi-process jobs); :func:`shard_batch` builds global
  batches from per-process data.

Example:
    >>> import jax.numpy as jnp
    >>> mesh = make_mesh(1, 1)
    >>> sh = param_shardings({"d": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}}, mesh)
    >>> tuple(sh["d"]["kernel"].spec), tuple(sh["d"]["bias"].spec)
    ((None, 'model'), ())
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401  (doctests)
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxprune.core.masks import (
    PyTree,
    leaves_with_paths,
    tree_map_masked,
    tree_map_with_path_masked,
)
from jaxprune.io.checkpoint import TrainState

__all__ = [
    "make_mesh",
    "param_specs",
    "param_shardings",
    "state_shardings",
    "mask_shardings",
    "shard",
    "batch_sharding",
    "shard_batch",
    "init_train_state",
    "make_sharded_train_step",
    "initialize_distributed",
]


def make_mesh(data: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None,
              axis_names: tuple[str, str] = ("data", "model")) -> Mesh:
    """A ``data x model`` mesh with Auto axis types over the first ``data*model`` devices.

    Built by ``jax.make_mesh``, which orders the devices for the physical topology (TPU rings).

    >>> dict(make_mesh(1, 1).shape)
    {'data': 1, 'model': 1}
    """
    devs = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise ValueError(f"jaxprune: mesh axes must be >= 1, got data={data}, model={model}")
    if data * model > len(devs):
        raise ValueError(
            f"jaxprune: mesh data={data} x model={model} needs {data * model} devices, "
            f"only {len(devs)} available"
        )
    return jax.make_mesh((data, model), tuple(axis_names), (AxisType.Auto, AxisType.Auto),
                         devices=devs[: data * model])


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    missing = [n for n in names if n not in mesh.shape]
    if missing:
        raise ValueError(f"jaxprune: mesh has no axis {missing[0]!r} (axes {tuple(mesh.shape)})")
    return math.prod(mesh.shape[n] for n in names)


def _fit_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh,
              indivisible: str) -> PartitionSpec:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        raise ValueError(
            f"jaxprune: PartitionSpec {spec} for '{path}' has more entries than its "
            f"{len(shape)} dims"
        )
    for d, e in enumerate(entries):
        size = _axis_size(mesh, e)
        if size > 1 and shape[d] % size:
            if indivisible == "replicate":
                entries[d] = None
                continue
            raise ValueError(
                f"jaxprune: cannot shard '{path}' with shape {tuple(shape)}: dim {d} (length "
                f"{shape[d]}) is not divisible by mesh axis {e!r} of size {size}. Pick a mesh "
                "that divides it, add a rule for this path, or pass indivisible='replicate'"
            )
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def param_specs(
    params: PyTree,
    mesh: Mesh,
    *,
    model_axis: str = "model",
    rules: Sequence[tuple[str, PartitionSpec]] = (),
    indivisible: str = "error",
) -> PyTree:
    """A ``PartitionSpec`` per param leaf (``None`` leaves stay ``None``).

    Default: last dim of ``ndim >= 2`` leaves on ``model_axis``, other leaves replicated; the
    first ``rules`` entry whose regex matches the path wins. ``indivisible``: ``"error"`` or
    ``"replicate"`` (see the module docstring).

    >>> tuple(param_specs({"k": jnp.ones((3, 5))}, make_mesh(1, 1))["k"])
    (None, 'model')
    """
    if indivisible not in ("error", "replicate"):
        raise ValueError(f"jaxprune: indivisible must be 'error' or 'replicate', got {indivisible!r}")
    if model_axis not in mesh.shape:
        raise ValueError(f"jaxprune: mesh has no axis {model_axis!r} (axes {tuple(mesh.shape)})")
    compiled = [(re.compile(r), s) for r, s in rules]

    def spec_for(path: str, leaf: Any) -> PartitionSpec | None:
        if leaf is None:
            return None
        shape = tuple(leaf.shape)
        for rx, s in compiled:
            if rx.search(path):
                return _fit_spec(path, shape, s, mesh, indivisible)
        if len(shape) >= 2:
            s = PartitionSpec(*([None] * (len(shape) - 1)), model_axis)
            return _fit_spec(path, shape, s, mesh, indivisible)
        return PartitionSpec()

    return tree_map_with_path_masked(spec_for, params)


def param_shardings(params: PyTree, mesh: Mesh, **kwargs: Any) -> PyTree:
    """``NamedSharding`` per param from :func:`param_specs` (same keyword arguments).

    >>> tuple(param_shardings({"b": jnp.ones(3)}, make_mesh(1, 1))["b"].spec)
    ()
    """
    specs = param_specs(params, mesh, **kwargs)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(state: PyTree, params: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for every leaf of ``state`` (arrays or ``ShapeDtypeStruct``).

    A leaf whose path ends with a param's path (longest match) and has that param's shape gets
    the param's sharding (masks, moments, the params themselves); ``None`` stays ``None``; all
    other leaves are replicated over ``mesh``.

    >>> mesh = make_mesh(1, 1)
    >>> p = {"d": {"kernel": jnp.ones((2, 4))}}
    >>> st = {"mu": p, "masks": {"d": {"kernel": None}}, "count": jnp.zeros([])}
    >>> sh = state_shardings(st, p, param_shardings(p, mesh), mesh)
    >>> tuple(sh["mu"]["d"]["kernel"].spec), sh["masks"]["d"]["kernel"], tuple(sh["count"].spec)
    ((None, 'model'), None, ())
    """
    by_path: dict[str, tuple[tuple[int, ...], Any]] = {}
    for (path, p), (_, s) in zip(leaves_with_paths(params), leaves_with_paths(shardings),
                                 strict=True):
        if p is not None:
            by_path[path] = (tuple(p.shape), s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: str, leaf: Any) -> Any:
        if leaf is None:
            return None
        parts = path.split("/")
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    return tree_map_with_path_masked(pick, state)


def mask_shardings(masks: PyTree, shardings: PyTree) -> PyTree:
    """The param shardings where a mask exists, ``None`` where the mask is ``None``.

    >>> mask_shardings({"a": None, "b": True}, {"a": 1, "b": 2})
    {'a': None, 'b': 2}
    """
    return tree_map_masked(lambda m, s: None if m is None else s, masks, shardings)


def shard(tree: PyTree, shardings: PyTree) -> PyTree:
    """``jax.device_put`` of ``tree`` onto ``shardings`` (``None`` leaves pass through).

    >>> x = shard({"w": jnp.ones((2, 2))}, param_shardings({"w": jnp.ones((2, 2))}, make_mesh()))
    >>> tuple(x["w"].sharding.spec)
    (None, 'model')
    """
    return tree_map_masked(lambda x, s: x if x is None else jax.device_put(x, s), tree, shardings)


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
    """Sharding of a batch: leading (batch) dim split over ``data_axis``.

    >>> tuple(batch_sharding(make_mesh()).spec)
    ('data',)
    """
    return NamedSharding(mesh, PartitionSpec(data_axis))


def shard_batch(batch: PyTree, sharding: NamedSharding) -> PyTree:
    """Global arrays from this process's part of the batch (the whole batch on one host).

    Uses ``jax.make_array_from_process_local_data``, so on a multi-host slice each process passes
    only its own rows. Raises ``ValueError`` if the batch dim does not divide the data axis.

    >>> shard_batch(np.ones((4, 3)), batch_sharding(make_mesh())).shape
    (4, 3)
    """
    n = _axis_size(sharding.mesh, sharding.spec[0] if len(sharding.spec) else None)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] * jax.process_count() % n:
            raise ValueError(
                f"jaxprune: global batch {x.shape[0] * jax.process_count()} is not divisible "
                f"by the data axis size {n}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def init_train_state(params: PyTree, tx: optax.GradientTransformation, mesh: Mesh, *,
                     seed: int = 0, **spec_kwargs: Any) -> tuple[TrainState, PyTree]:
    """Shard ``params`` on ``mesh`` and build a sharded :class:`TrainState` under ``jit``.

    Returns ``(state, state_shardings)``; masks and optimizer moments are born sharded like
    their params (no gather through one device).

    >>> import optax
    >>> st, sh = init_train_state({"k": jnp.ones((2, 4))}, optax.sgd(0.1), make_mesh())
    >>> st.params["k"].sharding == sh.params["k"]
    True
    """
    psh = param_shardings(params, mesh, **spec_kwargs)
    params = shard(params, psh)

    def create(p):
        return TrainState.create(p, tx.init(p), seed=seed)

    try:
        abstract = jax.eval_shape(create, params)
    except jax.errors.ConcretizationTypeError:
        # an init that inspects values in Python (e.g. sparse_training's empty-mask check)
        # cannot be traced: build it eagerly, then place every leaf on its sharding
        state = create(params)
        ssh = state_shardings(state, params, psh, mesh)
        return shard(state, ssh), ssh
    ssh = state_shardings(abstract, params, psh, mesh)
    state = jax.jit(create, out_shardings=ssh)(params)
    return state, ssh


def make_sharded_train_step(
    loss_fn: Callable[[PyTree, Any, jax.Array], jax.Array],
    tx: optax.GradientTransformation,
    shardings: PyTree,
    batch_shard: NamedSharding,
    *,
    donate: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, jax.Array]]:
    """Jitted ``(state, batch, mask_update=None) -> (state, loss)`` with fixed in/out shardings.

    ``loss_fn(params, batch, rng)``; ``shardings`` from :func:`init_train_state`. Each step
    splits ``state.rng``, applies ``tx`` (e.g. :func:`jaxprune.pruner`) and advances
    ``state.step`` and ``state.data_pos``. ``mask_update`` (a Python bool, static: one program
    each) is passed to ``tx.update`` when not ``None`` — the host-told mask-update schedule of
    jaxprune's mask-holding transforms (``False``: the step has no mask-update ``lax.cond``).

    >>> import optax
    >>> mesh = make_mesh()
    >>> st, sh = init_train_state({"w": jnp.ones(2)}, optax.sgd(0.5), mesh)
    >>> step = make_sharded_train_step(lambda p, b, r: ((p["w"] - b) ** 2).sum(), optax.sgd(0.5),
    ...                                sh, batch_sharding(mesh), donate=False)
    >>> st, loss = step(st, jnp.zeros((1, 2)))
    >>> int(st.step), float(loss)
    (1, 2.0)
    """
    replicated = NamedSharding(batch_shard.mesh, PartitionSpec())

    def step(state: TrainState, batch: Any, mask_update: bool | None = None
             ) -> tuple[TrainState, jax.Array]:
        rng, sub = jax.random.split(state.rng)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, sub)
        hint = {} if mask_update is None else {"mask_update": mask_update}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **hint)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state,
                         rng, state.data_pos + 1)
        return new, loss

    # the static flag is positional: jit takes no keyword arguments with in_shardings
    jitted = jax.jit(step, in_shardings=(shardings, batch_shard),
                     out_shardings=(shardings, replicated), static_argnums=2,
                     donate_argnums=(0,) if donate else ())

    def run(state: TrainState, batch: Any, mask_update: bool | None = None
            ) -> tuple[TrainState, jax.Array]:
        return jitted(state, batch, mask_update)

    return run


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Call ``jax.distributed.initialize`` for a multi-host run; return whether it ran.

    Runs when any argument is given, when ``auto=True`` (TPU pods, SLURM, Open MPI and
    Kubernetes JobSets are auto-detected by JAX), or when ``JAX_COORDINATOR_ADDRESS`` is set.
    Must be called before any other JAX call in every process.

    Same as :func:`jaxprune.io.distributed.initialize` (which also reads the ``jaxprune launch``
    environment and enables CPU collectives), plus ``JAX_COORDINATOR_ADDRESS``.

    >>> initialize_distributed()  # single process: nothing to do
    False
    """
    from jaxprune.io import distributed

    return distributed.initialize(
        coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes, process_id, auto=auto)
