"""Wanda (Sun et al., 2023) and the magnitude baseline as layer methods.

Wanda scores ``|W_ij| · ‖X_i‖₂`` (``jaxprune.core.criteria.wanda``) and compares *within each output*:
in a Flax kernel ``(in, out)`` an output unit is a column, so the mask keeps the same fraction of every
column (:class:`PerOutput`); N:M groups run along the input axis of each column
(:class:`jaxprune.core.patterns.NM`). Both go through :func:`jaxprune.core.pipeline.compute_masks`. No weight
update. The magnitude baseline ranks ``|W|`` over the whole layer. :class:`Wanda` needs
``("norms",)``, :class:`Magnitude` nothing (``stats`` may be ``None``).

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(None, np.zeros(2), np.array([1., 100.]), 4, 2)
    >>> _, m = Wanda()(np.array([[2., 2.], [1., 1.]]), st, 0.5)
    >>> np.asarray(m).tolist()
    [[False, False], [True, True]]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxprune.core import criteria, pipeline
from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats, as_matrix
from jaxprune.oneshot.methods import LayerMethod, _by_group, register_method

__all__ = ["PerOutput", "Wanda", "Magnitude", "wanda_scores"]


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

    def run(w: jax.Array, st: LayerStats, nm: str, _: Any) -> tuple[jax.Array, None]:
        params, masks = _masks_for(nm, w)
        return criteria.wanda(params, masks, act_norms={nm: jnp.asarray(st.norms)})[nm], None

    return _by_group(run, w2, stats, name)[0]  # a grouped conv: each group's own norms


@dataclasses.dataclass(frozen=True)
class Wanda(LayerMethod):
    """Wanda mask (per output, or N:M) and the masked weight; needs ``("norms",)``.

    >>> st = LayerStats(None, np.zeros(4), np.ones(4), 1, 4)
    >>> _, m = Wanda()(np.array([[4.], [1.], [3.], [2.]]), st, pattern="2:4")
    >>> np.asarray(m)[:, 0].tolist()
    [True, False, True, False]
    """

    needs: ClassVar[tuple[str, ...]] = ("norms",)
    label: ClassVar[str] = "wanda"

    def prune_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                     pattern: pat_lib.Pattern, *, name: str = "<layer>"
                     ) -> tuple[jax.Array, jax.Array]:
        """Scores ``|W|·‖X‖`` through :func:`jaxprune.core.pipeline.leaf_mask`.

        >>> st = LayerStats(None, np.zeros(2), np.array([1., 4.]), 1, 2)
        >>> Wanda().prune_matrix(jnp.ones((2, 1)), st, 0.5, pat_lib.Unstructured())[1].tolist()
        [[False], [True]]
        """
        self.check_stats(stats, name)
        params, masks = _masks_for(name, w)
        scores = criteria.wanda(params, masks, act_norms={name: jnp.asarray(stats.norms)})
        pat = PerOutput() if isinstance(pattern, pat_lib.Unstructured) else pattern
        # one leaf: leaf_mask, whose compiled ops are shared by every layer of this shape (a
        # one-leaf compute_masks tree keyed by the layer's name would compile once per layer)
        m = pipeline.leaf_mask(scores[name], sparsity, pattern=pat, path=name)
        return jnp.where(m, w, jnp.zeros((), w.dtype)), m


@dataclasses.dataclass(frozen=True)
class Magnitude(LayerMethod):
    """Layer-wise magnitude baseline (``|W|`` over the whole layer, or N:M along the fan-in).

    >>> _, m = Magnitude()(np.array([[1., -4.], [3., 2.]]), None, 0.5)
    >>> np.asarray(m).tolist()
    [[False, True], [True, False]]
    """

    label: ClassVar[str] = "magnitude"

    def prune_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                     pattern: pat_lib.Pattern, *, name: str = "<layer>"
                     ) -> tuple[jax.Array, jax.Array]:
        """``|W|`` through :func:`jaxprune.core.pipeline.leaf_mask`.

        >>> Magnitude().prune_matrix(jnp.array([[1.], [-3.]]), None, 0.5,
        ...                          pat_lib.Unstructured())[1].tolist()
        [[False], [True]]
        """
        params, masks = _masks_for(name, w)
        scores = criteria.magnitude(params, masks)
        m = pipeline.leaf_mask(scores[name], sparsity, pattern=pattern, path=name)
        return jnp.where(m, w, jnp.zeros((), w.dtype)), m


register_method("magnitude", Magnitude())
register_method("wanda", Wanda())
