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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import walker as wk
from jaxprune.core.masks import PyTree, leaves_with_paths

__all__ = ["Use", "LeafOp", "OperatorMap", "operator_map", "OperatorMapError"]


class OperatorMapError(ValueError):
    """A parameter is used in a way the operator map cannot give one geometry to."""


@dataclasses.dataclass(frozen=True)
class Use:
    """One consumption of a parameter leaf: ``kind`` (``matmul``, ``conv``, ``gather``, ``scale``,
    ``bias``, ``other``), the ``primitive``, and the parameter axes that are contracted (``fan_in``,
    in contraction order), ``out`` and ``batch`` (for matmul/conv), ``groups`` (conv feature
    groups)."""

    kind: str
    primitive: str
    fan_in: tuple[int, ...] = ()
    out: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    groups: int = 1

    def describe(self) -> str:
        """One line, e.g. ``dot_general contracting axes (0,) -> outputs (1, 2)``."""
        if self.kind in ("matmul", "conv"):
            b = f", batch {self.batch}" if self.batch else ""
            return f"{self.primitive} contracting axes {self.fan_in} -> outputs {self.out}{b}"
        return f"{self.primitive} ({self.kind})"


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


# ------------------------------------------------------------------------------------------------
# Abstract values: None = data (activations), CONST = neither data nor a parameter, or a Prov.
# ------------------------------------------------------------------------------------------------

CONST = "const"


@dataclasses.dataclass
class Prov:
    """Provenance of a parameter-derived array: per leaf path, for each array axis the parameter
    axes it spans, plus the parameter axes already consumed as batch (scan over stacked layers)."""

    axes: dict[str, tuple[tuple[int, ...], ...]]
    scanned: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def ndim(self) -> int:
        return len(next(iter(self.axes.values())))

    def broadcast(self, shape: tuple[int, ...]) -> bool:
        """Some axis of length > 1 comes from no parameter axis of any leaf (a broadcast)."""
        return any(d > 1 and not any(m[i] for m in self.axes.values()) for i, d in enumerate(shape))

    def remap(self, new_axes: Callable[[tuple[tuple[int, ...], ...]], tuple]) -> Prov:
        return Prov({p: tuple(new_axes(m)) for p, m in self.axes.items()}, dict(self.scanned))


def _merge(values: Sequence[Prov]) -> Prov:
    axes: dict[str, list[set[int]]] = {}
    scanned: dict[str, tuple[int, ...]] = {}
    for v in values:
        for p, m in v.axes.items():
            cur = axes.setdefault(p, [set() for _ in m])
            for i, a in enumerate(m):
                cur[i] |= set(a)
        for p, s in v.scanned.items():
            scanned[p] = tuple(sorted(set(scanned.get(p, ())) | set(s)))
    return Prov({p: tuple(tuple(sorted(a)) for a in m) for p, m in axes.items()}, scanned)


def _regroup(in_shape: tuple[int, ...], out_shape: tuple[int, ...]
             ) -> list[tuple[list[int], list[int]]] | None:
    """Pair consecutive runs of input and output axes with equal products (a reshape)."""
    groups, i, j = [], 0, 0
    ni, nj = len(in_shape), len(out_shape)
    while i < ni or j < nj:
        gi, gj, pi, pj = [], [], 1, 1
        if i < ni:
            gi.append(i); pi *= in_shape[i]; i += 1  # noqa: E702
        if j < nj:
            gj.append(j); pj *= out_shape[j]; j += 1  # noqa: E702
        while pi != pj:
            if pi < pj and i < ni:
                gi.append(i); pi *= in_shape[i]; i += 1  # noqa: E702
            elif pj < pi and j < nj:
                gj.append(j); pj *= out_shape[j]; j += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups


class _Analysis:
    def __init__(self, paths: list[str]):
        self.uses: dict[str, list[Use]] = {p: [] for p in paths}

    def record(self, prov: Prov, kind: str, primitive: str, **kw: Any) -> None:
        for p in prov.axes:
            self.uses[p].append(Use(kind, primitive, **kw))


_UNARY = {
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "abs", "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "erf", "erfc",
    "erf_inv", "not", "real", "imag", "conj", "convert_element_type", "reduce_precision", "copy",
    "copy_p", "stop_gradient", "sharding_constraint", "pvary", "mesh_cast", "reshard",
    "optimization_barrier", "rev",
}
_NARY = {
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter",
    "select_n", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor",
}


def _rules(an: _Analysis) -> dict[str, wk.Rule]:
    R: dict[str, wk.Rule] = {}

    def unary(w, eqn, ins):
        return [ins[0] for _ in eqn.outvars]

    for n in _UNARY:
        R[n] = unary

    def nary(w, eqn, ins):
        oshape = wk.shape_of(eqn.outvars[0])
        provs = [(v, wk.shape_of(x)) for v, x in zip(ins, eqn.invars, strict=True) if isinstance(v, Prov)]
        if not provs:
            return [None if any(v is None for v in ins) else CONST]
        data = any(v is None for v in ins)
        full = [v for v, s in provs if s == oshape and not v.broadcast(oshape)]
        if data and not full:
            kind = "bias" if eqn.primitive.name in ("add", "sub", "add_any") else "scale"
            for v, _ in provs:
                an.record(v, kind, eqn.primitive.name)
            return [None]
        same_rank = [v for v, s in provs if len(s) == len(oshape)]
        return [_merge(same_rank) if same_rank else None]

    for n in _NARY:
        R[n] = nary

    def broadcast_in_dim(w, eqn, ins):
        v = ins[0]
        if not isinstance(v, Prov):
            return [v]
        oshape = wk.shape_of(eqn.outvars[0])
        dims = eqn.params["broadcast_dimensions"]

        def f(m):
            out: list[tuple[int, ...]] = [() for _ in oshape]
            for i, j in enumerate(dims):
                out[j] = m[i]
            return out

        return [v.remap(f)]

    R["broadcast_in_dim"] = broadcast_in_dim

    def reshape(w, eqn, ins):
        v = ins[0]
        if not isinstance(v, Prov):
            return [v]
        ishape, oshape = wk.shape_of(eqn.invars[0]), wk.shape_of(eqn.outvars[0])
        groups = _regroup(ishape, oshape)
        if groups is None:
            return [None]

        def f(m):
            out: list[tuple[int, ...]] = [() for _ in oshape]
            for gi, gj in groups:
                ax = tuple(sorted({a for i in gi for a in m[i]}))
                for j in gj:
                    out[j] = ax if oshape[j] > 1 else ()
            return out

        return [v.remap(f)]

    R["reshape"] = reshape

    def transpose(w, eqn, ins):
        v = ins[0]
        perm = eqn.params["permutation"]
        return [v.remap(lambda m: [m[i] for i in perm]) if isinstance(v, Prov) else v]

    R["transpose"] = transpose

    def squeeze(w, eqn, ins):
        v = ins[0]
        if not isinstance(v, Prov):
            return [v]
        nd = len(wk.shape_of(eqn.invars[0]))
        dims = {d % nd for d in eqn.params["dimensions"]}
        return [v.remap(lambda m: [a for i, a in enumerate(m) if i not in dims])]

    R["squeeze"] = squeeze

    def expand_dims(w, eqn, ins):
        v = ins[0]
        if not isinstance(v, Prov):
            return [v]
        nd = len(wk.shape_of(eqn.outvars[0]))
        dims = sorted(d % nd for d in eqn.params["dimensions"])

        def f(m):
            out = list(m)
            for d in dims:
                out.insert(d, ())
            return out

        return [v.remap(f)]

    R["expand_dims"] = expand_dims

    def keep_rank(w, eqn, ins):  # slice, dynamic_slice, pad, cumulative ops: axes stay in place
        v = ins[0]
        return [v if isinstance(v, Prov) else (None if any(x is None for x in ins) else CONST)
                for _ in eqn.outvars]

    for n in ("slice", "dynamic_slice", "pad", "cumsum", "cumprod", "cummax", "cummin", "split",
              "sort"):
        R[n] = keep_rank

    def concatenate(w, eqn, ins):
        provs = [v for v in ins if isinstance(v, Prov)]
        if not provs:
            return [None if any(v is None for v in ins) else CONST]
        return [_merge(provs)]

    R["concatenate"] = concatenate

    def stack(w, eqn, ins):
        provs = [v for v in ins if isinstance(v, Prov)]
        if not provs:
            return [None if any(v is None for v in ins) else CONST]
        ax = eqn.params["axis"] % len(wk.shape_of(eqn.outvars[0]))
        return [_merge([v.remap(lambda m: [*m[:ax], (), *m[ax:]]) for v in provs])]

    R["stack"] = stack

    def reduce(w, eqn, ins):
        v = ins[0]
        if isinstance(v, Prov):
            an.record(v, "other", eqn.primitive.name)
            return [None for _ in eqn.outvars]
        return [v for _ in eqn.outvars]

    for n in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
              "reduce_and", "reduce_or"):
        R[n] = reduce

    R["dot_general"] = lambda w, eqn, ins: _dot_general(an, eqn, ins)
    R["conv_general_dilated"] = lambda w, eqn, ins: _conv(an, eqn, ins)
    R["gather"] = lambda w, eqn, ins: _gather(an, eqn, ins)
    R["scan"] = lambda w, eqn, ins: _scan(w, eqn, ins)
    R["cond"] = lambda w, eqn, ins: _cond(w, eqn, ins)
    R["while"] = lambda w, eqn, ins: _while(w, eqn, ins)
    return R


def _axes_of(m: tuple[tuple[int, ...], ...], dims: Sequence[int]) -> tuple[int, ...]:
    out: list[int] = []
    for d in dims:
        for a in m[d]:
            if a not in out:
                out.append(a)
    return tuple(out)


def _record_matmul(an: _Analysis, prov: Prov, kind: str, prim: str, fan_dims: Sequence[int],
                   batch_dims: Sequence[int], out_dims: Sequence[int], groups: int = 1,
                   spatial_dims: Sequence[int] = ()) -> None:
    for p, m in prov.axes.items():
        fan, bat, out = _axes_of(m, fan_dims), _axes_of(m, batch_dims), _axes_of(m, out_dims)
        bat = tuple(dict.fromkeys((*prov.scanned.get(p, ()), *bat)))
        clash = (set(fan) & set(out)) | (set(fan) & set(bat)) | (set(out) & set(bat))
        if clash:
            raise OperatorMapError(
                f"jaxprune: parameter '{p}' axis {sorted(clash)} is split between the contracted, "
                f"batch and output axes of one {prim}; the operator map cannot give it a matrix view"
            )
        an.uses[p].append(Use(kind, prim, fan, out, bat, groups))
        if spatial_dims:
            an.uses[p][-1] = dataclasses.replace(an.uses[p][-1], kind="conv")
            an.spatial = getattr(an, "spatial", {})
            an.spatial[p] = _axes_of(m, spatial_dims)


def _dot_general(an: _Analysis, eqn: Any, ins: list[Any]) -> list[Any]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for v, c, b, x in ((ins[0], lc, lb, eqn.invars[0]), (ins[1], rc, rb, eqn.invars[1])):
        if isinstance(v, Prov):
            nd = len(wk.shape_of(x))
            out_dims = [i for i in range(nd) if i not in c and i not in b]
            _record_matmul(an, v, "matmul", "dot_general", c, b, out_dims)
    return [None if any(v is None for v in ins) else CONST]


def _conv(an: _Analysis, eqn: Any, ins: list[Any]) -> list[Any]:
    p = eqn.params
    dn = p["dimension_numbers"]
    rhs = ins[1]
    if isinstance(rhs, Prov):
        out_dim, in_dim, *spatial = dn.rhs_spec
        _record_matmul(an, rhs, "conv", "conv_general_dilated", [*spatial, in_dim], [], [out_dim],
                       groups=int(p.get("feature_group_count", 1)), spatial_dims=spatial)
    if isinstance(ins[0], Prov):
        an.record(ins[0], "other", "conv_general_dilated")
    return [None if any(v is None for v in ins) else CONST]


def _gather(an: _Analysis, eqn: Any, ins: list[Any]) -> list[Any]:
    op = ins[0]
    if not isinstance(op, Prov):
        return [None if any(v is None for v in ins) else CONST]
    dn = eqn.params["dimension_numbers"]
    ishape = wk.shape_of(eqn.invars[1])
    n_lookups = math.prod(ishape[:-1]) if ishape else 1
    oshape = wk.shape_of(eqn.outvars[0])
    if n_lookups == 1:  # w[i] with one index: a slice, the remaining axes keep their layout
        skip = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
        kept = [i for i in range(len(wk.shape_of(eqn.invars[0]))) if i not in skip]

        def f(m):
            out: list[tuple[int, ...]] = [() for _ in oshape]
            for od, i in zip(dn.offset_dims, kept, strict=False):
                out[od] = m[i]
            return out

        return [op.remap(f)]
    an.record(op, "gather", "gather")
    return [None]


def _scan(w: wk.Walker, eqn: Any, ins: list[Any]) -> list[Any]:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    body = p["jaxpr"]
    xs_in = []
    for v in ins[nc + ncarry:]:
        if isinstance(v, Prov):  # stacked params scanned over their leading axis
            scanned = {q: tuple(dict.fromkeys((*v.scanned.get(q, ()), *m[0])))
                       for q, m in v.axes.items()}
            xs_in.append(Prov({q: tuple(m[1:]) for q, m in v.axes.items()}, scanned))
        else:
            xs_in.append(v)
    outs = w.run(body, [*ins[:nc], *ins[nc:nc + ncarry], *xs_in])
    carry = [o if isinstance(o, Prov) else (None if (o is None or i is None) else CONST)
             for o, i in zip(outs[:ncarry], ins[nc:nc + ncarry], strict=True)]
    return [*carry, *[None if o is None or isinstance(o, Prov) else o for o in outs[ncarry:]]]


def _cond(w: wk.Walker, eqn: Any, ins: list[Any]) -> list[Any]:
    results = [w.run(br, ins[1:]) for br in eqn.params["branches"]]
    out = []
    for vals in zip(*results, strict=True):
        provs = [v for v in vals if isinstance(v, Prov)]
        out.append(_merge(provs) if provs else (None if any(v is None for v in vals) else CONST))
    return out


def _while(w: wk.Walker, eqn: Any, ins: list[Any]) -> list[Any]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    w.run(p["cond_jaxpr"], [*ins[:cn], *carry])
    w.run(p["body_jaxpr"], [*ins[cn:cn + bn], *carry])
    return list(carry)


def _default(an: _Analysis) -> wk.Rule:
    def rule(w, eqn, ins):
        provs = [v for v in ins if isinstance(v, Prov)]
        for v in provs:
            an.record(v, "other", eqn.primitive.name)
        if provs or any(v is None for v in ins):
            return [None for _ in eqn.outvars]
        return [CONST for _ in eqn.outvars]

    return rule


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
    fn = _as_fn(fn)
    leaves = [(p, x) for p, x in leaves_with_paths(params) if x is not None]
    flat, treedef = jax.tree_util.tree_flatten(params)
    if len(flat) != len(leaves):
        raise ValueError("jaxprune: operator_map needs a params tree of arrays (found non-array leaves)")
    paths = [p for p, _ in leaves]
    closed = jax.make_jaxpr(lambda leaves_, *a: fn(treedef.unflatten(leaves_), *a))(flat, *args)
    an = _Analysis(paths)
    ins: list[Any] = []
    for p, x in leaves:
        nd = np.ndim(x)
        ins.append(Prov({p: tuple((i,) if np.shape(x)[i] > 1 else () for i in range(nd))}))
    ins += [None] * (len(closed.jaxpr.invars) - len(flat))
    walker = wk.Walker(_rules(an), _default(an), literal=lambda v: CONST)
    walker.run(closed.jaxpr, ins, closed.consts)
    spatial = getattr(an, "spatial", {})
    return OperatorMap(tuple(
        _leaf_op(p, tuple(int(d) for d in np.shape(x)), an.uses[p], spatial.get(p, ()))
        for p, x in leaves
    ))
