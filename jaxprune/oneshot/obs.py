"""Exact Optimal Brain Surgeon (OBC greedy, Frantar & Alistarh 2022) for small layers.

Every output unit ``w`` (a column of the Flax kernel) shares ``H = XᵀX/n``. Greedy OBS removes,
one at a time, the weight with the smallest loss ``w_p² / (2 [H⁻¹]_pp)``, updates the others
optimally (``w -= w_p / [H⁻¹]_pp · H⁻¹[:, p]``) and downdates the inverse
(``H⁻¹ -= H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp``), so each step is the exact least-squares refit on the
remaining weights. Unstructured targets distribute the layer's pruning budget over outputs
globally like OBC: every column's greedy loss increments are ranked together and column ``c``
prunes as many of its first steps as it has among the ``round(s · size)`` smallest. N:M targets
only consider weights in groups that still hold more than ``n``.

Costs ``O(out · in³)``; for small layers (the reference for SparseGPT's approximation).

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    >>> st = LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), 32, 6)
    >>> w, m = obs(np.ones((6, 3), np.float32), st, 0.5)
    >>> int(np.asarray(m).sum())
    9
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.oneshot.calibration import LayerStats, as_matrix
from jaxprune.oneshot.common import (
    Target,
    damped_inverse_cholesky,
    parse_target,
    prepare_hessian,
)

__all__ = ["obs", "obs_greedy"]


@functools.partial(jax.jit, static_argnames=("steps", "nm"))
def _greedy(w: jax.Array, hinv: jax.Array, counts: jax.Array, steps: int,
            nm: tuple[int, int] | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy OBS on every column of ``w`` (fan_in, out) for ``counts[c]`` steps (≤ ``steps``)."""
    fin = w.shape[0]

    def one(wc: jax.Array, count: jax.Array):
        def step(k, c):
            wc, hi, pruned, losses = c
            diag = jnp.diag(hi)
            score = wc**2 / jnp.where(pruned, 1.0, diag)
            cand = ~pruned
            if nm is not None:
                n, m = nm
                kept_in_group = jnp.repeat((~pruned).reshape(-1, m).sum(-1), m)
                cand = cand & (kept_in_group > n)
            score = jnp.where(cand, score, jnp.inf)
            p = jnp.argmin(score)
            hp = hi[:, p]
            dp = hi[p, p]
            active = k < count
            w_new = (wc - wc[p] / dp * hp).at[p].set(0.0)
            h_new = hi - jnp.outer(hp, hp) / dp
            h_new = h_new.at[p, p].set(1.0)
            wc = jnp.where(active, w_new, wc)
            hi = jnp.where(active, h_new, hi)
            pruned = jnp.where(active, pruned.at[p].set(True), pruned)
            losses = losses.at[k].set(score[p] / 2.0)
            return wc, hi, pruned, losses

        init = (wc, hinv, jnp.zeros(fin, bool), jnp.zeros(max(steps, 1), jnp.float32))
        wc, _, pruned, losses = jax.lax.fori_loop(0, steps, step, init)
        return wc, ~pruned, losses

    return jax.vmap(one, in_axes=(1, 0), out_axes=(1, 1, 1))(w, counts)


def obs_greedy(w: Any, hinv: Any, counts: Any, nm: tuple[int, int] | None = None,
               chunk: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy exact OBS of each column ``c`` of ``w`` for ``counts[c]`` steps, in column chunks.

    Returns ``(new_w, keep_mask, step_losses (steps, out))``.

    >>> w, m, _ = obs_greedy(np.array([[1.], [2.]]), np.eye(2), np.array([1]))
    >>> m[:, 0].tolist()
    [False, True]
    """
    w = jnp.asarray(w, jnp.float32)
    hinv = jnp.asarray(hinv, jnp.float32)
    counts = np.asarray(counts, np.int32)
    steps = int(counts.max()) if counts.size else 0
    outs = [[], [], []]
    for c0 in range(0, w.shape[1], chunk):
        r = _greedy(w[:, c0:c0 + chunk], hinv, jnp.asarray(counts[c0:c0 + chunk]), steps, nm)
        for lst, v in zip(outs, r, strict=True):
            lst.append(np.asarray(v))
    return tuple(np.concatenate(o, axis=1) for o in outs)  # type: ignore[return-value]


def obs(weight: Any, stats: LayerStats, target: Target, *, percdamp: float = 0.01,
        name: str = "<layer>", chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """Exact greedy OBS pruning of one layer; returns ``(new_weight, mask)``.

    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
    >>> _, m = obs(np.array([[4.], [1.], [3.], [2.]]), st, "2:4", percdamp=0.0)
    >>> np.asarray(m)[:, 0].tolist()
    [True, False, True, False]
    """
    pattern, s = parse_target(target, name, stats.fan_in)
    if stats.gram is None:
        raise ValueError(f"jaxprune: OBS on '{name}' needs calibration with gram=True")
    w = as_matrix(weight, stats, name).astype(jnp.float32)
    fin, out = w.shape
    h, dead = prepare_hessian(stats.hessian, name)
    w = jnp.where(jnp.asarray(dead)[:, None], 0.0, w)
    hinv = damped_inverse_cholesky(h, percdamp, name, upper_cholesky=False)
    if isinstance(pattern, pat_lib.NM):
        nm = (pattern.n, pattern.m)
        counts = np.full(out, fin // pattern.m * (pattern.m - pattern.n), np.int32)
        q, m, _ = obs_greedy(w, hinv, counts, nm, chunk)
    else:
        total = int(round(s * fin * out))
        full = np.full(out, fin, np.int32)
        _, _, losses = obs_greedy(w, hinv, full, None, chunk)
        if total == 0:
            counts = np.zeros(out, np.int32)
        else:
            order = np.argsort(losses.reshape(-1), kind="stable")[:total]
            counts = np.bincount(order % out, minlength=out).astype(np.int32)
        q, m, _ = obs_greedy(w, hinv, counts, None, chunk)
    shape = np.shape(weight)
    return (jnp.asarray(q).reshape(shape).astype(jnp.asarray(weight).dtype),
            jnp.asarray(m).reshape(shape))


obs.needs_gram = True  # type: ignore[attr-defined]
