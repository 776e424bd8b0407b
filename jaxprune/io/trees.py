"""Pytree helpers of the checkpoint modules: structure checks, abstract targets, sizes.

Shared by :mod:`jaxprune.io.checkpoint` (which re-exports the public names) and
:mod:`jaxprune.io.compact`. Typed PRNG keys are stored as their raw key data, and an
``nnx.State`` anywhere in the tree is stored as its pure dict (``nnx.to_pure_dict``: paths
``l/kernel``, not ``l/kernel/value``) and rebuilt into the template's ``nnx.State`` on restore.

Example:
    >>> import jax.numpy as jnp
    >>> abstract_state({"w": np.ones(2)})["w"].shape
    (2,)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.core.masks import PyTree, leaves_with_paths

__all__ = ["CheckpointMismatchError", "check_structure", "abstract_state", "dir_size"]


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree does not match the template (different model or optimizer)."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_nnx_state(x: Any) -> bool:
    # checked by module name so that plain-linen users never import flax.nnx here
    return type(x).__name__ == "State" and type(x).__module__.startswith("flax.nnx")


def refuse_nnx_objects(tree: PyTree, what: str) -> None:
    """Raise ``TypeError`` if ``tree`` is or holds a live nnx object (a ``Module``, an
    ``Optimizer``): it flattens to ``kernel/value`` paths that no template matches, so it would be
    saved but never restored. Its ``nnx.state(...)`` is what to pass."""
    if "flax.nnx" not in sys.modules:  # no nnx object can exist
        return
    from flax import nnx

    is_obj = lambda x: isinstance(x, nnx.Pytree)  # noqa: E731 - Module and Optimizer
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_obj)[0]:
        if is_obj(x):
            at = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise TypeError(
                f"jaxprune: {what} got an nnx {type(x).__name__} object{at}, not its state; pass "
                "nnx.state(obj) (e.g. {'model': nnx.state(model), 'opt': nnx.state(optimizer)}) "
                "and put a restored state back with nnx.update(obj, state)")


def _pure(tree: PyTree) -> PyTree:
    """``tree`` with every ``nnx.State`` replaced by its pure dict (Variables unwrapped)."""
    def f(x):
        if _is_nnx_state(x):
            from flax import nnx

            return nnx.to_pure_dict(x)
        return x

    return jax.tree.map(f, tree, is_leaf=lambda x: x is None or _is_nnx_state(x))


def _empty(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape)


def _is_scalar(x: Any) -> bool:
    """A Python or NumPy scalar leaf (orbax saves them but cannot restore them into a target)."""
    return isinstance(x, bool | int | float | complex | np.generic)


def _to_savable(tree: PyTree, drop_empty: bool = True) -> PyTree:
    """Typed keys as raw key data; zero-size arrays (orbax cannot store them) as ``None``, put
    back from the template's shape and dtype on restore (:func:`_rewrap_keys`); Python/NumPy
    scalars as 0-d NumPy arrays (turned back into the template's scalar type on restore)."""
    def f(x: Any) -> Any:
        if drop_empty and _empty(x):
            return None
        if _is_scalar(x):
            return np.asarray(x)
        return jax.random.key_data(x) if _is_key(x) else x

    refuse_nnx_objects(tree, "a checkpoint save")
    return jax.tree.map(f, _pure(tree))


def _flat_spec(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` for the array leaves (arrays, ``ShapeDtypeStruct`` or orbax
    array metadata; ``None``/empty nodes are ignored)."""
    return {path: (tuple(x.shape), str(np.dtype(x.dtype)))
            for path, x in leaves_with_paths(tree) if x is not None and hasattr(x, "shape")}


def check_structure(template: PyTree, saved: PyTree, what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first path where ``saved`` (arrays or
    orbax metadata) differs from ``template`` in presence, shape or dtype.

    NamedTuples, dicts and lists compare by their paths, so a NamedTuple state matches the dict
    orbax reads back. ``None`` leaves (unpruned mask entries) are ignored on both sides, and so
    is a zero-size template leaf that ``saved`` lacks (a dense checkpoint does not store them).

    >>> check_structure({"a": np.ones(2)}, {"b": np.ones(2)})
    Traceback (most recent call last):
    ...
    jaxprune.io.trees.CheckpointMismatchError: jaxprune: checkpoint does not match the model: \
'a' is in the model but not in the checkpoint (checkpoint has e.g. 'b')
    """
    refuse_nnx_objects(template, f"the {what} template")
    t = _flat_spec(_to_savable(template, drop_empty=False))
    s = _flat_spec(saved)
    for path, (shape, dtype) in t.items():
        if path not in s and 0 in shape:
            continue
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

    >>> abstract_state({"w": np.ones(2)})["w"].shape
    (2,)
    """
    sav = _to_savable(template)
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, sav)
    shard_flat = jax.tree_util.tree_flatten(shardings, is_leaf=lambda x: x is None)[0]
    treedef = jax.tree_util.tree_structure(_pure(template))
    flat = treedef.flatten_up_to(sav)  # None where a zero-size leaf is not saved
    shard_flat = [s for s in shard_flat if s is not None]
    if len(shard_flat) != len(flat):
        raise ValueError(
            f"jaxprune: shardings has {len(shard_flat)} leaves but the state has {len(flat)}"
        )
    out = [None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
           for x, s in zip(flat, shard_flat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _rewrap_keys(template: PyTree, restored: PyTree) -> PyTree:
    """Undo :func:`_to_savable` on ``restored`` using ``template``: typed keys re-wrapped,
    pure dicts put back into copies of the template's ``nnx.State`` nodes."""
    def f(t, r):
        if _is_nnx_state(t):
            from flax import nnx

            out = jax.tree.map(lambda x: x, t)  # a copy: the template is not modified
            nnx.replace_by_pure_dict(out, _rewrap_keys(nnx.to_pure_dict(t), r))
            return out
        if _is_key(t):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        if _empty(t) and r is None:  # saved as None: nothing to read, the template's shape
            return jnp.zeros(t.shape, t.dtype)
        if _is_scalar(t) and r is not None:  # saved as a 0-d array: the template's scalar type
            r = np.asarray(r)
            return r.astype(t.dtype)[()] if isinstance(t, np.generic) else type(t)(r.item())
        return r

    return jax.tree.map(f, template, restored, is_leaf=_is_nnx_state)


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
