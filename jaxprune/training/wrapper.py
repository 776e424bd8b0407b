"""The Optax wrapper skeleton shared by every training-time method.

:func:`pruner`, dynamic sparse training and lottery rewinding all wrap an inner optax optimizer,
keep a step counter and masks in a NamedTuple state, refuse to run without params, and project the
returned updates so ``optax.apply_updates`` leaves params exactly zero where a mask is off.

>>> import jax.numpy as jnp
>>> project({"w": jnp.array([1., 1.])}, {"w": jnp.array([2., 3.])}, {"w": jnp.array([True, False])})
{'w': Array([ 1., -3.], dtype=float32)}
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune.core.masks import PyTree, tree_map_masked

__all__ = ["PruneState", "project", "get_prune_state", "get_masks"]


class PruneState(NamedTuple):
    """State of :func:`pruner`: step ``count``, ``masks``, the wrapped optimizer's state and the
    accumulated movement score (``None`` unless the criterion needs it)."""

    count: jax.Array
    masks: PyTree
    inner_state: optax.OptState
    movement: PyTree | None


def project(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
    """Return ``u'`` with ``p + u' == m * (p + u)`` exactly zero where ``m`` is off.

    >>> project({"w": jnp.array([1., 1.])}, {"w": jnp.array([2., 3.])}, {"w": jnp.array([True, False])})
    {'w': Array([ 1., -3.], dtype=float32)}
    """
    def f(m, u, p):
        if m is None or u is None:
            return u
        return jnp.where(m, u, -p).astype(u.dtype)

    return tree_map_masked(f, masks, updates, params)


def get_prune_state(opt_state: optax.OptState) -> PruneState:
    """Find the :class:`PruneState` inside any (nested) optax state, e.g. under ``chain``.

    Raises ``ValueError`` if there is none or more than one.
    """
    found = [
        x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(x, PruneState)
    ]
    if len(found) != 1:
        raise ValueError(f"jaxprune: expected one PruneState in the optimizer state, found {len(found)}")
    return found[0]


def _is_wrapper(x: Any) -> bool:
    # nnx.Optimizer keeps optimizer state in Variable wrappers (duck-typed: no flax import here)
    return hasattr(x, "get_metadata") and (hasattr(x, "get_value") or hasattr(x, "value"))


def _unwrap(x: Any) -> Any:
    if not _is_wrapper(x):
        return x
    return x.get_value() if hasattr(x, "get_value") else x.value


def get_masks(opt_state: optax.OptState) -> PyTree:
    """The current masks of the (single) pruner inside ``opt_state`` (nnx wrappers removed).

    >>> tx = jp.pruner(optax.sgd(0.1), schedule=jp.schedules.OneShot(0.5, step=0))
    >>> get_masks(tx.init({"kernel": jnp.ones((2, 2))}))["kernel"].shape
    (2, 2)
    """
    masks = get_prune_state(opt_state).masks
    is_leaf = lambda x: x is None or _is_wrapper(x)  # noqa: E731
    if not any(_is_wrapper(x) for x in jax.tree.leaves(masks, is_leaf=is_leaf)):
        return masks
    return jax.tree.map(_unwrap, masks, is_leaf=is_leaf)
