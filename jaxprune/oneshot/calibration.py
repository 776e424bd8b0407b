"""Calibration: observe a Flax model's linear/conv layers and record their input statistics.

Layers are found by *intercepting calls* (linen ``nn.intercept_methods`` on ``Dense``,
``DenseGeneral`` and ``Conv``; for nnx a temporary wrapper around ``nnx.Linear``/``nnx.Conv``
``__call__``), so models we did not write work without naming their layers. Statistics are keyed by
the path of the layer's kernel in the params tree (``jaxprune.core.masks.path_str``: ``"Dense_0/kernel"``).

For every layer we stream, in float32, over all calibration tokens ``x`` (rows of the layer's
fan-in view: a Dense input row, a flattened conv patch in kernel order ``(h, w, in)``):
``gram = Σ xᵀx``, ``sum = Σ x``, ``sumsq = Σ x²`` and the token ``count``. From these
:class:`LayerStats` derives column norms ``‖X_j‖₂`` (Wanda), means, variances and ``H = XᵀX / n``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> st = calibrate(model, params, [jnp.ones((2, 4))])
    >>> st["kernel"].gram.shape, st["kernel"].count
    ((4, 4), 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import PyTree

__all__ = ["LayerStats", "calibrate", "layer_inputs", "merge_stats", "as_matrix"]


class LayerStats(NamedTuple):
    """Streamed input statistics of one layer (float32, fan-in view ``(tokens, fan_in)``).

    ``gram`` is ``None`` when calibration ran with ``gram=False`` (Wanda/OWL need only norms).
    """

    gram: np.ndarray | None
    sum: np.ndarray
    sumsq: np.ndarray
    count: int
    fan_in: int

    @property
    def norms(self) -> np.ndarray:
        """Column norms ``‖X_j‖₂`` over all calibration tokens (the Wanda statistic)."""
        return np.sqrt(np.maximum(self.sumsq, 0.0))

    @property
    def mean(self) -> np.ndarray:
        """Per-input mean ``E[x_j]``."""
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        """Per-input variance ``E[x_j²] - E[x_j]²`` (clipped at 0)."""
        return np.maximum(self.sumsq / max(self.count, 1) - self.mean**2, 0.0)

    @property
    def hessian(self) -> np.ndarray:
        """``H = XᵀX / n`` (the layer-wise OBS Hessian up to a factor 2)."""
        if self.gram is None:
            raise ValueError("jaxprune: these stats were recorded with gram=False; no Hessian")
        return self.gram / max(self.count, 1)


def merge_stats(a: LayerStats | None, b: LayerStats) -> LayerStats:
    """Sum two partial statistics of the same layer (``a`` may be ``None``).

    >>> s = LayerStats(np.eye(2, dtype=np.float32), np.ones(2), np.ones(2), 1, 2)
    >>> merge_stats(s, s).count
    2
    """
    if a is None:
        return b
    gram = None if a.gram is None or b.gram is None else a.gram + b.gram
    return LayerStats(gram, a.sum + b.sum, a.sumsq + b.sumsq, a.count + b.count, a.fan_in)


def as_matrix(weight: Any, stats: LayerStats | int, name: str = "<layer>") -> jax.Array:
    """The ``(fan_in, out)`` matrix view of a kernel (Dense ``(in, out)``, conv ``(h, w, in, out)``,
    DenseGeneral ``(*in, *out)``). ``stats`` gives the fan-in (or pass it as an int); the shape
    arithmetic is :func:`jaxprune.core.patterns.matrix_view`.

    >>> as_matrix(jnp.ones((3, 3, 2, 5)), 18).shape
    (18, 5)
    """
    fan_in = stats if isinstance(stats, int) else stats.fan_in
    w = jnp.asarray(weight)
    try:
        view = pat_lib.matrix_view(tuple(w.shape), fan_in)
    except ValueError:
        raise ValueError(
            f"jaxprune: kernel '{name}' of shape {tuple(w.shape)} does not match calibration "
            f"fan-in {fan_in}"
        ) from None
    return w.reshape(view)


# ----------------------------------------------------------------------------------------------
# From a layer call to a (tokens, fan_in) matrix
# ----------------------------------------------------------------------------------------------


def _conv_padding(padding: Any, nd: int, name: str) -> Any:
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(
            f"jaxprune: calibration of conv '{name}': padding {padding!r} is not supported "
            "(use SAME, VALID or explicit pads)"
        )
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    out = []
    for p in padding:
        out.append((p, p) if isinstance(p, int) else tuple(p))
    return out


def _conv_patches(x: jax.Array, mod: Any, kshape: tuple[int, ...], name: str) -> jax.Array:
    """Rows of flattened patches in kernel order ``(*window, in)`` for a conv call."""
    nd = len(kshape) - 2
    if getattr(mod, "feature_group_count", 1) != 1:
        raise ValueError(f"jaxprune: calibration of grouped conv '{name}' is not supported")

    def tup(v: Any, default: int = 1) -> tuple[int, ...]:
        if v is None:
            return (default,) * nd
        return (v,) * nd if isinstance(v, int) else tuple(v)

    x = x.reshape((-1, *x.shape[-nd - 1:]))
    fan_in = math.prod(kshape[:-1])
    eye = jnp.eye(fan_in, dtype=jnp.float32).reshape(*kshape[:-1], fan_in)
    dn = jax.lax.conv_dimension_numbers(
        x.shape, eye.shape, _spec(nd)
    )
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), eye, window_strides=tup(mod.strides),
        padding=_conv_padding(mod.padding, nd, name), lhs_dilation=tup(mod.input_dilation),
        rhs_dilation=tup(mod.kernel_dilation), dimension_numbers=dn,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y.reshape(-1, fan_in)


def _spec(nd: int) -> tuple[str, str, str]:
    sp = "DHW"[-nd:] if nd <= 3 else None
    if sp is None:
        raise ValueError(f"jaxprune: {nd}-d convolutions are not supported by calibration")
    return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def _rows(kind: str, mod: Any, x: jax.Array, kshape: tuple[int, ...], name: str) -> jax.Array:
    if kind == "dense":
        return x.reshape(-1, x.shape[-1])
    if kind == "general":
        axis = mod.axis if isinstance(mod.axis, tuple | list) else (mod.axis,)
        if getattr(mod, "batch_dims", ()):
            raise ValueError(f"jaxprune: DenseGeneral '{name}' with batch_dims is not supported")
        axes = tuple(a % x.ndim for a in axis)
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        return x.reshape(-1, math.prod(x.shape[x.ndim - len(axes):]))
    return _conv_patches(x, mod, kshape, name)


def _partial(rows: jax.Array, gram: bool) -> dict[str, jax.Array]:
    r = rows.astype(jnp.float32)
    out = {
        "sum": r.sum(0),
        "sumsq": (r * r).sum(0),
        "count": jnp.asarray(r.shape[0], jnp.int32),
    }
    if gram:
        out["gram"] = jnp.matmul(r.T, r, precision=jax.lax.Precision.HIGHEST)
    return out


# ----------------------------------------------------------------------------------------------
# Interception
# ----------------------------------------------------------------------------------------------

_LINEN_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Dense, "dense"), (nn.DenseGeneral, "general"), (nn.Conv, "conv"),
)


def _linen_kind(mod: Any) -> str | None:
    for cls, kind in _LINEN_KINDS:
        if type(mod) is cls or isinstance(mod, cls):
            return kind
    return None


def _linen_forward(model: nn.Module, gram: bool, method: Any, collect: str) -> Callable:
    def run(params: PyTree, batch: Any) -> dict[str, dict[str, jax.Array]]:
        found: dict[str, dict[str, jax.Array]] = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            kind = _linen_kind(mod) if context.method_name == "__call__" else None
            if kind is None or not args:
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            path = "/".join(str(p) for p in mod.scope.path)
            key = f"{path}/kernel" if path else "kernel"
            kshape = tuple(mod.variables["params"]["kernel"].shape)
            rows = _rows(kind, mod, args[0], kshape, key)
            part = _partial(rows, gram)
            if key in found:  # a layer called twice in one forward: add up
                found[key] = jax.tree.map(jnp.add, found[key], part)
            else:
                found[key] = part
            return out

        variables = {collect: params}
        with nn.intercept_methods(interceptor):
            args = batch if isinstance(batch, tuple) else (batch,)
            model.apply(variables, *args, method=method)
        return found

    return run


def _nnx_forward(graphdef: Any, gram: bool) -> Callable:
    def run(state: PyTree, batch: Any) -> dict[str, dict[str, jax.Array]]:
        model = nnx.merge(graphdef, state)
        where: dict[int, tuple[str, str]] = {}
        for path, mod in nnx.iter_graph(model):
            kind = ("dense" if isinstance(mod, nnx.Linear)
                    else "general" if isinstance(mod, nnx.LinearGeneral)
                    else "conv" if isinstance(mod, nnx.Conv) else None)
            if kind is not None:
                where[id(mod)] = ("/".join(str(p) for p in path), kind)
        found: dict[str, dict[str, jax.Array]] = {}
        originals = {cls: cls.__call__ for cls in (nnx.Linear, nnx.LinearGeneral, nnx.Conv)}

        def wrap(cls: type) -> Callable:
            orig = originals[cls]

            def call(self, x, *a, **kw):
                out = orig(self, x, *a, **kw)
                info = where.get(id(self))
                if info is not None:
                    path, kind = info
                    key = f"{path}/kernel" if path else "kernel"
                    kshape = tuple(self.kernel.get_value().shape)
                    part = _partial(_rows(kind, _NnxAttrs(self, kind), x, kshape, key), gram)
                    found[key] = (jax.tree.map(jnp.add, found[key], part) if key in found
                                  else part)
                return out

            return call

        try:
            for cls in originals:
                cls.__call__ = wrap(cls)
            args = batch if isinstance(batch, tuple) else (batch,)
            model(*args)
        finally:
            for cls, f in originals.items():
                cls.__call__ = f
        return found

    return run


@dataclasses.dataclass
class _NnxAttrs:
    """Adapter giving nnx layers the attribute names of their linen twins."""

    mod: Any
    kind: str

    def __getattr__(self, name: str) -> Any:
        m = self.mod
        if name == "axis":
            return m.axis
        if name == "batch_dims":
            return tuple(getattr(m, "batch_axis", {}) or ())
        if name == "feature_group_count":
            return m.feature_group_count
        if name in ("strides", "padding", "input_dilation", "kernel_dilation"):
            return getattr(m, name)
        raise AttributeError(name)


def _check_batches(batches: list[Any]) -> None:
    if not batches:
        raise ValueError("jaxprune: calibration needs at least one batch; got zero batches")
    ref = jax.tree.structure(batches[0])
    ref_shapes = [tuple(np.shape(x))[1:] for x in jax.tree.leaves(batches[0])]
    for i, b in enumerate(batches[1:], start=1):
        if jax.tree.structure(b) != ref:
            raise ValueError(
                f"jaxprune: calibration batch {i} has structure {jax.tree.structure(b)}, "
                f"batch 0 has {ref}"
            )
        shapes = [tuple(np.shape(x))[1:] for x in jax.tree.leaves(b)]
        if shapes != ref_shapes:
            raise ValueError(
                f"jaxprune: calibration batch shape mismatch: batch {i} has per-example shapes "
                f"{shapes}, batch 0 has {ref_shapes}"
            )


def layer_inputs(model: Any, params: PyTree | None, batch: Any, *, method: Any = None,
                 collect: str = "params") -> dict[str, jax.Array]:
    """The raw ``(tokens, fan_in)`` inputs of every intercepted layer for one batch (for tests and
    reconstruction-error measurements; calibration itself never stores activations).

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> p = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> layer_inputs(nn.Dense(2), p, jnp.ones((4, 3)))["kernel"].shape
    (4, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError("jaxprune: layer_inputs supports linen modules")
    found: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        kind = _linen_kind(mod) if context.method_name == "__call__" else None
        out = next_fun(*args, **kwargs)
        if kind is not None and args:
            path = "/".join(str(p) for p in mod.scope.path)
            key = f"{path}/kernel" if path else "kernel"
            kshape = tuple(mod.variables["params"]["kernel"].shape)
            r = _rows(kind, mod, args[0], kshape, key)
            found[key] = jnp.concatenate([found[key], r]) if key in found else r
        return out

    with nn.intercept_methods(interceptor):
        args = batch if isinstance(batch, tuple) else (batch,)
        model.apply({collect: params}, *args, method=method)
    return found


def calibrate(
    model: Any,
    params: PyTree | None,
    batches: Iterable[Any],
    *,
    gram: bool = True,
    method: Any = None,
    collect: str = "params",
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Run calibration batches through a Flax model; return ``{kernel path: LayerStats}``.

    Args:
      model: a linen ``Module`` (applied as ``model.apply({collect: params}, *batch)``) or an nnx
        ``Module`` (``params`` ignored; called as ``model(*batch)``).
      params: the linen params tree (stats keys are ``path_str`` paths into it).
      batches: iterable of inputs; a tuple is unpacked into positional arguments.
      gram: also accumulate ``XᵀX`` (needed by SparseGPT/OBS/DSnoT; Wanda needs only norms).
      method: linen method to call instead of ``__call__``.

    The forward pass is jitted once; only the per-layer partial sums leave it, and they are added in
    float32 on the host, so memory holds one batch's activations plus the statistics.

    Raises ``ValueError`` for zero batches or batches whose per-example shapes differ.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> m = nn.Dense(2); p = m.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> calibrate(m, p, [jnp.ones((4, 3))])["kernel"].norms
    array([2., 2., 2.], dtype=float32)
    """
    batches = list(batches)
    _check_batches(batches)
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        fwd = jax.jit(_nnx_forward(graphdef, gram))
        tree = state
    elif isinstance(model, nn.Module):
        fwd = jax.jit(_linen_forward(model, gram, method, collect))
        tree = params
    else:
        raise TypeError(f"jaxprune: calibrate needs a linen or nnx Module, got {type(model)}")
    acc: dict[str, LayerStats] = {}
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="calibrate", leave=False)
    for b in it:
        parts = jax.device_get(fwd(tree, b))
        for k, v in parts.items():
            g = None if "gram" not in v else np.asarray(v["gram"], np.float32)
            st = LayerStats(g, np.asarray(v["sum"], np.float32), np.asarray(v["sumsq"], np.float32),
                            int(v["count"]), int(v["sum"].shape[0]))
            acc[k] = merge_stats(acc.get(k), st)
    if not acc:
        raise ValueError(
            "jaxprune: calibration found no Dense/DenseGeneral/Conv (or nnx Linear/Conv) layer calls "
            "in the model's forward pass"
        )
    return acc
