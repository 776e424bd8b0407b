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
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import evaluate as ev
from jaxprune.core import opmap as om_lib
from jaxprune.core.masks import PyTree

__all__ = ["observe", "model_fn", "rows_of"]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _LinenApply:
    module: Any
    method: Any = None
    collect: str = "params"
    with_variables: bool = False  # the first argument holds the other collections

    def __call__(self, params: PyTree, *args: Any) -> Any:
        if self.with_variables:
            others, *args = args
            return self.module.apply({self.collect: params, **others}, *args, method=self.method)
        return self.module.apply({self.collect: params}, *args, method=self.method)


@dataclasses.dataclass(frozen=True)
class _NnxApply:
    graphdef: Any
    rest: Any = None

    def __call__(self, state: PyTree, *args: Any) -> Any:
        from flax import nnx

        # copies of ``rest``'s Variables, made in the current trace: merging the held (concrete)
        # ones would let a train-mode BatchNorm or a Dropout's Rngs mutate Variables of another
        # trace level (flax's TraceContextError)
        m = nnx.merge(self.graphdef, state) if self.rest is None else nnx.merge(
            self.graphdef, state, self.rest, copy=True)
        return m(*args)

    def __hash__(self) -> int:
        return hash(self.graphdef)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NnxApply) and self.graphdef == other.graphdef and \
            self.rest is other.rest


def model_fn(model: Any, params: PyTree | None = None, *, method: Any = None,
             collect: str = "params", variables: PyTree | None = None
             ) -> tuple[Callable[..., Any], PyTree]:
    """``(fn, params)`` with ``fn(params, *args)`` the forward pass of a linen module, an nnx module
    (``params`` ignored: its state is split off) or a plain function (returned as is). With linen
    ``variables`` (other collections, e.g. ``batch_stats``), ``fn(params, variables, *args)``.

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
        try:  # a top-level apply ignores the module's name: equal modules share compiled programs
            model = model.clone(parent=None, name=None)
        except Exception:  # noqa: BLE001 - a module that cannot be cloned is used as it is
            pass
        return _LinenApply(model, method, collect, bool(variables)), params
    if callable(model):
        return model, params
    raise TypeError(f"jaxprune: expected a linen/nnx Module or a function, got {type(model)}")



_rows_dot = ev.dot_rows  # the data operand as fan-in rows (shared with export)
_rows_conv = functools.partial(ev.conv_rows, grouped=True)  # (G, positions, fan_in) if grouped


def _weights(mask: jax.Array | None, free: tuple[int, ...], path: str) -> jax.Array | None:
    if mask is None:
        return None
    ms = tuple(mask.shape)
    if free[:len(ms)] != ms:
        raise ValueError(
            f"jaxprune: token mask of shape {ms} does not match the leading axes {free} of the "
            f"inputs of '{path}' (rows of a matmul input must start with the mask's axes)"
        )
    w = jnp.broadcast_to(mask.reshape(ms + (1,) * (len(free) - len(ms))) != 0, free)
    return w.reshape(-1).astype(jnp.float32)  # any nonzero entry is a token (e.g. segment ids)


def _partial(rows: jax.Array, w: jax.Array | None, gram: bool) -> dict[str, jax.Array]:
    """Sums of ``(tokens, fan_in)`` rows, or per group of ``(groups, tokens, fan_in)`` rows."""
    r = rows.astype(jnp.float32)
    rw = r if w is None else r * w[:, None]
    t = r.ndim - 2  # the token axis
    out = {"sum": rw.sum(t), "sumsq": (rw * r).sum(t),
           "count": jnp.asarray(r.shape[t], jnp.float32) if w is None else w.sum()}
    if gram:
        out["gram"] = jnp.matmul(jnp.swapaxes(rw, -1, -2), r, precision=_HI)
    return out


_ENTRIES = "scan_entries"  # the per-iteration statistics of a weight sliced by a scan


def _merge(a: Any, b: Any) -> Any:
    """Sum two partial statistics (dicts of arrays, per-entry dicts merged by entry)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
                for k in {**a, **b}}
    return a + b


def _unflip(rows: jax.Array, flips: dict, eqn: Any, path: str) -> jax.Array:
    """``rows`` in the weight's own fan-in order when it reaches the equation reversed along some
    fan-in axes (``lax.rev``: a flipped conv kernel, ``ConvTranspose(transpose_kernel=True)``,
    ``w[::-1]``); the rows come in the order of the reversed operand."""
    f = flips.get(id(eqn), {}).get(path, False)
    if f is False:
        return rows
    if f is None:
        raise ValueError(f"jaxprune: calibration of '{path}': the weight is reversed along part of "
                         "a fan-in axis merged with others; reverse whole axes before the reshape")
    sizes, pos = f
    lead = rows.shape[:-1]
    r = jnp.flip(rows.reshape(*lead, *sizes), [len(lead) + i for i in pos])
    return r.reshape(rows.shape)


def _observer(out: dict, gram: bool, mask: jax.Array | None, shared: set[int] = frozenset(),
              flips: dict | None = None) -> Any:
    def hook(eqn: Any, ins: list[Any], taps: list[tuple[int, str, bool]]) -> None:
        if id(eqn) in shared and len({p for _, p, _ in taps}) > 1:
            raise ValueError(
                "jaxprune: calibration cannot separate the weights "
                f"{sorted({p for _, p, _ in taps})}: they go through one jitted function that "
                "jax traced once (the same equation serves every call); remove that inner "
                "jax.jit / nn.jit around the layer to calibrate it"
            )
        for opi, path, scanned in taps:
            if scanned is True or (isinstance(scanned, tuple) and len(scanned) != 1):
                raise ValueError(
                    f"jaxprune: calibration of '{path}': the weight is sliced by nested scans "
                    "(or a scan that cannot be unrolled); unroll the outer layers to calibrate it"
                )
            if eqn.primitive.name == "dot_general":
                rows, free = _rows_dot(eqn, ins[1 - opi], opi, path)
            else:
                if mask is not None:
                    raise ValueError(f"jaxprune: a token mask cannot apply to conv '{path}'")
                rows, free = _rows_conv(eqn, ins[0], tuple(ins[1].shape), path)
            rows = _unflip(rows, flips or {}, eqn, path)
            part = _partial(rows, _weights(mask, free, path), gram)
            if scanned:  # one stacked layer per scan iteration: its own statistics
                part = {_ENTRIES: {scanned[0]: part}}
            if path in out and (_ENTRIES in out[path]) != bool(scanned):
                raise ValueError(f"jaxprune: calibration of '{path}': the weight is used both "
                                 "sliced by a scan and whole; calibrate the two uses apart")
            out[path] = _merge(out[path], part) if path in out else part
        return None

    return hook


@functools.lru_cache(maxsize=64)
def _program(fn: Callable[..., Any], treedef: Any, gram: bool) -> Callable[..., Any]:
    """One jitted observer per (model function, params structure, gram); jit caches per shape."""
    return ev.tapped_program(
        fn, treedef, lambda out, an, mask: _observer(out, gram, mask, an.shared, an.flips),
        unroll_scan=True)


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
      token_masks: one mask per batch (e.g. ``(batch, seq)``, nonzero = real token, such as
        packed segment ids); padding (0) counts in no statistic.
      progress: a progress bar over batches.

    Raises ``ValueError`` for zero batches, masks that do not fit a layer's inputs, or weights the
    calibration cannot observe (inside ``cond``/``while`` or nested scans, batched expert
    matmuls). A weight a ``scan`` slices (layers stacked for ``nn.scan``) gets one set of
    statistics per stacked layer (``LayerStats.entries``; the scan is unrolled in the calibration
    program, so it grows with the number of layers).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("jaxprune: calibration needs at least one batch; got zero batches")
    masks = [None] * len(batches) if token_masks is None else list(token_masks)
    if len(masks) != len(batches):
        raise ValueError(
            f"jaxprune: {len(masks)} token masks for {len(batches)} calibration batches"
        )
    # the operator map first: a weight used in incompatible ways (a tied embedding used as x @ W
    # and h @ W.T) is refused naming both uses, not by a shape error inside the statistics
    first = batches[0] if isinstance(batches[0], tuple) else (batches[0],)
    try:
        om = operator_map_of(fn, params, first)
    except om_lib.OperatorMapError as e:
        raise om_lib.OperatorMapError(
            f"{e} (calibration records one matrix view per weight: use the weight once, or give "
            "each use its own parameter)") from None
    except TypeError as e:
        raise TypeError(_batch_error(0, first, e)) from e
    except Exception as e:  # the model's own error, as for the batches below
        if str(e).startswith("jaxprune:"):
            raise
        raise ValueError(_batch_error(0, first, e)) from e
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
    for i, (b, m) in enumerate(it):
        args = b if isinstance(b, tuple) else (b,)
        try:
            parts = jax.device_get(prog(leaves, args, None if m is None else jnp.asarray(m)))
        except TypeError as e:
            raise TypeError(_batch_error(i, args, e)) from e
        except Exception as e:  # the model's own error (e.g. flax's ScopeParamShapeError)
            if str(e).startswith("jaxprune:"):
                raise
            raise ValueError(_batch_error(i, args, e)) from e
        for k, v in parts.items():  # summed in numpy: no extra compilation per shape
            acc[k] = _merge(acc[k], v) if k in acc else v
    acc = {k: _layer_stats(k, v) for k, v in acc.items()}
    if not acc:
        raise ValueError(
            "jaxprune: calibration found no matmul or conv that multiplies a parameter with the "
            "inputs; check that fn(params, *batch) uses params"
        )
    if all(v.count == 0 for v in acc.values()):
        raise ValueError("jaxprune: calibration saw no tokens: every entry of the token masks is 0 "
                         "(nonzero = a real token)")
    return {k: v._replace(view=om[k]) for k, v in acc.items()}


def _layer_stats(path: str, v: dict) -> Any:
    """``LayerStats`` from summed parts; a scanned weight's per-iteration parts are stacked on a
    leading entry axis (``entries``)."""
    from jaxprune.oneshot.calibration import LayerStats

    if _ENTRIES in v:
        by = v[_ENTRIES]
        n = len(by)
        if sorted(by) != list(range(n)):
            raise ValueError(f"jaxprune: calibration of '{path}': scan iterations {sorted(by)} "
                             "do not cover the stacked layers")
        counts = {int(round(float(by[i]["count"]))) for i in range(n)}
        if len(counts) != 1 or any(np.ndim(by[i]["sum"]) != 1 for i in range(n)):
            raise ValueError(f"jaxprune: calibration of '{path}': the stacked layers saw "
                             f"different token counts {sorted(counts)} (or are grouped convs)")
        st = {f: np.stack([np.asarray(by[i][f], np.float32) for i in range(n)])
              for f in ("sum", "sumsq", *(("gram",) if "gram" in by[0] else ()))}
        return LayerStats(st.get("gram"), st["sum"], st["sumsq"], counts.pop(),
                          int(st["sum"].shape[-1]), entries=n)
    return LayerStats(None if "gram" not in v else np.asarray(v["gram"], np.float32),
                      np.asarray(v["sum"], np.float32), np.asarray(v["sumsq"], np.float32),
                      int(round(float(v["count"]))), int(v["sum"].shape[-1]),
                      groups=int(v["sum"].shape[0]) if v["sum"].ndim == 2 else 1)


def _batch_error(i: int, args: tuple, e: Exception) -> str:
    shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(args)]
    return (f"jaxprune: calibration batch {i} (input shapes {shapes}) failed in the model: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def operator_map_of(fn: Callable[..., Any], params: PyTree, args: tuple) -> om_lib.OperatorMap:
    """The operator map of ``fn(params, *args)``, traced once per (function, shapes) and cached.

    >>> operator_map_of(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, (jnp.ones((1, 3)),)).weights()
    ['w']
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    avals = tuple((tuple(np.shape(x)), _dtype(x)) for x in leaves)
    a_leaves, a_def = jax.tree_util.tree_flatten(args)
    a_avals = tuple((tuple(np.shape(x)), _dtype(x)) for x in a_leaves)
    try:
        return _cached_map(fn, treedef, avals, a_def, a_avals)
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        return om_lib.operator_map(fn, params, *args)


def _dtype(x: Any) -> Any:
    # the dtype object, not its name: typed PRNG keys (an nnx module's Rngs, e.g. Dropout's
    # stream) have an extended dtype that ``np.dtype("key<fry>")`` cannot parse back
    d = getattr(x, "dtype", None)
    return d if d is not None and not isinstance(x, (bool, int, float, complex)) \
        else jnp.result_type(x)


@functools.lru_cache(maxsize=256)
def _cached_map(fn: Any, treedef: Any, avals: tuple, a_def: Any, a_avals: tuple) -> om_lib.OperatorMap:
    params = treedef.unflatten([jax.ShapeDtypeStruct(s, d) for s, d in avals])
    args = a_def.unflatten([jax.ShapeDtypeStruct(s, d) for s, d in a_avals])
    return om_lib.operator_map(fn, params, *args)


def rows_of(fn: Callable[..., Any], params: PyTree, batch: Any) -> dict[str, jax.Array]:
    """The raw ``(tokens, fan_in)`` input rows of every matmul/conv weight for one batch
    (``(groups, tokens, fan_in)`` for a grouped conv).

    >>> rows_of(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))["w"].shape
    (4, 3)
    """
    args = batch if isinstance(batch, tuple) else (batch,)
    leaves, _ = jax.tree_util.tree_flatten(params)
    closed, an, _ = om_lib.trace(fn, params, *args)
    found: dict[str, jax.Array] = {}

    def hook(eqn: Any, ins: list[Any], taps: list) -> None:
        for opi, path, _ in taps:
            if eqn.primitive.name == "dot_general":
                r, _ = _rows_dot(eqn, ins[1 - opi], opi, path)
            else:
                r, _ = _rows_conv(eqn, ins[0], tuple(ins[1].shape), path)
            r = _unflip(r, an.flips, eqn, path)
            found[path] = jnp.concatenate([found[path], r], axis=r.ndim - 2) if path in found else r
        return None

    ev.evaluate(closed.jaxpr, closed.consts, [*leaves, *jax.tree_util.tree_leaves(args)],
                an.taps, hook)
    return found
