"""The core pipeline every method reuses: criteria → allocation → pattern → mask.

* :mod:`~jaxprune.core.masks` — mask trees that mirror the params (``None`` = not pruned),
  statistics.
* :mod:`~jaxprune.core.filters` — composable, hashable predicates choosing which leaves are pruned.
* :mod:`~jaxprune.core.criteria` — per-weight scores (higher = kept).
* :mod:`~jaxprune.core.allocation` — per-leaf (or per-unit-set) sparsity from a global target.
* :mod:`~jaxprune.core.patterns` — scores + sparsity → boolean mask of one leaf.
* :mod:`~jaxprune.core.topk` — exact top-k selection (several arrays in one program), the
  primitive under every unstructured mask and threshold.
* :mod:`~jaxprune.core.schedules` — when and how much to prune during training.
* :mod:`~jaxprune.core.walker` — the one jaxpr walker (rules table per primitive).
* :mod:`~jaxprune.core.opmap` — the operator map: each leaf's role and matrix view, traced from the
  model's computation (not from names or layouts).
* :mod:`~jaxprune.core.pipeline` — the only path from scores to masks (:func:`compute_masks`,
  :func:`leaf_mask`, :func:`leaf_masks`, :func:`prune`).

The core imports no method family (training, one-shot, structured, kernels, io).

>>> import jax.numpy as jnp
>>> from jaxprune.core import pipeline
>>> pipeline.leaf_mask(jnp.array([3., 1., 2., 0.]), 0.5)
Array([ True, False,  True, False], dtype=bool)
"""

from jaxprune.core import (
    allocation,
    criteria,
    filters,
    masks,
    opmap,
    patterns,
    pipeline,
    schedules,
    topk,
    walker,
)

__all__ = [
    "allocation", "criteria", "filters", "masks", "opmap", "patterns", "pipeline", "schedules", "topk",
    "walker",
]
