"""DSnoT never increases its reconstruction objective, keeps sparsity and N:M validity."""

import numpy as np
import pytest

from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.dsnot import DSnoT, quadratic_error
from jaxprune.oneshot.methods import get_method
from jaxprune.oneshot.sparsegpt import SparseGPT
from jaxprune.oneshot.wanda import Magnitude, Wanda


def _layer(fin=32, out=8, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(0.5, 1.0, size=(200, fin)) @ rng.normal(size=(fin, fin)) / 4).astype(np.float32)
    w = rng.normal(size=(fin, out)).astype(np.float32)
    return w, LayerStats.from_inputs(x), x


@pytest.mark.parametrize("init", ["magnitude", "wanda"])
@pytest.mark.parametrize("target", [0.5, 0.7, "2:4"])
def test_objective_never_increases(init, target):
    w, st, x = _layer()
    fn = {"magnitude": Magnitude(), "wanda": Wanda()}[init]
    sparsity, pattern = (None, target) if isinstance(target, str) else (target, "unstructured")
    _, m0 = fn(w, st, sparsity, pattern=pattern)
    m0 = np.asarray(m0)
    nm_m = 4 if target == "2:4" else None
    q, m = DSnoT().refine(w, st, m0, pattern=pattern)
    m = np.asarray(m)
    before = quadratic_error(w, w * m0, st.hessian)
    after = quadratic_error(w, np.asarray(q), st.hessian)
    assert np.all(after <= before * (1 + 1e-5) + 1e-7)
    assert after.sum() < before.sum()  # it does find swaps
    np.testing.assert_array_equal(m.sum(0), m0.sum(0))  # sparsity per output kept
    # objective from the activations themselves
    real = ((x @ (w - np.asarray(q))) ** 2).sum(0) / 200
    np.testing.assert_allclose(real, after, rtol=1e-3, atol=1e-5)
    if nm_m:
        assert nm_valid(m, 2, 4)


def test_on_top_of_sparsegpt():
    w, st, _ = _layer(seed=1)
    q0, m0 = SparseGPT()(w, st, 0.6)
    q, m = DSnoT(base=SparseGPT())(w, st, 0.6)
    before = quadratic_error(w, np.asarray(q0), st.hessian)
    after = quadratic_error(w, np.asarray(q), st.hessian)
    assert np.all(after <= before * (1 + 1e-5) + 1e-7)
    assert int(np.asarray(m).sum()) == int(np.asarray(m0).sum())
    # the layer method equals "base, then refine with the base's values (dense where regrown)"
    want_q, want_m = DSnoT().refine(w, st, m0, values=np.where(m0, q0, w))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(want_m))
    np.testing.assert_allclose(np.asarray(q), np.asarray(want_q), rtol=1e-6, atol=1e-6)
    _, m = get_method("sparsegpt+dsnot")(w, st, pattern="2:4")
    assert nm_valid(m, 2, 4)


def test_bad_input():
    w, st, _ = _layer()
    with pytest.raises(ValueError, match="fc.*mask shape"):
        DSnoT().refine(w, st, np.ones((3, 3), bool), name="fc")
    with pytest.raises(ValueError, match="gram=True"):
        DSnoT().refine(w, st._replace(gram=None), np.ones(w.shape, bool))
    with pytest.raises(ValueError, match="unknown one-shot method"):
        DSnoT(base="nope")
    d = DSnoT(base="wanda")
    assert d == get_method("wanda+dsnot") and d.needs == ("gram", "norms")
