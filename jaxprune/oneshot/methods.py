"""Layer methods as values: the base :class:`LayerMethod` and the registry of named methods.

A layer method prunes one calibrated kernel:
``method(weight, stats, sparsity=None, *, pattern="unstructured", name="<layer>") -> (new_weight,
mask)``. Like :class:`jaxprune.core.criteria.Criterion` and the frozen-dataclass allocations and
patterns, a method is a hashable value that *declares what it needs*: ``needs`` names the
calibration statistics it reads (``"gram"``: ``XᵀX`` for SparseGPT, OBS, DSnoT; ``"norms"``: column
norms for Wanda; ``()`` for magnitude), so drivers decide ``calibrate(..., gram=...)`` from it.

The base class does what every method shares: resolve ``sparsity``/``pattern`` (``pattern="2:4"``
implies ``sparsity=0.5``, :func:`jaxprune.core.pipeline.resolve_sparsity`), check the statistics
and shapes naming the layer, view the kernel as its ``(fan_in, out)`` matrix
(:func:`jaxprune.core.patterns.matrix_view`), call :meth:`LayerMethod.prune_matrix` and reshape
back. A new method implements only ``prune_matrix``.

Names: :func:`register_method` / :func:`get_method`; :data:`METHODS` is a read-only view of the
registry (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"obs"``, ``"magnitude+dsnot"``,
``"wanda+dsnot"``, ``"sparsegpt+dsnot"``).

Example:
    >>> from jaxprune import oneshot
    >>> oneshot.get_method("sparsegpt+dsnot")
    DSnoT(base=SparseGPT(blocksize=128, percdamp=0.01, quant=None), max_cycles=50, var_power=1.0)
    >>> oneshot.get_method("sparsegpt").needs, oneshot.get_method("magnitude").needs
    (('gram',), ())
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core import pipeline
from jaxprune.core._leafcheck import _check_not_all_pruned
from jaxprune.core.registry import check_free, lookup
from jaxprune.oneshot.calibration import LayerStats, as_matrix, from_matrix
from jaxprune.oneshot.common import check_layer_weight

__all__ = ["LayerMethod", "register_method", "get_method", "METHODS", "resolve_layer_target"]


def resolve_layer_target(
    sparsity: Any,
    pattern: pat_lib.Pattern | str,
    name: str,
    shape: tuple[int, ...],
    fan_in: int | None = None,
) -> tuple[pat_lib.Pattern, Any]:
    """``(pattern, sparsity)`` for one layer's ``(fan_in, out)`` matrix, checked, naming ``name``.

    One-shot layer methods support unstructured and N:M patterns; N:M groups run along the fan-in
    (axis 0 of the matrix view, the contraction axis ``ndim - 2`` of a kernel).

    >>> resolve_layer_target(None, "2:4", "fc/kernel", (8, 3))
    (NM(n=2, m=4, axis=None), 0.5)
    >>> resolve_layer_target(None, "2:4", "fc/kernel", (6, 3))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: 2:4 pattern on 'fc/kernel' ... length 6, which is not divisible by m=4
    """
    pat = pat_lib.for_path(pat_lib.parse(pattern), name)
    if sparsity is not None:
        alloc_lib.check_sparsity(name, sparsity)
    fin, out = _matrix_shape(shape, fan_in, name)
    if isinstance(pat, pat_lib.NM):
        ndim = len(shape)
        if pat.axis is not None and pat.resolve_axis(ndim) != max(ndim - 2, 0):
            raise ValueError(
                f"jaxprune: layer '{name}': one-shot methods group N:M along the fan-in (axis "
                f"{max(ndim - 2, 0)} of shape {tuple(shape)}), got axis={pat.axis}"
            )
        pat = pat_lib.NM(pat.n, pat.m)
        pat.validate(name, (fin, out))
    elif not isinstance(pat, pat_lib.Unstructured):
        raise ValueError(
            f"jaxprune: layer '{name}': one-shot layer methods support the unstructured and N:M "
            f"patterns, got {pat}"
        )
    try:
        s = pipeline.resolve_sparsity(sparsity, pat)
    except ValueError as e:
        raise ValueError(f"jaxprune: layer '{name}': {str(e).removeprefix('jaxprune: ')}") from None
    if isinstance(pat, pat_lib.Unstructured):  # every method, not only those using leaf_mask:
        _check_not_all_pruned(pat, s, name, None, (fin, out))  # 0.99 of 48 weights = all 48
    return pat, s


def _matrix_shape(shape: tuple[int, ...], fan_in: int | None, name: str) -> tuple[int, int]:
    try:
        return pat_lib.matrix_view(shape, fan_in)
    except ValueError:
        raise ValueError(
            f"jaxprune: kernel '{name}' of shape {tuple(shape)} does not match calibration "
            f"fan-in {fan_in}"
        ) from None


@dataclasses.dataclass(frozen=True)
class LayerMethod:
    """Base class of one-shot layer methods (frozen dataclass: hashable, comparable, static).

    Subclasses set ``needs`` (calibration statistics read: ``"gram"``, ``"norms"``) and ``label``
    (display name) and implement :meth:`prune_matrix`.

    >>> from jaxprune.oneshot import Magnitude
    >>> w, m = Magnitude()(jnp.array([[1., -4.], [3., 2.]]), None, 0.5)
    >>> m.tolist()
    [[False, True], [True, False]]
    """

    needs: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str] = "layer-method"

    def __call__(
        self,
        weight: Any,
        stats: LayerStats | None,
        sparsity: float | None = None,
        *,
        pattern: pat_lib.Pattern | str = "unstructured",
        name: str = "<layer>",
    ) -> tuple[jax.Array, jax.Array]:
        """Prune one kernel; returns ``(new_weight, mask)`` of ``weight``'s shape and dtype.

        Args:
          weight: a kernel (Dense ``(in, out)``, conv ``(h, w, in, out)``, DenseGeneral
            ``(*in, *out)``).
          stats: the layer's :class:`~jaxprune.oneshot.calibration.LayerStats` (may be ``None``
            for a method that needs none).
          sparsity: fraction to prune in ``[0, 1)``; ``None`` with an N:M pattern: ``1 - n/m``.
          pattern: ``"unstructured"`` or N:M (``"2:4"``, :class:`~jaxprune.core.patterns.NM`).
          name: the layer's path, used in error messages and warnings.

        >>> from jaxprune.oneshot import Wanda
        >>> from jaxprune.oneshot.calibration import LayerStats
        >>> st = LayerStats(None, np.zeros(4), np.ones(4), 1, 4)
        >>> _, m = Wanda()(np.array([[4.], [1.], [3.], [2.]]), st, pattern="2:4")
        >>> np.asarray(m)[:, 0].tolist()
        [True, False, True, False]
        """
        if sparsity is None:
            sparsity = self.default_sparsity(pat_lib.parse(pattern))
        w2, s, pat, back = self.matrix_target(weight, stats, sparsity, pattern, name)
        q2, m2 = _by_group(lambda w, st, nm, sg: self.prune_matrix(w, st, sg, pat, name=nm),
                           w2, stats, name, s, pat)
        m2 = jnp.asarray(m2)
        # pruned entries exactly zero, whatever the method (float residue of an update, a
        # user-registered method that forgot): a "sparse" result is never silently dense
        q2 = jnp.where(m2, q2, jnp.zeros((), jnp.asarray(q2).dtype))
        return back(q2), back(m2)

    def default_sparsity(self, pattern: pat_lib.Pattern) -> float | None:
        """The sparsity used when none is given (by a call or by the drivers): ``None``, i.e. an
        N:M pattern implies ``1 - n/m`` and any other pattern needs one. Quantizers that prune
        nothing unless asked (``GPTQ``, dense RTN) return ``0.0``.

        >>> from jaxprune.oneshot import GPTQ, Magnitude
        >>> u = pat_lib.Unstructured()
        >>> Magnitude().default_sparsity(u), GPTQ().default_sparsity(u)
        (None, 0.0)
        """
        return None

    def matrix_target(
        self, weight: Any, stats: LayerStats | None, sparsity: float | None,
        pattern: pat_lib.Pattern | str, name: str,
    ) -> tuple[jax.Array, Any, pat_lib.Pattern, Any]:
        """``(matrix, sparsity, pattern, back)``: the checked ``(fan_in, out)`` view of ``weight``
        (the calibrated view when ``stats`` carry one), the resolved target, and ``back`` mapping a
        matrix (values or mask) back to ``weight``'s shape (values: ``weight``'s dtype).

        >>> from jaxprune.oneshot import Magnitude
        >>> w2, s, pat, back = Magnitude().matrix_target(np.ones((3, 3, 4, 4)), None, 0.5, "2:4", "c")
        >>> w2.shape, s, back(w2).shape
        ((36, 4), 0.5, (3, 3, 4, 4))
        """
        check_layer_weight(weight, name)
        shape = tuple(np.shape(weight))
        view = getattr(stats, "view", None)
        if view is not None and tuple(view.shape) != shape:
            raise ValueError(f"jaxprune: '{name}' has shape {shape} but was calibrated as "
                             f"{tuple(view.shape)}")
        if view is not None and stats.fan_in * stats.entries != view.view_shape[0]:
            raise ValueError(
                f"jaxprune: layer '{name}': calibration saw inputs of length {stats.fan_in} but "
                f"the weight's fan-in is {view.view_shape[0] // stats.entries} (shape {shape}): it "
                "reaches its matmul/conv sliced, padded or concatenated along the fan-in, which "
                "cannot be mapped back to its entries; leave it out (filter=)")
        fan_in = view.view_shape[0] if view is not None else (
            stats.fan_in if stats is not None else None)
        pat, s = resolve_layer_target(sparsity, pattern, name,
                                      view.view_shape if view is not None else shape, fan_in)
        self.check_stats(stats, name)
        if view is not None:  # the matrix actually multiplied (any layout), from calibration
            w2 = as_matrix(weight, stats, name)
        else:
            w2 = as_matrix(weight, _matrix_shape(shape, fan_in, name)[0], name)
        dtype = jnp.asarray(weight).dtype
        back_stats = stats if view is not None else None

        def back(a: jax.Array) -> jax.Array:
            r = from_matrix(a, back_stats, shape)
            return r if r.dtype == jnp.bool_ else r.astype(dtype)

        return w2, s, pat, back

    def check_stats(self, stats: LayerStats | None, name: str) -> None:
        """Raise ``ValueError`` naming the layer if ``stats`` lack what ``needs`` declares.

        >>> from jaxprune.oneshot import SparseGPT
        >>> SparseGPT().check_stats(None, "fc/kernel")
        Traceback (most recent call last):
        ...
        ValueError: jaxprune: sparsegpt on 'fc/kernel' needs calibration statistics ('gram',)
        """
        if not self.needs:
            return
        if stats is None:
            raise ValueError(
                f"jaxprune: {self.label} on '{name}' needs calibration statistics {self.needs}"
            )
        if "gram" in self.needs and stats.gram is None:
            raise ValueError(f"jaxprune: {self.label} on '{name}' needs calibration with gram=True")
        if stats.count <= 0:  # SparseGPT/OBS would zero every weight (all inputs look dead)
            raise ValueError(f"jaxprune: {self.label} on '{name}': the calibration statistics hold "
                             "no tokens (count 0: every token masked out?)")

    def prune_matrix(
        self, w: jax.Array, stats: LayerStats | None, sparsity: Any, pattern: pat_lib.Pattern,
        *, name: str = "<layer>",
    ) -> tuple[jax.Array, jax.Array]:
        """Prune the ``(fan_in, out)`` matrix ``w``; ``pattern`` is ``Unstructured()`` or an
        ``NM(n, m)`` along axis 0, ``sparsity`` already resolved. Returns ``(new_w, mask)``."""
        raise NotImplementedError(f"jaxprune: {type(self).__name__} must implement prune_matrix")

    def compress(
        self, weight: Any, stats: LayerStats | None, sparsity: float | None = None, *,
        pattern: pat_lib.Pattern | str = "unstructured", name: str = "<layer>",
    ) -> tuple[Any, jax.Array]:
        """Like calling the method, but returns the integer codes + group scales
        (:class:`~jaxprune.oneshot.quant.QuantizedWeight`) of the result's ``(fan_in, out)`` matrix
        view and the mask in that view; only methods that quantize have codes.
        ``compress(...)[0].dequantize()`` equals the matrix view of ``method(...)[0]``.

        >>> from jaxprune.oneshot import GPTQ, Magnitude
        >>> from jaxprune.oneshot.calibration import LayerStats
        >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
        >>> qw, m = GPTQ().compress(np.linspace(-1, 1, 8).reshape(4, 2), st)
        >>> qw.codes.dtype, qw.scales.shape, qw.codes[:, 0].tolist(), bool(m.all())
        (dtype('int8'), (1, 2), [-7, -3, 1, 5], True)
        >>> Magnitude().compress(np.ones((4, 2)), None, 0.5, name="fc")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: jaxprune: magnitude on 'fc' does not quantize: integer codes come from GPTQ, ...
        """
        return self.compress_with_back(weight, stats, sparsity, pattern, name)[:2]

    def compress_with_back(
        self, weight: Any, stats: LayerStats | None, sparsity: float | None,
        pattern: pat_lib.Pattern | str, name: str,
    ) -> tuple[Any, jax.Array, Any]:
        """:meth:`compress` plus the ``back`` map of :meth:`matrix_target` (matrix view → the
        weight's shape), for drivers that need the codes and the new leaf."""
        if sparsity is None:
            sparsity = self.default_sparsity(pat_lib.parse(pattern))
        w2, s, pat, back = self.matrix_target(weight, stats, sparsity, pattern, name)
        if stats is not None and stats.entries > 1:
            raise ValueError(f"jaxprune: {self.label} on '{name}': integer codes of layers stacked "
                             "for a scan (scanned weights) are not supported; unroll the layers "
                             "or call the method without codes")
        return (*_by_group(lambda w, st, nm, sg: self.compress_matrix(w, st, sg, pat, name=nm),
                           w2, stats, name, s, pat), back)

    def compress_matrix(
        self, w: jax.Array, stats: LayerStats | None, sparsity: Any, pattern: pat_lib.Pattern,
        *, name: str = "<layer>",
    ) -> tuple[Any, jax.Array]:
        """:meth:`prune_matrix`, returning the result as ``(QuantizedWeight, mask)``; methods that
        quantize implement it (the default raises ``ValueError`` naming the layer)."""
        raise ValueError(
            f"jaxprune: {self.label} on '{name}' does not quantize: integer codes come from GPTQ, "
            "SparseGPT(quant=...), OBR or RoundToNearest"
        )


def _by_group(run: Any, w2: jax.Array, stats: LayerStats | None, name: str,
              sparsity: Any = None, pattern: Any = None) -> tuple[Any, Any]:
    """``run(w, stats, name, sparsity) -> (result, mask)`` on the matrix view ``w2``; for the
    stats of a grouped conv, on each group's block of output columns with that group's statistics
    (each group is a layer of its own: its own inputs), the results joined along the columns; for
    layers stacked for a scan (``stats.entries``), on each layer's block of rows likewise.

    An unstructured ``sparsity`` is split into whole per-group counts that add up to the layer's
    ``round(sparsity · size)`` (a 3×3 depthwise group has 9 weights: 50% per group alone would
    prune 4 of 9, 44%), the first groups taking the remainder.

    >>> st = LayerStats.from_inputs(np.ones((2, 4, 3)))
    >>> run = lambda w, s, nm, sp: (w, np.full(w.shape, sp))
    >>> sp = _by_group(run, jnp.ones((3, 2)), st, "c", 0.5, pat_lib.Unstructured())[1]
    >>> (np.asarray(sp)[0] * 3).round().tolist()  # 3 of the 6 weights: 2 in group 0, 1 in group 1
    [2.0, 1.0]
    """
    entries = 1 if stats is None else stats.entries
    if entries > 1:  # layers stacked for a scan: each block of rows is a layer of its own
        k = w2.shape[0] // entries
        if k * entries != w2.shape[0]:
            raise ValueError(f"jaxprune: '{name}' has {w2.shape[0]} rows, not {entries} stacked "
                             "layers of equal fan-in")
        parts = [_by_group(run, w2[i * k:(i + 1) * k], stats.entry(i), f"{name}[layer {i}]",
                           sparsity, pattern) for i in range(entries)]
        return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)
    groups = 1 if stats is None else stats.groups
    if groups == 1:
        return run(w2, stats, name, sparsity)
    n = w2.shape[1]
    if n % groups:
        raise ValueError(f"jaxprune: '{name}' has {n} output columns, not a multiple of its "
                         f"{groups} conv groups")
    c = n // groups
    per = [sparsity] * groups
    if isinstance(pattern, pat_lib.Unstructured) and sparsity is not None:
        size = w2.shape[0] * c
        total = size * groups - int(pattern.n_keep(sparsity, size * groups))  # the layer's count
        counts = [total // groups + (g < total % groups) for g in range(groups)]
        per = [float(np.float32(k) / np.float32(size)) for k in counts]
    parts = [run(w2[:, g * c:(g + 1) * c], stats.group(g), f"{name}[group {g}]", per[g])
             for g in range(groups)]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=-1), *parts)


_REGISTRY: dict[str, LayerMethod] = {}

METHODS: Mapping[str, LayerMethod] = types.MappingProxyType(_REGISTRY)
"""Read-only view ``{name: method}`` of the registered layer methods."""


def register_method(name: str, method: LayerMethod, *, overwrite: bool = False) -> LayerMethod:
    """Register ``method`` under ``name`` (for :func:`get_method`, drivers and the CLI).

    Re-registering the same value is a no-op; a different method under a taken name is refused
    unless ``overwrite=True``.

    >>> from jaxprune.oneshot import SparseGPT
    >>> register_method("sparsegpt-b64", SparseGPT(blocksize=64))
    SparseGPT(blocksize=64, percdamp=0.01, quant=None)
    >>> get_method("sparsegpt-b64").blocksize
    64
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"jaxprune: a method name must be a non-empty string, got {name!r}")
    if not isinstance(method, LayerMethod):
        raise TypeError(
            f"jaxprune: register_method('{name}', ...) needs a LayerMethod value (subclass "
            f"jaxprune.oneshot.LayerMethod and implement prune_matrix), got {type(method).__name__}"
        )
    check_free("one-shot method", name, _REGISTRY, method, overwrite)
    _REGISTRY[name] = method
    return method


def get_method(method: str | LayerMethod) -> LayerMethod:
    """A layer method by name (one of :data:`METHODS`), or a :class:`LayerMethod` as is.

    >>> get_method("wanda+dsnot").label
    'wanda+dsnot'
    >>> get_method("nope")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: unknown one-shot method 'nope'; valid: [...]
    """
    return lookup("one-shot method", method, _REGISTRY, LayerMethod)
