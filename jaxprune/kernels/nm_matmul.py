"""N:M sparse matmul ``x @ W`` as a Pallas kernel that decompresses ``W`` tile by tile.

``W`` is an :class:`~jaxprune.kernels.formats.NMPacked` weight ``(K, N)`` packed along ``K``. Each
kernel step loads a tile of kept values ``(n, F, th, tn)`` and packed codes ``(n, th, tn)``, expands
them in registers/VMEM with ``F * m * n`` compare-and-selects into ``F * m`` planes of ``(th, tn)``
and multiplies them with the matching columns of ``x``; the dense ``W`` never exists in HBM. HBM
traffic for ``W`` is ``n/m`` of the dense values plus ``bits/8`` bytes per kept value.

To make the expansion elementwise (no in-kernel interleave), ``x``'s columns are permuted once per
call to the packed order ``(tile, q, p, h)`` (a cheap XLA transpose of ``x``, not of ``W``).

Two kernel structures (see :mod:`jaxprune.kernels._backend`): ``"tpu"`` grids over the reduction
(``K``) axis and accumulates into the resident output tile; ``"gpu"`` (Triton lowering) runs one
program per output tile with the ``K`` loop inside. On CPU both run with ``interpret=True``.

Training: :func:`nm_matmul` has a ``custom_vjp`` (gradients wrt ``x`` and the packed ``values``;
the backward pass uses XLA ops and decompresses ``W`` once).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.kernels import formats
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> mask = jnp.tile(jnp.array([1, 0, 1, 0], bool), 4)[:, None].repeat(8, 1)
    >>> p = formats.pack_nm(w, mask, 2, 4)
    >>> x = jnp.ones((3, 16))
    >>> y = jax.jit(nm_matmul)(x, p)
    >>> bool(jnp.allclose(y, x @ jnp.where(mask, w, 0), atol=1e-5))
    True
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxprune.kernels import _backend
from jaxprune.kernels import formats as F
from jaxprune.kernels import reference as ref

__all__ = ["nm_matmul", "choose_tiles"]


class _Cfg(NamedTuple):
    shape: tuple[int, ...]
    n: int
    m: int
    impl: str
    variant: str
    interpret: bool
    tiles: tuple[int, int, int] | None
    fallback: bool = False


def _first_divisor(total: int, candidates: tuple[int, ...]) -> int:
    for c in candidates:
        if c <= total and total % c == 0:
            return c
    return total


def choose_tiles(m_rows: int, n_cols: int, h: int, variant: str = "tpu") -> tuple[int, int, int]:
    """Default ``(tm, tn, th)``: rows of ``x``, columns of ``W``, packed rows (``tk = F*m*th``).

    ``tm`` is a power of two >= 16 (Triton's minimum ``dot`` size; ``M`` is zero-padded to it);
    ``tn``/``th`` divide ``N``/``H`` or are the full dimension.

    >>> choose_tiles(1, 4096, 256)
    (16, 256, 128)
    """
    tm = min(128, max(16, 1 << max(0, (m_rows - 1).bit_length())))
    tn = _first_divisor(n_cols, (256, 128))
    th = _first_divisor(h, (128, 64, 32) if variant == "tpu" else (64, 32, 16))
    return tm, tn, th


def _expand(codes: list[jax.Array], vals: Any, n: int, m: int, f: int, bits: int,
            ct: Any) -> list[jax.Array]:
    """Planes ``W[q, p] (th, tn)`` in order ``(q, p)``; ``vals(j, q)`` loads value plane ``j, q``."""
    planes = []
    for q in range(f):
        cq = [(c >> (bits * q)) & (2**bits - 1) for c in codes]
        vq = [vals(j, q).astype(ct) for j in range(n)]
        for p in range(m):
            w = jnp.where(cq[0] == p, vq[0], jnp.zeros((), ct))
            for j in range(1, n):
                w = w + jnp.where(cq[j] == p, vq[j], jnp.zeros((), ct))
            planes.append(w)
    return planes


def _kernel_tpu(x_ref, v_ref, i_ref, o_ref, *, n, m, f, bits, ct, prec):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    codes = [i_ref[j].astype(jnp.int32) for j in range(n)]
    planes = _expand(codes, lambda j, q: v_ref[j, q], n, m, f, bits, ct)
    w = jnp.concatenate(planes, axis=0)  # (tk, tn), rows in the permuted order of x's tile
    o_ref[...] += jnp.dot(x_ref[...].astype(ct), w, precision=prec,
                          preferred_element_type=jnp.float32)


def _kernel_gpu(x_ref, v_ref, i_ref, o_ref, *, n, m, f, bits, ct, prec, th, steps):
    tk = f * m * th

    def body(t, acc):
        hs = pl.ds(t * th, th)
        codes = [i_ref[j, hs, :].astype(jnp.int32) for j in range(n)]
        planes = _expand(codes, lambda j, q: v_ref[j, q, hs, :], n, m, f, bits, ct)
        for r, w in enumerate(planes):
            xs = x_ref[:, pl.ds(t * tk + r * th, th)].astype(ct)
            acc = acc + jnp.dot(xs, w, precision=prec, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _pallas(x2: jax.Array, values: jax.Array, idx: jax.Array, cfg: _Cfg) -> jax.Array:
    n, m = cfg.n, cfg.m
    bits = F.code_bits(m)
    f = F.codes_per_word(m)
    k, nn = F._kn(cfg.shape)
    h = values.shape[2]
    kp = h * f * m
    mrows = x2.shape[0]
    tm, tn, th = cfg.tiles or choose_tiles(mrows, nn, h, cfg.variant)
    if nn % tn or h % th:
        raise ValueError(
            f"jaxprune.kernels.nm_matmul: tiles (tm={tm}, tn={tn}, th={th}) must divide "
            f"N={nn} and H={h} (H = packed rows = K_padded / {f * m})"
        )
    steps = h // th
    tk = f * m * th
    ct = jnp.result_type(x2.dtype, values.dtype)
    prec = ref.dot_precision(ct)
    mp = -(-mrows // tm) * tm
    xp = jnp.pad(x2.astype(ct), ((0, mp - mrows), (0, kp - k)))
    # column k = ((t*th + hl)*F + q)*m + p  ->  position t*tk + (q*m + p)*th + hl
    xp = xp.reshape(mp, steps, th, f, m).transpose(0, 1, 3, 4, 2).reshape(mp, kp)
    # "tpu" accumulates into the resident output tile (f32); "gpu" accumulates in registers and
    # stores the result type directly (no extra f32 pass over the output in HBM)
    out_shape = jax.ShapeDtypeStruct((mp, nn), jnp.float32 if cfg.variant == "tpu" else ct)
    kw = dict(n=n, m=m, f=f, bits=bits, ct=ct, prec=prec)
    if cfg.variant == "tpu":
        params = None
        if not cfg.interpret:
            from jax.experimental.pallas import tpu as pltpu

            params = pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary"))
        y = pl.pallas_call(
            functools.partial(_kernel_tpu, **kw),
            out_shape=out_shape,
            grid=(mp // tm, nn // tn, steps),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda i, j, t: (i, t)),
                pl.BlockSpec((n, f, th, tn), lambda i, j, t: (0, 0, t, j)),
                pl.BlockSpec((n, th, tn), lambda i, j, t: (0, t, j)),
            ],
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, t: (i, j)),
            interpret=cfg.interpret,
            compiler_params=params,
            name="jaxprune_nm_matmul_tpu",
        )(xp, values, idx)
    else:
        y = pl.pallas_call(
            functools.partial(_kernel_gpu, th=th, steps=steps, **kw),
            out_shape=out_shape,
            grid=(mp // tm, nn // tn),
            in_specs=[
                pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((n, f, h, tn), lambda i, j: (0, 0, 0, j)),
                pl.BlockSpec((n, h, tn), lambda i, j: (0, 0, j)),
            ],
            out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
            interpret=cfg.interpret,
            compiler_params=None if cfg.interpret else _backend.triton_params(),
            name="jaxprune_nm_matmul_gpu",
        )(xp, values, idx)
    return y[:mrows].astype(ct)


def _packed(values: jax.Array, idx: jax.Array, cfg: _Cfg) -> F.NMPacked:
    return F.NMPacked(values, idx, cfg.shape, cfg.n, cfg.m)


def _forward(x2: jax.Array, values: jax.Array, idx: jax.Array, cfg: _Cfg) -> jax.Array:
    if cfg.impl == "reference":
        return ref.nm_matmul_ref(x2, _packed(values, idx, cfg))
    if cfg.impl == "auto":
        key = ("nm_matmul", cfg, x2.shape, str(x2.dtype), str(values.dtype))
        run = functools.partial(_pallas, cfg=cfg)
        if not _backend.compiles(key, run, *_backend.abstract(x2, values, idx),
                                 fallback=cfg.fallback):
            return ref.nm_matmul_ref(x2, _packed(values, idx, cfg))
    return _pallas(x2, values, idx, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nm_core(x2: jax.Array, values: jax.Array, idx: jax.Array, cfg: _Cfg) -> jax.Array:
    return _forward(x2, values, idx, cfg)


def _fwd(x2, values, idx, cfg):
    return _forward(x2, values, idx, cfg), (x2, values, idx)


def _bwd(cfg, res, g):
    x2, values, idx = res
    p = _packed(values, idx, cfg)
    k, nn = p.kn
    ct = jnp.result_type(x2.dtype, values.dtype)
    prec = ref.dot_precision(ct)
    g32 = g.astype(jnp.float32)
    w = F._nm_dense(p).astype(jnp.float32)  # (K, N)
    dx = jnp.dot(g32, w.T, precision=prec).astype(x2.dtype)
    # dvalues = dW gathered at each slot's position
    dw = jnp.dot(x2.astype(jnp.float32).T, g32, precision=prec)  # (K, N)
    dw = jnp.pad(dw, ((0, p.padded_k - k), (0, 0)))
    h = values.shape[2]
    dw = dw.reshape(h, p.per_word, p.m, nn)  # (H, F, m, N)
    codes = F._nm_codes(p).transpose(2, 1, 0, 3)  # (H, F, n, N)
    dv = jnp.take_along_axis(dw, jnp.minimum(codes, p.m - 1), axis=2)
    # empty slots get zero gradient, also those whose padding code repeats a kept slot's
    # position (m == 2**bits): else training would move that weight twice and fill the slot
    valid = F._nm_slot_valid(p).transpose(2, 1, 0, 3)
    dv = jnp.where(valid, dv, 0.0).transpose(2, 1, 0, 3).astype(values.dtype)
    return dx, dv, np.zeros(idx.shape, jax.dtypes.float0)


_nm_core.defvjp(_fwd, _bwd)


def nm_matmul(
    x: jax.Array,
    w: F.NMPacked,
    *,
    impl: str = "auto",
    variant: str = "auto",
    interpret: bool | None = None,
    tiles: tuple[int, int, int] | None = None,
    fallback: bool | None = None,
) -> jax.Array:
    """``x @ W`` for an N:M-packed ``W`` (matrix view ``(K, N)``); ``x`` is ``(..., K)``.

    Args:
      x: activations ``(..., K)``, float32/bfloat16/float16.
      w: :class:`~jaxprune.kernels.formats.NMPacked` weight.
      impl: ``"auto"`` (kernel, compiled once on its own first on GPU/TPU: if it cannot compile,
        :class:`~jaxprune.kernels._backend.KernelCompileError`, or the reference with a warning
        when ``fallback``), ``"pallas"`` (kernel, errors propagate) or ``"reference"``.
      variant: ``"auto"``, ``"tpu"`` or ``"gpu"`` kernel structure.
      interpret: force Pallas interpret mode (default: on CPU). Call under ``jax.jit``.
      tiles: ``(tm, tn, th)`` override; see :func:`choose_tiles`.
      fallback: allow the reference when the kernel cannot compile (``None``: read
        ``$JAXPRUNE_KERNEL_FALLBACK``, default no).

    Returns ``(..., N)`` in ``result_type(x, w.values)``; differentiable wrt ``x`` and
    ``w.values``.

    >>> from jaxprune.kernels import formats
    >>> p = formats.pack_nm(jnp.eye(4), jnp.eye(4, dtype=bool), 2, 4)
    >>> jax.jit(nm_matmul)(jnp.arange(4.)[None], p)
    Array([[0., 1., 2., 3.]], dtype=float32)
    """
    if not isinstance(w, F.NMPacked):
        raise TypeError(f"jaxprune.kernels.nm_matmul: w must be NMPacked, got {type(w).__name__}")
    k, nn = w.kn
    x = jnp.asarray(x)
    ref._check_x(x, k, "nm_matmul")
    if tiles is not None:
        tiles = _backend.positive_ints(tiles, 3, "nm_matmul: tiles (tm, tn, th)")
    impl, variant, interp = _backend.resolve(impl, variant, interpret)
    if math.prod(x.shape[:-1]) == 0:  # an empty batch: an empty result, no kernel
        return jnp.zeros((*x.shape[:-1], nn), jnp.result_type(x.dtype, w.values.dtype))
    cfg = _Cfg(tuple(w.shape), w.n, w.m, impl, variant, interp,
               tiles,
               _backend.fallback_allowed(fallback))
    lead = x.shape[:-1]
    y = _nm_core(x.reshape(-1, k), w.values, w.indices, cfg)
    return y.reshape(*lead, nn)
