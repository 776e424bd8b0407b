"""Sparse formats and Pallas kernels for pruned weights (N:M, block-sparse, bitmask).

* :mod:`~jaxprune.kernels.formats` — packed pytrees and lossless ``pack_*`` / :func:`unpack`.
* :func:`nm_matmul`, :func:`block_sparse_matmul` — Pallas kernels (interpret mode on CPU,
  compiled on GPU/TPU; a kernel that cannot compile raises :class:`KernelCompileError` unless a
  reference fallback is asked for), differentiable via ``custom_vjp``.
* :mod:`~jaxprune.kernels.reference` — the ``jnp`` oracle.
* :mod:`~jaxprune.kernels.export` — pruned params + masks + operator map → packed matrix views
  (:func:`pack_params`); run any traced model with the kernels at the operator level
  (:func:`apply_packed`).

>>> import jax.numpy as jnp
>>> from jaxprune import kernels
>>> p = kernels.pack_nm(jnp.eye(4), jnp.eye(4, dtype=bool), 2, 4)
>>> kernels.unpack(p).shape
(4, 4)
"""

from jaxprune.kernels import formats, reference
from jaxprune.kernels._backend import KernelCompileError
from jaxprune.kernels.block_sparse_matmul import block_sparse_matmul
from jaxprune.kernels.export import PackedWeight, apply_packed, pack_params, packed_matmul
from jaxprune.kernels.formats import (
    Bitmask,
    BlockSparse,
    NMPacked,
    is_packed,
    pack_bitmask,
    pack_block,
    pack_nm,
    to_mask,
    unpack,
)
from jaxprune.kernels.nm_matmul import nm_matmul
from jaxprune.kernels.nm_quant_matmul import bench_quant_kernel, nm_quant_matmul
from jaxprune.kernels.quant_formats import NMQuantPacked, pack_nm_quant, unpack_nm_quant

__all__ = [
    "formats", "reference", "KernelCompileError",
    "NMPacked", "BlockSparse", "Bitmask", "pack_nm", "pack_block", "pack_bitmask", "unpack",
    "to_mask", "is_packed",
    "nm_matmul", "block_sparse_matmul",
    "PackedWeight", "pack_params", "apply_packed", "packed_matmul",
    "NMQuantPacked", "pack_nm_quant", "unpack_nm_quant", "nm_quant_matmul", "bench_quant_kernel",
]
