"""The operator map's rules: per-primitive abstract interpretation of parameter provenance.

Run by the one jaxpr walker (:mod:`jaxprune.core.walker`) for :func:`jaxprune.core.opmap.trace`.
Every variable's value is ``None`` (raw input data), ``ACT`` (an activation), ``CONST`` (neither data
nor a parameter) or a :class:`Prov`: which parameter axes each of its axes comes from. Layout ops
move provenance; ``dot_general`` / ``conv_general_dilated`` / ``gather`` / elementwise ops on
activations record a :class:`~jaxprune.core.opmap.Use` of the parameters they consume, and mark the
equations op-level calibration observes (``taps``).

>>> _regroup((4, 6), (4, 2, 3))
[([0], [0]), ([1], [1, 2])]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from jaxprune.core import walker as wk


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


# ------------------------------------------------------------------------------------------------
# Abstract values: None = raw input data, ACT = an activation (data that went through a parameter
# matmul / embedding / norm), CONST = neither data nor a parameter, or a Prov (parameter-derived).
# ------------------------------------------------------------------------------------------------

CONST = "const"
ACT = "act"


def _join(values: Sequence[Any]) -> Any:
    """The non-parameter value of an op's result: activation beats raw data beats constant."""
    if any(v is ACT or isinstance(v, Prov) for v in values):
        return ACT
    if any(v is None for v in values):
        return None
    return CONST


def _is_data(v: Any) -> bool:
    return v is None or v is ACT


@dataclasses.dataclass
class Prov:
    """Provenance of a parameter-derived array: per leaf path, for each array axis the parameter
    axes it spans, plus the parameter axes already consumed as batch (scan over stacked layers)."""

    axes: dict[str, tuple[tuple[int, ...], ...]]
    scanned: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # parameter axes reversed on the way (``lax.rev``: a flipped conv kernel, ``w[::-1]``)
    flipped: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)

    def ndim(self) -> int:
        return len(next(iter(self.axes.values())))

    def broadcast(self, shape: tuple[int, ...]) -> bool:
        """Some axis of length > 1 comes from no parameter axis of any leaf (a broadcast)."""
        return any(d > 1 and not any(m[i] for m in self.axes.values()) for i, d in enumerate(shape))

    def remap(self, new_axes: Callable[[tuple[tuple[int, ...], ...]], tuple]) -> Prov:
        return Prov({p: tuple(new_axes(m)) for p, m in self.axes.items()}, dict(self.scanned),
                    dict(self.flipped))


def _merge(values: Sequence[Prov]) -> Prov:
    axes: dict[str, list[set[int]]] = {}
    scanned: dict[str, tuple[int, ...]] = {}
    flipped: dict[str, frozenset[int]] = {}
    for v in values:
        for p, f in v.flipped.items():
            flipped[p] = flipped.get(p, frozenset()) | f
        for p, m in v.axes.items():
            cur = axes.setdefault(p, [set() for _ in m])
            for i, a in enumerate(m):
                cur[i] |= set(a)
        for p, s in v.scanned.items():
            scanned[p] = tuple(sorted(set(scanned.get(p, ())) | set(s)))
    return Prov({p: tuple(tuple(sorted(a)) for a in m) for p, m in axes.items()}, scanned, flipped)


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
        # id(eqn) -> [(operand index, param path, scanned)] for every matmul/conv with a param operand
        self.taps: dict[int, list[tuple[int, str, bool]]] = {}
        # matmul/conv equations visited more than once (a jitted function shared by several
        # weights): their taps mix calls, so calibration must refuse them
        self.spatial: dict[str, tuple[int, ...]] = {}  # conv weights: their window axes
        self.seen: set[int] = set()
        self.shared: set[int] = set()
        # id(eqn) -> {path: (contraction sizes, reversed positions) or None}: a tapped weight that
        # reaches the equation through ``rev`` along its fan-in (rows come in the reversed order)
        self.flips: dict[int, dict[str, Any]] = {}

    def record(self, prov: Prov, kind: str, primitive: str, **kw: Any) -> None:
        for p in prov.axes:
            self.uses[p].append(Use(kind, primitive, **kw))


_UNARY = {
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "abs", "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "erf", "erfc",
    "erf_inv", "not", "real", "imag", "conj", "convert_element_type", "reduce_precision", "copy",
    "copy_p", "stop_gradient", "sharding_constraint", "pvary", "mesh_cast", "reshard",
    "optimization_barrier",
}
_NARY = {
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter",
    "select_n", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor",
}


def _rules(an: _Analysis) -> dict[str, wk.Rule]:
    R: dict[str, wk.Rule] = {}

    def unary(e, ins):
        eqn = e.eqn
        return [ins[0] for _ in eqn.outvars]

    for n in _UNARY:
        R[n] = unary

    def nary(e, ins):
        eqn = e.eqn
        oshape = wk.shape_of(eqn.outvars[0])
        provs = [(v, wk.shape_of(x)) for v, x in zip(ins, eqn.invars, strict=True) if isinstance(v, Prov)]
        if not provs:
            return [_join(ins)]
        full = [v for v, s in provs if s == oshape and not v.broadcast(oshape)]
        # a parameter meeting an activation, or broadcast onto raw data, acts on it (scale/bias);
        # a full-shape parameter meeting raw data or constants keeps its layout (w * mask)
        if any(v is ACT for v in ins) or (any(v is None for v in ins) and not full):
            kind = "bias" if eqn.primitive.name in ("add", "sub", "add_any") else "scale"
            for v, _ in provs:
                an.record(v, kind, eqn.primitive.name)
            return [ACT]
        same_rank = [v for v, s in provs if len(s) == len(oshape)]
        return [_merge(same_rank) if same_rank else None]

    for n in _NARY:
        R[n] = nary

    def layout(make):
        """A rule for a one-operand layout op: ``make(eqn)`` gives the remap of a provenance's
        per-axis tuples (``None``: the axes cannot be followed)."""

        def rule(e, ins):
            v = ins[0]
            if not isinstance(v, Prov):
                return [v]
            f = make(e.eqn)
            return [None] if f is None else [v.remap(f)]

        return rule

    def broadcast_in_dim(eqn):
        oshape, dims = wk.shape_of(eqn.outvars[0]), eqn.params["broadcast_dimensions"]

        def f(m):
            out: list[tuple[int, ...]] = [() for _ in oshape]
            for i, j in enumerate(dims):
                out[j] = m[i]
            return out

        return f

    def reshape(eqn):
        ishape, oshape = wk.shape_of(eqn.invars[0]), wk.shape_of(eqn.outvars[0])
        groups = _regroup(ishape, oshape)
        if groups is None:
            return None

        def f(m):
            out: list[tuple[int, ...]] = [() for _ in oshape]
            for gi, gj in groups:
                ax = tuple(sorted({a for i in gi for a in m[i]}))
                for j in gj:
                    out[j] = ax if oshape[j] > 1 else ()
            return out

        return f

    def transpose(eqn):
        perm = eqn.params["permutation"]
        return lambda m: [m[i] for i in perm]

    def squeeze(eqn):
        nd = len(wk.shape_of(eqn.invars[0]))
        dims = {d % nd for d in eqn.params["dimensions"]}
        return lambda m: [a for i, a in enumerate(m) if i not in dims]

    def expand_dims(eqn):
        nd = len(wk.shape_of(eqn.outvars[0]))
        dims = sorted(d % nd for d in eqn.params["dimensions"])

        def f(m):
            out = list(m)
            for d in dims:
                out.insert(d, ())
            return out

        return f

    for make in (broadcast_in_dim, reshape, transpose, squeeze, expand_dims):
        R[make.__name__] = layout(make)

    def rev(e, ins):  # axes stay in place, reversed: remember which parameter axes (calibration
        v = ins[0]    # maps the matmul's rows back to the parameter's order)
        if not isinstance(v, Prov):
            return [v]
        fl = {}
        for p, m in v.axes.items():
            f = set(v.flipped.get(p, ()))
            for d in e.eqn.params["dimensions"]:
                f ^= set(m[d])
            if f:
                fl[p] = frozenset(f)
        return [Prov(dict(v.axes), dict(v.scanned), fl)]

    R["rev"] = rev

    def keep_rank(e, ins):  # slice, dynamic_slice, pad, cumulative ops: axes stay in place
        eqn = e.eqn
        v = ins[0]
        return [v if isinstance(v, Prov) else _join(ins) for _ in eqn.outvars]

    for n in ("slice", "dynamic_slice", "pad", "cumsum", "cumprod", "cummax", "cummin", "split",
              "sort"):
        R[n] = keep_rank

    def concatenate(e, ins):
        provs = [v for v in ins if isinstance(v, Prov)]
        if not provs:
            return [_join(ins)]
        return [_merge(provs)]

    R["concatenate"] = concatenate

    def stack(e, ins):
        eqn = e.eqn
        provs = [v for v in ins if isinstance(v, Prov)]
        if not provs:
            return [_join(ins)]
        ax = eqn.params["axis"] % len(wk.shape_of(eqn.outvars[0]))
        return [_merge([v.remap(lambda m: [*m[:ax], (), *m[ax:]]) for v in provs])]

    R["stack"] = stack

    def reduce(e, ins):
        eqn = e.eqn
        v = ins[0]
        if isinstance(v, Prov):
            an.record(v, "other", eqn.primitive.name)
            return [ACT for _ in eqn.outvars]
        return [v for _ in eqn.outvars]

    for n in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
              "reduce_and", "reduce_or"):
        R[n] = reduce

    R["dot_general"] = lambda e, ins: _dot_general(an, e.eqn, ins)
    R["conv_general_dilated"] = lambda e, ins: _conv(an, e.eqn, ins)
    R["gather"] = lambda e, ins: _gather(an, e.eqn, ins)
    R["scan"] = lambda e, ins: _scan(e, e.eqn, ins)
    R["cond"] = lambda e, ins: _cond(e, e.eqn, ins)
    R["while"] = lambda e, ins: _while(e, e.eqn, ins)
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
            an.spatial[p] = _axes_of(m, spatial_dims)


def _tap(an: _Analysis, eqn: Any, opi: int, v: Prov, cdims: Sequence[int]) -> None:
    for p in v.axes:
        an.taps.setdefault(id(eqn), []).append((opi, p, bool(v.scanned.get(p))))
        f, m = v.flipped.get(p, frozenset()), v.axes[p]
        if f & set(_axes_of(m, cdims)):  # a reversed fan-in axis: (sizes, reversed positions) of
            shape = wk.shape_of(eqn.invars[opi])  # the contraction, None if not whole dims
            whole = all(set(m[d]) <= f or not set(m[d]) & f for d in cdims)
            an.flips.setdefault(id(eqn), {})[p] = (tuple(shape[d] for d in cdims), tuple(
                i for i, d in enumerate(cdims) if m[d] and set(m[d]) <= f)) if whole else None


def _visit(an: _Analysis, eqn: Any) -> None:
    if id(eqn) in an.seen:
        an.shared.add(id(eqn))
    an.seen.add(id(eqn))


def _dot_general(an: _Analysis, eqn: Any, ins: list[Any]) -> list[Any]:
    _visit(an, eqn)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for opi, (v, c, b, x) in enumerate(((ins[0], lc, lb, eqn.invars[0]),
                                        (ins[1], rc, rb, eqn.invars[1]))):
        if isinstance(v, Prov):
            nd = len(wk.shape_of(x))
            out_dims = [i for i in range(nd) if i not in c and i not in b]
            _record_matmul(an, v, "matmul", "dot_general", c, b, out_dims)
            if _is_data(ins[1 - opi]):  # a weight applied to data: calibration observes it here
                _tap(an, eqn, opi, v, c)
    return [_join(ins)]


def _conv(an: _Analysis, eqn: Any, ins: list[Any]) -> list[Any]:
    _visit(an, eqn)
    p = eqn.params
    dn = p["dimension_numbers"]
    rhs = ins[1]
    if isinstance(rhs, Prov):
        out_dim, in_dim, *spatial = dn.rhs_spec
        _record_matmul(an, rhs, "conv", "conv_general_dilated", [*spatial, in_dim], [], [out_dim],
                       groups=int(p.get("feature_group_count", 1)), spatial_dims=spatial)
        if _is_data(ins[0]):
            _tap(an, eqn, 1, rhs, [*spatial, in_dim])
    if isinstance(ins[0], Prov):
        an.record(ins[0], "other", "conv_general_dilated")
    return [_join(ins)]


def _gather(an: _Analysis, eqn: Any, ins: list[Any]) -> list[Any]:
    op = ins[0]
    if not isinstance(op, Prov):
        return [_join(ins)]
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
    return [ACT]


def _scan(w: wk.Eqn, eqn: Any, ins: list[Any]) -> list[Any]:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    body = p["jaxpr"]
    xs_in = []
    for v in ins[nc + ncarry:]:
        if isinstance(v, Prov):  # stacked params scanned over their leading axis
            scanned = {q: tuple(dict.fromkeys((*v.scanned.get(q, ()), *m[0])))
                       for q, m in v.axes.items()}
            xs_in.append(Prov({q: tuple(m[1:]) for q, m in v.axes.items()}, scanned,
                              dict(v.flipped)))
        else:
            xs_in.append(v)
    outs = w.run(body, [*ins[:nc], *ins[nc:nc + ncarry], *xs_in])
    carry = [o if isinstance(o, Prov) else _join([o, i])
             for o, i in zip(outs[:ncarry], ins[nc:nc + ncarry], strict=True)]
    return [*carry, *[ACT if isinstance(o, Prov) else o for o in outs[ncarry:]]]


def _cond(w: wk.Eqn, eqn: Any, ins: list[Any]) -> list[Any]:
    results = [w.run(br, ins[1:]) for br in eqn.params["branches"]]
    out = []
    for vals in zip(*results, strict=True):
        provs = [v for v in vals if isinstance(v, Prov)]
        out.append(_merge(provs) if provs else _join(vals))
    return out


def _while(w: wk.Eqn, eqn: Any, ins: list[Any]) -> list[Any]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    w.run(p["cond_jaxpr"], [*ins[:cn], *carry])
    w.run(p["body_jaxpr"], [*ins[cn:cn + bn], *carry])
    return list(carry)


def _default(an: _Analysis) -> wk.Rule:
    def rule(e, ins):
        eqn = e.eqn
        provs = [v for v in ins if isinstance(v, Prov)]
        for v in provs:
            an.record(v, "other", eqn.primitive.name)
        return [_join(ins) for _ in eqn.outvars]

    return rule
