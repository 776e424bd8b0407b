"""Wanda (Sun et al., 2023) and the magnitude baseline as layer transforms.

Wanda scores ``|W_ij| · ‖X_i‖₂`` (``jaxprune.core.criteria.wanda``) and compares *within each output*:
in a Flax kernel ``(in, out)`` an output unit is a column, so the mask keeps the same fraction of every
column (:class:`PerOutput`); N:M groups run along the input axis of each column
(:class:`jaxprune.core.patterns.NM`). Both go through :func:`jaxprune.core.pipeline.compute_masks`. No weight
update. The magnitude baseline ranks ``|W|`` over the whole layer.

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(None, np.zeros(2), np.array([1., 100.]), 4, 2)
    >>> _, m = wanda(np.array([[2., 2.], [1., 1.]]), st, 0.5)
    >>> np.asarray(m).tolist()
    [[False, False], [True, True]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import criteria, pipeline
from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats, as_matrix
from jaxprune.oneshot.common import Target, parse_target

__all__ = ["PerOutput", "wanda", "magnitude", "wanda_scores"]


@dataclasses.dataclass(frozen=True)
class PerOutput(pat_lib.Pattern):
    """Unstructured pattern applied separately to every output unit (last axis) of a kernel.

    >>> PerOutput().mask(jnp.array([[1., 4.], [3., 2.]]), 0.5)
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        flat = scores.reshape(-1, scores.shape[-1])
        keep = jax.vmap(lambda c: pat_lib.Unstructured().mask(c, sparsity), in_axes=1,
                        out_axes=1)(flat)
        return keep.reshape(scores.shape)


def _masks_for(name: str, w2: jax.Array) -> tuple[dict, dict]:
    return {name: w2}, {name: jnp.ones(w2.shape, bool)}


def wanda_scores(weight: Any, stats: LayerStats, name: str = "<layer>") -> jax.Array:
    """``|W| · ‖X‖`` on the ``(fan_in, out)`` view (via ``jaxprune.core.criteria.wanda``).

    >>> st = LayerStats(None, np.zeros(2), np.array([1., 4.]), 1, 2)
    >>> wanda_scores(np.ones((2, 1)), st).tolist()
    [[1.0], [2.0]]
    """
    w2 = as_matrix(weight, stats, name).astype(jnp.float32)
    params, masks = _masks_for(name, w2)
    return criteria.wanda(params, masks, act_norms={name: jnp.asarray(stats.norms)})[name]


def wanda(weight: Any, stats: LayerStats, target: Target, *, name: str = "<layer>"
          ) -> tuple[jax.Array, jax.Array]:
    """Wanda mask (per output, or N:M) and the masked weight; shapes as ``weight``.

    >>> st = LayerStats(None, np.zeros(4), np.ones(4), 1, 4)
    >>> _, m = wanda(np.array([[4.], [1.], [3.], [2.]]), st, "2:4")
    >>> np.asarray(m)[:, 0].tolist()
    [True, False, True, False]
    """
    pattern, s = parse_target(target, name, stats.fan_in)
    w2 = as_matrix(weight, stats, name)
    params, masks = _masks_for(name, w2)
    scores = criteria.wanda(params, masks, act_norms={name: jnp.asarray(stats.norms)})
    pat = PerOutput() if isinstance(pattern, pat_lib.Unstructured) else pattern
    m = pipeline.compute_masks(masks, scores, s, "uniform", pat)[name]
    shape = np.shape(weight)
    m = m.reshape(shape)
    w = jnp.asarray(weight)
    return jnp.where(m, w, jnp.zeros((), w.dtype)), m


def magnitude(weight: Any, stats: LayerStats | None, target: Target, *, name: str = "<layer>"
              ) -> tuple[jax.Array, jax.Array]:
    """Layer-wise magnitude baseline (``|W|`` over the whole layer, or N:M along the fan-in).

    >>> _, m = magnitude(np.array([[1., -4.], [3., 2.]]), None, 0.5)
    >>> np.asarray(m).tolist()
    [[False, True], [True, False]]
    """
    fan_in = stats.fan_in if stats is not None else int(np.prod(np.shape(weight)[:-1]))
    pattern, s = parse_target(target, name, fan_in)
    w2 = as_matrix(weight, fan_in, name)
    params, masks = _masks_for(name, w2)
    scores = criteria.magnitude(params, masks)
    m = pipeline.compute_masks(masks, scores, s, "uniform", pattern)[name].reshape(np.shape(weight))
    w = jnp.asarray(weight)
    return jnp.where(m, w, jnp.zeros((), w.dtype)), m


wanda.needs_gram = False  # type: ignore[attr-defined]
magnitude.needs_gram = False  # type: ignore[attr-defined]
