"""OBR (Guo, Li & Benini, 2025, "Optimal Brain Restoration for Joint Quantization and
Sparsification of LLMs"): training-free, Hessian-based group error compensation between pruning
and quantization.

With the row-wise decoupled objective ``Δwᵀ H Δw`` per output (``H = XᵀX``; in the Flax
``(fan_in, out)`` layout one output is a *column*), an "evicted" group ``E`` of a column whose
change ``Δw_E`` is forced is compensated on the "retained" group ``R`` in closed form:

    ``Δw_R = −H_RR⁻¹ H_RE Δw_E``

:class:`OBR` applies it twice, as the paper's reference code does:

1. **Mask** from ``base`` (any layer method; Wanda by default, as in the paper): ``E`` = the pruned
   entries (``Δw_E = −w_E``), ``R`` = the kept ones: ``w' = m·w + H_RR⁻¹ H_RE w_E``.
2. **Quantization compensation**: the kept entries of the first ``alpha`` share of the fan-in
   (rows ``< split = round(alpha · fan_in)``) are quantized round-to-nearest, ``e = w' − q(w')``,
   and their error is compensated on the kept entries of the remaining rows:
   ``w'' = w' + H_RR⁻¹ H_RE e`` (``R`` = kept rows ``>= split``).
3. **Final quantization**: rows ``< split`` keep ``q(w')``; rows ``>= split`` are quantized by the
   GPTQ sweep of :mod:`jaxprune.oneshot.sparsegpt` on the sub-Hessian ``H[split:, split:]`` with the
   mask held fixed (``gptq_tail=True``, the paper's default) or round-to-nearest.

``H`` is dampened once (``λ = percdamp · mean(diag H)``) for all three steps. The grid is
:mod:`jaxprune.oneshot.quant`'s; each scale group takes its scale from the weights at the moment its
first row is quantized: groups starting before ``split`` from ``w'``, the others from ``w''`` (the
reference code takes per-channel scales from the dense original; here the pruned, compensated
weights set them, so 0 stays on the grid and pruned entries stay exactly 0).

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> st = LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), 64, 8)
    >>> w, m = OBR(quant=QuantSpec(bits=4, group_size=None))(np.ones((8, 4), np.float32), st,
    ...                                                       pattern="2:4")
    >>> int(m.sum()), bool(np.all(np.asarray(w)[~np.asarray(m)] == 0))
    (16, True)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.common import damped_inverse_cholesky, prepare_hessian
from jaxprune.oneshot.methods import LayerMethod, get_method, register_method
from jaxprune.oneshot.quant import QuantSpec, fake_quant, grid_constants, row_params
from jaxprune.oneshot.sparsegpt import SparseGPT, _sparsegpt_core
from jaxprune.oneshot.wanda import Wanda

__all__ = ["OBR", "group_compensation"]


@functools.partial(jax.jit, static_argnames=("kmax",))
def _solve_chunk(h: jax.Array, keep: jax.Array, rhs: jax.Array, kmax: int) -> jax.Array:
    """``x_R = H_RR⁻¹ rhs_R`` for a chunk of columns (``keep``, ``rhs``: ``(chunk, n)``)."""
    n = h.shape[0]

    def one(k: jax.Array, r: jax.Array) -> jax.Array:
        idx = jnp.argsort(~k, stable=True)[:kmax]  # the retained rows first, in order
        valid = k[idx]
        a = jnp.where(valid[:, None] & valid[None, :], h[idx][:, idx], 0.0)
        a = a + jnp.diag((~valid).astype(h.dtype))
        lo = jnp.linalg.cholesky(a)
        y = jax.scipy.linalg.cho_solve((lo, True), jnp.where(valid, r[idx], 0.0))
        return jnp.zeros(n, h.dtype).at[idx].set(jnp.where(valid, y, 0.0))

    return jax.vmap(one)(keep, rhs)


def _group_comp(h: jax.Array, keep: jax.Array, v: jax.Array, kmax: int) -> jax.Array:
    out = v.shape[1]
    rhs = jnp.matmul(h, v, precision=jax.lax.Precision.HIGHEST).T
    chunk = max(1, min(out, 2**24 // max(kmax * kmax, 1)))
    pad = -out % chunk  # equal chunks: one compilation
    kt = jnp.pad(keep.T, ((0, pad), (0, 0)))
    rt = jnp.pad(rhs, ((0, pad), (0, 0)))
    parts = [_solve_chunk(h, kt[i:i + chunk], rt[i:i + chunk], kmax)
             for i in range(0, out + pad, chunk)]
    return jnp.concatenate(parts, axis=0)[:out].T


def group_compensation(h: Any, retain: Any, v: Any) -> jax.Array:
    """OBR's closed-form compensation for every column: ``x_R = H_RR⁻¹ (H v)_R``, 0 off ``R``.

    ``h``: ``(n, n)`` positive definite; ``retain``: ``(n, out)`` bool, column ``j``'s retained
    set ``R``; ``v``: ``(n, out)``, minus the forced change of the evicted entries (``w_E`` for
    pruning, the quantization error ``w − q(w)`` for quantization), 0 on the others. Then
    ``Δw_R = −H_RR⁻¹ H_RE Δw_E = x_R`` minimizes ``ΔwᵀHΔw`` with ``Δw_E`` fixed.

    >>> h = np.array([[2., 1.], [1., 2.]], np.float32)
    >>> x = group_compensation(h, np.array([[True], [False]]), np.array([[0.], [1.]]))
    >>> np.round(np.asarray(x), 4).tolist()
    [[0.5], [0.0]]
    """
    h = jnp.asarray(h, jnp.float32)
    retain = jnp.asarray(retain, bool)
    v = jnp.asarray(v, jnp.float32)
    kmax = int(jnp.max(jnp.sum(retain, axis=0))) if retain.size else 0
    if kmax == 0:
        return jnp.zeros_like(v)
    return _group_comp(h, retain, v, kmax)


@dataclasses.dataclass(frozen=True)
class OBR(SparseGPT):
    """OBR layer method (see the module docstring): ``base``'s mask, then pruning and quantization
    error compensation; returns the dequantized weight and the mask. Needs ``("gram",)`` plus what
    ``base`` needs; :meth:`compress` gives the integer codes and group scales.

    Args:
      base: the method (or its name) that chooses the mask; its weights are not used.
      quant: the :class:`~jaxprune.oneshot.quant.QuantSpec` grid (``act_order`` is not supported).
      alpha: the share of the fan-in quantized first (round-to-nearest) whose error is compensated
        on the rest (the paper's ``obr_alpha``, 0.5).
      gptq_tail: quantize the rest with the GPTQ sweep (fixed mask) or round-to-nearest.
      blocksize, percdamp: as in :class:`~jaxprune.oneshot.sparsegpt.SparseGPT`.

    >>> OBR().label, OBR(base="sparsegpt").label, OBR().needs
    ('obr', 'sparsegpt+obr', ('gram', 'norms'))
    """

    base: LayerMethod = dataclasses.field(default_factory=Wanda)
    quant: QuantSpec | None = QuantSpec(bits=4)
    alpha: float = 0.5
    gptq_tail: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "base", get_method(self.base))
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0.0 <= a <= 1.0:
            raise ValueError(f"jaxprune: OBR.alpha must be a number in [0, 1], got {a!r}")
        if not isinstance(self.quant, QuantSpec):
            raise ValueError(f"jaxprune: OBR.quant must be a QuantSpec, got {self.quant!r}")
        if self.quant.act_order:
            raise ValueError("jaxprune: OBR does not support QuantSpec(act_order=True)")

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("gram",)`` plus what ``base`` needs."""
        return tuple(dict.fromkeys(("gram", *self.base.needs)))

    @property
    def label(self) -> str:  # type: ignore[override]
        """``"obr"`` on the paper's Wanda mask, else ``"<base label>+obr"``."""
        return "obr" if self.base == Wanda() else f"{self.base.label}+obr"

    def _sweep(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
               pattern: pat_lib.Pattern, name: str) -> tuple[jax.Array, ...]:
        self.check_stats(stats, name)
        w = jnp.asarray(w, jnp.float32)
        h, dead = prepare_hessian(stats.hessian, name)
        w = jnp.where(jnp.asarray(dead)[:, None], 0.0, w)
        _, m = self.base.prune_matrix(w, stats, sparsity, pattern, name=name)
        m = jnp.asarray(m, bool)
        fin = w.shape[0]
        q = self.quant
        split = int(round(self.alpha * fin))
        first = jnp.arange(fin)[:, None] < split
        mean_diag = float(np.mean(np.abs(np.diag(h)))) or 1.0
        damp = self.percdamp * mean_diag
        for _ in range(8):
            hd = jnp.asarray(h + damp * np.eye(fin), jnp.float32)
            w1 = jnp.where(m, w, 0.0) + group_compensation(hd, m, jnp.where(m, 0.0, w))
            s1, z1 = row_params(w1, q)
            q1 = fake_quant(w1, s1, z1, q.maxq)
            e = jnp.where(first, w1 - q1, 0.0)
            w2 = w1 + group_compensation(hd, m & ~first, e)
            if bool(jnp.all(jnp.isfinite(w2))):
                break
            new = max(damp * 10.0, 1e-2 * mean_diag)
            warnings.warn(f"jaxprune: Hessian of layer '{name}' is singular or indefinite with "
                          f"dampening {damp:.3g}; increasing dampening to {new:.3g}",
                          RuntimeWarning, stacklevel=3)
            damp = new
        else:
            raise ValueError(f"jaxprune: OBR on '{name}': compensation is not finite even with "
                             f"dampening {damp:.3g}")
        s2, z2 = row_params(w2, q)
        g = q.group_size or fin
        starts_first = (jnp.arange(fin) // g * g < split)[:, None]
        srows = jnp.where(starts_first, s1, s2)
        zrows = jnp.where(starts_first, z1, z2)
        if split == fin:
            return q1, m, srows, zrows
        if self.gptq_tail:
            u2 = damped_inverse_cholesky(np.asarray(hd)[split:, split:], 0.0, name)
            tail = _sparsegpt_core(w2[split:], u2, jnp.asarray(0.0, jnp.float32),
                                   int(self.blocksize), None, 0,
                                   True, grid_constants(q), (srows[split:], zrows[split:]),
                                   m[split:])[0]
        else:
            tail = fake_quant(w2[split:], srows[split:], zrows[split:], q.maxq)
        out = jnp.concatenate([q1[:split], jnp.where(m[split:], tail, 0.0)], axis=0)
        return out, m, srows, zrows


register_method("obr", OBR())
register_method("obr-int8", OBR(quant=QuantSpec(bits=8)))
