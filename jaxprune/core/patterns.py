"""Patterns: turn one leaf's scores and a target sparsity into a boolean mask.

Patterns are frozen dataclasses (hashable, so they are static under ``jit``). ``sparsity`` may be a
Python float or a traced scalar (from a schedule or a global allocation). The number of pruned
entries (or groups) is always ``round(sparsity * count)``; ties in score are broken
deterministically: among equal scores the entry with the lower flat index is kept.

* :class:`Unstructured` — exact count over the whole leaf.
* :class:`NM` — keep ``n`` of every ``m`` consecutive entries along the contraction axis
  (axis ``ndim - 2``: axis 0 of a Flax ``Dense`` kernel ``(in, out)``, ``in`` of a conv kernel
  ``(h, w, in, out)``). Intermediate sparsities of a gradual schedule keep ``round((1-s)·m)``
  (never fewer than ``n``) per group, so a schedule can ramp towards N:M. In a tree every N:M
  leaf takes the target sparsity itself (:func:`~jaxprune.core.pipeline.compute_masks`): an
  allocation (ERK, global) spreads sparsity over the other leaves only.
* :class:`Block` — ``(r, c)`` blocks of the matmul view ``(prod(shape[:-1]), shape[-1])``.
* :class:`Channel` — whole output units (slices along ``axis``, default the last).

Example:
    >>> import jax.numpy as jnp
    >>> Unstructured().mask(jnp.array([3., 1., 2., 0.]), 0.5)
    Array([ True, False,  True, False], dtype=bool)
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any

import jax
import jax.numpy as jnp

# re-exported: the selection primitives the patterns build on
from jaxprune.core.topk import count_threshold_key, count_true, sortable_key, topk_mask, topk_masks

__all__ = [
    "Pattern", "Unstructured", "NM", "Block", "Channel", "PerLeaf", "parse", "for_path", "topk_mask",
    "topk_masks", "count_true",
    "sortable_key", "count_threshold_key", "matrix_view", "register", "PATTERNS",
    "nm_valid",
]


def _num_pruned(sparsity: Any, count: int) -> jax.Array:
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * count).astype(jnp.int32)


def _check_ints(what: str, **values: Any) -> None:
    """Pattern fields must be Python/numpy integers (not bools, floats or strings)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"jaxprune: {what}: {name} must be an integer, got {v!r} "
                            f"({type(v).__name__})")


def _check_axis(what: str, axis: int, ndim: int, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"jaxprune: {what} axis {axis} is out of range for '{path}' with ndim "
                         f"{ndim} (valid: {-ndim}..{ndim - 1})")
    return axis % ndim


class Pattern:
    """Base class. Subclasses implement :meth:`mask` and may implement :meth:`validate`."""

    def validate(self, path: str, shape: tuple[int, ...]) -> None:  # pragma: no cover - default
        """Raise ``ValueError`` naming ``path`` if this pattern cannot apply to ``shape``."""

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        raise NotImplementedError

    def max_sparsity(self) -> float:
        """Highest sparsity this pattern can reach (1.0 = any)."""
        return 1.0


@dataclasses.dataclass(frozen=True)
class Unstructured(Pattern):
    """Prune exactly ``round(sparsity * size)`` entries with the lowest scores."""

    def n_keep(self, sparsity: Any, size: int) -> jax.Array:
        """Entries kept of ``size`` at ``sparsity``: ``size - round(sparsity * size)``."""
        return size - _num_pruned(sparsity, size)

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        flat = scores.reshape(-1)
        return topk_mask(flat, self.n_keep(sparsity, flat.size)).reshape(scores.shape)


@dataclasses.dataclass(frozen=True)
class NM(Pattern):
    """Keep ``n`` of every ``m`` consecutive entries along ``axis`` (default: contraction axis)."""

    n: int = 2
    m: int = 4
    axis: int | None = None

    def __post_init__(self) -> None:
        _check_ints(f"N:M pattern {self.n}:{self.m} (N:M needs integers)", n=self.n, m=self.m)
        if self.axis is not None:
            _check_ints("N:M pattern", axis=self.axis)
        if not (0 < self.n <= self.m):
            raise ValueError(f"jaxprune: N:M needs 0 < n <= m, got {self.n}:{self.m}")

    def resolve_axis(self, ndim: int) -> int:
        if self.axis is not None:
            return self.axis % ndim
        return ndim - 2 if ndim >= 2 else 0

    def validate(self, path: str, shape: tuple[int, ...]) -> None:
        if self.axis is not None:
            _check_axis(f"{self.n}:{self.m} pattern", self.axis, len(shape), path)
        ax = self.resolve_axis(len(shape))
        if shape[ax] % self.m:
            raise ValueError(
                f"jaxprune: {self.n}:{self.m} pattern on '{path}' with shape {tuple(shape)}: axis "
                f"{ax} has length {shape[ax]}, which is not divisible by m={self.m}"
            )

    def max_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        ax = self.resolve_axis(scores.ndim)
        self.validate("<leaf>", scores.shape)
        s = jnp.moveaxis(scores, ax, -1)
        g = s.reshape(*s.shape[:-1], s.shape[-1] // self.m, self.m)
        # rank within the group: how many entries beat me (higher score, or equal and earlier)
        a = g[..., :, None]
        b = g[..., None, :]
        idx = jnp.arange(self.m)
        earlier = idx[None, :] < idx[:, None]
        rank = jnp.sum((b > a) | ((b == a) & earlier), axis=-1)
        n_keep = jnp.clip(self.m - _num_pruned(sparsity, self.m), self.n, self.m)
        keep = rank < n_keep
        return jnp.moveaxis(keep.reshape(s.shape), -1, ax)


def matrix_view(shape: tuple[int, ...], fan_in: int | None = None) -> tuple[int, int]:
    """The ``(fan_in, out)`` matrix a leaf of ``shape`` is multiplied as — the one helper for it.

    Default (Flax layout): every axis but the last is fan-in (Dense ``(in, out)``, conv
    ``(h, w, in, out)``, DenseGeneral ``(*in, *out)`` with one output axis). ``fan_in`` overrides
    the split (the product of the leading axes that are contracted), as calibration knows it.
    A 1-d leaf is one row.

    >>> matrix_view((3, 3, 8, 16)), matrix_view((640, 4, 256), fan_in=640), matrix_view((5,))
    ((72, 16), (640, 1024), (1, 5))
    """
    shape = tuple(int(d) for d in shape)
    size = 1
    for d in shape:
        size *= d
    if fan_in is not None:
        fan_in = int(fan_in)
        prefixes = [1]
        for d in shape:
            prefixes.append(prefixes[-1] * d)
        if fan_in not in prefixes:  # divisibility alone would accept another layer's statistics
            raise ValueError(
                f"jaxprune: a leaf of shape {shape} has no matrix view with fan-in {fan_in}: the "
                f"fan-in is the product of its leading (contracted) axes, one of "
                f"{sorted(set(prefixes))} (statistics of another layer?)"
            )
        return fan_in, size // fan_in
    if len(shape) < 2:
        return (1, shape[0] if shape else 1)
    return size // shape[-1], shape[-1]


_matrix_view = matrix_view


@dataclasses.dataclass(frozen=True)
class Block(Pattern):
    """Prune whole ``(r, c)`` blocks of the ``(fan_in, out)`` matrix view, ranked by summed score."""

    r: int = 4
    c: int = 4

    def __post_init__(self) -> None:
        _check_ints(f"block pattern {self.r}x{self.c} (block sizes must be integers)",
                    r=self.r, c=self.c)
        if self.r < 1 or self.c < 1:
            raise ValueError(f"jaxprune: block sizes must be >= 1, got {self.r}x{self.c}")

    def validate(self, path: str, shape: tuple[int, ...]) -> None:
        k, n = _matrix_view(tuple(shape))
        if k % self.r or n % self.c:
            raise ValueError(
                f"jaxprune: block ({self.r}, {self.c}) does not divide '{path}' with shape "
                f"{tuple(shape)} (matrix view {k}x{n})"
            )

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        self.validate("<leaf>", scores.shape)
        k, n = _matrix_view(scores.shape)
        blocks = scores.reshape(k // self.r, self.r, n // self.c, self.c).sum(axis=(1, 3))
        bm = Unstructured().mask(blocks, sparsity)
        full = jnp.repeat(jnp.repeat(bm, self.r, axis=0), self.c, axis=1)
        return full.reshape(scores.shape)


@dataclasses.dataclass(frozen=True)
class Channel(Pattern):
    """Prune whole slices along ``axis`` (default: output units), ranked by summed score."""

    axis: int = -1

    def __post_init__(self) -> None:
        _check_ints("Channel pattern", axis=self.axis)

    def validate(self, path: str, shape: tuple[int, ...]) -> None:
        _check_axis("Channel pattern", self.axis, len(shape), path)

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        ax = self.axis % scores.ndim
        other = tuple(i for i in range(scores.ndim) if i != ax)
        unit = scores.sum(axis=other) if other else scores
        keep = Unstructured().mask(unit, sparsity)
        shape = [1] * scores.ndim
        shape[ax] = scores.shape[ax]
        return jnp.broadcast_to(keep.reshape(shape), scores.shape)


PATTERNS: dict[str, Any] = {}


def register(name: str, factory: Any, *, overwrite: bool = False) -> None:
    """Make a pattern available by ``name`` (``factory()`` returns a :class:`Pattern`).

    Registered names are looked up before the built-in specs (``"2:4"``, ``"block4x4"``...).

    >>> register("rows_demo", lambda: Channel(axis=0))
    >>> parse("rows_demo")
    Channel(axis=0)
    """
    if not callable(factory):
        raise TypeError(f"jaxprune: register('{name}', ...) needs a callable returning a Pattern")
    key = name.strip().lower()
    if key in PATTERNS and not overwrite and PATTERNS[key] is not factory:
        raise ValueError(f"jaxprune: a pattern named '{name}' is already registered; pass overwrite=True")
    PATTERNS[key] = factory


def parse(spec: str | Pattern) -> Pattern:
    """Parse ``"unstructured"``, ``"2:4"``, ``"block4x4"`` / ``"block:4x4"`` or ``"channel"``.

    >>> parse("2:4"), parse("block8x4")
    (NM(n=2, m=4, axis=None), Block(r=8, c=4))
    """
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"jaxprune: a pattern must be a Pattern or a spec string, got {type(spec).__name__}: "
            f"{spec!r}"
        )
    s = spec.strip().lower()
    if s in PATTERNS:
        out = PATTERNS[s]()
        if not isinstance(out, Pattern):
            raise TypeError(f"jaxprune: the factory registered for pattern '{spec}' returned "
                            f"{type(out).__name__}, not a Pattern")
        return out
    if s == "unstructured":
        return Unstructured()
    if s in ("channel", "neuron"):
        return Channel()
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        return NM(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"block:?(\d+)x(\d+)", s)
    if m:
        return Block(int(m.group(1)), int(m.group(2)))
    raise ValueError(
        f"jaxprune: unknown pattern '{spec}'; valid: 'unstructured', 'N:M' (e.g. '2:4'), "
        "'blockRxC' (e.g. 'block4x4'), 'channel'"
    )


def nm_valid(mask: jax.Array, n: int, m: int, axis: int | None = None) -> bool:
    """True if every group of ``m`` consecutive entries along ``axis`` has at most ``n`` kept.

    >>> nm_valid(jnp.array([[1, 0], [1, 0], [0, 1], [0, 0]], bool), 2, 4)
    True
    """
    ax = NM(n, m, axis).resolve_axis(mask.ndim)
    s = jnp.moveaxis(jnp.asarray(mask), ax, -1)
    g = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
    return bool(jnp.all(jnp.sum(g, axis=-1) <= n))


@dataclasses.dataclass(frozen=True)
class PerLeaf(Pattern):
    """Choose a pattern per leaf: the first ``(regex, pattern)`` rule whose regex matches the path.

    >>> p = PerLeaf(rules=(("conv", NM(2, 4)),), default=Unstructured())
    >>> p.for_path("conv1/kernel"), p.for_path("dense/kernel")
    (NM(n=2, m=4, axis=None), Unstructured())
    """

    rules: tuple[tuple[str, Pattern], ...] = ()
    default: Pattern = dataclasses.field(default_factory=Unstructured)

    def __post_init__(self) -> None:
        rules = self.rules
        if not isinstance(rules, tuple | list) or not all(
                isinstance(x, tuple | list) and len(x) == 2 and isinstance(x[0], str) for x in rules):
            raise TypeError(f"jaxprune: PerLeaf.rules must be (regex, pattern) pairs, got {rules!r}")
        for rx, _ in rules:
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"jaxprune: PerLeaf rule regex {rx!r} is invalid: {e}") from None
        object.__setattr__(self, "rules", tuple((r, parse(p)) for r, p in rules))
        object.__setattr__(self, "default", parse(self.default))

    def for_path(self, path: str) -> Pattern:
        for rx, pat in self.rules:
            if re.search(rx, path):
                return pat
        return self.default

    def mask(self, scores: jax.Array, sparsity: Any) -> jax.Array:
        raise TypeError("jaxprune: PerLeaf.mask needs a path; use for_path(path).mask(...)")


def for_path(pattern: Pattern, path: str) -> Pattern:
    """The concrete pattern for ``path`` (resolves :class:`PerLeaf`)."""
    return pattern.for_path(path) if isinstance(pattern, PerLeaf) else pattern
