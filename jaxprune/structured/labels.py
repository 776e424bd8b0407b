"""The value domain of the dependency-group analysis: union-find over (factors of) parameter axes.

Every axis of every intermediate array carries a *label*: a row-major list of items, each one

* ``("n", node)`` — derived from a parameter axis (or a factor of one); ``node`` is a union-find
  node, and nodes that meet (elementwise op, contraction, batch dimension) are unioned;
* ``("w", size)`` — a broadcast axis (uniform, freely sliceable);
* ``("r", size)`` — a data-derived (rigid) axis that cannot be sliced with the parameters.

A node is ``fixed`` when its axis meets data, reaches the output or is sliced/gathered, and
``inexact`` when it is reduced over (norm statistics, softmax). Reshapes split a node into child
factors (``heads * head_dim`` → ``heads``, ``head_dim``). The per-primitive rules in
:mod:`jaxprune.structured.rules` compute output labels from input labels with these helpers; the
generic :mod:`jaxprune.core.walker` knows nothing about them.

>>> a, b = _Node(4, "a"), _Node(4, "b")
>>> out = _align([[("n", a)], [("n", b)]], 4)
>>> _find(a) is _find(b), _isize(out[0])
(True, 4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__: list[str] = []



class _Node:
    __slots__ = ("parent", "size", "children", "fixed", "inexact", "origin")

    def __init__(self, size: int, origin: str):
        self.parent: _Node | None = None
        self.size = size
        self.children: list[_Node] | None = None
        self.fixed = False
        self.inexact = False
        self.origin = origin


def _find(n: _Node) -> _Node:
    root = n
    while root.parent is not None:
        root = root.parent
    while n.parent is not None:
        n.parent, n = root, n.parent
    return root


def _expand(n: _Node) -> list[_Node]:
    r = _find(n)
    if r.children is None:
        return [r]
    return [leaf for c in r.children for leaf in _expand(c)]


def _flag(n: _Node, fixed: bool = False, inexact: bool = False) -> None:
    r = _find(n)
    changed = (fixed and not r.fixed) or (inexact and not r.inexact)
    r.fixed |= fixed
    r.inexact |= inexact
    if changed and r.children:
        for c in r.children:
            _flag(c, fixed, inexact)


def _split_leaf(n: _Node, sizes: Sequence[int]) -> list[_Node]:
    r = _find(n)
    assert r.children is None and math.prod(sizes) == r.size
    kids = [_Node(s, r.origin) for s in sizes]
    for k in kids:
        k.fixed, k.inexact = r.fixed, r.inexact
    r.children = kids
    return kids


# Items of an axis label: ("n", node) param-derived; ("w", size) broadcast (uniform, freely
# sliceable); ("r", size) data-derived (rigid, cannot be sliced with the params).
Item = tuple[str, Any]


def _isize(it: Item) -> int:
    return _find(it[1]).size if it[0] == "n" else it[1]


def _leaf_items(items: Iterable[Item]) -> list[Item]:
    out: list[Item] = []
    for it in items:
        if it[0] == "n":
            out.extend(("n", leaf) for leaf in _expand(it[1]))
        elif it[1] > 1:
            out.append(it)
    return [it for it in out if _isize(it) > 1]


def _split_item(it: Item, sizes: Sequence[int]) -> list[Item]:
    if it[0] == "n":
        return [("n", k) for k in _split_leaf(it[1], sizes)]
    return [(it[0], s) for s in sizes]


def _fix_items(items: Iterable[Item], inexact_only: bool = False) -> None:
    for it in items:
        if it[0] == "n":
            _flag(it[1], fixed=not inexact_only, inexact=inexact_only)


def _rigid(shape: Sequence[int]) -> list[list[Item]]:
    return [[("r", int(d))] if d > 1 else [] for d in shape]


def _union(a: _Node, b: _Node) -> None:
    ra, rb = _find(a), _find(b)
    if ra is rb:
        return
    if ra.size != rb.size:  # pragma: no cover - guarded by callers
        raise AssertionError("size mismatch in union")
    fixed, inexact = ra.fixed or rb.fixed, ra.inexact or rb.inexact
    if ra.children is None or rb.children is None:
        if ra.children is not None:
            ra, rb = rb, ra
        ra.parent = rb
        _flag(rb, fixed, inexact)
        return
    la, lb = _expand(ra), _expand(rb)
    ra.parent = rb
    _flag(rb, fixed, inexact)
    merged = _corefine([("n", x) for x in la], [("n", x) for x in lb], _pair_union)
    if merged is None:
        _flag(rb, fixed=True)


def _pair_union(a: Item, b: Item) -> Item:
    """Merge rule for two aligned items of equal size (elementwise / contraction / batch)."""
    ka, kb = a[0], b[0]
    if ka == "n" and kb == "n":
        _union(a[1], b[1])
        return a
    if ka == "n" and kb == "w":
        return a
    if ka == "w" and kb == "n":
        return b
    if ka == "n" or kb == "n":  # node meets rigid data
        _fix_items([a, b])
        return ("r", _isize(a))
    if ka == "w" and kb == "w":
        return a
    return ("r", _isize(a))


def _corefine(
    a_items: Sequence[Item], b_items: Sequence[Item], pair: Callable[[Item, Item], Item]
) -> list[Item] | None:
    """Split items of two labels of equal total size until their boundaries match; pair them."""
    a, b = list(_leaf_items(a_items)), list(_leaf_items(b_items))
    out: list[Item] = []
    while a and b:
        x, y = a.pop(0), b.pop(0)
        sx, sy = _isize(x), _isize(y)
        if sx == sy:
            out.append(pair(x, y))
        elif sx < sy:
            if sy % sx:
                return None
            y1, y2 = _split_item(y, [sx, sy // sx])
            out.append(pair(x, y1))
            b.insert(0, y2)
        else:
            if sx % sy:
                return None
            x1, x2 = _split_item(x, [sy, sx // sy])
            out.append(pair(x1, y))
            a.insert(0, x2)
    if a or b:
        return None
    return out


def _align(labels: Sequence[list[Item]], size: int) -> list[Item]:
    """Align several labels of one axis (elementwise op); on failure everything becomes fixed."""
    cur = labels[0]
    for other in labels[1:]:
        merged = _corefine(cur, other, _pair_union)
        if merged is None:
            for lab in labels:
                _fix_items(_leaf_items(lab))
            return [("r", size)] if size > 1 else []
        cur = merged
    return list(_leaf_items(cur))


def _regroup(items: Sequence[Item], sizes: Sequence[int]) -> list[list[Item]] | None:
    """Cut a flat row-major item stream into consecutive axes of the given sizes."""
    stream = list(_leaf_items(items))
    out: list[list[Item]] = []
    for s in sizes:
        need = int(s)
        cur: list[Item] = []
        while need > 1:
            if not stream:
                return None
            it = stream.pop(0)
            sz = _isize(it)
            if sz <= need:
                if need % sz:
                    return None
                cur.append(it)
                need //= sz
            else:
                if sz % need:
                    return None
                i1, i2 = _split_item(it, [need, sz // need])
                cur.append(i1)
                stream.insert(0, i2)
                need = 1
        out.append(cur)
    if stream:
        return None
    return out


def _sub_range(items: list[Item], n: int, start: int, stop: int) -> list[Item]:
    """Label of ``x[start:stop]`` along an axis of length ``n`` labelled ``items``."""
    if start == 0 and stop == n:
        return list(_leaf_items(items))
    chunk = stop - start
    if chunk > 0 and n % chunk == 0 and start % chunk == 0:
        parts = _regroup(items, [n // chunk, chunk])
        if parts is not None:
            _fix_items(parts[0])  # which chunk is taken cannot be pruned
            return parts[1]
    _fix_items(_leaf_items(items))
    return [("r", chunk)] if chunk > 1 else []



def _has_nodes(labs: Iterable[list[list[Item]]]) -> bool:
    """Whether any axis of any label carries a parameter-derived item."""
    return any(it[0] == "n" for lab in labs for ax in lab for it in ax)


def _origins(lab: list[list[Item]]) -> set[str]:
    """Parameter paths whose axes appear in a label (for error messages)."""
    return {it[1].origin for ax in lab for it in ax if it[0] == "n"}
