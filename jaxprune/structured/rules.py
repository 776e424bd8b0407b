"""Per-primitive rules of the dependency-group analysis: input axis labels -> output axis labels.

Each rule is ``rule(eqn, ins) -> outs`` for :class:`jaxprune.core.walker.Walker`, over the
label domain of :mod:`jaxprune.structured.labels` (a value is a list with one label per array axis).
One small function per primitive or family: unary, n-ary elementwise, reductions, cumulative ops,
windowed reductions, ``broadcast_in_dim``, ``reshape``, ``squeeze``, ``expand_dims``, ``transpose``,
``rev``, ``dot_general``, ``conv_general_dilated``, ``slice``, ``split``, ``concatenate``, ``pad``,
``dynamic_slice``, ``dynamic_update_slice``, ``gather``, ``sort``, ``top_k`` and the control flow
``scan``, ``while`` and ``cond`` (bodies walked; a loop carry must keep consistent labels).

>>> sorted(RULES)[:4]
['abs', 'acos', 'acosh', 'add']
"""

from __future__ import annotations

from collections.abc import Callable

from jaxprune.core.walker import Eqn, Rule
from jaxprune.structured.labels import (
    Item,
    _align,
    _corefine,
    _find,
    _fix_items,
    _leaf_items,
    _pair_union,
    _regroup,
    _rigid,
    _sub_range,
)

__all__ = ["RULES", "barrier", "fix_indices", "guard_default"]

Label = list[list[Item]]

UNARY = frozenset({
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "abs", "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "not", "real", "imag", "conj", "convert_element_type",
    "reduce_precision", "copy", "copy_p", "stop_gradient", "sharding_constraint", "pvary",
    "population_count", "clz", "bessel_i0e", "bessel_i1e", "mesh_cast", "reshard",
})
NARY = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter", "eq",
    "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "select_n", "clamp", "igamma", "igammac", "random_gamma_grad",
    "polygamma", "zeta",
})
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or", "reduce_xor", "argmax", "argmin"})
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
                    "select_and_gather_add"})


def _copy(lab: Label) -> Label:
    return [list(ax) for ax in lab]


def barrier(e: Eqn, ins: list[Label]) -> list[Label]:
    """An opaque op: every parameter axis flowing in is kept whole; outputs are data."""
    for lab in ins:
        for ax in lab:
            _fix_items(ax)
    return [_rigid(s) for s in e.out_shapes]


def _unary(e: Eqn, ins: list[Label]) -> list[Label]:
    return [_copy(ins[0]) for _ in e.out_shapes]


def _nary(e: Eqn, ins: list[Label]) -> list[Label]:
    (oshape,) = e.out_shapes
    for s in e.in_shapes:
        if 0 < len(s) != len(oshape):
            raise e.error(ins, "operands of different rank")
    full = [(lab, s) for lab, s in zip(ins, e.in_shapes, strict=True) if len(s) == len(oshape)]
    return [[
        _align([lab[i] if s[i] == d else [("w", d)] for lab, s in full] or [[("w", d)]], d)
        for i, d in enumerate(oshape)
    ]]


def _identity(e: Eqn, ins: list[Label]) -> list[Label]:
    return [list(lab) for lab in ins]


def _broadcast_in_dim(e: Eqn, ins: list[Label]) -> list[Label]:
    (oshape,) = e.out_shapes
    out: Label = [[("w", d)] if d > 1 else [] for d in oshape]
    for i, j in enumerate(e.params["broadcast_dimensions"]):
        if e.in_shapes[0][i] == oshape[j]:
            out[j] = list(ins[0][i])
    return [out]


def _reshape(e: Eqn, ins: list[Label]) -> list[Label]:
    if e.params.get("dimensions") is not None:
        raise e.error(ins, "reshape with dimensions")
    (oshape,) = e.out_shapes
    flat = [it for ax in ins[0] for it in ax]
    parts = _regroup(flat, oshape)
    if parts is None:
        _fix_items(_leaf_items(flat))
        return [_rigid(oshape)]
    return [parts]


def _squeeze(e: Eqn, ins: list[Label]) -> list[Label]:
    dims = {d % len(e.in_shapes[0]) for d in e.params["dimensions"]}
    return [[ax for i, ax in enumerate(ins[0]) if i not in dims]]


def _expand_dims(e: Eqn, ins: list[Label]) -> list[Label]:
    lab = list(ins[0])
    for d in sorted(d % len(e.out_shapes[0]) for d in e.params["dimensions"]):
        lab.insert(d, [])
    return [lab]


def _transpose(e: Eqn, ins: list[Label]) -> list[Label]:
    return [[ins[0][i] for i in e.params["permutation"]]]


def _rev(e: Eqn, ins: list[Label]) -> list[Label]:
    lab = _copy(ins[0])
    for d in e.params["dimensions"]:
        _fix_items(lab[d])
        lab[d] = [("r", e.in_shapes[0][d])]
    return [lab]


def _reduce(e: Eqn, ins: list[Label]) -> list[Label]:
    axes = set(e.params["axes"])
    if e.name in ("argmax", "argmin") and len(axes) == 1:
        (a,) = axes
        node = _index_node(ins[0][a])
        if node is not None:  # top-1 routing: the index refers to the axis (see _Indexed)
            _fix_items(ins[0][a], inexact_only=True)
            return [_tagged([ax for i, ax in enumerate(ins[0]) if i != a], node)]
    for a in axes:  # a reduced parameter axis changes the statistic: inexact (argmax: fixed)
        _fix_items(ins[0][a], inexact_only=e.name not in ("argmax", "argmin"))
    return [[ax for i, ax in enumerate(ins[0]) if i not in axes]]


def _cumulative(e: Eqn, ins: list[Label]) -> list[Label]:
    lab, a = _copy(ins[0]), e.params["axis"]
    _fix_items(lab[a])
    lab[a] = _rigid([e.in_shapes[0][a]])[0]
    return [lab]


def _window(e: Eqn, ins: list[Label]) -> list[Label]:
    lab = _copy(ins[0])
    oshape = e.out_shapes[0]
    wd = e.params.get("window_dimensions", (1,) * len(oshape))
    st = e.params.get("window_strides", (1,) * len(oshape))
    pad = e.params.get("padding", ((0, 0),) * len(oshape))
    for i in range(len(oshape)):
        if wd[i] != 1 or st[i] != 1 or tuple(pad[i]) != (0, 0):
            _fix_items(lab[i])
            lab[i] = _rigid([oshape[i]])[0]
    return [lab for _ in e.out_shapes]


def _contract(a: list[Item], b: list[Item]) -> None:
    """Two axes contracted against each other (dot_general contraction, conv input features)."""
    if _corefine(a, b, _pair_union) is None:
        _fix_items(_leaf_items(a))
        _fix_items(_leaf_items(b))


def _dot_general(e: Eqn, ins: list[Label]) -> list[Label]:
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    lhs, rhs = ins[0], ins[1]
    for a, b in zip(lc, rc, strict=True):
        la, lb_ = lhs[a], rhs[b]
        has_n = [any(it[0] == "n" for it in x) for x in (la, lb_)]
        if has_n[0] != has_n[1]:
            # a parameter axis contracted against a broadcast is a plain sum: inexact; against
            # data it cannot be sliced: fixed (by _pair_union)
            if all(it[0] == "w" for it in (lb_ if has_n[0] else la)):
                _fix_items(_leaf_items(la if has_n[0] else lb_), inexact_only=True)
        _contract(la, lb_)
    out = [_align([lhs[a], rhs[b]], e.in_shapes[0][a]) for a, b in zip(lb, rb, strict=True)]
    out += [list(lhs[i]) for i in range(len(lhs)) if i not in lc and i not in lb]
    out += [list(rhs[i]) for i in range(len(rhs)) if i not in rc and i not in rb]
    return [out]


def _conv(e: Eqn, ins: list[Label]) -> list[Label]:
    p, oshape = e.params, e.out_shapes[0]
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    lhs, rhs = ins[0], ins[1]
    if p.get("batch_group_count", 1) != 1:
        raise e.error(ins, "batch_group_count > 1")
    for d in lhs_spec[2:]:
        _fix_items(lhs[d])
    for d in rhs_spec[2:]:
        _fix_items(rhs[d])
    g = p.get("feature_group_count", 1)
    lf, ri, ro = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]]
    out_feat = list(ro)
    if g == 1:
        _contract(lf, ri)
    else:
        cin, cout = e.in_shapes[0][lhs_spec[1]], e.in_shapes[1][rhs_spec[0]]
        lp, op = _regroup(lf, [g, cin // g]), _regroup(ro, [g, cout // g])
        if lp is None or op is None:
            raise e.error(ins, "feature groups")
        _align([lp[0], op[0]], g)
        _contract(lp[1], ri)
        out_feat = list(op[0]) + list(op[1])
    out: Label = [[] for _ in oshape]
    out[out_spec[0]] = list(lhs[lhs_spec[0]])
    out[out_spec[1]] = out_feat
    for d in out_spec[2:]:
        out[d] = _rigid([oshape[d]])[0]
    return [out]


def _slice(e: Eqn, ins: list[Label]) -> list[Label]:
    p, shape = e.params, e.in_shapes[0]
    strides = p.get("strides") or (1,) * len(shape)
    lab = []
    for ax, n, a, b, st in zip(ins[0], shape, p["start_indices"], p["limit_indices"], strides,
                               strict=True):
        if st != 1:
            _fix_items(ax)
            lab.append(_rigid([len(range(a, b, st))])[0])
        else:
            lab.append(_sub_range(ax, n, a, b))
    return [lab]


def _split(e: Eqn, ins: list[Label]) -> list[Label]:
    a = e.params["axis"] % len(e.in_shapes[0])
    n = e.in_shapes[0][a]
    outs, start = [], 0
    for s in e.params["sizes"]:
        lab = _copy(ins[0])
        lab[a] = _sub_range(ins[0][a], n, start, start + int(s))
        start += int(s)
        outs.append(lab)
    return outs


def _concatenate(e: Eqn, ins: list[Label]) -> list[Label]:
    d = e.params["dimension"]
    (oshape,) = e.out_shapes
    lab = [_align([x[i] for x in ins], oshape[i]) if i != d else [] for i in range(len(oshape))]
    keys = [tuple(id(_find(it[1])) if it[0] == "n" else it for it in _leaf_items(x[d])) for x in ins]
    if all(k == keys[0] for k in keys) and any(it[0] == "n" for it in ins[0][d]):
        lab[d] = [("r", len(ins))] + list(_leaf_items(ins[0][d]))  # copies of one axis: a new factor
    else:
        for x in ins:
            _fix_items(_leaf_items(x[d]))
        lab[d] = _rigid([oshape[d]])[0]
    return [lab]


def _pad(e: Eqn, ins: list[Label]) -> list[Label]:
    lab = _copy(ins[0])
    for i, cfg in enumerate(e.params["padding_config"]):
        if tuple(cfg) != (0, 0, 0):
            _fix_items(lab[i])
            lab[i] = _rigid([e.out_shapes[0][i]])[0]
    return [lab]


def _dynamic_slice(e: Eqn, ins: list[Label]) -> list[Label]:
    lab = []
    for ax, n, s in zip(ins[0], e.in_shapes[0], e.params["slice_sizes"], strict=True):
        if n == s:
            lab.append(list(ax))
        else:
            _fix_items(ax)
            lab.append(_rigid([s])[0])
    return [lab]


def _dynamic_update_slice(e: Eqn, ins: list[Label]) -> list[Label]:
    lab = []
    for i, (n, m) in enumerate(zip(e.in_shapes[0], e.in_shapes[1], strict=True)):
        if n == m:
            lab.append(_align([ins[0][i], ins[1][i]], n))
        else:
            _fix_items(ins[0][i])
            _fix_items(ins[1][i])
            lab.append(_rigid([n])[0])
    for idx in ins[2:]:
        for ax in idx:
            _fix_items(ax)
    return [lab]


def _gather(e: Eqn, ins: list[Label]) -> list[Label]:
    p, oshape = e.params, e.out_shapes[0]
    dn = p["dimension_numbers"]
    op_lab, op_shape = ins[0], e.in_shapes[0]
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
    return [out]


def _sort(e: Eqn, ins: list[Label]) -> list[Label]:
    d = e.params.get("dimension", len(e.in_shapes[0]) - 1)
    for lab in ins:
        _fix_items(lab[d])
    lab = [_align([x[i] for x in ins], n) if i != d else _rigid([n])[0]
           for i, n in enumerate(e.in_shapes[0])]
    return [lab for _ in e.out_shapes]


def _top_k(e: Eqn, ins: list[Label]) -> list[Label]:
    d = e.params.get("axis", -1) % len(e.in_shapes[0])
    node = _index_node(ins[0][d])
    # choosing among a parameter axis' units (an MoE router's experts): removing units changes the
    # choice (inexact); the indices refer to that axis (see _Indexed), so it is not fixed here
    _fix_items(ins[0][d], inexact_only=node is not None)
    lab = _copy(ins[0])
    lab[d] = _rigid([e.out_shapes[0][d]])[0]
    vals, idx = _copy(lab), _copy(lab)
    return [vals, idx if node is None else _tagged(idx, node)]


# -- control flow --------------------------------------------------------------------------------


def _label_key(lab: Label) -> tuple:
    return tuple(tuple((it[0], id(_find(it[1]))) if it[0] == "n" else it
                       for it in _leaf_items(ax)) for ax in lab)


def _loop_carry(e: Eqn, carry: list[Label], body: Callable[[list[Label]], list[Label]],
                shapes: list[tuple[int, ...]]) -> list[Label]:
    """Walk a loop body until its carry labels are consistent: the labels that come out of an
    iteration are aligned with those that went in; a second pass checks they no longer change."""
    for _ in range(3):
        out = body(carry)
        merged = [[_align([a[i], b[i]], n) for i, n in enumerate(s)]
                  for a, b, s in zip(carry, out, shapes, strict=True)]
        if [_label_key(x) for x in merged] == [_label_key(x) for x in carry]:
            return merged
        carry = merged
    raise e.error(carry, "the loop carry's axis labels do not reach a fixed point; declare the "
                         "groups explicitly")


def _scan(e: Eqn, ins: list[Label]) -> list[Label]:
    p = e.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    for x in xs:  # the scanned axis (e.g. stacked layers) is not a unit axis
        _fix_items(x[0])
    xs_in = [list(x[1:]) for x in xs]
    ys: list[Label] = []

    def body(c: list[Label]) -> list[Label]:
        outs = e.run(p["jaxpr"], consts + c + xs_in)
        ys[:] = outs[nk:]
        return outs[:nk]

    carry = _loop_carry(e, carry, body, list(e.in_shapes[nc:nc + nk]))
    return carry + [_rigid([length]) + list(y) for y in ys]


def _while(e: Eqn, ins: list[Label]) -> list[Label]:
    p = e.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]

    def body(c: list[Label]) -> list[Label]:
        e.run(p["cond_jaxpr"], cconsts + c)
        return e.run(p["body_jaxpr"], bconsts + c)

    return _loop_carry(e, carry, body, list(e.in_shapes[cn + bn:]))


def _cond(e: Eqn, ins: list[Label]) -> list[Label]:
    for ax in ins[0]:
        _fix_items(ax)
    outs = [e.run(br, ins[1:]) for br in e.params["branches"]]
    return [[_align([o[k][i] for o in outs], n) for i, n in enumerate(s)]
            for k, s in enumerate(e.out_shapes)]


def _table() -> dict[str, Rule]:
    t: dict[str, Rule] = {}
    t.update(dict.fromkeys(UNARY, _unary))
    t.update(dict.fromkeys(NARY, _nary))
    t.update(dict.fromkeys(REDUCE, _reduce))
    t.update(dict.fromkeys(CUMULATIVE, _cumulative))
    t.update(dict.fromkeys(WINDOW, _window))
    t.update({
        "optimization_barrier": _identity, "broadcast_in_dim": _broadcast_in_dim,
        "reshape": _reshape, "squeeze": _squeeze, "expand_dims": _expand_dims,
        "transpose": _transpose, "rev": _rev, "dot_general": _dot_general,
        "conv_general_dilated": _conv, "slice": _slice, "split": _split,
        "concatenate": _concatenate, "pad": _pad, "dynamic_slice": _dynamic_slice,
        "dynamic_update_slice": _dynamic_update_slice, "gather": _gather, "sort": _sort,
        "top_k": _top_k, "scan": _scan, "while": _while, "cond": _cond,
    })
    t["iota"] = _iota
    return {name: _guard(name, rule) for name, rule in t.items()}


# -- index values: routing (top-k / argmax indices turned back into a one-hot over the axis) -------


class _Indexed(list):
    """A label whose array *values* are positions along one parameter axis (``node``): the indices
    of ``top_k`` / ``argmax`` over that axis, e.g. an MoE router's chosen experts. Layout ops keep
    the tag; ``eq`` against an ``iota`` (a one-hot) gives back an axis carrying ``node`` (so the
    experts' batch axis meets the router's output axis); any other use fixes the axis, since the
    index values would change meaning when units are removed."""

    __slots__ = ("node",)


class _Iota(list):
    """The label of ``iota`` (data), remembering which axis enumerates positions."""

    __slots__ = ("dim",)


def _tagged(lab: Label, node: object) -> Label:
    out = _Indexed(lab)
    out.node = node
    return out


def _index_node(ax: list[Item]) -> object | None:
    items = _leaf_items(ax)
    return items[0][1] if len(items) == 1 and items[0][0] == "n" else None


def _iota(e: Eqn, ins: list[Label]) -> list[Label]:
    out = _Iota(_rigid(e.out_shapes[0]))
    out.dim = e.params["dimension"]
    return [out]


def fix_indices(labels: list[Label]) -> None:
    """Index values that leave the traced function: their axis must keep its size."""
    for lab in labels:
        if isinstance(lab, _Indexed):
            _fix_items([("n", lab.node)])


_KEEP_INDEX = frozenset({"broadcast_in_dim", "convert_element_type", "copy", "copy_p", "reshape",
                         "squeeze", "expand_dims", "stop_gradient", "optimization_barrier"})


def _one_hot(e: Eqn, ins: list[Label]) -> list[Label]:
    out = _nary(e, ins)
    ii = 0 if isinstance(ins[0], _Indexed) else 1
    idx, other = ins[ii], ins[1 - ii]
    if isinstance(other, _Iota) and not isinstance(other, _Indexed):
        i, n = other.dim, e.out_shapes[0][other.dim]
        if e.in_shapes[ii][i] == 1 and _find(idx.node).size == n and not _find(idx.node).fixed:
            out[0][i] = [("n", idx.node)]
            return out
    _fix_items([("n", idx.node)])
    return out


def _guard(name: str, rule: Rule) -> Rule:
    """Wrap ``rule`` so index-valued inputs (:class:`_Indexed`) are followed or their axis fixed."""

    def run(e: Eqn, ins: list[Label]) -> list[Label]:
        tagged = [x for x in ins if isinstance(x, _Indexed)]
        if not tagged:
            return rule(e, ins)
        if name in _KEEP_INDEX and len(ins) == 1:
            out = rule(e, ins)
            return [_tagged(out[0], tagged[0].node), *out[1:]]
        if name in ("eq", "ne") and len(ins) == 2 and len(tagged) == 1:
            return _one_hot(e, ins)
        for x in tagged:
            _fix_items([("n", x.node)])
        return rule(e, ins)

    return run


def guard_default(rule: Rule) -> Rule:
    """The walker's default rule, guarded like every table rule (unknown ops fix index axes)."""
    return _guard("<default>", rule)


#: ``{primitive name: rule}`` of the dependency-group analysis.
RULES: dict[str, Rule] = _table()
