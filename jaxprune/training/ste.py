"""Straight-through estimator (STE) and SR-STE sparse training for N:M and unstructured masks.

The dense weights are kept and trained; the forward pass sees the sparse weights ``m ⊙ w`` with
``m`` recomputed from ``|w|`` at every step (through :func:`jaxprune.core.pipeline.compute_masks`), and
the gradient passes straight through the mask to every dense weight:

    w_sparse = w + stop_gradient(m ⊙ w − w)      # value m ⊙ w, d w_sparse / d w = I

SR-STE (Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural networks from
scratch") adds a sparse-refined decay ``λ · (1 − m) ⊙ w`` to the gradient of the pruned weights, so
they drift towards zero and the mask stabilises. :func:`sr_ste` is that term as an optax transform
to chain *before* the optimizer.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"dense": {"kernel": jnp.array([[1., -4.], [3., 2.], [-2., 1.], [4., 3.]])}}
    >>> loss = lambda p: jnp.sum(ste_params(p, pattern="2:4")["dense"]["kernel"])
    >>> ste_params(params, pattern="2:4")["dense"]["kernel"][:, 0]
    Array([0., 3., 0., 4.], dtype=float32)
    >>> jax.grad(loss)(params)["dense"]["kernel"][:, 0]  # straight through: all ones
    Array([1., 1., 1., 1.], dtype=float32)
    >>> tx = optax.chain(sr_ste(2e-4, pattern="2:4"), optax.sgd(0.1))
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria as crit_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import Filter, PyTree, apply_masks, tree_map_masked
from jaxprune.core.pipeline import (
    compute_masks,
    resolve_sparsity,
)
from jaxprune.training.wrapper import selected_masks

__all__ = ["ste_masks", "ste_params", "sparse_params", "sr_ste"]


def _resolve(sparsity: Any, pattern: pat_lib.Pattern | str) -> tuple[Any, pat_lib.Pattern]:
    pat = pat_lib.parse(pattern)
    return resolve_sparsity(sparsity, pat), pat


def ste_masks(
    params: PyTree,
    sparsity: float | None = None,
    *,
    pattern: pat_lib.Pattern | str = "2:4",
    allocation: alloc_lib.Allocation | str = "uniform",
    filter: Filter | None = None,
    opmap: Any = None,
) -> PyTree:
    """Magnitude masks of ``params`` at ``sparsity`` for ``pattern`` (N:M default: ``1 − n/m``).

    >>> ste_masks({"kernel": jnp.array([[1.], [4.], [3.], [2.]])})["kernel"][:, 0]
    Array([False,  True,  True, False], dtype=bool)
    """
    s, pat = _resolve(sparsity, pattern)
    masks = selected_masks("ste_masks", params, filter, pat, opmap)
    sg = jax.lax.stop_gradient(params)
    scores = crit_lib.magnitude(sg, masks)
    return compute_masks(masks, scores, s, allocation, pat, opmap=opmap)


def ste_params(params: PyTree, sparsity: float | None = None, **kwargs: Any) -> PyTree:
    """Params whose value is the sparse ``m ⊙ w`` and whose gradient is the identity (STE).

    Call it inside the loss: ``loss(ste_params(params, pattern="2:4"), batch)``. Masks are
    recomputed from ``|w|`` on every call, so pruned weights can come back when they grow.
    ``kwargs`` are :func:`ste_masks`'s (``pattern=``, ``allocation=``, ``filter=``, ``opmap=``).

    >>> p = {"kernel": jnp.array([[1.], [4.], [3.], [2.]])}
    >>> jax.grad(lambda p: jnp.sum(ste_params(p)["kernel"] ** 2))(p)["kernel"][:, 0]
    Array([0., 8., 6., 0.], dtype=float32)
    """
    masks = ste_masks(params, sparsity, **kwargs)
    return tree_map_masked(
        lambda m, w: w if m is None else w + jax.lax.stop_gradient(jnp.where(m, w, 0.0) - w),
        masks, params,
    )


def sparse_params(params: PyTree, sparsity: float | None = None, **kwargs: Any
                  ) -> tuple[PyTree, PyTree]:
    """Export: ``(params with the pruned entries zeroed, masks)`` — the model STE trained
    (``kwargs`` as in :func:`ste_masks`).

    >>> sp, m = sparse_params({"kernel": jnp.array([[1.], [4.], [3.], [2.]])}, pattern="2:4")
    >>> sp["kernel"][:, 0]
    Array([0., 4., 3., 0.], dtype=float32)
    """
    masks = ste_masks(params, sparsity, **kwargs)
    return apply_masks(params, masks), masks


def sr_ste(decay: float, sparsity: float | None = None, **kwargs: Any
           ) -> optax.GradientTransformation:
    """SR-STE's sparse-refined term: add ``decay · (1 − m) ⊙ w`` to the gradients of pruned weights.

    ``m`` is recomputed from the current ``|w|`` by :func:`ste_masks` (``kwargs`` are its
    ``pattern=``, ``allocation=``, ``filter=``, ``opmap=``, checked here). Chain it before the
    optimizer, with gradients taken through :func:`ste_params`:
    ``optax.chain(sr_ste(2e-4, pattern="2:4"), optax.sgd(lr))``.

    >>> tx = sr_ste(0.5, pattern="2:4")
    >>> p = {"kernel": jnp.array([[1.], [4.], [3.], [2.]])}
    >>> u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    >>> u["kernel"][:, 0]
    Array([0.5, 0. , 0. , 1. ], dtype=float32)
    """
    if isinstance(decay, bool) or not (isinstance(decay, int | float | np.floating | np.integer)
                                       and math.isfinite(decay) and decay >= 0.0):
        raise ValueError(f"jaxprune: sr_ste decay must be a finite float >= 0, got {decay!r}")
    unknown = sorted(set(kwargs) - {"pattern", "allocation", "filter", "opmap"})
    if unknown:
        raise TypeError(f"jaxprune: sr_ste got unexpected keyword(s) {unknown} (it takes ste_masks's "
                        "pattern=, allocation=, filter=, opmap=)")
    sparsity, pat = _resolve(sparsity, kwargs.get("pattern", "2:4"))
    kwargs = {**kwargs, "pattern": pat}

    def init_fn(params: PyTree) -> optax.EmptyState:
        selected_masks("sr_ste", params, kwargs.get("filter"), pat, kwargs.get("opmap"))
        return optax.EmptyState()

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        if params is None:
            raise ValueError("jaxprune: sr_ste needs params: call tx.update(grads, state, params)")
        masks = ste_masks(params, sparsity, **kwargs)

        def f(m: Any, g: Any, w: Any) -> Any:
            if m is None or g is None:
                return g
            return g + (decay * jnp.where(m, 0.0, w)).astype(g.dtype)

        return tree_map_masked(f, masks, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
