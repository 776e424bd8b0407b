"""SparseGPT against a direct numpy implementation of the published algorithm, plus bad input."""

import warnings

import numpy as np
import pytest

from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.common import recon_error
from jaxprune.oneshot.sparsegpt import SparseGPT
from tests.oracles import ref_sweep

# the published algorithm (Frantar & Alistarh 2023, Algorithm 1 / reference code) in numpy; the
# only change to the reference: exactly round(s * numel) entries per block (its `<= thresh` prunes
# one more)
ref_sparsegpt = ref_sweep


def _stats(x):
    return LayerStats.from_inputs(x)


def _layer(fin=20, out=6, n=64, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, fin)) @ rng.normal(size=(fin, fin)) * 0.5
    x[:, list(dead)] = 0
    w = rng.normal(size=(fin, out)).astype(np.float32)
    return w, _stats(x)


@pytest.mark.parametrize("sparsity,bs", [(0.5, 8), (0.7, 8), (0.5, 128), (0.3, 16)])
def test_unstructured_matches_reference(sparsity, bs):
    w, st = _layer(dead=(3,))
    q, m = SparseGPT(blocksize=bs)(w, st, sparsity)
    rq, rm = ref_sparsegpt(w.T, st.hessian, sparsity, blocksize=bs)
    np.testing.assert_array_equal(np.asarray(m), rm.T)
    np.testing.assert_allclose(np.asarray(q), rq.T, rtol=2e-4, atol=2e-4)
    assert np.all(np.asarray(q)[~np.asarray(m)] == 0)


@pytest.mark.parametrize("n,m,bs", [(2, 4, 8), (1, 4, 128), (4, 8, 16)])
def test_nm_matches_reference(n, m, bs):
    w, st = _layer(fin=24, out=5, seed=1)
    q, mask = SparseGPT(blocksize=bs)(w, st, pattern=f"{n}:{m}")
    rq, rm = ref_sparsegpt(w.T, st.hessian, 0, prunen=m - n, prunem=m, blocksize=bs)
    np.testing.assert_array_equal(np.asarray(mask), rm.T)
    np.testing.assert_allclose(np.asarray(q), rq.T, rtol=2e-4, atol=2e-4)
    assert nm_valid(mask, n, m)
    assert int(np.asarray(mask).sum()) == 24 * 5 * n // m


def test_beats_plain_masking_and_conv_shape():
    w, st = _layer(fin=36, out=4, seed=2)
    q, m = SparseGPT()(w, st, 0.5)
    assert recon_error(w, q, st.hessian) < recon_error(w, w * np.asarray(m), st.hessian)
    q4, m4 = SparseGPT()(w.reshape(3, 3, 4, 4), st, 0.5)  # conv kernel (h, w, in, out)
    np.testing.assert_allclose(np.asarray(q4).reshape(36, 4), np.asarray(q), atol=1e-6)


def test_bad_inputs():
    w, st = _layer()
    bad = st._replace(gram=np.where(np.eye(20) > 0, np.nan, st.gram).astype(np.float32))
    with pytest.raises(ValueError, match="blocks.3/fc/kernel.*non-finite"):
        SparseGPT()(w, bad, 0.5, name="blocks.3/fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel.*1.0"):
        SparseGPT()(w, st, 1.0, name="fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel.*not divisible by m=8"):
        SparseGPT()(w, st, pattern="2:8", name="fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel.*sparsity 0.7 is above what pattern 2:4"):
        SparseGPT()(*_layer(fin=24), 0.7, pattern="2:4", name="fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel.*needs an explicit sparsity"):
        SparseGPT()(w, st, name="fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel.*unstructured and N:M"):
        SparseGPT()(w, st, 0.5, pattern="block4x4", name="fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel.*gram=True"):
        SparseGPT()(w, st._replace(gram=None), 0.5, name="fc/kernel")
    with pytest.raises(ValueError, match="does not match calibration fan-in"):
        SparseGPT()(np.ones((7, 2), np.float32), st, 0.5)


def test_indefinite_and_singular_hessian_never_nan():
    w, st = _layer(fin=8, out=3)
    neg = st._replace(gram=-np.eye(8, dtype=np.float32) * st.count)
    with pytest.warns(RuntimeWarning, match="fc.*increasing dampening"):
        q, m = SparseGPT()(w, neg, 0.5, name="fc")
    assert np.all(np.isfinite(np.asarray(q)))
    x = np.random.default_rng(0).normal(size=(2, 8))  # rank 2 < 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q, m = SparseGPT(percdamp=0.0)(w, _stats(x), 0.5)
    assert np.all(np.isfinite(np.asarray(q)))
    assert int(np.asarray(m).sum()) == 12


def test_nm_below_max_sparsity_and_method_value():
    """``pattern="4:8"`` at sparsity 0.25 keeps 6 of every 8 (like patterns.NM), per the reference."""
    w, st = _layer(fin=24, out=5, seed=4)
    q, mask = SparseGPT(blocksize=8)(w, st, 0.25, pattern="4:8")
    rq, rm = ref_sparsegpt(w.T, st.hessian, 0, prunen=2, prunem=8, blocksize=8)
    np.testing.assert_array_equal(np.asarray(mask), rm.T)
    np.testing.assert_allclose(np.asarray(q), rq.T, rtol=2e-4, atol=2e-4)
    assert SparseGPT().needs == ("gram",)
    assert hash(SparseGPT(blocksize=64)) == hash(SparseGPT(blocksize=64))
    assert SparseGPT(blocksize=64) != SparseGPT()
