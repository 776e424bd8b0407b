"""The shared pipeline: criteria → allocation → pattern → mask, and a one-shot helper.

Every method in jaxprune (training-time transforms, dynamic sparse training, one-shot layer
methods, structured unit selection) builds masks here; none keeps a private copy of this logic:

* :func:`compute_masks` — a whole tree: allocation decides each leaf's sparsity, the pattern
  turns each leaf's scores into its mask.
* :func:`leaf_mask` — one scores array, a sparsity (or an exact number of entries to keep) and a
  pattern → one mask; what SparseGPT's per-block selection and OBS's budget use.
* :func:`leaf_masks` — several arrays with exact counts, selected together in one compiled
  selection (:func:`jaxprune.core.topk.topk_masks`); what SET/RigL drop-and-grow uses, and
  what :func:`compute_masks` does for all its unstructured leaves.
* ``keep_pruned=`` on both: entries already pruned stay pruned (lottery tickets, iterative
  pruning at initialisation), ranked below every live entry.
* :func:`resolve_sparsity` — one rule for "sparsity implied by the pattern" (``"2:4"`` → 0.5).

Tie rule everywhere: among equal scores the entry with the lower flat index is kept.

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
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria as crit_lib
from jaxprune.core import filters as filt_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core import topk as topk_lib
from jaxprune.core._leafcheck import (
    _check_leaf,
    _check_not_all_pruned,
    _check_scores,
    _concrete,
    _nan_lowest,
    _pattern_mask,
    _pattern_shape,
    _rank_live,
    _validate,
    _view,
    check_opmap,
    check_opmap_paths,
)
from jaxprune.core.masks import (
    Filter,
    PyTree,
    _is_none,
    apply_masks,
    check_masks,
    init_masks,
    leaves_with_paths,
)

__all__ = [
    "compute_masks", "leaf_mask", "leaf_masks", "prune", "resolve_sparsity", "validate_patterns",
    "default_filter", "check_opmap",
]


def validate_patterns(masks: PyTree, pattern: pat_lib.Pattern, opmap: Any = None) -> None:
    """Check every pruned leaf against its pattern (on its matrix view when ``opmap`` has one);
    raise ``ValueError`` naming the path."""
    for path, m in leaves_with_paths(masks):
        if m is not None:
            _validate(pat_lib.for_path(pattern, path), path, opmap, tuple(m.shape))


def resolve_sparsity(sparsity: Any, pattern: pat_lib.Pattern | str) -> Any:
    """The sparsity to use: ``sparsity`` if given, else the one an N:M pattern implies.

    A concrete sparsity is checked to lie in ``[0, 1)``; one an N:M pattern cannot reach (above
    ``1 - n/m``) is refused rather than silently capped.

    >>> resolve_sparsity(None, "2:4"), resolve_sparsity(0.3, "unstructured")
    (0.5, 0.3)
    >>> resolve_sparsity(0.9, "2:4")
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: sparsity 0.9 is above what pattern 2:4 can reach (0.5)
    """
    if isinstance(sparsity, str):
        raise ValueError(
            f"jaxprune: sparsity must be a float or None, got {sparsity!r}; pass a pattern as "
            f"pattern={sparsity!r}"
        )
    pat = pat_lib.parse(pattern)
    if sparsity is None:
        if isinstance(pat, pat_lib.NM):
            return pat.max_sparsity()
        raise ValueError(
            f"jaxprune: pattern {pat} needs an explicit sparsity (only N:M patterns imply one)"
        )
    alloc_lib.check_sparsity("<target>", sparsity)
    if _concrete(sparsity) and isinstance(pat, pat_lib.NM):
        if float(sparsity) > pat.max_sparsity() + 1e-9:
            raise ValueError(
                f"jaxprune: sparsity {float(sparsity):g} is above what pattern {pat.n}:{pat.m} "
                f"can reach ({pat.max_sparsity():g})"
            )
        got = round(float(sparsity) * pat.m) / pat.m
        if abs(got - float(sparsity)) > 1e-3:
            ok = ", ".join(f"{j / pat.m:g}" for j in range(pat.m - pat.n + 1))
            raise ValueError(
                f"jaxprune: sparsity {float(sparsity):g} cannot be reached by pattern "
                f"{pat.n}:{pat.m}: it prunes whole entries of each group of {pat.m}, so it would "
                f"give {got:g}; reachable: {ok} (None means {pat.max_sparsity():g})"
            )
    return sparsity


def default_filter(opmap: Any = None) -> Filter:
    """The default filter: with an operator map, its matmul and conv weights (embeddings, norm
    scales and biases stay dense); without one, leaves named ``kernel`` with ndim >= 2.

    >>> from jaxprune.core.opmap import operator_map
    >>> om = operator_map(lambda p, x: x @ p["weight"].T, {"weight": jnp.ones((3, 2))}, jnp.ones((1, 2)))
    >>> default_filter(om)("weight", jnp.ones((3, 2)))
    True
    """
    check_opmap(opmap)
    if opmap is None:
        return filt_lib.default()
    return filt_lib.PathIn(frozenset(opmap.weights()))


def _keep_pruned_scores(masks: PyTree, scores: PyTree) -> PyTree:
    """Scores with already-pruned entries at ``-inf`` (ranked below every live entry)."""
    return jax.tree.map(
        lambda m, s: None if m is None else _rank_live(s, m),
        masks, scores, is_leaf=_is_none,
    )


def compute_masks(
    masks: PyTree,
    scores: PyTree,
    sparsity: Any,
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
    *,
    keep_pruned: bool = False,
    opmap: Any = None,
) -> PyTree:
    """New masks from scores: allocate per-leaf sparsity for ``sparsity``, then apply each pattern.

    With an operator map (:func:`jaxprune.core.opmap.operator_map`), each pattern acts on the
    leaf's matrix view — N:M along the true fan-in, blocks of the matrix actually multiplied,
    ``channel`` = output units — and ERK sees true fan-in and fan-out, whatever the layout.

    ``masks`` gives which leaves are pruned (non-``None``) and their shapes. With
    ``keep_pruned=True`` its ``False`` entries stay pruned: they rank below every live entry (also
    for a global allocation) and the new mask is and-ed with the old one. Works under ``jit``
    (``sparsity`` may be traced). Called eagerly, it first checks the sparsity (``[0, 1)``), the
    scores (shapes, NaN/Inf) and the patterns, naming the leaf path, then runs as one compiled
    program per (tree, shapes, allocation, pattern) with ``sparsity`` traced, so repeated calls at
    new sparsities do not recompile and no step runs op by op.

    >>> m = compute_masks({"w": jnp.ones((2, 2), bool)}, {"w": jnp.array([[1., 4.], [3., 2.]])}, 0.5)
    >>> m["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    >>> compute_masks({"w": jnp.array([True, False, True, True])}, {"w": jnp.array([1., 9., 3., 2.])},
    ...               0.5, keep_pruned=True)["w"]
    Array([False, False,  True,  True], dtype=bool)
    """
    check_opmap(opmap)
    allocation = alloc_lib.get(allocation)
    pattern = pat_lib.parse(pattern)
    sparsity = resolve_sparsity(sparsity, pattern)
    leaves = jax.tree_util.tree_leaves((masks, scores, sparsity))
    if all(_concrete(x) for x in leaves) and allocation.traceable:
        alloc_lib.check_sparsity("<target>", sparsity)
        _check_leaves(masks, scores, pattern, opmap)
        return _compute_masks_jit(masks, scores, jnp.asarray(sparsity, jnp.float32), allocation,
                                  pattern, bool(keep_pruned), opmap)
    return _compute_masks_impl(masks, scores, sparsity, allocation, pattern, bool(keep_pruned),
                               opmap)


def _check_leaves(masks: PyTree, scores: PyTree, pattern: pat_lib.Pattern,
                  opmap: Any = None) -> list[tuple]:
    """``[(path, mask, score)]``; raises ``ValueError`` naming the first bad leaf."""
    mflat, _ = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    paths = [p for p, _ in leaves_with_paths(masks)]
    sflat = jax.tree_util.tree_flatten(scores, is_leaf=_is_none)[0]
    if len(sflat) != len(mflat):
        raise ValueError(
            f"jaxprune: scores tree has {len(sflat)} leaves but masks have {len(mflat)}"
        )
    spaths = [p for p, _ in leaves_with_paths(scores)]
    if _concrete(sflat[0] if sflat else None) and spaths != paths:
        i = next(i for i, (a, b) in enumerate(zip(paths, spaths, strict=True)) if a != b)
        raise ValueError(f"jaxprune: scores tree does not match masks: masks have '{paths[i]}' "
                         f"where scores have '{spaths[i]}'")
    out = []
    for path, m, s in zip(paths, mflat, sflat, strict=True):
        out.append((path, m, s))
        if m is None:
            continue
        if s is None:
            raise ValueError(f"jaxprune: no score for pruned leaf '{path}'")
        if not hasattr(m, "shape") or len(m.shape) == 0 or 0 in tuple(m.shape):
            raise ValueError(f"jaxprune: mask for '{path}' has shape {tuple(np.shape(m))}; a "
                             "pruned leaf needs at least one axis and one entry (use None)")
        if tuple(np.shape(s)) != tuple(m.shape):
            raise ValueError(
                f"jaxprune: scores for '{path}' have shape {tuple(np.shape(s))}, mask "
                f"{tuple(m.shape)}"
            )
        _check_scores(path, s)
        _validate(pat_lib.for_path(pattern, path), path, opmap, tuple(m.shape))
    return out


@functools.partial(jax.jit, static_argnames=("allocation", "pattern", "keep_pruned", "opmap"))
def _compute_masks_jit(masks, scores, sparsity, allocation, pattern, keep_pruned, opmap):
    return _compute_masks_impl(masks, scores, sparsity, allocation, pattern, keep_pruned, opmap)


def _compute_masks_impl(masks: PyTree, scores: PyTree, sparsity: Any,
                        allocation: alloc_lib.Allocation, pattern: pat_lib.Pattern,
                        keep_pruned: bool = False, opmap: Any = None) -> PyTree:
    if keep_pruned:
        scores = _keep_pruned_scores(masks, scores)
    spars = allocation.allocate(masks, sparsity, scores, opmap=opmap)
    _, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    aflat = jax.tree_util.tree_flatten(spars, is_leaf=_is_none)[0]
    out: list[Any] = []
    batch: list[tuple[int, str, Any, Any]] = []  # unstructured leaves: one selection for all
    for (path, m, s), a in zip(_check_leaves(masks, scores, pattern, opmap), aflat, strict=True):
        if m is None:
            out.append(None)
            continue
        pat = pat_lib.for_path(pattern, path)
        if isinstance(pat, pat_lib.NM):
            # N:M fixes every leaf's sparsity (1 − n/m, or the target on a ramp towards it): an
            # allocation's share (ERK, global) would give some leaves 3:4 and miss the target
            a = sparsity
        alloc_lib.check_sparsity(path, a, allow_full=True)
        if type(pat) is pat_lib.Unstructured:
            batch.append((len(out), path, jnp.asarray(s), a))
            out.append(m)
            continue
        new = _pattern_mask(pat, jnp.asarray(s), a, path, opmap)
        out.append(new & m if keep_pruned else new)
    if batch:
        views = [(_view(opmap, path), s) for _, path, s, _ in batch]
        views = [(lo, s if lo is None else lo.to_view(s)) for lo, s in views]
        keeps = [pat_lib.Unstructured().n_keep(a, v.size) for (_, v), (*_, a) in
                 zip(views, batch, strict=True)]
        new = _topk_leaves([v for _, v in views], keeps)
        for (i, *_), (lo, v), n in zip(batch, views, new, strict=True):
            n = n.reshape(v.shape) if lo is None else lo.from_view(n.reshape(v.shape))
            out[i] = n & out[i] if keep_pruned else n
    return jax.tree_util.tree_unflatten(treedef, out)


def _topk_leaves(scores: list[jax.Array], n_keep: list[Any]) -> list[jax.Array]:
    """Flat exact-count masks of several leaves in one selection; NaN scores rank lowest."""
    return topk_lib.topk_masks([_nan_lowest(s.reshape(-1)) for s in scores], n_keep)


def leaf_masks(
    scores: Sequence[Any],
    n_keep: Sequence[Any],
    *,
    keep_pruned: Sequence[Any] | None = None,
    paths: Sequence[str] | None = None,
) -> list[jax.Array]:
    """Several leaves' unstructured masks at once: exactly ``n_keep[i]`` highest of ``scores[i]``.

    :func:`leaf_mask` with ``n_keep=`` (and ``keep_pruned=``) for a list of leaves, selected
    together (:func:`jaxprune.core.topk.topk_masks`): one compiled selection whatever the
    number of leaves and their sizes, which is what a mask update inside a training step wants.
    Checks and tie rule as :func:`leaf_mask` (``paths`` name the leaves in errors).

    >>> [m.tolist() for m in leaf_masks([jnp.array([1., 3., 2.]), jnp.array([5., 4.])], [2, 1])]
    [[False, True, True], [True, False]]
    """
    scores = [jnp.asarray(s) for s in scores]
    paths = [f"<leaf {i}>" for i in range(len(scores))] if paths is None else list(paths)
    keep_pruned = [None] * len(scores) if keep_pruned is None else list(keep_pruned)
    n_keep = list(n_keep)
    if not len(scores) == len(n_keep) == len(keep_pruned) == len(paths):
        raise ValueError(
            f"jaxprune: leaf_masks got {len(scores)} scores, {len(n_keep)} n_keep, "
            f"{len(keep_pruned)} keep_pruned and {len(paths)} paths; they must match"
        )
    ranked = []
    for s, k, kp, path in zip(scores, n_keep, keep_pruned, paths, strict=True):
        _check_leaf(path, s, kp)
        if _concrete(k) and not 0 <= int(k) <= s.size:
            raise ValueError(f"jaxprune: leaf '{path}': n_keep={int(k)} is outside [0, {s.size}]")
        ranked.append(s if kp is None else _rank_live(s, kp))
    new = _topk_leaves(ranked, n_keep)
    return [n.reshape(s.shape) if kp is None else n.reshape(s.shape) & jnp.asarray(kp, bool)
            for n, s, kp in zip(new, scores, keep_pruned, strict=True)]


def leaf_mask(
    scores: Any,
    sparsity: Any = None,
    *,
    pattern: pat_lib.Pattern | str = "unstructured",
    n_keep: Any = None,
    keep_pruned: Any = None,
    path: str = "<leaf>",
    opmap: Any = None,
) -> jax.Array:
    """The mask of one leaf: ``scores`` and a sparsity (or ``n_keep``) through ``pattern``.

    Args:
      scores: one array (higher = kept).
      sparsity: fraction to prune (``None``: implied by an N:M pattern); may be traced.
      pattern: a pattern or its spec.
      n_keep: instead of ``sparsity``, keep exactly this many entries (unstructured only; may be
        traced) — exact where ``round(sparsity * size)`` in float32 would not be.
      keep_pruned: a boolean mask; its ``False`` entries rank below every other entry and stay
        pruned.
      path: leaf name used in error messages (and its entry in ``opmap``).
      opmap: an operator map; the pattern then acts on the leaf's matrix view.

    Checks (when values are concrete) the pattern against the shape, the sparsity range and that
    scores are finite, naming ``path``. Ties go to the lower flat index.

    >>> leaf_mask(jnp.array([1., 2., 2., 0.]), n_keep=2)
    Array([False,  True,  True, False], dtype=bool)
    >>> leaf_mask(jnp.array([[4.], [1.], [3.], [2.]]), pattern="2:4")[:, 0]
    Array([ True, False,  True, False], dtype=bool)
    """
    check_opmap(opmap)
    pat = pat_lib.parse(pattern)
    scores = jnp.asarray(scores)
    shape = tuple(scores.shape)
    if n_keep is not None:
        if sparsity is not None:
            raise ValueError(f"jaxprune: leaf '{path}': pass sparsity or n_keep, not both")
        if not isinstance(pat, pat_lib.Unstructured):
            raise ValueError(
                f"jaxprune: leaf '{path}': n_keep needs the unstructured pattern, got {pat}"
            )
        return leaf_masks([scores], [n_keep], keep_pruned=[keep_pruned], paths=[path])[0]
    _check_leaf(path, scores, keep_pruned)
    if keep_pruned is not None:
        scores = _rank_live(scores, keep_pruned)
    _validate(pat, path, opmap, shape)
    s = resolve_sparsity(sparsity, pat)
    if keep_pruned is None:
        _check_not_all_pruned(pat, s, path, None, _pattern_shape(opmap, path, shape))
    new = _pattern_mask(pat, scores, s, path, opmap)
    if keep_pruned is None:
        _check_not_all_pruned(pat, s, path, new)
    return new if keep_pruned is None else new & jnp.asarray(keep_pruned, bool)


def prune(
    params: PyTree,
    sparsity: float | None = None,
    *,
    criterion: crit_lib.Criterion | str = "magnitude",
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
    filter: Filter | None = None,
    masks: PyTree | None = None,
    opmap: Any = None,
    **signals: Any,
) -> tuple[PyTree, PyTree]:
    """One-shot pruning: ``params -> (pruned params, masks)`` for any criterion/allocation/pattern.

    Args:
      params: any pytree of arrays (linen dict, ``nnx.State``, nested dicts/lists).
      sparsity: global target in ``[0, 1)`` (per-leaf values come from ``allocation``);
        ``None`` with an N:M pattern means ``1 - n/m``.
      criterion: a :class:`~jaxprune.core.criteria.Criterion` or its name.
      allocation: an allocation or its name (``uniform``, ``erk``, ``er``, ``global``).
      pattern: a pattern or its spec (``unstructured``, ``2:4``, ``block4x4``, ``channel``).
      filter: which leaves to prune (default: the matmul and conv weights of ``opmap``; without
        one, leaves named ``kernel`` with ndim >= 2).
      masks: existing masks to start from; their ``False`` entries stay pruned
        (``keep_pruned``), so pruning can be iterated.
      opmap: the model's operator map (:func:`jaxprune.operator_map`): patterns act on each
        weight's true matrix view, ERK on its true fan-in/fan-out.
      **signals: what the criterion needs (``grads=``, ``key=``, ``act_norms=``, ``movement=``).

    >>> _, m = prune({"kernel": jnp.array([[1., -5.], [2., 0.5]])}, 0.5, filter=lambda p, x: True)
    >>> m["kernel"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """
    crit = crit_lib.get(criterion)
    keep_pruned = masks is not None
    if masks is None:
        masks = init_masks(params, default_filter(opmap) if filter is None else filter)
        if filter is None and opmap is None and all(m is None for _, m in leaves_with_paths(masks)):
            warnings.warn(
                "jaxprune: the name-based default filter (leaves named 'kernel' with ndim >= 2) "
                "selected no leaf, so nothing is pruned; pass opmap=jp.operator_map(apply_fn, "
                "params, example_input) to find the matmul weights from the computation, or a "
                "filter=", UserWarning, stacklevel=2,
            )
    else:
        check_masks(params, masks)
    check_opmap_paths(masks, opmap, filter, "prune")
    pat = pat_lib.parse(pattern)
    sparsity = resolve_sparsity(sparsity, pat)
    validate_patterns(masks, pat, opmap)
    scores = crit(params, masks, **signals)
    new_masks = compute_masks(masks, scores, sparsity, allocation, pat,
                              keep_pruned=keep_pruned, opmap=opmap)
    alloc = alloc_lib.get(allocation)
    if not isinstance(alloc, alloc_lib.Global):  # Global may collapse a layer on purpose
        for (path, old), (_, new) in zip(leaves_with_paths(masks), leaves_with_paths(new_masks),
                                         strict=True):
            if old is not None and not (keep_pruned and not np.asarray(old).any()):
                _check_not_all_pruned(pat_lib.for_path(pat, path), sparsity, path, new)
    # a criterion that does not read the weights (random) ranks NaN/Inf weights silently: refuse
    for (path, m), (_, w) in zip(leaves_with_paths(masks), leaves_with_paths(params), strict=True):
        if m is not None and _concrete(w) and not np.isfinite(np.asarray(w)).all():
            bad = np.argwhere(~np.isfinite(np.asarray(w)))[0]
            raise ValueError(
                f"jaxprune: params for '{path}' contain a non-finite value "
                f"{np.asarray(w)[tuple(bad)]} at index {tuple(int(i) for i in bad)}; a NaN/Inf "
                "weight cannot be ranked (fix the weights, or exclude the leaf with a filter)")
    return apply_masks(params, new_masks), new_masks
