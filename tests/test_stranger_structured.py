"""Structured pruning on models written by a stranger (not the zoo): slim == masked oracles, exact
unit counts, layouts other than Flax's, and clear refusals of arguments that would silently mislead."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxprune import structured as st
from jaxprune.core.allocation import Global
from jaxprune.core.masks import apply_masks
from jaxprune.oneshot.calibration import calibrate
from jaxprune.structured import Group, Member


def _rand(tree, seed=0):
    flat, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return tdef.unflatten([jax.random.normal(k, x.shape) * 0.5 for k, x in zip(keys, flat, strict=True)])


def _expected_count(params, groups, keep):
    """Param count after removing the units, computed per (leaf, axis) independently of slim."""
    from test_slim import _removed_size  # the same per-(leaf, axis) oracle

    return st.param_count(params) - _removed_size(params, groups, keep)


def _check_slim_equals_masked(fn_full, fn_slim, v, x, groups, sparsity):
    sel = st.choose_units(st.group_scores(v, groups, "l2"), groups, sparsity)
    for g in groups:
        assert g.size - len(sel.keep[g.name]) == round(sparsity * g.size)
    masked = apply_masks(v, st.group_masks(v, groups, sel.keep))
    small = st.slim(v, groups, sel.keep)
    a, b = fn_full(masked, x), fn_slim(small, x, sel)
    assert float(jnp.max(jnp.abs(a - fn_full(v, x)))) > 1e-2  # the pruning did something
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    assert st.param_count(small) == _expected_count(v, groups, sel.keep) < st.param_count(v)
    return small, sel


class _ResMLP(nn.Module):
    hidden: tuple = (16, 12)

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="inp")(x)
        for i, h in enumerate(self.hidden):
            x = x + nn.Dense(8, name=f"down{i}")(nn.gelu(nn.Dense(h, name=f"up{i}")(
                nn.LayerNorm(name=f"ln{i}")(x))))
        return nn.Dense(3, name="out")(nn.LayerNorm(name="lnf")(x))


def test_residual_mlp_with_layernorm():
    m, x = _ResMLP(), jax.random.normal(jax.random.key(1), (4, 5))
    v = _rand(m.init(jax.random.key(0), x))
    gs = st.discover_groups(m.apply, v, x)
    hidden = {g.simple_key() for g in gs if g.exact}
    assert hidden == {frozenset({(f"params/up{i}/kernel", 1), (f"params/up{i}/bias", 0),
                                 (f"params/down{i}/kernel", 0)}) for i in range(2)}
    assert [g.exact for g in gs if ("params/ln0/scale", 0) in g.simple_key()] == [False]

    def slim_apply(s, x, sel):
        p = s["params"]
        return _ResMLP(tuple(p[f"up{i}"]["kernel"].shape[1] for i in range(2))).apply(s, x)

    _check_slim_equals_masked(m.apply, slim_apply, v, x, [g for g in gs if g.exact], 0.5)


D, H, KV, HD, F, V = 16, 6, 2, 4, 12, 11


def _gqa_params(key):
    ks = jax.random.split(key, 8)
    n = lambda k, s: jax.random.normal(k, s) * 0.3  # noqa: E731
    return {"emb": n(ks[0], (V, D)), "wq": n(ks[1], (H * HD, D)), "wk": n(ks[2], (KV * HD, D)),
            "wv": n(ks[3], (KV * HD, D)), "wo": n(ks[4], (D, H * HD)), "w1": n(ks[5], (F, D)),
            "b1": n(ks[6], (F,)), "w2": n(ks[7], (D, F))}


def _gqa(p, tok, hdqk=HD, hdv=HD):
    """PyTorch-layout (out, in) kernels used as x @ w.T, GQA via jnp.repeat, tied unembedding."""
    x = p["emb"][tok]
    b, t, _ = x.shape
    q = (x @ p["wq"].T).reshape(b, t, -1, hdqk)
    k = (x @ p["wk"].T).reshape(b, t, -1, hdqk)
    v = (x @ p["wv"].T).reshape(b, t, -1, hdv)
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, -1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, -1) @ p["wo"].T
    x = x + jax.nn.relu(x @ p["w1"].T + p["b1"]) @ p["w2"].T
    return x @ p["emb"].T


def test_gqa_torch_layout_tied_embedding():
    p, tok = _gqa_params(jax.random.key(0)), jax.random.randint(jax.random.key(1), (2, 5), 0, V)
    gs = st.discover_groups(_gqa, p, tok)
    by = {g.key(): g for g in gs}
    kv = frozenset({("wk", 0, (2, 4), 0), ("wv", 0, (2, 4), 0), ("wq", 0, (2, 3, 4), 0),
                    ("wo", 1, (2, 3, 4), 0)})
    qg = frozenset({("wq", 0, (2, 3, 4), 1), ("wo", 1, (2, 3, 4), 1)})
    assert by[kv].size == KV and by[qg].size == H // KV
    assert frozenset({("emb", 1), ("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0), ("w1", 1),
                      ("w2", 0)}) in {g.simple_key() for g in gs}
    names = {g.simple_key(): g.name for g in gs}
    hq, hv = names[frozenset({("wq", 0), ("wk", 0)})], names[frozenset({("wo", 1), ("wv", 0)})]

    def slim_apply(s, tok, sel):
        return _gqa(s, tok, hdqk=len(sel.keep[hq]), hdv=len(sel.keep[hv]))

    small, sel = _check_slim_equals_masked(_gqa, slim_apply, p, tok, [g for g in gs if g.exact], 0.5)
    # query heads stay grouped: 1 kv head left, carrying 1 of its (now 1) query heads... per kv head
    assert small["wk"].shape[0] % len(sel.keep[hq]) == 0
    n_kv, n_q = len(sel.keep[by[kv].name]), len(sel.keep[by[qg].name])
    assert small["wq"].shape[0] == n_kv * n_q * len(sel.keep[hq])
    assert small["wo"].shape[1] == n_kv * n_q * len(sel.keep[hv])


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5])
def test_global_allocation_removes_exact_count_with_tied_standardised_scores(sparsity):
    # a group of 2 units standardises to (-1, +1): every size-2 group ties with every other, and
    # a single threshold used to keep or drop them all (10% asked -> 28% removed, no note)
    gs = [Group(f"kv{i}", 2, (Member(f"w{i}", 0, (2,)),)) for i in range(4)]
    gs.append(Group("ffn", 10, (Member("f", 0, (10,)),)))
    sc = {g.name: np.random.default_rng(0).normal(size=g.size) for g in gs}
    sel = st.choose_units(sc, gs, sparsity, allocation="global")
    assert sum(g.size - len(sel.keep[g.name]) for g in gs) == round(sparsity * 18)
    # equal scores everywhere: still exactly the asked count (ties -> earlier group, lower index)
    sel = st.choose_units({g.name: np.ones(g.size) for g in gs}, gs, sparsity, allocation="global")
    assert sum(g.size - len(sel.keep[g.name]) for g in gs) == round(sparsity * 18)
    assert all(len(k) >= 1 for k in sel.keep.values())


def test_global_allocation_matches_brute_force_and_reports_floors():
    rng = np.random.default_rng(1)
    gs = [Group(f"g{i}", n, (Member(f"w{i}", 0, (n,)),)) for i, n in enumerate([5, 7, 16, 3])]
    sc = {g.name: rng.normal(size=g.size) for g in gs}
    std = {n: (v - v.mean()) / v.std() for n, v in sc.items()}
    sel = st.choose_units(sc, gs, 0.4, allocation=Global(min_density=0.0))
    flat = sorted(((s, n, i) for n, v in std.items() for i, s in enumerate(v)), reverse=True)
    want = {n: sorted(i for s, nn, i in flat[:31 - round(0.4 * 31)] if nn == n) for n in sc}
    assert {n: k.tolist() for n, k in sel.keep.items()} == want
    sel = st.choose_units(sc, gs, 0.77, allocation=Global(min_density=0.2))
    assert [len(sel.keep[g.name]) for g in gs] == [1, 2, 4, 1] and "floors" in sel.notes[0]


def _torch_mlp(p, x):
    h = jax.nn.relu(x @ p["l1"]["kernel"].T + p["l1"]["bias"]) + 0.7
    return h @ p["l2"]["kernel"].T + p["l2"]["bias"], h


def test_compensate_bias_pytorch_layout():
    n = lambda k, s: jax.random.normal(jax.random.key(k), s) * 0.5  # noqa: E731
    p = {"l1": {"kernel": n(0, (6, 6)), "bias": n(1, (6,))},  # square on purpose
         "l2": {"kernel": n(2, (6, 6)), "bias": n(3, (6,))}}
    fn = lambda p, x: _torch_mlp(p, x)[0]  # noqa: E731
    x = jax.random.normal(jax.random.key(4), (64, 6))
    gs = st.discover_groups(fn, p, x)
    stats = calibrate(fn, p, [x], gram=False)
    keep = {gs[0].name: np.array([0, 2, 4])}
    h = np.asarray(_torch_mlp(p, x)[1])
    ref = (h.mean(0)[[1, 3, 5]] * np.asarray(p["l2"]["kernel"])[:, [1, 3, 5]]).sum(1)
    pc = st.compensate_bias(p, gs, keep, {"l2/kernel": stats["l2/kernel"],
                                          "l1/kernel": stats["l1/kernel"]})
    np.testing.assert_allclose(np.asarray(pc["l2"]["bias"] - p["l2"]["bias"]), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pc["l1"]["bias"]), np.asarray(p["l1"]["bias"]))
    # the compensated slim model equals the compensated masked model
    small = st.slim(pc, gs, keep)
    masked = apply_masks(pc, st.group_masks(pc, gs, keep))
    np.testing.assert_allclose(np.asarray(fn(small, x)), np.asarray(fn(masked, x)), atol=1e-5)
    # a plain mean assumes the Flax layout: that used to add nothing (l2) or a wrong correction
    # (l1) silently; now refused, naming the kernel
    for k in ("l1/kernel", "l2/kernel"):
        with pytest.raises(ValueError, match=k):
            st.compensate_bias(p, gs, keep, {k: stats[k].mean})


def test_compensate_bias_flax_plain_mean_still_works():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="b")(nn.relu(nn.Dense(6, name="a")(x)))

    m, x = M(), jax.random.normal(jax.random.key(1), (32, 4))
    v = _rand(m.init(jax.random.key(0), x))
    gs = st.discover_groups(m.apply, v, x)
    stats = st.input_stats(m, v, [x])
    keep = {gs[0].name: np.array([1, 2, 5])}
    a = st.compensate_bias(v, gs, keep, {k: s.mean for k, s in stats.items()})
    b = st.compensate_bias(v, gs, keep, stats)
    np.testing.assert_allclose(np.asarray(a["params"]["b"]["bias"]),
                               np.asarray(b["params"]["b"]["bias"]), rtol=1e-6)
    assert not np.allclose(np.asarray(a["params"]["b"]["bias"]), np.asarray(v["params"]["b"]["bias"]))


def _mlp_groups():
    p = {"w1": jax.random.normal(jax.random.key(0), (3, 6)), "b1": jnp.zeros(6),
         "w2": jax.random.normal(jax.random.key(1), (6, 2))}
    fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]  # noqa: E731
    return p, st.discover_groups(fn, p, jnp.ones((2, 3)))


def test_taylor_refuses_grads_missing_a_kernel():
    p, gs = _mlp_groups()
    with pytest.raises(ValueError, match="'w2' is not in grads"):
        st.group_scores(p, gs, "taylor", grads={"w1": p["w1"], "b1": p["b1"]})
    # a vector without gradient (BatchNorm statistics...) is still skipped
    g = {"w1": jnp.ones((3, 6)), "w2": jnp.ones((6, 2))}
    ref = np.abs((np.asarray(p["w1"]) * -1).sum(0) + (np.asarray(p["w2"]) * -1).sum(1))
    np.testing.assert_allclose(st.group_scores(p, gs, "taylor", grads=g)[gs[0].name], ref, rtol=1e-5)


def test_scores_on_params_that_do_not_match_the_groups():
    p, gs = _mlp_groups()
    other = {"w1": jnp.ones((3, 5)), "b1": jnp.zeros(5), "w2": jnp.ones((5, 2))}
    with pytest.raises(ValueError, match="'b1' has shape .5,.*length 6"):
        st.group_scores(other, gs, "l2")
    with pytest.raises(ValueError, match="'w2' is not in params"):
        st.group_scores({"w1": p["w1"], "b1": p["b1"]}, gs, "l1")


@pytest.mark.parametrize("kw", [{"round_to": 0}, {"round_to": 2.5}, {"round_to": -4},
                                {"min_keep": 0}, {"min_keep": -1}, {"min_keep": True}])
def test_choose_units_rejects_bad_round_to_and_min_keep(kw):
    p, gs = _mlp_groups()
    with pytest.raises(ValueError, match=next(iter(kw))):
        st.choose_units(st.group_scores(p, gs, "l2"), gs, 0.99, **kw)


@pytest.mark.parametrize("sp", [1.0, -0.1, float("nan")])
def test_choose_units_rejects_bad_sparsity(sp):
    p, gs = _mlp_groups()
    with pytest.raises(ValueError, match="sparsity"):
        st.choose_units(st.group_scores(p, gs, "l2"), gs, sp)
