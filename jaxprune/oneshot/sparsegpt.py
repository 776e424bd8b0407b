"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

``sparsegpt(weight, stats, target) -> (new_weight, mask)`` for a Flax kernel (fan-in first). Steps,
as in the published algorithm (Algorithm 1 and the reference code), in the Flax layout where an
*input* is a row:

1. ``H = XᵀX / n``; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are zeroed;
   dampening ``λ = percdamp · mean(diag H)`` (1% by default; grown ×10 with a warning if the
   Cholesky fails, so the result is never NaN).
2. ``U`` = upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``).
3. Inputs are processed in blocks of ``blocksize`` (128): the mask of a block is chosen *adaptively*
   from the current (already updated) weights with the score ``w² / U_jj²`` — exactly
   ``round(s · rows · out)`` entries per block for unstructured targets (the reference code's
   ``<= threshold`` prunes one extra entry per block; we keep the exact count), or per group of
   ``m`` inputs for N:M (chosen when the loop reaches the group, via :class:`jaxprune.core.patterns.NM`).
4. Each input row ``i`` is quantised to its mask, the error ``(w - q)/U_ii`` is spread over the later
   rows of the block with ``U[i, :]``, and after the block the accumulated errors update all later
   rows at once (lazy batch update).

Everything after the Cholesky runs in one ``jax.jit`` with ``lax.fori_loop`` over blocks and rows.

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> st = LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), 64, 8)
    >>> w, m = sparsegpt(np.ones((8, 4), np.float32), st, 0.5)
    >>> int(m.sum()), bool(np.all(np.asarray(w)[~np.asarray(m)] == 0))
    (16, True)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats, as_matrix
from jaxprune.oneshot.common import (
    Target,
    damped_inverse_cholesky,
    parse_target,
    prepare_hessian,
)

__all__ = ["sparsegpt"]


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"))
def _sparsegpt_core(w: jax.Array, u: jax.Array, sparsity: jax.Array, blocksize: int,
                    nm: tuple[int, int] | None) -> tuple[jax.Array, jax.Array]:
    fin, out = w.shape
    bs = blocksize
    nb = math.ceil(fin / bs)
    pad = nb * bs - fin
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    up = jnp.pad(u, ((0, pad), (0, pad)))
    up = up + jnp.diag(jnp.concatenate([jnp.zeros(fin), jnp.ones(pad)]).astype(u.dtype))
    rows = jnp.arange(bs)

    def block(b: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        wcur, mcur = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(wcur, (i1, 0), (bs, out))
        u1 = jax.lax.dynamic_slice(up, (i1, i1), (bs, bs))
        d = jnp.diag(u1)
        real = jnp.clip(fin - i1, 0, bs)
        if nm is None:
            sc = (w1 / d[:, None]) ** 2
            sc = jnp.where((rows < real)[:, None], sc, jnp.inf)
            k_prune = jnp.round(sparsity * (real * out).astype(jnp.float32)).astype(jnp.int32)
            mask1 = pat_lib.topk_mask(sc.reshape(-1), bs * out - k_prune).reshape(bs, out)
        else:
            mask1 = jnp.ones((bs, out), bool)

        def col(i: jax.Array, c: tuple) -> tuple:
            w1, mask1, q1, e1 = c
            if nm is not None:
                n, m = nm
                g = jax.lax.dynamic_slice(w1, (i, 0), (m, out))
                dg = jax.lax.dynamic_slice(d, (i,), (m,))
                gm = pat_lib.NM(n, m).mask((g / dg[:, None]) ** 2, 1.0 - n / m)
                mask1 = jnp.where(i % m == 0, jax.lax.dynamic_update_slice(mask1, gm, (i, 0)),
                                  mask1)
            wi = w1[i]
            q = jnp.where(mask1[i], wi, 0.0)
            err = (wi - q) / d[i]
            w1 = w1 - jnp.outer(u1[i], err)
            return w1, mask1, q1.at[i].set(q), e1.at[i].set(err)

        z = jnp.zeros((bs, out), w.dtype)
        _, mask1, q1, e1 = jax.lax.fori_loop(0, bs, col, (w1, mask1, z, z))
        urows = jax.lax.dynamic_slice(up, (i1, 0), (bs, fin + pad))
        wcur = wcur - jnp.matmul(urows.T, e1, precision=jax.lax.Precision.HIGHEST)
        wcur = jax.lax.dynamic_update_slice(wcur, q1, (i1, 0))
        mcur = jax.lax.dynamic_update_slice(mcur, mask1, (i1, 0))
        return wcur, mcur

    wout, mout = jax.lax.fori_loop(0, nb, block, (wp, jnp.ones_like(wp, bool)))
    return wout[:fin], mout[:fin]


def sparsegpt(
    weight: Any,
    stats: LayerStats,
    target: Target,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "<layer>",
) -> tuple[jax.Array, jax.Array]:
    """Prune one layer with SparseGPT; returns ``(new_weight, mask)`` of ``weight``'s shape.

    Args:
      weight: Flax kernel (``(in, out)``, conv ``(h, w, in, out)``, DenseGeneral ``(*in, *out)``).
      stats: the layer's :class:`~jaxprune.oneshot.calibration.LayerStats` (with ``gram``).
      target: sparsity in ``[0, 1)`` or ``"N:M"`` / :class:`~jaxprune.core.patterns.NM`.
      blocksize: lazy-update block (rounded down to a multiple of ``m`` for N:M).
      percdamp: dampening as a fraction of ``mean(diag H)``.
      name: layer path used in error messages and warnings.

    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
    >>> w, m = sparsegpt(np.arange(8.).reshape(4, 2), st, "2:4")
    >>> np.asarray(m).sum(0).tolist()
    [2, 2]
    """
    pattern, s = parse_target(target, name, stats.fan_in)
    if stats.gram is None:
        raise ValueError(f"jaxprune: SparseGPT on '{name}' needs calibration with gram=True")
    w = as_matrix(weight, stats, name).astype(jnp.float32)
    h, dead = prepare_hessian(stats.hessian, name)
    w = jnp.where(jnp.asarray(dead)[:, None], 0.0, w)
    u = damped_inverse_cholesky(h, percdamp, name)
    nm = None
    bs = int(blocksize)
    if isinstance(pattern, pat_lib.NM):
        nm = (pattern.n, pattern.m)
        bs = max(pattern.m, bs - bs % pattern.m)
    q, m = _sparsegpt_core(w, u, jnp.asarray(s, jnp.float32), bs, nm)
    shape = np.shape(weight)
    return q.reshape(shape).astype(jnp.asarray(weight).dtype), m.reshape(shape)


sparsegpt.needs_gram = True  # type: ignore[attr-defined]
