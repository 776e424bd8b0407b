"""Operator-level calibration: statistics of every matmul/conv input, for any traced model.

The model function is traced to a jaxpr; the operator map's analysis
(:func:`jaxprune.core.opmap.trace`) marks every ``dot_general`` / ``conv_general_dilated`` that
multiplies a parameter with data. The jaxpr is then evaluated equation by equation inside one
``jax.jit`` (jax's own primitives), and at each marked equation the *data* operand is turned into
rows of the parameter's fan-in — a Dense input row, an einsum operand with its contracted axes in the
weight's contraction order, a conv patch in ``(*window, in)`` order — and reduced to
``Σ x``, ``Σ x²``, ``Σ xᵀx`` and a token count. Nothing but these sums leaves the program.

* Any model the operator map covers: linen (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, raw
  ``self.param`` weights in ``jnp.einsum``), nnx through ``nnx.merge``, plain functions, PyTorch
  layouts (``x @ W.T``).
* Variable-length batches; an optional token mask per batch (padding excluded from every
  statistic).
* One compilation per distinct input shape, cached across calls (the jitted program is keyed by the
  model, so calibrating again — or the next block of equal shape — reuses it).

>>> import jax, jax.numpy as jnp
>>> fn = lambda p, x: x @ p["w"].T                      # PyTorch layout (out, in)
>>> st = observe(fn, {"w": jnp.ones((3, 4))}, [jnp.ones((2, 5, 4))],
...              token_masks=[jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])])
>>> st["w"].count, st["w"].fan_in, st["w"].sum.tolist()
(8, 4, [8.0, 8.0, 8.0, 8.0])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.core import opmap as om_lib
from jaxprune.core import walker as wk
from jaxprune.core.masks import PyTree

__all__ = ["observe", "model_fn", "as_params_fn"]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _LinenApply:
    module: Any
    method: Any = None
    collect: str = "params"

    def __call__(self, params: PyTree, *args: Any) -> Any:
        return self.module.apply({self.collect: params}, *args, method=self.method)


@dataclasses.dataclass(frozen=True)
class _NnxApply:
    graphdef: Any
    rest: Any = None

    def __call__(self, state: PyTree, *args: Any) -> Any:
        from flax import nnx

        m = nnx.merge(self.graphdef, state) if self.rest is None else nnx.merge(
            self.graphdef, state, self.rest)
        return m(*args)

    def __hash__(self) -> int:
        return hash(self.graphdef)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NnxApply) and self.graphdef == other.graphdef and \
            self.rest is other.rest


def model_fn(model: Any, params: PyTree | None = None, *, method: Any = None,
             collect: str = "params") -> tuple[Callable[..., Any], PyTree]:
    """``(fn, params)`` with ``fn(params, *args)`` the forward pass of a linen module, an nnx module
    (``params`` ignored: its state is split off) or a plain function (returned as is).

    >>> from flax import linen as nn
    >>> f, p = model_fn(nn.Dense(2), {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)})
    >>> f(p, jnp.ones((1, 3))).shape
    (1, 2)
    """
    from flax import linen as nn
    from flax import nnx

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return _NnxApply(graphdef), state
    if isinstance(model, nn.Module):
        return _LinenApply(model, method, collect), params
    if callable(model):
        return model, params
    raise TypeError(f"jaxprune: expected a linen/nnx Module or a function, got {type(model)}")


as_params_fn = model_fn


def _rows_dot(eqn: Any, x: jax.Array, opi: int, path: str) -> tuple[jax.Array, tuple[int, ...]]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    cx, bx = (rc, rb) if opi == 0 else (lc, lb)  # the data operand's contracting / batch dims
    if bx:
        raise ValueError(
            f"jaxprune: calibration of '{path}': the weight is a batched matmul operand (stacked "
            "experts or heads as einsum batch axes); per-batch statistics are not supported yet"
        )
    free = [i for i in range(x.ndim) if i not in cx]
    t = jnp.transpose(x, [*free, *cx])
    k = math.prod(x.shape[i] for i in cx)
    return t.reshape(-1, k), tuple(x.shape[i] for i in free)


def _rows_conv(eqn: Any, x: jax.Array, w_shape: tuple[int, ...], path: str
               ) -> tuple[jax.Array, tuple[int, ...]]:
    p = eqn.params
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        raise ValueError(f"jaxprune: calibration of grouped conv '{path}' is not supported")
    dn = p["dimension_numbers"]
    out_d, in_d, *sp = dn.rhs_spec
    window = tuple(w_shape[d] for d in sp)
    cin = w_shape[in_d]
    k = cin * math.prod(window)
    # identity kernel: output feature f = flat(*window, in) index
    eye = jnp.eye(k, dtype=jnp.float32).reshape(k, *window, cin)
    canon = jnp.moveaxis(eye, -1, 1)  # (out=k, in, *window)
    kern = jnp.moveaxis(canon, tuple(range(canon.ndim)), (out_d, in_d, *sp))
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), kern, window_strides=p["window_strides"], padding=p["padding"],
        lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"], dimension_numbers=dn,
        precision=_HI,
    )
    f = dn.out_spec[1]
    y = jnp.moveaxis(y, f, -1)
    return y.reshape(-1, k), tuple(y.shape[:-1])


def _weights(mask: jax.Array | None, free: tuple[int, ...], path: str) -> jax.Array | None:
    if mask is None:
        return None
    ms = tuple(mask.shape)
    if free[:len(ms)] != ms:
        raise ValueError(
            f"jaxprune: token mask of shape {ms} does not match the leading axes {free} of the "
            f"inputs of '{path}' (rows of a matmul input must start with the mask's axes)"
        )
    w = jnp.broadcast_to(mask.reshape(ms + (1,) * (len(free) - len(ms))), free)
    return w.reshape(-1).astype(jnp.float32)


def _partial(rows: jax.Array, w: jax.Array | None, gram: bool) -> dict[str, jax.Array]:
    r = rows.astype(jnp.float32)
    rw = r if w is None else r * w[:, None]
    out = {"sum": rw.sum(0), "sumsq": (rw * r).sum(0),
           "count": jnp.asarray(r.shape[0], jnp.float32) if w is None else w.sum()}
    if gram:
        out["gram"] = jnp.matmul(rw.T, r, precision=_HI)
    return out


def _has_taps(jaxpr: Any, taps: dict) -> bool:
    for e in jaxpr.eqns:
        if id(e) in taps:
            return True
        for v in e.params.values():
            subs = v if isinstance(v, tuple) else (v,)
            for s in subs:
                j = s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s
                if isinstance(j, jcore.Jaxpr) and _has_taps(j, taps):
                    return True
    return False


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], taps: dict, out: dict,
          gram: bool, mask: jax.Array | None) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        for opi, path, scanned in taps.get(id(eqn), ()):
            if scanned:
                raise ValueError(
                    f"jaxprune: calibration of '{path}': the weight is scanned over (stacked "
                    "layers in lax.scan / nn.scan); unroll the layers to calibrate them"
                )
            if eqn.primitive.name == "dot_general":
                rows, free = _rows_dot(eqn, ins[1 - opi], opi, path)
            else:
                rows, free = _rows_conv(eqn, ins[0], tuple(ins[1].shape), path)
                if mask is not None:
                    raise ValueError(f"jaxprune: a token mask cannot apply to conv '{path}'")
            part = _partial(rows, _weights(mask, free, path), gram)
            out[path] = jax.tree.map(jnp.add, out[path], part) if path in out else part
        sub = wk.sub_jaxpr(eqn)
        if sub is not None and _has_taps(sub[0], taps):
            outs = _eval(sub[0], sub[1], ins, taps, out, gram, mask)
        else:
            if sub is None and _has_taps_in_params(eqn, taps):
                raise ValueError(
                    f"jaxprune: calibration cannot observe weights inside '{eqn.primitive.name}' "
                    "(scan / cond / while bodies); unroll that part of the model"
                )
            outs = _bind(eqn, ins)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: Any, ins: list[Any]) -> Any:
    bp = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bp, tuple):  # older jax: (subfuns, params)
        subfuns, bp = bp
        return eqn.primitive.bind(*subfuns, *ins, **bp)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*ins, **bp)


def _has_taps_in_params(eqn: Any, taps: dict) -> bool:
    for v in eqn.params.values():
        for s in (v if isinstance(v, tuple) else (v,)):
            j = s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s
            if isinstance(j, jcore.Jaxpr) and _has_taps(j, taps):
                return True
    return False


@functools.lru_cache(maxsize=64)
def _program(fn: Callable[..., Any], treedef: Any, gram: bool) -> Callable[..., Any]:
    """One jitted observer per (model function, params structure, gram); jit caches per shape."""

    def run(leaves: list[jax.Array], args: tuple, mask: jax.Array | None) -> dict:
        params = treedef.unflatten(leaves)
        closed, an, _ = om_lib.trace(fn, params, *args)
        out: dict = {}
        _eval(closed.jaxpr, closed.consts, [*leaves, *jax.tree_util.tree_leaves(args)], an.taps,
              out, gram, mask)
        return out

    return jax.jit(run)


def observe(
    fn: Callable[..., Any],
    params: PyTree,
    batches: Iterable[Any],
    *,
    gram: bool = True,
    token_masks: Iterable[Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Calibrate ``fn(params, *batch)``: ``{param path: LayerStats}`` for every matmul/conv weight
    the data flows through (paths are :func:`jaxprune.core.masks.path_str` paths into ``params``).

    Args:
      fn: the model function (see :func:`model_fn` for linen / nnx modules).
      params: its params.
      batches: inputs; a tuple is unpacked into positional arguments. Shapes may vary.
      gram: also accumulate ``XᵀX`` (SparseGPT / OBS / DSnoT need it; Wanda needs only norms).
      token_masks: one mask per batch (e.g. ``(batch, seq)``, 1 = real token); rows of every
        weight's input are weighted by it, so padding counts nowhere.
      progress: a progress bar over batches.

    Raises ``ValueError`` for zero batches, masks that do not fit a layer's inputs, or weights the
    calibration cannot observe (inside ``scan``/``cond``/``while``, batched expert matmuls).
    """
    from jaxprune.oneshot.calibration import LayerStats, merge_stats

    batches = list(batches)
    if not batches:
        raise ValueError("jaxprune: calibration needs at least one batch; got zero batches")
    masks = [None] * len(batches) if token_masks is None else list(token_masks)
    if len(masks) != len(batches):
        raise ValueError(
            f"jaxprune: {len(masks)} token masks for {len(batches)} calibration batches"
        )
    leaves, treedef = jax.tree_util.tree_flatten(params)
    try:
        prog = _program(fn, treedef, bool(gram))
    except TypeError as e:  # an unhashable function: compile for this call only
        if "unhashable" not in str(e):
            raise
        prog = _program.__wrapped__(fn, treedef, bool(gram))
    it: Any = zip(batches, masks, strict=True)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(batches), desc="calibrate", leave=False)
    acc: dict[str, Any] = {}
    for b, m in it:
        args = b if isinstance(b, tuple) else (b,)
        parts = jax.device_get(prog(leaves, args, None if m is None else jnp.asarray(m)))
        for k, v in parts.items():
            g = None if "gram" not in v else np.asarray(v["gram"], np.float32)
            st = LayerStats(g, np.asarray(v["sum"], np.float32), np.asarray(v["sumsq"], np.float32),
                            int(round(float(v["count"]))), int(v["sum"].shape[0]))
            acc[k] = merge_stats(acc.get(k), st)
    if not acc:
        raise ValueError(
            "jaxprune: calibration found no matmul or conv that multiplies a parameter with the "
            "inputs; check that fn(params, *batch) uses params"
        )
    return acc
