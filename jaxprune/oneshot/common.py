"""Shared numerics of the one-shot layer methods: Hessian checks, damped inverses, errors.

(Sparsity and pattern handling is shared through :class:`jaxprune.oneshot.methods.LayerMethod` and
:func:`jaxprune.core.pipeline.resolve_sparsity`.)

>>> recon_error(np.eye(2), np.eye(2), np.eye(2))
0.0
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_hessian", "prepare_hessian", "damped_inverse_cholesky", "recon_error",
           "check_layer_weight"]


def check_layer_weight(weight: Any, name: str) -> None:
    """Refuse a kernel a layer method cannot prune faithfully, naming the layer: a non-float
    dtype (kept entries would be rounded to integers) or a NaN/Inf entry (SparseGPT/OBS would
    spread it into every weight its update touches). Concrete weights only.

    >>> check_layer_weight(np.ones((2, 2), np.int32), "fc/kernel")
    Traceback (most recent call last):
    ...
    TypeError: jaxprune: layer 'fc/kernel' has dtype int32; one-shot methods prune floating-point \
kernels (cast it, or leave the layer out)
    """
    dt = getattr(weight, "dtype", None)
    dt = np.asarray(weight).dtype if dt is None else dt
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"jaxprune: layer '{name}' has dtype {dt}; one-shot methods prune "
                        "floating-point kernels (cast it, or leave the layer out)")
    if isinstance(weight, jax.core.Tracer):
        return
    a = np.asarray(jnp.asarray(weight, jnp.float32))
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"jaxprune: layer '{name}' has a non-finite weight {a[idx]} at {idx} "
                         f"({int(bad.sum())} of {a.size}); fix the weights before pruning")


def check_hessian(h: Any, name: str) -> np.ndarray:
    """Return ``h`` as float32 numpy; raise ``ValueError`` naming the layer on NaN/Inf or bad shape.

    >>> check_hessian(np.array([[1., np.nan], [0., 1.]]), "fc/kernel")
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: Hessian of layer 'fc/kernel' has 1 non-finite entries (first at (0, 1): nan)
    """
    h = np.asarray(h, np.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"jaxprune: Hessian of layer '{name}' must be square, got {h.shape}")
    bad = ~np.isfinite(h)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"jaxprune: Hessian of layer '{name}' has {int(bad.sum())} non-finite entries "
            f"(first at {idx}: {h[idx]})"
        )
    return h


@jax.jit
def _inv_chol(h: jax.Array, damp: jax.Array) -> jax.Array:
    n = h.shape[0]
    hd = h + damp * jnp.eye(n, dtype=h.dtype)
    lo = jnp.linalg.cholesky(hd)
    hinv = jax.scipy.linalg.cho_solve((lo, True), jnp.eye(n, dtype=h.dtype))
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T  # upper U with H^-1 = U^T U


@jax.jit
def _inv(h: jax.Array, damp: jax.Array) -> jax.Array:
    n = h.shape[0]
    hd = h + damp * jnp.eye(n, dtype=h.dtype)
    lo = jnp.linalg.cholesky(hd)
    hinv = jax.scipy.linalg.cho_solve((lo, True), jnp.eye(n, dtype=h.dtype))
    return 0.5 * (hinv + hinv.T)


def prepare_hessian(h: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Check ``h`` and mark dead inputs (zero diagonal): returns ``(h with 1 on dead diag, dead)``.

    >>> h, dead = prepare_hessian(np.diag([2., 0.]), "fc")
    >>> np.diag(h).tolist(), dead.tolist()
    ([2.0, 1.0], [False, True])
    """
    h = check_hessian(h, name).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def damped_inverse_cholesky(h: np.ndarray, percdamp: float, name: str,
                            upper_cholesky: bool = True, max_tries: int = 8) -> jax.Array:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (or the inverse itself), ``λ = percdamp·mean(diag)``.

    If the damped ``H`` is singular or indefinite (Cholesky fails, NaN appears) ``λ`` grows ×10 with a
    ``RuntimeWarning`` naming the layer, up to ``max_tries`` times; the result is never NaN.

    >>> u = damped_inverse_cholesky(np.eye(2, dtype=np.float32), 0.0, "fc")
    >>> np.allclose(u, np.eye(2))
    True
    """
    hj = jnp.asarray(h, jnp.float32)
    mean_diag = float(np.mean(np.abs(np.diag(h)))) or 1.0
    damp = percdamp * mean_diag
    fn = _inv_chol if upper_cholesky else _inv
    for i in range(max_tries):
        out = fn(hj, jnp.asarray(damp, jnp.float32))
        if bool(jnp.all(jnp.isfinite(out))):
            return out
        new = max(damp * 10.0, 1e-2 * mean_diag) if damp > 0 else 1e-2 * mean_diag
        if i == 0 or new > damp:
            warnings.warn(
                f"jaxprune: Hessian of layer '{name}' is singular or indefinite with dampening "
                f"{damp:.3g}; increasing dampening to {new:.3g}",
                RuntimeWarning, stacklevel=3,
            )
        damp = new
    # Last resort: a diagonal Hessian (never NaN).
    d = np.maximum(np.abs(np.diag(h)), 1e-8 * mean_diag) + damp
    warnings.warn(f"jaxprune: Hessian of layer '{name}' stays indefinite; using its diagonal",
                  RuntimeWarning, stacklevel=3)
    inv = np.diag(1.0 / d).astype(np.float32)
    return jnp.asarray(np.sqrt(inv) if upper_cholesky else inv)


def recon_error(w_dense: Any, w_new: Any, h: Any) -> float:
    """Relative layer reconstruction error ``‖WX−ŴX‖²/‖WX‖²`` from ``H ∝ XᵀX`` (kernels ``(in, out)``).

    >>> recon_error(np.eye(2), np.zeros((2, 2)), np.eye(2))
    1.0
    """
    w = np.asarray(w_dense, np.float64)
    d = w - np.asarray(w_new, np.float64)
    h = np.asarray(h, np.float64)
    num = float(np.einsum("io,ij,jo->", d, h, d))
    den = float(np.einsum("io,ij,jo->", w, h, w))
    return num / max(den, 1e-30)
