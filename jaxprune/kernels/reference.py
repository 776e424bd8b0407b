"""``jnp`` reference ops for the packed formats: the oracle the Pallas kernels are tested against.

They decompress to a dense weight in XLA and call ``jnp.dot`` (``precision=HIGHEST`` for f32), so
they are differentiable with plain ``jax.grad`` and run on every backend; they are also the
fallback when a kernel cannot run.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxprune.kernels import formats
    >>> p = formats.pack_nm(jnp.ones((4, 2)), jnp.array([[1, 1], [1, 0], [0, 1], [0, 0]], bool))
    >>> matmul_ref(jnp.ones((1, 4)), p)
    Array([[2., 2.]], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.kernels import formats as F

__all__ = ["matmul_ref", "nm_matmul_ref", "block_sparse_matmul_ref", "dot_precision"]


def dot_precision(dtype: Any) -> jax.lax.Precision:
    """``HIGHEST`` for f32 (true f32 on TPU/GPU), ``DEFAULT`` for 16-bit types."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _check_x(x: jax.Array, k: int, fn: str) -> None:
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"jaxprune.kernels.{fn}: x has shape {tuple(x.shape)} but the weight's contraction "
            f"dimension K is {k}; x must be (..., {k})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"jaxprune.kernels.{fn}: x must be floating point, got {x.dtype}")


def _dense_matmul(x: jax.Array, w2: jax.Array) -> jax.Array:
    ct = jnp.result_type(x.dtype, w2.dtype)
    y = jnp.dot(x.astype(ct), w2.astype(ct), precision=dot_precision(ct),
                preferred_element_type=jnp.float32)
    return y.astype(ct)


def nm_matmul_ref(x: jax.Array, w: F.NMPacked) -> jax.Array:
    """``x @ unpack(w)`` over the matrix view; ``x`` is ``(..., K)``, result ``(..., N)``.

    >>> p = F.pack_nm(jnp.eye(4), jnp.eye(4, dtype=bool))
    >>> nm_matmul_ref(jnp.arange(4.)[None], p)
    Array([[0., 1., 2., 3.]], dtype=float32)
    """
    k, n = w.kn
    _check_x(x, k, "nm_matmul_ref")
    return _dense_matmul(x, F._nm_dense(w))


def block_sparse_matmul_ref(x: jax.Array, w: F.BlockSparse) -> jax.Array:
    """``x @ unpack(w)`` over the matrix view; ``x`` is ``(..., K)``, result ``(..., N)``.

    >>> b = F.pack_block(jnp.ones((4, 4)), jnp.ones((4, 4), bool), (2, 2))
    >>> block_sparse_matmul_ref(jnp.ones((1, 4)), b)
    Array([[4., 4., 4., 4.]], dtype=float32)
    """
    k, n = w.kn
    _check_x(x, k, "block_sparse_matmul_ref")
    return _dense_matmul(x, F._block_dense(w))


def matmul_ref(x: jax.Array, w: Any) -> jax.Array:
    """Reference ``x @ W`` for any packed format (or a dense array) over the matrix view.

    >>> matmul_ref(jnp.ones((1, 2)), jnp.ones((2, 3)))
    Array([[2., 2., 2.]], dtype=float32)
    """
    if isinstance(w, F.NMPacked):
        return nm_matmul_ref(x, w)
    if isinstance(w, F.BlockSparse):
        return block_sparse_matmul_ref(x, w)
    if isinstance(w, F.Bitmask):
        k, n = F._kn(w.shape)
        _check_x(x, k, "matmul_ref")
        return _dense_matmul(x, F.unpack(w).reshape(k, n))
    w = jnp.asarray(w)
    k, n = F._kn(w.shape)
    _check_x(x, k, "matmul_ref")
    return _dense_matmul(x, w.reshape(k, n))
