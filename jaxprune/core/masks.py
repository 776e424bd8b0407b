"""Masks that mirror a parameter pytree.

A *mask tree* has exactly the tree structure of the params it masks. Each leaf is either a boolean
array of the param's shape (``True`` = kept) or ``None`` for a leaf that is not pruned. Because JAX
treats ``None`` as an empty subtree, every map over a mask tree in this library goes through
:func:`tree_map_masked`, which maps with ``is_leaf=lambda x: x is None``.

Works on any registered pytree: linen param dicts, ``nnx.State``, plain nested dicts, lists, tuples.

Example:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    >>> masks = jp.masks.init_masks(params, jp.filters.Name("kernel"))
    >>> masks["dense"]["bias"] is None, masks["dense"]["kernel"].shape
    (True, (4, 3))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.filters import Filter, as_filter

PyTree = Any
KeyPath = tuple[Any, ...]

__all__ = [
    "path_str",
    "leaves_with_paths",
    "tree_map_masked",
    "init_masks",
    "apply_masks",
    "check_masks",
    "check_prunable",
    "LeafStats",
    "sparsity_stats",
    "summary_table",
    "total_sparsity",
]


def _is_none(x: Any) -> bool:
    return x is None


_WRAPPER_ATTRS = ("value", "raw_value", "_value")


def path_str(path: KeyPath) -> str:
    """Render a ``jax.tree_util`` key path as ``a/b/0/kernel``.

    Attribute keys that only unwrap a container (``.value``/``.raw_value`` of an nnx Variable) are
    dropped, so a path reads the same for linen dicts and ``nnx.State``.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
    ['a/0', 'a/1']
    """
    keys = tuple(
        k for k in path
        if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name in _WRAPPER_ATTRS)
    )
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(path_str, leaf), ...]`` in flatten order, keeping ``None`` leaves.

    >>> leaves_with_paths({"a": 1, "b": None})
    [('a', 1), ('b', None)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [(path_str(p), x) for p, x in flat]


def tree_map_masked(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map`` that treats ``None`` as a leaf in every tree (mask trees have ``None`` leaves).

    ``fn`` receives ``None`` where a mask leaf is ``None``; it decides what to return.

    >>> tree_map_masked(lambda m, p: p if m is None else p * 0, {"a": None, "b": 1.0}, {"a": 2., "b": 3.})
    {'a': 2.0, 'b': 0.0}
    """
    return jax.tree.map(fn, tree, *rest, is_leaf=_is_none)


def tree_map_with_path_masked(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like :func:`tree_map_masked` but ``fn(path_str, leaf, *rest_leaves)``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, *xs: fn(path_str(p), *xs), tree, *rest, is_leaf=_is_none
    )


def _as_filter(filter: Any) -> Filter:
    return as_filter(filter)


def check_prunable(path: str, leaf: Any) -> None:
    """Raise naming ``path`` unless ``leaf`` is a floating-point array with at least one entry
    and one axis (a 0-d or zero-size leaf has nothing a pattern could prune).

    >>> check_prunable("w", jnp.float32(1.0))
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: leaf 'w' was selected for pruning but is 0-d (a scalar); only arrays \
with at least one axis and one entry can be pruned. Exclude it with a filter, e.g. \
filter=jp.filters.select(exclude=...).
    """
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(
            f"jaxprune: leaf '{path}' was selected for pruning but is a {type(leaf).__name__}, "
            "not an array; params must be a pytree of arrays"
        )
    _check_float(path, leaf)
    why = "0-d (a scalar)" if len(leaf.shape) == 0 else (
        f"zero-size (shape {tuple(leaf.shape)}, no entries)" if math.prod(leaf.shape) == 0 else "")
    if why:
        raise ValueError(
            f"jaxprune: leaf '{path}' was selected for pruning but is {why}; only arrays with at "
            "least one axis and one entry can be pruned. Exclude it with a filter, e.g. "
            "filter=jp.filters.select(exclude=...)."
        )


def find_nonfinite(a: Any) -> tuple[tuple[int, ...], Any, int] | None:
    """``(index of the first non-finite entry, its value, how many there are)`` of a concrete
    array, or ``None`` when every entry is finite (for error messages that point at the value).

    >>> find_nonfinite(np.array([1.0, np.nan, np.inf]))
    ((1,), np.float64(nan), 2)
    >>> find_nonfinite(np.ones(3)) is None
    True
    """
    a = np.asarray(a)
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return idx, a[idx], int(bad.sum())


def _check_float(path: str, leaf: Any) -> None:
    if not hasattr(leaf, "dtype"):
        raise TypeError(f"jaxprune: leaf '{path}' is a {type(leaf).__name__}, not an array")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(
            f"jaxprune: leaf '{path}' was selected for pruning but has dtype {leaf.dtype}; only "
            "floating-point leaves can be pruned. Exclude it with a filter, e.g. "
            "filter=jp.filters.select(exclude=...)."
        )


def init_masks(params: PyTree, filter: Filter | None = None) -> PyTree:
    """All-``True`` masks for the leaves chosen by ``filter`` and ``None`` elsewhere.

    Raises ``TypeError`` naming the path if a selected leaf is not floating point.

    >>> m = init_masks({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "w")
    >>> m["b"] is None, bool(m["w"].all())
    (True, True)
    """
    filt = _as_filter(filter)

    def make(path: str, leaf: Any) -> Any:
        if leaf is None or not filt(path, leaf):
            return None
        check_prunable(path, leaf)
        return jnp.ones(leaf.shape, dtype=bool)

    return tree_map_with_path_masked(make, params)


def check_masks(params: PyTree, masks: PyTree) -> None:
    """Raise ``ValueError`` naming the first path where ``masks`` does not mirror ``params``.

    Paths and shapes are compared, and every mask leaf must be a bool array or ``None``
    (``TypeError`` otherwise: a float mask of 0.5 is not a mask). Container types are not
    compared, so masks held in an ``nnx.State`` of optimizer variables match the ``nnx.State`` of
    ``Param`` s they were made from.

    >>> check_masks({"w": jnp.ones(2)}, {"v": None})
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: mask tree does not match params tree: params has 'w' where masks has 'v'
    """
    if masks is None and params is not None:
        raise ValueError("jaxprune: masks is None; pass a mask tree mirroring params (e.g. "
                         "jp.init_masks(params)), with None leaves for unpruned params")
    p = leaves_with_paths(params)
    m = leaves_with_paths(masks)
    for (pp, pl), (mp, ml) in zip(p, m, strict=False):
        if pp != mp:
            raise ValueError(
                "jaxprune: mask tree does not match params tree: "
                f"params has '{pp}' where masks has '{mp}'"
            )
        if ml is not None and (not hasattr(ml, "dtype") or not hasattr(ml, "shape")
                               or np.dtype(ml.dtype) != np.bool_):
            got = f"dtype {ml.dtype}" if hasattr(ml, "dtype") else f"type {type(ml).__name__}"
            raise TypeError(
                f"jaxprune: mask for '{pp}' has {got}; a mask leaf must be a bool array of the "
                "param's shape (True = kept) or None (not pruned); convert with "
                "jnp.asarray(m, bool) only if it really holds 0/1"
            )
        if ml is not None and pl is not None and hasattr(pl, "shape") \
                and tuple(ml.shape) != tuple(pl.shape):
            raise ValueError(
                f"jaxprune: mask for '{pp}' has shape {tuple(ml.shape)} but the param has "
                f"shape {tuple(pl.shape)}"
            )
    if len(p) != len(m):
        longer, name = (p, "params") if len(p) > len(m) else (m, "masks")
        extra = longer[min(len(p), len(m))][0]
        raise ValueError(
            f"jaxprune: mask tree does not match params tree: '{extra}' exists only in {name}"
        )


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the pruned entries: ``p * m`` where a mask exists, ``p`` unchanged where it is ``None``.

    Checks first (:func:`check_masks`) that ``masks`` mirrors ``params`` with bool leaves of the
    params' shapes, so a mask never silently broadcasts.

    >>> apply_masks({"w": jnp.array([1., 2.])}, {"w": jnp.array([True, False])})["w"]
    Array([1., 0.], dtype=float32)
    """
    check_masks(params, masks)
    return tree_map_masked(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)), masks, params
    )


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


class LeafStats(NamedTuple):
    """Sparsity of one leaf: ``path``, ``shape``, ``size``, ``zeros`` (pruned count), ``sparsity``."""

    path: str
    shape: tuple[int, ...]
    size: int
    zeros: int
    sparsity: float
    pruned: bool


def _count_nonzero(x: Any) -> int:
    """Nonzero (``True``) entries of ``x``; a global array spread over processes (not fully
    addressable) is reduced on its devices -- a collective every process must call -- and the
    count is the same on every process. Host arrays and local jax arrays are counted on the host.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.size:
            return 0
        sharding = x.sharding
        if not isinstance(sharding, jax.sharding.NamedSharding):
            raise ValueError(
                "jaxprune: sparsity statistics of an array spread over processes need a "
                f"NamedSharding, got {type(sharding).__name__}; gather it first "
                "(jaxprune.io.distributed.to_host)")
        rows = x.shape[0] if x.ndim else 1  # int32 counts per row, summed on the host in int64
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        counts = _row_nonzero(x, rows, replicated)  # replicated: readable on every process
        return int(np.asarray(counts).astype(np.int64).sum())
    return int(np.count_nonzero(np.asarray(x)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _row_nonzero(x: jax.Array, rows: int, out: Any) -> jax.Array:
    return jax.lax.with_sharding_constraint(
        jnp.sum((x != 0).reshape(rows, -1), axis=1, dtype=jnp.int32), out)


def sparsity_stats(params: PyTree, masks: PyTree | None = None) -> list[LeafStats]:
    """Per-leaf sparsity. With ``masks`` counts ``False`` entries; without, counts exact zeros.

    Works on global arrays sharded over several processes (counted on the devices; every process
    must call it and gets the same numbers).

    >>> s = sparsity_stats({"w": jnp.array([0., 1.])})
    >>> s[0].sparsity
    0.5
    """
    out = []
    pl = leaves_with_paths(params)
    ml = leaves_with_paths(masks) if masks is not None else [(p, None) for p, _ in pl]
    if masks is not None:
        check_masks(params, masks)
    for (path, p), (_, m) in zip(pl, ml, strict=True):
        if p is None:
            continue
        shape = tuple(np.shape(p))
        size = int(np.prod(shape, dtype=np.int64))
        zeros = size - _count_nonzero(p if m is None else m)
        out.append(LeafStats(path, shape, size, zeros, zeros / max(size, 1), m is not None))
    return out


def total_sparsity(params: PyTree, masks: PyTree | None = None, pruned_only: bool = True) -> float:
    """Fraction of zero entries over all (pruned, by default) leaves.

    >>> total_sparsity({"w": jnp.array([0., 1.]), "b": None})
    0.5
    """
    st = sparsity_stats(params, masks)
    if masks is not None and pruned_only:
        st = [s for s in st if s.pruned]
    size = sum(s.size for s in st)
    return sum(s.zeros for s in st) / max(size, 1)


def summary_table(params: PyTree, masks: PyTree | None = None) -> str:
    """A printable table of per-leaf and total sparsity.

    >>> print(summary_table({"w": jnp.array([0., 1.])}))  # doctest: +NORMALIZE_WHITESPACE
    path   shape  size  zeros  sparsity
    w      (2,)   2     1      50.00%
    total         2     1      50.00%
    """
    st = sparsity_stats(params, masks)
    rows = [(s.path, str(s.shape), str(s.size), str(s.zeros), f"{100 * s.sparsity:.2f}%")
            for s in st]
    size = sum(s.size for s in st)
    zeros = sum(s.zeros for s in st)
    rows.append(("total", "", str(size), str(zeros), f"{100 * zeros / max(size, 1):.2f}%"))
    header = ("path", "shape", "size", "zeros", "sparsity")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def mask_leaves(masks: PyTree) -> list[tuple[str, Any]]:
    """``[(path, mask)]`` for the non-``None`` mask leaves."""
    return [(p, m) for p, m in leaves_with_paths(masks) if m is not None]


def paths(tree: PyTree) -> Iterable[str]:
    """All leaf paths of ``tree`` (``None`` leaves included)."""
    return [p for p, _ in leaves_with_paths(tree)]
