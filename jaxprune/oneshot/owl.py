"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity.

A layer's *outlier ratio* (LOD) is the fraction of its Wanda scores ``|W|·‖x‖`` above ``M`` times
their mean. Ratios are rescaled to ``[0, 2λ]``, centred and added to the density ``1 - sparsity``,
so layers with more outliers stay denser; the size-weighted mean sparsity equals ``sparsity``
exactly.

:class:`OWL` is a :class:`jaxprune.core.allocation.Allocation` (pass Wanda scores to
``compute_masks``); :func:`owl_sparsities` gives ``{kernel path: sparsity}`` from calibration stats
for the one-shot drivers (their ``sparsities=``), optionally pooling layers into groups (the paper
uses transformer blocks).

Example:
    >>> owl_from_ratios([0.0, 0.1], [100, 100], 0.5, lam=0.1)
    [0.6, 0.4]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxprune.core.allocation import Allocation, check_sparsity
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.wanda import wanda_scores

__all__ = ["OWL", "owl_from_ratios", "outlier_ratio", "owl_sparsities"]


def outlier_ratio(scores: Any, M: float = 5.0) -> float:
    """Fraction of entries above ``M`` × mean score.

    >>> outlier_ratio(np.array([1., 1., 1., 100.]), M=2.0)
    0.25
    """
    s = np.asarray(scores, np.float64)
    return float(np.mean(s > M * s.mean()))


def owl_from_ratios(ratios: Sequence[float], sizes: Sequence[int], sparsity: float,
                    lam: float = 0.08) -> list[float]:
    """Per-layer sparsities from outlier ratios: size-weighted mean = ``sparsity``, each in
    ``[0, 0.99]`` (where clipping would move the mean, the unclipped layers shift to restore it).

    >>> owl_from_ratios([0.2, 0.2], [10, 30], 0.7)
    [0.7, 0.7]
    """
    check_owl_args(sparsity, lam=lam)
    r = np.asarray(ratios, np.float64)
    w = np.asarray(sizes, np.float64) / np.sum(sizes)
    span = r.max() - r.min()
    z = np.zeros_like(r) if span <= 0 else (r - r.min()) / span * 2.0 * lam
    base = sparsity - z + np.sum(w * z)  # 1 - density; size-weighted mean = sparsity

    def mean_at(c: float) -> float:
        return float(np.sum(w * np.clip(base + c, 0.0, _CAP)))

    c = 0.0
    if abs(mean_at(0.0) - sparsity) > 1e-9:  # clipping moved the mean: shift until it holds
        lo, hi = -1.0 - lam * 2, 1.0 + lam * 2
        for _ in range(100):
            c = (lo + hi) / 2
            lo, hi = (c, hi) if mean_at(c) < sparsity else (lo, c)
    return [round(float(x), 10) for x in np.clip(base + c, 0.0, _CAP)]


_CAP = 0.99  # no layer is pruned beyond this


def check_owl_args(sparsity: Any, *, M: Any = 5.0, lam: Any = 0.08,
                   where: str = "OWL target") -> None:
    """Refuse a target OWL cannot honour (outside ``[0, 0.99]``) and bad ``M``/``lam``.

    >>> check_owl_args(0.995)
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: OWL sparsity 0.995 is above the per-layer cap 0.99, so no allocation \
has that mean
    """
    check_sparsity(where, sparsity)
    if float(sparsity) > _CAP:
        raise ValueError(f"jaxprune: OWL sparsity {float(sparsity):g} is above the per-layer cap "
                         f"{_CAP}, so no allocation has that mean")
    if isinstance(M, bool) or not isinstance(M, int | float) or not (math.isfinite(M) and M > 0):
        raise ValueError(f"jaxprune: OWL M (outlier threshold, x mean score) must be a finite "
                         f"number > 0, got {M!r}")
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not (
            math.isfinite(lam) and 0 <= lam < 0.5):
        raise ValueError(f"jaxprune: OWL lam (sparsity spread) must be in [0, 0.5), got {lam!r}")


@dataclasses.dataclass(frozen=True)
class OWL(Allocation):
    """Outlier-weighted allocation over the leaves' scores (pass Wanda scores).

    >>> sc = {"a": jnp.array([[1., 1.], [1., 1.]]), "b": jnp.array([[1., 1.], [1., 100.]])}
    >>> s = OWL(M=2.0, lam=0.1).allocate({k: v > 0 for k, v in sc.items()}, 0.5, sc)
    >>> float(s["a"]) > float(s["b"])
    True
    """

    traceable: ClassVar[bool] = False  # outlier ratios are host-side statistics
    M: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        super().__post_init__()
        check_owl_args(0.0, M=self.M, lam=self.lam)

    def _solve(self, shapes, target, scores):
        if scores is None:
            raise ValueError("jaxprune: OWL allocation needs (Wanda) scores")
        ratios = [outlier_ratio(np.asarray(s), self.M) for s in scores]
        sizes = [int(np.prod(s)) for s in shapes]
        return [jnp.asarray(v, jnp.float32)
                for v in owl_from_ratios(ratios, sizes, float(target), self.lam)]


def owl_sparsities(
    kernels: dict[str, Any],
    stats: dict[str, LayerStats],
    sparsity: float,
    *,
    M: float = 5.0,
    lam: float = 0.08,
    group: str | None = None,
) -> dict[str, float]:
    """``{path: sparsity}`` for the layers in ``stats`` (``kernels`` maps the same paths to weights,
    or is the params tree itself).

    ``group``: a regex whose first match in the path names the group (e.g. ``r"block_\\d+"``); layers
    of a group share its pooled outlier ratio. Default: one group per layer.

    >>> st = {"a": LayerStats(None, np.zeros(2), np.ones(2), 1, 2)}
    >>> owl_sparsities({"a": np.ones((2, 2))}, st, 0.5)
    {'a': 0.5}
    """
    check_owl_args(sparsity, M=M, lam=lam, where="owl_sparsities")
    keys = list(stats)
    if isinstance(kernels, Mapping) and any(k not in kernels for k in keys):
        from jaxprune.core.masks import leaves_with_paths  # the params tree itself

        kernels = {**dict(leaves_with_paths(kernels)), **kernels}
    missing = [k for k in keys if k not in kernels]
    if missing:
        raise ValueError(f"jaxprune: owl_sparsities: no kernel for calibrated layer(s) {missing}")
    gname = {}
    for k in keys:
        mt = re.search(group, k) if group else None
        gname[k] = mt.group(0) if mt else k
    groups = list(dict.fromkeys(gname.values()))
    pooled: dict[str, list[np.ndarray]] = {g: [] for g in groups}
    for k in keys:
        pooled[gname[k]].append(np.asarray(wanda_scores(kernels[k], stats[k], k)).reshape(-1))
    ratios = [outlier_ratio(np.concatenate(pooled[g]), M) for g in groups]
    sizes = [sum(x.size for x in pooled[g]) for g in groups]
    sp = dict(zip(groups, owl_from_ratios(ratios, sizes, sparsity, lam), strict=True))
    return {k: sp[gname[k]] for k in keys}
