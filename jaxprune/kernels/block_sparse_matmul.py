"""Block-sparse matmul ``x @ W`` as a Pallas kernel that skips zero blocks.

``W`` is a :class:`~jaxprune.kernels.formats.BlockSparse` weight: nonzero ``(br, bc)`` blocks listed
per block column. Output column block ``j`` only visits the blocks of column ``j``:

* ``"tpu"`` variant: ``PrefetchScalarGridSpec`` with the per-column block table and row table as
  scalar-prefetch operands; grid ``(M tiles, NB, max_per_col)``; the index maps read the tables so
  each step DMAs exactly one stored block and the matching ``(tm, br)`` slice of ``x``; padded steps
  repeat the previous block index (no new DMA) and skip the ``dot``.
* ``"gpu"`` variant (Triton lowering): grid ``(M tiles, NB)``, a ``fori_loop`` over the column's
  ``count`` blocks loading each block and ``x`` slice by dynamic index.

Work and ``W`` traffic scale with the number of stored blocks. Differentiable (``custom_vjp``): the
backward pass gathers/scatters per stored block (no dense ``W``, no dense ``dW``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.kernels import formats
    >>> w = jnp.arange(64.).reshape(8, 8)
    >>> mask = jnp.zeros((8, 8), bool).at[:4, 4:].set(True)
    >>> b = formats.pack_block(w, mask, (4, 4))
    >>> y = jax.jit(block_sparse_matmul)(jnp.ones((2, 8)), b)
    >>> bool(jnp.allclose(y, jnp.ones((2, 8)) @ jnp.where(mask, w, 0)))
    True
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxprune.kernels import _backend
from jaxprune.kernels import formats as F
from jaxprune.kernels import reference as ref

__all__ = ["block_sparse_matmul", "column_tables"]


class _Cfg(NamedTuple):
    shape: tuple[int, ...]
    block: tuple[int, int]
    max_per_col: int
    impl: str
    variant: str
    interpret: bool
    tm: int | None
    fallback: bool = False


def column_tables(w: F.BlockSparse) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flattened ``(NB * P,)`` block-id and block-row tables and ``(NB,)`` counts (``P`` =
    ``max_per_col``); padded slots repeat the column's last block (or block 0 if empty).

    >>> b = F.pack_block(jnp.ones((4, 4)), jnp.eye(4, dtype=bool), (2, 2))
    >>> [t.tolist() for t in column_tables(b)]
    [[0, 1], [0, 1], [1, 1]]
    """
    return _tables(w.rows, w.col_ptr, w.max_per_col)


def _tables(rows: jax.Array, col_ptr: jax.Array, p: int):
    counts = col_ptr[1:] - col_ptr[:-1]
    t = jnp.arange(max(p, 1), dtype=jnp.int32)
    blk = col_ptr[:-1, None] + jnp.minimum(t[None, :], jnp.maximum(counts[:, None] - 1, 0))
    blk = jnp.clip(blk, 0, max(rows.shape[0] - 1, 0)).astype(jnp.int32)
    row = rows[blk] if rows.shape[0] else jnp.zeros_like(blk)
    return blk.reshape(-1), row.reshape(-1).astype(jnp.int32), counts.astype(jnp.int32)


def _kernel_tpu(blk_ref, row_ref, cnt_ref, x_ref, b_ref, o_ref, *, ct, prec):
    j = pl.program_id(1)
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(t < cnt_ref[j])
    def _acc():
        o_ref[...] += jnp.dot(x_ref[...].astype(ct), b_ref[...].astype(ct), precision=prec,
                              preferred_element_type=jnp.float32)


def _kernel_gpu(blk_ref, row_ref, cnt_ref, x_ref, b_ref, o_ref, *, ct, prec, p, br):
    j = pl.program_id(1)

    def body(t, acc):
        k = blk_ref[j * p + t]
        r = row_ref[j * p + t]
        xs = x_ref[:, pl.ds(r * br, br)].astype(ct)
        wb = b_ref[k].astype(ct)
        return acc + jnp.dot(xs, wb, precision=prec, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, cnt_ref[j], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _pallas(x2, blocks, rows, cols, col_ptr, cfg: _Cfg):
    del cols
    k, nn = F._kn(cfg.shape)
    br, bc = cfg.block
    nb = nn // bc
    p = cfg.max_per_col
    mrows = x2.shape[0]
    ct = jnp.result_type(x2.dtype, blocks.dtype)
    if p == 0 or blocks.shape[0] == 0:
        return jnp.zeros((mrows, nn), ct)
    prec = ref.dot_precision(ct)
    tm = cfg.tm or min(128, max(16, 1 << max(0, (mrows - 1).bit_length())))
    mp = -(-mrows // tm) * tm
    xp = jnp.pad(x2.astype(ct), ((0, mp - mrows), (0, 0)))
    blk, row, cnt = _tables(rows, col_ptr, p)
    # "tpu" accumulates into the resident output tile (f32); "gpu" stores the result type directly
    out_shape = jax.ShapeDtypeStruct((mp, nn), jnp.float32 if cfg.variant == "tpu" else ct)
    if cfg.variant == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(mp // tm, nb, p),
            in_specs=[
                pl.BlockSpec((tm, br), lambda i, j, t, blk, row, cnt: (i, row[j * p + t])),
                pl.BlockSpec((pl.squeezed, br, bc),
                             lambda i, j, t, blk, row, cnt: (blk[j * p + t], 0, 0)),
            ],
            out_specs=pl.BlockSpec((tm, bc), lambda i, j, t, blk, row, cnt: (i, j)),
        )
        params = None if cfg.interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"))
        y = pl.pallas_call(
            functools.partial(_kernel_tpu, ct=ct, prec=prec),
            out_shape=out_shape,
            grid_spec=grid_spec,
            interpret=cfg.interpret,
            compiler_params=params,
            name="jaxprune_block_sparse_matmul_tpu",
        )(blk, row, cnt, xp, blocks)
    else:
        nnz = blocks.shape[0]
        full1 = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,))
        y = pl.pallas_call(
            functools.partial(_kernel_gpu, ct=ct, prec=prec, p=p, br=br),
            out_shape=out_shape,
            grid=(mp // tm, nb),
            in_specs=[
                full1(blk), full1(row), full1(cnt),
                pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((nnz, br, bc), lambda i, j: (0, 0, 0)),
            ],
            out_specs=pl.BlockSpec((tm, bc), lambda i, j: (i, j)),
            interpret=cfg.interpret,
            compiler_params=None if cfg.interpret else _backend.triton_params(),
            name="jaxprune_block_sparse_matmul_gpu",
        )(blk, row, cnt, xp, blocks)
    return y[:mrows].astype(ct)


def _packed(blocks, rows, cols, col_ptr, cfg: _Cfg) -> F.BlockSparse:
    return F.BlockSparse(blocks, rows, cols, col_ptr, cfg.shape, cfg.block, cfg.max_per_col)


def _forward(x2, blocks, rows, cols, col_ptr, cfg: _Cfg):
    if cfg.impl == "reference":
        return ref.block_sparse_matmul_ref(x2, _packed(blocks, rows, cols, col_ptr, cfg))
    if cfg.impl == "auto":
        key = ("block_sparse_matmul", cfg, x2.shape, str(x2.dtype), str(blocks.dtype),
               blocks.shape[0])
        run = functools.partial(_pallas, cfg=cfg)
        if not _backend.compiles(key, run, *_backend.abstract(x2, blocks, rows, cols, col_ptr),
                                 fallback=cfg.fallback):
            return ref.block_sparse_matmul_ref(x2, _packed(blocks, rows, cols, col_ptr, cfg))
    return _pallas(x2, blocks, rows, cols, col_ptr, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _bs_core(x2, blocks, rows, cols, col_ptr, cfg: _Cfg):
    return _forward(x2, blocks, rows, cols, col_ptr, cfg)


def _fwd(x2, blocks, rows, cols, col_ptr, cfg):
    return _forward(x2, blocks, rows, cols, col_ptr, cfg), (x2, blocks, rows, cols, col_ptr)


def _bwd(cfg, res, g):
    x2, blocks, rows, cols, col_ptr = res
    k, nn = F._kn(cfg.shape)
    br, bc = cfg.block
    mrows = x2.shape[0]
    ct = jnp.result_type(x2.dtype, blocks.dtype)
    prec = ref.dot_precision(ct)
    valid = (jnp.arange(blocks.shape[0]) < col_ptr[-1])[:, None, None]
    xb = x2.astype(jnp.float32).reshape(mrows, k // br, br)[:, rows]  # (M, Z, br)
    gb = g.astype(jnp.float32).reshape(mrows, nn // bc, bc)[:, cols]  # (M, Z, bc)
    dblk = jnp.einsum("mzr,mzc->zrc", xb, gb, precision=prec)
    dblk = jnp.where(valid, dblk, 0.0).astype(blocks.dtype)
    wz = jnp.where(valid, blocks.astype(jnp.float32), 0.0)
    contrib = jnp.einsum("mzc,zrc->mzr", gb, wz, precision=prec)
    dx = jnp.zeros((mrows, k // br, br), jnp.float32).at[:, rows].add(contrib)
    z = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dx.reshape(mrows, k).astype(x2.dtype), dblk, z(rows), z(cols), z(col_ptr)


_bs_core.defvjp(_fwd, _bwd)


def block_sparse_matmul(
    x: jax.Array,
    w: F.BlockSparse,
    *,
    impl: str = "auto",
    variant: str = "auto",
    interpret: bool | None = None,
    tm: int | None = None,
    fallback: bool | None = None,
) -> jax.Array:
    """``x @ W`` for a block-sparse ``W`` (matrix view ``(K, N)``); ``x`` is ``(..., K)``.

    Args:
      x: activations ``(..., K)``.
      w: :class:`~jaxprune.kernels.formats.BlockSparse` weight.
      impl: ``"auto"`` (kernel, compiled once on its own first on GPU/TPU: if it cannot compile,
        :class:`~jaxprune.kernels._backend.KernelCompileError`, or the reference with a warning
        when ``fallback``), ``"pallas"`` (errors propagate) or ``"reference"``.
      variant: ``"auto"``, ``"tpu"`` (scalar prefetch) or ``"gpu"`` (in-kernel loop).
      interpret: force Pallas interpret mode (default: on CPU). Call under ``jax.jit``.
      tm: row tile (default: power of two >= 16, at most 128; ``M`` is zero-padded to it).
      fallback: allow the reference when the kernel cannot compile (``None``: read
        ``$JAXPRUNE_KERNEL_FALLBACK``, default no).

    Returns ``(..., N)``; differentiable wrt ``x`` and ``w.blocks``.

    >>> from jaxprune.kernels import formats
    >>> b = formats.pack_block(jnp.eye(4), jnp.eye(4, dtype=bool), (2, 2))
    >>> jax.jit(block_sparse_matmul)(jnp.arange(4.)[None], b)
    Array([[0., 1., 2., 3.]], dtype=float32)
    """
    if not isinstance(w, F.BlockSparse):
        raise TypeError(
            f"jaxprune.kernels.block_sparse_matmul: w must be BlockSparse, got {type(w).__name__}"
        )
    k, nn = w.kn
    x = jnp.asarray(x)
    ref._check_x(x, k, "block_sparse_matmul")
    if tm is not None:
        tm = _backend.positive_ints((tm,), 1, "block_sparse_matmul: tm")[0]
    impl, variant, interp = _backend.resolve(impl, variant, interpret)
    if math.prod(x.shape[:-1]) == 0:  # an empty batch: an empty result, no kernel
        return jnp.zeros((*x.shape[:-1], nn), jnp.result_type(x.dtype, w.blocks.dtype))
    cfg = _Cfg(tuple(w.shape), tuple(w.block), w.max_per_col, impl, variant, interp, tm,
               _backend.fallback_allowed(fallback))
    lead = x.shape[:-1]
    y = _bs_core(x.reshape(-1, k), w.blocks, w.rows, w.cols, w.col_ptr, cfg)
    return y.reshape(*lead, nn)
