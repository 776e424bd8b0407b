"""Calibration: record the input statistics of every matmul/conv weight of any model.

Calibration is operator-level (:mod:`jaxprune.oneshot.observe`): the model is traced, the operator
map finds every ``dot_general`` / convolution that multiplies a parameter with data — ``nn.Dense``,
``nn.DenseGeneral``, ``nn.Conv``, raw ``self.param`` weights in ``jnp.einsum``, nnx layers,
PyTorch-layout ``x @ W.T`` — and the data operand is reduced to statistics *in that weight's matrix
view*. Statistics are keyed by the weight's path in the params tree
(``jaxprune.core.masks.path_str``: ``"Dense_0/kernel"``) and carry the view
(:class:`~jaxprune.core.opmap.LeafOp`), so layer methods see the matrix actually multiplied.

For every weight we stream, in float32, over all calibration tokens ``x`` (rows of its fan-in: a
Dense input row, an einsum operand with its contracted axes in the weight's order, a flattened conv
patch in ``(*window, in)`` order): ``gram = Σ xᵀx``, ``sum = Σ x``, ``sumsq = Σ x²`` and the token
``count`` (padding excluded with a token mask). From these :class:`LayerStats` derives column norms
``‖X_j‖₂`` (Wanda), means, variances and ``H = XᵀX / n``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> st = calibrate(model, params, [jnp.ones((2, 4))])
    >>> st["kernel"].gram.shape, st["kernel"].count
    ((4, 4), 2)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import PyTree

__all__ = [
    "LayerStats", "calibrate", "layer_inputs", "merge_stats", "as_matrix", "from_matrix",
]


class LayerStats(NamedTuple):
    """Streamed input statistics of one layer (float32, fan-in view ``(tokens, fan_in)``).

    ``gram`` is ``None`` when calibration ran with ``gram=False`` (Wanda/OWL need only norms).
    A grouped conv (``feature_group_count = G > 1``, e.g. depthwise) has ``groups = G`` and one
    set of statistics per group on a leading axis (``gram`` ``(G, fan_in, fan_in)``, ``sum``
    ``(G, fan_in)``): group ``g`` feeds the ``g``-th block of ``out / G`` output columns of the
    matrix view, and :meth:`group` gives its statistics as a layer of their own. Layers stacked
    for ``lax.scan`` / ``nn.scan`` (one weight sliced by the scan) have ``entries = L`` and one set
    of statistics per stacked layer on a leading axis: entry ``l`` feeds the ``l``-th block of
    ``fan_in`` rows of the matrix view (:meth:`entry`).
    """

    gram: np.ndarray | None
    sum: np.ndarray
    sumsq: np.ndarray
    count: int
    fan_in: int
    view: Any = None  # the weight's LeafOp (matrix view) when calibration traced it
    groups: int = 1
    entries: int = 1

    def entry(self, i: int) -> LayerStats:
        """Stacked layer ``i``'s statistics (the layer itself when ``entries == 1``), no view.

        >>> st = LayerStats(np.ones((2, 3, 3)), np.ones((2, 3)), np.ones((2, 3)), 4, 3, entries=2)
        >>> st.entry(1).gram.shape, st.entry(1).entries
        ((3, 3), 1)
        """
        return self._take(i, self.entries, "stacked layers", groups=self.groups)

    def group(self, g: int) -> LayerStats:
        """Group ``g``'s statistics (the layer itself when ``groups == 1``), without a view.

        >>> st = LayerStats.from_inputs(np.ones((2, 4, 3)))
        >>> st.groups, st.group(1).sum.tolist(), st.group(1).groups
        (2, [4.0, 4.0, 4.0], 1)
        """
        return self._take(g, self.groups, "groups")

    def _take(self, i: int, n: int, what: str, **keep: Any) -> LayerStats:
        """Part ``i`` of ``n`` along the statistics' leading axis (``self`` when ``n == 1``)."""
        if n == 1:
            return self
        if not 0 <= i < n:
            raise IndexError(f"jaxprune: part {i} of stats with {n} {what}")
        return LayerStats(None if self.gram is None else self.gram[i], self.sum[i],
                          self.sumsq[i], self.count, self.fan_in, **keep)

    @classmethod
    def from_inputs(cls, x: Any, *, gram: bool = True) -> LayerStats:
        """The statistics calibration records for one layer whose inputs are the rows of ``x``
        ``(tokens, fan_in)`` (float32), e.g. to prune a layer from activations you already have;
        ``(groups, tokens, fan_in)`` for a grouped conv.

        >>> st = LayerStats.from_inputs(np.ones((4, 3)))
        >>> st.count, st.fan_in, st.hessian[0, 0]
        (4, 3, np.float32(1.0))
        """
        x = np.asarray(x, np.float32)
        if x.ndim not in (2, 3):
            raise ValueError(f"jaxprune: LayerStats.from_inputs needs (tokens, fan_in) rows (or "
                             f"(groups, tokens, fan_in)), got shape {x.shape}")
        g = np.swapaxes(x, -1, -2) @ x if gram else None
        return cls(g, x.sum(-2), (x * x).sum(-2), x.shape[-2], x.shape[-1],
                   groups=x.shape[0] if x.ndim == 3 else 1)

    @property
    def norms(self) -> np.ndarray:
        """Column norms ``‖X_j‖₂`` over all calibration tokens (the Wanda statistic)."""
        return np.sqrt(np.maximum(self.sumsq, 0.0))

    @property
    def mean(self) -> np.ndarray:
        """Per-input mean ``E[x_j]``."""
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        """Per-input variance ``E[x_j²] - E[x_j]²`` (clipped at 0)."""
        return np.maximum(self.sumsq / max(self.count, 1) - self.mean**2, 0.0)

    @property
    def hessian(self) -> np.ndarray:
        """``H = XᵀX / n`` (the layer-wise OBS Hessian up to a factor 2)."""
        if self.gram is None:
            raise ValueError("jaxprune: these stats were recorded with gram=False; no Hessian")
        return self.gram / max(self.count, 1)


def merge_stats(a: LayerStats | None, b: LayerStats) -> LayerStats:
    """Sum two partial statistics of the same layer (``a`` may be ``None``).

    >>> s = LayerStats(np.eye(2, dtype=np.float32), np.ones(2), np.ones(2), 1, 2)
    >>> merge_stats(s, s).count
    2
    """
    if a is None:
        return b
    if (a.fan_in, a.groups, a.entries) != (b.fan_in, b.groups, b.entries):
        raise ValueError(f"jaxprune: cannot merge stats of fan-in {a.fan_in} x {a.groups} groups "
                         f"x {a.entries} entries with fan-in {b.fan_in} x {b.groups} groups x "
                         f"{b.entries} entries")
    gram = None if a.gram is None or b.gram is None else a.gram + b.gram
    return LayerStats(gram, a.sum + b.sum, a.sumsq + b.sumsq, a.count + b.count, a.fan_in,
                      a.view if a.view is not None else b.view, a.groups, a.entries)


def as_matrix(weight: Any, stats: LayerStats | int, name: str = "<layer>") -> jax.Array:
    """The ``(fan_in, out)`` matrix a weight is multiplied as: the traced view of ``stats`` when
    calibration recorded one (any layout: ``(out, in)`` PyTorch weights, DenseGeneral, einsum), else
    the Flax layout with ``stats``' fan-in (or pass the fan-in as an int;
    :func:`jaxprune.core.patterns.matrix_view`).

    >>> as_matrix(jnp.ones((3, 3, 2, 5)), 18).shape
    (18, 5)
    """
    if isinstance(stats, LayerStats) and stats.view is not None:
        return stats.view.to_view(weight)
    fan_in = stats if isinstance(stats, int) else stats.fan_in
    w = jnp.asarray(weight)
    try:
        view = pat_lib.matrix_view(tuple(w.shape), fan_in)
    except ValueError:
        raise ValueError(
            f"jaxprune: kernel '{name}' of shape {tuple(w.shape)} does not match calibration "
            f"fan-in {fan_in}"
        ) from None
    return w.reshape(view)


def from_matrix(w2: Any, stats: LayerStats | int | None, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`as_matrix`: the ``(fan_in, out)`` matrix back in the weight's layout.

    >>> from_matrix(jnp.ones((18, 5)), 18, (3, 3, 2, 5)).shape
    (3, 3, 2, 5)
    """
    if isinstance(stats, LayerStats) and stats.view is not None:
        return stats.view.from_view(w2)
    return jnp.asarray(w2).reshape(shape)


# ----------------------------------------------------------------------------------------------
# The calibrator
# ----------------------------------------------------------------------------------------------


def calibrate(
    model: Any,
    params: PyTree | None,
    batches: Iterable[Any],
    *,
    gram: bool = True,
    token_masks: Iterable[Any] | None = None,
    method: Any = None,
    collect: str = "params",
    variables: PyTree | None = None,
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Run calibration batches through a model; return ``{weight path: LayerStats}``.

    Args:
      model: a linen ``Module`` (applied as ``model.apply({collect: params, **variables}, *batch)``),
        an nnx ``Module`` (``params`` ignored: its state is used) or any function
        ``fn(params, *batch)``.
      params: the params tree (stats keys are ``path_str`` paths into it).
      batches: inputs; a tuple is unpacked into positional arguments. Shapes may vary (one
        compilation per distinct shape, reused by later calls).
      gram: also accumulate ``XᵀX`` (needed by SparseGPT/OBS/DSnoT; Wanda needs only norms).
      token_masks: one mask per batch (e.g. ``(batch, seq)``, 1 = real token): padding is
        excluded from every statistic.
      method: linen method to call instead of ``__call__``.
      collect: the linen collection holding ``params``.
      variables: other linen collections the model reads (``batch_stats``...), passed as data.
      progress: a progress bar over batches.

    Raises ``ValueError`` for zero batches, masks that do not fit, or a model with no matmul/conv
    weight applied to its inputs.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> m = nn.Dense(2); p = m.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> calibrate(m, p, [jnp.ones((4, 3))])["kernel"].norms
    array([2., 2., 2.], dtype=float32)
    """
    from jaxprune.oneshot.observe import model_fn, observe

    fn, tree = model_fn(model, params, method=method, collect=collect, variables=variables)
    if variables:
        batches = [(variables, *(b if isinstance(b, tuple) else (b,))) for b in batches]
    return observe(fn, tree, batches, gram=gram, token_masks=token_masks, progress=progress)


def layer_inputs(model: Any, params: PyTree | None, batch: Any, *, method: Any = None,
                 collect: str = "params") -> dict[str, jax.Array]:
    """The raw ``(tokens, fan_in)`` input rows of every matmul/conv weight for one batch (for
    tests and reconstruction errors; calibration itself never stores activations).

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> p = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> layer_inputs(nn.Dense(2), p, jnp.ones((4, 3)))["kernel"].shape
    (4, 3)
    """
    from jaxprune.oneshot.observe import model_fn, rows_of

    fn, tree = model_fn(model, params, method=method, collect=collect)
    return rows_of(fn, tree, batch)
