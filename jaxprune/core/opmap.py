"""The operator map: how each parameter leaf is used, read off the model's traced computation.

:func:`operator_map` traces ``fn(params, *args)`` (a linen ``Module``, an nnx model through
``nnx.merge``, any JAX function) to a jaxpr and follows every parameter through layout ops
(reshape, transpose, broadcast, convert, concatenate, slicing, ``jit``, ``custom_jvp``/``custom_vjp``,
``remat``, ``scan``, ``cond``, ``while``) to the primitives that consume it:

* ``dot_general`` — which parameter axes are contracted (the **fan-in**, in contraction order),
  which are outputs and which are batch axes (``einsum`` batch dims, stacked experts, the scanned
  layer axis);
* ``conv_general_dilated`` — spatial and input-channel axes (fan-in, in ``(*window, in)`` order),
  output channels, feature groups;
* ``gather`` — embeddings (a tied embedding is an embedding that also feeds a matmul);
* elementwise ops on activations — norm scales and biases.

Each leaf gets a :class:`LeafOp` with a *role* and, for matmul/conv weights, its **matrix view**
``(fan_in, out)``: the 2-D matrix actually multiplied (batch axes folded into the rows). The pipeline
uses it (``opmap=``) so N:M groups run along the true fan-in, blocks are blocks of the real matrix,
``channel`` means output units and ERK uses true fan-in and fan-out, whatever the layout:
``nn.DenseGeneral`` ``(d, heads, head_dim)``, einsum params, PyTorch ``weight`` ``(out, in)`` used as
``x @ W.T``. A leaf used by two matmuls in incompatible ways is refused, naming both uses.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.ones(8)}        # PyTorch layout: (out, in)
    >>> om = operator_map(lambda p, x: x @ p["w"].T + p["b"], params, jnp.ones((2, 4)))
    >>> om["w"].role, om["w"].fan_in, om["w"].out, om["w"].view_shape
    ('matmul', (1,), (0,), (4, 8))
    >>> om["b"].role
    'bias'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import walker as wk
from jaxprune.core.masks import PyTree, leaves_with_paths
from jaxprune.core.oprules import CONST, OperatorMapError, Prov, Use, _Analysis, _default, _rules

__all__ = ["Use", "LeafOp", "OperatorMap", "operator_map", "trace", "OperatorMapError"]


@dataclasses.dataclass(frozen=True)
class LeafOp:
    """How one parameter leaf is used.

    ``role``: ``matmul`` / ``conv`` (a weight), ``embedding`` (gathered; possibly also tied to a
    matmul), ``scale`` / ``bias`` (elementwise on activations), ``other`` or ``unused``.
    For weights (and tied embeddings): ``fan_in``, ``out`` and ``batch`` axes; the matrix view is
    the leaf transposed to ``batch + fan_in + out`` and reshaped to
    ``(prod(batch) * prod(fan_in), prod(out))``.
    """

    path: str
    shape: tuple[int, ...]
    role: str
    fan_in: tuple[int, ...] = ()
    out: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    uses: tuple[Use, ...] = ()
    spatial: tuple[int, ...] = ()

    @property
    def is_weight(self) -> bool:
        """A matmul or conv weight (what the default filter prunes)."""
        return self.role in ("matmul", "conv")

    @property
    def has_view(self) -> bool:
        """Whether the leaf feeds a matmul/conv, so it has a matrix view."""
        return bool(self.fan_in or self.out)

    @property
    def perm(self) -> tuple[int, ...]:
        """Axis order ``batch + fan_in + out + (remaining size-1 axes)``."""
        used = (*self.batch, *self.fan_in, *self.out)
        rest = tuple(i for i in range(len(self.shape)) if i not in used)
        return (*self.batch, *rest, *self.fan_in, *self.out)

    @property
    def view_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the matrix view: rows = batch × fan-in, cols = outputs."""
        if not self.has_view:
            n = math.prod(self.shape)
            return (1, n) if len(self.shape) < 2 else (n // self.shape[-1], self.shape[-1])
        k = math.prod(self.shape[i] for i in self.perm if i not in self.out)
        return k, math.prod(self.shape[i] for i in self.out)

    @property
    def fan_in_size(self) -> int:
        """Length of one row of the matmul actually performed (the contraction length)."""
        return math.prod(self.shape[i] for i in self.fan_in) if self.fan_in else self.view_shape[0]

    @property
    def erk_dims(self) -> tuple[int, ...]:
        """Dims for ERK: conv ``(*window, in, out)``; matmul ``(fan_in, out)`` per batch entry."""
        if self.role == "conv":
            chans = tuple(i for i in self.fan_in if i not in self.spatial)
            return (*(self.shape[i] for i in self.spatial),
                    math.prod(self.shape[i] for i in chans), math.prod(self.shape[i] for i in self.out))
        if self.has_view:
            return (self.fan_in_size, math.prod(self.shape[i] for i in self.out))
        return self.shape

    def to_view(self, x: Any) -> jax.Array:
        """This leaf's array (or scores/mask) as its ``(rows, cols)`` matrix view.

        >>> lo = LeafOp("w", (8, 4), "matmul", fan_in=(1,), out=(0,))
        >>> lo.to_view(jnp.arange(32.).reshape(8, 4)).shape
        (4, 8)
        """
        x = jnp.asarray(x)
        if tuple(x.shape) != self.shape:
            raise ValueError(f"jaxprune: '{self.path}' has shape {self.shape}, got {tuple(x.shape)}")
        return jnp.transpose(x, self.perm).reshape(self.view_shape)

    def from_view(self, v: Any) -> jax.Array:
        """Inverse of :meth:`to_view`."""
        t_shape = tuple(self.shape[i] for i in self.perm)
        return jnp.transpose(jnp.asarray(v).reshape(t_shape), np.argsort(self.perm))


@dataclasses.dataclass(frozen=True)
class OperatorMap(Mapping):
    """``{path: LeafOp}`` for every array leaf of the traced params (hashable, static under ``jit``).

    >>> om = operator_map(lambda p, x: x @ p["k"], {"k": jnp.ones((3, 2))}, jnp.ones((1, 3)))
    >>> list(om), om.weights()
    (['k'], ['k'])
    """

    leaves: tuple[LeafOp, ...]

    def __getitem__(self, path: str) -> LeafOp:
        for lo in self.leaves:
            if lo.path == path:
                return lo
        raise KeyError(f"jaxprune: the operator map has no leaf '{path}'")

    def __iter__(self) -> Iterator[str]:
        return iter(lo.path for lo in self.leaves)

    def __len__(self) -> int:
        return len(self.leaves)

    def __hash__(self) -> int:
        return hash(self.leaves)

    def weights(self) -> list[str]:
        """Paths of matmul and conv weights (tied embeddings excluded)."""
        return [lo.path for lo in self.leaves if lo.is_weight]

    def describe(self) -> str:
        """A table: path, shape, role, fan-in/out axes, matrix view."""
        rows = [("path", "shape", "role", "fan-in", "out", "batch", "view")]
        for lo in self.leaves:
            rows.append((lo.path, str(lo.shape), lo.role, str(lo.fan_in), str(lo.out),
                         str(lo.batch), "x".join(map(str, lo.view_shape)) if lo.has_view else ""))
        w = [max(len(r[i]) for r in rows) for i in range(7)]
        return "\n".join("  ".join(c.ljust(n) for c, n in zip(r, w, strict=True)).rstrip()
                         for r in rows)


def _leaf_op(path: str, shape: tuple[int, ...], uses: list[Use], spatial: tuple[int, ...]) -> LeafOp:
    mm = [u for u in uses if u.kind in ("matmul", "conv")]
    geo = {(u.fan_in, u.out, u.batch) for u in mm}
    if len(geo) > 1:
        a, b = sorted(geo)[:2]
        ua = next(u for u in mm if (u.fan_in, u.out, u.batch) == a)
        ub = next(u for u in mm if (u.fan_in, u.out, u.batch) == b)
        raise OperatorMapError(
            f"jaxprune: parameter '{path}' (shape {shape}) is used by two matmuls in incompatible "
            f"ways: {ua.describe()} and {ub.describe()}; prune it with an explicit pattern axis or "
            "exclude it with a filter"
        )
    kinds = {u.kind for u in uses}
    if "gather" in kinds:
        role = "embedding"
    elif "conv" in kinds:
        role = "conv"
    elif "matmul" in kinds:
        role = "matmul"
    elif kinds and kinds <= {"scale", "bias"}:
        role = "bias" if kinds == {"bias"} else "scale"
    elif kinds:
        role = "other"
    else:
        role = "unused"
    uniq = tuple(dict.fromkeys(uses))
    if mm:
        fan, out, bat = next(iter(geo))
        return LeafOp(path, shape, role, fan, out, bat, uniq, spatial)
    return LeafOp(path, shape, role, uses=uniq)


def _sources(v: Any) -> list[str]:
    return list(v.axes) if isinstance(v, Prov) else []


def _as_fn(fn: Any) -> Callable[..., Any]:
    if hasattr(fn, "apply") and hasattr(fn, "init") and not callable(getattr(fn, "split", None)):
        module = fn
        return lambda params, *a: module.apply({"params": params}, *a)
    if not callable(fn):
        raise TypeError(f"jaxprune: operator_map needs a function or a linen Module, got {type(fn)}")
    return fn


def operator_map(fn: Any, params: PyTree, *args: Any) -> OperatorMap:
    """Trace ``fn(params, *args)`` and map every parameter leaf to how it is used.

    Args:
      fn: any JAX function of ``(params, *args)``; a linen ``Module`` is applied as
        ``module.apply({"params": params}, *args)``. For nnx use
        ``lambda s, x: nnx.merge(graphdef, s)(x)`` with ``graphdef, s = nnx.split(model)``.
      params: the pytree whose leaves are mapped (its paths name the result).
      *args: example inputs (only shapes and dtypes matter; nothing is computed).

    Raises :class:`OperatorMapError` if a leaf feeds matmuls in incompatible ways.

    >>> om = operator_map(lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["q"]),
    ...                   {"q": jnp.ones((16, 4, 8))}, jnp.ones((1, 3, 16)))
    >>> om["q"].fan_in, om["q"].out, om["q"].view_shape
    ((0,), (1, 2), (16, 32))
    """
    closed, an, leaves = trace(fn, params, *args)
    return _build(an, leaves)


def _build(an: _Analysis, leaves: list[tuple[str, Any]]) -> OperatorMap:
    spatial = an.spatial
    return OperatorMap(tuple(
        _leaf_op(p, tuple(int(d) for d in np.shape(x)), an.uses[p], spatial.get(p, ()))
        for p, x in leaves
    ))


def trace(fn: Any, params: PyTree, *args: Any) -> tuple[Any, Any, list[tuple[str, Any]]]:
    """``(closed_jaxpr, analysis, [(path, leaf)])``: the jaxpr of ``fn(params_leaves, *args)`` (its
    first inputs are the flattened param leaves) and the operator analysis of it; its ``taps`` say,
    per ``id(eqn)``, which operand of each matmul/conv equation is which parameter (what op-level
    calibration observes). Works on abstract or concrete inputs, inside ``jit`` too.

    >>> closed, an, _ = trace(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((1, 3)))
    >>> list(an.taps.values())
    [[(1, 'w', False)]]
    """
    fn = _as_fn(fn)
    leaves = [(p, x) for p, x in leaves_with_paths(params) if x is not None]
    flat, treedef = jax.tree_util.tree_flatten(params)
    if len(flat) != len(leaves):
        raise ValueError("jaxprune: operator_map needs a params tree of arrays (found non-array leaves)")
    closed = jax.make_jaxpr(lambda leaves_, *a: fn(treedef.unflatten(leaves_), *a))(flat, *args)
    an = _Analysis([p for p, _ in leaves])
    ins: list[Any] = []
    for p, x in leaves:
        nd = np.ndim(x)
        ins.append(Prov({p: tuple((i,) if np.shape(x)[i] > 1 else () for i in range(nd))}))
    ins += [None] * (len(closed.jaxpr.invars) - len(flat))
    walker = wk.Walker(_rules(an), data=lambda shape: CONST, sources=_sources, default=_default(an),
                       who="jaxprune.operator_map")
    walker.run(closed.jaxpr, ins, closed.consts)
    return closed, an, leaves
