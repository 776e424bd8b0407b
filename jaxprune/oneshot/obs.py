"""Exact Optimal Brain Surgeon (OBC greedy, Frantar & Alistarh 2022) for small layers.

Every output unit ``w`` (a column of the Flax kernel) shares ``H = XᵀX/n``. Greedy OBS removes,
one at a time, the weight with the smallest loss ``w_p² / (2 [H⁻¹]_pp)``, updates the others
optimally (``w -= w_p / [H⁻¹]_pp · H⁻¹[:, p]``) and downdates the inverse
(``H⁻¹ -= H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp``), so each step is the exact least-squares refit on the
remaining weights. The unstructured pattern distributes the layer's pruning budget over outputs
globally like OBC: every column's greedy loss increments are ranked together
(:func:`jaxprune.core.pipeline.leaf_mask` with ``n_keep=``) and column ``c`` prunes as many of its
first steps as it has among the ``round(s · size)`` smallest. N:M only considers weights in groups
that still hold more than they may keep (``n`` for ``sparsity = 1 - n/m``).

Costs ``O(out · in³)``; for small layers (the reference for SparseGPT's approximation).

Example:
    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats.from_inputs(np.random.default_rng(0).normal(size=(32, 6)))
    >>> w, m = OBS()(np.ones((6, 3), np.float32), st, 0.5)
    >>> int(np.asarray(m).sum())
    9
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.core import pipeline
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.common import damped_inverse_cholesky, prepare_hessian
from jaxprune.oneshot.methods import LayerMethod, register_method

__all__ = ["OBS", "obs_greedy", "budget_counts"]


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
        # exactly zero where pruned: later updates leave ~1e-8 float residue on earlier removals
        return jnp.where(pruned, 0.0, wc), ~pruned, losses

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


def budget_counts(losses: Any, n_prune: int) -> np.ndarray:
    """Per-column step counts: how many of each column's first greedy steps are among the
    ``n_prune`` smallest of all ``losses`` (``(steps, out)``); ties prune the lower flat index.

    The ranking is :func:`jaxprune.core.pipeline.leaf_mask` with ``n_keep=``.

    >>> budget_counts(np.array([[1., 0.5], [3., 2.]]), 2).tolist()
    [1, 1]
    """
    losses = np.asarray(losses, np.float32)
    out = losses.shape[1]
    if n_prune <= 0:
        return np.zeros(out, np.int32)
    big = float(np.finfo(np.float32).max)
    flat = np.nan_to_num(losses.reshape(-1), nan=big, posinf=big, neginf=-big)
    # leaf_mask keeps the lower index among equal scores; reversing the order makes ties prune the
    # lower index (the rule of a stable argsort of the losses, which this replaced)
    keep = pipeline.leaf_mask(flat[::-1], n_keep=flat.size - int(n_prune), path="<obs budget>")
    pruned = ~np.asarray(keep)[::-1].reshape(losses.shape)
    return pruned.sum(0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class OBS(LayerMethod):
    """Exact greedy OBS layer method (small layers); needs ``("gram",)``.

    Args:
      percdamp: dampening as a fraction of ``mean(diag H)``.
      chunk: output columns processed per compiled call.

    >>> import numpy as np
    >>> from jaxprune.oneshot.calibration import LayerStats
    >>> st = LayerStats(np.eye(4, dtype=np.float32), np.zeros(4), np.ones(4), 1, 4)
    >>> _, m = OBS(percdamp=0.0)(np.array([[4.], [1.], [3.], [2.]]), st, pattern="2:4")
    >>> np.asarray(m)[:, 0].tolist()
    [True, False, True, False]
    """

    needs: ClassVar[tuple[str, ...]] = ("gram",)
    label: ClassVar[str] = "obs"
    percdamp: float = 0.01
    chunk: int = 64

    def prune_matrix(self, w: jax.Array, stats: LayerStats | None, sparsity: Any,
                     pattern: pat_lib.Pattern, *, name: str = "<layer>"
                     ) -> tuple[jax.Array, jax.Array]:
        """Greedy OBS on the ``(fan_in, out)`` matrix with the module's budget rule.

        >>> st = LayerStats(np.eye(2, dtype=np.float32), np.zeros(2), np.ones(2), 1, 2)
        >>> _, m = OBS().prune_matrix(jnp.array([[1.], [3.]]), st, 0.5, pat_lib.Unstructured())
        >>> m[:, 0].tolist()
        [False, True]
        """
        self.check_stats(stats, name)
        w = jnp.asarray(w, jnp.float32)
        fin, out = w.shape
        h, dead = prepare_hessian(stats.hessian, name)
        w = jnp.where(jnp.asarray(dead)[:, None], 0.0, w)
        hinv = damped_inverse_cholesky(h, self.percdamp, name, upper_cholesky=False)
        if isinstance(pattern, pat_lib.NM):
            m = pattern.m
            n_pruned = int(np.round(np.float32(sparsity) * np.float32(m)))
            n_keep = min(max(m - n_pruned, pattern.n), m)  # as patterns.NM.mask
            counts = np.full(out, fin // m * (m - n_keep), np.int32)
            q, mask, _ = obs_greedy(w, hinv, counts, (n_keep, m), self.chunk)
        else:
            total = int(round(float(sparsity) * fin * out))
            counts = np.zeros(out, np.int32)
            if total:
                full = np.full(out, fin, np.int32)
                _, _, losses = obs_greedy(w, hinv, full, None, self.chunk)
                counts = budget_counts(losses, total)
            q, mask, _ = obs_greedy(w, hinv, counts, None, self.chunk)
        return jnp.asarray(q), jnp.asarray(mask)


register_method("obs", OBS())
