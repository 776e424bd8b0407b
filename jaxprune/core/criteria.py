"""Criteria: per-weight importance scores. Higher score = more important = kept.

A criterion is a :class:`Criterion` value wrapping a *leaf function*
``(w, *, grads, key, act_norms, movement) -> score`` that receives only the signals it declares in
``needs``. Calling a criterion on a params pytree returns a score pytree (``None`` where the mask is
``None``). Writing a new criterion is a few lines::

    fisher = Criterion("fisher", lambda w, grads: grads**2, needs=("grads",))

Example:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.criteria.magnitude({"w": jnp.array([-3., 1.])})["w"]
    Array([3., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.masks import PyTree, _is_none, leaves_with_paths
from jaxprune.core.registry import check_free, lookup

__all__ = [
    "SIGNALS", "Criterion", "CRITERIA", "register", "get", "magnitude", "random", "saliency", "taylor",
    "movement", "wanda", "broadcast_input_stat",
]

SIGNALS = ("grads", "key", "act_norms", "movement")


class Criterion(NamedTuple):
    """A named scoring rule. ``needs`` lists the signals its ``leaf_fn`` takes as keywords."""

    name: str
    leaf_fn: Callable[..., jax.Array]
    needs: tuple[str, ...] = ()

    def __call__(self, params: PyTree, masks: PyTree | None = None, **signals: Any) -> PyTree:
        """Scores for every leaf (or only where ``masks`` is not ``None``).

        Signals other than ``key`` are pytrees mirroring ``params`` (leaves may be ``None``);
        ``key`` is one PRNG key, folded with the leaf index.
        """
        missing = [s for s in self.needs if signals.get(s) is None]
        if missing:
            raise ValueError(
                f"jaxprune: criterion '{self.name}' needs signal(s) {missing}; pass them as "
                f"keyword arguments (got {sorted(k for k, v in signals.items() if v is not None)})"
            )
        flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_none)
        mflat = (
            [None if m is None else True for _, m in leaves_with_paths(masks)]
            if masks is not None else [True] * len(flat)
        )
        if len(mflat) != len(flat):
            from jaxprune.core.masks import check_masks

            check_masks(params, masks)
        per_leaf: dict[str, list[Any]] = {}
        for s in self.needs:
            if s == "key":
                continue
            sflat = jax.tree_util.tree_flatten(signals[s], is_leaf=_is_none)[0]
            if len(sflat) != len(flat):
                ppaths = {p for p, _ in leaves_with_paths(params)}
                spaths = {p for p, _ in leaves_with_paths(signals[s])}
                diff = sorted(ppaths ^ spaths)[:1]
                where = f" (e.g. '{diff[0]}' is in only one of them)" if diff else ""
                raise ValueError(
                    f"jaxprune: signal '{s}' for criterion '{self.name}' has {len(sflat)} leaves "
                    f"but params have {len(flat)}{where}; it must mirror the params tree"
                )
            per_leaf[s] = sflat
        paths = [p for p, _ in leaves_with_paths(params)]
        out = []
        for i, (w, m) in enumerate(zip(flat, mflat, strict=True)):
            if w is None or m is None:
                out.append(None)
                continue
            kw: dict[str, Any] = {}
            for s in self.needs:
                if s == "key":
                    kw["key"] = jax.random.fold_in(signals["key"], i)
                else:
                    kw[s] = per_leaf[s][i]
                    if kw[s] is None:
                        raise ValueError(f"jaxprune: signal '{s}' has no value for pruned leaf "
                                         f"'{paths[i]}' (criterion '{self.name}')")
                    if s in ("grads", "movement") and tuple(np.shape(kw[s])) != tuple(w.shape):
                        raise ValueError(
                            f"jaxprune: signal '{s}' for '{paths[i]}' has shape "
                            f"{tuple(np.shape(kw[s]))} but the param has shape {tuple(w.shape)}")
            try:
                out.append(self.leaf_fn(w, **kw).astype(jnp.float32))
            except ValueError as e:
                raise ValueError(f"jaxprune: criterion '{self.name}' on '{paths[i]}': "
                                 f"{str(e).removeprefix('jaxprune: ')}") from e
        return jax.tree_util.tree_unflatten(treedef, out)


def _magnitude(w: jax.Array) -> jax.Array:
    return jnp.abs(w)


def _random(w: jax.Array, key: jax.Array) -> jax.Array:
    return jax.random.uniform(key, w.shape)


def _saliency(w: jax.Array, grads: jax.Array) -> jax.Array:
    return jnp.abs(w * grads)


def _taylor(w: jax.Array, grads: jax.Array) -> jax.Array:
    # First-order estimate of the loss increase when w is set to 0: L(0) - L(w) ~= -g * w.
    return -(w * grads)


def _movement(w: jax.Array, movement: jax.Array) -> jax.Array:
    # Movement pruning (Sanh et al. 2020): S = -sum_t g_t * w_t, accumulated by the caller.
    del w
    return movement


def broadcast_input_stat(w: jax.Array, stat: jax.Array) -> jax.Array:
    """Broadcast a per-input statistic onto a kernel whose last axis is the output axis.

    ``stat`` may have shape ``w.shape[:-1]`` (per fan-in entry) or ``(w.shape[-2],)`` (per input
    channel of a conv kernel ``(h, w, in, out)``).

    >>> broadcast_input_stat(jnp.ones((3, 2)), jnp.array([1., 2., 3.]))[:, 0]
    Array([1., 2., 3.], dtype=float32)
    """
    stat = jnp.asarray(stat)
    if stat.shape == w.shape:
        return stat
    if stat.shape == w.shape[:-1]:
        return stat[..., None]
    if w.ndim >= 2 and stat.shape == (w.shape[-2],):
        return stat.reshape((1,) * (w.ndim - 2) + (w.shape[-2], 1))
    raise ValueError(
        f"jaxprune: input statistic of shape {stat.shape} does not fit a kernel of shape {w.shape}; "
        f"expected {w.shape[:-1]} or ({w.shape[-2] if w.ndim >= 2 else '?'},)"
    )


def _wanda(w: jax.Array, act_norms: jax.Array) -> jax.Array:
    return jnp.abs(w) * broadcast_input_stat(w, act_norms)


magnitude = Criterion("magnitude", _magnitude)
random = Criterion("random", _random, ("key",))
saliency = Criterion("saliency", _saliency, ("grads",))
taylor = Criterion("taylor", _taylor, ("grads",))
movement = Criterion("movement", _movement, ("movement",))
wanda = Criterion("wanda", _wanda, ("act_norms",))

CRITERIA: dict[str, Criterion] = {
    c.name: c for c in (magnitude, random, saliency, taylor, movement, wanda)
}


def register(criterion: Criterion, *, overwrite: bool = False) -> Criterion:
    """Make ``criterion`` available by its name everywhere a criterion name is accepted.

    Refuses to replace an existing name unless ``overwrite=True``. Returns the criterion.

    >>> fisher = register(Criterion("fisher_demo", lambda w, grads: grads**2, needs=("grads",)))
    >>> get("fisher_demo") is fisher
    True
    """
    if not isinstance(criterion, Criterion):
        raise TypeError(f"jaxprune: register needs a Criterion, got {type(criterion).__name__}")
    bad = [s for s in criterion.needs if s not in SIGNALS]
    if bad:
        raise ValueError(
            f"jaxprune: criterion '{criterion.name}' needs unknown signal(s) {bad}; valid: {SIGNALS}"
        )
    check_free("criterion", criterion.name, CRITERIA, criterion, overwrite)
    CRITERIA[criterion.name] = criterion
    return criterion


def get(name: str | Criterion) -> Criterion:
    """Look up a criterion by name (or pass one through).

    >>> get("magnitude").name
    'magnitude'
    """
    return lookup("criterion", name, CRITERIA, Criterion)
