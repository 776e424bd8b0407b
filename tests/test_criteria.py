"""Criteria against their formulas; one-shot pruning; NaN/Inf errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.core import criteria as C


def _tree(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"d": {"kernel": jax.random.normal(k1, (6, 4)), "bias": jnp.ones(4)},
            "c": {"kernel": jax.random.normal(k2, (3, 3, 2, 4))}}


def test_formulas():
    p = _tree()
    g = _tree(1)
    masks = jp.init_masks(p)
    w, gw = p["d"]["kernel"], g["d"]["kernel"]
    np.testing.assert_allclose(C.magnitude(p, masks)["d"]["kernel"], jnp.abs(w))
    np.testing.assert_allclose(C.saliency(p, masks, grads=g)["d"]["kernel"], jnp.abs(w * gw))
    np.testing.assert_allclose(C.taylor(p, masks, grads=g)["d"]["kernel"], -w * gw)
    assert C.magnitude(p, masks)["d"]["bias"] is None
    acc = jax.tree.map(lambda x: 2 * x, g)
    np.testing.assert_allclose(C.movement(p, masks, movement=acc)["d"]["kernel"], 2 * gw)
    r1 = C.random(p, masks, key=jax.random.key(3))
    r2 = C.random(p, masks, key=jax.random.key(3))
    np.testing.assert_array_equal(r1["d"]["kernel"], r2["d"]["kernel"])
    r3 = C.random(p, masks, key=jax.random.key(4))
    assert not np.allclose(r1["d"]["kernel"], r3["d"]["kernel"])
    assert float(r1["d"]["kernel"].min()) >= 0.0 and float(r1["d"]["kernel"].max()) < 1.0


def test_wanda_broadcast():
    p = _tree()
    masks = jp.init_masks(p)
    norms = {"d": {"kernel": jnp.arange(1.0, 7.0), "bias": None},
             "c": {"kernel": jnp.array([1.0, 10.0])}}
    out = C.wanda(p, masks, act_norms=norms)
    np.testing.assert_allclose(out["d"]["kernel"],
                               jnp.abs(p["d"]["kernel"]) * jnp.arange(1.0, 7.0)[:, None])
    np.testing.assert_allclose(out["c"]["kernel"][..., 1, :],
                               10 * jnp.abs(p["c"]["kernel"][..., 1, :]), rtol=1e-6)


def test_missing_signal_and_unknown_name():
    with pytest.raises(ValueError, match="criterion 'saliency' needs signal"):
        C.saliency(_tree())
    with pytest.raises(ValueError, match="unknown criterion 'foo'"):
        C.get("foo")


def test_custom_criterion_is_a_few_lines():
    fisher = C.Criterion("fisher", lambda w, grads: grads**2, needs=("grads",))
    p, g = _tree(), _tree(1)
    _, m = jp.prune(p, 0.5, criterion=fisher, grads=g)
    k = np.asarray(g["d"]["kernel"]) ** 2
    assert (np.asarray(m["d"]["kernel"]) == (k >= np.median(k))).all()


def test_prune_one_shot_all_patterns():
    p = {"d": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)), "bias": jnp.ones(8)}}
    for spec, sparsity, expect in [("unstructured", 0.75, 0.75), ("2:4", None, 0.5),
                                   ("block4x4", 0.75, 0.75), ("channel", 0.75, 0.75)]:
        pruned, m = jp.prune(p, sparsity, pattern=spec)
        assert jp.total_sparsity(pruned, m) == pytest.approx(expect)
        assert float((pruned["d"]["kernel"] == 0).mean()) == pytest.approx(expect)
        np.testing.assert_array_equal(pruned["d"]["bias"], p["d"]["bias"])
    # a sparsity the pattern cannot reach is refused, not silently capped at 1 - n/m
    with pytest.raises(ValueError, match="above what pattern 2:4 can reach"):
        jp.prune(p, 0.75, pattern="2:4")


def test_prune_with_masks_keeps_pruned_entries_pruned():
    w = jnp.array([[5.0, 1.0], [3.0, 2.0]])
    _, m1 = jp.prune({"kernel": w}, 0.25)
    assert not bool(m1["kernel"][0, 1])
    # entry (0, 1) is pruned; the params now say it is the largest, but it stays pruned
    w2 = w.at[0, 1].set(100.0)
    _, m2 = jp.prune({"kernel": w2}, 0.5, masks=m1)
    assert not bool(m2["kernel"][0, 1])
    assert int(m2["kernel"].sum()) == 2


def test_nan_inf_scores_named():
    p = {"enc": {"kernel": jnp.array([[1.0, jnp.nan], [2.0, 3.0]])}}
    with pytest.raises(ValueError, match=r"scores for 'enc/kernel' contain a non-finite value "
                                         r"nan at index \(0, 1\)"):
        jp.prune(p, 0.5)
    p = {"enc": {"kernel": jnp.array([[1.0, jnp.inf], [2.0, 3.0]])}}
    with pytest.raises(ValueError, match="non-finite value inf"):
        jp.prune(p, 0.5)


def test_bad_pattern_shape_named():
    p = {"enc": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match="'enc/kernel'.*not divisible by m=4"):
        jp.prune(p, 0.5, pattern="2:4")
    with pytest.raises(ValueError, match=r"sparsity for '<target>' must be in \[0, 1\), got 1.5"):
        jp.prune(p, 1.5)
