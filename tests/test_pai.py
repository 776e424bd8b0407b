"""Tests for jaxprune.training.pai: SNIP, GraSP, SynFlow against direct numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.training import pai
from tests.user_models import nnx_mlp_task

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(5, 4))
W2 = RNG.normal(size=(4, 3))
X = RNG.normal(size=(6, 5))
Y = RNG.normal(size=(6, 3))


def _params():
    return {"l1": {"kernel": jnp.asarray(W1, jnp.float32)},
            "l2": {"kernel": jnp.asarray(W2, jnp.float32)}}


def _apply(p, x):
    return jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def _loss(p, batch):
    x, y = batch
    return jnp.mean((_apply(p, x) - y) ** 2)


def _np_grads(w1, w2):
    """Hand-derived gradients of mean((relu(x w1) w2 - y)^2) in float64."""
    h = X @ w1
    a = np.maximum(h, 0)
    d_out = 2 * (a @ w2 - Y) / Y.size
    g2 = a.T @ d_out
    g1 = X.T @ ((d_out @ w2.T) * (h > 0))
    return g1, g2


BATCH = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))


def test_snip_matches_direct():
    g1, g2 = _np_grads(W1, W2)
    s = jax.jit(lambda p, b: pai.snip_scores(_loss, p, b))(_params(), BATCH)
    np.testing.assert_allclose(s["l1"]["kernel"], np.abs(W1 * g1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s["l2"]["kernel"], np.abs(W2 * g2), rtol=1e-4, atol=1e-6)


def test_grasp_matches_finite_difference_hvp():
    g1, g2 = _np_grads(W1, W2)
    eps = 1e-5
    gp = _np_grads(W1 + eps * g1, W2 + eps * g2)
    gm = _np_grads(W1 - eps * g1, W2 - eps * g2)
    hg1, hg2 = [(a - b) / (2 * eps) for a, b in zip(gp, gm, strict=True)]
    s = jax.jit(lambda p, b: pai.grasp_scores(_loss, p, b))(_params(), BATCH)
    np.testing.assert_allclose(s["l1"]["kernel"], W1 * hg1, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(s["l2"]["kernel"], W2 * hg2, rtol=1e-3, atol=1e-5)
    # GraSP removes the highest S = -w*Hg, i.e. keeps the highest of our scores
    pruned, m = pai.grasp(_loss, _params(), BATCH, 0.5)
    jax.tree.map(np.testing.assert_array_equal, pruned, jp.apply_masks(_params(), m))
    all_s = np.concatenate([(W1 * hg1).ravel(), (W2 * hg2).ravel()])
    kept = np.concatenate([np.asarray(m["l1"]["kernel"]).ravel(),
                           np.asarray(m["l2"]["kernel"]).ravel()])
    assert all_s[kept].min() >= all_s[~kept].max()


def test_synflow_matches_closed_form_and_conserves():
    a1, a2 = np.abs(W1), np.abs(W2)
    s = pai.synflow_scores(_apply, _params(), (1, 5))
    # R = 1ᵀ|W1||W2|1: dR/dW1[i,j] = Σ_k |W2|[j,k];  dR/dW2[j,k] = Σ_i |W1|[i,j]
    np.testing.assert_allclose(s["l1"]["kernel"], a1 * a2.sum(1)[None, :], rtol=1e-5)
    np.testing.assert_allclose(s["l2"]["kernel"], a2 * a1.sum(0)[:, None], rtol=1e-5)
    r = (a1 @ a2).sum()
    # conservation (positively homogeneous model): every layer's scores sum to R
    assert float(jnp.sum(s["l1"]["kernel"])) == pytest.approx(r, rel=1e-5)
    assert float(jnp.sum(s["l2"]["kernel"])) == pytest.approx(r, rel=1e-5)


def test_synflow_non_homogeneous_layer_is_evaluated_as_given():
    """tanh is not positively homogeneous: scores are |dR/dw * w| of the model as given (finite),
    computed without linearising, and the per-layer conservation law no longer holds."""

    def apply_tanh(p, x):
        return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]

    a1, a2 = np.abs(W1), np.abs(W2)
    s = pai.synflow_scores(apply_tanh, _params(), (1, 5))
    h = np.ones(5) @ a1
    exp1 = a1 * ((1 - np.tanh(h) ** 2) * a2.sum(1))[None, :]
    exp2 = a2 * np.tanh(h)[:, None]
    np.testing.assert_allclose(s["l1"]["kernel"], exp1, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(s["l2"]["kernel"], exp2, rtol=1e-5)
    s1, s2 = float(jnp.sum(s["l1"]["kernel"])), float(jnp.sum(s["l2"]["kernel"]))
    assert np.isfinite(s1) and s1 < 0.5 * s2  # saturating tanh starves the first layer


def test_synflow_iterative_sparsity_and_monotone():
    params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (16, 12))},
              "l2": {"kernel": jax.random.normal(jax.random.key(1), (12, 8))}}
    pruned, m = pai.synflow(_apply, params, (1, 16), 0.9, rounds=5)
    jax.tree.map(np.testing.assert_array_equal, pruned, jp.apply_masks(params, m))
    total = 16 * 12 + 12 * 8
    kept = sum(int(x.sum()) for _, x in jp.masks.mask_leaves(m))
    assert kept == total - round(0.9 * total)
    # one round equals the one-shot masks from the scores
    _, m1 = pai.synflow(_apply, params, (1, 16), 0.5, rounds=1)
    sc = pai.synflow_scores(_apply, params, (1, 16))
    m_ref = pai.masks_from_scores(jp.init_masks(params), sc, 0.5)
    jax.tree.map(np.testing.assert_array_equal, m1, m_ref)


def test_synflow_keeps_pruned_entries_pruned():
    """Iterative SynFlow: masks shrink monotonically round by round (keep_pruned), and the
    result equals the rounds run by hand with the old "score -1" rule."""
    params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (16, 12))},
              "l2": {"kernel": jax.random.normal(jax.random.key(1), (12, 8))}}
    _, m = pai.synflow(_apply, params, (1, 16), 0.8, rounds=3)
    ref = jp.init_masks(params)
    for k in range(1, 4):
        sc = pai.synflow_scores(_apply, params, (1, 16), ref)
        sc = jax.tree.map(lambda mm, s: jnp.where(mm, s, -1.0), ref, sc)
        new = pai.masks_from_scores(ref, sc, 1 - 0.2 ** (k / 3))
        assert all(not bool(jnp.any(a & ~b)) for a, b in
                   zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True))
        ref = new
    jax.tree.map(np.testing.assert_array_equal, m, ref)


def test_layer_collapse_reported():
    # l2's scores are tiny, so a global 60% prune removes l2 entirely
    p = {"l1": {"kernel": jnp.arange(10.0, 26.0).reshape(4, 4)},
         "l2": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4) * 0.01}}
    sc = jp.criteria.magnitude(p)
    m = pai.masks_from_scores(jp.init_masks(p), sc, 0.6)
    assert pai.collapsed_layers(m) == ["l2/kernel"]
    m = pai.masks_from_scores(jp.init_masks(p), sc, 0.6, allocation=jp.Global(min_density=0.25))
    assert pai.collapsed_layers(m) == []


def test_snip_nnx_model_under_jit():
    graphdef, params, x, y = nnx_mlp_task(8, (6, 3), 10)

    def loss(p, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(
            nnx.merge(graphdef, p)(xb), yb).mean()

    s_jit = jax.jit(lambda p: pai.snip_scores(loss, p, (x, y)))(params)
    g = jax.grad(loss)(params, (x, y))
    for (path, s), (_, w), (_, gg) in zip(jp.masks.leaves_with_paths(s_jit),
                                          jp.masks.leaves_with_paths(params),
                                          jp.masks.leaves_with_paths(g), strict=True):
        if path.endswith("kernel"):
            np.testing.assert_allclose(s, np.abs(np.asarray(w) * np.asarray(gg)), rtol=1e-6)
        else:
            assert s is None
    pruned, m = pai.snip(loss, params, (x, y), 0.8)
    assert jp.total_sparsity(pruned, m) == pytest.approx(0.8, abs=1 / 66)
    jax.tree.map(np.testing.assert_array_equal, pruned, jp.apply_masks(params, m))
    assert jp.total_sparsity(params, m) == pytest.approx(0.8, abs=1 / 66)
    _, sf = pai.synflow(lambda p, xb: nnx.merge(graphdef, p)(xb), params, (1, 8), 0.8, rounds=3)
    assert jp.total_sparsity(params, sf) == pytest.approx(0.8, abs=1 / 66)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rounds must be"):
        pai.synflow(_apply, _params(), (1, 5), 0.5, rounds=0)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        pai.snip(_loss, _params(), BATCH, 1.0)
    with pytest.raises(ValueError, match="needs an explicit sparsity"):
        pai.grasp(_loss, _params(), BATCH)
    with pytest.raises(ValueError, match="above what pattern 2:4 can reach"):
        pai.synflow(_apply, _params(), (1, 5), 0.75, pattern="2:4")
    bad = {"l1": {"kernel": jnp.full((5, 4), jnp.inf)}, "l2": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match="l1/kernel"):
        pai.masks_from_scores(jp.init_masks(bad), bad, 0.5)
