"""``x @ W`` for an N:M sparse, integer-quantized ``W`` (:class:`NMQuantPacked`), dequantizing in
the kernel.

The structure is :mod:`jaxprune.kernels.nm_matmul`'s Triton-style one (one program per output tile,
the ``K`` loop inside; interpret mode on CPU): each step loads ``th`` packed rows of integer codes
(int8, or two int4 per byte), their position codes and the scales of the groups they lie in,
decodes the codes (:func:`~jaxprune.kernels.quant_formats.decode_slot`), applies
``scale · (code - zero)`` elementwise, expands the kept values into ``F * m`` planes with
compare-and-selects (the same expansion as ``nm_matmul``) and accumulates ``x_plane @ plane`` in
float32. The dense or dequantized ``W`` never exists in memory. HBM traffic for ``W``:
``n/m · bits/8`` bytes per weight plus the position codes and scales (2:4 int4: 0.375 B/weight,
plus 4 B per ``group_size`` rows per column).

Activations are bf16 / f16 / f32; the dequantized weights are cast to the activations' dtype
before the dot (bf16 x: bf16 MXU/tensor-core dot, f32 accumulation). Inference only (no VJP).

Example:
    >>> import numpy as np
    >>> from jaxprune.kernels import quant_formats as QF
    >>> c = np.tile(np.array([[3], [0], [-2], [0]], np.int8), (8, 4))
    >>> p = QF.pack_nm_quant(c, c != 0, np.full((2, 4), 0.5, np.float32), None, bits=4,
    ...                      group_size=16)
    >>> x = jnp.ones((2, 32))
    >>> bool(jnp.allclose(jax.jit(nm_quant_matmul)(x, p), x @ QF.dequantize(p)))
    True
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxprune.kernels import _backend
from jaxprune.kernels import formats as F
from jaxprune.kernels import quant_formats as QF
from jaxprune.kernels import reference as ref
from jaxprune.kernels.nm_matmul import _expand

__all__ = ["nm_quant_matmul", "nm_quant_matmul_ref", "bench_quant_kernel"]


class _Cfg(NamedTuple):
    shape: tuple[int, int]
    n: int
    m: int
    bits: int
    group_size: int
    signed: bool
    impl: str
    interpret: bool
    tiles: tuple[int, int, int] | None


def nm_quant_matmul_ref(x: jax.Array, w: QF.NMQuantPacked) -> jax.Array:
    """The ``jnp`` oracle: ``x @ dequantize(w)`` (in ``x``'s dtype, f32 accumulation).

    >>> p = QF.pack_nm_quant(np.eye(4, dtype=np.int8), np.eye(4, dtype=bool),
    ...                      np.full((1, 4), 2.0, np.float32), None, bits=8, group_size=4, n=1)
    >>> nm_quant_matmul_ref(jnp.arange(4.)[None], p).tolist()
    [[0.0, 2.0, 4.0, 6.0]]
    """
    k, _ = w.kn
    ref._check_x(x, k, "nm_quant_matmul_ref")
    return ref._dense_matmul(x, QF.dequantize(w).astype(x.dtype))


class _Tiles:
    """``tiles[s]`` = stored code slot ``s`` of word ``q``, packed rows ``hs`` (a lazy ref view)."""

    def __init__(self, ref_: Any, q: int, hs: Any) -> None:
        self.ref, self.q, self.hs = ref_, q, hs

    def __getitem__(self, s: int) -> jax.Array:
        return self.ref[s, self.q, self.hs, :]


def _tiles(mrows: int, nn: int, h: int, gr: int) -> tuple[int, int, int]:
    tm = min(128, max(16, 1 << max(0, (mrows - 1).bit_length())))
    tn = next((c for c in (128, 64, 32, 16) if nn % c == 0), nn)
    # th >= 16 where possible (Triton's smallest dot), dividing H, and nesting with the groups
    th = next((c for c in (32, 16, 64, 8, 4, 2, 1) if h % c == 0 and (c % gr == 0 or gr % c == 0)),
              h)
    return tm, tn, th


def _kernel(x_ref, c_ref, i_ref, s_ref, *rest, n, m, f, bits, signed, th, gr, steps, ct, prec):
    z_ref, o_ref = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    tk = f * m * th
    ng = max(1, th // gr)  # scale groups per step
    tn = o_ref.shape[1]

    def expand_groups(t: jax.Array, ref_: Any) -> jax.Array:
        """Per packed row of this step, its group's row of ``ref_``: ``(th, tn)`` f32."""
        if ng == 1:
            return jnp.broadcast_to(ref_[pl.ds((t * th) // gr, 1), :].astype(jnp.float32),
                                    (th, tn))
        gid = jax.lax.broadcasted_iota(jnp.int32, (th, tn), 0) // gr
        out = jnp.zeros((th, tn), jnp.float32)
        for r in range(ng):  # one row load per group (no value slicing: lowers on Triton too)
            row = ref_[pl.ds(t * ng + r, 1), :].astype(jnp.float32)
            out = jnp.where(gid == r, row, out)
        return out

    def body(t, acc):
        hs = pl.ds(t * th, th)
        codes = [i_ref[j, hs, :].astype(jnp.int32) for j in range(n)]
        scale = expand_groups(t, s_ref)
        zero = None if z_ref is None else expand_groups(t, z_ref)
        def vals(j: int, q: int) -> jax.Array:
            v = QF.decode_slot(_Tiles(c_ref, q, hs), j, bits, signed).astype(jnp.float32)
            if zero is not None:
                v = v - zero
            return v * scale

        planes = _expand(codes, vals, n, m, f, F.code_bits(m), ct)
        for r, w in enumerate(planes):
            xs = x_ref[:, pl.ds(t * tk + r * th, th)].astype(ct)
            acc = acc + jnp.dot(xs, w, precision=prec, preferred_element_type=jnp.float32)
        return acc

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def _pallas(x2: jax.Array, p: QF.NMQuantPacked, cfg: _Cfg) -> jax.Array:
    n, m = cfg.n, cfg.m
    f = F.codes_per_word(m)
    k, nn = cfg.shape
    h = p.indices.shape[1]
    kp = h * f * m
    gr = p.group_rows
    mrows = x2.shape[0]
    tm, tn, th = cfg.tiles or _tiles(mrows, nn, h, gr)
    if nn % tn or h % th or (th % gr and gr % th):
        raise ValueError(f"jaxprune.kernels.nm_quant_matmul: tiles (tm={tm}, tn={tn}, th={th}) must "
                         f"divide N={nn} and H={h}, and th must divide or be a multiple of {gr} "
                         "(packed rows per scale group)")
    steps = h // th
    ct = x2.dtype
    prec = ref.dot_precision(ct)
    mp = -(-mrows // tm) * tm
    xp = jnp.pad(x2, ((0, mp - mrows), (0, kp - k)))
    xp = xp.reshape(mp, steps, th, f, m).transpose(0, 1, 3, 4, 2).reshape(mp, kp)
    g = p.scales.shape[0]
    ns = p.codes.shape[0]
    in_specs = [
        pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
        pl.BlockSpec((ns, f, h, tn), lambda i, j: (0, 0, 0, j)),
        pl.BlockSpec((n, h, tn), lambda i, j: (0, 0, j)),
        pl.BlockSpec((g, tn), lambda i, j: (0, j)),
    ]
    args = [xp, p.codes, p.indices, p.scales]
    if not cfg.signed:
        in_specs.append(pl.BlockSpec((g, tn), lambda i, j: (0, j)))
        args.append(p.zeros)
    kern = functools.partial(_kernel, n=n, m=m, f=f, bits=cfg.bits, signed=cfg.signed, th=th,
                             gr=gr, steps=steps, ct=ct, prec=prec)
    y = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((mp, nn), jnp.float32),
        grid=(mp // tm, nn // tn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        interpret=cfg.interpret,
        compiler_params=None if cfg.interpret else _backend.triton_params(),
        name="jaxprune_nm_quant_matmul",
    )(*args)
    return y[:mrows].astype(ct)


def nm_quant_matmul(x: jax.Array, w: QF.NMQuantPacked, *, impl: str = "auto",
                    interpret: bool | None = None,
                    tiles: tuple[int, int, int] | None = None) -> jax.Array:
    """``x @ W`` for an N:M + int-quantized ``W`` ``(K, N)``; ``x`` is ``(..., K)`` bf16/f16/f32.

    Args:
      impl: ``"auto"`` (kernel; reference with a warning if it does not compile), ``"pallas"``
        or ``"reference"``.
      interpret: Pallas interpret mode (default: on CPU). Call under ``jax.jit``.
      tiles: ``(tm, tn, th)`` override (``th`` packed rows per step).

    Returns ``(..., N)`` in ``x``'s dtype.

    >>> p = QF.pack_nm_quant(np.eye(4, dtype=np.int8), np.eye(4, dtype=bool),
    ...                      np.full((1, 4), 2.0, np.float32), None, bits=8, group_size=4, n=1)
    >>> nm_quant_matmul(jnp.arange(4.)[None], p, impl="reference").tolist()  # kernel: module doc
    [[0.0, 2.0, 4.0, 6.0]]
    """
    if not isinstance(w, QF.NMQuantPacked):
        raise TypeError(f"jaxprune.kernels.nm_quant_matmul: w must be NMQuantPacked, got "
                        f"{type(w).__name__}")
    k, nn = w.kn
    ref._check_x(x, k, "nm_quant_matmul")
    impl, _, interp = _backend.resolve(impl, "gpu", interpret)
    if math.prod(x.shape[:-1]) == 0:  # an empty batch: an empty result, no kernel
        return jnp.zeros((*x.shape[:-1], nn), x.dtype)
    cfg = _Cfg((k, nn), w.n, w.m, w.bits, w.group_size, w.zeros is None, impl, interp,
               None if tiles is None else tuple(int(t) for t in tiles))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if impl == "reference":
        y = nm_quant_matmul_ref(x2, w)
    elif impl == "auto" and not _backend.compiles(
            ("nm_quant_matmul", cfg, x2.shape, str(x2.dtype)), functools.partial(_pallas, cfg=cfg),
            *_backend.abstract(x2), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w)):
        y = nm_quant_matmul_ref(x2, w)
    else:
        y = _pallas(x2, w, cfg)
    return y.reshape(*lead, nn)


def bench_quant_kernel(m: int = 16, k: int = 4096, n: int = 4096, bits: int = 4,
                       group_size: int = 128, dtype: Any = jnp.bfloat16, iters: int = 20,
                       seed: int = 0) -> dict[str, Any]:
    """Time ``nm_quant_matmul`` (2:4 + int``bits``) against a dense ``x @ W`` and the reference.

    For the device check (``experiments/gpu_check.py``): returns a dict with milliseconds per call
    (median of ``iters`` after one warm-up) for ``"kernel"``, ``"dense"`` (same shape, dtype
    weights) and ``"reference"`` (dequantize + dot in XLA), the kernel's max abs error vs the
    reference (``max_abs_err``; ``rel_err``: over ``max |reference|``), bytes of the packed weight
    vs dense, and the backend.

    Example (skipped here; ``tests/test_quant_kernels.py`` runs it):

    >>> r = bench_quant_kernel(m=2, k=64, n=32, group_size=32, iters=1)  # doctest: +SKIP
    >>> r["max_abs_err"] < 1e-3, r["packed_bytes"] < r["dense_bytes"]  # doctest: +SKIP
    (True, True)
    """
    rng = np.random.default_rng(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = rng.integers(lo, hi + 1, size=(k, n)).astype(np.int8)
    keep = np.argsort(rng.random((k // 4, 4, n)), axis=1) < 2
    mask = keep.reshape(k, n)
    scales = rng.uniform(0.01, 0.02, size=(k // group_size, n)).astype(np.float32)
    p = QF.pack_nm_quant(codes, mask, scales, None, bits=bits, group_size=group_size)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    wd = QF.dequantize(p).astype(dtype)
    fns = {
        "kernel": jax.jit(lambda x, p: nm_quant_matmul(x, p)),
        "dense": jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype)),
        "reference": jax.jit(nm_quant_matmul_ref),
    }
    args = {"kernel": p, "dense": wd, "reference": p}
    out: dict[str, Any] = {"backend": _backend.platform(), "m": m, "k": k, "n": n, "bits": bits,
                           "group_size": group_size, "dtype": str(jnp.dtype(dtype))}
    ys = {}
    for name, fn in fns.items():
        ys[name] = jax.block_until_ready(fn(x, args[name]))
        ts = []
        for _ in range(max(1, iters)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, args[name]))
            ts.append((time.perf_counter() - t0) * 1e3)
        out[f"{name}_ms"] = float(np.median(ts))
    y_ref = ys["reference"].astype(jnp.float32)
    out["max_abs_err"] = float(jnp.max(jnp.abs(ys["kernel"].astype(jnp.float32) - y_ref)))
    out["rel_err"] = out["max_abs_err"] / max(float(jnp.max(jnp.abs(y_ref))), 1e-30)
    out["packed_bytes"] = p.nbytes()
    out["dense_bytes"] = int(k * n * jnp.dtype(dtype).itemsize)
    return out
