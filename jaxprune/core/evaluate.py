"""Evaluate a jaxpr equation by equation, letting a hook observe or replace chosen equations.

The operator map (:func:`jaxprune.core.opmap.trace`) marks every matmul/conv that multiplies a
parameter with data (its ``taps``). Two families act on exactly those equations while the model
runs: op-level calibration (:mod:`jaxprune.oneshot.observe`) reads their data operand, and export
(:mod:`jaxprune.kernels.export`) replaces them with packed sparse kernels. Both run the model
through :func:`evaluate` — jax's own primitives, equation by equation (inside ``jit`` everything is
staged into one program), recursing into ``jit``/``custom_jvp``/``custom_vjp``/``remat`` bodies
that contain a tap. A tap inside ``cond``/``while`` is refused with a clear error, and inside
``scan`` too unless the caller asks for the scan to be unrolled (calibration does).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.core import opmap
    >>> closed, an, _ = opmap.trace(lambda p, x: jnp.tanh(x @ p["w"]), {"w": jnp.eye(2)}, jnp.ones((1, 2)))
    >>> seen = []
    >>> def hook(eqn, ins, taps):
    ...     seen.append([path for _, path, _ in taps]); return None   # observe only
    >>> out = evaluate(closed.jaxpr, closed.consts, [jnp.eye(2), jnp.ones((1, 2))], an.taps, hook)
    >>> seen, out[0].shape
    ([['w']], (1, 2))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxprune.core import walker as wk

__all__ = ["evaluate", "Hook", "has_taps", "dot_rows", "dot_operand", "conv_rows", "tapped_program"]

# hook(eqn, input values, [(operand index, param path, scanned)]) -> output values, or None to run
# the equation as it is
Hook = Callable[[Any, list[Any], list[tuple[int, str, bool]]], "list[Any] | None"]


def _subjaxprs(eqn: Any) -> list[Any]:
    out = []
    for v in eqn.params.values():
        for s in (v if isinstance(v, tuple | list) else (v,)):
            j = s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s
            if isinstance(j, jcore.Jaxpr):
                out.append(j)
    return out


def has_taps(jaxpr: Any, taps: dict) -> bool:
    """Whether ``jaxpr`` or any sub-jaxpr holds a tapped equation."""
    return any(id(e) in taps or any(has_taps(j, taps) for j in _subjaxprs(e)) for e in jaxpr.eqns)


def _bind(eqn: Any, ins: list[Any]) -> list[Any]:
    bp = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bp, tuple):  # older jax: (subfuns, params)
        subfuns, bp = bp
        out = eqn.primitive.bind(*subfuns, *ins, **bp)
    else:
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*ins, **bp)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], taps: dict, hook: Hook,
             *, unroll_scan: bool = False) -> list[Any]:
    """Run ``jaxpr`` on ``args``; at every tapped equation call ``hook`` (its non-``None`` result
    replaces the equation's outputs). Returns the jaxpr's outputs.

    ``unroll_scan``: a ``scan`` whose body holds a tap runs as a Python loop over its iterations
    (the program grows with the length), and the hook sees, for a weight the scan slices, the
    iteration index as ``(i,)`` in place of the tap's ``scanned`` flag (``(i, j)`` nested)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = None
        if id(eqn) in taps:
            outs = hook(eqn, ins, taps[id(eqn)])
        if outs is None:
            sub = wk.sub_jaxpr(eqn)
            if sub is not None and has_taps(sub[0], taps):
                outs = evaluate(sub[0], sub[1], ins, taps, hook, unroll_scan=unroll_scan)
            elif unroll_scan and eqn.primitive.name == "scan" and has_taps(
                    eqn.params["jaxpr"].jaxpr, taps):
                outs = _scan_unrolled(eqn, ins, taps, hook)
            else:
                if sub is None and any(has_taps(j, taps) for j in _subjaxprs(eqn)):
                    raise ValueError(
                        f"jaxprune: weights used inside '{eqn.primitive.name}' (a scan / cond / "
                        "while body) cannot be observed or replaced; unroll that part of the model"
                    )
                outs = _bind(eqn, ins)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _indexed(hook: Hook, i: int) -> Hook:
    """``hook`` seeing the taps of a weight the scan slices with iteration ``i`` prepended."""
    def h(eqn: Any, ins: list[Any], taps: list[tuple[int, str, Any]]) -> Any:
        return hook(eqn, ins, [(o, p, (i, *(s if isinstance(s, tuple) else ())) if s else s)
                               for o, p, s in taps])
    return h


def _scan_unrolled(eqn: Any, ins: list[Any], taps: dict, hook: Hook) -> list[Any]:
    """A ``scan`` as a Python loop over its iterations (consts, carry, sliced xs; stacked ys)."""
    p = eqn.params
    body, nc, nk, n = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:nc], list(ins[nc:nc + nk]), ins[nc + nk:]
    ys: list[list[Any]] = [[None] * n for _ in range(len(body.jaxpr.outvars) - nk)]
    for i in (range(n - 1, -1, -1) if p["reverse"] else range(n)):
        out = evaluate(body.jaxpr, body.consts, [*consts, *carry, *(x[i] for x in xs)], taps,
                       _indexed(hook, i), unroll_scan=True)
        carry = out[:nk]
        for j, y in enumerate(out[nk:]):
            ys[j][i] = y
    stacked = [jnp.stack(y) if n else jnp.zeros(v.aval.shape, v.aval.dtype)
               for y, v in zip(ys, eqn.outvars[nk:], strict=True)]
    return [*carry, *stacked]


# ------------------------------------------------------------------------------------------------
# The data operand of a tapped equation as rows of the weight's fan-in (op-level calibration reads
# them; export multiplies them with a packed matrix view).
# ------------------------------------------------------------------------------------------------


def tapped_program(fn: Callable[..., Any], treedef: Any,
                   make_hook: Callable[..., Hook], *, unroll_scan: bool = False
                   ) -> Callable[..., dict]:
    """``jax.jit`` of ``run(leaves, args, *extra) -> out``: trace ``fn(params, *args)`` (``params =
    treedef.unflatten(leaves)``) to its operator map and evaluate it; at every tapped matmul/conv
    the hook ``make_hook(out, analysis, *extra)`` sees the operands and fills the dict ``out``.
    Observers (calibration, expert statistics) cache the result per model function.

    >>> import jax, jax.numpy as jnp
    >>> def grab(out, an):
    ...     def hook(eqn, ins, taps):
    ...         out["x"] = ins[0]  # returns None: the equation runs as usual
    ...     return hook
    >>> leaves, td = jax.tree_util.tree_flatten({"w": jnp.ones((3, 2))})
    >>> run = tapped_program(lambda p, x: x @ p["w"], td, grab)
    >>> run(leaves, (jnp.ones((4, 3)),))["x"].shape
    (4, 3)
    """
    from jaxprune.core import opmap as om_lib

    def run(leaves: list[jax.Array], args: tuple, *extra: Any) -> dict:
        closed, an, _ = om_lib.trace(fn, treedef.unflatten(leaves), *args)
        out: dict = {}
        evaluate(closed.jaxpr, closed.consts, [*leaves, *jax.tree_util.tree_leaves(args)],
                 an.taps, make_hook(out, an, *extra), unroll_scan=unroll_scan)
        return out

    return jax.jit(run)


def dot_rows(eqn: Any, x: jax.Array, opi: int, path: str) -> tuple[jax.Array, tuple[int, ...]]:
    """``(rows, free)``: the data operand ``x`` of a ``dot_general`` whose operand ``opi`` is the
    weight ``path``, as ``(tokens, fan_in)`` rows (its contracted axes last, in the weight's
    contraction order) and the shape of its free axes (``tokens = prod(free)``).

    >>> import jax, jax.numpy as jnp
    >>> eqn = jax.make_jaxpr(lambda x, w: jnp.einsum("btd,dk->btk", x, w))(
    ...     jnp.ones((2, 3, 4)), jnp.ones((4, 5))).jaxpr.eqns[0]
    >>> rows, free = dot_rows(eqn, jnp.ones((2, 3, 4)), 1, "w")
    >>> rows.shape, free
    ((6, 4), (2, 3))
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    cx, bx = (rc, rb) if opi == 0 else (lc, lb)  # the data operand's contracting / batch dims
    if bx:
        raise ValueError(
            f"jaxprune: '{path}' is a batched matmul operand (stacked experts or heads as einsum "
            "batch axes); op-level calibration and export do not support batched weights yet"
        )
    return dot_operand(eqn, x, opi, weight=False), tuple(
        x.shape[i] for i in range(x.ndim) if i not in cx)


def dot_operand(eqn: Any, a: jax.Array, opi: int, *, weight: bool) -> jax.Array:
    """An operand of a ``dot_general`` whose weight is operand ``opi``, as a matrix with the
    batch axes first: the weight (``weight=True``, ``a`` is operand ``opi``) as
    ``(*batch, fan_in, out)``, the data (``a`` is the other operand) as ``(*batch, rows, fan_in)``;
    contracted axes in the equation's contraction order, so the two multiply.

    >>> import jax, jax.numpy as jnp
    >>> eqn = jax.make_jaxpr(lambda x, w: jnp.einsum("etd,edk->etk", x, w))(
    ...     jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))).jaxpr.eqns[0]
    >>> dot_operand(eqn, jnp.ones((2, 4, 5)), 1, weight=True).shape
    (2, 4, 5)
    >>> dot_operand(eqn, jnp.ones((2, 3, 4)), 1, weight=False).shape
    (2, 3, 4)
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    c, b = (lc, lb) if (opi == 0) == weight else (rc, rb)
    free = [i for i in range(a.ndim) if i not in c and i not in b]
    t = jnp.transpose(a, [*b, *c, *free] if weight else [*b, *free, *c])
    lead, k = tuple(a.shape[i] for i in b), math.prod(a.shape[i] for i in c)
    return t.reshape(*lead, k, -1) if weight else t.reshape(*lead, -1, k)


def conv_rows(eqn: Any, x: jax.Array, w_shape: tuple[int, ...], path: str, *,
              grouped: bool = False) -> tuple[jax.Array, tuple[int, ...]]:
    """``(rows, free)``: the input ``x`` of a ``conv_general_dilated`` with kernel ``path`` (shape
    ``w_shape``) as ``(positions, fan_in)`` patch rows in ``(*window, in)`` order (an identity-kernel
    conv, in float32), and the output shape without its feature axis, feature axis moved last.

    A grouped conv (``feature_group_count = G > 1``: depthwise, ResNeXt) is refused unless
    ``grouped``; then ``rows`` is ``(G, positions, fan_in)``: group ``g``'s patches, the inputs of
    output features ``g·out/G … (g+1)·out/G − 1``.

    >>> import jax, jax.numpy as jnp
    >>> conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
    ...                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> eqn = jax.make_jaxpr(conv)(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5))).jaxpr.eqns[0]
    >>> rows, free = conv_rows(eqn, jnp.ones((1, 4, 4, 2)), (3, 3, 2, 5), "w")
    >>> rows.shape, free
    ((4, 18), (1, 2, 2))
    """
    p = eqn.params
    groups = p.get("feature_group_count", 1)
    if p.get("batch_group_count", 1) != 1 or (groups != 1 and not grouped):
        what = "batch-grouped" if p.get("batch_group_count", 1) != 1 else "grouped"
        raise ValueError(f"jaxprune: {what} conv '{path}' is not supported by op-level "
                         f"{'calibration' if grouped else 'export'}")
    dn = p["dimension_numbers"]
    out_d, in_d, *sp = dn.rhs_spec
    window = tuple(w_shape[d] for d in sp)
    cin = w_shape[in_d]  # per group
    k = cin * math.prod(window)
    # identity kernel: output feature g*k + f = group g's flat(*window, in) index f
    eye = jnp.eye(k, dtype=jnp.float32).reshape(k, *window, cin)
    canon = jnp.tile(jnp.moveaxis(eye, -1, 1), (groups,) + (1,) * (len(window) + 1))
    kern = jnp.moveaxis(canon, tuple(range(canon.ndim)), (out_d, in_d, *sp))
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), kern, window_strides=p["window_strides"], padding=p["padding"],
        lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"], dimension_numbers=dn,
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST,
    )
    f = dn.out_spec[1]
    y = jnp.moveaxis(y, f, -1)
    if groups == 1:
        return y.reshape(-1, k), tuple(y.shape[:-1])
    return jnp.moveaxis(y.reshape(-1, groups, k), 1, 0), tuple(y.shape[:-1])
