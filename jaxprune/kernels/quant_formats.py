"""N:M sparse + integer-quantized weights: :class:`NMQuantPacked` (2:4 + int8/int4 and any N:M).

The layout is :class:`jaxprune.kernels.formats.NMPacked`'s (same packer, same index metadata: each
kept value's position in its group of ``m`` fan-in rows as a ``bits``-bit code), with the kept
values stored as integer codes instead of floats, plus group scales along the fan-in ``K``:

* ``codes``: ``(n, F, H, N)`` ``int8`` (symmetric) / ``uint8`` (asymmetric) for 8-bit and fewer
  bits when not nibble-packed; for ``bits <= 4``: ``(ceil(n/2), F, H, N)`` ``uint8``, two codes per
  byte (slot ``2t`` in the low nibble, ``2t+1`` in the high nibble; signed codes in two's
  complement).
* ``scales``: ``(K / group_size, N)`` float32; ``zeros``: same shape ``uint8`` (asymmetric) or
  ``None``. Value of a kept entry = ``scale · (code - zero)`` (``zero = 0`` when symmetric).
* Empty slots hold the code of value 0 (the zero point), so a kernel may dequantize every slot.

``group_size`` must divide ``K`` and be a multiple of ``F * m`` (the fan-in rows covered by one
packed row), so every packed row lies in one group. Packing is host-side and lossless:
:func:`unpack_nm_quant` returns exactly the codes, scales, zeros and mask that went in.

Example:
    >>> import numpy as np
    >>> codes = np.tile(np.array([[3], [0], [-2], [0]], np.int8), (4, 2))  # (16, 2), 2:4
    >>> mask = codes != 0
    >>> p = pack_nm_quant(codes, mask, np.ones((1, 2), np.float32), None, bits=4, group_size=16)
    >>> p.codes.shape, p.codes.dtype, p.nbytes()
    ((1, 4, 1, 2), dtype('uint8'), 20)
    >>> dequantize(p)[:4, 0].tolist()
    [3.0, 0.0, -2.0, 0.0]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprune.kernels import formats as F

__all__ = ["NMQuantPacked", "pack_nm_quant", "unpack_nm_quant", "dequantize", "decode_slot"]


@struct.dataclass
class NMQuantPacked:
    """N:M + integer codes (see the module doc); a pytree with static shape metadata.

    >>> p = pack_nm_quant(np.eye(4, dtype=np.int8), np.eye(4, dtype=bool),
    ...                   np.full((1, 4), 0.5, np.float32), None, bits=8, group_size=4, n=1)
    >>> p.kn, p.group_rows
    ((4, 4), 1)
    """

    codes: jax.Array
    indices: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n: int = struct.field(pytree_node=False)
    m: int = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)

    @property
    def kn(self) -> tuple[int, int]:
        return F._kn(self.shape)

    @property
    def per_word(self) -> int:
        return F.codes_per_word(self.m)

    @property
    def nibbles(self) -> bool:
        """Two codes per byte (``bits <= 4``)."""
        return self.bits <= 4

    @property
    def group_rows(self) -> int:
        """Packed rows (``H`` axis) per scale group: ``group_size / (F * m)`` (all when one group)."""
        if self.group_size >= self.kn[0]:
            return int(self.indices.shape[1])
        return self.group_size // (self.per_word * self.m)

    def nbytes(self) -> int:
        """Bytes of storage: codes + index metadata + scales (+ zero points)."""
        arrs = [self.codes, self.indices, self.scales] + ([self.zeros] if self.zeros is not None
                                                          else [])
        return int(sum(a.size * a.dtype.itemsize for a in arrs))


def decode_slot(codes: jax.Array, j: int, bits: int, signed: bool) -> jax.Array:
    """Integer codes (int32) of slot ``j`` from ``codes`` (``(slots, ...)`` as stored).

    Elementwise on the stored bytes, so Pallas kernels use it on tiles too.

    >>> decode_slot(jnp.array([[0xE3]], jnp.uint8), 1, 4, True).tolist()  # high nibble 0xE = -2
    [-2]
    """
    if bits > 4:
        return codes[j].astype(jnp.int32)
    b = codes[j // 2].astype(jnp.int32)
    v = (b >> (4 * (j % 2))) & 15
    return jnp.where(v >= 8, v - 16, v) if signed else v


def pack_nm_quant(codes: Any, mask: Any, scales: Any, zeros: Any | None, *, bits: int,
                  group_size: int, n: int = 2, m: int = 4) -> NMQuantPacked:
    """Pack integer ``codes`` ``(K, N)`` of an N:M-sparse weight with group ``scales``.

    Args:
      codes: ``(K, N)`` integer codes (signed when ``zeros`` is ``None``, else unsigned), e.g.
        ``QuantizedWeight.codes`` from :mod:`jaxprune.oneshot.quant`; only kept entries are read.
      mask: ``(K, N)`` bool, N:M along ``K``.
      scales / zeros: ``(K / group_size, N)``; ``zeros`` ``None`` for symmetric codes.
      bits: code width (2..8); ``<= 4`` packs two codes per byte.
      group_size: fan-in rows per scale; divides ``K``, multiple of ``F * m``.

    >>> pack_nm_quant(np.ones((16, 1), np.int8), np.ones((16, 1), bool), np.ones((1, 1)), None,
    ...               bits=4, group_size=16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jaxprune.kernels.pack_nm: mask ... is not 2:4 valid: ...
    """
    c = F._concrete(codes, "pack_nm_quant: codes")
    mk = F._concrete(mask, "pack_nm_quant: mask").astype(bool)
    if c.ndim != 2 or c.shape != mk.shape:
        raise ValueError(f"jaxprune.kernels.pack_nm_quant: codes {c.shape} and mask {mk.shape} "
                         "must be the same (K, N) matrix")
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"jaxprune.kernels.pack_nm_quant: codes must be integers, got {c.dtype}")
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"jaxprune.kernels.pack_nm_quant: bits must be in 2..8, got {bits}")
    k, nn = c.shape
    f = F.codes_per_word(m)
    if group_size <= 0 or k % group_size or (group_size % (f * m) and group_size != k):
        raise ValueError(
            f"jaxprune.kernels.pack_nm_quant: group_size={group_size} must divide K={k} and be a "
            f"multiple of {f * m} (= {f} codes per index byte x m={m}) or K itself")
    signed = zeros is None
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    kept = c[mk]
    if kept.size and (kept.min() < lo or kept.max() > hi):
        raise ValueError(f"jaxprune.kernels.pack_nm_quant: kept codes span [{kept.min()}, "
                         f"{kept.max()}], outside the {bits}-bit range [{lo}, {hi}]")
    s = np.asarray(scales, np.float32)
    ng = k // group_size
    if s.shape != (ng, nn) or (zeros is not None and np.shape(zeros) != (ng, nn)):
        raise ValueError(f"jaxprune.kernels.pack_nm_quant: scales/zeros must be ({ng}, {nn}), got "
                         f"{s.shape} / {None if zeros is None else np.shape(zeros)}")
    z_rows = (np.zeros((k, nn), np.int64) if signed
              else np.repeat(np.asarray(zeros, np.int64), group_size, axis=0))
    # the one N:M packer: codes relative to the zero point (empty slots -> 0 -> the zero point)
    base = F.pack_nm(np.where(mk, c.astype(np.int64) - z_rows, 0).astype(np.float32), mk, n, m)
    h = base.values.shape[2]
    gr = h if group_size == k else group_size // (f * m)
    zp = (np.zeros((1, 1, h, nn), np.int64) if signed else
          np.repeat(np.asarray(zeros, np.int64), gr, axis=0)[None, None])
    vals = np.rint(np.asarray(base.values)).astype(np.int64) + zp  # (n, F, H, N)
    if bits > 4:
        stored = vals.astype(np.int8 if signed else np.uint8)
    else:
        u = (vals & 15).astype(np.uint8)
        if n % 2:
            u = np.concatenate([u, np.zeros((1,) + u.shape[1:], np.uint8)], 0)
        stored = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    zj = None if signed else jnp.asarray(np.asarray(zeros, np.uint8))
    return NMQuantPacked(jnp.asarray(stored), base.indices, jnp.asarray(s), zj, (k, nn), n, m,
                         int(bits), int(group_size))


def _slot_values(p: NMQuantPacked, dtype: Any = jnp.float32) -> jax.Array:
    """Dequantized slot values ``(n, F, H, N)``."""
    signed = p.zeros is None
    c = jnp.stack([decode_slot(p.codes, j, p.bits, signed) for j in range(p.n)])
    gr = p.group_rows
    s = jnp.repeat(p.scales, gr, axis=0)[None, None]
    if not signed:
        c = c - jnp.repeat(p.zeros.astype(jnp.int32), gr, axis=0)[None, None]
    return (c.astype(jnp.float32) * s).astype(dtype)


def _as_nm(p: NMQuantPacked, values: jax.Array) -> F.NMPacked:
    return F.NMPacked(values, p.indices, p.shape, p.n, p.m)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(p: NMQuantPacked, dtype: Any = jnp.float32) -> jax.Array:
    """Dense dequantized ``(K, N)`` weight (pruned entries 0); works under ``jit``.

    >>> p = pack_nm_quant(np.eye(4, dtype=np.int8), np.eye(4, dtype=bool),
    ...                   np.full((1, 4), 0.5, np.float32), None, bits=8, group_size=4, n=1)
    >>> dequantize(p).diagonal().tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    return F._nm_dense(_as_nm(p, _slot_values(p, dtype)))


@jax.jit
def unpack_nm_quant(p: NMQuantPacked) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(codes, mask, scales, zeros)`` as given to :func:`pack_nm_quant` (pruned entries: code of
    value 0, i.e. 0 or the zero point). Lossless for every N:M-valid mask.

    >>> c = np.array([[1], [0], [0], [-1]], np.int8)
    >>> p = pack_nm_quant(c, c != 0, np.ones((1, 1)), None, bits=4, group_size=4)
    >>> [a.ravel().tolist() for a in unpack_nm_quant(p)[:2]]
    [[1, 0, 0, -1], [True, False, False, True]]
    """
    signed = p.zeros is None
    c = jnp.stack([decode_slot(p.codes, j, p.bits, signed) for j in range(p.n)])
    gr = p.group_rows
    z = 0 if signed else jnp.repeat(p.zeros.astype(jnp.int32), gr, axis=0)[None, None]
    dense = F._nm_dense(_as_nm(p, (c - z).astype(jnp.float32)))
    mask = F._nm_mask(_as_nm(p, c.astype(jnp.float32)))
    zr = 0 if signed else jnp.repeat(p.zeros.astype(jnp.int32), p.group_size, axis=0)
    codes = (jnp.rint(dense).astype(jnp.int32) + zr).astype(jnp.int8 if signed else jnp.uint8)
    return codes, mask, p.scales, p.zeros
