"""Filters: composable, hashable predicates ``(path, leaf) -> bool`` choosing which leaves are pruned.

In the spirit of ``flax.nnx.filterlib``: every filter is a frozen dataclass (hashable, so it can be
a static argument under ``jit`` and a dict key), and filters compose with ``&``, ``|`` and ``~``
(or :class:`All`, :class:`Any`, :class:`Not`). A leaf without a ``shape`` never matches. Paths are
the ``"a/b/kernel"`` strings of :func:`jaxprune.core.masks.path_str`.

* :class:`Name` — the last path component is one of ``names``.
* :class:`PathRegex` — ``re.search`` on the whole path.
* :class:`MinNdim` — at least ``n`` dimensions (skips biases and norm scales).
* :class:`DType` — ``numpy.issubdtype(leaf.dtype, kind)`` (``"floating"`` by default).
* :class:`Everything`, :class:`Nothing`, :class:`Predicate` (wrap any callable).
* :func:`select` — the common combination; :func:`default` = ``select()``: ``kernel`` leaves with
  ``ndim >= 2``.
* :func:`as_filter` — turn ``None`` / a callable / a regex string into a filter.

Example:
    >>> import jax.numpy as jnp
    >>> f = Name("kernel") & ~PathRegex("head")
    >>> f("body/kernel", jnp.ones((2, 2))), f("head/kernel", jnp.ones((2, 2)))
    (True, False)
    >>> hash(f) == hash(Name("kernel") & ~PathRegex("head"))
    True
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "Filter", "Name", "PathRegex", "PathIn", "MinNdim", "DType", "All", "Any", "Not", "Everything",
    "Nothing", "Predicate", "select", "default", "as_filter",
]

FilterLike = typing.Union["Filter", Callable[[str, typing.Any], bool], str, None]


def _has_shape(leaf: typing.Any) -> bool:
    return leaf is not None and hasattr(leaf, "shape")


class Filter:
    """Base class: ``filter(path, leaf) -> bool``; combine with ``&``, ``|``, ``~``."""

    def __call__(self, path: str, leaf: typing.Any) -> bool:
        return _has_shape(leaf) and bool(self.match(path, leaf))

    def match(self, path: str, leaf: typing.Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def __and__(self, other: FilterLike) -> All:
        return All(self, as_filter(other))

    def __or__(self, other: FilterLike) -> Any:
        return Any(self, as_filter(other))

    def __invert__(self) -> Not:
        return Not(self)


@dataclasses.dataclass(frozen=True, init=False)
class Name(Filter):
    """The last path component is one of ``names``.

    >>> Name("kernel", "weight")("fc/weight", np.ones((2, 2)))
    True
    """

    names: tuple[str, ...]

    def __init__(self, *names: str):
        if len(names) == 1 and not isinstance(names[0], str):
            try:
                names = tuple(names[0])
            except TypeError:
                raise TypeError(f"jaxprune: Name(...) takes leaf names as str, got {names[0]!r}"
                                ) from None
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"jaxprune: Name(...) takes leaf names as str, got {bad[0]!r}")
        object.__setattr__(self, "names", tuple(names))

    def match(self, path, leaf):
        return path.split("/")[-1] in self.names


@dataclasses.dataclass(frozen=True)
class PathRegex(Filter):
    """``re.search(regex, path)`` matches.

    >>> PathRegex(r"^encoder/")("encoder/0/kernel", np.ones(2))
    True
    """

    regex: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.regex)
        except re.error as e:
            raise ValueError(f"jaxprune: PathRegex({self.regex!r}) is not a valid regex: {e}") from e

    def match(self, path, leaf):
        return re.search(self.regex, path) is not None


@dataclasses.dataclass(frozen=True)
class PathIn(Filter):
    """The path is one of ``paths`` (e.g. the weights an operator map found).

    >>> PathIn(frozenset({"a/w"}))("a/w", np.ones((2, 2)))
    True
    """

    paths: frozenset[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", frozenset(self.paths))

    def match(self, path, leaf):
        return path in self.paths


@dataclasses.dataclass(frozen=True)
class MinNdim(Filter):
    """The leaf has at least ``n`` dimensions.

    >>> MinNdim(2)("b", np.ones(3))
    False
    """

    n: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"jaxprune: MinNdim n (min_ndim) must be an integer >= 0, got "
                             f"{self.n!r}")

    def match(self, path, leaf):
        return len(leaf.shape) >= self.n


@dataclasses.dataclass(frozen=True)
class DType(Filter):
    """``numpy.issubdtype(leaf.dtype, kind)``; ``kind`` is a numpy type name or class.

    >>> DType("floating")("w", np.ones(2, np.int32))
    False
    """

    kind: str = "floating"

    def __post_init__(self) -> None:
        k = getattr(np, self.kind, None) if isinstance(self.kind, str) else None
        if not (isinstance(k, type) and issubclass(k, np.generic)):
            raise ValueError(f"jaxprune: DType kind {self.kind!r} is not a numpy type name; valid: "
                             "e.g. 'floating', 'integer', 'float32'")

    def match(self, path, leaf):
        return bool(np.issubdtype(np.dtype(leaf.dtype), getattr(np, self.kind)))


@dataclasses.dataclass(frozen=True, init=False)
class _Combine(Filter):
    filters: tuple[Filter, ...]

    def __init__(self, *filters: FilterLike):
        object.__setattr__(self, "filters", tuple(as_filter(f) for f in filters))


class All(_Combine):
    """Every filter matches.

    >>> All(Name("kernel"), MinNdim(2))("kernel", np.ones(3))
    False
    """

    def match(self, path, leaf):
        return all(f(path, leaf) for f in self.filters)


class Any(_Combine):
    """At least one filter matches.

    >>> Any(Name("kernel"), Name("weight"))("weight", np.ones((2, 2)))
    True
    """

    def match(self, path, leaf):
        return any(f(path, leaf) for f in self.filters)


@dataclasses.dataclass(frozen=True)
class Not(Filter):
    """The filter does not match (leaves without a shape still never match).

    >>> Not(Name("bias"))("bias", np.ones(2))
    False
    """

    filter: Filter

    def __post_init__(self) -> None:
        object.__setattr__(self, "filter", as_filter(self.filter))

    def match(self, path, leaf):
        return not self.filter(path, leaf)


@dataclasses.dataclass(frozen=True)
class Everything(Filter):
    """Every array leaf.

    >>> Everything()("anything", np.ones(1)), Everything()("none", None)
    (True, False)
    """

    def match(self, path, leaf):
        return True


@dataclasses.dataclass(frozen=True)
class Nothing(Filter):
    """No leaf.

    >>> Nothing()("w", np.ones((2, 2)))
    False
    """

    def match(self, path, leaf):
        return False


@dataclasses.dataclass(frozen=True)
class Predicate(Filter):
    """Wrap a plain ``fn(path, leaf) -> bool`` (hashed by the function's identity).

    >>> Predicate(lambda p, x: x.size > 3)("w", np.ones((2, 2)))
    True
    """

    fn: Callable[[str, typing.Any], bool]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"jaxprune: Predicate needs a callable (path, leaf) -> bool, got "
                            f"{self.fn!r}")

    def match(self, path, leaf):
        return bool(self.fn(path, leaf))


def as_filter(f: FilterLike) -> Filter:
    """``None`` → :func:`default`, a :class:`Filter` as is, a string → :class:`PathRegex`, any
    other callable → :class:`Predicate`.

    >>> as_filter("attn")("blk/attn/kernel", np.ones((2, 2)))
    True
    """
    if f is None:
        return default()
    if isinstance(f, Filter):
        return f
    if isinstance(f, str):
        return PathRegex(f)
    if callable(f):
        return Predicate(f)
    raise TypeError(
        f"jaxprune: a filter must be a jaxprune.filters.Filter, a callable (path, leaf) -> bool, "
        f"a path regex string or None; got {type(f).__name__}: {f!r}"
    )


def _regexes(x: str | Sequence[str] | None) -> list[str]:
    return [x] if isinstance(x, str) else list(x or [])


def select(
    names: Sequence[str] | str | None = ("kernel",),
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_ndim: int = 2,
    predicate: Callable[[str, typing.Any], bool] | None = None,
) -> Filter:
    """The common filter: name, path regexes, dimensionality and an optional extra predicate.

    Args:
      names: the last path component must be one of these (``None`` = any name).
      include: regex (or list); the path must match at least one.
      exclude: regex (or list); leaves whose path matches any are not pruned.
      min_ndim: leaves with fewer dimensions are skipped (biases, norm scales).
      predicate: extra ``(path, leaf) -> bool`` test.

    >>> f = select(exclude="head")
    >>> f("body/kernel", np.ones((2, 2))), f("head/kernel", np.ones((2, 2))), f("body/bias", np.ones(2))
    (True, False, False)
    """
    parts: list[Filter] = []
    if names is not None:
        parts.append(Name(names) if not isinstance(names, str) else Name(names))
    if min_ndim:
        parts.append(MinNdim(min_ndim))
    inc = _regexes(include)
    if inc:
        parts.append(Any(*[PathRegex(r) for r in inc]))
    parts += [Not(PathRegex(r)) for r in _regexes(exclude)]
    if predicate is not None:
        parts.append(Predicate(predicate))
    if not parts:
        return Everything()
    return parts[0] if len(parts) == 1 else All(*parts)


def default() -> Filter:
    """The default filter: leaves named ``kernel`` with ``ndim >= 2``.

    >>> default()("Dense_0/kernel", np.ones((3, 2))), default()("Dense_0/bias", np.ones(2))
    (True, False)
    """
    return select()
