"""Packed sparse formats for pruned weights, as pytrees with static shape metadata.

Every format stores a weight ``W`` through its *matrix view* ``(K, N) = (prod(shape[:-1]),
shape[-1])`` (:func:`jaxprune.core.patterns.matrix_view`; a Flax ``Dense`` kernel ``(in, out)`` is its
own view, a conv kernel ``(h, w, in, out)`` becomes ``(h*w*in, out)``), so ``x @ W`` contracts over
``K``. :class:`NMPacked` and :class:`BlockSparse` need a weight with at least 2 dims.

* :class:`NMPacked` — N:M along ``K`` (the contraction axis, as :class:`jaxprune.core.patterns.NM`):
  the ``n`` kept values of every group of ``m`` consecutive rows, plus each value's position in its
  group as a ``bits``-bit code packed ``8 // bits`` per ``uint8`` (2:4 → 2-bit codes, 4 per byte,
  as Qwix packs 1:4 indices); groups of ``m > 256`` use one ``uint16`` code each.
* :class:`BlockSparse` — nonzero ``(br, bc)`` blocks, compressed by block column (BCSR of ``Wᵀ``:
  ``col_ptr`` + block row indices), padded to a static ``nnz_max`` so it can cross ``jit``.
* :class:`Bitmask` — unstructured: the mask as ``np.packbits`` bits plus the kept values in row-major
  order (padded to ``nnz_max``).

Packing is a host-time operation (it needs a concrete mask); the packed objects are ordinary pytrees
(array leaves + static metadata), so they go through ``jit``, ``grad`` and checkpoints.

Layout of :class:`NMPacked` (chosen so a kernel decompresses with elementwise ops only): with
``F = max(1, 8 // bits)`` codes per index word, groups ``g = h * F + q`` (``h < H = G / F``, ``q < F``);
``values[j, q, h, c]`` is the ``j``-th kept value (ascending position) of group ``g`` in column ``c``
and ``indices[j, h, c]`` holds the codes of groups ``h*F .. h*F+F-1`` at bit offsets ``bits * q``.
A group with fewer than ``n`` kept entries pads its slots with value 0 and a code that marks the slot
empty: code ``m`` when ``m < 2**bits``, otherwise the previous slot's code repeated (or ``1, 0, ...``
for an empty group). Slot ``j`` is kept iff its code is ``< m`` and strictly larger than slot
``j-1``'s code (slot 0: unless slot 1's code is smaller). Values round-trip exactly for every valid
mask; the mask also round-trips exactly except for an *empty* group when ``n == 1`` and ``m`` is a
power of two (e.g. 1:4), which decodes as one kept zero.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.arange(8., dtype=jnp.float32).reshape(4, 2)
    >>> mask = jnp.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)
    >>> p = pack_nm(w, mask, 2, 4)
    >>> bool((unpack(p) == jnp.where(mask, w, 0)).all()), p.indices.dtype
    (True, dtype('uint8'))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprune.core import patterns as pat_lib

__all__ = [
    "NMPacked", "BlockSparse", "Bitmask", "pack_nm", "pack_block", "pack_bitmask", "unpack",
    "to_mask", "is_packed", "code_bits", "codes_per_word",
]


def _kn(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(K, N)`` of a packable weight: :func:`jaxprune.core.patterns.matrix_view`, >= 2 dims."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"jaxprune.kernels: packed formats need a weight with >= 2 dims, got shape {shape}"
        )
    return pat_lib.matrix_view(shape)


def code_bits(m: int) -> int:
    """Bits per in-group position code for group size ``m`` (1, 2, 4, 8, or 16 for ``m > 256``).

    Codes of up to 8 bits are packed ``8 // bits`` per ``uint8``; 16-bit codes are one ``uint16``
    each (``m <= 65536``).

    >>> code_bits(4), code_bits(8), code_bits(2), code_bits(256), code_bits(512)
    (2, 4, 1, 8, 16)
    """
    for b in (1, 2, 4, 8, 16):
        if m <= 2**b:
            return b
    raise ValueError(f"jaxprune.kernels: N:M packing supports m <= 65536, got m={m}")


def codes_per_word(m: int) -> int:
    """Position codes stored per index word (``uint8``, or ``uint16`` when ``m > 256``).

    >>> codes_per_word(4), codes_per_word(256), codes_per_word(512)
    (4, 1, 1)
    """
    return max(1, 8 // code_bits(m))


def _concrete(x: Any, what: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"jaxprune.kernels: {what} must be concrete to pack (packing runs on the host, "
            "outside jit); call pack_* before jit and pass the packed pytree in"
        )
    return np.asarray(x)


def _check_pair(w: Any, mask: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    wn = _concrete(w, f"{fn}: weight")
    mn = _concrete(mask, f"{fn}: mask")
    if mn.dtype != np.bool_:
        raise TypeError(f"jaxprune.kernels.{fn}: mask must be a bool array (True = kept), got "
                        f"dtype {mn.dtype}")
    if wn.shape != mn.shape:
        raise ValueError(
            f"jaxprune.kernels.{fn}: mask shape {mn.shape} does not match weight shape {wn.shape}"
        )
    if not np.issubdtype(wn.dtype, np.floating) and wn.dtype != jnp.bfloat16:
        raise TypeError(f"jaxprune.kernels.{fn}: weight must be floating point, got {wn.dtype}")
    return wn, mn


# ------------------------------------------------------------------------------------------------
# N:M
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class NMPacked:
    """N:M-packed weight: ``values (n, F, H, N)``, ``indices (n, H, N)`` ``uint8`` (``uint16`` for
    ``m > 256``; see the module doc).

    ``shape`` is the original weight shape; ``padded_k = H * F * m >= K`` (zero groups pad ``K``).

    >>> p = pack_nm(jnp.ones((8, 2)), jnp.tile(jnp.array([1, 1, 0, 0], bool), 2)[:, None]
    ...             .repeat(2, 1), 2, 4)
    >>> p.values.shape, p.indices.shape, p.padded_k
    ((2, 4, 1, 2), (2, 1, 2), 16)
    """

    values: jax.Array
    indices: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n: int = struct.field(pytree_node=False)
    m: int = struct.field(pytree_node=False)

    @property
    def bits(self) -> int:
        return code_bits(self.m)

    @property
    def per_word(self) -> int:
        """Codes per index word (``F`` in the module doc)."""
        return codes_per_word(self.m)

    @property
    def kn(self) -> tuple[int, int]:
        return _kn(self.shape)

    @property
    def padded_k(self) -> int:
        return int(self.values.shape[2]) * self.per_word * self.m

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    def nbytes(self) -> int:
        """Bytes of storage (values + index codes)."""
        return int(self.values.size * self.values.dtype.itemsize
                   + self.indices.size * self.indices.dtype.itemsize)


def _nm_invalid_error(mn2: np.ndarray, n: int, m: int, shape: tuple[int, ...]) -> ValueError:
    k, nn = mn2.shape
    counts = mn2.reshape(k // m, m, nn).sum(axis=1)
    g, c = (int(i) for i in np.argwhere(counts > n)[0])
    return ValueError(
        f"jaxprune.kernels.pack_nm: mask (shape {shape}, matrix view {k}x{nn}) is not {n}:{m} "
        f"valid: first offending group is rows {g * m}..{g * m + m - 1}, column {c} "
        f"({int(counts[g, c])} kept > n={n}); prune with pattern NM({n}, {m}) first"
    )


def pack_nm(w: Any, mask: Any, n: int = 2, m: int = 4) -> NMPacked:
    """Pack ``where(mask, w, 0)`` as N:M along the contraction axis (groups of ``m`` rows of ``K``).

    Raises ``ValueError`` if ``K`` is not divisible by ``m`` or if a group keeps more than ``n``
    entries (naming the first offending group's rows and column).

    >>> w = jnp.array([[1.], [2.], [3.], [4.]])
    >>> p = pack_nm(w, jnp.array([[0], [1], [0], [1]], bool), 2, 4)
    >>> unpack(p)[:, 0]
    Array([0., 2., 0., 4.], dtype=float32)
    """
    pat = pat_lib.NM(n, m)
    wn, mn = _check_pair(w, mask, "pack_nm")
    shape = tuple(wn.shape)
    k, nn = _kn(shape)
    pat.validate("<weight>", shape)
    bits = code_bits(m)
    if not pat_lib.nm_valid(mn, n, m):
        raise _nm_invalid_error(mn.reshape(k, nn), n, m, shape)
    f = codes_per_word(m)
    g0 = k // m
    gp = -(-g0 // f) * f
    w2 = np.where(mn, wn, 0).reshape(k, nn)
    m2 = mn.reshape(k, nn)
    pad = (gp - g0) * m
    w2 = np.concatenate([w2, np.zeros((pad, nn), w2.dtype)], 0).reshape(gp, m, nn)
    m2 = np.concatenate([m2, np.zeros((pad, nn), bool)], 0).reshape(gp, m, nn)
    order = np.argsort(~m2, axis=1, kind="stable")[:, :n]  # kept positions first, ascending
    cnt = m2.sum(axis=1)  # (gp, nn)
    slot = np.arange(n)[None, :, None]
    valid = slot < cnt[:, None, :]
    vals = np.where(valid, np.take_along_axis(w2, order, axis=1), 0).astype(w2.dtype)
    if m < 2**bits:
        codes = np.where(valid, order, m)
    else:
        last = np.take_along_axis(order, np.maximum(cnt - 1, 0)[:, None, :], axis=1)
        codes = np.where(valid, order, last)
        if n >= 2:
            empty = np.zeros((n,), np.int64)
            empty[0] = 1
            codes = np.where((cnt == 0)[:, None, :], empty[None, :, None], codes)
    h = gp // f
    vals = vals.reshape(h, f, n, nn).transpose(2, 1, 0, 3)  # (n, F, H, N)
    codes = codes.reshape(h, f, n, nn).transpose(2, 1, 0, 3).astype(np.uint32)
    shifts = (bits * np.arange(f, dtype=np.uint32))[None, :, None, None]
    word = np.uint8 if bits <= 8 else np.uint16
    packed = np.sum(codes << shifts, axis=1).astype(word)  # (n, H, N)
    return NMPacked(jnp.asarray(vals), jnp.asarray(packed), shape, n, m)


def _nm_codes(p: NMPacked) -> jax.Array:
    """Codes ``(n, F, H, N)`` int32 from the packed bytes."""
    b = p.indices.astype(jnp.int32)
    shifts = p.bits * jnp.arange(p.per_word, dtype=jnp.int32)
    return (b[:, None] >> shifts[None, :, None, None]) & (2**p.bits - 1)


def _nm_dense(p: NMPacked, values: jax.Array | None = None) -> jax.Array:
    v = p.values if values is None else values
    codes = _nm_codes(p)  # (n, F, H, N)
    # only kept slots are read (empty slots' codes may repeat a kept slot's position), so the
    # gradient of an empty slot is zero; select, not sum, so a kept -0.0 stays -0.0
    valid = _nm_slot_valid(p, codes)
    onehot = (codes[..., None, :] == jnp.arange(p.m)[:, None]) & valid[..., None, :]
    dense = jnp.zeros(onehot.shape[1:], v.dtype)  # (F, H, m, N)
    for j in range(p.n):
        dense = jnp.where(onehot[j], v[j][..., None, :], dense)
    k, nn = p.kn
    dense = dense.transpose(1, 0, 2, 3).reshape(p.padded_k, nn)  # (H, F, m, N) -> (Kp, N)
    return dense[:k]


def _nm_slot_valid(p: NMPacked, codes: jax.Array | None = None) -> jax.Array:
    """``(n, F, H, N)`` bool: which slots hold a kept entry (not an empty-slot padding code)."""
    codes = _nm_codes(p) if codes is None else codes
    valid = codes < p.m
    if p.n >= 2:
        inc = codes[1:] > codes[:-1]
        first = ~(codes[1] < codes[0])
        valid = valid & jnp.concatenate([first[None], inc], axis=0)
    return valid


def _nm_mask(p: NMPacked) -> jax.Array:
    codes = _nm_codes(p)
    valid = _nm_slot_valid(p, codes)
    onehot = (codes[..., None, :] == jnp.arange(p.m)[:, None]) & valid[..., None, :]
    dense = jnp.any(onehot, axis=0).transpose(1, 0, 2, 3).reshape(p.padded_k, p.kn[1])
    return dense[: p.kn[0]]


# ------------------------------------------------------------------------------------------------
# Block sparse
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class BlockSparse:
    """Block-sparse weight compressed by block column.

    ``blocks (nnz_max, br, bc)``; ``rows``/``cols (nnz_max,) int32`` are each stored block's block
    row/column; blocks are sorted by column then row, ``col_ptr (NB + 1,)`` delimits each block
    column's run (entries past ``col_ptr[-1]`` are zero padding). ``max_per_col`` (static) is the
    longest run, the trip count of the kernels' inner loop.

    >>> b = pack_block(jnp.ones((4, 4)), jnp.eye(4, dtype=bool).repeat(1, 0), (2, 2))
    >>> b.blocks.shape, b.col_ptr.tolist(), b.max_per_col
    ((2, 2, 2), [0, 1, 2], 1)
    """

    blocks: jax.Array
    rows: jax.Array
    cols: jax.Array
    col_ptr: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    block: tuple[int, int] = struct.field(pytree_node=False)
    max_per_col: int = struct.field(pytree_node=False)

    @property
    def kn(self) -> tuple[int, int]:
        return _kn(self.shape)

    @property
    def grid(self) -> tuple[int, int]:
        k, n = self.kn
        return k // self.block[0], n // self.block[1]

    @property
    def nnz_max(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def dtype(self) -> Any:
        return self.blocks.dtype

    def nbytes(self) -> int:
        """Bytes of storage (blocks + int32 indices)."""
        b = self.blocks
        return int(b.size * b.dtype.itemsize + 4 * (self.rows.size * 2 + self.col_ptr.size))


def pack_block(
    w: Any, mask: Any, block: tuple[int, int] = (4, 4), nnz_max: int | None = None
) -> BlockSparse:
    """Pack the blocks of ``where(mask, w, 0)`` that hold any kept entry.

    ``block`` must divide the matrix view (``ValueError`` otherwise, via
    :meth:`jaxprune.core.patterns.Block.validate`). ``nnz_max`` pads the block list (default: exact).
    A partially kept block is stored with its pruned entries as zeros (values stay exact).

    >>> w = jnp.arange(16.).reshape(4, 4)
    >>> m = jnp.zeros((4, 4), bool).at[:2, 2:].set(True)
    >>> b = pack_block(w, m, (2, 2))
    >>> b.rows.tolist(), b.cols.tolist(), bool((unpack(b) == jnp.where(m, w, 0)).all())
    ([0], [1], True)
    """
    try:
        br, bc = (operator.index(b) for b in block)
    except (TypeError, ValueError):  # not two integers (2.5 would silently become 2)
        raise ValueError("jaxprune.kernels.pack_block: block must be two integers (rows, cols), "
                         f"got {block!r}") from None
    if br <= 0 or bc <= 0:
        raise ValueError(f"jaxprune.kernels.pack_block: block must be positive, got {block}")
    wn, mn = _check_pair(w, mask, "pack_block")
    shape = tuple(wn.shape)
    k, nn = _kn(shape)
    pat_lib.Block(br, bc).validate("<weight>", shape)
    kb, nb = k // br, nn // bc
    w4 = np.where(mn, wn, 0).reshape(kb, br, nb, bc).transpose(0, 2, 1, 3)
    present = mn.reshape(kb, br, nb, bc).any(axis=(1, 3))  # (KB, NB)
    cols, rows = np.nonzero(present.T)  # column-major order
    nnz = len(rows)
    if nnz_max is None:
        nnz_max = nnz
    if nnz_max < nnz:
        raise ValueError(
            f"jaxprune.kernels.pack_block: nnz_max={nnz_max} < {nnz} nonzero blocks"
        )
    blocks = np.zeros((nnz_max, br, bc), wn.dtype)
    blocks[:nnz] = w4[rows, cols]
    pad = nnz_max - nnz
    rows_p = np.concatenate([rows, np.zeros(pad, np.int64)]).astype(np.int32)
    cols_p = np.concatenate([cols, np.full(pad, max(nb - 1, 0))]).astype(np.int32)
    counts = present.sum(axis=0)
    col_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    max_per_col = int(counts.max()) if nb else 0
    return BlockSparse(jnp.asarray(blocks), jnp.asarray(rows_p), jnp.asarray(cols_p),
                       jnp.asarray(col_ptr), shape, (br, bc), max_per_col)


def _block_valid(b: BlockSparse) -> jax.Array:
    return jnp.arange(b.nnz_max) < b.col_ptr[-1]


def _block_dense(b: BlockSparse, blocks: jax.Array | None = None) -> jax.Array:
    blk = b.blocks if blocks is None else blocks
    blk = jnp.where(_block_valid(b)[:, None, None], blk, jnp.zeros((), blk.dtype))
    kb, nb = b.grid
    br, bc = b.block
    d = jnp.zeros((kb, nb, br, bc), blk.dtype).at[b.rows, b.cols].add(blk)
    return d.transpose(0, 2, 1, 3).reshape(kb * br, nb * bc)


def _block_mask(b: BlockSparse) -> jax.Array:
    kb, nb = b.grid
    br, bc = b.block
    present = jnp.zeros((kb, nb), bool).at[b.rows, b.cols].max(_block_valid(b))
    return jnp.repeat(jnp.repeat(present, br, axis=0), bc, axis=1)


# ------------------------------------------------------------------------------------------------
# Bitmask (unstructured)
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class Bitmask:
    """Unstructured: ``bits`` = ``np.packbits(mask.ravel())`` (big-endian), ``values (nnz_max,)``.

    >>> b = pack_bitmask(jnp.array([[1., 2.], [3., 4.]]), jnp.array([[1, 0], [0, 1]], bool))
    >>> b.bits.tolist(), b.values.tolist()
    ([144], [1.0, 4.0])
    """

    bits: jax.Array
    values: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    def nbytes(self) -> int:
        """Bytes of storage (bits + values)."""
        return int(self.bits.size + self.values.size * self.values.dtype.itemsize)


def pack_bitmask(w: Any, mask: Any, nnz_max: int | None = None) -> Bitmask:
    """Pack ``where(mask, w, 0)`` as packed mask bits plus kept values (row-major order).

    >>> b = pack_bitmask(jnp.arange(4.), jnp.array([0, 1, 1, 0], bool))
    >>> unpack(b)
    Array([0., 1., 2., 0.], dtype=float32)
    """
    wn, mn = _check_pair(w, mask, "pack_bitmask")
    vals = wn[mn]
    nnz = vals.size
    if nnz_max is None:
        nnz_max = nnz
    if nnz_max < nnz:
        raise ValueError(f"jaxprune.kernels.pack_bitmask: nnz_max={nnz_max} < {nnz} kept entries")
    vals = np.concatenate([vals, np.zeros(nnz_max - nnz, wn.dtype)])
    return Bitmask(jnp.asarray(np.packbits(mn.ravel())), jnp.asarray(vals), tuple(wn.shape))


def _bitmask_mask(b: Bitmask) -> jax.Array:
    size = math.prod(b.shape)
    return jnp.unpackbits(b.bits, count=size).astype(bool).reshape(b.shape)


def _bitmask_dense(b: Bitmask) -> jax.Array:
    m = _bitmask_mask(b).ravel()
    pos = jnp.clip(jnp.cumsum(m) - 1, 0, max(b.values.shape[0] - 1, 0))
    if b.values.shape[0] == 0:
        return jnp.zeros(b.shape, b.values.dtype)
    return jnp.where(m, b.values[pos], jnp.zeros((), b.values.dtype)).reshape(b.shape)


# ------------------------------------------------------------------------------------------------
# Generic
# ------------------------------------------------------------------------------------------------

Packed = NMPacked | BlockSparse | Bitmask


def is_packed(x: Any) -> bool:
    """True for an :class:`NMPacked`, :class:`BlockSparse` or :class:`Bitmask`.

    >>> is_packed(jnp.ones(2)), is_packed(pack_bitmask(jnp.ones(2), jnp.ones(2, bool)))
    (False, True)
    """
    return isinstance(x, NMPacked | BlockSparse | Bitmask)


def _per_format(what: str, p: Packed, nm: Callable, block: Callable, bitmask: Callable
                ) -> jax.Array:
    """``nm(p)`` / ``block(p)`` / ``bitmask(p)`` by the format of ``p``, in its original shape."""
    for cls, fn in ((NMPacked, nm), (BlockSparse, block), (Bitmask, bitmask)):
        if isinstance(p, cls):
            return fn(p).reshape(p.shape)
    raise TypeError(f"jaxprune.kernels.{what}: expected a packed format, got {type(p).__name__}")


def unpack(p: Packed) -> jax.Array:
    """Dense weight (original shape, pruned entries zero); works under ``jit``.

    >>> unpack(pack_bitmask(jnp.ones((2, 2)), jnp.eye(2, dtype=bool)))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    return _per_format("unpack", p, _nm_dense, _block_dense, _bitmask_dense)


def to_mask(p: Packed) -> jax.Array:
    """Boolean mask (original shape) of the entries the packed format keeps.

    >>> to_mask(pack_bitmask(jnp.ones(3), jnp.array([1, 0, 1], bool)))
    Array([ True, False,  True], dtype=bool)
    """
    return _per_format("to_mask", p, _nm_mask, _block_mask, _bitmask_mask)
