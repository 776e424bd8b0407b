"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

``SparseGPT()(weight, stats, sparsity, *, pattern=...) -> (new_weight, mask)`` for a Flax kernel
(fan-in first); a :class:`~jaxprune.oneshot.methods.LayerMethod` that needs ``("gram",)``. Steps,
as in the published algorithm (Algorithm 1 and the reference code), in the Flax layout where an
*input* is a row:

1. ``H = XᵀX / n``; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are zeroed;
   dampening ``λ = percdamp · mean(diag H)`` (1% by default; grown ×10 with a warning if the
   Cholesky fails, so the result is never NaN).
2. ``U`` = upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``).
3. Inputs are processed in blocks of ``blocksize`` (128): the mask of a block is chosen *adaptively*
   from the current (already updated) weights with the score ``w² / U_jj²`` — exactly
   ``round(s · rows · out)`` entries per block for the unstructured pattern (the reference code's
   ``<= threshold`` prunes one extra entry per block; we keep the exact count), or per group of
   ``m`` inputs for N:M (chosen when the loop reaches the group). Both selections are
   :func:`jaxprune.core.pipeline.leaf_mask` (``n_keep=`` for the exact count, the N:M pattern).
4. Each input row ``i`` is quantised to its mask, the error ``(w - q)/U_ii`` is spread over the later
   rows of the block with ``U[i, :]``, and after the block the accumulated errors update all later
   rows at once (lazy batch update).

Everything after the Cholesky runs in one ``jax.jit`` with ``lax.fori_loop`` over blocks and rows.

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> st = LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), 64, 8)
    >>> w, m = SparseGPT()(np.ones((8, 4), np.float32), st, 0.5)
    >>> int(m.sum()), bool(np.all(np.asarray(w)[~np.asarray(m)] == 0))
    (16, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.core import pipeline
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.common import damped_inverse_cholesky, prepare_hessian
from jaxprune.oneshot.methods import LayerMethod, register_method

__all__ = ["SparseGPT"]


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"))
def _sparsegpt_core(w: jax.Array, u: jax.Array, sparsity: jax.Array, blocksize: int,
                    nm: pat_lib.NM | None) -> tuple[jax.Array, jax.Array]:
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
            sc = jnp.where((rows < real)[:, None], sc, jnp.inf)  # padding rows: always kept
            k_prune = jnp.round(sparsity * (real * out).astype(jnp.float32)).astype(jnp.int32)
            mask1 = pipeline.leaf_mask(sc, n_keep=bs * out - k_prune, path="<sparsegpt block>")
        else:
            mask1 = jnp.ones((bs, out), bool)

        def col(i: jax.Array, c: tuple) -> tuple:
            w1, mask1, q1, e1 = c
            if nm is not None:
                g = jax.lax.dynamic_slice(w1, (i, 0), (nm.m, out))
                dg = jax.lax.dynamic_slice(d, (i,), (nm.m,))
                gm = pipeline.leaf_mask((g / dg[:, None]) ** 2, sparsity, pattern=nm,
                                        path="<sparsegpt group>")
                mask1 = jnp.where(i % nm.m == 0,
                                  jax.lax.dynamic_update_slice(mask1, gm, (i, 0)), mask1)
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


@dataclasses.dataclass(frozen=True)
class SparseGPT(LayerMethod):
    """SparseGPT layer method; needs ``("gram",)``.

    Args:
      blocksize: lazy-update block (rounded down to a multiple of ``m`` for N:M).
      percdamp: dampening as a fraction of ``mean(diag H)``.

    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
    >>> w, m = SparseGPT()(np.arange(8.).reshape(4, 2), st, pattern="2:4")
    >>> np.asarray(m).sum(0).tolist()
    [2, 2]
    """

    needs: ClassVar[tuple[str, ...]] = ("gram",)
    label: ClassVar[str] = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01

    def prune_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                     pattern: pat_lib.Pattern, *, name: str = "<layer>"
                     ) -> tuple[jax.Array, jax.Array]:
        """SparseGPT on the ``(fan_in, out)`` matrix (see the module docstring).

        >>> st = LayerStats(np.eye(2, dtype=np.float32), np.zeros(2), np.ones(2), 1, 2)
        >>> _, m = SparseGPT().prune_matrix(jnp.array([[1.], [3.]]), st, 0.5,
        ...                                 pat_lib.Unstructured())
        >>> m[:, 0].tolist()
        [False, True]
        """
        self.check_stats(stats, name)
        w = jnp.asarray(w, jnp.float32)
        h, dead = prepare_hessian(stats.hessian, name)
        w = jnp.where(jnp.asarray(dead)[:, None], 0.0, w)
        u = damped_inverse_cholesky(h, self.percdamp, name)
        bs = int(self.blocksize)
        nm = None
        if isinstance(pattern, pat_lib.NM):
            nm = pat_lib.NM(pattern.n, pattern.m)
            bs = max(nm.m, bs - bs % nm.m)
        return _sparsegpt_core(w, u, jnp.asarray(sparsity, jnp.float32), bs, nm)


register_method("sparsegpt", SparseGPT())
_ = np  # used by the doctests
