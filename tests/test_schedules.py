"""Schedules match their formulas and work under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.core import schedules as S


def _zhu_gupta(t, s_i, s_f, t0, n, dt):
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 at update steps t = t0 + k dt
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def test_polynomial_matches_formula():
    sch = S.Polynomial(sparsity=0.9, begin=100, end=1100, freq=50, initial=0.1)
    f = jax.jit(sch.sparsity_at)
    for k in range(0, 21):
        t = 100 + 50 * k
        assert float(f(t)) == pytest.approx(_zhu_gupta(t, 0.1, 0.9, 100, 20, 50), abs=1e-6)
        if k < 20:  # constant between updates
            assert float(f(t + 49)) == pytest.approx(float(f(t)))
    assert float(f(5000)) == pytest.approx(0.9)
    assert float(f(50)) == 0.0


def test_polynomial_update_steps():
    sch = S.Polynomial(0.5, begin=10, end=35, freq=10)
    upd = [t for t in range(60) if bool(jax.jit(sch.should_update)(t))]
    assert upd == [10, 20, 30, 35]


def test_one_shot_and_iterative():
    one = S.OneShot(0.7, step=5)
    assert [float(one.sparsity_at(t)) for t in (4, 5, 6)] == pytest.approx([0.0, 0.7, 0.7])
    it = S.Iterative((0, 10, 20), (0.2, 0.36, 0.488))
    vals = [float(jax.jit(it.sparsity_at)(t)) for t in (0, 9, 10, 25)]
    np.testing.assert_allclose(vals, [0.2, 0.2, 0.36, 0.488], rtol=1e-6)
    assert [bool(it.should_update(t)) for t in (0, 5, 10, 20)] == [True, False, True, True]


def test_bad_schedules():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), got 1.2"):
        S.Polynomial(1.2, 0, 10)
    with pytest.raises(ValueError, match="freq must be > 0"):
        S.Polynomial(0.5, 0, 10, freq=0)
    with pytest.raises(ValueError, match="end > begin"):
        S.Polynomial(0.5, 10, 10)
    with pytest.raises(ValueError, match="increase strictly"):
        S.Iterative((5, 1), (0.1, 0.2))


@pytest.mark.parametrize("power", [-1, 0, float("nan"), float("inf"), "3", True])
def test_polynomial_power_refused(power):
    with pytest.raises(ValueError, match="Polynomial.power must be a finite number > 0"):
        S.Polynomial(0.5, 0, 10, power=power)


@pytest.mark.parametrize("make,name", [
    (lambda: S.OneShot(0.5, step=-1), "OneShot.step"),
    (lambda: S.OneShot(0.5, step=2.5), "OneShot.step"),
    (lambda: S.Polynomial(0.5, begin=-5, end=10), "Polynomial.begin"),
    (lambda: S.Polynomial(0.5, begin=0, end=10.5), "Polynomial.end"),
    (lambda: S.Polynomial(0.5, begin=0, end=10, freq=1.5), "Polynomial.freq"),
    (lambda: S.Iterative((0, 2.5), (0.1, 0.2)), r"Iterative.steps\[1\]"),
])
def test_bad_steps_refused(make, name):
    with pytest.raises(ValueError, match=name + " must be an integer step >= 0"):
        make()


def test_one_shot_accepts_numpy_int_step():
    assert bool(S.OneShot(0.5, step=np.int64(3)).should_update(3))
    _ = jnp  # keep import for readability
