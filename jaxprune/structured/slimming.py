"""Slimming: remove group units from a params pytree (a smaller dense model), masks of the same
removal (the masked model), FLAP bias compensation, and nnx / small-model rebuild helpers.

``keep`` maps a group name to the sorted unit indices that stay. :func:`slim` and :func:`group_masks`
read the same ``keep``, so ``model_slim(slim(params)) == model(apply_masks(params, masks))`` up to
float tolerance for every ``exact`` group.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jaxprune.structured import discover_groups
    >>> p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
    >>> gs = discover_groups(lambda p, x: (x @ p["w1"]) @ p["w2"], p, jnp.ones((1, 3)))
    >>> small = slim(p, gs, {gs[0].name: np.array([0, 2])})
    >>> small["w1"].shape, small["w2"].shape
    ((3, 2), (2, 2))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.masks import PyTree, leaves_with_paths
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.structured.groups import Group

__all__ = [
    "axis_keep_masks",
    "group_masks",
    "slim",
    "compensate_bias",
    "param_count",
    "slim_nnx",
]


def _check_keep(groups: Sequence[Group], keep: Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = {g.name for g in groups}
    unknown = sorted(set(keep) - names)
    if unknown:
        raise ValueError(
            f"jaxprune.structured.slimming: keep names {unknown} are not groups; groups: {sorted(names)}"
        )
    out = {}
    for g in groups:
        if g.name not in keep:
            continue
        raw = np.asarray(keep[g.name])
        if raw.dtype == np.bool_:  # a keep mask over the group's units
            if raw.shape != (g.size,):
                raise ValueError(
                    f"jaxprune.structured.slimming: keep for group '{g.name}' is a bool mask of "
                    f"shape {raw.shape}, but the group has {g.size} units (pass ({g.size},) or "
                    "integer indices)")
            raw = np.flatnonzero(raw)
        elif raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise TypeError(
                f"jaxprune.structured.slimming: keep for group '{g.name}' must be integer unit "
                f"indices (or a bool mask of {g.size} units), got dtype {raw.dtype}: "
                f"{raw.reshape(-1).tolist()[:8]}")
        idx = raw.astype(np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError(
                f"jaxprune.structured.slimming: group '{g.name}' would lose all {g.size} units; keep "
                "at least one (a layer with no units cannot be represented)"
            )
        if idx.min() < 0 or idx.max() >= g.size or len(np.unique(idx)) != len(idx):
            raise ValueError(
                f"jaxprune.structured.slimming: keep indices for group '{g.name}' must be unique and in "
                f"[0, {g.size}); got {idx.tolist()[:16]}"
            )
        out[g.name] = np.sort(idx)
    return out


def axis_keep_masks(
    params: PyTree, groups: Sequence[Group], keep: Mapping[str, Any]
) -> dict[tuple[str, int], np.ndarray]:
    """``{(path, axis): bool[axis_len]}`` — which indices of each touched axis stay.

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 2, (Member("w", 1, (2, 3), 0),))
    >>> axis_keep_masks({"w": np.ones((1, 6))}, [g], {"h": [1]})[("w", 1)].tolist()
    [False, False, False, True, True, True]
    """
    keep = _check_keep(groups, keep)
    shapes = {p: np.shape(x) for p, x in leaves_with_paths(params) if x is not None}
    out: dict[tuple[str, int], np.ndarray] = {}
    for g in groups:
        if g.name not in keep:
            continue
        kb = np.zeros(g.size, bool)
        kb[keep[g.name]] = True
        for m in g.members:
            if m.path not in shapes:
                raise ValueError(
                    f"jaxprune.structured: group '{g.name}' names parameter '{m.path}', which is not "
                    "in the params tree (were the groups discovered on other variables?)"
                )
            n = shapes[m.path][m.axis]
            if n != math.prod(m.sizes):
                raise ValueError(
                    f"jaxprune.structured: '{m.path}' axis {m.axis} has length {n}, group "
                    f"'{g.name}' expects {math.prod(m.sizes)}"
                )
            cur = out.get((m.path, m.axis), np.ones(n, bool))
            out[(m.path, m.axis)] = cur & kb[m.unit_of_index()]
    return out


def group_masks(params: PyTree, groups: Sequence[Group], keep: Mapping[str, Any]) -> PyTree:
    """Mask pytree (``None`` on untouched leaves) zeroing every removed unit of every group.

    Use with :func:`jaxprune.core.masks.apply_masks` to get the masked model.

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 2, (Member("w", 0, (2,)),))
    >>> group_masks({"w": np.ones((2, 1)), "b": np.ones(1)}, [g], {"h": [0]})["w"].ravel().tolist()
    [True, False]
    """
    ak = axis_keep_masks(params, groups, keep)

    def f(path, x):
        if x is None:
            return None
        touched = [(a, m) for (p, a), m in ak.items() if p == path]
        if not touched:
            return None
        mask = np.ones(np.shape(x), bool)
        for a, m in touched:
            shp = [1] * mask.ndim
            shp[a] = -1
            mask &= m.reshape(shp)
        return jnp.asarray(mask)

    return jax.tree_util.tree_map_with_path(
        lambda p, x: f(_path(p), x), params, is_leaf=lambda x: x is None
    )


def _path(p: Any) -> str:
    from jaxprune.core.masks import path_str

    return path_str(p)


def slim(params: PyTree, groups: Sequence[Group], keep: Mapping[str, Any]) -> PyTree:
    """A smaller params pytree: every removed unit's slices are deleted from every member axis.

    Works on linen dicts, ``nnx.State`` and any pytree whose leaves the groups name.

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 3, (Member("a", 1, (3,)), Member("b", 0, (3,))))
    >>> out = slim({"a": np.ones((2, 3)), "b": np.ones((3, 4))}, [g], {"h": [0, 2]})
    >>> out["a"].shape, out["b"].shape
    ((2, 2), (2, 4))
    """
    ak = axis_keep_masks(params, groups, keep)
    by_path: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (p, a), m in ak.items():
        by_path.setdefault(p, []).append((a, np.nonzero(m)[0]))

    def f(path, x):
        if x is None or path not in by_path:
            return x
        for a, idx in sorted(by_path[path]):
            x = jnp.take(x, jnp.asarray(idx), axis=a)
        return x

    return jax.tree_util.tree_map_with_path(
        lambda p, x: f(_path(p), x), params, is_leaf=lambda x: x is None
    )


def param_count(params: PyTree) -> int:
    """Total number of array elements.

    >>> param_count({"a": np.ones((2, 3)), "b": None})
    6
    """
    return int(sum(np.size(x) for _, x in leaves_with_paths(params) if x is not None))


def compensate_bias(
    params: PyTree,
    groups: Sequence[Group],
    keep: Mapping[str, Any],
    input_means: Mapping[str, Any],
) -> PyTree:
    """FLAP bias compensation: fold the mean contribution of removed input units into the bias.

    For each kernel ``W`` in ``input_means`` (``{kernel_path: mean of the layer input}``, shape
    ``W.shape[:k]``, i.e. the contracted leading axes of a Dense/DenseGeneral kernel, or flat over
    them as ``LayerStats.mean`` gives it; or the ``LayerStats`` of
    :func:`~jaxprune.structured.input_stats` itself, whose traced view gives the real input axes of
    any layout, e.g. a PyTorch-style ``(out, in)`` kernel used as ``x @ w.T`` — a plain array
    always assumes the Flax layout, input axes first), adds
    ``sum_{removed j} mean_j * W[j, ...]`` to the sibling ``bias`` (same path, last part
    ``bias``). Apply *before* :func:`slim` or :func:`group_masks`; the slim and the masked model
    then agree again. Kernels without a sibling bias raise (FLAP needs one to fold into).

    >>> from jaxprune.structured import Group, Member
    >>> p = {"d": {"kernel": np.ones((2, 1), np.float32), "bias": np.zeros(1, np.float32)}}
    >>> g = Group("h", 2, (Member("d/kernel", 0, (2,)),))
    >>> compensate_bias(p, [g], {"h": [0]}, {"d/kernel": np.array([1., 3.])})["d"]["bias"]
    Array([3.], dtype=float32)
    """
    ak = axis_keep_masks(params, groups, keep)
    leaves = dict((p, x) for p, x in leaves_with_paths(params) if x is not None)
    deltas: dict[str, jax.Array] = {}
    for kpath, mean in input_means.items():
        if kpath not in leaves:
            raise ValueError(f"jaxprune.structured.compensate_bias: no kernel at '{kpath}'")
        w = leaves[kpath]
        mean, w, ak_w = _traced_layout(kpath, mean, w, ak)
        mean = jnp.asarray(mean)
        if mean.ndim == 1 and w.ndim > 2 and mean.shape[0] != w.shape[0]:
            # a flat fan-in vector (LayerStats.mean): the leading axes it covers
            sizes = np.cumprod(w.shape[:-1])
            if mean.shape[0] in sizes:
                mean = mean.reshape(w.shape[:int(np.argmax(sizes == mean.shape[0])) + 1])
        k = mean.ndim
        if tuple(w.shape[:k]) != tuple(mean.shape):
            raise ValueError(
                f"jaxprune.structured.compensate_bias: mean for '{kpath}' has shape {mean.shape}; "
                f"expected the kernel's input axes {tuple(w.shape[:k])}"
            )
        kept = np.ones(mean.shape, bool)
        for a in range(k):
            if a in ak_w:
                shp = [1] * k
                shp[a] = -1
                kept &= ak_w[a].reshape(shp)
        bpath = kpath.rsplit("/", 1)[0] + "/bias" if "/" in kpath else "bias"
        if not isinstance(input_means[kpath], LayerStats) and bpath in leaves:
            _check_flax_layout(kpath, bpath, k, groups, _check_keep(groups, keep))
        if kept.all():
            continue
        if bpath not in leaves:
            raise ValueError(
                f"jaxprune.structured.compensate_bias: kernel '{kpath}' has no sibling bias "
                f"'{bpath}' to fold the removed inputs into (use a layer with use_bias=True)"
            )
        removed_mean = jnp.where(jnp.asarray(kept), 0.0, mean).astype(w.dtype)
        delta = jnp.tensordot(removed_mean, w, axes=k)
        if delta.shape != np.shape(leaves[bpath]):
            raise ValueError(
                f"jaxprune.structured.compensate_bias: the correction for '{kpath}' has shape "
                f"{delta.shape} but its bias '{bpath}' has shape {np.shape(leaves[bpath])}; pass "
                "the LayerStats from input_stats (its traced view knows the kernel's layout)")
        deltas[bpath] = delta

    def f(path, x):
        if path in deltas:
            return x + deltas[path].astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(
        lambda p, x: f(_path(p), x), params, is_leaf=lambda x: x is None
    )


def _check_flax_layout(kpath: str, bpath: str, k: int, groups: Sequence[Group],
                       keep: Mapping[str, np.ndarray]) -> None:
    """A plain mean assumes the Flax layout (input axes first): refuse a kernel whose pruned axes
    say otherwise (an axis pruned together with the bias is an output axis; one pruned without
    it, an input axis)."""
    for g in groups:
        if g.name not in keep or len(keep[g.name]) == g.size:
            continue
        axes = {m.axis for m in g.members if m.path == kpath}
        bias = any(m.path == bpath for m in g.members)
        bad = [a for a in axes if a < k] if bias and all(a < k for a in axes) else (
            [a for a in axes if a >= k] if not bias else [])
        if bad:
            raise ValueError(
                f"jaxprune.structured.compensate_bias: '{kpath}' loses units along axis {bad[0]} "
                f"(group '{g.name}'), which is {'an output' if bias else 'an input'} axis (pruned "
                f"{'with' if bias else 'without'} the bias '{bpath}'), not what the Flax layout "
                "a plain mean assumes (input axes first: a PyTorch-style (out, in) kernel?); pass "
                "its LayerStats from input_stats, whose traced view knows the layout")


def _traced_layout(kpath: str, mean: Any, w: Any, ak: Mapping[tuple[str, int], np.ndarray]
                   ) -> tuple[Any, Any, dict[int, np.ndarray]]:
    """``(mean, kernel, {axis: keep})`` in the Flax layout (input axes first). A ``LayerStats``
    with a traced matrix view gives the kernel's real input/output axes (PyTorch ``(out, in)``,
    einsum layouts); a plain array assumes the Flax layout."""
    axes = list(range(np.ndim(w)))
    if isinstance(mean, LayerStats):
        view = mean.view
        if mean.entries > 1 or mean.groups > 1:
            raise ValueError(f"jaxprune.structured.compensate_bias: '{kpath}' is a stacked (scan) "
                             "or grouped-conv layer; bias compensation does not support it")
        mean = mean.mean
        if view is not None and view.has_view:
            if view.batch:
                raise ValueError(f"jaxprune.structured.compensate_bias: '{kpath}' is a batched "
                                 f"matmul weight (einsum batch axes {view.batch}); not supported")
            rest = [a for a in axes if a not in view.fan_in and a not in view.out]
            axes = [*view.fan_in, *rest, *view.out]
            mean = jnp.asarray(mean).reshape([w.shape[a] for a in view.fan_in])
    ak_w = {i: ak[(kpath, a)] for i, a in enumerate(axes) if (kpath, a) in ak}
    return mean, jnp.transpose(jnp.asarray(w), axes), ak_w


def slim_nnx(model: Any, groups: Sequence[Group], keep: Mapping[str, Any]) -> Any:
    """Slim an ``nnx.Module``: returns a new module whose variables are the slim arrays.

    Groups must be discovered on ``nnx.state(model)`` (e.g. with
    ``fn = lambda s, x: nnx.merge(graphdef, s)(x)``). nnx layers read shapes from their variables,
    so the merged module runs at the new sizes; bookkeeping attributes such as ``out_features``
    keep their old values (they are not used in ``__call__`` by ``nnx.Linear``/``nnx.Conv``).

    >>> from flax import nnx
    >>> from jaxprune.zoo.models import NnxMLP
    >>> m = NnxMLP(4, (8, 2), rngs=nnx.Rngs(0))
    >>> g, s = nnx.split(m)
    >>> from jaxprune.structured import discover_groups
    >>> gs = discover_groups(lambda s, x: nnx.merge(g, s)(x), s, jnp.ones((1, 4)))
    >>> slim_nnx(m, gs, {gs[0].name: [0, 1, 2]})(jnp.ones((1, 4))).shape
    (1, 2)
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, slim(state, groups, keep))
