"""The shared one-shot numerics (jaxprune.oneshot.common) against float64 numpy oracles."""

import warnings

import jax
import numpy as np
import pytest

from jaxprune.oneshot.common import damped_inverse_cholesky, prepare_hessian, zero_dead


def _spd(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(3 * n, n))
    return (x.T @ x / (3 * n)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 130])
def test_damped_inverse_cholesky_is_the_upper_factor_of_the_inverse(n):
    h = _spd(n, n)
    lam = 0.01 * np.mean(np.diag(h))
    inv = np.linalg.inv(h.astype(np.float64) + lam * np.eye(n))
    u = np.asarray(damped_inverse_cholesky(h, 0.01, "fc"), np.float64)
    assert np.array_equal(u, np.triu(u)) and np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u, inv, rtol=1e-3, atol=1e-4 * np.abs(inv).max())
    # the unique upper factor: numpy's Cholesky of the inverse, transposed
    np.testing.assert_allclose(u, np.linalg.cholesky(inv).T, rtol=1e-3,
                               atol=1e-4 * np.abs(u).max())
    full = np.asarray(damped_inverse_cholesky(h, 0.01, "fc", upper_cholesky=False), np.float64)
    np.testing.assert_allclose(full, inv, rtol=1e-3, atol=1e-4 * np.abs(inv).max())


def test_damped_inverse_cholesky_compiles_at_most_once_per_shape():
    """On CPU the factorisation runs in host LAPACK: no XLA program at all. On an accelerator it
    is one jitted program per layer shape, so repeating the shapes compiles nothing."""
    seen = []

    def listen(event, secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for n in (11, 13):
            damped_inverse_cholesky(_spd(n), 0.01, "fc")
        first = len(seen)
        for n in (11, 13):
            damped_inverse_cholesky(_spd(n), 0.01, "fc")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(seen) == first  # the repeat compiled nothing
    if jax.default_backend() == "cpu":
        assert first == 0


def test_indefinite_grows_dampening_and_stays_finite():
    h = -np.eye(5, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="'fc'.*increasing dampening"):
        u = damped_inverse_cholesky(h, 0.01, "fc")
    assert np.all(np.isfinite(np.asarray(u)))
    x = np.random.default_rng(1).normal(size=(2, 6))  # rank 2 < 6, no dampening
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        u = np.asarray(damped_inverse_cholesky((x.T @ x).astype(np.float32), 0.0, "fc"))
    assert np.all(np.isfinite(u)) and any("singular or indefinite" in str(m.message) for m in w)


def test_zero_dead_rows():
    h, dead = prepare_hessian(np.diag([2.0, 0.0, 1.0]).astype(np.float32), "fc")
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(zero_dead(w, dead), [[0, 1], [0, 0], [4, 5]])
    assert zero_dead(w, np.zeros(3, bool)) is w  # nothing dead: the same array, no operation
