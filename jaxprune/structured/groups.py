"""Dependency groups: which parameter axes must shrink together, discovered by tracing the jaxpr.

A :class:`Group` is a set of parameter axes (or *factors* of axes) that index the same structural
unit: an MLP hidden unit (a column of one kernel, the bias entry, a row of the next kernel), a conv
channel (conv output channel, BatchNorm scale/bias/mean/var, the next conv's input channel, the
matching rows of a dense layer after a flatten), an attention head (q/k/v output features and o
input features of that head; with GQA a kv head carries its query heads), a GLU unit (gate and up
columns, down row).

:func:`discover_groups` traces ``fn(variables, *args)`` with :func:`jax.make_jaxpr` and propagates,
for every axis of every intermediate array, *which parameter axis it derives from*. Axes that meet
(in an elementwise op, a contraction, a batch dimension of ``dot_general``) are unioned. Reshapes
split or merge axes into *factors* (``(heads * head_dim)`` → ``heads``, ``head_dim``), so a group can
own one factor of an axis: unit ``u`` of the group is every index whose digit at that factor is ``u``.
Parameter axes that reach the model output, meet data (inputs, constants) or are sliced / rolled /
gathered are *fixed* (not prunable). Axes that are reduced over (``mean`` in a LayerNorm, ``softmax``)
are still grouped but marked ``exact=False``: removing them changes the normalisation statistics,
so a slim model would differ from the masked one.

The tracing is a :class:`~jaxprune.core.walker.Walker` (a generic jaxpr interpreter) over the
label domain of :mod:`jaxprune.structured.labels` with the per-primitive rules of
:mod:`jaxprune.structured.rules`; ``scan``, ``while`` and ``cond`` bodies are walked too.
An op the tracer does not understand raises :class:`TraceError` naming the op and the parameters
that flow into it; :func:`declare_groups` is the fallback.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
    ...           "b": {"kernel": jnp.ones((8, 3))}}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
    >>> [g.describe() for g in discover_groups(fn, params, jnp.ones((2, 4)))]
    ['a/kernel[1] (8 units): a/bias[0], a/kernel[1], b/kernel[0]']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jaxprune.core.masks import PyTree, leaves_with_paths
from jaxprune.core.walker import TraceError, Walker
from jaxprune.structured.labels import Item, _expand, _find, _fix_items, _leaf_items, _Node, _origins, _rigid
from jaxprune.structured.rules import RULES, barrier, fix_indices, guard_default

__all__ = [
    "Member",
    "Group",
    "TraceError",
    "discover_groups",
    "declare_groups",
    "param_shapes",
]

# ------------------------------------------------------------------------------------------------
# Public data types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One parameter axis (or one factor of it) belonging to a group.

    The axis of length ``prod(sizes)`` is read as a row-major multi-index over ``sizes``; the group's
    unit ``u`` owns every index whose digit at position ``pos`` equals ``u``.

    >>> m = Member("attn/q/kernel", 1, (2, 4), 0)   # 2 heads of dim 4 packed in one axis
    >>> m.indices(1).tolist()
    [4, 5, 6, 7]
    """

    path: str
    axis: int
    sizes: tuple[int, ...]
    pos: int = 0

    @property
    def units(self) -> int:
        """Number of units (``sizes[pos]``)."""
        return self.sizes[self.pos]

    def unit_of_index(self) -> np.ndarray:
        """For each index along the axis, the unit it belongs to.

        >>> Member("w", 0, (2, 3), 1).unit_of_index().tolist()
        [0, 1, 2, 0, 1, 2]
        """
        n = math.prod(self.sizes)
        inner = math.prod(self.sizes[self.pos + 1:])
        return (np.arange(n) // inner) % self.sizes[self.pos]

    def indices(self, unit: int) -> np.ndarray:
        """Indices along the axis owned by ``unit``."""
        return np.nonzero(self.unit_of_index() == unit)[0]


@dataclass(frozen=True)
class Group:
    """Parameter axes that shrink together; ``size`` units, each removable on its own.

    ``exact`` is False when the group's axis is reduced over inside the model (norm statistics,
    softmax): slimming it is allowed but the slim model is not numerically the masked model.

    >>> g = Group("h", 8, (Member("a/kernel", 1, (8,)), Member("b/kernel", 0, (8,))))
    >>> g.paths()
    ('a/kernel', 'b/kernel')
    """

    name: str
    size: int
    members: tuple[Member, ...]
    exact: bool = True
    kind: str = field(default="", compare=False)

    def paths(self) -> tuple[str, ...]:
        """Sorted unique parameter paths touched by the group."""
        return tuple(sorted({m.path for m in self.members}))

    def key(self) -> frozenset[tuple[str, int, tuple[int, ...], int]]:
        """Hashable identity (member set), handy to compare with expected groups."""
        return frozenset((m.path, m.axis, m.sizes, m.pos) for m in self.members)

    def simple_key(self) -> frozenset[tuple[str, int]]:
        """``{(path, axis)}`` ignoring factorisation."""
        return frozenset((m.path, m.axis) for m in self.members)

    def describe(self) -> str:
        """One-line human-readable summary."""
        mem = ", ".join(
            f"{m.path}[{m.axis}]" + (f"{{{m.pos} of {m.sizes}}}" if len(m.sizes) > 1 else "")
            for m in sorted(self.members, key=lambda m: (m.path, m.axis, m.pos))
        )
        flag = "" if self.exact else " (inexact)"
        return f"{self.name} ({self.size} units){flag}: {mem}"


def param_shapes(params: PyTree) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` for every array leaf.

    >>> import jax.numpy as jnp
    >>> param_shapes({"a": jnp.ones((2, 3))})
    {'a': (2, 3)}
    """
    return {p: tuple(x.shape) for p, x in leaves_with_paths(params) if hasattr(x, "shape")}


def declare_groups(
    spec: Sequence[Sequence[tuple[str, int] | tuple[str, int, tuple[int, ...], int]]],
    params: PyTree,
    names: Sequence[str] | None = None,
) -> list[Group]:
    """Explicit group declarations (fallback when tracing is not possible).

    Each group is a list of ``(path, axis)`` or ``(path, axis, sizes, pos)`` entries; shapes are
    checked against ``params``.

    >>> import jax.numpy as jnp
    >>> p = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
    >>> declare_groups([[("a", 1), ("b", 0)]], p)[0].size
    8
    """
    shapes = param_shapes(params)
    out = []
    for gi, entries in enumerate(spec):
        members = []
        for e in entries:
            path, axis = e[0], int(e[1])
            if path not in shapes:
                raise ValueError(
                    f"jaxprune.structured.declare_groups: group {gi}: no parameter at path "
                    f"'{path}'; known paths: {sorted(shapes)[:20]}"
                )
            shp = shapes[path]
            if not -len(shp) <= axis < len(shp):
                raise ValueError(
                    f"jaxprune.structured.declare_groups: group {gi}: '{path}' of shape {shp} has "
                    f"no axis {axis} (valid: {-len(shp)}..{len(shp) - 1})"
                )
            axis %= len(shp)
            sizes, pos = (tuple(e[2]), int(e[3])) if len(e) > 2 else ((shp[axis],), 0)
            if math.prod(sizes) != shp[axis]:
                raise ValueError(
                    f"jaxprune.structured.declare_groups: group {gi}: factor sizes {sizes} do not "
                    f"multiply to the length {shp[axis]} of axis {axis} of '{path}'"
                )
            members.append(Member(path, axis, sizes, pos))
        units = {m.units for m in members}
        if len(units) != 1:
            raise ValueError(
                f"jaxprune.structured.declare_groups: group {gi} mixes unit counts {sorted(units)}"
            )
        name = names[gi] if names else f"{members[0].path}[{members[0].axis}]"
        out.append(Group(name, units.pop(), tuple(members)))
    return out

_HINT = ("Declare the groups explicitly with jaxprune.structured.declare_groups(...), or pass "
         "opaque_ops={{'{name}'}} to discover_groups to treat it as a barrier (every parameter "
         "axis flowing into it is then kept whole).")


def discover_groups(
    fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    opaque_ops: Iterable[str] = (),
    include_fixed: bool = False,
    min_size: int = 2,
) -> list[Group]:
    """Trace ``fn(variables, *args)`` and return the parameter-axis groups that shrink together.

    Args:
      fn: the model's apply function, e.g. ``lambda v, x: model.apply(v, x)`` (linen, with *all*
        collections in ``variables`` so BatchNorm statistics are traced too) or
        ``lambda s, x: nnx.merge(graphdef, s)(x)`` (nnx).
      variables: the pytree whose leaves are traced (its ``path_str`` paths name the members).
      *args: example inputs (only shapes/dtypes matter).
      opaque_ops: primitive names to treat as barriers instead of raising :class:`TraceError`.
      include_fixed: also return groups that cannot be pruned (reach the output / meet data).
      min_size: drop groups with fewer units.

    Returns a list of :class:`Group`, in the flatten order of their first member.

    >>> import jax.numpy as jnp
    >>> p = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
    >>> [g.simple_key() == {("w1", 1), ("w2", 0)} for g in discover_groups(
    ...     lambda p, x: (x @ p["w1"]) @ p["w2"], p, jnp.ones((1, 3)))]
    [True]
    """
    leaves = leaves_with_paths(variables)
    flat, treedef = jax.tree_util.tree_flatten(variables)
    if len(flat) != len([x for _, x in leaves if x is not None]):
        raise ValueError("jaxprune.structured.discover_groups: variables contain None leaves")
    paths = [p for p, x in leaves if x is not None]
    closed = jax.make_jaxpr(lambda leaves_, *a: fn(treedef.unflatten(leaves_), *a))(flat, *args)
    axis_nodes: list[list[_Node | None]] = []
    in_labels: list[list[list[Item]]] = []
    for path, x in zip(paths, flat, strict=True):
        nodes = [_Node(int(d), path) if d > 1 else None for d in np.shape(x)]
        axis_nodes.append(nodes)
        in_labels.append([[("n", n)] if n is not None else [] for n in nodes])
    arg_labels = [_rigid(tuple(v.aval.shape)) for v in closed.jaxpr.invars[len(flat):]]
    walker = Walker(
        {**RULES, **dict.fromkeys(opaque_ops, guard_default(barrier))},
        data=_rigid,
        sources=_origins,
        who="jaxprune.structured: the dependency tracer",
        hint=_HINT,
    )
    walker.default = guard_default(walker._default)
    outs = walker.run(closed.jaxpr, in_labels + arg_labels, closed.consts)
    fix_indices(outs)
    for lab in outs:  # axes reaching the output keep their size
        for ax in lab:
            _fix_items(_leaf_items(ax))

    used = {v for e in closed.jaxpr.eqns for v in e.invars if not isinstance(v, jcore.Literal)}
    used |= {v for v in closed.jaxpr.outvars if not isinstance(v, jcore.Literal)}
    unused_paths = {p for p, v in zip(paths, closed.jaxpr.invars, strict=False) if v not in used}

    # Collect members per leaf class (parameters the model never reads are left out).
    members: dict[int, list[Member]] = {}
    roots: dict[int, _Node] = {}
    order: dict[int, int] = {}
    for li, (path, nodes) in enumerate(zip(paths, axis_nodes, strict=True)):
        for a, n in enumerate(nodes):
            if n is None or path in unused_paths:
                continue
            lvs = _expand(n)
            sizes = tuple(leaf.size for leaf in lvs)
            for pos, leaf in enumerate(lvs):
                r = _find(leaf)
                k = id(r)
                roots[k] = r
                order.setdefault(k, li * 64 + a)
                members.setdefault(k, []).append(Member(path, a, sizes, pos))
    index = {p: i for i, p in enumerate(paths)}
    ndims = {p: np.ndim(x) for p, x in zip(paths, flat, strict=True)}
    groups = []
    for k in sorted(members, key=lambda k: order[k]):
        r = roots[k]
        if r.size < min_size or (r.fixed and not include_fixed):
            continue
        mem = tuple(sorted(set(members[k]), key=lambda m: (index[m.path], m.axis, m.pos)))
        first = next((m for m in mem if ndims[m.path] >= 2), mem[0])
        name = f"{first.path}[{first.axis}]" + (f"#{first.pos}" if len(first.sizes) > 1 else "")
        groups.append(Group(name, r.size, mem, exact=not r.inexact,
                            kind="fixed" if r.fixed else ""))
    return groups
