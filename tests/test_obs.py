"""Exact OBS against brute force on a 6x8 layer (8 inputs, 6 outputs)."""

import itertools

import numpy as np
import pytest

from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.obs import OBS, budget_counts, obs_greedy


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))).astype(np.float32)
    st = LayerStats.from_inputs(x)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    return w, st, st.hessian.astype(np.float64)


def refit(w, h, keep):
    """Optimal weights supported on `keep` minimising (w - v)^T H (w - v) (least squares)."""
    v = np.zeros_like(w, dtype=np.float64)
    k = np.flatnonzero(keep)
    if k.size:
        v[k] = np.linalg.solve(h[np.ix_(k, k)], h[k] @ w)
    return v


def err(w, v, h):
    d = w - v
    return float(d @ h @ d)


def brute_greedy(w, h, count, nm=None):
    keep = np.ones(w.size, bool)
    for _ in range(count):
        best = None
        for j in np.flatnonzero(keep):
            if nm is not None:
                n, m = nm
                if keep[(j // m) * m:(j // m + 1) * m].sum() <= n:
                    continue
            k2 = keep.copy()
            k2[j] = False
            e = err(w, refit(w, h, k2), h)
            if best is None or e < best[0]:
                best = (e, k2)
        keep = best[1]
    return refit(w, h, keep), keep


def test_single_removal_is_globally_optimal():
    w, st, h = _setup()
    q, m, _ = obs_greedy(w, np.linalg.inv(h), np.ones(6, np.int32))
    for c in range(6):
        errs = []
        for j in range(8):
            keep = np.ones(8, bool)
            keep[j] = False
            errs.append(err(w[:, c], refit(w[:, c], h, keep), h))
        assert np.flatnonzero(~m[:, c]).tolist() == [int(np.argmin(errs))]
        np.testing.assert_allclose(q[:, c], refit(w[:, c], h, m[:, c]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("count", [3, 5])
def test_greedy_matches_brute_force_greedy(count):
    w, st, h = _setup(1)
    q, m, _ = obs_greedy(w, np.linalg.inv(h), np.full(6, count, np.int32))
    for c in range(6):
        bq, bk = brute_greedy(w[:, c].astype(np.float64), h, count)
        np.testing.assert_array_equal(m[:, c], bk)
        np.testing.assert_allclose(q[:, c], bq, rtol=1e-3, atol=1e-3)


def test_layer_obs_unstructured_and_nm():
    w, st, h = _setup(2)
    q, m = OBS(percdamp=0.0)(w, st, 0.5)
    m, q = np.asarray(m), np.asarray(q)
    assert int((~m).sum()) == 24
    for c in range(6):  # every column equals brute-force greedy with its own count
        bq, bk = brute_greedy(w[:, c].astype(np.float64), h, int((~m[:, c]).sum()))
        np.testing.assert_array_equal(m[:, c], bk)
        np.testing.assert_allclose(q[:, c], bq, rtol=1e-3, atol=1e-3)
    q, m = OBS(percdamp=0.0)(w, st, pattern="2:4")
    m = np.asarray(m)
    assert nm_valid(m, 2, 4) and int(m.sum()) == 24
    for c in range(6):
        bq, bk = brute_greedy(w[:, c].astype(np.float64), h, 4, nm=(2, 4))
        np.testing.assert_array_equal(m[:, c], bk)


def test_pruned_weights_exactly_zero():
    """Later OBS updates used to leave ~1e-8 on earlier removals: a "sparse" layer not sparse."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    st = LayerStats.from_inputs(x)
    for kw in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        q, m = OBS()(w, st, **kw)
        q, m = np.asarray(q), np.asarray(m)
        assert (~m).sum() == 64 and not q[~m].any() and q[m].all()
    q2, k2, _ = obs_greedy(w, np.linalg.inv(st.hessian + 0.1 * np.eye(16)), np.full(8, 10))
    assert (~k2).sum() == 80 and not q2[~k2].any()


def test_obs_close_to_best_subset_on_tiny_column():
    w, st, h = _setup(3)
    col = w[:, 0].astype(np.float64)
    best = min(err(col, refit(col, h, np.isin(np.arange(8), s)), h)
               for s in itertools.combinations(range(8), 6))
    q, m, _ = obs_greedy(w[:, :1], np.linalg.inv(h), np.array([2]))
    assert err(col, q[:, 0].astype(np.float64), h) <= best * 1.5 + 1e-6


def test_obs_bad_input():
    w, st, _ = _setup()
    with pytest.raises(ValueError, match="attn/q/kernel.*1.0"):
        OBS()(w, st, 1.0, name="attn/q/kernel")
    with pytest.raises(ValueError, match="needs calibration with gram=True"):
        OBS()(w, st._replace(gram=None), 0.5)


def test_budget_counts_match_stable_argsort():
    """The pipeline-based budget equals the OBC rule: the ``n`` smallest losses by a stable sort
    (ties: lower flat index first), counted per column."""
    rng = np.random.default_rng(4)
    for shape, n in [((8, 6), 20), ((5, 3), 0), ((5, 3), 15), ((6, 4), 9)]:
        losses = rng.integers(0, 4, size=shape).astype(np.float32)  # many ties
        order = np.argsort(losses.reshape(-1), kind="stable")[:n]
        want = np.bincount(order % shape[1], minlength=shape[1])
        np.testing.assert_array_equal(budget_counts(losses, n), want)
    inf = np.array([[np.inf, 1.0], [np.nan, 2.0]], np.float32)
    assert budget_counts(inf, 2).tolist() == [0, 2]


def test_obs_nm_below_max_sparsity():
    w, st, h = _setup(5)
    _, m = OBS(percdamp=0.0)(w, st, 0.25, pattern="2:4")  # keep 3 of every 4
    m = np.asarray(m)
    assert nm_valid(m, 3, 4) and int(m.sum()) == 36
    for c in range(6):
        _, bk = brute_greedy(w[:, c].astype(np.float64), h, 2, nm=(3, 4))
        np.testing.assert_array_equal(m[:, c], bk)
