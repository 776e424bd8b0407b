"""Group importance and unit selection.

Per-element scores come from the shared :mod:`jaxprune.core.criteria` (magnitude, Taylor, Wanda); a
group's unit score is the sum over all its members' slices (L1 / L2 / Taylor / Wanda), or FLAP's
fluctuation ``Var[x_j] * ||W[j, :]||^2`` summed over the group's consumer kernels.
:func:`choose_units` turns scores into ``keep`` indices: per-group (same ratio everywhere) or global
(scores standardised per group, one threshold), with optional rounding of kept counts to multiples
of 8 and a report of every rounding or refusal.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 3, (Member("w", 1, (3,)),))
    >>> s = group_scores({"w": jnp.array([[1., -5., 2.]])}, [g], "l1")
    >>> s["h"].tolist()
    [1.0, 5.0, 2.0]
    >>> choose_units(s, [g], 1 / 3).keep["h"].tolist()
    [1, 2]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxprune.core import criteria
from jaxprune.core.masks import PyTree, leaves_with_paths
from jaxprune.structured.groups import Group

__all__ = [
    "InputStats",
    "input_stats",
    "group_scores",
    "Selection",
    "choose_units",
    "METHODS",
]

METHODS = ("l1", "l2", "taylor", "wanda", "flap")


class InputStats(NamedTuple):
    """Per-input-feature statistics of one kernel's input: mean, variance, mean square, count."""

    mean: np.ndarray
    var: np.ndarray
    sq: np.ndarray
    count: int


def input_stats(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    batches: Iterable[Any],
    prefix: str = "params",
) -> dict[str, InputStats]:
    """Calibration: statistics of the input of every linen module owning a ``kernel`` param.

    Returns ``{"params/<module path>/kernel": InputStats}`` with stats over the kernel's input axes
    (``kernel.shape[:k]`` for Dense/DenseGeneral, the input channel for Conv). Captured with
    ``nn.intercept_methods`` (works for any linen model that uses such modules).

    >>> from jaxprune.zoo.models import MLP
    >>> import jax
    >>> m = MLP((4, 2)); v = m.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> st = input_stats(m.apply, v, [jnp.ones((5, 3))])
    >>> st["params/Dense_1/kernel"].mean.shape
    (4,)
    """
    acc: dict[str, list[Any]] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and args and mod.scope is not None:
            try:
                has_kernel = mod.has_variable("params", "kernel")
            except Exception:  # noqa: BLE001 - modules without params scope
                has_kernel = False
            if has_kernel:
                x = args[0]
                w = mod.get_variable("params", "kernel")
                k = _input_ndim(x.shape, w.shape)
                if k:
                    if w.ndim == x.ndim and x.shape[-1] == w.shape[-2] and w.ndim > 2:  # conv
                        feat = x.reshape(-1, x.shape[-1])
                    else:
                        feat = x.reshape(-1, *x.shape[x.ndim - k:])
                    feat = jnp.asarray(feat, jnp.float32)
                    path = "/".join((prefix, *mod.path, "kernel"))
                    s = acc.setdefault(path, [0.0, 0.0, 0])
                    s[0] = s[0] + feat.sum(0)
                    s[1] = s[1] + (feat**2).sum(0)
                    s[2] += feat.shape[0]
        return next_fun(*args, **kwargs)

    for b in batches:
        with nn.intercept_methods(interceptor):
            apply_fn(variables, b)
    out = {}
    for path, (s, s2, n) in acc.items():
        mean = np.asarray(s) / n
        sq = np.asarray(s2) / n
        out[path] = InputStats(mean, np.maximum(sq - mean**2, 0.0), sq, n)
    if not out:
        raise ValueError(
            "jaxprune.structured.input_stats: no module with a 'kernel' param was called; is "
            "apply_fn a linen apply and are the batches non-empty?"
        )
    return out


def _input_ndim(xs: tuple[int, ...], ws: tuple[int, ...]) -> int:
    if len(ws) > 2 and len(ws) == len(xs) and xs[-1] == ws[-2]:
        return 1  # conv (..., in, out)
    for k in range(min(len(xs), len(ws) - 1), 0, -1):
        if tuple(xs[-k:]) == tuple(ws[:k]):
            return k
    return 0


def _member_vectors(leaf_scores: Mapping[str, Any], g: Group) -> list[np.ndarray]:
    vecs = []
    for m in g.members:
        s = leaf_scores.get(m.path)
        if s is None:
            continue
        s = np.asarray(s, np.float64)
        other = tuple(i for i in range(s.ndim) if i != m.axis)
        v = s.sum(axis=other) if other else s
        vecs.append(np.bincount(m.unit_of_index(), weights=v, minlength=g.size))
    return vecs


def group_scores(
    params: PyTree,
    groups: Sequence[Group],
    method: str = "l2",
    *,
    grads: PyTree | None = None,
    stats: Mapping[str, InputStats] | None = None,
) -> dict[str, np.ndarray]:
    """Per-unit importance ``{group name: float[size]}`` (higher = keep).

    Methods: ``l1`` / ``l2`` (norm of all the group's slices), ``taylor`` (``|sum -g*w|`` over the
    group, needs ``grads``), ``wanda`` (``sum |w| * ||x||`` over the group's consumer kernels, needs
    ``stats``), ``flap`` (``sum Var[x_j] * ||W[j]||^2`` over consumer kernels, needs ``stats``).

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 2, (Member("w", 0, (2,)),))
    >>> group_scores({"w": jnp.array([[3., 4.], [1., 0.]])}, [g], "l2")["h"].tolist()
    [5.0, 1.0]
    """
    if method not in METHODS:
        raise ValueError(f"jaxprune.structured.group_scores: unknown method '{method}'; "
                         f"valid: {list(METHODS)}")
    leaves = {p: x for p, x in leaves_with_paths(params) if x is not None}
    touched = {m.path for g in groups for m in g.members}
    missing = sorted(touched - set(leaves))
    if missing:
        raise ValueError(f"jaxprune.structured.group_scores: group members {missing[:5]} are not "
                         "in params")
    if method in ("l1", "l2"):
        mag = {p: np.asarray(criteria.magnitude({"w": leaves[p]})["w"]) for p in touched}
        leaf = {p: v if method == "l1" else v**2 for p, v in mag.items()}
        out = {g.name: sum(_member_vectors(leaf, g)) for g in groups}
        return {k: np.sqrt(v) if method == "l2" else v for k, v in out.items()}
    if method == "taylor":
        if grads is None:
            raise ValueError("jaxprune.structured.group_scores: method 'taylor' needs grads=")
        gl = {p: x for p, x in leaves_with_paths(grads) if x is not None}
        leaf = {p: np.asarray(criteria.taylor({"w": leaves[p]}, grads={"w": gl[p]})["w"])
                for p in touched if p in gl}
        return {g.name: np.abs(sum(_member_vectors(leaf, g))) for g in groups}
    if stats is None:
        raise ValueError(f"jaxprune.structured.group_scores: method '{method}' needs stats= "
                         "(from input_stats)")
    out = {}
    for g in groups:
        acc = np.zeros(g.size)
        for m in g.members:
            st = stats.get(m.path)
            if st is None or m.axis >= np.ndim(st.mean):
                continue  # only consumer (input-axis) members carry activation statistics
            w = leaves[m.path]
            if method == "wanda":
                norms = np.sqrt(st.sq * st.count)
                s = np.asarray(criteria.wanda({"w": w}, act_norms={"w": norms})["w"])
            else:  # flap: fluctuation metric
                k = np.ndim(st.mean)
                colsq = np.asarray(jnp.sum(jnp.asarray(w, jnp.float32) ** 2,
                                           axis=tuple(range(k, w.ndim))))
                s = (st.var * colsq).reshape(colsq.shape)
            other = tuple(i for i in range(s.ndim) if i != m.axis)
            v = s.sum(axis=other) if other else s
            acc += np.bincount(m.unit_of_index(), weights=np.asarray(v, np.float64),
                               minlength=g.size)
        out[g.name] = acc
    return out


class Selection(NamedTuple):
    """Result of :func:`choose_units`: ``keep`` indices per group and human-readable ``notes``."""

    keep: dict[str, np.ndarray]
    notes: list[str]


def _round_keep(k: int, size: int, multiple: int) -> int:
    if multiple <= 1 or size <= multiple:
        return k
    return int(min(size, max(multiple, multiple * round(k / multiple))))


def choose_units(
    scores: Mapping[str, np.ndarray],
    groups: Sequence[Group],
    ratio: float | Mapping[str, float],
    *,
    allocation: str = "per_group",
    round_to: int = 1,
    min_keep: int = 1,
) -> Selection:
    """Choose which units to keep.

    Args:
      scores: from :func:`group_scores`.
      groups: the groups to prune (others in ``scores`` are ignored).
      ratio: fraction of units to remove (one float, or per group name).
      allocation: ``"per_group"`` (each group loses ``round(ratio * size)`` units) or ``"global"``
        (scores standardised within each group, one global threshold removing
        ``round(ratio * total)`` units).
      round_to: round kept counts to a multiple of this (e.g. 8 for hardware-friendly shapes).
      min_keep: never keep fewer units in a group; when the ratio asks for fewer (e.g. it would
        remove every head of a layer) ``min_keep`` best units are kept and a note says so.

    Counts are rounded to whole units; every rounding that changes the requested count is reported
    in ``notes`` (with GQA a query-head unit spans one head per kv group, so 25% of 8 query heads
    with 2 kv heads removes 1 unit = 2 heads, and 30% is rounded to that too).

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 4, (Member("w", 0, (4,)),))
    >>> sel = choose_units({"h": np.array([4., 3., 2., 1.])}, [g], 1.0)
    >>> sel.keep["h"].tolist(), sel.notes[0].startswith("group 'h'")
    ([0], True)
    """
    if allocation not in ("per_group", "global"):
        raise ValueError(f"jaxprune.structured.choose_units: allocation must be 'per_group' or "
                         f"'global', got '{allocation}'")
    notes: list[str] = []
    ratios = {}
    for g in groups:
        r = ratio.get(g.name, 0.0) if isinstance(ratio, Mapping) else ratio
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"jaxprune.structured.choose_units: ratio for group '{g.name}' must be in "
                             f"[0, 1], got {r}")
        if g.name not in scores:
            raise ValueError(f"jaxprune.structured.choose_units: no scores for group '{g.name}'")
        ratios[g.name] = float(r)
    n_keep: dict[str, int] = {}
    if allocation == "per_group":
        for g in groups:
            want = ratios[g.name] * g.size
            n_keep[g.name] = g.size - int(round(want))
            if abs(want - round(want)) > 1e-9:
                notes.append(f"group '{g.name}': removing {ratios[g.name]:.3g} of {g.size} units "
                             f"= {want:.3g}, rounded to {int(round(want))} whole units")
    else:
        z = []
        for g in groups:
            s = np.asarray(scores[g.name], np.float64)
            sd = s.std()
            z.append((s - s.mean()) / (sd if sd > 0 else 1.0))
        allz = np.concatenate(z)
        rs = set(ratios.values())
        if len(rs) != 1:
            raise ValueError("jaxprune.structured.choose_units: global allocation needs one ratio")
        n_remove = int(round(rs.pop() * len(allz)))
        order = np.argsort(allz, kind="stable")
        removed = np.zeros(len(allz), bool)
        removed[order[:n_remove]] = True
        off = 0
        for g in groups:
            n_keep[g.name] = int((~removed[off:off + g.size]).sum())
            off += g.size
    keep = {}
    for g in groups:
        k = n_keep[g.name]
        k2 = _round_keep(k, g.size, round_to)
        if k2 != k:
            notes.append(f"group '{g.name}': kept count {k} rounded to {k2} (multiple of "
                         f"{round_to})")
        if k2 < min_keep:
            notes.append(f"group '{g.name}': ratio would keep {k2} of {g.size} units; keeping the "
                         f"best {min(min_keep, g.size)} instead (a layer cannot lose every unit)")
            warnings.warn(f"jaxprune.structured.choose_units: {notes[-1]}", stacklevel=2)
            k2 = min(min_keep, g.size)
        s = np.asarray(scores[g.name], np.float64)
        top = np.argsort(-s, kind="stable")[:k2]
        keep[g.name] = np.sort(top)
    return Selection(keep, notes)


def gqa_note(n_q: int, n_kv: int, ratio: float) -> str:
    """Explain how a query-head ratio maps onto whole GQA units.

    >>> gqa_note(8, 2, 0.3).endswith("so 2 heads (25%) are removed")
    True
    """
    g = n_q // n_kv
    units = int(round(ratio * g))
    return (f"removing {ratio:.0%} of {n_q} query heads = {ratio * n_q:.3g} heads; with {n_kv} kv "
            f"heads a unit is {n_kv} heads, so {units * n_kv} heads ({units / g:.0%}) are removed")
