"""GPTQ and the joint prune+quantize sweep against a direct numpy implementation, RTN and qwix."""

import numpy as np
import pytest

from jaxprune import oneshot
from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.common import recon_error
from jaxprune.oneshot.quant import QuantSpec, encode, qwix_rtn, rtn
from jaxprune.oneshot.sparsegpt import GPTQ, SparseGPT
from tests.oracles import ref_grid, ref_q, ref_sweep


def _stats(x):
    return LayerStats.from_inputs(x)


def _layer(fin=32, out=6, n=96, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, fin)) @ rng.normal(size=(fin, fin)) * 0.5 + rng.normal(size=fin)
    x[:, list(dead)] = 0
    w = rng.normal(size=(fin, out)).astype(np.float32)
    return w, _stats(x)


CASES = [  # (bits, group, sym, act_order, blocksize)
    (4, 16, True, False, 16),   # group == block: the GPTQ reference code exactly
    (4, 8, False, False, 16),   # asymmetric, two groups per block
    (8, None, True, False, 16),  # per channel, int8
    (4, 8, True, True, 16),     # act-order, static groups
]


@pytest.mark.parametrize("bits,group,sym,act,bs", CASES)
def test_gptq_matches_numpy_reference(bits, group, sym, act, bs):
    w, st = _layer(dead=(5,))
    spec = QuantSpec(bits, group, sym, act)
    q, m = GPTQ(blocksize=bs, quant=spec)(w, st)
    rq, _ = ref_sweep(w.T, st.hessian, blocksize=bs, bits=bits, group=group, sym=sym, act_order=act)
    assert bool(np.asarray(m).all())
    np.testing.assert_allclose(np.asarray(q), rq.T, rtol=1e-4, atol=1e-4)
    qw, _ = GPTQ(blocksize=bs, quant=spec).compress(w, st)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(q))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    codes = np.asarray(qw.codes, np.int32)
    assert codes.min() >= lo and codes.max() <= hi
    assert qw.scales.shape == (spec.groups(32), 6) and (qw.zeros is None) == sym


@pytest.mark.parametrize("spec", [QuantSpec(4, 16), QuantSpec(3, None, False)])
def test_identity_hessian_is_rtn(spec):
    w = np.random.default_rng(1).normal(size=(32, 6)).astype(np.float32)
    st = LayerStats(np.eye(32, dtype=np.float32), np.zeros(32), np.ones(32), 1, 32)
    q, _ = GPTQ(blocksize=16, quant=spec)(w, st)
    r = rtn(w, spec)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(r.dequantize()))
    qw, _ = GPTQ(blocksize=16, quant=spec).compress(w, st)
    np.testing.assert_array_equal(np.asarray(qw.codes), np.asarray(r.codes))


@pytest.mark.parametrize("seed", range(3))
def test_gptq_beats_rtn_and_qwix_rtn(seed):
    w, st = _layer(seed=10 + seed)
    for bits in (4, 8):
        q, _ = GPTQ(blocksize=16, quant=QuantSpec(bits, 16))(w, st)
        e_gptq = recon_error(w, q, st.hessian)
        e_rtn = recon_error(w, rtn(w, QuantSpec(bits, 16)).dequantize(), st.hessian)
        e_qwix = recon_error(w, qwix_rtn(w, bits, 16), st.hessian)
        assert e_gptq <= e_rtn and e_gptq <= e_qwix, (bits, e_gptq, e_rtn, e_qwix)


def test_rtn_against_numpy_grid_and_qwix():
    w = np.random.default_rng(3).normal(size=(32, 8)).astype(np.float32)
    for spec in (QuantSpec(4, 16), QuantSpec(8, None, False)):
        g = spec.group_size or 32
        blocks = [ref_grid(w[i:i + g].T.astype(np.float64), spec.bits, spec.symmetric)
                  for i in range(0, 32, g)]
        ref = np.concatenate([ref_q(w[i * g:(i + 1) * g].T, s[:, None], z[:, None], spec.bits).T
                              for i, (s, z) in enumerate(blocks)])
        np.testing.assert_allclose(np.asarray(rtn(w, spec).dequantize()), ref, atol=1e-6)
    # qwix's absmax grid (scale absmax/7.5, codes -8..7) vs ours (absmax/7, -7..7): both RTN,
    # within half a step of w
    for ours, step in ((rtn(w, QuantSpec(4, 16)).dequantize(), 7.0), (qwix_rtn(w, 4, 16), 7.5)):
        amax = np.abs(w).reshape(2, 16, 8).max(1).repeat(16, 0)
        assert np.all(np.abs(np.asarray(ours) - w) <= amax / step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_joint_matches_reference_mask_exact_values_on_grid(pattern, sparsity):
    w, st = _layer(seed=4)
    spec = QuantSpec(4, 16, symmetric=pattern != "2:4")
    meth = SparseGPT(blocksize=16, quant=spec)
    q, m = meth(w, st, sparsity, pattern=pattern)
    q, m = np.asarray(q), np.asarray(m)
    pn, pm = (2, 4) if pattern == "2:4" else (0, 0)
    rq, rm = ref_sweep(w.T, st.hessian, 0.5 if pn == 0 else 0.0, pn, pm, blocksize=16, bits=4,
                       group=spec.group_size, sym=spec.symmetric)
    np.testing.assert_array_equal(m, rm.T)
    np.testing.assert_allclose(q, rq.T, rtol=1e-4, atol=1e-4)
    assert np.all(q[~m] == 0)
    if pattern == "2:4":
        assert nm_valid(m, 2, 4)
    else:
        assert m.reshape(2, 16, 6).sum((1, 2)).tolist() == [48, 48]  # exact count per block
    qw, m2 = meth.compress(w, st, sparsity, pattern=pattern)
    np.testing.assert_array_equal(np.asarray(m2), m)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), q)  # kept values on the grid
    re = encode(q, *row_params_from(qw), spec)
    np.testing.assert_array_equal(np.asarray(re.codes), np.asarray(qw.codes))


def row_params_from(qw):
    g = qw.spec.group_size
    s = np.repeat(np.asarray(qw.scales), g, 0)
    z = np.full_like(s, 8.0) if qw.zeros is None else np.repeat(np.asarray(qw.zeros, np.float32), g, 0)
    return s, z


def test_joint_24_int4_below_prune_then_rtn():
    """The issue's acceptance: one joint sweep (2:4 mask, int4 codes, compensation) reconstructs
    correlated layers better than SparseGPT 2:4 followed by round-to-nearest of the kept weights:
    lower mean error over six layers and lower on most of them (on 18 such layers it won 17)."""
    from jaxprune.oneshot.quant import RoundToNearest

    spec = QuantSpec(4, 128)
    e_sep, e_joint = [], []
    for seed in range(6):
        w, st = _layer(fin=128, out=32, n=384, seed=20 + seed)
        sep, m_sep = RoundToNearest(SparseGPT(), spec)(w, st, pattern="2:4")
        joint, m_joint = SparseGPT(quant=spec)(w, st, pattern="2:4")
        assert nm_valid(np.asarray(m_joint), 2, 4) and nm_valid(np.asarray(m_sep), 2, 4)
        assert np.all(np.asarray(joint)[~np.asarray(m_joint)] == 0)
        e_sep.append(recon_error(w, sep, st.hessian))
        e_joint.append(recon_error(w, joint, st.hessian))
    e_sep, e_joint = np.array(e_sep), np.array(e_joint)
    assert e_joint.mean() < e_sep.mean() and (e_joint < e_sep).sum() >= 4, (e_joint, e_sep)


def test_prune_only_unchanged_and_errors_and_registry():
    w, st = _layer()
    with pytest.raises(ValueError, match="fc.*act_order.*2:4"):
        SparseGPT(quant=QuantSpec(act_order=True))(w, st, pattern="2:4", name="fc")
    with pytest.raises(ValueError, match="fc.*needs quant"):
        SparseGPT().compress(w, st, 0.5, name="fc")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError, match="group_size must be a positive int or None, got True"):
        QuantSpec(group_size=True)
    with pytest.raises(ValueError, match="symmetric must be a bool, got 1"):
        QuantSpec(symmetric=1)
    with pytest.raises(ValueError, match="'fc'.*group_size=6 must be a multiple of m=4"):
        SparseGPT(quant=QuantSpec(4, 6))(w, st, pattern="2:4", name="fc")
    w_q, m_q = GPTQ(quant=QuantSpec(4, 16))(w, st)  # no sparsity: quantize only (default 0)
    assert bool(np.asarray(m_q).all())
    assert oneshot.get_method("gptq") == GPTQ() and GPTQ().needs == ("gram",)
    assert oneshot.get_method("sparsegpt+int4").quant == QuantSpec(4)
    q4, m4 = GPTQ(blocksize=16, quant=QuantSpec(4, 16))(w.reshape(2, 16, 6), st)  # conv-like view
    q2, _ = GPTQ(blocksize=16, quant=QuantSpec(4, 16))(w, st)
    np.testing.assert_array_equal(np.asarray(q4).reshape(32, 6), np.asarray(q2))
