"""The shared pipeline: criteria → allocation → pattern → mask, and a one-shot helper.

Every method in jaxprune (training-time transforms, sparse training, one-shot pruning) builds masks
through :func:`compute_masks`; none keeps a private copy of this logic.

Example:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"dense": {"kernel": jnp.arange(8.).reshape(4, 2), "bias": jnp.ones(2)}}
    >>> pruned, masks = jp.prune(params, 0.5)
    >>> pruned["dense"]["kernel"]
    Array([[0., 0.],
           [0., 0.],
           [4., 5.],
           [6., 7.]], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import allocation as alloc_lib
from jaxprune import criteria as crit_lib
from jaxprune import patterns as pat_lib
from jaxprune.masks import (
    Filter,
    PyTree,
    _is_none,
    apply_masks,
    check_masks,
    init_masks,
    leaves_with_paths,
)

__all__ = ["compute_masks", "prune", "validate_patterns"]


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_patterns(masks: PyTree, pattern: pat_lib.Pattern) -> None:
    """Check every pruned leaf's shape against its pattern; raise ``ValueError`` naming the path."""
    for path, m in leaves_with_paths(masks):
        if m is not None:
            pat_lib.for_path(pattern, path).validate(path, tuple(m.shape))


def _check_scores(path: str, s: Any) -> None:
    if not _concrete(s):
        return
    a = np.asarray(s)
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"jaxprune: scores for '{path}' contain a non-finite value {a[idx]} at index {idx} "
            f"({int(bad.sum())} of {a.size} entries); check the criterion's inputs"
        )


def compute_masks(
    masks: PyTree,
    scores: PyTree,
    target: Any,
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
) -> PyTree:
    """New masks from scores: allocate per-leaf sparsity for ``target``, then apply each pattern.

    ``masks`` gives which leaves are pruned (non-``None``) and their shapes. Works under ``jit``
    (``target`` may be traced). Called eagerly, it first checks the target (``[0, 1)``), the
    scores (shapes, NaN/Inf) and the patterns, naming the leaf path, then runs as one compiled
    program per (tree, shapes, allocation, pattern) with ``target`` traced, so repeated calls at
    new sparsities do not recompile and no step runs op by op.

    >>> m = compute_masks({"w": jnp.ones((2, 2), bool)}, {"w": jnp.array([[1., 4.], [3., 2.]])}, 0.5)
    >>> m["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """
    allocation = alloc_lib.get(allocation)
    pattern = pat_lib.parse(pattern)
    leaves = jax.tree_util.tree_leaves((masks, scores, target))
    if all(_concrete(x) for x in leaves) and allocation.traceable:
        alloc_lib.check_sparsity("<target>", target)
        _check_leaves(masks, scores, pattern)
        return _compute_masks_jit(masks, scores, jnp.asarray(target, jnp.float32), allocation,
                                  pattern)
    return _compute_masks_impl(masks, scores, target, allocation, pattern)


def _check_leaves(masks: PyTree, scores: PyTree, pattern: pat_lib.Pattern) -> list[tuple]:
    """``[(path, mask, score)]``; raises ``ValueError`` naming the first bad leaf."""
    mflat, _ = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    paths = [p for p, _ in leaves_with_paths(masks)]
    sflat = jax.tree_util.tree_flatten(scores, is_leaf=_is_none)[0]
    if len(sflat) != len(mflat):
        raise ValueError(
            f"jaxprune: scores tree has {len(sflat)} leaves but masks have {len(mflat)}"
        )
    out = []
    for path, m, s in zip(paths, mflat, sflat, strict=True):
        out.append((path, m, s))
        if m is None:
            continue
        if s is None:
            raise ValueError(f"jaxprune: no score for pruned leaf '{path}'")
        if tuple(np.shape(s)) != tuple(m.shape):
            raise ValueError(
                f"jaxprune: scores for '{path}' have shape {tuple(np.shape(s))}, mask "
                f"{tuple(m.shape)}"
            )
        _check_scores(path, s)
        pat_lib.for_path(pattern, path).validate(path, tuple(m.shape))
    return out


@functools.partial(jax.jit, static_argnames=("allocation", "pattern"))
def _compute_masks_jit(masks, scores, target, allocation, pattern):
    return _compute_masks_impl(masks, scores, target, allocation, pattern)


def _compute_masks_impl(masks: PyTree, scores: PyTree, target: Any,
                        allocation: alloc_lib.Allocation, pattern: pat_lib.Pattern) -> PyTree:
    spars = allocation.allocate(masks, target, scores)
    _, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    aflat = jax.tree_util.tree_flatten(spars, is_leaf=_is_none)[0]
    out = []
    for (path, m, s), a in zip(_check_leaves(masks, scores, pattern), aflat, strict=True):
        if m is None:
            out.append(None)
            continue
        alloc_lib.check_sparsity(path, a, allow_full=True)
        out.append(pat_lib.for_path(pattern, path).mask(jnp.asarray(s), a))
    return jax.tree_util.tree_unflatten(treedef, out)


def prune(
    params: PyTree,
    sparsity: float,
    *,
    criterion: crit_lib.Criterion | str = "magnitude",
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
    filter: Filter | None = None,
    masks: PyTree | None = None,
    **signals: Any,
) -> tuple[PyTree, PyTree]:
    """One-shot pruning: ``params -> (pruned params, masks)`` for any criterion/allocation/pattern.

    Args:
      params: any pytree of arrays (linen dict, ``nnx.State``, nested dicts/lists).
      sparsity: global target in ``[0, 1)`` (per-leaf values come from ``allocation``).
      criterion: a :class:`~jaxprune.criteria.Criterion` or its name.
      allocation: an allocation or its name (``uniform``, ``erk``, ``er``, ``global``).
      pattern: a pattern or its spec (``unstructured``, ``2:4``, ``block4x4``, ``channel``).
      filter: which leaves to prune (default: ``kernel`` leaves with ndim >= 2).
      masks: existing masks to start from (entries already ``False`` are kept pruned only if the
        criterion scores them lowest; pass ``filter`` instead to pick leaves).
      **signals: what the criterion needs (``grads=``, ``key=``, ``act_norms=``, ``movement=``).

    >>> _, m = prune({"kernel": jnp.array([[1., -5.], [2., 0.5]])}, 0.5, filter=lambda p, x: True)
    >>> m["kernel"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """
    crit = crit_lib.get(criterion)
    if masks is None:
        masks = init_masks(params, filter)
    else:
        check_masks(params, masks)
    alloc_lib.check_sparsity("<target>", sparsity)
    validate_patterns(masks, pat_lib.parse(pattern))
    scores = crit(params, masks, **signals)
    new_masks = compute_masks(masks, scores, sparsity, allocation, pattern)
    return apply_masks(params, new_masks), new_masks
