"""Dependency groups: which parameter axes must shrink together, discovered by tracing the jaxpr.

A :class:`Group` is a set of parameter axes (or *factors* of axes) that index the same structural
unit: an MLP hidden unit (a column of one kernel, the bias entry, a row of the next kernel), a conv
channel (conv output channel, BatchNorm scale/bias/mean/var, the next conv's input channel, the
matching rows of a dense layer after a flatten), an attention head (q/k/v output features and o
input features of that head; with GQA a kv head carries its query heads), a GLU unit (gate and up
columns, down row).

:func:`discover_groups` traces ``fn(variables, *args)`` with :func:`jax.make_jaxpr` and propagates,
for every axis of every intermediate array, *which parameter axis it derives from*. Axes that meet
(in an elementwise op, a contraction, a batch dimension of ``dot_general``) are unioned. Reshapes
split or merge axes into *factors* (``(heads * head_dim)`` → ``heads``, ``head_dim``), so a group can
own one factor of an axis: unit ``u`` of the group is every index whose digit at that factor is ``u``.
Parameter axes that reach the model output, meet data (inputs, constants) or are sliced / rolled /
gathered are *fixed* (not prunable). Axes that are reduced over (``mean`` in a LayerNorm, ``softmax``)
are still grouped but marked ``exact=False``: removing them changes the normalisation statistics,
so a slim model would differ from the masked one.

An op the tracer does not understand raises :class:`TraceError` naming the op and the parameters
that flow into it; :func:`declare_groups` is the fallback.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
    ...           "b": {"kernel": jnp.ones((8, 3))}}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
    >>> [g.describe() for g in discover_groups(fn, params, jnp.ones((2, 4)))]
    ['a/kernel[1] (8 units): a/bias[0], a/kernel[1], b/kernel[0]']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jaxprune.core.masks import PyTree, leaves_with_paths

__all__ = [
    "Member",
    "Group",
    "TraceError",
    "discover_groups",
    "declare_groups",
    "param_shapes",
]


class TraceError(ValueError):
    """The dependency tracer met an op it cannot reason about on a parameter-derived array."""


# ------------------------------------------------------------------------------------------------
# Public data types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One parameter axis (or one factor of it) belonging to a group.

    The axis of length ``prod(sizes)`` is read as a row-major multi-index over ``sizes``; the group's
    unit ``u`` owns every index whose digit at position ``pos`` equals ``u``.

    >>> m = Member("attn/q/kernel", 1, (2, 4), 0)   # 2 heads of dim 4 packed in one axis
    >>> m.indices(1).tolist()
    [4, 5, 6, 7]
    """

    path: str
    axis: int
    sizes: tuple[int, ...]
    pos: int = 0

    @property
    def units(self) -> int:
        """Number of units (``sizes[pos]``)."""
        return self.sizes[self.pos]

    def unit_of_index(self) -> np.ndarray:
        """For each index along the axis, the unit it belongs to.

        >>> Member("w", 0, (2, 3), 1).unit_of_index().tolist()
        [0, 1, 2, 0, 1, 2]
        """
        n = math.prod(self.sizes)
        inner = math.prod(self.sizes[self.pos + 1:])
        return (np.arange(n) // inner) % self.sizes[self.pos]

    def indices(self, unit: int) -> np.ndarray:
        """Indices along the axis owned by ``unit``."""
        return np.nonzero(self.unit_of_index() == unit)[0]


@dataclass(frozen=True)
class Group:
    """Parameter axes that shrink together; ``size`` units, each removable on its own.

    ``exact`` is False when the group's axis is reduced over inside the model (norm statistics,
    softmax): slimming it is allowed but the slim model is not numerically the masked model.

    >>> g = Group("h", 8, (Member("a/kernel", 1, (8,)), Member("b/kernel", 0, (8,))))
    >>> g.paths()
    ('a/kernel', 'b/kernel')
    """

    name: str
    size: int
    members: tuple[Member, ...]
    exact: bool = True
    kind: str = field(default="", compare=False)

    def paths(self) -> tuple[str, ...]:
        """Sorted unique parameter paths touched by the group."""
        return tuple(sorted({m.path for m in self.members}))

    def key(self) -> frozenset[tuple[str, int, tuple[int, ...], int]]:
        """Hashable identity (member set), handy to compare with expected groups."""
        return frozenset((m.path, m.axis, m.sizes, m.pos) for m in self.members)

    def simple_key(self) -> frozenset[tuple[str, int]]:
        """``{(path, axis)}`` ignoring factorisation."""
        return frozenset((m.path, m.axis) for m in self.members)

    def describe(self) -> str:
        """One-line human-readable summary."""
        mem = ", ".join(
            f"{m.path}[{m.axis}]" + (f"{{{m.pos} of {m.sizes}}}" if len(m.sizes) > 1 else "")
            for m in sorted(self.members, key=lambda m: (m.path, m.axis, m.pos))
        )
        flag = "" if self.exact else " (inexact)"
        return f"{self.name} ({self.size} units){flag}: {mem}"


def param_shapes(params: PyTree) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` for every array leaf.

    >>> import jax.numpy as jnp
    >>> param_shapes({"a": jnp.ones((2, 3))})
    {'a': (2, 3)}
    """
    return {p: tuple(x.shape) for p, x in leaves_with_paths(params) if hasattr(x, "shape")}


def declare_groups(
    spec: Sequence[Sequence[tuple[str, int] | tuple[str, int, tuple[int, ...], int]]],
    params: PyTree,
    names: Sequence[str] | None = None,
) -> list[Group]:
    """Explicit group declarations (fallback when tracing is not possible).

    Each group is a list of ``(path, axis)`` or ``(path, axis, sizes, pos)`` entries; shapes are
    checked against ``params``.

    >>> import jax.numpy as jnp
    >>> p = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
    >>> declare_groups([[("a", 1), ("b", 0)]], p)[0].size
    8
    """
    shapes = param_shapes(params)
    out = []
    for gi, entries in enumerate(spec):
        members = []
        for e in entries:
            path, axis = e[0], int(e[1])
            if path not in shapes:
                raise ValueError(
                    f"jaxprune.structured.declare_groups: group {gi}: no parameter at path "
                    f"'{path}'; known paths: {sorted(shapes)[:20]}"
                )
            shp = shapes[path]
            if not -len(shp) <= axis < len(shp):
                raise ValueError(
                    f"jaxprune.structured.declare_groups: group {gi}: axis {axis} out of range "
                    f"for '{path}' of shape {shp}"
                )
            axis %= len(shp)
            sizes, pos = (tuple(e[2]), int(e[3])) if len(e) > 2 else ((shp[axis],), 0)
            if math.prod(sizes) != shp[axis]:
                raise ValueError(
                    f"jaxprune.structured.declare_groups: group {gi}: factor sizes {sizes} do not "
                    f"multiply to the length {shp[axis]} of axis {axis} of '{path}'"
                )
            members.append(Member(path, axis, sizes, pos))
        units = {m.units for m in members}
        if len(units) != 1:
            raise ValueError(
                f"jaxprune.structured.declare_groups: group {gi} mixes unit counts {sorted(units)}"
            )
        name = names[gi] if names else f"{members[0].path}[{members[0].axis}]"
        out.append(Group(name, units.pop(), tuple(members)))
    return out


# ------------------------------------------------------------------------------------------------
# Union-find over (factors of) parameter axes
# ------------------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("parent", "size", "children", "fixed", "inexact", "origin")

    def __init__(self, size: int, origin: str):
        self.parent: _Node | None = None
        self.size = size
        self.children: list[_Node] | None = None
        self.fixed = False
        self.inexact = False
        self.origin = origin


def _find(n: _Node) -> _Node:
    root = n
    while root.parent is not None:
        root = root.parent
    while n.parent is not None:
        n.parent, n = root, n.parent
    return root


def _expand(n: _Node) -> list[_Node]:
    r = _find(n)
    if r.children is None:
        return [r]
    return [leaf for c in r.children for leaf in _expand(c)]


def _flag(n: _Node, fixed: bool = False, inexact: bool = False) -> None:
    r = _find(n)
    changed = (fixed and not r.fixed) or (inexact and not r.inexact)
    r.fixed |= fixed
    r.inexact |= inexact
    if changed and r.children:
        for c in r.children:
            _flag(c, fixed, inexact)


def _split_leaf(n: _Node, sizes: Sequence[int]) -> list[_Node]:
    r = _find(n)
    assert r.children is None and math.prod(sizes) == r.size
    kids = [_Node(s, r.origin) for s in sizes]
    for k in kids:
        k.fixed, k.inexact = r.fixed, r.inexact
    r.children = kids
    return kids


# Items of an axis label: ("n", node) param-derived; ("w", size) broadcast (uniform, freely
# sliceable); ("r", size) data-derived (rigid, cannot be sliced with the params).
Item = tuple[str, Any]


def _isize(it: Item) -> int:
    return _find(it[1]).size if it[0] == "n" else it[1]


def _leaf_items(items: Iterable[Item]) -> list[Item]:
    out: list[Item] = []
    for it in items:
        if it[0] == "n":
            out.extend(("n", leaf) for leaf in _expand(it[1]))
        elif it[1] > 1:
            out.append(it)
    return [it for it in out if _isize(it) > 1]


def _split_item(it: Item, sizes: Sequence[int]) -> list[Item]:
    if it[0] == "n":
        return [("n", k) for k in _split_leaf(it[1], sizes)]
    return [(it[0], s) for s in sizes]


def _fix_items(items: Iterable[Item], inexact_only: bool = False) -> None:
    for it in items:
        if it[0] == "n":
            _flag(it[1], fixed=not inexact_only, inexact=inexact_only)


def _rigid(shape: Sequence[int]) -> list[list[Item]]:
    return [[("r", int(d))] if d > 1 else [] for d in shape]


def _union(a: _Node, b: _Node) -> None:
    ra, rb = _find(a), _find(b)
    if ra is rb:
        return
    if ra.size != rb.size:  # pragma: no cover - guarded by callers
        raise AssertionError("size mismatch in union")
    fixed, inexact = ra.fixed or rb.fixed, ra.inexact or rb.inexact
    if ra.children is None or rb.children is None:
        if ra.children is not None:
            ra, rb = rb, ra
        ra.parent = rb
        _flag(rb, fixed, inexact)
        return
    la, lb = _expand(ra), _expand(rb)
    ra.parent = rb
    _flag(rb, fixed, inexact)
    merged = _corefine([("n", x) for x in la], [("n", x) for x in lb], _pair_union)
    if merged is None:
        _flag(rb, fixed=True)


def _pair_union(a: Item, b: Item) -> Item:
    """Merge rule for two aligned items of equal size (elementwise / contraction / batch)."""
    ka, kb = a[0], b[0]
    if ka == "n" and kb == "n":
        _union(a[1], b[1])
        return a
    if ka == "n" and kb == "w":
        return a
    if ka == "w" and kb == "n":
        return b
    if ka == "n" or kb == "n":  # node meets rigid data
        _fix_items([a, b])
        return ("r", _isize(a))
    if ka == "w" and kb == "w":
        return a
    return ("r", _isize(a))


def _corefine(
    a_items: Sequence[Item], b_items: Sequence[Item], pair: Callable[[Item, Item], Item]
) -> list[Item] | None:
    """Split items of two labels of equal total size until their boundaries match; pair them."""
    a, b = list(_leaf_items(a_items)), list(_leaf_items(b_items))
    out: list[Item] = []
    while a and b:
        x, y = a.pop(0), b.pop(0)
        sx, sy = _isize(x), _isize(y)
        if sx == sy:
            out.append(pair(x, y))
        elif sx < sy:
            if sy % sx:
                return None
            y1, y2 = _split_item(y, [sx, sy // sx])
            out.append(pair(x, y1))
            b.insert(0, y2)
        else:
            if sx % sy:
                return None
            x1, x2 = _split_item(x, [sy, sx // sy])
            out.append(pair(x1, y))
            a.insert(0, x2)
    if a or b:
        return None
    return out


def _align(labels: Sequence[list[Item]], size: int) -> list[Item]:
    """Align several labels of one axis (elementwise op); on failure everything becomes fixed."""
    cur = labels[0]
    for other in labels[1:]:
        merged = _corefine(cur, other, _pair_union)
        if merged is None:
            for lab in labels:
                _fix_items(_leaf_items(lab))
            return [("r", size)] if size > 1 else []
        cur = merged
    return list(_leaf_items(cur))


def _regroup(items: Sequence[Item], sizes: Sequence[int]) -> list[list[Item]] | None:
    """Cut a flat row-major item stream into consecutive axes of the given sizes."""
    stream = list(_leaf_items(items))
    out: list[list[Item]] = []
    for s in sizes:
        need = int(s)
        cur: list[Item] = []
        while need > 1:
            if not stream:
                return None
            it = stream.pop(0)
            sz = _isize(it)
            if sz <= need:
                if need % sz:
                    return None
                cur.append(it)
                need //= sz
            else:
                if sz % need:
                    return None
                i1, i2 = _split_item(it, [need, sz // need])
                cur.append(i1)
                stream.insert(0, i2)
                need = 1
        out.append(cur)
    if stream:
        return None
    return out


def _sub_range(items: list[Item], n: int, start: int, stop: int) -> list[Item]:
    """Label of ``x[start:stop]`` along an axis of length ``n`` labelled ``items``."""
    if start == 0 and stop == n:
        return list(_leaf_items(items))
    chunk = stop - start
    if chunk > 0 and n % chunk == 0 and start % chunk == 0:
        parts = _regroup(items, [n // chunk, chunk])
        if parts is not None:
            _fix_items(parts[0])  # which chunk is taken cannot be pruned
            return parts[1]
    _fix_items(_leaf_items(items))
    return [("r", chunk)] if chunk > 1 else []


# ------------------------------------------------------------------------------------------------
# The tracer
# ------------------------------------------------------------------------------------------------

_UNARY = {
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "abs", "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "not", "real", "imag", "conj", "convert_element_type",
    "reduce_precision", "copy", "copy_p", "stop_gradient", "sharding_constraint", "pvary",
    "population_count", "clz", "bessel_i0e", "bessel_i1e", "mesh_cast", "reshard",
}
_NARY = {
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter", "eq",
    "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "select_n", "clamp", "igamma", "igammac", "random_gamma_grad",
    "polygamma", "zeta",
}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "named_call"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


class _Tracer:
    def __init__(self, origins: dict[_Node, str], opaque: frozenset[str]):
        self.origins = origins
        self.opaque = opaque

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _shape(v: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in getattr(v.aval, "shape", ()))

    def _read(self, env: dict, v: Any) -> list[list[Item]]:
        if isinstance(v, jcore.Literal):
            return _rigid(self._shape(v))
        return env[v]

    def _param_names(self, labs: Iterable[list[list[Item]]]) -> list[str]:
        names = set()
        for lab in labs:
            for ax in lab:
                for it in ax:
                    if it[0] == "n":
                        names.add(it[1].origin)
        return sorted(names)

    @staticmethod
    def _has_nodes(labs: Iterable[list[list[Item]]]) -> bool:
        return any(it[0] == "n" for lab in labs for ax in lab for it in ax)

    # -- main loop -----------------------------------------------------------------------------
    def run(self, jaxpr: Any, in_labels: list[list[list[Item]]],
            consts: Sequence[Any] = ()) -> list[list[list[Item]]]:
        env: dict[Any, list[list[Item]]] = {}
        for v in jaxpr.constvars:
            env[v] = _rigid(self._shape(v))
        for v, lab in zip(jaxpr.invars, in_labels, strict=True):
            env[v] = lab
        for eqn in jaxpr.eqns:
            ins = [self._read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, lab in zip(eqn.outvars, outs, strict=True):
                env[v] = lab
        return [self._read(env, v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[list[list[Item]]]) -> list[list[list[Item]]]:
        name = eqn.primitive.name
        p = eqn.params
        out_shapes = [self._shape(v) for v in eqn.outvars]
        in_shapes = [self._shape(v) for v in eqn.invars]

        if name in self.opaque:
            for lab in ins:
                for ax in lab:
                    _fix_items(ax)
            return [_rigid(s) for s in out_shapes]

        sub = self._subjaxpr(eqn)
        if sub is not None:
            jaxpr, consts = sub
            return self.run(jaxpr, ins, consts)

        if name in _UNARY:
            return [[list(ax) for ax in ins[0]] for _ in out_shapes]
        if name in _NARY:
            (oshape,) = out_shapes
            full = [lab for lab, s in zip(ins, in_shapes, strict=True) if len(s) == len(oshape)]
            for s in in_shapes:
                if 0 < len(s) != len(oshape):
                    raise self._error(name, ins, "operands of different rank")
            full_shapes = [s for s in in_shapes if len(s) == len(oshape)]
            return [[
                _align([lab[i] if s[i] == d else [("w", d)]
                        for lab, s in zip(full, full_shapes, strict=True)] or [[("w", d)]], d)
                for i, d in enumerate(oshape)
            ]]
        if name == "optimization_barrier":
            return [list(lab) for lab in ins]
        if name == "broadcast_in_dim":
            (oshape,) = out_shapes
            bd = p["broadcast_dimensions"]
            out: list[list[Item]] = [[("w", d)] if d > 1 else [] for d in oshape]
            for i, j in enumerate(bd):
                if in_shapes[0][i] == oshape[j]:
                    out[j] = list(ins[0][i])
            return [out]
        if name == "reshape":
            if p.get("dimensions") is not None:
                raise self._error(name, ins, "reshape with dimensions")
            (oshape,) = out_shapes
            flat = [it for ax in ins[0] for it in ax]
            parts = _regroup(flat, oshape)
            if parts is None:
                _fix_items(_leaf_items(flat))
                return [_rigid(oshape)]
            return [parts]
        if name == "squeeze":
            dims = {d % len(in_shapes[0]) for d in p["dimensions"]}
            return [[ax for i, ax in enumerate(ins[0]) if i not in dims]]
        if name == "expand_dims":
            dims = sorted(d % len(out_shapes[0]) for d in p["dimensions"])
            lab = list(ins[0])
            for d in dims:
                lab.insert(d, [])
            return [lab]
        if name == "transpose":
            return [[ins[0][i] for i in p["permutation"]]]
        if name == "rev":
            lab = [list(ax) for ax in ins[0]]
            for d in p["dimensions"]:
                _fix_items(lab[d])
                lab[d] = [("r", in_shapes[0][d])]
            return [lab]
        if name in _REDUCE:
            axes = set(p["axes"])
            lab = ins[0]
            for a in axes:
                _fix_items(lab[a], inexact_only=name not in ("argmax", "argmin"))
            return [[ax for i, ax in enumerate(lab) if i not in axes]]
        if name in _CUMULATIVE:
            lab = [list(ax) for ax in ins[0]]
            a = p["axis"]
            _fix_items(lab[a])
            lab[a] = _rigid([in_shapes[0][a]])[0]
            return [lab]
        if name.startswith("reduce_window") or name in ("select_and_gather_add",):
            lab = [list(ax) for ax in ins[0]]
            (oshape,) = out_shapes[:1]
            wd = p.get("window_dimensions", (1,) * len(oshape))
            st = p.get("window_strides", (1,) * len(oshape))
            pad = p.get("padding", ((0, 0),) * len(oshape))
            for i in range(len(oshape)):
                if wd[i] != 1 or st[i] != 1 or tuple(pad[i]) != (0, 0):
                    _fix_items(lab[i])
                    lab[i] = _rigid([oshape[i]])[0]
            return [lab for _ in out_shapes]
        if name == "dot_general":
            return [self._dot_general(eqn, ins, in_shapes)]
        if name == "conv_general_dilated":
            return [self._conv(eqn, ins, in_shapes, out_shapes[0])]
        if name == "slice":
            lab = []
            strides = p.get("strides") or (1,) * len(in_shapes[0])
            for ax, n, a, b, st in zip(ins[0], in_shapes[0], p["start_indices"],
                                       p["limit_indices"], strides, strict=True):
                if st != 1:
                    _fix_items(ax)
                    lab.append(_rigid([len(range(a, b, st))])[0])
                else:
                    lab.append(_sub_range(ax, n, a, b))
            return [lab]
        if name == "split":
            a = p["axis"] % len(in_shapes[0])
            n = in_shapes[0][a]
            outs, start = [], 0
            for s in p["sizes"]:
                lab = [list(ax) for ax in ins[0]]
                lab[a] = _sub_range(ins[0][a], n, start, start + int(s))
                start += int(s)
                outs.append(lab)
            return outs
        if name == "concatenate":
            d = p["dimension"]
            (oshape,) = out_shapes
            lab = [_align([x[i] for x in ins], oshape[i]) if i != d else []
                   for i in range(len(oshape))]
            keys = [tuple(id(_find(it[1])) if it[0] == "n" else it for it in _leaf_items(x[d]))
                    for x in ins]
            if all(k == keys[0] for k in keys) and any(it[0] == "n" for it in ins[0][d]):
                lab[d] = [("r", len(ins))] + list(_leaf_items(ins[0][d]))
            else:
                for x in ins:
                    _fix_items(_leaf_items(x[d]))
                lab[d] = _rigid([oshape[d]])[0]
            return [lab]
        if name == "pad":
            lab = [list(ax) for ax in ins[0]]
            for i, cfg in enumerate(p["padding_config"]):
                if tuple(cfg) != (0, 0, 0):
                    _fix_items(lab[i])
                    lab[i] = _rigid([out_shapes[0][i]])[0]
            return [lab]
        if name == "dynamic_slice":
            lab = []
            for ax, n, s in zip(ins[0], in_shapes[0], p["slice_sizes"], strict=True):
                if n == s:
                    lab.append(list(ax))
                else:
                    _fix_items(ax)
                    lab.append(_rigid([s])[0])
            return [lab]
        if name == "dynamic_update_slice":
            lab = []
            for i, (n, m) in enumerate(zip(in_shapes[0], in_shapes[1], strict=True)):
                if n == m:
                    lab.append(_align([ins[0][i], ins[1][i]], n))
                else:
                    _fix_items(ins[0][i])
                    _fix_items(ins[1][i])
                    lab.append(_rigid([n])[0])
            for lab_i in ins[2:]:
                for ax in lab_i:
                    _fix_items(ax)
            return [lab]
        if name == "gather":
            return [self._gather(eqn, ins, in_shapes, out_shapes[0])]
        if name in ("sort", "top_k"):
            d = p.get("dimension", len(in_shapes[0]) - 1)
            for lab in ins:
                _fix_items(lab[d])
            if name == "sort":
                lab = [_align([x[i] for x in ins], n) if i != d else _rigid([n])[0]
                       for i, n in enumerate(in_shapes[0])]
                return [lab for _ in out_shapes]
            lab = [list(ax) for ax in ins[0][:-1]]
            return [lab + _rigid([s[-1]]) for s in out_shapes]
        if not self._has_nodes(ins):
            return [_rigid(s) for s in out_shapes]
        raise self._error(name, ins)

    def _error(self, name: str, ins: list, why: str = "") -> TraceError:
        params = self._param_names(ins)
        return TraceError(
            f"jaxprune.structured: the dependency tracer does not understand primitive '{name}'"
            + (f" ({why})" if why else "")
            + f", which consumes arrays derived from parameter(s) {params}. Declare the groups "
            "explicitly with jaxprune.structured.declare_groups(...), or pass "
            f"opaque_ops={{'{name}'}} to discover_groups to treat it as a barrier (every parameter "
            "axis flowing into it is then kept whole)."
        )

    @staticmethod
    def _subjaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
        if eqn.primitive.name not in _CALLS:
            return None
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            j = eqn.params.get(key)
            if isinstance(j, jcore.ClosedJaxpr) and len(j.jaxpr.invars) == len(eqn.invars):
                return j.jaxpr, j.consts
            if isinstance(j, jcore.Jaxpr) and len(j.invars) == len(eqn.invars):
                return j, ()
        return None

    def _dot_general(self, eqn: Any, ins: list, in_shapes: list) -> list[list[Item]]:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins[0], ins[1]
        for a, b in zip(lc, rc, strict=True):
            la, lb_ = lhs[a], rhs[b]
            has_n = [any(it[0] == "n" for it in x) for x in (la, lb_)]
            if has_n[0] != has_n[1]:
                # a parameter axis contracted against a broadcast is a plain sum: inexact;
                # against data it cannot be sliced: fixed (handled by _pair_union).
                wild = all(it[0] == "w" for it in (lb_ if has_n[0] else la))
                if wild:
                    _fix_items(_leaf_items(la if has_n[0] else lb_), inexact_only=True)
            if _corefine(la, lb_, _pair_union) is None:
                _fix_items(_leaf_items(la))
                _fix_items(_leaf_items(lb_))
        out = [_align([lhs[a], rhs[b]], in_shapes[0][a]) for a, b in zip(lb, rb, strict=True)]
        out += [list(lhs[i]) for i in range(len(lhs)) if i not in lc and i not in lb]
        out += [list(rhs[i]) for i in range(len(rhs)) if i not in rc and i not in rb]
        return out

    def _conv(self, eqn: Any, ins: list, in_shapes: list, oshape: tuple) -> list[list[Item]]:
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        lhs, rhs = ins[0], ins[1]
        if p.get("batch_group_count", 1) != 1:
            raise self._error("conv_general_dilated", ins, "batch_group_count > 1")
        for d in lhs_spec[2:]:
            _fix_items(lhs[d])
        for d in rhs_spec[2:]:
            _fix_items(rhs[d])
        g = p.get("feature_group_count", 1)
        lf, ri, ro = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]]
        out_feat = list(ro)
        if g == 1:
            if _corefine(lf, ri, _pair_union) is None:
                _fix_items(_leaf_items(lf))
                _fix_items(_leaf_items(ri))
        else:
            cin, cout = in_shapes[0][lhs_spec[1]], in_shapes[1][rhs_spec[0]]
            lp, op = _regroup(lf, [g, cin // g]), _regroup(ro, [g, cout // g])
            if lp is None or op is None:
                raise self._error("conv_general_dilated", ins, "feature groups")
            _align([lp[0], op[0]], g)
            if _corefine(lp[1], ri, _pair_union) is None:
                _fix_items(_leaf_items(lp[1]))
                _fix_items(_leaf_items(ri))
            out_feat = list(op[0]) + list(op[1])
        out: list[list[Item]] = [[] for _ in oshape]
        out[out_spec[0]] = list(lhs[lhs_spec[0]])
        out[out_spec[1]] = out_feat
        for d in out_spec[2:]:
            out[d] = _rigid([oshape[d]])[0]
        return out

    def _gather(self, eqn: Any, ins: list, in_shapes: list, oshape: tuple) -> list[list[Item]]:
        p = eqn.params
        dn = p["dimension_numbers"]
        op_lab, op_shape = ins[0], in_shapes[0]
        for ax in ins[1]:
            _fix_items(ax)
        skip = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
        kept = [i for i in range(len(op_shape)) if i not in skip]
        for i in skip:
            _fix_items(op_lab[i])
        out = _rigid(oshape)
        for od, i in zip(dn.offset_dims, kept, strict=True):
            if p["slice_sizes"][i] == op_shape[i]:
                out[od] = list(op_lab[i])
            else:
                _fix_items(op_lab[i])
        return out


def discover_groups(
    fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    opaque_ops: Iterable[str] = (),
    include_fixed: bool = False,
    min_size: int = 2,
) -> list[Group]:
    """Trace ``fn(variables, *args)`` and return the parameter-axis groups that shrink together.

    Args:
      fn: the model's apply function, e.g. ``lambda v, x: model.apply(v, x)`` (linen, with *all*
        collections in ``variables`` so BatchNorm statistics are traced too) or
        ``lambda s, x: nnx.merge(graphdef, s)(x)`` (nnx).
      variables: the pytree whose leaves are traced (its ``path_str`` paths name the members).
      *args: example inputs (only shapes/dtypes matter).
      opaque_ops: primitive names to treat as barriers instead of raising :class:`TraceError`.
      include_fixed: also return groups that cannot be pruned (reach the output / meet data).
      min_size: drop groups with fewer units.

    Returns a list of :class:`Group`, in the flatten order of their first member.

    >>> import jax.numpy as jnp
    >>> p = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
    >>> [g.simple_key() == {("w1", 1), ("w2", 0)} for g in discover_groups(
    ...     lambda p, x: (x @ p["w1"]) @ p["w2"], p, jnp.ones((1, 3)))]
    [True]
    """
    leaves = leaves_with_paths(variables)
    flat, treedef = jax.tree_util.tree_flatten(variables)
    if len(flat) != len([x for _, x in leaves if x is not None]):
        raise ValueError("jaxprune.structured.discover_groups: variables contain None leaves")
    paths = [p for p, x in leaves if x is not None]
    closed = jax.make_jaxpr(lambda leaves_, *a: fn(treedef.unflatten(leaves_), *a))(flat, *args)
    origins: dict[_Node, str] = {}
    axis_nodes: list[list[_Node | None]] = []
    in_labels: list[list[list[Item]]] = []
    for path, x in zip(paths, flat, strict=True):
        nodes, lab = [], []
        for d in np.shape(x):
            if d > 1:
                n = _Node(int(d), path)
                nodes.append(n)
                lab.append([("n", n)])
            else:
                nodes.append(None)
                lab.append([])
        axis_nodes.append(nodes)
        in_labels.append(lab)
    n_args = len(closed.jaxpr.invars) - len(flat)
    arg_labels = [_rigid(tuple(v.aval.shape)) for v in closed.jaxpr.invars[len(flat):]]
    assert n_args == len(arg_labels)
    tracer = _Tracer(origins, frozenset(opaque_ops))
    outs = tracer.run(closed.jaxpr, in_labels + arg_labels, closed.consts)
    for lab in outs:
        for ax in lab:
            _fix_items(_leaf_items(ax))

    used = {v for e in closed.jaxpr.eqns for v in e.invars if not isinstance(v, jcore.Literal)}
    used |= {v for v in closed.jaxpr.outvars if not isinstance(v, jcore.Literal)}
    unused_paths = {p for p, v in zip(paths, closed.jaxpr.invars, strict=False) if v not in used}

    # Collect members per leaf class (parameters the model never reads are left out).
    members: dict[int, list[Member]] = {}
    roots: dict[int, _Node] = {}
    order: dict[int, int] = {}
    for li, (path, nodes) in enumerate(zip(paths, axis_nodes, strict=True)):
        for a, n in enumerate(nodes):
            if n is None or path in unused_paths:
                continue
            lvs = _expand(n)
            sizes = tuple(leaf.size for leaf in lvs)
            for pos, leaf in enumerate(lvs):
                r = _find(leaf)
                k = id(r)
                roots[k] = r
                order.setdefault(k, li * 64 + a)
                members.setdefault(k, []).append(Member(path, a, sizes, pos))
    groups = []
    for k in sorted(members, key=lambda k: order[k]):
        r = roots[k]
        if r.size < min_size or (r.fixed and not include_fixed):
            continue
        mem = tuple(sorted(set(members[k]), key=lambda m: (paths.index(m.path), m.axis, m.pos)))
        ndims = {p: np.ndim(x) for p, x in zip(paths, flat, strict=True)}
        first = next((m for m in mem if ndims[m.path] >= 2), mem[0])
        name = f"{first.path}[{first.axis}]" + (f"#{first.pos}" if len(first.sizes) > 1 else "")
        groups.append(Group(name, r.size, mem, exact=not r.inexact,
                            kind="fixed" if r.fixed else ""))
    return groups
