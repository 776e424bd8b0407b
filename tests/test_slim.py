"""Slim model == masked model; exact param-count shrink; importance, selection, FLAP compensation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxprune.core.allocation import Global
from jaxprune.core.masks import apply_masks
from jaxprune.oneshot.calibration import calibrate
from jaxprune.structured import (
    choose_units,
    compensate_bias,
    discover_groups,
    group_masks,
    group_scores,
    input_stats,
    param_count,
    slim,
    slim_nnx,
)
from jaxprune.zoo.models import CNN, MLP, NnxCNN, rebuild_small
from jaxprune.zoo.models.toy_transformer import ToyConfig, ToyGPT, config_from_params


class ConvBN(nn.Module):
    c1: int = 6
    c2: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(self.c1, (3, 3), name="a")(x)))
        x = nn.relu(nn.Conv(self.c2, (3, 3), name="b")(x))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def _random_vars(v, seed=0):
    """Randomise every leaf (BN stats included) so zero-init biases do not hide bugs."""
    flat, tree = jax.tree_util.tree_flatten(v)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = [jax.random.normal(k, x.shape) * 0.5 for k, x in zip(keys, flat, strict=True)]
    v = tree.unflatten(out)
    if "batch_stats" in v:
        v["batch_stats"] = jax.tree.map(jnp.abs, v["batch_stats"])
    return v


def _removed_size(params, groups, keep):
    """Expected param-count drop computed independently: removed slices per (leaf, axis)."""
    from jaxprune.core.masks import leaves_with_paths

    shapes = {p: x.shape for p, x in leaves_with_paths(params)}
    kept_len = {}
    for g in groups:
        kb = np.zeros(g.size, bool)
        kb[keep[g.name]] = True
        for m in g.members:
            cur = kept_len.get((m.path, m.axis), np.ones(shapes[m.path][m.axis], bool))
            kept_len[(m.path, m.axis)] = cur & kb[m.unit_of_index()]
    total = 0
    for p, shp in shapes.items():
        new = [int(kept_len[(p, a)].sum()) if (p, a) in kept_len else d for a, d in enumerate(shp)]
        total += int(np.prod(shp)) - int(np.prod(new))
    return total


def _check(apply_masked, apply_slim, variables, groups, keep, x, atol=1e-4):
    masks = group_masks(variables, groups, keep)
    small = slim(variables, groups, keep)
    ref = apply_masked(apply_masks(variables, masks), x)
    out = apply_slim(small, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=atol, rtol=1e-4)
    assert param_count(variables) - param_count(small) == _removed_size(variables, groups, keep)
    return small


def _random_keep(groups, frac=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return {g.name: np.sort(rng.choice(g.size, max(1, int(g.size * frac)), replace=False))
            for g in groups if g.exact}


def test_mlp_slim_equals_masked():
    x = jax.random.normal(jax.random.key(1), (4, 64))
    v = _random_vars(MLP().init(jax.random.key(0), x))
    gs = discover_groups(MLP().apply, v, x)
    keep = _random_keep(gs, 0.3)
    small = _check(MLP().apply, lambda s, x: rebuild_small(MLP(), s["params"]).apply(s, x),
                   v, gs, keep, x)
    assert small["params"]["Dense_0"]["kernel"].shape == (64, 76)


def test_cnn_slim_equals_masked_and_shrinks_exactly():
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    v = _random_vars(CNN().init(jax.random.key(0), x))
    gs = discover_groups(CNN().apply, v, x)
    keep = _random_keep(gs, 0.5)
    small = _check(CNN().apply, lambda s, x: rebuild_small(CNN(), s["params"]).apply(s, x), v, gs, keep, x)
    assert rebuild_small(CNN(), small["params"]).channels == (16, 32)


def test_conv_bn_slim_equals_masked():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
    v = _random_vars(ConvBN().init(jax.random.key(0), x))
    gs = discover_groups(ConvBN().apply, v, x)
    keep = {gs[0].name: np.array([0, 2, 5]), gs[1].name: np.array([1, 4])}
    small = _check(ConvBN().apply, lambda s, x: ConvBN(3, 2).apply(s, x), v, gs, keep, x)
    assert small["batch_stats"]["bn"]["mean"].shape == (3,)
    assert small["params"]["fc"]["kernel"].shape == (6 * 6 * 2, 3)


def test_nnx_slim_equals_masked():
    m = NnxCNN(channels=(8, 6), hidden=12, rngs=nnx.Rngs(0))  # nnx: variables carry shapes
    gd, st = nnx.split(m)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    st = jax.tree.map(lambda a: a + 0.1, st)
    fn = lambda s, x: nnx.merge(gd, s)(x)  # noqa: E731
    gs = discover_groups(fn, st, x)
    assert [g.size for g in gs] == [8, 6, 12]
    keep = _random_keep(gs, 0.5, seed=3)
    _check(fn, fn, st, gs, keep, x)
    small = slim_nnx(nnx.merge(gd, st), gs, keep)
    assert small(x).shape == (2, 10)


@pytest.mark.parametrize("glu", [False, True])
def test_toy_gpt_gqa_slim_equals_masked(glu):
    cfg = ToyConfig(vocab=13, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=12,
                    glu=glu, max_len=8)
    m = ToyGPT(cfg)
    x = jax.random.randint(jax.random.key(2), (2, 8), 0, 13)
    v = _random_vars(m.init(jax.random.key(0), x))
    v = jax.tree.map(lambda a: a * 0.5, v)
    gs = discover_groups(m.apply, v, x)
    # heads and FFN units (the toy config has a fixed head_dim, so head-dim groups stay whole)
    exact = [g for g in gs if g.exact
             and not any(len(mm.sizes) > 1 and mm.pos == len(mm.sizes) - 1 for mm in g.members)]
    assert len(exact) == 3
    keep = _random_keep(exact, 0.5, seed=1)

    def slim_apply(s, x):
        return ToyGPT(config_from_params(cfg, s["params"])).apply(s, x)

    small = _check(m.apply, slim_apply, v, exact, keep, x)
    new = config_from_params(cfg, small["params"])
    # per layer: kv heads 2 -> 1, query heads per kv group 2 -> 1, d_ff 12 -> 6
    assert new.n_kv_heads == (1,) and new.n_heads == (1,) and new.d_ff == (6,)


def test_choose_units_refuses_empty_layer_and_reports():
    cfg = ToyConfig(vocab=9, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=8)
    m = ToyGPT(cfg)
    x = jnp.zeros((1, 4), jnp.int32)
    v = m.init(jax.random.key(0), x)
    heads = [g for g in discover_groups(m.apply, v, x)
             if any(mm.path.endswith("attn/o/kernel") and mm.axis == 0 and mm.pos == 0 for mm in g.members)]
    assert len(heads) == 1 and heads[0].size == 2
    with pytest.warns(UserWarning, match="keeping the best 1"):
        sel = choose_units(group_scores(v, heads, "l2"), heads, 0.9)  # 1.8 of 2 heads -> 2
    assert len(sel.keep[heads[0].name]) == 1 and any("cannot lose every unit" in n for n in sel.notes)
    with pytest.raises(ValueError, match="would lose all 2 units"):
        slim(v, heads, {heads[0].name: []})
    with pytest.raises(ValueError, match=r"sparsity for 'group .*' must be in \[0, 1\)"):
        choose_units(group_scores(v, heads, "l2"), heads, 1.0)


def test_gqa_uneven_sparsity_rounds_and_reports():
    cfg = ToyConfig(vocab=9, d_model=8, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=2, d_ff=8)
    m = ToyGPT(cfg)
    x = jnp.zeros((1, 4), jnp.int32)
    v = m.init(jax.random.key(0), x)
    gs = discover_groups(m.apply, v, x)
    qg = [g for g in gs
          if any(mm.path.endswith("o/kernel") and mm.axis == 0 and mm.pos == 1 for mm in g.members)]
    assert len(qg) == 1 and qg[0].size == 4  # 4 query heads per kv head
    sel = choose_units(group_scores(v, qg, "l1"), qg, 0.3)  # 30% of 8 heads = 2.4: not a GQA shape
    assert len(sel.keep[qg[0].name]) == 3  # one unit = one head per kv group -> 2 heads removed
    assert any("rounded to 1 whole units" in n for n in sel.notes)
    small = slim(v, qg, sel.keep)
    assert config_from_params(cfg, small["params"]).n_heads == (6,)


def test_scores_against_reference():
    p = {"a": jnp.array([[1.0, -2.0], [3.0, 0.0]]), "b": jnp.array([[1.0], [2.0]])}
    gs = discover_groups(lambda p, x: (x @ p["a"]) @ p["b"], p, jnp.ones((1, 2)))
    (g,) = gs
    np.testing.assert_allclose(group_scores(p, gs, "l1")[g.name], [1 + 3 + 1, 2 + 0 + 2])
    np.testing.assert_allclose(group_scores(p, gs, "l2")[g.name], np.sqrt([1 + 9 + 1, 4 + 0 + 4]))
    grads = jax.tree.map(lambda w: jnp.ones_like(w), p)
    np.testing.assert_allclose(group_scores(p, gs, "taylor", grads=grads)[g.name], [5.0, 0.0])
    sel = choose_units({g.name: np.array([1.0, 2.0])}, gs, 0.5)
    assert sel.keep[g.name].tolist() == [1]
    # global allocation standardises per group; rounding to multiples keeps hardware shapes
    big = choose_units({g.name: np.arange(16.0)}, [type(g)(g.name, 16, g.members)], 0.3, round_to=8)
    assert len(big.keep[g.name]) == 8 and big.notes


def test_wanda_and_flap_scores_use_input_stats():
    m = MLP((5, 3))
    x = jax.random.normal(jax.random.key(0), (32, 4)) * jnp.array([1.0, 2.0, 0.0, 1.0])
    v = m.init(jax.random.key(1), x)
    gs = discover_groups(m.apply, v, x)
    st = input_stats(m, v, [x])
    h = np.asarray(jax.nn.relu(x @ v["params"]["Dense_0"]["kernel"] + v["params"]["Dense_0"]["bias"]))
    np.testing.assert_allclose(st["params/Dense_1/kernel"].mean, h.mean(0), rtol=1e-5, atol=1e-6)
    w2 = np.asarray(v["params"]["Dense_1"]["kernel"])
    flap = group_scores(v, gs, "flap", stats=st)[gs[0].name]
    np.testing.assert_allclose(flap, h.var(0) * (w2**2).sum(1), rtol=1e-4, atol=1e-7)
    wanda = group_scores(v, gs, "wanda", stats=st)[gs[0].name]
    np.testing.assert_allclose(wanda, np.linalg.norm(h, axis=0) * np.abs(w2).sum(1), rtol=1e-4)


def test_bias_compensation_reference():
    m = MLP((6, 3))
    x = jax.random.normal(jax.random.key(0), (64, 4))
    v = m.init(jax.random.key(1), x)
    (g,) = discover_groups(m.apply, v, x)
    st = input_stats(m, v, [x])
    keep = {g.name: np.array([0, 2, 3])}
    means = {"params/Dense_1/kernel": st["params/Dense_1/kernel"].mean}
    comp = compensate_bias(v, [g], keep, means)
    removed = np.array([1, 4, 5])
    w2 = np.asarray(v["params"]["Dense_1"]["kernel"])
    mean = means["params/Dense_1/kernel"]
    expect = np.asarray(v["params"]["Dense_1"]["bias"]) + mean[removed] @ w2[removed]
    np.testing.assert_allclose(comp["params"]["Dense_1"]["bias"], expect, rtol=1e-5, atol=1e-6)
    # compensated slim == compensated masked
    small = _check(m.apply, lambda s, x: rebuild_small(m, s["params"]).apply(s, x), comp, [g], keep, x)
    dense = m.apply(v, x)
    plain = m.apply(apply_masks(v, group_masks(v, [g], keep)), x)
    comp_out = rebuild_small(m, small["params"]).apply(small, x)
    # on the calibration data the mean output error of the pruned model is removed exactly
    assert float(jnp.abs((comp_out - dense).mean(0)).max()) < 1e-4
    assert float(jnp.abs((plain - dense).mean(0)).max()) > 1e-2


def _groups(*sizes):
    from jaxprune.structured import Group, Member

    return [Group(f"g{i}", n, (Member(f"w{i}", 0, (n,)),)) for i, n in enumerate(sizes)]


def test_choose_units_uniform_against_numpy_reference():
    rng = np.random.default_rng(0)
    gs = _groups(7, 12, 5)
    sc = {g.name: rng.normal(size=g.size).round(1) for g in gs}  # rounded: ties occur
    for sp in (0.0, 0.3, 0.5, 0.8):
        sel = choose_units(sc, gs, sp)
        for g in gs:
            k = g.size - int(round(sp * g.size))
            ref = np.sort(np.argsort(-sc[g.name], kind="stable")[:k])  # ties: lower index kept
            np.testing.assert_array_equal(sel.keep[g.name], ref)
    # one sparsity per group; unnamed groups keep every unit
    sel = choose_units(sc, gs, {"g0": 0.5, "g2": 0.2})
    assert [len(sel.keep[g.name]) for g in gs] == [3, 12, 4]
    with pytest.raises(ValueError, match="allocation must be"):
        choose_units(sc, gs, 0.5, allocation="per_group")
    with pytest.raises(ValueError, match=r"not among the groups"):
        choose_units(sc, gs, {"nope": 0.5})


def test_choose_units_global_one_threshold_on_standardised_scores():
    rng = np.random.default_rng(1)
    gs = _groups(10, 30)
    sc = {"g0": rng.normal(size=10) * 100.0, "g1": rng.normal(size=30)}  # different scales
    sel = choose_units(sc, gs, 0.5, allocation=Global(min_density=0.0))
    z = np.concatenate([(v - v.mean()) / v.std() for v in sc.values()])
    kept = np.sort(np.argsort(-z, kind="stable")[:20])
    np.testing.assert_array_equal(np.concatenate([sel.keep["g0"], sel.keep["g1"] + 10]), kept)
    # the per-group floor of Global keeps at least min_density of every group
    low = {"g0": np.arange(10.0), "g1": np.arange(30.0) + 100.0}
    sel = choose_units(low, gs, 0.6, allocation=Global(min_density=0.5))
    assert len(sel.keep["g0"]) >= 5 and len(sel.keep["g1"]) >= 15
    with pytest.raises(ValueError, match="needs one sparsity"):
        choose_units(sc, gs, {"g0": 0.5}, allocation="global")


def test_input_stats_is_calibrate_rekeyed():
    m = MLP((5, 3))
    x = jax.random.normal(jax.random.key(0), (16, 4))
    v = m.init(jax.random.key(1), x)
    st = input_stats(m, v, [x, x * 2])
    ref = calibrate(m, v["params"], [x, x * 2], gram=False)
    assert sorted(st) == sorted("params/" + k for k in ref)
    for k, r in ref.items():
        np.testing.assert_array_equal(st["params/" + k].sumsq, r.sumsq)
    with pytest.raises(ValueError, match="collections \\['batch_stats'\\]"):
        input_stats(m, {**v, "batch_stats": {}}, [x])


def test_conv_wanda_uses_patch_norms():
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    v = CNN().init(jax.random.key(0), x)
    gs = discover_groups(CNN().apply, v, x)
    st = input_stats(CNN(), v, [x])
    g = gs[0]  # conv1 output channels = conv2 input channels
    (c2,) = [mm.path for mm in g.members if mm.path.endswith("kernel") and mm.axis == 2]
    w = np.asarray(v["params"][c2.split("/")[1]]["kernel"])
    norms = st[c2].norms.reshape(w.shape[:-1])
    ref = (np.abs(w) * norms[..., None]).sum(axis=(0, 1, 3))
    np.testing.assert_allclose(group_scores(v, [g], "wanda", stats=st)[g.name], ref, rtol=1e-4)


def test_wanda_and_flap_scores_on_einsum_and_pytorch_layouts():
    """Members whose fan-in is not on leading axes (einsum q (heads, d, head_dim), a PyTorch
    (out, in) weight) are scored from the traced matrix view: the same numbers as a numpy oracle
    over the true consumer rows, and no error (the Flax-layout guess used to raise)."""
    rng = np.random.default_rng(0)
    d, n, hd, f = 6, 3, 2, 5
    p = {"q": jnp.asarray(rng.normal(size=(n, d, hd)), jnp.float32),     # producer, fan-in d
         "o": jnp.asarray(rng.normal(size=(n, hd, d)), jnp.float32),     # consumer, fan-in (n, hd)
         "up": jnp.asarray(rng.normal(size=(f, d)), jnp.float32),        # PyTorch (out, in)
         "down": jnp.asarray(rng.normal(size=(d, f)), jnp.float32)}      # PyTorch (out, in)

    def fn(p, x):
        h = jnp.einsum("bd,ndh->bnh", x, p["q"])
        x = x + jnp.einsum("bnh,nhd->bd", jnp.tanh(h), p["o"])
        return x + jax.nn.relu(x @ p["up"].T) @ p["down"].T

    x = jnp.asarray(rng.normal(size=(40, d)), jnp.float32)
    gs = discover_groups(fn, p, x)
    st = calibrate(fn, p, [x], gram=False)
    heads = next(g for g in gs if any(m.path == "o" and m.axis == 0 for m in g.members))
    ffn = next(g for g in gs if any(m.path == "down" and m.axis == 1 for m in g.members))
    a = np.tanh(np.einsum("bd,ndh->bnh", np.asarray(x), np.asarray(p["q"])))     # o's input
    x2 = np.asarray(x) + np.einsum("bnh,nhd->bd", a, np.asarray(p["o"]))
    u = np.maximum(x2 @ np.asarray(p["up"]).T, 0.0)                                 # down's input
    o, dn = np.asarray(p["o"]), np.asarray(p["down"])
    for crit in ("flap", "wanda"):
        sc = group_scores(p, gs, crit, stats=st)
        if crit == "flap":
            want_h = (a.var(0) * (o**2).sum(-1)).sum(1)
            want_f = u.var(0) * (dn**2).sum(0)
        else:
            want_h = (np.sqrt((a**2).sum(0)) * np.abs(o).sum(-1)).sum(1)
            want_f = np.sqrt((u**2).sum(0)) * np.abs(dn).sum(0)
        np.testing.assert_allclose(sc[heads.name], want_h, rtol=2e-4, err_msg=crit)
        np.testing.assert_allclose(sc[ffn.name], want_f, rtol=2e-4, err_msg=crit)
