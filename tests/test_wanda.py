"""Wanda equals its formula; magnitude equals the core pipeline; N:M validity."""

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.wanda import Magnitude, PerOutput, Wanda


def _layer(fin=16, out=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, fin)).astype(np.float32) * rng.uniform(0.1, 3, fin).astype(np.float32)
    w = rng.normal(size=(fin, out)).astype(np.float32)
    return w, LayerStats(None, x.sum(0), (x**2).sum(0), 30, fin), x


@pytest.mark.parametrize("s", [0.25, 0.5, 0.7])
def test_wanda_formula_per_output(s):
    w, st, x = _layer()
    _, m = Wanda()(w, st, s)
    score = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
    k = int(round(s * 16))
    for c in range(5):
        want = np.ones(16, bool)
        want[np.argsort(score[:, c], kind="stable")[:k]] = False
        np.testing.assert_array_equal(np.asarray(m)[:, c], want)


def test_wanda_nm():
    w, st, x = _layer()
    q, m = Wanda()(w, st, pattern="2:4")
    score = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
    g = score.reshape(4, 4, 5)
    want = np.zeros((4, 4, 5), bool)
    top = np.argsort(-g, axis=1, kind="stable")[:, :2]
    np.put_along_axis(want, top, True, axis=1)
    np.testing.assert_array_equal(np.asarray(m), want.reshape(16, 5))
    assert nm_valid(m, 2, 4)
    np.testing.assert_array_equal(np.asarray(q), w * want.reshape(16, 5))


def test_magnitude_matches_core_prune():
    w, st, _ = _layer()
    q, m = Magnitude()(w, st, 0.6)
    pq, pm = jp.prune({"kernel": w}, 0.6)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(pm["kernel"]))
    _, m = Magnitude()(w, None, pattern="2:4")
    assert nm_valid(m, 2, 4)


def test_per_output_pattern_and_errors():
    m = PerOutput().mask(np.array([[1.0, 2.0], [3.0, 0.0]]), 0.5)
    assert np.asarray(m).tolist() == [[False, True], [True, False]]
    w, st, _ = _layer(fin=6)
    with pytest.raises(ValueError, match="enc/fc/kernel.*divisible by m=4"):
        Wanda()(w, st, pattern="2:4", name="enc/fc/kernel")
    with pytest.raises(ValueError, match="enc/fc/kernel.*1.0"):
        Wanda()(w, st, 1.0, name="enc/fc/kernel")
    with pytest.raises(ValueError, match="wanda on 'enc/fc/kernel' needs calibration statistics"):
        Wanda()(w, None, 0.5, name="enc/fc/kernel")


def test_magnitude_and_wanda_under_jit():
    """Mask-only methods stay traceable in the weights (the notebook jits a whole prune_layers)."""
    import jax

    w, st, _ = _layer()
    q, m = jax.jit(lambda w: Wanda()(w, st, 0.5))(w)
    q2, m2 = Wanda()(w, st, 0.5)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m2))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q2))
    _, m = jax.jit(lambda w: Magnitude()(w, st, pattern="2:4"))(w)
    assert nm_valid(m, 2, 4)
