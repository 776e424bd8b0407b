"""Inference export: pruned params + masks → packed params, and running Flax models on them.

:func:`pack_params` turns every masked leaf into a packed format chosen by its pattern
(:class:`~jaxprune.core.patterns.NM` → :class:`~jaxprune.kernels.formats.NMPacked`,
:class:`~jaxprune.core.patterns.Block` → :class:`~jaxprune.kernels.formats.BlockSparse`, anything else →
:class:`~jaxprune.kernels.formats.Bitmask`); unmasked leaves stay dense.

:func:`apply_packed` runs an *unmodified* linen model on packed params: it intercepts
``nn.Dense.__call__`` (``flax.linen.intercept_methods``) and, where the kernel param is packed,
computes ``x @ W (+ b)`` with :func:`packed_matmul` (the Pallas kernels) instead.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxprune as jp
    >>> model = nn.Dense(8)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    >>> pruned, masks = jp.prune(params, 0.5, pattern="2:4")
    >>> packed = pack_params(pruned, masks, "2:4")
    >>> x = jnp.ones((2, 16))
    >>> y = jax.jit(lambda p, x: apply_packed(model, {"params": p}, x))(packed, x)
    >>> bool(jnp.allclose(y, model.apply({"params": pruned}, x), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.core import masks as mask_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.kernels import formats as F
from jaxprune.kernels import reference as ref
from jaxprune.kernels.block_sparse_matmul import block_sparse_matmul
from jaxprune.kernels.nm_matmul import nm_matmul

__all__ = ["pack_params", "packed_matmul", "apply_packed", "dense_interceptor"]

PyTree = Any


def pack_params(params: PyTree, masks: PyTree, pattern: pat_lib.Pattern | str) -> PyTree:
    """Packed copy of ``params``: each leaf with a mask becomes the format of its pattern.

    ``pattern`` is what the masks were built with (a spec, a pattern or a
    :class:`~jaxprune.core.patterns.PerLeaf`). N:M must run along the contraction axis (``ndim - 2``).
    Raises ``ValueError`` naming the leaf path when a mask does not fit its pattern.

    >>> import jaxprune as jp
    >>> p, m = jp.prune({"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}, 0.5, pattern="2:4")
    >>> type(pack_params(p, m, "2:4")["kernel"]).__name__
    'NMPacked'
    """
    mask_lib.check_masks(params, masks)
    pattern = pat_lib.parse(pattern)

    def one(path: str, w: Any, m: Any) -> Any:
        if m is None or w is None:
            return w
        pat = pat_lib.for_path(pattern, path)
        try:
            if isinstance(pat, pat_lib.NM):
                ax = pat.resolve_axis(w.ndim)
                if w.ndim < 2 or ax != w.ndim - 2:
                    raise ValueError(
                        f"N:M groups must run along the contraction axis {w.ndim - 2} to pack, "
                        f"pattern has axis {ax}"
                    )
                return F.pack_nm(w, m, pat.n, pat.m)
            if isinstance(pat, pat_lib.Block):
                return F.pack_block(w, m, (pat.r, pat.c))
            return F.pack_bitmask(w, m)
        except (ValueError, TypeError) as e:
            raise type(e)(f"jaxprune.kernels.pack_params: leaf '{path}': {e}") from e

    return mask_lib.tree_map_with_path_masked(one, params, masks)


def packed_matmul(x: jax.Array, w: Any, **kwargs: Any) -> jax.Array:
    """``x @ W`` over ``W``'s matrix view for any packed format (kernels) or a dense array.

    ``kwargs`` go to the kernel (``impl``, ``variant``, ``interpret``). :class:`Bitmask` weights
    (unstructured) have no kernel: they are decompressed in XLA.

    >>> packed_matmul(jnp.ones((1, 2)), jnp.ones((2, 3)))
    Array([[2., 2., 2.]], dtype=float32)
    """
    if isinstance(w, F.NMPacked):
        return nm_matmul(x, w, **kwargs)
    if isinstance(w, F.BlockSparse):
        return block_sparse_matmul(x, w, **kwargs)
    return ref.matmul_ref(x, w)


def dense_interceptor(**kernel_kwargs: Any) -> Any:
    """A ``flax.linen`` method interceptor running ``nn.Dense`` with packed kernels.

    Dense layers whose ``kernel`` param is not packed run unchanged. Use with
    ``nn.intercept_methods`` (or simply :func:`apply_packed`).

    >>> with nn.intercept_methods(dense_interceptor()):
    ...     pass
    """

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        mod = context.module
        if context.method_name != "__call__" or type(mod) is not nn.Dense:
            return next_fun(*args, **kwargs)
        if not mod.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        kernel = mod.get_variable("params", "kernel")
        if not F.is_packed(kernel):
            return next_fun(*args, **kwargs)
        (x,) = args
        bias = mod.get_variable("params", "bias") if mod.use_bias else None
        dts = [x.dtype, kernel.dtype] + ([bias.dtype] if bias is not None else [])
        dtype = mod.dtype if mod.dtype is not None else jnp.result_type(*dts)
        y = packed_matmul(jnp.asarray(x, dtype), kernel, **kernel_kwargs).astype(dtype)
        if bias is not None:
            y = y + jnp.asarray(bias, dtype)
        return y

    return interceptor


def apply_packed(model: nn.Module, variables: PyTree, *args: Any, kernel_kwargs: dict | None = None,
                 **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with packed ``nn.Dense`` kernels run by kernels.

    ``variables["params"]`` comes from :func:`pack_params`. ``kernel_kwargs`` go to the kernels.

    >>> m = nn.Dense(2)
    >>> v = m.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> apply_packed(m, v, jnp.ones((1, 4))).shape
    (1, 2)
    """
    with nn.intercept_methods(dense_interceptor(**(kernel_kwargs or {}))):
        return model.apply(variables, *args, **kwargs)
