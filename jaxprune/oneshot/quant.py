"""Weight quantization for the one-shot sweep: the grid (GPTQ's), RTN, codes + scales, qwix RTN.

A :class:`QuantSpec` describes a uniform integer grid for a ``(fan_in, out)`` matrix: ``bits``
(2..8), ``group_size`` consecutive fan-in rows share one scale (and zero point) per output column
(``None``: one per output column, "per channel"), ``symmetric`` or asymmetric, and ``act_order``
(process the fan-in in order of decreasing Hessian diagonal, used by the sweep). The grid is the
one of GPTQ's reference code (``Quantizer.find_params`` with ``weight=True``), per group and column:

* ``xmin = min(min x, 0)``, ``xmax = max(max x, 0)`` (0 is always on the grid, so pruned weights
  stay exactly 0); symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``; all-zero: ``±1``.
  Two deliberate differences from GPTQ's code: it sets ``xmin = -xmax`` only where ``xmin < 0``
  (an all-positive group then gets half the range it needs and clips at ``7/15·max``), and its
  symmetric scale ``2·xmax/maxq`` (also qwix's ``absmax / (qmax + 0.5)``) puts every group's
  absmax exactly on a rounding tie (``±7.5``), so float32 vs float64 rounding flips its code; the
  restricted range ``xmax / (2**(bits-1) - 1)`` maps it to ``±7`` exactly.
* asymmetric: ``scale = (xmax - xmin) / maxq`` with ``maxq = 2**bits - 1``, ``zero =
  round(-xmin / scale)``; symmetric: ``scale = xmax / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)``
  (signed codes ``-(2**(bits-1)-1) .. 2**(bits-1)-1``, int4: ``-7..7``).
* ``q(x) = scale · (clip(round(x / scale) + zero, 0, maxq) - zero)``.

The GPTQ/joint sweep itself is :class:`jaxprune.oneshot.sparsegpt.SparseGPT` with
``quant=QuantSpec(...)`` (and :class:`~jaxprune.oneshot.sparsegpt.GPTQ`); it returns dequantized
weights, and :class:`QuantizedWeight` holds the integer codes and group scales.

Example:
    >>> import numpy as np
    >>> w = np.array([[1.0, -2.0], [0.5, 4.0], [-1.0, 0.0], [0.25, 1.0]], np.float32)
    >>> qw = rtn(w, QuantSpec(bits=4, group_size=2))
    >>> qw.codes.dtype, qw.scales.shape
    (dtype('int8'), (2, 2))
    >>> bool(np.abs(np.asarray(qw.dequantize()) - w).max() < 0.3)
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.methods import LayerMethod, get_method

__all__ = ["QuantSpec", "QuantizedWeight", "grid_params", "grid_constants", "grid_params_traced",
           "fake_quant", "encode", "rtn", "row_params", "qwix_rtn", "RoundToNearest"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A uniform integer grid for weights (hashable, static under ``jit``).

    Args:
      bits: 2..8 (int4 and int8 are the common ones).
      group_size: fan-in rows per scale; ``None`` = one scale per output column.
      symmetric: symmetric (signed codes, no zero point) or asymmetric (unsigned + zero point).
      act_order: the sweep visits fan-in rows by decreasing Hessian diagonal (GPTQ's
        ``desc_act``); with groups, the scales are computed once from the original weights
        ("static groups") so every group stays a contiguous block of rows.

    >>> QuantSpec(bits=8, group_size=None).maxq
    255
    >>> QuantSpec(bits=1)
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: QuantSpec.bits must be an int in 2..8, got 1
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    act_order: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"jaxprune: QuantSpec.bits must be an int in 2..8, got {self.bits!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(
                f"jaxprune: QuantSpec.group_size must be a positive int or None, got {g!r}")
        for flag in ("symmetric", "act_order"):
            if not isinstance(getattr(self, flag), bool | np.bool_):
                raise ValueError(f"jaxprune: QuantSpec.{flag} must be a bool, got "
                                 f"{getattr(self, flag)!r}")

    @property
    def maxq(self) -> int:
        """Largest unsigned code ``2**bits - 1``."""
        return 2**self.bits - 1

    def groups(self, fan_in: int) -> int:
        """Number of scale groups along a fan-in of ``fan_in`` rows.

        >>> QuantSpec(group_size=4).groups(10), QuantSpec(group_size=None).groups(10)
        (3, 1)
        """
        return 1 if self.group_size is None else math.ceil(fan_in / self.group_size)


def grid_params(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero)`` per column of ``x`` ``(rows, out)`` (GPTQ's ``find_params``), shape ``(out,)``.

    >>> s, z = grid_params(jnp.array([[1.0], [-3.0]]), QuantSpec(bits=4))
    >>> s.tolist(), z.tolist()
    ([0.4285714328289032], [8.0])
    """
    return grid_params_traced(x, grid_constants(spec))


def grid_constants(spec: QuantSpec) -> jax.Array:
    """``[maxq, 2**(bits-1), symmetric]`` as a float32 array: the grid as *traced* values, so one
    compiled sweep serves every bit width and both symmetries.

    >>> grid_constants(QuantSpec(bits=8, symmetric=False)).tolist()
    [255.0, 128.0, 0.0]
    """
    return jnp.array([spec.maxq, 2 ** (spec.bits - 1), float(spec.symmetric)], jnp.float32)


def grid_params_traced(x: jax.Array, qc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`grid_params` with the grid given by :func:`grid_constants` (traceable).

    >>> s, z = grid_params_traced(jnp.array([[1.0], [-3.0]]), grid_constants(QuantSpec(4)))
    >>> s.tolist(), z.tolist()
    ([0.4285714328289032], [8.0])
    """
    maxq, half, sym = qc[0], qc[1], qc[2] > 0
    xmin = jnp.minimum(jnp.min(x, axis=0), 0.0)
    xmax = jnp.maximum(jnp.max(x, axis=0), 0.0)
    amax = jnp.maximum(-xmin, xmax)
    amax = jnp.where(amax == 0, 1.0, amax)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both0, -1.0, xmin)
    xmax = jnp.where(both0, 1.0, xmax)
    s_asym = (xmax - xmin) / maxq
    scale = jnp.where(sym, amax / (half - 1), s_asym)
    zero = jnp.where(sym, half, jnp.round(-xmin / s_asym))
    return scale, zero


def _codes(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    return jnp.clip(jnp.round(x / scale) + zero, 0, maxq)


def fake_quant(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Quantize-dequantize ``x`` onto the grid ``scale · (code - zero)`` (broadcasting).

    >>> fake_quant(jnp.array([0.0, 0.3, 5.0]), 0.5, 8.0, 15).tolist()
    [0.0, 0.5, 3.5]
    """
    return scale * (_codes(x, scale, zero, maxq) - zero)


def row_params(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Grid params of every row of ``w`` ``(fan_in, out)`` from ``w`` itself: ``(scale, zero)``,
    each ``(fan_in, out)`` (rows of one group share a value). RTN, and the sweep's static groups.

    >>> s, _ = row_params(jnp.arange(6.).reshape(3, 2), QuantSpec(group_size=2))
    >>> np.round(np.asarray(s[:, 0]) * 7, 4).tolist()  # absmax of the group
    [2.0, 2.0, 4.0]
    """
    fin, out = w.shape
    g = fin if spec.group_size is None else spec.group_size
    ng = math.ceil(fin / g)
    wp = jnp.pad(w, ((0, ng * g - fin), (0, 0))).reshape(ng, g, out)
    s, z = jax.vmap(lambda x: grid_params(x, spec))(wp)
    return jnp.repeat(s, g, axis=0)[:fin], jnp.repeat(z, g, axis=0)[:fin]


@struct.dataclass
class QuantizedWeight:
    """Integer codes + group scales of a ``(fan_in, out)`` matrix (a pytree; metadata static).

    ``codes``: ``(fan_in, out)``; ``int8`` signed codes ``-2**(b-1)..2**(b-1)-1`` (symmetric) or
    ``uint8`` codes ``0..2**b-1`` (asymmetric). ``scales``: ``(groups, out)`` float32; ``zeros``:
    ``(groups, out)`` ``uint8`` (asymmetric) or ``None``. Value = ``scale · (code - zero)``.

    >>> qw = rtn(np.array([[1.0], [-2.0]], np.float32), QuantSpec(bits=8, group_size=None))
    >>> qw.dequantize().shape, qw.spec.bits
    ((2, 1), 8)
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    spec: QuantSpec = struct.field(pytree_node=False)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The dequantized ``(fan_in, out)`` matrix.

        >>> qw = rtn(np.array([[0.75, -1.5]], np.float32), QuantSpec(group_size=1))
        >>> np.round(np.asarray(qw.dequantize()), 5).tolist()
        [[0.75, -1.5]]
        """
        fin = self.codes.shape[0]
        g = fin if self.spec.group_size is None else self.spec.group_size
        s = jnp.repeat(self.scales, g, axis=0)[:fin]
        c = self.codes.astype(jnp.float32)
        if self.zeros is not None:
            c = c - jnp.repeat(self.zeros.astype(jnp.float32), g, axis=0)[:fin]
        return (s * c).astype(dtype)


def encode(w: jax.Array, scale_rows: jax.Array, zero_rows: jax.Array, spec: QuantSpec
           ) -> QuantizedWeight:
    """Codes of ``w`` ``(fan_in, out)`` on per-row grid params (rows of a group share them).

    Applied to weights already on the grid (the sweep's output) it recovers their exact codes.

    >>> s, z = row_params(jnp.array([[0.5], [-1.0]]), QuantSpec(group_size=None))
    >>> encode(jnp.array([[0.4], [-0.8]]), s, z, QuantSpec(group_size=None)).codes.tolist()
    [[3], [-6]]
    """
    w = jnp.asarray(w, jnp.float32)
    fin = w.shape[0]
    g = fin if spec.group_size is None else spec.group_size
    c = _codes(w, scale_rows, zero_rows, spec.maxq)
    scales = jnp.asarray(scale_rows[::g], jnp.float32)
    if spec.symmetric:
        return QuantizedWeight((c - zero_rows).astype(jnp.int8), scales, None, spec)
    return QuantizedWeight(c.astype(jnp.uint8), scales, zero_rows[::g].astype(jnp.uint8), spec)


def rtn(w: Any, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``(fan_in, out)`` matrix (no calibration).

    >>> rtn(np.array([[0.1], [1.0]], np.float32), QuantSpec(bits=4, group_size=None)).codes.tolist()
    [[1], [7]]
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"jaxprune: rtn quantizes a (fan_in, out) matrix, got shape {w.shape}")
    return _rtn(w, spec)


@jax.jit(static_argnums=1)
def _rtn(w: jax.Array, spec: QuantSpec) -> QuantizedWeight:
    return encode(w, *row_params(w, spec), spec)


@dataclasses.dataclass(frozen=True)
class RoundToNearest(LayerMethod):
    """Prune with ``base`` (a method or its name; ``None``: keep all), then put the kept weights on
    the grid by :func:`rtn` (no compensation): the "prune, then quantize separately" baseline, and
    dense RTN, as a layer method for the one-shot drivers. Needs what ``base`` needs.

    >>> w = np.array([[1.0, -2.0], [0.5, 4.0], [-1.0, 0.0], [0.25, 1.0]], np.float32)
    >>> q, m = RoundToNearest(None, QuantSpec(bits=4, group_size=None))(w, None)
    >>> bool(m.all()), np.round(np.asarray(q)[:, 1] * 7 / 4).tolist()  # codes, scale 4/7
    (True, [-3.0, 7.0, 0.0, 2.0])
    >>> q, m = RoundToNearest("magnitude", QuantSpec(bits=8))(w, None, 0.5)
    >>> int(m.sum()), RoundToNearest("sparsegpt").label
    (4, 'sparsegpt+rtn')
    """

    base: LayerMethod | str | None = None
    quant: QuantSpec = QuantSpec()

    def __post_init__(self) -> None:
        if self.base is not None:
            object.__setattr__(self, "base", get_method(self.base))
        if not isinstance(self.quant, QuantSpec):
            raise ValueError(f"jaxprune: RoundToNearest.quant must be a QuantSpec, got {self.quant!r}")

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """What ``base`` needs (nothing without one)."""
        return () if self.base is None else self.base.needs

    @property
    def label(self) -> str:  # type: ignore[override]
        """``"rtn"`` or ``"<base label>+rtn"``."""
        return "rtn" if self.base is None else f"{self.base.label}+rtn"

    def default_sparsity(self, pattern: pat_lib.Pattern) -> float | None:
        """Without ``base``: ``0.0`` (dense RTN); with one: ``base``'s default.

        >>> RoundToNearest()(np.ones((2, 1), np.float32), None)[0].tolist()
        [[1.0], [1.0]]
        """
        return 0.0 if self.base is None else self.base.default_sparsity(pattern)

    def prune_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                     pattern: pat_lib.Pattern, *, name: str = "<layer>"
                     ) -> tuple[jax.Array, jax.Array]:
        """``base`` (if any) on the ``(fan_in, out)`` matrix, then RTN of its kept weights.

        >>> RoundToNearest().prune_matrix(jnp.ones((2, 1)), None, 0.0, pat_lib.Unstructured()
        ...                               )[0].tolist()
        [[1.0], [1.0]]
        """
        qw, m = self.compress_matrix(w, stats, sparsity, pattern, name=name)
        return jnp.where(m, qw.dequantize(), 0.0), m

    def compress_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                        pattern: pat_lib.Pattern, *, name: str = "<layer>"
                        ) -> tuple[QuantizedWeight, jax.Array]:
        """:meth:`prune_matrix` as codes + scales (pruned entries hold the code of 0) and mask.

        >>> qw, m = RoundToNearest().compress_matrix(jnp.ones((2, 1)), None, 0.0,
        ...                                          pat_lib.Unstructured())
        >>> qw.codes.tolist(), bool(m.all())
        ([[7], [7]], True)
        """
        if self.base is None:
            m = jnp.ones(w.shape, bool)
        else:
            w, m = self.base.prune_matrix(w, stats, sparsity, pattern, name=name)
        return _rtn(jnp.where(m, jnp.asarray(w, jnp.float32), 0.0), self.quant), m


def qwix_rtn(w: Any, bits: int = 4, group_size: int | None = None) -> jax.Array:
    """qwix's round-to-nearest PTQ (``absmax``, symmetric) of a ``(fan_in, out)`` matrix, dequantized.

    The baseline the GPTQ/joint sweep is measured against; needs the ``quant`` extra (qwix).
    Scales per output column and per ``group_size`` fan-in rows (qwix ``tiled_axes``).

    Example (skipped here, it imports qwix; ``tests/test_qwix.py`` runs it):

    >>> w = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    >>> bool(np.abs(qwix_rtn(w, 8) - w).max() < 0.02)  # doctest: +SKIP
    True
    """
    import qwix  # optional dependency: imported only here

    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"jaxprune: qwix_rtn quantizes a (fan_in, out) matrix, got shape {w.shape}")
    qtype = {4: jnp.int4, 8: jnp.int8}.get(bits)
    if qtype is None:
        raise ValueError(f"jaxprune: qwix_rtn supports bits 4 and 8, got {bits}")
    tiled = None if group_size is None else {0: int(group_size)}
    qa = qwix.quantize(w, qtype, channelwise_axes=(1,), tiled_axes=tiled)
    return qwix.dequantize(qa)
_ = np  # used by the doctests
