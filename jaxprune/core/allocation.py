"""Allocation: decide each pruned leaf's sparsity from a global target.

An allocation is a frozen dataclass (hashable, static under ``jit``) whose ``allocate`` maps
``(masks, target, scores)`` to a tree of per-leaf sparsities (``None`` where the mask is ``None``).
``target`` may be traced (it usually comes from a schedule), so every rule is written in ``jnp``.

* :class:`Uniform` — every leaf gets ``target``.
* :class:`ERK` — Erdős–Rényi(-Kernel) from RigL: density ∝ ``sum(shape) / prod(shape)``; leaves
  that would exceed density 1 stay dense and the budget is re-solved over the rest
  (``kernel=False`` gives plain ER, using only the last two dims).
* :class:`Global` — one score threshold across leaves, with a per-leaf density floor
  ``min_density`` so no layer collapses.

``overrides`` (``((regex, sparsity), ...)``) fix the sparsity of leaves whose path matches; the rule
is solved over the remaining leaves.

Example:
    >>> import jax.numpy as jnp
    >>> masks = {"a": jnp.ones((10, 10), bool), "b": None}
    >>> Uniform().allocate(masks, 0.5)["a"]
    Array(0.5, dtype=float32)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.masks import PyTree, _is_none, leaves_with_paths
from jaxprune.core.registry import check_free, lookup

__all__ = ["Allocation", "Uniform", "ERK", "Global", "get", "register", "check_sparsity",
           "sparsity_value"]


def check_sparsity(path: str, value: Any, *, allow_full: bool = False) -> None:
    """Raise ``ValueError`` naming ``path`` if a concrete ``value`` is outside ``[0, 1)``.

    ``allow_full=True`` accepts ``1.0`` too: an allocation may prune a whole leaf (layer
    collapse under a global threshold), while a user's target must leave something.

    >>> check_sparsity("dense/kernel", 1.0)
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: sparsity for 'dense/kernel' must be in [0, 1), got 1.0
    """
    if isinstance(value, jax.core.Tracer):
        return
    v = sparsity_value(path, value)
    ok = (0.0 <= v <= 1.0) if allow_full else (0.0 <= v < 1.0)
    if not ok or math.isnan(v):
        rng = "[0, 1]" if allow_full else "[0, 1)"
        raise ValueError(f"jaxprune: sparsity for '{path}' must be in {rng}, got {v}")


def sparsity_value(path: str, value: Any) -> float:
    """A concrete sparsity as a float, or a clear error naming ``path``: strings are refused
    with ``ValueError`` (a pattern spec passed as the sparsity?), booleans, lists and other
    non-numbers with ``TypeError``. Range checks are :func:`check_sparsity`'s.

    >>> sparsity_value("x", np.float32(0.25))
    0.25
    >>> sparsity_value("x", True)
    Traceback (most recent call last):
    ...
    TypeError: jaxprune: sparsity must be a float in [0, 1), got True (bool) for 'x'
    """
    if isinstance(value, str):
        raise ValueError(
            f"jaxprune: sparsity must be a float or None, got {value!r} for '{path}'; a pattern is "
            f"passed as pattern={value!r}"
        )
    shape = getattr(value, "shape", None)
    is_bool = isinstance(value, bool | np.bool_) or str(getattr(value, "dtype", "")) == "bool"
    if is_bool or shape not in (None, ()) or not (
            isinstance(value, numbers.Real) or (shape == () and hasattr(value, "dtype"))):
        raise TypeError(f"jaxprune: sparsity must be a float in [0, 1), got {value!r} "
                        f"({type(value).__name__}) for '{path}'")
    return float(value)


def _override_for(overrides: tuple[tuple[str, float], ...], path: str) -> float | None:
    for pat, val in overrides:
        if re.search(pat, path):
            return val
    return None


class Dims(tuple):
    """The dims an allocation sees for one leaf (its shape, or its true matmul/conv dims from an
    operator map), with ``size`` = the leaf's number of entries (batch axes such as stacked experts
    are in ``size`` but not in the dims)."""

    size: int

    def __new__(cls, dims: tuple[int, ...], size: int | None = None) -> Dims:
        out = super().__new__(cls, tuple(int(d) for d in dims))
        out.size = int(math.prod(out)) if size is None else int(size)
        return out


def _dims(path: str, shape: tuple[int, ...], opmap: Any) -> Dims:
    if opmap is None or path not in opmap or not opmap[path].has_view:
        return Dims(shape)
    return Dims(opmap[path].erk_dims, math.prod(shape))


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Base class: ``allocate(masks, target, scores=None) -> per-leaf sparsity tree``.

    ``traceable``: whether ``allocate`` runs under ``jit`` (a traced ``target`` and scores). An
    allocation that needs concrete values (host-side statistics) sets it to ``False``; then
    :func:`jaxprune.core.pipeline.compute_masks` runs it eagerly and it cannot be used in training.
    """

    traceable: ClassVar[bool] = True
    overrides: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        pairs = self.overrides
        if isinstance(pairs, dict):
            pairs = tuple(pairs.items())
        if not isinstance(pairs, tuple | list) or not all(
                isinstance(x, tuple | list) and len(x) == 2 and isinstance(x[0], str) for x in pairs):
            raise TypeError(f"jaxprune: {type(self).__name__}.overrides must be (regex, sparsity) "
                            f"pairs, e.g. (('attn', 0.3),), got {pairs!r}")
        for p, v in pairs:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"jaxprune: override regex {p!r} is invalid: {e}") from None
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"jaxprune: overrides[{p!r}] must be a number (sparsity in [0, 1)), "
                                f"got {v!r}")
            check_sparsity(f"override {p!r}", v)
        object.__setattr__(self, "overrides", tuple((p, float(v)) for p, v in pairs))

    def allocate(self, masks: PyTree, target: Any, scores: PyTree | None = None,
                 opmap: Any = None) -> PyTree:
        """Per-leaf sparsities for ``target``. With an operator map, shape-based rules (ERK) see
        each weight's true dims (:attr:`jaxprune.core.opmap.LeafOp.erk_dims`), not its layout."""
        check_sparsity("<target>", target)
        flat, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
        paths = [p for p, _ in leaves_with_paths(masks)]
        idx = [i for i, m in enumerate(flat) if m is not None]
        fixed = {i: _override_for(self.overrides, paths[i]) for i in idx}
        free = [i for i in idx if fixed[i] is None]
        sflat = None
        if scores is not None:
            sflat = jax.tree_util.tree_flatten(scores, is_leaf=_is_none)[0]
        solved = self._solve(
            [_dims(paths[i], tuple(flat[i].shape), opmap) for i in free],
            jnp.asarray(target, jnp.float32),
            None if sflat is None else [sflat[i] for i in free],
        ) if free else []
        out: list[Any] = [None] * len(flat)
        for i, v in fixed.items():
            if v is not None:
                out[i] = jnp.asarray(v, jnp.float32)
        for i, v in zip(free, solved, strict=True):
            out[i] = jnp.asarray(v, jnp.float32)
        return jax.tree_util.tree_unflatten(treedef, out)

    def _solve(self, shapes: list[tuple[int, ...]], target: jax.Array,
               scores: list[jax.Array] | None) -> list[jax.Array]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Uniform(Allocation):
    """Same sparsity for every leaf.

    >>> Uniform().allocate({"w": jnp.ones((4, 4), bool)}, 0.25)["w"]
    Array(0.25, dtype=float32)
    """

    def _solve(self, shapes, target, scores):
        return [target for _ in shapes]


def erk_raw(shape: tuple[int, ...], kernel: bool = True) -> float:
    """RigL's unnormalised ERK density: ``sum(shape) / prod(shape)`` (ER: last two dims only).

    >>> erk_raw((4, 6))
    0.4166666666666667
    """
    dims = shape if kernel else shape[-2:]
    return float(sum(dims)) / float(math.prod(dims))


@dataclasses.dataclass(frozen=True)
class ERK(Allocation):
    """Erdős–Rényi-Kernel allocation (RigL, Evci et al. 2020).

    >>> s = ERK().allocate({"a": jnp.ones((4, 4), bool), "b": jnp.ones((64, 64), bool)}, 0.9)
    >>> float(s["a"]) < float(s["b"])
    True
    """

    kernel: bool = True

    def _solve(self, shapes, target, scores):
        sizes = jnp.asarray([getattr(s, "size", math.prod(s)) for s in shapes], jnp.float32)
        raw = jnp.asarray([erk_raw(s, self.kernel) for s in shapes], jnp.float32)
        dense = jnp.zeros(len(shapes), bool)
        eps = jnp.asarray(0.0, jnp.float32)
        # A leaf made dense frees budget, so eps only grows: adding every over-full leaf at once
        # reaches RigL's fixpoint in at most len(shapes) rounds.
        for _ in range(len(shapes) + 1):
            rhs = jnp.sum(jnp.where(dense, -sizes * target, sizes * (1.0 - target)))
            div = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
            eps = rhs / jnp.maximum(div, 1e-30)
            dense = dense | (eps * raw > 1.0)
        density = jnp.where(dense, 1.0, jnp.clip(eps * raw, 0.0, 1.0))
        return [1.0 - density[i] for i in range(len(shapes))]


@dataclasses.dataclass(frozen=True)
class Global(Allocation):
    """One threshold over all leaves' scores; each leaf keeps at least ``min_density``.

    Total kept equals ``round((1 - target) * total)`` except when the floors alone exceed it;
    entries tied at the threshold are kept in leaf order (then by index within the leaf), so equal
    scores still give the exact count.

    >>> sc = {"a": jnp.array([[1., 2.], [3., 4.]]), "b": jnp.array([[10., 20.], [30., 40.]])}
    >>> s = Global(min_density=0.25).allocate(jax.tree.map(lambda x: x > 0, sc), 0.5, sc)
    >>> float(s["a"]), float(s["b"])
    (0.75, 0.25)
    """

    min_density: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.min_density, numbers.Real) or not 0.0 <= self.min_density <= 1.0:
            raise ValueError(f"jaxprune: Global.min_density must be in [0, 1], got {self.min_density}")

    def _solve(self, shapes, target, scores):
        if scores is None:
            raise ValueError("jaxprune: Global allocation needs scores")
        from jaxprune.core.patterns import count_threshold_key, sortable_key

        keys = [sortable_key(s.reshape(-1)) for s in scores]
        sizes = [k.size for k in keys]
        total = sum(sizes)
        floors = jnp.asarray([math.ceil(self.min_density * n) for n in sizes], jnp.int32)
        budget = total - jnp.round(target * total).astype(jnp.int32)

        def count_at(t: jax.Array) -> jax.Array:
            return jnp.stack([jnp.sum(k >= t, dtype=jnp.int32) for k in keys])

        # one global threshold: the smallest t whose kept count (with floors) fits the budget
        t = count_threshold_key(lambda t: jnp.sum(jnp.maximum(count_at(t), floors)), budget)
        c = count_at(t)
        k = jnp.maximum(c, floors)
        # entries tied at the next key below t fill what is left of the budget, in leaf order
        # (the tie rule: the lower index in the leaves' concatenation); without this, equal scores
        # (a constant init, SynFlow on equal weights) kept nothing: 0.5 of ones pruned everything
        below = jnp.max(jnp.stack([jnp.max(jnp.where(x < t, x, jnp.uint32(0))) for x in keys]))
        tied = jnp.stack([jnp.sum((x == below) & (x < t), dtype=jnp.int32) for x in keys])
        gain = jnp.maximum(c + tied, floors) - k
        left = jnp.maximum(budget - jnp.sum(k), 0)
        before = jnp.cumsum(gain) - gain
        k = k + jnp.clip(left - before, 0, gain)
        return [1.0 - k[i].astype(jnp.float32) / sizes[i] for i in range(len(shapes))]


ALLOCATIONS = {"uniform": Uniform, "erk": ERK, "er": lambda: ERK(kernel=False), "global": Global}


def register(name: str, factory: Any, *, overwrite: bool = False) -> None:
    """Make an allocation available by ``name``: ``factory()`` must return an :class:`Allocation`.

    >>> @dataclasses.dataclass(frozen=True)
    ... class Half(Allocation):
    ...     def _solve(self, shapes, target, scores):
    ...         return [target / 2 for _ in shapes]
    >>> register("half_demo", Half)
    >>> float(get("half_demo").allocate({"w": jnp.ones((2, 2), bool)}, 0.5)["w"])
    0.25
    """
    if not callable(factory):
        raise TypeError(f"jaxprune: register('{name}', ...) needs a callable returning an Allocation")
    check_free("allocation", name, ALLOCATIONS, factory, overwrite)
    ALLOCATIONS[name] = factory


def get(name: str | Allocation) -> Allocation:
    """Look up an allocation by name: ``uniform``, ``erk``, ``er``, ``global``.

    >>> get("erk")
    ERK(overrides=(), kernel=True)
    """
    if isinstance(name, Allocation):
        return name
    out = lookup("allocation", name, ALLOCATIONS, Allocation)()
    if not isinstance(out, Allocation):
        raise TypeError(
            f"jaxprune: the factory registered for allocation '{name}' returned "
            f"{type(out).__name__}, not an Allocation"
        )
    return out
