"""Tests for jaxprune.training.ste: straight-through sparse forward and SR-STE decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.training import ste
from jaxprune.zoo.models import MLP


def _nm_oracle(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive rows (axis 0), ties to the lower index."""
    keep = np.zeros(w.shape, bool)
    for c in range(w.shape[1]):
        for g in range(0, w.shape[0], m):
            a = np.abs(w[g:g + m, c])
            order = sorted(range(m), key=lambda i: (-a[i], i))[:n]
            keep[[g + i for i in order], c] = True
    return keep


def test_ste_forward_and_straight_through_grad():
    w = jax.random.normal(jax.random.key(0), (8, 3))
    params = {"d": {"kernel": w, "bias": jnp.ones(3)}}
    keep = _nm_oracle(np.asarray(w), 2, 4)
    sp = ste.ste_params(params, pattern="2:4")
    np.testing.assert_array_equal(np.asarray(sp["d"]["kernel"]), np.where(keep, w, 0))
    np.testing.assert_array_equal(sp["d"]["bias"], params["d"]["bias"])
    x = jax.random.normal(jax.random.key(1), (5, 8))

    def f(p):
        return jnp.sum(jnp.tanh(x @ p["d"]["kernel"] + p["d"]["bias"]))

    g_ste = jax.jit(jax.grad(lambda p: f(ste.ste_params(p, pattern="2:4"))))(params)
    g_ref = jax.grad(f)(jp.apply_masks(params, {"d": {"kernel": jnp.asarray(keep),
                                                      "bias": None}}))
    # jit vs eager: different fusion, float32 rounding
    np.testing.assert_allclose(g_ste["d"]["kernel"], g_ref["d"]["kernel"], rtol=1e-5, atol=1e-6)
    # the gradient reaches pruned weights too (dense gradient, not masked)
    assert np.any(np.asarray(g_ste["d"]["kernel"])[~keep] != 0)


def test_unstructured_needs_sparsity_and_counts():
    params = {"kernel": jnp.arange(1.0, 13.0).reshape(4, 3)}
    with pytest.raises(ValueError, match="explicit sparsity"):
        ste.ste_params(params, pattern="unstructured")
    sp, m = ste.sparse_params(params, 0.75, pattern="unstructured")
    assert int(m["kernel"].sum()) == 3
    np.testing.assert_array_equal(np.asarray(sp["kernel"]).ravel()[-3:], [10.0, 11.0, 12.0])


def test_sr_ste_decay_matches_formula():
    w = jax.random.normal(jax.random.key(2), (8, 4))
    g = jax.random.normal(jax.random.key(3), (8, 4))
    lam = 0.3
    tx = ste.sr_ste(lam, pattern="2:4")
    u, _ = jax.jit(tx.update)({"kernel": g}, tx.init({"kernel": w}), {"kernel": w})
    keep = _nm_oracle(np.asarray(w), 2, 4)
    np.testing.assert_allclose(u["kernel"], g + lam * (~keep) * w, rtol=1e-6)


def test_sr_ste_training_jit_nm_valid():
    model = MLP(features=(16, 10))
    params = model.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 10)
    tx = optax.chain(ste.sr_ste(2e-2, pattern="2:4"), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)

    def loss(p):
        logits = model.apply({"params": ste.ste_params(p, pattern="2:4")}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        lv, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, lv

    losses = []
    for _ in range(30):
        params, state, lv = step(params, state)
        losses.append(float(lv))
    assert losses[-1] < losses[0]
    sp, masks = ste.sparse_params(params, pattern="2:4")
    for _, m in jp.masks.mask_leaves(masks):
        assert jp.patterns.nm_valid(m, 2, 4)
    # the exported model computes what the STE forward computed
    a = model.apply({"params": sp}, x)
    b = model.apply({"params": ste.ste_params(params, pattern="2:4")}, x)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        ste.ste_params({"layer": {"kernel": jnp.ones((6, 2))}}, pattern="2:4")
    with pytest.raises(ValueError, match="decay must be"):
        ste.sr_ste(-1.0)
    # the pre-#11 order (params, pattern): a clear error, not a silent misuse
    with pytest.raises(ValueError, match="pass a pattern as pattern='2:4'"):
        ste.ste_params({"kernel": jnp.ones((4, 2))}, "2:4")
    with pytest.raises(ValueError, match="above what pattern 2:4 can reach"):
        ste.sr_ste(0.1, 0.75, pattern="2:4")
    assert isinstance(ste.sr_ste(0.1).init({"kernel": jnp.ones((4, 2))}), optax.EmptyState)
    tx = ste.sr_ste(0.1, pattern="2:4")
    with pytest.raises(ValueError, match="layer/kernel"):
        tx.init({"layer": {"kernel": jnp.ones((6, 2))}})
