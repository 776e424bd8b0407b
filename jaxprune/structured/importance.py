"""Group importance and unit selection.

Per-element scores come from the shared :mod:`jaxprune.core.criteria` (magnitude, Taylor, Wanda); a
group's unit score is the sum over all its members' slices (L1 / L2 / Taylor / Wanda), or FLAP's
fluctuation ``Var[x_j] * ||W[j, :]||^2`` summed over the group's consumer kernels. Activation
statistics come from the one calibrator, :func:`jaxprune.oneshot.calibrate` (:func:`input_stats`
only re-keys them to the paths of the variables the groups were discovered on).
:func:`choose_units` turns scores into ``keep`` indices through the core pipeline
(:func:`jaxprune.core.pipeline.compute_masks` with each group as one leaf of unit scores):
``Uniform`` (same sparsity in every group) or ``Global`` (scores standardised per group, one
threshold), then keeps at least ``min_keep`` units per group, optionally rounds kept counts to
multiples (e.g. 8) and reports every rounding or refusal.

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

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria
from jaxprune.core.masks import PyTree, leaves_with_paths
from jaxprune.core.patterns import matrix_view
from jaxprune.core.pipeline import compute_masks, leaf_mask
from jaxprune.oneshot.calibration import LayerStats, calibrate
from jaxprune.structured.groups import Group

__all__ = [
    "input_stats",
    "group_scores",
    "Selection",
    "choose_units",
    "CRITERIA",
]

CRITERIA = ("l1", "l2", "taylor", "wanda", "flap")


def input_stats(
    model: Any,
    variables: PyTree,
    batches: Iterable[Any],
    *,
    collect: str = "params",
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Calibration statistics keyed by the paths of ``variables`` (as :func:`discover_groups` names
    members): :func:`jaxprune.oneshot.calibrate` (``gram=False``) with ``"<collect>/"`` prefixed.

    ``variables`` is a linen variables dict (``{"params": ...}``) or, for an nnx ``model``, its
    state (calibrate reads the module itself; keys are then the state's paths). Each value is a
    :class:`~jaxprune.oneshot.calibration.LayerStats` over the layer's fan-in view (a Dense input,
    a flattened conv patch ``(h, w, in)``): ``norms`` (Wanda), ``mean``, ``var``.

    >>> import jax
    >>> from jaxprune.zoo.models import MLP
    >>> m = MLP((4, 2)); v = m.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> st = input_stats(m, v, [jnp.ones((5, 3))])
    >>> st["params/Dense_1/kernel"].mean.shape
    (4,)
    """
    prefix, params = "", variables
    if isinstance(variables, Mapping) and collect in variables:
        others = sorted(k for k in variables if k != collect)
        if others:
            raise ValueError(
                f"jaxprune.structured.input_stats: variables hold collections {others} besides "
                f"'{collect}'; calibration applies the model to '{collect}' only (a model reading "
                "batch statistics cannot be calibrated this way yet)"
            )
        prefix, params = f"{collect}/", variables[collect]
    stats = calibrate(model, params, batches, gram=False, collect=collect, progress=progress)
    return {prefix + k: v for k, v in stats.items()}


def _fan_in_ndim(shape: tuple[int, ...], fan_in: int, path: str) -> int:
    """How many leading kernel axes form the calibrated fan-in."""
    for k in range(1, len(shape) + 1):
        if math.prod(shape[:k]) == fan_in:
            return k
    raise ValueError(f"jaxprune.structured: calibration fan-in {fan_in} of '{path}' is no product "
                     f"of leading axes of its shape {shape}")


def _consumer_rows(w: Any, st: LayerStats, axis: int, path: str
                   ) -> tuple[Any, tuple[int, ...], int] | None:
    """``(W as (fan_in, out), the fan-in axes' sizes in row order, where ``axis`` is among them)``,
    or ``None`` when ``axis`` is not a fan-in axis of the weight. Uses the traced matrix view the
    calibration recorded (any layout: einsum ``(heads, d, head_dim)``, PyTorch ``(out, in)``), else
    the Flax convention (fan-in = leading axes)."""
    view = st.view
    if st.entries > 1:
        raise ValueError(f"jaxprune.structured: '{path}' holds layers stacked for a scan; "
                         "activation criteria (wanda, flap) do not support it, use l2 or taylor")
    if st.groups > 1:
        raise ValueError(f"jaxprune.structured: '{path}' is a grouped conv ({st.groups} groups); "
                         "activation criteria (wanda, flap) do not support it, use l2 or taylor")
    if view is not None and view.has_view:
        if view.batch:
            raise ValueError(f"jaxprune.structured: '{path}' is a batched matmul weight (axes "
                             f"{view.batch} are einsum batch axes); activation criteria (wanda, "
                             "flap) do not support it, use l2 or taylor")
        if axis not in view.fan_in:
            return None
        return view.to_view(w), tuple(w.shape[a] for a in view.fan_in), view.fan_in.index(axis)
    k = _fan_in_ndim(tuple(w.shape), st.fan_in, path)
    if axis >= k:
        return None
    return w.reshape(matrix_view(w.shape, st.fan_in)), tuple(w.shape[:k]), axis


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


def _check_members(leaves: Mapping[str, Any], groups: Sequence[Group], what: str) -> None:
    """Every member of every group is a leaf of ``leaves`` whose axis has the group's length."""
    for g in groups:
        for m in g.members:
            if m.path not in leaves:
                hint = ("were the groups discovered on other variables?" if what == "params" else
                        "pass gradients of every kernel the groups touch")
                raise ValueError(f"jaxprune.structured.group_scores: group '{g.name}' member "
                                 f"'{m.path}' is not in {what} ({hint})")
            shp = np.shape(leaves[m.path])
            if len(shp) <= m.axis or shp[m.axis] != math.prod(m.sizes):
                raise ValueError(f"jaxprune.structured.group_scores: {what} '{m.path}' has shape "
                                 f"{shp}; group '{g.name}' expects axis {m.axis} of length "
                                 f"{math.prod(m.sizes)} (were the groups discovered on other "
                                 "variables?)")


def group_scores(
    params: PyTree,
    groups: Sequence[Group],
    criterion: str = "l2",
    *,
    grads: PyTree | None = None,
    stats: Mapping[str, LayerStats] | None = None,
) -> dict[str, np.ndarray]:
    """Per-unit importance ``{group name: float[size]}`` (higher = keep).

    Criteria: ``l1`` / ``l2`` (norm of all the group's slices), ``taylor`` (``|sum -g*w|`` over the
    group, needs ``grads``), ``wanda`` (``sum |w| * ||x||`` over the group's consumer kernels, needs
    ``stats``), ``flap`` (``sum Var[x_j] * ||W[j]||^2`` over consumer kernels, needs ``stats``).
    ``stats`` maps kernel paths (the members' paths) to
    :class:`~jaxprune.oneshot.calibration.LayerStats`, e.g. from :func:`input_stats`.

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 2, (Member("w", 0, (2,)),))
    >>> group_scores({"w": jnp.array([[3., 4.], [1., 0.]])}, [g], "l2")["h"].tolist()
    [5.0, 1.0]
    """
    if criterion not in CRITERIA:
        raise ValueError(f"jaxprune.structured.group_scores: unknown criterion '{criterion}'; "
                         f"valid: {list(CRITERIA)}")
    leaves = {p: x for p, x in leaves_with_paths(params) if x is not None}
    touched = {m.path for g in groups for m in g.members}
    _check_members(leaves, groups, "params")
    if criterion in ("l1", "l2"):
        mag = {p: np.asarray(criteria.magnitude({"w": leaves[p]})["w"]) for p in touched}
        leaf = {p: v if criterion == "l1" else v**2 for p, v in mag.items()}
        out = {g.name: sum(_member_vectors(leaf, g)) for g in groups}
        return {k: np.sqrt(v) if criterion == "l2" else v for k, v in out.items()}
    if criterion == "taylor":
        if grads is None:
            raise ValueError("jaxprune.structured.group_scores: criterion 'taylor' needs grads=")
        gl = {p: x for p, x in leaves_with_paths(grads) if x is not None}
        # vectors without gradients (BatchNorm statistics, grads of params only) are skipped; a
        # missing kernel, or a group with no gradient at all, would silently change the ranking
        _check_members({p: x for p, x in gl.items() if p in leaves}, [
            type(g)(g.name, g.size, tuple(m for m in g.members if m.path in gl
                                          or np.ndim(leaves[m.path]) >= 2
                                          or not any(m2.path in gl for m2 in g.members)))
            for g in groups], "grads")
        leaf = {p: np.asarray(criteria.taylor({"w": leaves[p]}, grads={"w": gl[p]})["w"])
                for p in touched if p in gl}
        return {g.name: np.abs(sum(_member_vectors(leaf, g))) for g in groups}
    if stats is None:
        raise ValueError(f"jaxprune.structured.group_scores: criterion '{criterion}' needs stats= "
                         "(from input_stats or jaxprune.oneshot.calibrate)")
    if not any(m.path in stats for g in groups for m in g.members):
        raise ValueError(f"jaxprune.structured.group_scores: no group member is a key of stats "
                         f"(stats keys: {sorted(stats)[:5]}; members: {sorted(touched)[:5]}); "
                         "calibrate on the variables the groups were discovered on")
    out = {}
    for g in groups:
        acc = np.zeros(g.size)
        for m in g.members:
            st = stats.get(m.path)
            if st is None:
                continue
            rows = _consumer_rows(jnp.asarray(leaves[m.path], jnp.float32), st, m.axis, m.path)
            if rows is None:
                continue  # only input (consumer) axes carry activation statistics
            wm, fan_shape, pos = rows
            if criterion == "wanda":  # sum over outputs of |w| * ||x_j||
                r = st.norms * np.asarray(jnp.sum(jnp.abs(wm), axis=1))
            else:  # flap: fluctuation metric Var[x_j] * ||W[j]||^2
                r = st.var * np.asarray(jnp.sum(wm**2, axis=1))
            s = r.reshape(fan_shape)
            other = tuple(i for i in range(s.ndim) if i != pos)
            v = s.sum(axis=other) if other else s
            acc += np.bincount(m.unit_of_index(), weights=np.asarray(v, np.float64),
                               minlength=g.size)
        out[g.name] = acc
    return out


def _global_masks(sc: Mapping[str, Any], target: float, min_density: float,
                  notes: list[str]) -> dict[str, Any]:
    """One exact global selection over standardised unit scores: every group keeps its
    ``ceil(min_density * size)`` best units, the remaining budget goes to the best other units of
    all groups (ties: earlier group, then lower index). A threshold would keep or drop every unit
    tied at it; standardised scores tie often (a group of two units is always ``(-1, +1)``)."""
    names = list(sc)
    sizes = [int(sc[n].size) for n in names]
    total = sum(sizes)
    budget = total - int(round(target * total))
    floors = [min(s, math.ceil(min_density * s)) for s in sizes]
    fl = [leaf_mask(sc[n], n_keep=f, path=n) for n, f in zip(names, floors, strict=True)]
    extra = budget - sum(floors)
    if extra <= 0:
        if extra < 0:
            notes.append(f"global allocation: the per-group floors (min_density={min_density}) keep "
                         f"{sum(floors)} of {total} units, more than the {budget} asked for")
        return dict(zip(names, fl, strict=True))
    # the floor units are taken: they rank below every other unit here (keep_pruned=False)
    rest = leaf_mask(jnp.concatenate([sc[n] for n in names]), n_keep=extra, path="global",
                     keep_pruned=~jnp.concatenate(fl))
    parts = np.split(np.asarray(rest), np.cumsum(sizes)[:-1])
    return {n: jnp.asarray(np.asarray(m) | p) for n, m, p in zip(names, fl, parts, strict=True)}


class Selection(NamedTuple):
    """Result of :func:`choose_units`: ``keep`` indices per group and human-readable ``notes``."""

    keep: dict[str, np.ndarray]
    notes: list[str]


def _round_keep(k: int, size: int, multiple: int) -> int:
    if multiple <= 1 or size <= multiple:
        return k
    return int(min(size, max(multiple, multiple * round(k / multiple))))


def _allocation(allocation: alloc_lib.Allocation | str) -> alloc_lib.Allocation:
    alloc = allocation
    if isinstance(allocation, str) and allocation in ("uniform", "global"):
        alloc = alloc_lib.get(allocation)
    if not isinstance(alloc, alloc_lib.Uniform | alloc_lib.Global):
        raise ValueError(f"jaxprune.structured.choose_units: allocation must be 'uniform', 'global', "
                         f"Uniform(...) or Global(...), got {allocation!r}")
    return alloc


def choose_units(
    scores: Mapping[str, np.ndarray],
    groups: Sequence[Group],
    sparsity: float | Mapping[str, float],
    *,
    allocation: alloc_lib.Allocation | str = "uniform",
    round_to: int = 1,
    min_keep: int = 1,
) -> Selection:
    """Choose which units of each group to keep, through the core mask pipeline.

    Each group is one leaf ``{name: unit scores}`` of a tree handed to
    :func:`jaxprune.core.pipeline.compute_masks` with the unstructured pattern.

    Args:
      scores: from :func:`group_scores`.
      groups: the groups to prune (others in ``scores`` are ignored).
      sparsity: fraction of units to remove, in ``[0, 1)``: one float, or ``{group name: sparsity}``
        (groups not named keep every unit; uniform allocation only).
      allocation: ``"uniform"`` / ``Uniform()`` (each group loses ``round(sparsity * size)``
        units) or ``"global"`` / ``Global(min_density=...)`` (scores standardised within each group,
        one threshold removing ``round(sparsity * total)`` units, each group keeping at least
        ``min_density`` of its units).
      round_to: round kept counts to a multiple of this (e.g. 8 for hardware-friendly shapes).
      min_keep: never keep fewer units in a group; when the sparsity asks for fewer (e.g. it would
        remove every head of a layer) the ``min_keep`` best units are kept and a note says so.

    Counts are whole units; every rounding that changes the requested count is reported in
    ``notes`` (with GQA a query-head unit spans one head per kv group, so 25% of 8 query heads with
    2 kv heads removes 1 unit = 2 heads, and 30% is rounded to that too). Among equal scores the
    lower unit index is kept.

    >>> from jaxprune.structured import Group, Member
    >>> g = Group("h", 4, (Member("w", 0, (4,)),))
    >>> sel = choose_units({"h": np.array([4., 3., 2., 1.])}, [g], 0.6)
    >>> sel.keep["h"].tolist(), sel.notes
    ([0, 1], ["group 'h': sparsity 0.6 of 4 units = 2.4, rounded to 2 whole units"])
    """
    alloc = _allocation(allocation)
    for arg, val in (("round_to", round_to), ("min_keep", min_keep)):
        if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < 1:
            raise ValueError(f"jaxprune.structured.choose_units: {arg} must be an integer >= 1, "
                             f"got {val!r}")
    per_group = isinstance(sparsity, Mapping)
    unknown = sorted(set(sparsity) - {g.name for g in groups}) if per_group else []
    if unknown:
        raise ValueError(f"jaxprune.structured.choose_units: sparsity names {unknown[:5]} are not "
                         "among the groups")
    sp: dict[str, float] = {}
    sc: dict[str, Any] = {}
    for g in groups:
        s = sparsity.get(g.name, 0.0) if per_group else sparsity
        alloc_lib.check_sparsity(f"group '{g.name}'", s)
        if g.name not in scores:
            raise ValueError(f"jaxprune.structured.choose_units: no scores for group '{g.name}'")
        v = np.asarray(scores[g.name], np.float64).reshape(-1)
        if v.shape != (g.size,):
            raise ValueError(f"jaxprune.structured.choose_units: scores for group '{g.name}' have "
                             f"shape {v.shape}, the group has {g.size} units")
        if isinstance(alloc, alloc_lib.Global):  # scores of different layers are not comparable
            sd = v.std()
            v = (v - v.mean()) / (sd if sd > 0 else 1.0)
        sp[g.name], sc[g.name] = float(s), jnp.asarray(v, jnp.float32)
    if not groups:
        return Selection({}, [])
    target = sparsity if not per_group else 0.0
    if per_group:
        if isinstance(alloc, alloc_lib.Global):
            raise ValueError("jaxprune.structured.choose_units: a global allocation needs one "
                             "sparsity, not one per group")
        alloc = alloc_lib.Uniform(overrides=tuple(
            (f"^{re.escape(n)}$", v) for n, v in sp.items()))
    notes: list[str] = []
    if isinstance(alloc, alloc_lib.Global) and not alloc.overrides:
        masks = _global_masks(sc, float(target), alloc.min_density, notes)
    else:
        masks = compute_masks({n: jnp.ones(v.shape, bool) for n, v in sc.items()}, sc, target,
                              alloc, "unstructured")
    keep = {}
    for g in groups:
        k = int(np.asarray(masks[g.name]).sum())
        want = sp[g.name] * g.size
        if isinstance(alloc, alloc_lib.Uniform) and abs(want - (g.size - k)) > 1e-6:
            notes.append(f"group '{g.name}': sparsity {sp[g.name]:.3g} of {g.size} units = "
                         f"{want:.3g}, rounded to {g.size - k} whole units")
        k2 = _round_keep(k, g.size, round_to)
        if k2 != k:
            notes.append(f"group '{g.name}': kept count {k} rounded to {k2} (multiple of "
                         f"{round_to})")
        if k2 < min_keep:
            notes.append(f"group '{g.name}': sparsity would keep {k2} of {g.size} units; keeping the "
                         f"best {min(min_keep, g.size)} instead (a layer cannot lose every unit)")
            warnings.warn(f"jaxprune.structured.choose_units: {notes[-1]}", stacklevel=2)
            k2 = min(min_keep, g.size)
        m = masks[g.name] if k2 == k else leaf_mask(sc[g.name], n_keep=k2, path=g.name)
        keep[g.name] = np.nonzero(np.asarray(m))[0]
    return Selection(keep, notes)


def gqa_note(n_q: int, n_kv: int, sparsity: float) -> str:
    """Explain how a query-head sparsity maps onto whole GQA units.

    >>> gqa_note(8, 2, 0.3).endswith("so 2 heads (25%) are removed")
    True
    """
    g = n_q // n_kv
    units = int(round(sparsity * g))
    return (f"removing {sparsity:.0%} of {n_q} query heads = {sparsity * n_q:.3g} heads; with "
            f"{n_kv} kv heads a unit is {n_kv} heads, so {units * n_kv} heads ({units / g:.0%}) "
            "are removed")
