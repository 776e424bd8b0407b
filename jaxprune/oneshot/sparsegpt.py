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
    >>> st = LayerStats.from_inputs(x)
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
from jaxprune.oneshot.common import damped_inverse_cholesky, prepare_hessian, zero_dead
from jaxprune.oneshot.methods import LayerMethod, register_method
from jaxprune.oneshot.quant import (
    QuantizedWeight,
    QuantSpec,
    encode,
    fake_quant,
    grid_constants,
    grid_params_traced,
    row_params,
)

__all__ = ["SparseGPT", "GPTQ"]


@functools.partial(jax.jit, static_argnames=("blocksize", "nm", "quant", "prune"))
def _sparsegpt_core(w: jax.Array, u: jax.Array, sparsity: jax.Array, blocksize: int,
                    nm: pat_lib.NM | None, quant: int | None = None, prune: bool = True,
                    qc: jax.Array | None = None,
                    qrows: tuple[jax.Array, jax.Array] | None = None,
                    fixed: jax.Array | None = None,
                    nrows: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The one column sweep: prune (``prune``), quantize (``quant``: the group size, 0 with
    ``qrows``) or both, with compensation; ``qc``: :func:`~jaxprune.oneshot.quant.grid_constants`.
    ``fixed``: a given ``(fan_in, out)`` mask instead of the adaptive one (OBR's GPTQ stage).

    ``qrows``: static per-row grid params ``(scale, zero)`` (per channel / act-order groups);
    otherwise each group's params come from its kept, current weights when the sweep reaches its
    first row (N:M: the mask the group would get now). Returns ``(w, mask)`` and, with ``quant``,
    the per-row params too.

    ``nrows`` (traced): only the first ``nrows`` rows are real, the rest padding (zero weights,
    identity rows and columns of ``u``: exact, they never change a real row); the sweep stops
    after the last real row, so one program serves every layer of the same width with at most
    ``w.shape[0]`` rows (:func:`_shared_rows`).
    """
    rows_in, out = w.shape
    fin = rows_in if nrows is None else nrows
    bs = blocksize
    nb = math.ceil(rows_in / bs)
    pad = nb * bs - rows_in
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    up = jnp.pad(u, ((0, pad), (0, pad)))
    up = up + jnp.diag(jnp.concatenate([jnp.zeros(rows_in), jnp.ones(pad)]).astype(u.dtype))
    rows = jnp.arange(bs)
    if fixed is not None:
        fixed = jnp.pad(fixed, ((0, pad), (0, 0)), constant_values=True)
    if quant is not None:
        if qrows is not None:
            srows = jnp.pad(qrows[0], ((0, pad), (0, 0)), constant_values=1.0)
            zrows = jnp.pad(qrows[1], ((0, pad), (0, 0)))
        else:
            srows, zrows = jnp.ones_like(wp), jnp.zeros_like(wp)

    def block(b: jax.Array, carry: tuple) -> tuple:
        wcur, mcur = carry[:2]
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(wcur, (i1, 0), (bs, out))
        u1 = jax.lax.dynamic_slice(up, (i1, i1), (bs, bs))
        d = jnp.diag(u1)
        real = jnp.clip(fin - i1, 0, bs)
        if fixed is not None:
            mask1 = jax.lax.dynamic_slice(fixed, (i1, 0), (bs, out))
        elif nm is None and prune:
            sc = (w1 / d[:, None]) ** 2
            sc = jnp.where((rows < real)[:, None], sc, jnp.inf)  # padding rows: always kept
            k_prune = jnp.round(sparsity * (real * out).astype(jnp.float32)).astype(jnp.int32)
            mask1 = pipeline.leaf_mask(sc, n_keep=bs * out - k_prune, path="<sparsegpt block>")
        else:
            mask1 = jnp.ones((bs, out), bool)
        if quant is not None:
            s1 = jax.lax.dynamic_slice(carry[2], (i1, 0), (bs, out))
            z1 = jax.lax.dynamic_slice(carry[3], (i1, 0), (bs, out))

        def col(i: jax.Array, c: tuple) -> tuple:
            w1, mask1, q1, e1 = c[:4]
            if nm is not None and fixed is None:
                g = jax.lax.dynamic_slice(w1, (i, 0), (nm.m, out))
                dg = jax.lax.dynamic_slice(d, (i,), (nm.m,))
                gm = pipeline.leaf_mask((g / dg[:, None]) ** 2, sparsity, pattern=nm,
                                        path="<sparsegpt group>")
                mask1 = jnp.where(i % nm.m == 0,
                                  jax.lax.dynamic_update_slice(mask1, gm, (i, 0)), mask1)
            wi = w1[i]
            q = jnp.where(mask1[i], wi, 0.0)
            if quant is not None:
                s1, z1 = c[4:]
                if qrows is None:  # dynamic groups: params of the kept, updated rows of the group
                    gs = quant

                    def new_params(sz: tuple) -> tuple:
                        grp = jax.lax.dynamic_slice(jnp.where(mask1, w1, 0.0), (i, 0), (gs, out))
                        if nm is not None:  # the N:M mask the group's rows would get now
                            dg = jax.lax.dynamic_slice(d, (i,), (gs,))
                            grp = jnp.where(pipeline.leaf_mask((grp / dg[:, None]) ** 2, sparsity,
                                                               pattern=nm, path="<gptq group>"),
                                            grp, 0.0)
                        s, z = grid_params_traced(grp, qc)
                        upd = lambda a, v: jax.lax.dynamic_update_slice(  # noqa: E731
                            a, jnp.broadcast_to(v, (gs, out)), (i, 0))
                        return upd(sz[0], s), upd(sz[1], z)

                    s1, z1 = jax.lax.cond(i % gs == 0, new_params, lambda sz: sz, (s1, z1))
                q = fake_quant(q, s1[i], z1[i], qc[0])
            err = (wi - q) / d[i]
            w1 = w1 - jnp.outer(u1[i], err)
            new = (w1, mask1, q1.at[i].set(q), e1.at[i].set(err))
            return new if quant is None else new + (s1, z1)

        z = jnp.zeros((bs, out), w.dtype)
        init = (w1, mask1, z, z) if quant is None else (w1, mask1, z, z, s1, z1)
        res = jax.lax.fori_loop(0, bs, col, init)
        mask1, q1, e1 = res[1:4]
        urows = jax.lax.dynamic_slice(up, (i1, 0), (bs, rows_in + pad))
        wcur = wcur - jnp.matmul(urows.T, e1, precision=jax.lax.Precision.HIGHEST)
        wcur = jax.lax.dynamic_update_slice(wcur, q1, (i1, 0))
        mcur = jax.lax.dynamic_update_slice(mcur, mask1, (i1, 0))
        if quant is None:
            return wcur, mcur
        return (wcur, mcur, jax.lax.dynamic_update_slice(carry[2], res[4], (i1, 0)),
                jax.lax.dynamic_update_slice(carry[3], res[5], (i1, 0)))

    init = (wp, jnp.ones_like(wp, bool))
    if quant is not None:
        init = init + (srows, zrows)
    res = jax.lax.fori_loop(0, nb if nrows is None else (nrows + bs - 1) // bs, block, init)
    return tuple(r[:rows_in] for r in res)


# Compile-time sharing of the sweep between layers of equal width: {(out, blocksize, N:M): row
# counts already compiled}. A layer reuses the smallest compiled row count within _SHARE_RATIO of
# its own (padding costs only the lazy updates of the padded rows); layers above _SHARE_MAX_ROWS
# rows, whose sweep outweighs a compilation, get their own program.
_SHARED_ROWS: dict[tuple, list[int]] = {}
_SHARE_RATIO = 4
_SHARE_MAX_ROWS = 4096


def _shared_rows(fin: int, out: int, bs: int, nm: pat_lib.NM | None) -> int | None:
    """Rows of the program a ``(fin, out)`` sweep runs in (``None``: its own, unpadded)."""
    if fin > _SHARE_MAX_ROWS:
        return None
    have = _SHARED_ROWS.setdefault((out, bs, nm), [])
    fits = [r for r in have if fin <= r <= _SHARE_RATIO * fin]
    if fits:
        return min(fits)
    have.append(fin)
    return fin


def _prune_sweep(w: jax.Array, u: jax.Array, sparsity: Any, bs: int, nm: pat_lib.NM | None
                 ) -> tuple[jax.Array, jax.Array]:
    """The pruning sweep of one layer, in a program shared with equal-width layers when small."""
    s = np.float32(sparsity) if isinstance(sparsity, int | float | np.number) else \
        jnp.asarray(sparsity, jnp.float32)
    fin, out = w.shape
    if isinstance(w, jax.core.Tracer):  # under the caller's jit: padded on the host it cannot be
        return _sparsegpt_core(w, u, s, bs, nm)
    rows = _shared_rows(fin, out, bs, nm)
    if rows is None:
        return _sparsegpt_core(w, u, s, bs, nm)
    if rows == fin:
        return _sparsegpt_core(w, u, s, bs, nm, nrows=np.int32(fin))
    wp = np.zeros((rows, out), np.float32)
    wp[:fin] = np.asarray(w)
    up = np.eye(rows, dtype=np.float32)
    up[:fin, :fin] = np.asarray(u)
    # (host padding and slicing: jax.device_put compiles nothing, unlike jnp ops per shape)
    res = _sparsegpt_core(jax.device_put(wp), jax.device_put(up), s, bs, nm, nrows=np.int32(fin))
    return tuple(jax.device_put(np.asarray(r)[:fin]) for r in res)


@dataclasses.dataclass(frozen=True)
class SparseGPT(LayerMethod):
    """SparseGPT layer method; needs ``("gram",)``. With ``quant``: the joint sweep (prune, then put
    the kept weights on the grid, compensating both errors); at sparsity 0 (unstructured): GPTQ.

    Args:
      blocksize: lazy-update block (rounded to a multiple of ``m`` for N:M and of the quantization
        group size, at least one of each).
      percdamp: dampening as a fraction of ``mean(diag H)``.
      quant: a :class:`~jaxprune.oneshot.quant.QuantSpec`, or ``None`` (prune only).

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
    quant: QuantSpec | None = None

    def __post_init__(self) -> None:
        b, d = self.blocksize, self.percdamp
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"jaxprune: {type(self).__name__}.blocksize must be an int >= 1, got {b!r}")
        if isinstance(d, bool) or not isinstance(d, int | float) or not d >= 0 or d != d or d == float("inf"):
            raise ValueError(f"jaxprune: {type(self).__name__}.percdamp must be a finite number >= 0 "
                             f"(a fraction of mean(diag H), e.g. 0.01), got {d!r}")

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
        return self._sweep(w, stats, sparsity, pattern, name)[:2]

    def compress_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                        pattern: pat_lib.Pattern, *, name: str = "<layer>"
                        ) -> tuple[QuantizedWeight, jax.Array]:
        """The sweep's result as integer codes + group scales, and its mask (needs ``quant``).

        >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
        >>> qw, m = GPTQ().compress_matrix(jnp.linspace(-1, 1, 8).reshape(4, 2), st, 0.0,
        ...                                pat_lib.Unstructured())
        >>> qw.codes[:, 0].tolist()
        [-7, -3, 1, 5]
        """
        if self.quant is None:
            raise ValueError(f"jaxprune: {self.label}.compress on '{name}' needs quant=QuantSpec(...)")
        wq, m, srows, zrows = self._sweep(w, stats, sparsity, pattern, name)
        return encode(wq, srows, zrows, self.quant), m

    def _block(self, pattern: pat_lib.Pattern) -> tuple[int, pat_lib.NM | None]:
        """The sweep's block size and N:M pattern (``None``: unstructured) for ``pattern``."""
        bs = int(self.blocksize)
        if isinstance(pattern, pat_lib.NM):
            nm = pat_lib.NM(pattern.n, pattern.m)
            return max(nm.m, bs - bs % nm.m), nm
        return bs, None

    def _sweep(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
               pattern: pat_lib.Pattern, name: str) -> tuple[jax.Array, ...]:
        self.check_stats(stats, name)
        w = jnp.asarray(w, jnp.float32)
        h, dead = prepare_hessian(stats.hessian, name)
        w = zero_dead(w, dead)
        bs, nm = self._block(pattern)
        q = self.quant
        if q is None:
            u = damped_inverse_cholesky(h, self.percdamp, name)
            return _prune_sweep(w, u, sparsity, bs, nm)
        prune = nm is not None or float(sparsity) > 0
        if q.act_order and nm is not None:
            raise ValueError(f"jaxprune: layer '{name}': act_order permutes the fan-in and cannot "
                             f"keep {nm.n}:{nm.m} groups; use act_order=False with N:M")
        if nm is not None and q.group_size is not None and q.group_size % nm.m:
            raise ValueError(
                f"jaxprune: layer '{name}': QuantSpec.group_size={q.group_size} must be a multiple "
                f"of m={nm.m} with the {nm.n}:{nm.m} pattern (a quantization group holds whole "
                "N:M groups of the fan-in)")
        unit = math.lcm(q.group_size or 1, nm.m if nm is not None else 1)
        bs = max(unit, bs - bs % unit)
        qrows = None
        if q.group_size is None or q.act_order:  # static params, from the original weights
            qrows = row_params(w, q)
        perm = None
        if q.act_order:
            perm = np.argsort(-np.diag(h), kind="stable")
            h = h[perm][:, perm]
            w = w[perm]
            qrows = (qrows[0][perm], qrows[1][perm])
        u = damped_inverse_cholesky(h, self.percdamp, name)
        out = _sparsegpt_core(w, u, jnp.asarray(sparsity, jnp.float32), bs, nm,
                              0 if qrows is not None else q.group_size, prune, grid_constants(q),
                              qrows)
        if perm is not None:
            inv = np.argsort(perm)
            out = tuple(a[inv] for a in out)
        return out


@dataclasses.dataclass(frozen=True)
class GPTQ(SparseGPT):
    """GPTQ (Frantar et al., 2023): quantization with OBS compensation, in the SparseGPT sweep.

    ``GPTQ(quant=QuantSpec(bits, group_size, symmetric, act_order))(weight, stats)`` returns the
    dequantized weight and an all-true mask; with ``sparsity``/``pattern`` it is the joint sweep
    (the same as ``SparseGPT(quant=...)``). :meth:`compress` gives the integer codes and scales.

    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
    >>> w, m = GPTQ()(np.linspace(-1, 1, 8).reshape(4, 2), st)
    >>> bool(m.all()), np.round(np.asarray(w)[:, 0] * 7, 4).tolist()
    (True, [-7.0, -3.0, 1.0, 5.0])
    """

    label: ClassVar[str] = "gptq"
    quant: QuantSpec | None = QuantSpec()

    def default_sparsity(self, pattern: pat_lib.Pattern) -> float | None:
        """``0.0`` (quantize only) unless ``pattern`` is N:M, which implies its own sparsity.

        >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
        >>> w = np.array([[0.6, 1], [-1, 1], [0, 1], [0, 1]], np.float32)
        >>> GPTQ()(w, st)[0][:2, 0].tolist()  # grid: k/7, |k| <= 7
        [0.5714285969734192, -1.0]
        """
        return None if isinstance(pattern, pat_lib.NM) else 0.0


register_method("sparsegpt", SparseGPT())
register_method("gptq", GPTQ())
register_method("gptq-int8", GPTQ(quant=QuantSpec(bits=8)))
register_method("sparsegpt+int4", SparseGPT(quant=QuantSpec(bits=4)))
register_method("sparsegpt+int8", SparseGPT(quant=QuantSpec(bits=8)))
_ = np  # used by the doctests
