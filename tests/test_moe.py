"""Mixture-of-experts: expert geometry from the computation, expert groups, slimming, expert
calibration (REAP / frequency / per-expert Hessians) against numpy oracles, merging, per-expert
one-shot pruning."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import oneshot
from jaxprune import structured as st
from jaxprune.core.patterns import nm_valid
from jaxprune.structured import experts as ex
from jaxprune.zoo.models.moe import LoopMoEFFN, MoE, MoEConfig, MoEFFN, config_from_params

E, D, F, K = 4, 8, 12, 2


def _init(model, *args, seed=0):
    """Random params from the model's shapes (eval_shape: no slow compiled initialisers)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 1 / np.sqrt(s.shape[-2] if len(s.shape) > 1
                                                                        else 4), s.shape), s.dtype),
                        shapes)


@pytest.fixture(scope="module")
def ffn():
    """A bare MoE FFN layer (router input = the layer input) with random weights and tokens."""
    m = MoEFFN(E, F, K)
    h = jax.random.normal(jax.random.key(1), (4, 10, D))
    p = _init(m, h)
    p = {**p, "router": p["router"] * 3.0}  # sharper routing

    def fn(p, h):
        return m.apply({"params": p}, h)

    layers = ex.find_experts(fn, p, h)
    stats = ex.calibrate_experts(fn, p, [h[:2], h[2:]], layers, gates=ex.topk_gates(K))
    return fn, p, h, layers, stats


def _oracle(p, h):
    """numpy: gates, routed mask and expert outputs of every token for every expert."""
    r, w1, w2 = (np.asarray(p[k], np.float64) for k in ("router", "w_in", "w_out"))
    x = np.asarray(h, np.float64).reshape(-1, D)
    lg = x @ r
    pr = np.exp(lg - lg.max(1, keepdims=True))
    pr /= pr.sum(1, keepdims=True)
    top = np.argsort(-pr, 1, kind="stable")[:, :K]
    g = np.zeros_like(pr)
    np.put_along_axis(g, top, np.take_along_axis(pr, top, 1), 1)
    g /= g.sum(1, keepdims=True)
    hid = np.asarray(jax.nn.gelu(jnp.asarray(np.einsum("td,edf->etf", x, w1), jnp.float32)), np.float64)
    return x, g, g > 0, hid, np.einsum("etf,efd->etd", hid, w2)


def test_operator_map_expert_axis_is_batch(ffn):
    fn, p, h, _, _ = ffn
    om = jp.operator_map(fn, p, h)
    assert (om["w_in"].batch, om["w_in"].fan_in, om["w_in"].out) == ((0,), (1,), (2,))
    assert (om["w_out"].batch, om["w_out"].fan_in, om["w_out"].out) == ((0,), (1,), (2,))
    assert (om["router"].batch, om["router"].out) == ((), (1,))


def test_nm_pattern_acts_per_expert(ffn):
    fn, p, h, _, _ = ffn
    om = jp.operator_map(fn, p, h)
    masks = jp.compute_masks({"w_in": jnp.ones(p["w_in"].shape, bool)}, {"w_in": jnp.abs(p["w_in"])},
                             0.5, pattern="2:4", opmap=om)
    w = np.abs(np.asarray(p["w_in"]))
    for e in range(E):  # independent re-derivation: each expert's (d, f) matrix, groups of 4 along d
        g = w[e].reshape(D // 4, 4, F)
        rank = np.argsort(np.argsort(-g, axis=1, kind="stable"), axis=1, kind="stable")
        np.testing.assert_array_equal(np.asarray(masks["w_in"][e]), (rank < 2).reshape(D, F))


def test_unstructured_per_expert_matches_numpy(ffn):
    _, p, _, layers, stats = ffn
    only_out = [dataclasses.replace(layers[0], experts=layers[0].experts[1:], views=layers[0].views[1:])]
    new, masks = ex.prune_experts(p, only_out, stats, oneshot.Magnitude(), 0.25)
    assert set(masks) == {"w_out"}
    w = np.abs(np.asarray(p["w_out"]))
    for e in range(E):
        k = round(0.75 * w[e].size)
        ref = np.zeros(w[e].size, bool)
        ref[np.argsort(-w[e].ravel(), kind="stable")[:k]] = True
        np.testing.assert_array_equal(masks["w_out"][e].ravel(), ref)
    np.testing.assert_array_equal(np.asarray(new["w_out"]) != 0, masks["w_out"])


def test_expert_groups_stacked(ffn):
    _, _, _, layers, _ = ffn
    (lay,) = layers
    assert lay.router == "router" and lay.router_axis == 1 and lay.size == E
    assert lay.group.simple_key() == {("router", 1), ("w_in", 0), ("w_out", 0)}
    assert not lay.group.exact  # top-k routing: removing an expert changes the choice


def test_loop_experts_are_not_mistaken_for_a_stacked_axis():
    m = LoopMoEFFN(E, F, K)
    x = jnp.ones((1, 6, D))
    p = _init(m, x)

    def fn(p, x):
        return m.apply({"params": p}, x)

    assert ex.find_experts(fn, p, x) == []
    gs = st.discover_groups(fn, p, x, include_fixed=True)
    rg = next(g for g in gs if ("router/kernel", 1) in g.simple_key())
    assert rg.kind == "fixed"  # the router column is sliced per expert: never pruned on its own
    hidden = [g for i in range(E) for g in gs
              if g.simple_key() == {(f"expert_{i}_in/kernel", 1), (f"expert_{i}_out/kernel", 0)}]
    assert len(hidden) == E and all(g.kind == "" for g in hidden)


def test_escaping_router_indices_fix_the_expert_axis():
    p = {"r": jnp.ones((4, 3)), "w": jnp.ones((3, 4, 2))}

    def fn(p, x, leak):
        idx = jnp.argmax(x @ p["r"], -1)
        y = jnp.einsum("te,etf->tf", jax.nn.one_hot(idx, 3),
                       jnp.einsum("etd,edf->etf", jnp.broadcast_to(x, (3, *x.shape)), p["w"]))
        return (y, idx) if leak else y

    x = jnp.ones((5, 4))
    assert len(ex.find_experts(lambda p, x: fn(p, x, False), p, x)) == 1
    assert ex.find_experts(lambda p, x: fn(p, x, True), p, x) == []  # indices reach the output


def test_slimmed_equals_routing_masked_model():
    cfg = MoEConfig(d=D, layers=1, heads=2, experts=E, ffn=F, seq=6)
    x = jax.random.randint(jax.random.key(3), (2, 6), 0, 256)
    m = MoE(cfg)
    p = _init(m, x)
    layers = ex.find_experts(lambda p, x: m.apply({"params": p}, x), p, x)
    assert [lay.router for lay in layers] == ["block_0/moe/router"]
    keep = {layers[0].name: np.array([0, 2, 3])}
    slim = ex.remove_experts(p, layers, keep)
    c2 = config_from_params(cfg, slim)
    assert c2.layer_experts == (3,)
    mask = np.zeros((1, E), bool)
    mask[0, keep[layers[0].name]] = True
    slim_out = jax.jit(MoE(c2).apply)({"params": slim}, x)
    np.testing.assert_allclose(slim_out, jax.jit(m.apply)({"params": p}, x, mask), atol=1e-5, rtol=1e-5)


def test_reap_frequency_and_hessians_match_numpy(ffn):
    _, p, h, layers, stats = ffn
    s = stats[layers[0].name]
    x, g, routed, hid, out = _oracle(p, h)
    assert s.tokens == x.shape[0]
    np.testing.assert_array_equal(s.routed, routed.sum(0))
    reap = np.array([(g[routed[:, e], e] * np.linalg.norm(out[e][routed[:, e]], axis=1)).mean()
                     for e in range(E)])
    np.testing.assert_allclose(s.reap, reap, rtol=1e-4)
    np.testing.assert_allclose(s.frequency, routed.mean(0), rtol=1e-6)
    for e in range(E):  # each expert's own Hessian: only the tokens routed to it
        xe = x[routed[:, e]]
        np.testing.assert_allclose(s.weights["w_in"][e].gram, xe.T @ xe, rtol=1e-4, atol=1e-4)
        assert s.weights["w_in"][e].count == routed[:, e].sum()
        he = hid[e][routed[:, e]]
        np.testing.assert_allclose(s.weights["w_out"][e].gram, he.T @ he, rtol=1e-4, atol=1e-4)


def test_wrong_gates_are_refused_and_plain_calibration_refuses_stacked_experts(ffn):
    fn, p, h, layers, _ = ffn
    with pytest.raises(ValueError, match="routed"):
        ex.calibrate_experts(fn, p, [h[:2]], layers, gates=ex.topk_gates(1))
    with pytest.raises(ValueError, match="batched"):
        oneshot.calibrate(fn, p, [h])


def test_merge_is_frequency_weighted_average(ffn):
    _, p, _, layers, stats = ffn
    lay = layers[0]
    keep = {lay.name: np.array([0, 2])}
    merged = ex.merge_experts(p, layers, keep, stats)
    w1, w2 = np.asarray(p["w_in"], np.float64), np.asarray(p["w_out"], np.float64)
    v = np.concatenate([w1.reshape(E, -1), w2.reshape(E, -1)], 1)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    owner = np.array([0, 2])[np.argmax(v @ v[[0, 2]].T, 1)]
    owner[[0, 2]] = [0, 2]
    f = stats[lay.name].routed.astype(np.float64)
    for j, e in enumerate((0, 2)):
        mem = owner == e
        ref = np.tensordot(f[mem] / f[mem].sum(), w1[mem], axes=1)
        np.testing.assert_allclose(np.asarray(merged["w_in"][j]), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["router"], np.asarray(p["router"])[:, [0, 2]])


def test_choose_experts_by_score_and_stun(ffn):
    fn, p, h, layers, stats = ffn
    sc = ex.expert_scores(stats, "reap")[layers[0].name]
    sel = ex.choose_experts(ex.expert_scores(stats, "reap"), layers, 0.5, min_keep=K)
    np.testing.assert_array_equal(sel.keep[layers[0].name], np.sort(np.argsort(-sc, kind="stable")[:2]))
    slim = ex.remove_experts(p, layers, sel.keep)
    m2 = MoEFFN(2, F, K)

    def fn2(p, h):
        return m2.apply({"params": p}, h)

    lay2 = ex.find_experts(fn2, slim, h)
    st2 = ex.calibrate_experts(fn2, slim, [h[:2]], lay2, gates=ex.topk_gates(K))
    new, masks = ex.prune_experts(slim, lay2, st2, oneshot.SparseGPT(), pattern="2:4")
    assert new["w_in"].shape == (2, D, F)
    for e in range(2):
        assert nm_valid(jnp.asarray(masks["w_in"][e]), 2, 4)
    with pytest.raises(ValueError, match="unknown expert criterion"):
        ex.expert_scores(stats, "magnitude")
