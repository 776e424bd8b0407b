"""Shared numerics of the one-shot layer methods: Hessian checks, damped inverses, errors.

(Sparsity and pattern handling is shared through :class:`jaxprune.oneshot.methods.LayerMethod` and
:func:`jaxprune.core.pipeline.resolve_sparsity`.)

>>> recon_error(np.eye(2), np.eye(2), np.eye(2))
0.0
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.masks import find_nonfinite

__all__ = ["check_hessian", "prepare_hessian", "zero_dead", "damped_inverse_cholesky",
           "recon_error", "check_layer_weight"]


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
    bad = find_nonfinite(a)
    if bad is not None:
        idx, v, n = bad
        raise ValueError(f"jaxprune: layer '{name}' has a non-finite weight {v} at {idx} "
                         f"({n} of {a.size}); fix the weights before pruning")


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
    bad = find_nonfinite(h)
    if bad is not None:
        idx, v, n = bad
        raise ValueError(f"jaxprune: Hessian of layer '{name}' has {n} non-finite entries "
                         f"(first at {idx}: {v})")
    return h


@functools.partial(jax.jit, static_argnums=2)
def _inv_xla(h: jax.Array, damp: jax.Array, upper_cholesky: bool) -> jax.Array:
    """``(H + damp·I)⁻¹``, or its upper Cholesky factor ``U`` (``H⁻¹ = UᵀU``), in one program."""
    n = h.shape[0]
    lo = jnp.linalg.cholesky(h + damp * jnp.eye(n, dtype=h.dtype))
    hinv = jax.scipy.linalg.cho_solve((lo, True), jnp.eye(n, dtype=h.dtype))
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T if upper_cholesky else hinv


_BLAS_LIMIT: list[Any] = []


def _one_blas_thread() -> Any:
    """A context limiting BLAS/LAPACK to one thread (a layer's factorisation is small, and
    OpenBLAS threads spinning against XLA's thread pool cost 10-100x on a busy CPU)."""
    import contextlib

    if not _BLAS_LIMIT:
        try:
            import scipy.linalg  # noqa: F401 - load its BLAS before the controller looks
            from threadpoolctl import ThreadpoolController

            _BLAS_LIMIT.append(ThreadpoolController())
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            _BLAS_LIMIT.append(None)
    ctl = _BLAS_LIMIT[0]
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1, user_api="blas")


def _inv_chol_host(h: np.ndarray, damp: float, upper_cholesky: bool) -> np.ndarray | None:
    """Host LAPACK (float32, like the reference code), ``None`` when a factorisation fails.

    Upper ``U`` with ``(H + λI)⁻¹ = UᵀU`` without forming the inverse: with ``J`` the reversal,
    ``JHJ = LLᵀ`` gives ``H = RRᵀ`` for the upper ``R = JLJ``, so ``H⁻¹ = R⁻ᵀR⁻¹`` and
    ``U = R⁻¹ = J L⁻¹ J`` (a Cholesky and a triangular inverse: half the work of inverting and
    factorising again; ``U`` is the unique upper factor with a positive diagonal).
    """
    from scipy.linalg import lapack

    n = h.shape[0]
    with _one_blas_thread():
        if upper_cholesky:
            hd = np.array(h[::-1, ::-1], np.float32, order="F")
            hd[np.diag_indices(n)] += np.float32(damp)
            lo, info = lapack.spotrf(hd, lower=1, overwrite_a=1, clean=1)
            if info != 0:
                return None
            li, info = lapack.strtri(lo, lower=1, overwrite_c=1)
            return None if info != 0 else np.ascontiguousarray(li[::-1, ::-1])
        hd = np.array(h, np.float32, order="F")
        hd[np.diag_indices(n)] += np.float32(damp)
        lo, info = lapack.spotrf(hd, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return None
        inv, info = lapack.spotri(lo, lower=1, overwrite_c=1)
        if info != 0:
            return None
        return np.tril(inv) + np.tril(inv, -1).T  # potri fills the lower triangle only


def _inv_chol(h: np.ndarray, damp: float, upper_cholesky: bool) -> Any:
    """On CPU: host LAPACK (no compilation per layer shape, and 10-50x faster than XLA's CPU
    Cholesky/triangular solve at one layer's size); on accelerators: one jitted program."""
    if jax.default_backend() == "cpu":
        return _inv_chol_host(h, damp, upper_cholesky)
    return _inv_xla(jnp.asarray(h), jnp.asarray(damp, jnp.float32), upper_cholesky)


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


def zero_dead(w: jax.Array, dead: np.ndarray) -> jax.Array:
    """``w`` (fan-in first) with the rows of dead inputs zeroed; ``w`` itself when none is dead
    (the usual case: no extra operation, no compilation).

    >>> zero_dead(jnp.ones((2, 1)), np.array([False, True]))[:, 0].tolist()
    [1.0, 0.0]
    """
    if not np.any(dead):
        return w
    return jnp.where(jnp.asarray(dead)[:, None], 0.0, w)


def damped_inverse_cholesky(h: np.ndarray, percdamp: float, name: str,
                            upper_cholesky: bool = True, max_tries: int = 8) -> jax.Array:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (or the inverse itself), ``λ = percdamp·mean(diag)``.

    If the damped ``H`` is singular or indefinite (Cholesky fails, NaN appears) ``λ`` grows ×10 with a
    ``RuntimeWarning`` naming the layer, up to ``max_tries`` times; the result is never NaN.

    >>> u = damped_inverse_cholesky(np.eye(2, dtype=np.float32), 0.0, "fc")
    >>> np.allclose(u, np.eye(2))
    True
    """
    h = np.asarray(h, np.float32)
    mean_diag = float(np.mean(np.abs(np.diag(h)))) or 1.0
    damp = percdamp * mean_diag
    for i in range(max_tries):
        out = _inv_chol(h, damp, upper_cholesky)
        if out is not None and bool((np if isinstance(out, np.ndarray) else jnp).isfinite(out).all()):
            return jax.device_put(out)  # (jnp.asarray of numpy compiles a copy per shape)
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
    return jax.device_put(np.sqrt(inv) if upper_cholesky else inv)


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
