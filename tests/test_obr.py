"""OBR group error compensation against a direct float64 numpy implementation of the paper's
closed form, and its reconstruction error against prune-then-RTN."""

import numpy as np
import pytest

from jaxprune import oneshot
from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.common import recon_error
from jaxprune.oneshot.obr import OBR, group_compensation
from jaxprune.oneshot.quant import QuantSpec, RoundToNearest, rtn
from jaxprune.oneshot.sparsegpt import SparseGPT
from jaxprune.oneshot.wanda import Wanda
from tests.oracles import ref_grid, ref_q
from tests.test_gptq import _layer


def ref_rows(W, spec):
    """Per-row grid params of W (fin, out) from each group's rows (numpy, float64)."""
    fin = W.shape[0]
    g = spec.group_size or fin
    s, z = np.zeros_like(W), np.zeros_like(W)
    for i in range(0, fin, g):
        si, zi = ref_grid(W[i:i + g].T.copy(), spec.bits, spec.symmetric)
        s[i:i + g], z[i:i + g] = si, zi
    return s, z


def ref_obr(W, H, mask, spec, alpha=0.5, percdamp=0.01, gptq_tail=True):
    """OBR as the paper states it, one output column at a time, float64, (fan_in, out) layout."""
    W, H = W.astype(np.float64), H.astype(np.float64)
    fin, out = W.shape
    Hd = H + percdamp * np.mean(np.diag(H)) * np.eye(fin)
    W1 = np.where(mask, W, 0.0)
    for j in range(out):  # pruning: E = pruned, R = kept, Δw_R = H_RR⁻¹ H_RE w_E
        R, E = np.flatnonzero(mask[:, j]), np.flatnonzero(~mask[:, j])
        W1[R, j] += np.linalg.solve(Hd[np.ix_(R, R)], Hd[np.ix_(R, E)] @ W[E, j])
    split = int(round(alpha * fin))
    s1, z1 = ref_rows(W1, spec)
    Q1 = ref_q(W1, s1, z1, spec.bits)
    W2 = W1.copy()
    for j in range(out):  # quantization: E = first rows (error e), R = kept later rows
        R = np.flatnonzero(mask[:, j] & (np.arange(fin) >= split))
        E = np.arange(split)
        e = W1[E, j] - Q1[E, j]
        W2[R, j] += np.linalg.solve(Hd[np.ix_(R, R)], Hd[np.ix_(R, E)] @ e)
    s2, z2 = ref_rows(W2, spec)
    g = spec.group_size or fin
    first = (np.arange(fin) // g * g < split)[:, None]
    s, z = np.where(first, s1, s2), np.where(first, z1, z2)
    T = W2[split:].copy()
    if gptq_tail:  # GPTQ, row by row, on H[split:, split:], the mask fixed
        U = np.linalg.cholesky(np.linalg.inv(Hd[split:, split:])).T
        for i in range(T.shape[0]):
            q = np.where(mask[split + i], ref_q(T[i], s[split + i], z[split + i], spec.bits), 0.0)
            err = (T[i] - q) / U[i, i]
            T[i:] -= np.outer(U[i, i:], err)
            T[i] = q
    else:
        T = np.where(mask[split:], ref_q(T, s[split:], z[split:], spec.bits), 0.0)
    return np.concatenate([Q1[:split], T])


CASES = [  # (pattern, sparsity, spec, alpha, gptq_tail)
    ("2:4", None, QuantSpec(4, 8), 0.5, True),
    ("unstructured", 0.5, QuantSpec(4, None, symmetric=False), 0.5, False),
    ("unstructured", 0.6, QuantSpec(8, 16), 0.25, True),
]


@pytest.mark.parametrize("pattern,sparsity,spec,alpha,tail", CASES)
def test_obr_matches_numpy_closed_form(pattern, sparsity, spec, alpha, tail):
    w, st = _layer(fin=32, out=6, seed=7)
    meth = OBR(blocksize=8, quant=spec, alpha=alpha, gptq_tail=tail)
    q, m = meth(w, st, sparsity, pattern=pattern)
    q, m = np.asarray(q), np.asarray(m)
    np.testing.assert_array_equal(m, np.asarray(Wanda()(w, st, sparsity, pattern=pattern)[1]))
    ref = ref_obr(w, np.asarray(st.hessian), m, spec, alpha, gptq_tail=tail)
    np.testing.assert_allclose(q, ref, rtol=1e-4, atol=1e-4)
    assert np.all(q[~m] == 0)
    if pattern == "2:4":
        assert nm_valid(m, 2, 4)
    qw, m2 = meth.compress(w, st, sparsity, pattern=pattern)  # the values are on the grid
    np.testing.assert_array_equal(np.asarray(m2), m)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), q)


def test_group_compensation_is_the_constrained_minimizer():
    """x_R minimizes (v' − x)ᵀ H (v' − x) over x supported on R, v' = v off R: the gradient on R
    vanishes, and any perturbation on R increases the quadratic."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    h = a @ a.T + 0.1 * np.eye(12)
    keep = rng.random((12, 3)) < 0.5
    v = np.where(keep, 0.0, rng.normal(size=(12, 3)))
    x = np.asarray(group_compensation(h, keep, v), np.float64)
    assert np.all(x[~keep] == 0)
    d = x - v  # the change: −v on the evicted entries, x on the retained
    grad = h @ d
    assert np.abs(grad[keep]).max() < 1e-4 * np.abs(h @ v).max()
    f = lambda dd: np.einsum("io,ij,jo->o", dd, h, dd)  # noqa: E731
    for _ in range(5):
        p = np.where(keep, rng.normal(size=keep.shape) * 1e-2, 0.0)
        assert np.all(f(d + p) >= f(d) - 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_obr_not_worse_than_prune_then_rtn(seed):
    """On random correlated layers, 2:4 + int4: OBR's ‖ΔWX‖² <= the same mask's weights (base's
    own values, SparseGPT-compensated) rounded to nearest."""
    w, st = _layer(fin=64, out=16, n=256, seed=20 + seed)
    spec = QuantSpec(4, 16)
    for base in ("wanda", "sparsegpt"):
        q, m = OBR(base=base, blocksize=16, quant=spec)(w, st, pattern="2:4")
        pw, pm = oneshot.get_method(base)(w, st, pattern="2:4")
        np.testing.assert_array_equal(np.asarray(m), np.asarray(pm))
        e_obr = recon_error(w, q, st.hessian)
        e_rtn = recon_error(w, rtn(pw, spec).dequantize(), st.hessian)
        assert e_obr <= e_rtn, (base, e_obr, e_rtn)


def test_obr_registered_and_bad_arguments():
    assert oneshot.get_method("obr") == OBR()
    assert oneshot.get_method("obr-int8").quant.bits == 8
    assert OBR(base=SparseGPT()).needs == ("gram",)
    with pytest.raises(ValueError, match="alpha"):
        OBR(alpha=1.5)
    with pytest.raises(ValueError, match="act_order"):
        OBR(quant=QuantSpec(act_order=True))
    with pytest.raises(ValueError, match="needs calibration"):
        OBR()(np.ones((8, 2), np.float32), None, pattern="2:4", name="fc/kernel")


def test_round_to_nearest_method_is_base_then_numpy_rtn():
    """The prune-then-quantize baseline: base's weights, RTN on the numpy grid, pruned stay 0."""
    from tests.oracles import ref_q as rq

    w, st = _layer(fin=32, out=6, seed=3)
    spec = QuantSpec(4, 16)
    q, m = RoundToNearest("sparsegpt", spec)(w, st, pattern="2:4")
    pw, pm = (np.asarray(a) for a in SparseGPT()(w, st, pattern="2:4"))
    np.testing.assert_array_equal(np.asarray(m), pm)
    s, z = ref_rows(np.where(pm, pw, 0.0).astype(np.float64), spec)
    np.testing.assert_allclose(np.asarray(q), np.where(pm, rq(pw, s, z, 4), 0.0), atol=1e-5)
    qd, md = RoundToNearest(quant=spec)(w, None)
    s, z = ref_rows(w.astype(np.float64), spec)
    assert bool(np.asarray(md).all())
    np.testing.assert_allclose(np.asarray(qd), rq(w, s, z, 4), atol=1e-5)
