"""Leaf-level checks and pattern application shared by :mod:`jaxprune.core.pipeline`'s entry points.

Private: what a scores array, a pattern and an operator map must satisfy (naming the leaf in every
error), and one pattern applied to one leaf (on its matrix view when the operator map knows it).

>>> check_opmap(None)
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import opmap as om_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import find_nonfinite, leaves_with_paths


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_opmap(opmap: Any) -> None:
    """Refuse anything but an :class:`~jaxprune.core.opmap.OperatorMap` or ``None`` as ``opmap=``.

    >>> check_opmap(None)
    """
    if opmap is not None and not isinstance(opmap, om_lib.OperatorMap):
        raise TypeError(
            f"jaxprune: opmap must be a jaxprune.OperatorMap (from jp.operator_map(fn, params, x)) "
            f"or None, got {type(opmap).__name__}"
        )


def check_opmap_paths(masks: Any, opmap: Any, filter: Any, where: str) -> None:
    """Refuse an operator map traced from another params tree than ``masks`` mirrors (e.g. from
    ``{"params": params}`` while the params are ``params``): every pruned leaf must be in it, and
    its default filter must select something. Paths outside ``opmap`` would silently lose their
    matrix view (N:M along the wrong axis) or, with the default filter, not be pruned at all.

    >>> check_opmap_paths({"w": None}, None, None, "demo")
    """
    if opmap is None:
        return
    paths = leaves_with_paths(masks)
    selected = [p for p, m in paths if m is not None]
    hint = ("trace the operator map from the params tree given here, e.g. "
            "jp.operator_map(lambda p, x: model.apply({'params': p}, x), params, x)")
    missing = [p for p in selected if p not in opmap]
    if missing:
        raise ValueError(
            f"jaxprune: {where}: pruned leaf '{missing[0]}' is not in the operator map (its "
            f"paths: {list(opmap)[:4]}); {hint}")
    if not selected and filter is None and opmap.weights():
        raise ValueError(
            f"jaxprune: {where}: none of the operator map's weights {opmap.weights()[:4]} is a "
            f"leaf of the params {[p for p, _ in paths][:4]}, so nothing would be pruned; {hint}")


def _view(opmap: Any, path: str) -> Any:
    """The :class:`~jaxprune.core.opmap.LeafOp` giving ``path``'s matrix view, or ``None``."""
    if opmap is None or path not in opmap:
        return None
    lo = opmap[path]
    return lo if lo.has_view else None


def _pattern_shape(opmap: Any, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    lo = _view(opmap, path)
    if lo is None:
        return shape
    if tuple(lo.shape) != tuple(shape):
        raise ValueError(
            f"jaxprune: the operator map says '{path}' has shape {lo.shape}, the tree has {shape}; "
            "trace the operator map from the same params"
        )
    return lo.view_shape


def _validate(pat: pat_lib.Pattern, path: str, opmap: Any, shape: tuple[int, ...]) -> None:
    """``pat`` on the leaf's matrix view; a leaf with batch axes (stacked experts, a batched einsum)
    is also checked on one batch entry's matrix, so that no N:M group or block spans two entries."""
    pat.validate(path, _pattern_shape(opmap, path, shape))
    lo = _view(opmap, path)
    if lo is not None and lo.batch and isinstance(pat, pat_lib.NM | pat_lib.Block):
        per = (lo.fan_in_size, math.prod(shape[i] for i in lo.out))
        try:
            pat.validate(path, per)
        except ValueError as e:
            raise ValueError(
                f"{e} (checked on one entry of batch axes {lo.batch} of '{path}', matrix {per}: a "
                f"group may not span two entries, e.g. two experts)") from None


def _pattern_mask(pat: pat_lib.Pattern, scores: jax.Array, sparsity: Any, path: str,
                  opmap: Any) -> jax.Array:
    """``pat`` on one leaf — on its matrix view (fan-in × outputs) when ``opmap`` knows it.

    NaN scores rank lowest (pruned first, ties to the lower index) — the rule under ``jit``, where
    they cannot be refused as they are for concrete scores (:func:`_check_scores`)."""
    scores = _nan_lowest(scores)
    lo = _view(opmap, path)
    if lo is None:
        return _checked_mask(pat, pat.mask(scores, sparsity), tuple(scores.shape), path)
    v = lo.to_view(scores)
    m = _checked_mask(pat, pat.mask(v, sparsity), tuple(v.shape), path)
    return lo.from_view(m)


def _nan_lowest(scores: jax.Array) -> jax.Array:
    """NaN scores as ``-inf``: ranked lowest (the rule under ``jit``, where they cannot be refused)."""
    if jnp.issubdtype(scores.dtype, jnp.floating):
        return jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    return scores


def _rank_live(scores: Any, live: Any) -> jax.Array:
    """Float32 scores where only ``live`` entries compete: the others (kept pruned) are ``-inf``
    and a live NaN or ``-inf`` score becomes the lowest finite float32, so an entry kept pruned
    ranks below every live entry whatever its score (under ``jit``, where non-finite scores cannot
    be refused, they would otherwise tie and a pruned entry could take a live one's place)."""
    s = jnp.maximum(_nan_lowest(jnp.asarray(scores, jnp.float32)), jnp.finfo(jnp.float32).min)
    return jnp.where(live, s, -jnp.inf)


def _check_scores(path: str, s: Any) -> None:
    if not _concrete(s):
        return
    bad = find_nonfinite(s)
    if bad is not None:
        idx, v, n = bad
        raise ValueError(
            f"jaxprune: scores for '{path}' contain a non-finite value {v} at index {idx} "
            f"({n} of {np.size(s)} entries); check the criterion's inputs"
        )


def _checked_mask(pat: pat_lib.Pattern, mask: Any, shape: tuple[int, ...], path: str) -> jax.Array:
    """A pattern's output must be a bool mask of the leaf's shape (catches a faulty custom pattern)."""
    try:
        chex.assert_shape(mask, shape)
        chex.assert_type(mask, jnp.bool_)
    except AssertionError as e:
        raise ValueError(
            f"jaxprune: pattern {pat} returned a mask of shape {tuple(np.shape(mask))} and dtype "
            f"{getattr(mask, 'dtype', type(mask))} for '{path}'; a pattern must return a bool "
            f"array of the leaf's shape {shape}"
        ) from e
    return mask


def _units(pat: pat_lib.Pattern, shape: tuple[int, ...]) -> int | None:
    """How many units a built-in pattern ranks on a leaf of (matrix view) ``shape``."""
    if isinstance(pat, pat_lib.Unstructured):
        return int(np.prod(shape))
    if isinstance(pat, pat_lib.Channel):
        return int(shape[pat.axis % len(shape)])
    if isinstance(pat, pat_lib.Block):
        k, n = pat_lib.matrix_view(shape)
        return (k // pat.r) * (n // pat.c)
    return None


def _check_not_all_pruned(pat: pat_lib.Pattern, sparsity: Any, path: str, mask: Any,
                          shape: tuple[int, ...] | None = None) -> None:
    """A concrete target below 1 that a coarse pattern rounds up to pruning the whole leaf (a
    dead layer) is refused, naming the leaf: from the pattern's unit count when ``shape`` is
    given (before any work), else from the computed ``mask``."""
    if not _concrete(sparsity) or float(sparsity) >= 1.0:
        return
    units = None if shape is None else _units(pat, shape)
    if units is not None:
        dead = round(float(np.float32(sparsity) * np.float32(units))) >= units
    else:
        dead = mask is not None and _concrete(mask) and np.size(mask) > 0 \
            and not np.asarray(mask).any()
    if dead:
        raise ValueError(
            f"jaxprune: sparsity {float(sparsity):g} with pattern {pat} prunes all of '{path}' "
            f"(shape {tuple(shape if shape is not None else np.shape(mask))}): the pattern's "
            "units are too coarse, so it rounds "
            "to 1.0 (a dead layer); lower the sparsity or use a finer pattern"
        )


def _check_leaf(path: str, scores: jax.Array, keep_pruned: Any = None) -> None:
    """One leaf's scores can be ranked: at least one axis and one entry, finite values (when
    concrete), and a ``keep_pruned`` mask (if any) of the same shape."""
    shape = tuple(scores.shape)
    if not shape or 0 in shape:
        what = "0-d (a scalar)" if not shape else f"zero-size (shape {shape}, no entries)"
        raise ValueError(f"jaxprune: leaf '{path}' is {what}; only arrays with at least one axis "
                         "and one entry can be pruned")
    if _concrete(scores):
        _check_scores(path, scores)
    if keep_pruned is not None and tuple(np.shape(keep_pruned)) != shape:
        raise ValueError(f"jaxprune: keep_pruned mask for '{path}' has shape "
                         f"{tuple(np.shape(keep_pruned))}, scores {shape}")
