"""An independent oracle for "the matrix a parameter is actually multiplied as".

It evaluates a function's jaxpr eagerly, equation by equation (jax's own primitives, no jaxprune
code), and records the concrete operands of every ``dot_general``. To find the operand that *is* a
given parameter, the parameter is set to distinct values (1, 2, 3, ... on kept entries, 0 on pruned
ones): the operand holding exactly those nonzero values is it, whatever reshapes and transposes
happened on the way. N:M is then checked on that operand along its contracting dims, in the order
the ``dot_general`` contracts them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat",
         "remat2", "checkpoint", "named_call"}


def _eval(jaxpr: Any, consts: list, args: list, record: list) -> list:
    assert len(consts) == len(jaxpr.constvars) and len(args) == len(jaxpr.invars)
    env: dict = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True))
    for eqn in jaxpr.eqns:
        ins = [v.val if isinstance(v, jcore.Literal) else env[v] for v in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general":
            record.append((np.asarray(ins[0]), np.asarray(ins[1]), eqn.params["dimension_numbers"]))
        if name in CALLS:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if isinstance(sub, jcore.ClosedJaxpr):
                outs = _eval(sub.jaxpr, list(sub.consts), ins, record)
            else:
                outs = _eval(sub, [], ins, record)
        elif name == "scan":
            p = eqn.params
            nc, nk = p["num_consts"], p["num_carry"]
            consts_, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
            ys = []
            for i in range(p["length"]):
                o = _eval(p["jaxpr"].jaxpr, list(p["jaxpr"].consts), [*consts_, *carry,
                                                                       *[x[i] for x in xs]], record)
                carry, y = o[:nk], o[nk:]
                ys.append(y)
            outs = [*carry, *[jnp.stack([y[j] for y in ys]) for j in range(len(ys[0]))]] if ys else carry
        elif name == "cond":
            br = eqn.params["branches"][int(ins[0])]
            outs = _eval(br.jaxpr, list(br.consts), ins[1:], record)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [v.val if isinstance(v, jcore.Literal) else env[v] for v in jaxpr.outvars]


def dot_operands(fn: Any, params: Any, *args: Any) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """``[(lhs, rhs, dimension_numbers)]`` of every ``dot_general`` evaluated by ``fn(params, *args)``."""
    flat, treedef = jax.tree_util.tree_flatten(params)
    closed = jax.make_jaxpr(lambda fl, *a: fn(treedef.unflatten(fl), *a))(flat, *args)
    record: list = []
    _eval(closed.jaxpr, list(closed.consts), [*flat, *jax.tree_util.tree_leaves(args)], record)
    return record


def matmul_views(fn: Any, params: Any, path_leaf_setter: Any, mask: np.ndarray, *args: Any
                 ) -> list[np.ndarray]:
    """The ``(rest, K)`` views (contracting dims last, in contraction order) of every dot_general
    operand that is the masked parameter; ``path_leaf_setter(params, value)`` returns params with the
    leaf replaced."""
    mask = np.asarray(mask, bool)
    value = np.zeros(mask.shape, np.float32)
    value[mask] = np.arange(1, mask.sum() + 1, dtype=np.float32)
    p = path_leaf_setter(params, jnp.asarray(value))
    want = np.sort(value[value != 0])
    views = []
    for lhs, rhs, ((lc, rc), _) in dot_operands(fn, p, *args):
        for op, c in ((lhs, lc), (rhs, rc)):
            if op.size != mask.size or not np.array_equal(np.sort(op[op != 0]), want):
                continue
            rest = [i for i in range(op.ndim) if i not in c]
            t = np.transpose(op, [*rest, *c])
            k = int(np.prod([op.shape[i] for i in c])) if c else 1
            views.append(t.reshape(-1, k))
    return views


def nm_ok(view: np.ndarray, n: int, m: int) -> bool:
    """Every ``m`` consecutive entries along the contraction (last axis) hold at most ``n`` nonzeros."""
    r, k = view.shape
    if k % m:
        return False
    return bool(((view.reshape(r, k // m, m) != 0).sum(-1) <= n).all())
