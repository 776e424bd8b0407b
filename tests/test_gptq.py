"""GPTQ and the joint prune+quantize sweep against a direct numpy implementation, RTN and qwix."""

import numpy as np
import pytest

from jaxprune import oneshot
from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.common import recon_error
from jaxprune.oneshot.quant import QuantSpec, encode, qwix_rtn, rtn
from jaxprune.oneshot.sparsegpt import GPTQ, SparseGPT


def ref_grid(x, bits, sym):
    """GPTQ's Quantizer.find_params (weight=True) on rows of x (out, n), float64; symmetric: the
    restricted range xmax / (2**(bits-1) - 1) for every row (see jaxprune.oneshot.quant)."""
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = xmax / (2 ** (bits - 1) - 1) if sym else (xmax - xmin) / maxq
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.round(-xmin / scale)
    return scale, zero


def ref_q(x, scale, zero, bits):
    return scale * (np.clip(np.round(x / scale) + zero, 0, 2**bits - 1) - zero)


def ref_sweep(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01, bits=None,
              group=None, sym=True, act_order=False):
    """GPTQ (Frantar et al. 2022, reference code gptq.py) merged with SparseGPT's fasterprune, as
    the papers describe, W (out, in). Group params: from the block's current weights (kept entries)
    when the sweep reaches the group (== the reference when group == blocksize); with act_order
    "static groups" from the original W. Per-channel (group None): from the original W."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = None
    if bits is not None and (group is None or act_order):
        g = group or cols
        static = [ref_grid(W[:, i:i + g], bits, sym) for i in range(0, cols, g)]
    perm = np.arange(cols)
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    keep = np.ones_like(W, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = np.zeros_like(W1, bool)  # True = pruned
        if sparsity > 0 and prunen == 0:
            tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
            k = int(round(tmp.size * sparsity))
            mask1.flat[np.argsort(tmp.ravel(), kind="stable")[:k]] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / np.diag(Hinv1)[i:i + prunem][None, :] ** 2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                mask1[np.arange(rows)[:, None], i + idx] = True
            q = w.copy()
            q[mask1[:, i]] = 0
            if bits is not None:
                if static is not None:
                    scale, zero = static[perm[i1 + i] // (group or cols)]
                elif (i1 + i) % group == 0:
                    grp = np.where(mask1, 0, W1)[:, i:i + group]
                    for j in range(0, group, prunem or group):  # N:M: the mask it would get now
                        if prunen:
                            tmp = grp[:, j:j + prunem] ** 2 / np.diag(Hinv1)[i + j:i + j + prunem] ** 2
                            idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                            grp[np.arange(rows)[:, None], j + idx] = 0
                    scale, zero = ref_grid(grp, bits, sym)
                q = ref_q(q, scale, zero, bits)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = np.argsort(perm)
    return W[:, inv], keep[:, inv]


def _stats(x):
    x = x.astype(np.float32)
    return LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), x.shape[0], x.shape[1])


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


def test_prune_only_unchanged_and_errors_and_registry():
    w, st = _layer()
    with pytest.raises(ValueError, match="fc.*act_order.*2:4"):
        SparseGPT(quant=QuantSpec(act_order=True))(w, st, pattern="2:4", name="fc")
    with pytest.raises(ValueError, match="fc.*needs quant"):
        SparseGPT().compress(w, st, 0.5, name="fc")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    assert oneshot.get_method("gptq") == GPTQ() and GPTQ().needs == ("gram",)
    assert oneshot.get_method("sparsegpt+int4").quant == QuantSpec(4)
    q4, m4 = GPTQ(blocksize=16, quant=QuantSpec(4, 16))(w.reshape(2, 16, 6), st)  # conv-like view
    q2, _ = GPTQ(blocksize=16, quant=QuantSpec(4, 16))(w, st)
    np.testing.assert_array_equal(np.asarray(q4).reshape(32, 6), np.asarray(q2))
