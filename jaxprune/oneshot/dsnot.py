"""DSnoT (Zhang et al., 2024): training-free prune-and-grow on top of any initial mask.

For every output unit (a column of the Flax kernel) DSnoT tracks the expected reconstruction error
``ε = Σ_j (W_j − Ŵ_j) E[x_j]`` between the dense and the sparse output and repeatedly swaps one
weight (no backprop, no weight update):

* **grow** the pruned weight ``j`` whose revival moves ``ε`` most towards 0
  (``argmax V_j E[x_j]`` if ``ε > 0``, else ``argmin``), where ``V`` are the values a kept weight takes
  (the dense weights, or e.g. SparseGPT's reconstructed ones);
* **prune** the kept weight ``k`` with the lowest Wanda importance ``|V_k|·‖x_k‖ / var_k^γ`` among
  those whose removal also moves ``ε`` towards 0 (``sign(V_k E[x_k]) = −sign(ε')``); for N:M, ``k``
  must lie in ``j``'s group, so the pattern is kept.

A swap is accepted only if it lowers the exact quadratic objective
``(W − Ŵ)ᵀ H (W − Ŵ)`` of that output (``H = XᵀX/n``); otherwise that output stops. So the
reconstruction error never increases and the number of kept weights per output is unchanged.
Runs ``max_cycles`` swaps per output in one ``jax.jit`` (``lax.fori_loop``), vectorised over outputs.

:class:`DSnoT` is a :class:`~jaxprune.oneshot.methods.LayerMethod` on top of a ``base`` method
(``DSnoT(base=SparseGPT())``; needs ``("gram",)`` plus the base's needs); :meth:`DSnoT.refine`
refines any given mask.

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> x = np.random.default_rng(0).normal(1.0, 1.0, size=(64, 8)).astype(np.float32)
    >>> st = LayerStats.from_inputs(x)
    >>> w = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    >>> m0 = np.abs(w) > np.median(np.abs(w))
    >>> _, m = DSnoT().refine(w, st, m0)
    >>> int(np.asarray(m).sum()) == int(m0.sum())
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats, as_matrix, from_matrix
from jaxprune.oneshot.common import check_hessian
from jaxprune.oneshot.methods import LayerMethod, get_method, register_method, resolve_layer_target
from jaxprune.oneshot.sparsegpt import SparseGPT
from jaxprune.oneshot.wanda import Magnitude, Wanda

__all__ = ["DSnoT", "quadratic_error"]


@functools.partial(jax.jit, static_argnames=("max_cycles", "m"))
def _dsnot_core(wd, v, mask, h, mu, imp, max_cycles: int, m: int | None):
    fin, out = wd.shape
    cols = jnp.arange(out)
    idx = jnp.arange(fin)
    d = wd - jnp.where(mask, v, 0.0)
    g = jnp.matmul(h, d, precision=jax.lax.Precision.HIGHEST)
    obj = jnp.sum(d * g, axis=0)
    vm = v * mu[:, None]  # V_j E[x_j]

    def cycle(_, c):
        mask, d, g, obj, active = c
        eps = jnp.sum(d * mu[:, None], axis=0)
        grow_sc = jnp.where(mask, -jnp.inf, jnp.where(eps[None, :] > 0, vm, -vm))
        j = jnp.argmax(grow_sc, axis=0)
        can_grow = jnp.any(~mask, axis=0)
        vj = v[j, cols]
        eps2 = eps - vj * mu[j]
        cand = mask & (idx[:, None] != j[None, :])
        if m is not None:
            cand = cand & ((idx[:, None] // m) == (j // m)[None, :])
        good = cand & (jnp.sign(vm) == -jnp.sign(eps2)[None, :])
        use = jnp.where(jnp.any(good, axis=0), 1, 0)
        sc = jnp.where(jnp.where(use[None, :] == 1, good, cand), imp, jnp.inf)
        k = jnp.argmin(sc, axis=0)
        can_prune = jnp.any(cand, axis=0)
        dj = -vj  # d_j: W_j -> W_j - V_j
        dk = v[k, cols]  # d_k: W_k - V_k -> W_k
        g2 = g + h[:, j] * dj[None, :] + h[:, k] * dk[None, :]
        d2 = d.at[j, cols].add(dj).at[k, cols].add(dk)
        obj2 = jnp.sum(d2 * g2, axis=0)
        ok = active & can_grow & can_prune & (obj2 < obj * (1.0 - 1e-6))
        mask2 = mask.at[j, cols].set(True).at[k, cols].set(False)
        mask = jnp.where(ok[None, :], mask2, mask)
        d = jnp.where(ok[None, :], d2, d)
        g = jnp.where(ok[None, :], g2, g)
        obj = jnp.where(ok, obj2, obj)
        return mask, d, g, obj, ok

    mask, *_ = jax.lax.fori_loop(0, max_cycles, cycle,
                                 (mask, d, g, obj, jnp.ones(out, bool)))
    return mask


def quadratic_error(w_dense: Any, w_new: Any, h: Any) -> np.ndarray:
    """Per-output ``(W − Ŵ)ᵀ H (W − Ŵ)`` for ``(fan_in, out)`` matrices (numpy, float64).

    >>> quadratic_error(np.ones((2, 1)), np.zeros((2, 1)), np.eye(2)).tolist()
    [2.0]
    """
    d = np.asarray(w_dense, np.float64) - np.asarray(w_new, np.float64)
    return np.einsum("io,ij,jo->o", d, np.asarray(h, np.float64), d)


@dataclasses.dataclass(frozen=True)
class DSnoT(LayerMethod):
    """DSnoT on top of ``base`` (a method or its name): ``base`` picks the initial mask and the
    values kept weights take; a regrown weight takes its dense value.

    Args:
      base: the initial method (default :class:`~jaxprune.oneshot.wanda.Wanda`, as in the paper).
      max_cycles: swaps tried per output.
      var_power: ``γ`` in the prune score ``|V_k|·‖x_k‖ / var_k^γ``.

    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> d = DSnoT(base="sparsegpt")
    >>> d.label, d.needs
    ('sparsegpt+dsnot', ('gram', 'norms'))
    >>> st = LayerStats(np.eye(4, dtype=np.float32), np.ones(4), np.ones(4), 1, 4)
    >>> _, m = d(np.array([[4.], [1.], [3.], [2.]]), st, pattern="2:4")
    >>> int(np.asarray(m).sum())
    2
    """

    base: LayerMethod = dataclasses.field(default_factory=Wanda)
    max_cycles: int = 50
    var_power: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", get_method(self.base))
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) \
                or self.max_cycles < 0:
            raise ValueError(f"jaxprune: DSnoT max_cycles must be an integer >= 0, got "
                             f"{self.max_cycles!r}")
        if not isinstance(self.var_power, int | float) or not math.isfinite(self.var_power):
            raise ValueError(f"jaxprune: DSnoT var_power must be a finite number, got "
                             f"{self.var_power!r}")

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("gram", "norms")`` plus what ``base`` needs."""
        return tuple(dict.fromkeys(("gram", "norms", *self.base.needs)))

    @property
    def label(self) -> str:  # type: ignore[override]
        """``"<base label>+dsnot"``."""
        return f"{self.base.label}+dsnot"

    def prune_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                     pattern: pat_lib.Pattern, *, name: str = "<layer>"
                     ) -> tuple[jax.Array, jax.Array]:
        """``base`` on the ``(fan_in, out)`` matrix, then DSnoT swaps.

        >>> st = LayerStats(np.eye(2, dtype=np.float32), np.ones(2), np.ones(2), 1, 2)
        >>> _, m = DSnoT(base="magnitude").prune_matrix(jnp.array([[1.], [3.]]), st, 0.5,
        ...                                             pat_lib.Unstructured())
        >>> m[:, 0].tolist()
        [False, True]
        """
        self.check_stats(stats, name)
        q, m = self.base.prune_matrix(w, stats, sparsity, pattern, name=name)
        # kept weights keep the base's values; a regrown weight takes its dense value
        values = jnp.where(m, q, w)
        nm_m = pattern.m if isinstance(pattern, pat_lib.NM) else None
        new = self._swap(w, stats, m, values, nm_m, name)
        return jnp.where(new, values, jnp.zeros((), values.dtype)), new

    def refine(
        self,
        weight: Any,
        stats: LayerStats,
        mask: Any,
        *,
        values: Any = None,
        pattern: pat_lib.Pattern | str = "unstructured",
        name: str = "<layer>",
    ) -> tuple[jax.Array, jax.Array]:
        """Refine a given ``mask`` of a layer (``base`` unused); returns ``(values * new_mask,
        new_mask)``.

        Args:
          weight: the dense kernel (the reconstruction target).
          stats: the layer's statistics (``gram``, means, variances, norms).
          mask: initial boolean mask of ``weight``'s shape (from any method).
          values: the values kept weights take (default ``weight``; pass SparseGPT's new weights
            to refine its mask while keeping its reconstruction).
          pattern: an N:M pattern keeps swaps inside the groups of ``m`` along the fan-in.

        >>> import numpy as np
        >>> from jaxprune.oneshot.calibration import LayerStats
        >>> st = LayerStats(np.eye(2, dtype=np.float32), np.ones(2), np.ones(2), 1, 2)
        >>> _, m = DSnoT().refine(np.array([[1.], [3.]]), st, np.array([[True], [False]]))
        >>> np.asarray(m)[:, 0].tolist()
        [False, True]
        """
        self.check_stats(stats, name)
        shape = np.shape(weight)
        if np.shape(mask) != shape:
            raise ValueError(f"jaxprune: DSnoT on '{name}': mask shape {np.shape(mask)} != weight "
                             f"shape {shape}")
        pat = pat_lib.for_path(pat_lib.parse(pattern), name)
        nm_m = None
        if isinstance(pat, pat_lib.NM):
            vshape = stats.view.view_shape if getattr(stats, "view", None) is not None else shape
            pat, _ = resolve_layer_target(None, pat, name, vshape, as_matrix(weight, stats, name).shape[0])
            nm_m = pat.m
        wd = as_matrix(weight, stats, name).astype(jnp.float32)
        v = wd if values is None else as_matrix(values, stats, name).astype(jnp.float32)
        m0 = as_matrix(jnp.asarray(mask, bool), stats, name)
        new = from_matrix(self._swap(wd, stats, m0, v, nm_m, name), stats, shape)
        vals = jnp.asarray(weight if values is None else values)
        return jnp.where(new, vals, jnp.zeros((), vals.dtype)), new

    def _swap(self, wd: jax.Array, stats: LayerStats, mask: jax.Array, v: jax.Array,
              nm_m: int | None, name: str) -> jax.Array:
        h = jnp.asarray(check_hessian(stats.hessian, name))
        wd = jnp.asarray(wd, jnp.float32)
        v = jnp.asarray(v, jnp.float32)
        mu = jnp.asarray(stats.mean, jnp.float32)
        var = jnp.asarray(stats.var, jnp.float32)
        imp = jnp.abs(v) * jnp.asarray(stats.norms, jnp.float32)[:, None]
        if self.var_power:
            imp = imp / jnp.power(var + 1e-8, self.var_power)[:, None]
        return _dsnot_core(wd, v, jnp.asarray(mask, bool), h, mu, imp, int(self.max_cycles), nm_m)


for _base in (Magnitude(), Wanda(), SparseGPT()):
    register_method(f"{_base.label}+dsnot", DSnoT(base=_base))
del _base
